"""
World-R1: reinforcement learning that makes Wan2.1 produce 3D-consistent video (Flow-GRPO-Fast + 3D rewards).

    python train.py --size=tiny                                          # CPU demo: random tiny models, ~1 min
    torchrun --standalone --nproc_per_node=8 train.py --size=small       # Wan2.1-T2V-1.3B, LoRA, DDP, H200s
    torchrun --nnodes=12 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \\
        train.py --size=large                                            # Wan2.1-T2V-14B, LoRA, FSDP2
    python train.py --size=tiny --resume                                 # continue from out_dir's latest checkpoint

One step, per rank: for each of its prompts, camera words -> warped noise -> a group of G rollouts that share an
ODE prefix and branch through an SDE window (sample.rollout) -> decode -> rewards (reward.score: R_3D + R_gen, or
R_gen alone in the dynamic phase) -> group advantages -> `updates_per_epoch` optimizer steps over the window
transitions, each log-prob recomputed with CFG under the current weights (clipped surrogate + β·KL to the
LoRA-disabled model) -> EMA -> log -> eval -> checkpoint. Groups never leave their rank, so no gather is needed.
Where we depart from the paper and the release (and why): docs/DESIGN.md and the docstring of grpo.py.
"""
import common  # noqa: F401  (first: the CPU torchvision fix)

import argparse
import contextlib
import copy
import difflib
import importlib.util
import json
import math
import os
import shutil
import sys
import time

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
from tqdm import tqdm

import grpo
import noise_warp
import reward
import sample

# -----------------------------------------------------------------------------
# Config: a --size preset sets the defaults, any --key=value overrides it

SIZES = {
    "tiny": dict(model=None, frames=9, height=64, width=64, steps=10, text_len=64, group_size=4,
                 prompts_per_rank=2, micro_batch=8, lr=1e-2, lora_rank=8, lora_alpha=16, fsdp=False,
                 eval_every=3, save_every=1, max_steps=3, reward_size="tiny", grad_checkpointing=False),
    "small": dict(model=sample.HUB["small"], frames=81, height=480, width=832, steps=20, text_len=512,
                  group_size=8, prompts_per_rank=1, micro_batch=1, lr=1e-4, lora_rank=32, lora_alpha=64,
                  fsdp=False, eval_every=30, save_every=60, max_steps=3000, reward_size="small",
                  grad_checkpointing=True),
    "large": dict(model=sample.HUB["large"], frames=81, height=480, width=832, steps=20, text_len=512,
                  group_size=8, prompts_per_rank=1, micro_batch=1, lr=1e-4, lora_rank=32, lora_alpha=64,
                  fsdp=True, eval_every=30, save_every=60, max_steps=3000, reward_size="large",
                  grad_checkpointing=True),
}

p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                            allow_abbrev=False)
p.add_argument("--size", choices=list(SIZES), default="tiny", help="preset: tiny (CPU), small (1.3B), large (14B)")
# model and video
p.add_argument("--model", default=None, help="hub id or local diffusers folder (default: the size's)")
p.add_argument("--frames", type=int, default=None, help="video frames, 4k+1")
p.add_argument("--height", type=int, default=None, help="video height, multiple of 16")
p.add_argument("--width", type=int, default=None, help="video width, multiple of 16")
p.add_argument("--text_len", type=int, default=None, help="UMT5 tokens per prompt")
# rollouts
p.add_argument("--steps", type=int, default=None, help="denoising steps per rollout (Euler ODE + SDE window)")
p.add_argument("--sde_window", type=int, default=2, help="SDE (trained) steps per rollout, in the first half")
p.add_argument("--noise_level", type=float, default=0.7, help="Flow-GRPO SDE noise a: σ_t = a·sqrt(σ/(1−σ))")
p.add_argument("--group_size", type=int, default=None, help="videos per prompt (G)")
p.add_argument("--prompts_per_rank", type=int, default=None, help="groups each rank rolls out per step")
p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance in rollouts and updates")
p.add_argument("--negative_prompt", default="", help="negative prompt (the release uses the empty string)")
p.add_argument("--warp_mode", choices=["init", "stepwise", "none"], default="init", help="camera noise injection")
p.add_argument("--warp_strength", type=float, default=None, help="see sample.py --warp_strength")
# optimisation
p.add_argument("--lr", type=float, default=None, help="AdamW learning rate")
p.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
p.add_argument("--updates_per_epoch", type=int, default=2, help="optimizer steps per batch of rollouts")
p.add_argument("--micro_batch", type=int, default=None, help="transitions per forward/backward")
p.add_argument("--clip_range", type=float, default=1e-3, help="PPO ratio clip ε")
p.add_argument("--adv_clip", type=float, default=5.0, help="advantage clip")
p.add_argument("--beta", type=float, default=0.004, help="KL weight to the pre-trained model")
p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping")
p.add_argument("--lora_rank", type=int, default=None, help="LoRA rank (q, k, v, out of every attention)")
p.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha")
p.add_argument("--full_finetune", action="store_true", help="train all weights (reference = a frozen copy)")
p.add_argument("--ema_decay", type=float, default=0.9, help="EMA of the trained weights, used for eval and export")
p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None, help="FSDP2 instead of DDP")
p.add_argument("--grad_checkpointing", action=argparse.BooleanOptionalAction, default=None,
               help="recompute each block's activations in backward (81x480x832 activations outgrow an H200)")
p.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many non-finite updates in a row")
# rewards
p.add_argument("--reward", choices=["world", "toy"], default="world", help="world: R_3D + R_gen; toy: mean colour")
p.add_argument("--reward_size", choices=["tiny", "small", "large"], default=None, help="reward models to load")
p.add_argument("--w_3d", type=float, default=1.0, help="weight of R_3D = S_meta + S_recon + S_traj")
p.add_argument("--w_gen", type=float, default=1.0, help="weight of R_gen (HPSv3)")
p.add_argument("--gen_frames", type=int, default=4, help="HPSv3 averages the first K frames")
p.add_argument("--gen_scale", type=float, default=0.1, help="HPSv3 mu is multiplied by this")
p.add_argument("--meta_angle", type=float, default=15.0, help="meta view orbit angle, degrees")
p.add_argument("--traj_rot_scale", type=float, default=10.0, help="S_traj rotation scale θ, degrees")
p.add_argument("--zero_advantages", action="store_true", help="control run: advantages forced to 0")
# schedule
p.add_argument("--max_steps", type=int, default=None, help="RL steps (one rollout batch each)")
p.add_argument("--dynamic_every", type=int, default=100, help="main steps between dynamic phases (0: never)")
p.add_argument("--dynamic_steps", type=int, default=50, help="steps of each dynamic phase (R_gen only)")
p.add_argument("--eval_every", type=int, default=None, help="eval on test prompts every N steps (0: never)")
p.add_argument("--eval_prompts", type=int, default=2, help="test prompts per eval")
p.add_argument("--save_every", type=int, default=None, help="checkpoint every N steps (and at the end)")
p.add_argument("--keep_last", type=int, default=3, help="checkpoints kept")
# data, output
p.add_argument("--train_prompts", default="prompts/train.txt", help="3D-aware training prompts")
p.add_argument("--dynamic_prompts", default="prompts/dynamic.txt", help="dynamic-phase prompts")
p.add_argument("--test_prompts", default="prompts/test.txt", help="eval prompts")
p.add_argument("--out_dir", default="out", help="checkpoints, metrics.jsonl, eval videos")
p.add_argument("--resume", action="store_true", help="continue from out_dir's latest complete checkpoint")
p.add_argument("--seed", type=int, default=0, help="all randomness derives from it and the step")
p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (rank 0)")
p.add_argument("--wandb_project", default="world-r1-nano", help="wandb project")


def parse_config(argv):
    """Apply the --size preset, parse, validate. An unknown flag names its closest valid ones."""
    args, unknown = p.parse_known_args(argv)
    for flag in unknown:
        key = flag.split("=")[0]
        if key.startswith("-"):
            close = difflib.get_close_matches(key, [a for act in p._actions for a in act.option_strings], n=3)
            raise SystemExit(f"error: unknown flag {key}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    args = sample.parse_size_args(p, argv, SIZES)
    sample.check_video_size(args.frames, args.height, args.width)
    checks = [
        (args.group_size >= 2, f"--group_size={args.group_size}: a group needs at least 2 videos to compare"),
        (args.prompts_per_rank >= 1, "--prompts_per_rank must be at least 1"),
        (1 <= args.sde_window <= args.steps // 2, f"--sde_window={args.sde_window} must fit in the first half of "
                                                  f"--steps={args.steps}"),
        (args.updates_per_epoch >= 1, "--updates_per_epoch must be at least 1"),
        (args.micro_batch >= 1, "--micro_batch must be at least 1"),
        (args.max_steps >= 1, "--max_steps must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise SystemExit("error: " + message)
    if args.wandb and importlib.util.find_spec("wandb") is None:
        raise SystemExit("error: --wandb needs the wandb package: pip install wandb (then wandb login)")
    if args.warp_strength is None and args.warp_mode == "stepwise":
        args.warp_strength = sample.STEPWISE_STRENGTH[args.size]
    return args


args = parse_config(sys.argv[1:])
rank, local_rank, world, device = common.setup_dist()
master = rank == 0
print0 = common.print0

# Prompt files and batch arithmetic, checked before any model loads
train_prompts = sample.read_prompts(args.train_prompts)
dynamic_prompts = sample.read_prompts(args.dynamic_prompts) if args.dynamic_every else []
test_prompts = sample.read_prompts(args.test_prompts) if args.eval_every else []
groups_per_step = world * args.prompts_per_rank
for name, prompts in (("--train_prompts", train_prompts), ("--dynamic_prompts", dynamic_prompts)):
    if prompts and len(prompts) < groups_per_step:
        raise SystemExit(f"error: {name} has {len(prompts)} prompts, fewer than {world} ranks x "
                         f"{args.prompts_per_rank} prompts per rank; lower --prompts_per_rank or add prompts")
transitions_per_rank = args.prompts_per_rank * args.group_size * args.sde_window
micro_per_update = math.ceil(transitions_per_rank / args.updates_per_epoch / args.micro_batch)
assert transitions_per_rank >= args.updates_per_epoch, (
    f"{transitions_per_rank} transitions per rank cannot feed {args.updates_per_epoch} updates; "
    "raise --group_size/--prompts_per_rank or lower --updates_per_epoch")
if args.resume and not os.path.isfile(os.path.join(args.out_dir, "latest")):
    raise SystemExit(f"error: --resume but {args.out_dir} has no complete checkpoint (no 'latest' file); "
                     "drop --resume to start fresh or point --out_dir at a run")
if master:
    sample.make_writable_dir(args.out_dir, "--out_dir")
print0(json.dumps(vars(args), indent=1))
print0(f"{world} ranks x {args.prompts_per_rank} prompts x {args.group_size} videos = "
       f"{groups_per_step * args.group_size} videos per step; {transitions_per_rank} window transitions per rank "
       f"-> {args.updates_per_epoch} updates of {micro_per_update} micro-batches of <= {args.micro_batch}")

# -----------------------------------------------------------------------------
# Models: Wan (frozen) + LoRA (trained), the reward models, optimizer, EMA

torch.manual_seed(args.seed)
wan = sample.load_wan(args.model, device)
raw = wan.transformer  # the unwrapped module; `model` below may wrap it in DDP
if args.full_finetune:
    ref_model = copy.deepcopy(raw).requires_grad_(False)  # the KL reference: the pre-trained weights
    raw.requires_grad_(True)
else:
    from peft import LoraConfig
    raw.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                               target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
if args.grad_checkpointing:
    raw.enable_gradient_checkpointing()
trainable = {n: prm for n, prm in raw.named_parameters() if prm.requires_grad}
for prm in trainable.values():
    prm.data = prm.data.float()  # optimizer state and updates in fp32, even when the base model runs in bf16
if args.fsdp:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" \
        else MixedPrecisionPolicy()
    for block in raw.blocks:
        fully_shard(block, mp_policy=mp)
    fully_shard(raw, mp_policy=mp)
    model = raw
    trainable = {n: prm for n, prm in raw.named_parameters() if prm.requires_grad}  # now DTensor shards
elif world > 1:
    model = torch.nn.parallel.DistributedDataParallel(raw, device_ids=[local_rank] if device.type == "cuda" else None)
else:
    model = raw
optimizer = torch.optim.AdamW(trainable.values(), lr=args.lr, weight_decay=args.weight_decay)
ema = {n: prm.detach().clone() for n, prm in trainable.items()}
ema_updates = 0
print0(f"trainable parameters: {sum(prm.numel() for prm in trainable.values()) * (world if args.fsdp else 1):,}")

rewards_models = reward.load_reward_models(args.reward_size, device) if args.reward == "world" else None
sigmas = sample.flow_sigmas(args.steps, wan.scheduler.config.flow_shift)
shape = sample.latent_shape(args.frames, args.height, args.width)
dtype = next(raw.parameters()).dtype if not args.fsdp else (torch.bfloat16 if device.type == "cuda" else torch.float32)
uncond = sample.encode(wan, [args.negative_prompt], args.text_len).to(dtype)  # (1, L, D), the same every step


@contextlib.contextmanager
def reference_weights():
    """The pre-trained model for the KL term: the LoRA switched off (or the frozen copy when fully fine-tuning)."""
    if args.full_finetune:
        yield ref_model
    else:
        raw.disable_adapters()
        try:
            yield raw
        finally:
            raw.enable_adapters()


@contextlib.contextmanager
def ema_weights():
    """Swap the EMA weights in (eval, export), and the trained ones back after."""
    backup = {n: prm.detach().clone() for n, prm in trainable.items()}
    with torch.no_grad():
        for n, prm in trainable.items():
            prm.copy_(ema[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, prm in trainable.items():
                prm.copy_(backup[n])


# -----------------------------------------------------------------------------
# Phases, prompts and randomness: pure functions of the step, so a resumed run draws exactly what it would have

def phase(step):
    """Main steps, then a dynamic phase of `dynamic_steps` after every `dynamic_every` main steps."""
    cycle = args.dynamic_every + args.dynamic_steps
    return "dynamic" if args.dynamic_every and step % cycle >= args.dynamic_every else "main"


def prompts_for(step):
    """This rank's prompts at `step`: walk a fresh permutation of the phase's file per pass (seeded by the pass),
    every rank using the same permutation and taking its own slice."""
    is_dyn = phase(step) == "dynamic"
    pool = dynamic_prompts if is_dyn else train_prompts
    k = sum(phase(s) == phase(step) for s in range(step))  # earlier steps of this phase
    out = []
    for j in range(args.prompts_per_rank):
        idx = (k * world + rank) * args.prompts_per_rank + j
        rounds, pos = divmod(idx, len(pool))
        perm = torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed * 1000 + rounds * 2 + is_dyn))
        out.append(pool[int(perm[pos])])
    return out


def rollout_generator(step, j):
    """The one generator of prompt j's rollout at `step` on this rank (noise, window start, SDE noise)."""
    return torch.Generator(device).manual_seed(hash((args.seed, step, rank, j)) % 2**62)


# -----------------------------------------------------------------------------
# Checkpoints: written to <dir>.tmp and renamed when complete, so a crash mid-write never harms the last one

def save_checkpoint(step):
    final = os.path.join(args.out_dir, f"ckpt_{step:06d}")
    tmp = final + ".tmp"
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    weights = {n: prm.detach() for n, prm in trainable.items()}
    optim_state = get_optimizer_state_dict(raw, optimizer)
    if args.fsdp:  # every rank writes its shards
        import torch.distributed.checkpoint as dcp
        dcp.save({"model": weights, "ema": ema, "optim": optim_state}, checkpoint_id=os.path.join(tmp, "dcp"))
    elif master:
        save_file({n: w.contiguous() for n, w in weights.items()}, os.path.join(tmp, "trainable.safetensors"))
        save_file(ema, os.path.join(tmp, "ema.safetensors"))
        torch.save(optim_state, os.path.join(tmp, "optimizer.pt"))
    torch.save({"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda"
                else []}, os.path.join(tmp, f"rng_rank{rank}.pt"))
    if not args.full_finetune:  # the EMA LoRA in the diffusers/peft format (sample.py --lora, load_lora_weights)
        export_lora(os.path.join(tmp, "lora"))
    if master:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(dict(step=step, ema_updates=ema_updates, world=world, config=vars(args)), f, indent=1)
    barrier()
    if master:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(args.out_dir, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final))
        os.replace(os.path.join(args.out_dir, "latest.tmp"), os.path.join(args.out_dir, "latest"))
        done = sorted(d for d in os.listdir(args.out_dir) if d.startswith("ckpt_") and not d.endswith(".tmp"))
        for old in done[:-args.keep_last]:
            shutil.rmtree(os.path.join(args.out_dir, old))
    barrier()


def export_lora(folder):
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict

    full = {n: (t.full_tensor() if hasattr(t, "full_tensor") else t).cpu() for n, t in ema.items()}  # all ranks
    if master:
        WanPipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(raw, state_dict=full),
                                      transformer_lora_adapter_metadata=raw.peft_config["default"].to_dict())


def load_checkpoint():
    global ema_updates
    with open(os.path.join(args.out_dir, "latest")) as f:
        folder = os.path.join(args.out_dir, f.read().strip())
    with open(os.path.join(folder, "state.json")) as f:
        state = json.load(f)
    if args.fsdp:
        import torch.distributed.checkpoint as dcp
        blob = {"model": {n: prm.detach() for n, prm in trainable.items()}, "ema": ema,
                "optim": get_optimizer_state_dict(raw, optimizer)}
        dcp.load(blob, checkpoint_id=os.path.join(folder, "dcp"))  # in place, into the shards
        optim_state = blob["optim"]
    else:
        weights, saved_ema = load_file(os.path.join(folder, "trainable.safetensors")), load_file(
            os.path.join(folder, "ema.safetensors"))
        with torch.no_grad():
            for n, prm in trainable.items():
                prm.copy_(weights[n])
                ema[n].copy_(saved_ema[n])
        optim_state = torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True, map_location=device)
    set_optimizer_state_dict(raw, optimizer, optim_state)
    rng_file = os.path.join(folder, f"rng_rank{rank}.pt")
    if os.path.exists(rng_file):  # absent when resuming on more ranks; all our draws derive from seed and step
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
    ema_updates = state["ema_updates"]
    metrics = os.path.join(args.out_dir, "metrics.jsonl")
    if master and os.path.exists(metrics):  # drop lines of steps after the checkpoint: they will be redone
        with open(metrics) as f:
            keep = [line for line in f if json.loads(line)["step"] <= state["step"]]
        with open(metrics + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(metrics + ".tmp", metrics)
    print0(f"resumed from {folder} (step {state['step']})")
    return state["step"] + 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_mean(values):
    """Mean over ranks of a dict of floats (every rank holds the same keys)."""
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= world
    return dict(zip(values, t.tolist()))


# -----------------------------------------------------------------------------
# Logging: metrics.jsonl always; wandb on rank 0 when asked (a no-op object otherwise, so the loop never branches)

class NoWandb:
    def log(self, *a, **k):
        pass

    def finish(self):
        pass


if args.wandb and master:
    import wandb
    run = wandb.init(project=args.wandb_project, config=vars(args))
else:
    run = NoWandb()


def log(record):
    run.log(record, step=record["step"])
    if master:
        with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


def score(videos, prompts, paths, dynamic, latents):
    """Rewards for a batch of videos: {name: (B,) tensor}, key "total" the one we optimise."""
    if args.reward == "toy":
        return {"total": reward.toy_reward(latents)}
    out = reward.score(rewards_models, videos, prompts, paths, dynamic, w_3d=args.w_3d, w_gen=args.w_gen,
                       gen_frames=args.gen_frames, gen_scale=args.gen_scale, meta_angle=args.meta_angle,
                       traj_rot_scale=args.traj_rot_scale)
    out.pop("reasons")  # reward.score has printed each one
    return out


@torch.no_grad()
def evaluate(step):
    """EMA weights, ODE rollouts (no SDE window) on the first `eval_prompts` test prompts, videos saved.
    Returns the mean reward over those prompts (all ranks)."""
    folder = os.path.join(args.out_dir, "eval", f"step_{step:06d}")
    os.makedirs(folder, exist_ok=True)
    total, count = 0.0, 0
    with ema_weights():
        for i in range(rank, args.eval_prompts, world):
            prompt = test_prompts[i % len(test_prompts)]
            g = torch.Generator(device).manual_seed(args.seed + i)  # same noise at every eval: curves compare
            noise, inject, motions = sample.camera_noise(prompt, shape, g, args.warp_mode, args.warp_strength,
                                                         device=device)
            cond = sample.encode(wan, [prompt], args.text_len).to(dtype)
            lat, _ = sample.denoise(raw, noise, cond, uncond, sigmas, args.guidance, inject=inject)
            video = sample.decode(wan.vae, lat)
            path = noise_warp.camera_path(motions, args.frames) if motions else None
            total += score(video, [prompt], [path], dynamic=False, latents=lat)["total"].sum().item()
            count += 1
            sample.save_video(os.path.join(folder, f"{i:04d}.mp4"), video[0])
    sums = all_mean({"total": total, "count": count})
    return sums["total"] / sums["count"]


# -----------------------------------------------------------------------------
# The loop

start = load_checkpoint() if args.resume else 0
bad_steps = 0
for step in range(start, args.max_steps):
    t0 = time.time()
    ph = phase(step)

    # 1. Rollouts: one group per prompt, all on this rank
    batch = []  # one dict per group
    model.eval()
    for j, prompt in enumerate(tqdm(prompts_for(step), desc=f"step {step} rollouts", disable=not master, leave=False)):
        g = rollout_generator(step, j)
        noise, inject, motions = sample.camera_noise(prompt, shape, g, args.warp_mode, args.warp_strength,
                                                     device=device)
        cond = sample.encode(wan, [prompt], args.text_len).to(dtype)
        window_start = int(torch.randint(0, args.steps // 2 - args.sde_window + 1, (1,), generator=g, device=device))
        latents, transitions = sample.rollout(raw, cond, uncond, noise, sigmas, args.guidance,
                                              group_size=args.group_size, window_start=window_start,
                                              window_size=args.sde_window, noise_level=args.noise_level,
                                              generator=g, inject=inject)
        batch.append(dict(prompt=prompt, cond=cond, transitions=transitions, latents=latents,
                          videos=sample.decode(wan.vae, latents),
                          path=noise_warp.camera_path(motions, args.frames) if motions else None))
    t1 = time.time()

    # 2. Rewards -> advantages, per group (groups are rank-local)
    scores = [score(b["videos"], [b["prompt"]] * args.group_size, [b["path"]] * args.group_size, ph == "dynamic",
                    b["latents"])
              for b in batch]
    rewards = torch.cat([s["total"] for s in scores]).to(device)
    group_ids = torch.arange(len(batch), device=device).repeat_interleave(args.group_size)
    adv = grpo.group_advantages(rewards, group_ids, args.adv_clip)
    if args.zero_advantages:
        adv = torch.zeros_like(adv)
    t2 = time.time()

    # 3. Updates: the window transitions, shuffled, split into `updates_per_epoch` optimizer steps. The first
    # update is exactly on-policy (ratio 1); later ones see weights the earlier ones moved, where the clip acts.
    items = [(gi, k, ti) for gi in range(len(batch)) for ti in range(args.sde_window) for k in range(args.group_size)]
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(hash((args.seed, step, rank)) % 2**62)).tolist()
    chunks = [order[u::args.updates_per_epoch] for u in range(args.updates_per_epoch)]
    model.train()
    stats = []
    for u, chunk in enumerate(chunks):
        micro = [chunk[m:m + args.micro_batch] for m in range(0, len(chunk), args.micro_batch)]
        for m, ids in enumerate(micro):
            last = m == len(micro) - 1
            if args.fsdp:
                model.set_requires_gradient_sync(last)
            elif world > 1:
                model.require_backward_grad_sync = last  # all-reduce gradients only on the update's last micro-batch
            sel = [items[i] for i in ids]
            tr = [batch[gi]["transitions"][ti] for gi, _, ti in sel]
            x = torch.stack([t["x"][k] for (_, k, _), t in zip(sel, tr)])
            x_next = torch.stack([t["x_next"][k] for (_, k, _), t in zip(sel, tr)])
            old_logp = torch.stack([t["log_prob"][k] for (_, k, _), t in zip(sel, tr)])
            sig = torch.tensor([float(sigmas[t["step"]]) for t in tr], device=device)
            sig_next = torch.tensor([float(sigmas[t["step"] + 1]) for t in tr], device=device)
            cond = torch.cat([batch[gi]["cond"] for gi, _, _ in sel])
            a = adv[torch.tensor([gi * args.group_size + k for gi, k, _ in sel], device=device)]
            logp, mean, std = sample.step_log_prob(model, x, x_next, sig, sig_next, cond, uncond.expand_as(cond),
                                                   args.guidance, args.noise_level, float(sigmas[1]))
            loss, clip_frac, approx_kl = grpo.policy_loss(logp, old_logp, a, args.clip_range)
            kl = torch.zeros((), device=device)
            if args.beta > 0:
                with torch.no_grad(), reference_weights() as ref:
                    _, ref_mean, _ = sample.step_log_prob(ref, x, x_next, sig, sig_next, cond, uncond.expand_as(cond),
                                                          args.guidance, args.noise_level, float(sigmas[1]))
                kl = grpo.kl_loss(mean, ref_mean, std)
            ((loss + args.beta * kl) / len(micro)).backward()
            stats.append(dict(loss=loss.item(), clip_frac=clip_frac.item(), approx_kl=approx_kl.item(),
                              kl=kl.item(), update=u))
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable.values(), args.max_grad_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if math.isfinite(grad_norm):  # the norm is taken after the all-reduce: every rank decides alike
            optimizer.step()
            bad_steps = 0
            ema_updates += 1
            decay = min(args.ema_decay, (1 + ema_updates) / (10 + ema_updates))  # short memory while EMA warms up
            with torch.no_grad():
                for n, prm in trainable.items():
                    ema[n].lerp_(prm.detach(), 1 - decay)
        else:
            bad_steps += 1
            print0(f"step {step} update {u}: non-finite gradient norm, update skipped ({bad_steps} in a row)")
            if bad_steps >= args.max_bad_steps:
                raise SystemExit(f"stopping: {bad_steps} non-finite updates in a row; the last checkpoint in "
                                 f"{args.out_dir} is intact (lower --lr or check the rewards)")
        optimizer.zero_grad(set_to_none=True)
    t3 = time.time()

    # 4. Log (means over ranks), eval, checkpoint
    record = {k: sum(s[k] for s in stats) / len(stats) for k in ("loss", "approx_kl", "kl")}
    for u in range(args.updates_per_epoch):  # the on-policy check: update 0's clip fraction must be 0
        record[f"clip_frac_{u}"] = sum(s["clip_frac"] for s in stats if s["update"] == u) / max(1, sum(
            s["update"] == u for s in stats))
    for key in scores[0]:
        record["reward" if key == "total" else key] = torch.cat([s[key] for s in scores]).float().mean().item()
    record.update(adv_abs=adv.abs().mean().item(), adv_max=adv.max().item(), grad_norm=grad_norm)
    if not args.fsdp and world > 1:  # DDP keeps full copies: their checksums must agree on every rank
        checksum = torch.stack([sum(prm.detach().double().sum() for prm in trainable.values()),
                                sum(prm.detach().double().square().sum() for prm in trainable.values())])
        sums = [torch.zeros_like(checksum) for _ in range(world)]
        dist.all_gather(sums, checksum)
        record["param_sync_err"] = max(float((s - sums[0]).abs().max()) for s in sums)
    record = all_mean(record)
    prompts = [b["prompt"] for b in batch]
    if dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, prompts)
        prompts = [q for rank_prompts in gathered for q in rank_prompts]
    record.update(step=step, phase=ph, t_rollout=t1 - t0, t_reward=t2 - t1, t_train=t3 - t2, prompts=prompts)
    print0(f"step {step:5d} {ph:7s} reward {record['reward']:.4f} "
           + " ".join(f"{k} {record[k]:.3f}" for k in ("S_meta", "S_recon", "S_traj", "R_gen") if k in record)
           + f" | adv {record['adv_abs']:.2f} clip {record['clip_frac_0']:.2f}/{record[f'clip_frac_{args.updates_per_epoch - 1}']:.2f}"
           f" approx_kl {record['approx_kl']:.2e} kl {record['kl']:.2e} loss {record['loss']:.4f}"
           f" gnorm {grad_norm:.3f} | rollout {t1 - t0:.1f}s reward {t2 - t1:.1f}s train {t3 - t2:.1f}s")
    if args.eval_every and (step + 1) % args.eval_every == 0:
        record["eval_reward"] = evaluate(step)
        print0(f"step {step:5d} eval reward {record['eval_reward']:.4f}")
    log(record)
    if (step + 1) % args.save_every == 0 or step == args.max_steps - 1:
        save_checkpoint(step)

run.finish()
common.cleanup_dist()
