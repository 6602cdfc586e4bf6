"""
World-R1: reinforcement learning that makes Wan2.1 produce 3D-consistent video (Flow-GRPO-Fast + 3D rewards).
Imports common, models, sample, reward, grpo, noise_warp and checkpoint; nothing imports it.

    python train.py --size=tiny                                          # CPU demo: random tiny models, ~20 s
    torchrun --standalone --nproc_per_node=8 train.py --size=small       # Wan2.1-T2V-1.3B, LoRA, DDP, H200s
    torchrun --nnodes=12 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=$HEAD:29500 \\
        train.py --size=large                                            # Wan2.1-T2V-14B, LoRA, FSDP2
    python train.py --size=tiny --resume                                 # continue from out_dir's latest checkpoint
    python train.py --size=small --random_weights --depth=1 --frames=17 --height=128 --width=224 --dtype=bf16 \\
        --lift_res=224                                                   # the real shapes, one block each, on a CPU

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
import importlib.util
import json
import math
import os
import sys
import time
from collections import Counter

import torch
import torch.distributed as dist
from tqdm import tqdm

import checkpoint
import grpo
import models
import noise_warp
import reward
import sample

# -----------------------------------------------------------------------------
# Config: a --size preset sets the defaults (models.SIZES: networks, video, rollout steps; TRAIN: the training
# hyperparameters), any --key=value overrides it

TRAIN = {
    "toy": dict(group_size=8, prompts_per_rank=2, micro_batch=16, lr=3e-3, lora_rank=16, lora_alpha=32, fsdp=False,
                eval_every=20, save_every=20, max_steps=60, grad_checkpointing=False, dynamic_every=0,
                train_prompts="prompts/toy_train.txt", test_prompts="prompts/toy_test.txt"),
    "tiny": dict(group_size=4, prompts_per_rank=2, micro_batch=8, lr=1e-2, lora_rank=8, lora_alpha=16, fsdp=False,
                 eval_every=3, save_every=1, max_steps=3, grad_checkpointing=False),
    "small": dict(group_size=8, prompts_per_rank=1, micro_batch=1, lr=1e-4, lora_rank=32, lora_alpha=64, fsdp=False,
                  eval_every=30, save_every=60, max_steps=3000, grad_checkpointing=True),
    "large": dict(group_size=8, prompts_per_rank=1, micro_batch=1, lr=1e-4, lora_rank=32, lora_alpha=64, fsdp=True,
                  eval_every=30, save_every=60, max_steps=3000, grad_checkpointing=True),
}
PRESETS = {size: {**models.SIZES[size], "steps": models.SIZES[size]["rollout_steps"], **reward.defaults(size),
                  **TRAIN[size]} for size in TRAIN}

p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                            allow_abbrev=False)
p.add_argument("--size", choices=list(PRESETS), default="tiny",
               help="preset: tiny (random, CPU), toy (the trained toy world, CPU), small (1.3B), large (14B)")
# model and video
p.add_argument("--model", default=None, help="hub id or local diffusers folder (default: the size's)")
p.add_argument("--frames", type=int, default=None, help="video frames, 4k+1")
p.add_argument("--height", type=int, default=None, help="video height, multiple of 16")
p.add_argument("--width", type=int, default=None, help="video width, multiple of 16")
p.add_argument("--text_len", type=int, default=None, help="UMT5 tokens per prompt")
p.add_argument("--dtype", choices=list(models.DTYPES), default=None,
               help="network weights (default: bf16 on CUDA, fp32 on CPU); SDE math, log-probs, optimizer stay fp32")
p.add_argument("--random_weights", action="store_true",
               help="the size's real architectures with random weights, nothing downloaded (smoke runs, benchmarks)")
p.add_argument("--depth", type=int, default=None, help="with --random_weights: blocks per network (CPU smoke runs)")
# rollouts
p.add_argument("--steps", type=int, default=None, help="denoising steps per rollout (Euler ODE + SDE window)")
p.add_argument("--sde_window", type=int, default=2, help="SDE (trained) steps per rollout, in the first half")
p.add_argument("--noise_level", type=float, default=0.7, help="Flow-GRPO SDE noise a: σ_t = a·sqrt(σ/(1−σ))")
p.add_argument("--sde_noise", choices=grpo.SDE_NOISE, default="sd3",
               help="SDE noise schedule: sd3 (Flow-GRPO paper: a·sqrt(σ/(1−σ))) or wan (Flow-GRPO's Wan trainer: σ)")
p.add_argument("--group_size", type=int, default=None, help="videos per prompt (G)")
p.add_argument("--prompts_per_rank", type=int, default=None, help="groups each rank rolls out per step")
p.add_argument("--guidance", type=float, default=sample.GUIDANCE, help="classifier-free guidance in rollouts and updates")
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
p.add_argument("--ema_every", type=int, default=1, help="optimizer steps between EMA updates (the release: 8)")
p.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None, help="FSDP2 instead of DDP")
p.add_argument("--grad_checkpointing", action=argparse.BooleanOptionalAction, default=None,
               help="recompute each block's activations in backward (81x480x832 activations outgrow an H200)")
p.add_argument("--max_bad_steps", type=int, default=5, help="stop after this many non-finite updates in a row")
# rewards
p.add_argument("--reward", choices=["world", "toy"], default="world", help="world: R_3D + R_gen; toy: mean colour")
p.add_argument("--renderer", choices=["auto", "gsplat", "torch"], default="auto",
               help="Gaussian rasterizer: auto = gsplat on CUDA (built and checked at start-up), torch elsewhere")
p.add_argument("--lift_res", type=int, default=None,
               help="Depth Anything 3 input size, longest side (default: the size's)")
for name, (default, what) in reward.SETTINGS.items():
    p.add_argument(f"--{name}", type=type(default), default=default, help=what)
p.add_argument("--zero_advantages", action="store_true", help="control run: advantages forced to 0")
# schedule
p.add_argument("--max_steps", type=int, default=None, help="RL steps (one rollout batch each)")
p.add_argument("--dynamic_every", type=int, default=100, help="main steps between dynamic phases (0: never)")
p.add_argument("--dynamic_steps", type=int, default=50, help="steps of each dynamic phase (R_gen only)")
p.add_argument("--eval_every", type=int, default=None, help="eval on test prompts every N steps (0: never)")
p.add_argument("--eval_prompts", type=int, default=2, help="test prompts per eval")
p.add_argument("--eval_steps", type=int, default=None,
               help="UniPC steps of the eval, the inference sampler (default: the size's, 50 real)")
p.add_argument("--save_every", type=int, default=None, help="checkpoint every N steps (and at the end)")
p.add_argument("--keep_last", type=int, default=3, help="checkpoints kept")
# data, output
p.add_argument("--train_prompts", default="prompts/train.txt", help="3D-aware training prompts")
p.add_argument("--dynamic_prompts", default="prompts/dynamic.txt", help="dynamic-phase prompts")
p.add_argument("--test_prompts", default="prompts/test.txt", help="eval prompts")
p.add_argument("--out_dir", default="out", help="checkpoints, metrics.jsonl, eval videos")
p.add_argument("--resume", action="store_true", help="continue from out_dir's latest sound checkpoint")
p.add_argument("--overwrite", action="store_true",
               help="start fresh in an out_dir that holds a run; the old run moves to out_dir/replaced_<time>/")
p.add_argument("--seed", type=int, default=0, help="all randomness derives from it and the step")
p.add_argument("--wandb", action="store_true", help="log to Weights & Biases (rank 0)")
p.add_argument("--wandb_project", default="world-r1-nano", help="wandb project")


def parse_config(argv):
    """Apply the --size preset, parse, validate: every mistake stops here with one line, before any model loads."""
    args = common.parse_flags(p, argv, PRESETS)
    sample.check_video_size(args.frames, args.height, args.width)
    common.check_numbers(args, positive=("steps", "group_size", "prompts_per_rank", "sde_window", "updates_per_epoch",
                                         "micro_batch", "lr", "max_steps", "save_every", "keep_last", "ema_every",
                                         "text_len", "max_bad_steps", "eval_prompts", "eval_steps", "depth",
                                         "lift_res", "clip_range", "adv_clip", "max_grad_norm", "lora_rank",
                                         "lora_alpha"),
                         nonnegative=("noise_level", "weight_decay", "beta", "guidance", "ema_decay", "w_3d", "w_gen",
                                      "gen_frames", "gen_scale", "dynamic_every", "dynamic_steps", "eval_every"),
                         finite=("meta_angle", "traj_rot_scale", "warp_strength"))
    checks = [
        (args.group_size >= 2, f"--group_size={args.group_size}: a group needs at least 2 videos to compare"),
        (args.sde_window <= args.steps // 2, f"--sde_window={args.sde_window} must fit in the first half of "
                                             f"--steps={args.steps}"),
        (args.ema_decay < 1, f"--ema_decay={args.ema_decay} must be below 1"),
        (args.depth is None or args.random_weights, "--depth cuts the real architectures: use it with --random_weights"),
        (not (args.random_weights and args.size == "tiny"), "--random_weights builds the real sizes; use --size=small "
                                                            "or --size=large (tiny is random already)"),
        (not (args.resume and args.overwrite), "--resume continues the run in --out_dir, --overwrite replaces it: "
                                               "pick one"),
    ]
    for ok, message in checks:
        if not ok:
            common.fail(message)
    common.check_text(args.negative_prompt, "--negative_prompt")
    if args.wandb and importlib.util.find_spec("wandb") is None:
        common.fail("--wandb needs the wandb package: pip install wandb (then wandb login)")
    args.warp_strength = sample.warp_strength(args.size, args.warp_mode, args.warp_strength)
    args.eval_steps = args.eval_steps or models.SIZES[args.size]["steps"]
    return args


# Settings a resumed run must share with its checkpoint (the weights, the rollouts or the rewards would not fit), and
# settings it may change (applied to the restored optimizer where they live there).
FIXED_ON_RESUME = ("size", "model", "random_weights", "depth", "frames", "height", "width", "text_len", "lora_rank",
                   "lora_alpha", "full_finetune", "fsdp", "reward", "group_size", "w_3d", "w_meta", "w_gen")
OPTIMIZER_ON_RESUME = ("lr", "weight_decay")


args = parse_config(sys.argv[1:])
rank, local_rank, world, device = common.setup_dist()
master = rank == 0
print0 = common.print0
dtype = models.resolve_dtype(args.dtype, device)

# Prompt files and batch arithmetic, checked before any model loads
train_prompts = common.read_lines(args.train_prompts, "--train_prompts")
dynamic_prompts = common.read_lines(args.dynamic_prompts, "--dynamic_prompts") if args.dynamic_every else []
test_prompts = common.read_lines(args.test_prompts, "--test_prompts")[:args.eval_prompts] if args.eval_every else []
groups_per_step = world * args.prompts_per_rank
for name, prompts in (("--train_prompts", train_prompts), ("--dynamic_prompts", dynamic_prompts)):
    if prompts and len(prompts) < groups_per_step:
        common.fail(f"{name} has {len(prompts)} prompts, fewer than {world} ranks x {args.prompts_per_rank} prompts "
                    "per rank; lower --prompts_per_rank or add prompts")
transitions_per_rank = args.prompts_per_rank * args.group_size * args.sde_window
micro_per_update = math.ceil(transitions_per_rank / args.updates_per_epoch / args.micro_batch)
if transitions_per_rank < args.updates_per_epoch:
    common.fail(f"{transitions_per_rank} transitions per rank cannot feed {args.updates_per_epoch} updates; raise "
                "--group_size/--prompts_per_rank or lower --updates_per_epoch")
for line in sample.camera_warnings(train_prompts, args.warp_mode):
    sample.warn(line)

# The run folder: one run owns it (the lock, held until this process exits), a fresh run never mixes into an old one,
# every rank sees the same folder, and a resumed run checks its checkpoint and config before any model loads.
lock, resume_from, saved = checkpoint.claim(args.out_dir, vars(args), resume=args.resume, overwrite=args.overwrite,
                                            fixed=FIXED_ON_RESUME)
print0(json.dumps(vars(args), indent=1))
print0(f"{world} ranks x {args.prompts_per_rank} prompts x {args.group_size} videos = "
       f"{groups_per_step * args.group_size} videos per step; {transitions_per_rank} window transitions per rank "
       f"-> {args.updates_per_epoch} updates of {micro_per_update} micro-batches of <= {args.micro_batch}")

# -----------------------------------------------------------------------------
# Models: Wan (frozen) + LoRA (trained), the reward models, optimizer, EMA

torch.manual_seed(args.seed)
if args.random_weights:
    wan = models.random_wan(args.size, device, dtype, depth=args.depth)
else:
    wan = models.load_wan(args.model, device, dtype)
policy = wan.transformer  # the unwrapped module; `model` below may wrap it in DDP
if args.full_finetune:
    ref_model = copy.deepcopy(policy).requires_grad_(False)  # the KL reference: the pre-trained weights, as loaded
    policy.requires_grad_(True)
else:
    from peft import LoraConfig
    policy.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, init_lora_weights="gaussian",
                                  target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
if args.grad_checkpointing:
    policy.enable_gradient_checkpointing()
trainable = {n: prm for n, prm in policy.named_parameters() if prm.requires_grad}
for prm in trainable.values():
    prm.data = prm.data.float()  # master weights, updates and optimizer state in fp32, whatever the model's dtype
# A fully fine-tuned model now holds fp32 weights: it runs under autocast in `dtype`, as the release runs its fp32
# weights under accelerate's bf16 autocast. LoRA needs none: peft runs the fp32 adapters beside the bf16 base.
policy_precision = lambda: torch.autocast(device.type, dtype, enabled=args.full_finetune and dtype != torch.float32)
if args.fsdp:
    model = common.shard_fsdp(policy, policy.blocks)
    trainable = {n: prm for n, prm in policy.named_parameters() if prm.requires_grad}  # now DTensor shards
elif world > 1:
    model = torch.nn.parallel.DistributedDataParallel(policy, device_ids=[local_rank] if device.type == "cuda" else None)
else:
    model = policy
optimizer = torch.optim.AdamW(trainable.values(), lr=args.lr, weight_decay=args.weight_decay)
ema = {n: prm.detach().clone() for n, prm in trainable.items()}
ema_updates = 0
print0(f"trainable parameters: {sum(prm.numel() for prm in trainable.values()) * (world if args.fsdp else 1):,}")

# Prompt embeddings: each prompt the run can draw is encoded once, here, and kept on the host trimmed to its tokens;
# then UMT5 leaves the device (UMT5-XXL is 11 GB of bf16 that would otherwise sit idle beside the policy).
all_prompts = train_prompts + dynamic_prompts + test_prompts
if line := sample.length_warning(wan.tokenizer, all_prompts, args.text_len):
    sample.warn(line)
embeddings = sample.encode_all(wan, sorted(set(all_prompts + [args.negative_prompt])), args.text_len)
del wan.text_encoder
if device.type == "cuda":
    torch.cuda.empty_cache()
host_mib = sum(e.numel() * e.element_size() for e in embeddings.values()) / 2**20
print0(f"encoded {len(embeddings)} prompts once ({host_mib:.0f} MiB on the host); the text encoder is released")


def embed(prompts):
    """Cached UMT5 states of `prompts`, zero-padded back to text_len: (B, text_len, D) on the device."""
    return torch.stack([sample.pad_tokens(embeddings[q], args.text_len) for q in prompts]).to(device)


uncond = embed([args.negative_prompt])  # (1, L, D), the same every step

if args.reward == "world":
    if args.random_weights:
        critics = models.random_reward_models(device, dtype, depth=args.depth, process_res=args.lift_res)
    else:
        critics = models.load_reward_models(args.size, device, dtype, process_res=args.lift_res)
    reward.check_renderer_on_every_rank(device, args.renderer, rank, local_rank)
sigmas = sample.flow_sigmas(args.steps, wan.scheduler.config.flow_shift)  # the rollouts' (Euler + SDE window)
eval_sigmas = sample.flow_sigmas(args.eval_steps, wan.scheduler.config.flow_shift)  # the eval's (UniPC)
shape = sample.latent_shape(args.frames, args.height, args.width)


@contextlib.contextmanager
def reference_weights():
    """The pre-trained model for the KL term: the LoRA switched off (or the frozen copy when fully fine-tuning)."""
    if args.full_finetune:
        yield ref_model
    else:
        policy.disable_adapters()
        try:
            yield policy
        finally:
            policy.enable_adapters()


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
# Logging: means over ranks, metrics.jsonl always; wandb on rank 0 when asked (a no-op object otherwise, so the loop
# never branches)

def all_mean(values):
    """Mean over ranks of a dict of floats (every rank holds the same keys); NaN where any rank has NaN."""
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= world
    return dict(zip(values, t.tolist()))


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
    """One strict-JSON line per step: a non-finite number becomes null and its key is listed under "nonfinite"."""
    bad = sorted(k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v))
    record = {k: (None if k in bad else v) for k, v in record.items()} | ({"nonfinite": bad} if bad else {})
    run.log(record, step=record["step"])
    if master:
        with open(os.path.join(args.out_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")


def score_videos(videos, prompts, paths, dynamic, latents):
    """Rewards of one group -> (totals (G,) with NaN where bad, bad (G,) bool, components {name: (G,)}, reasons)."""
    if args.reward == "toy":
        t = reward.toy_reward(latents)
        bad = ~torch.isfinite(t)
        for i in bad.nonzero()[:, 0].tolist():
            print(f"[reward] video {i} ({prompts[i][:60]!r}): toy reward not finite", flush=True)
        return t, bad, {}, ["toy reward not finite" if b else "" for b in bad]
    scores, reasons = reward.score(critics, videos, prompts, paths, dynamic,
                                   **{k: getattr(args, k) for k in reward.SETTINGS})
    parts = {k: scores[k] for k in ("S_meta", "S_recon", "S_traj", "R_3D", "R_gen")}
    return scores["total"], scores["bad"], parts, reasons


@torch.no_grad()
def run_eval(step):
    """EMA weights, the inference sampler (UniPC, --eval_steps) on the first `eval_prompts` test prompts, videos
    saved. Every rank runs the same number of samples (FSDP's collectives need all ranks in every forward): a rank
    with no prompt left samples one anyway and discards it. Returns the mean reward over the scorable videos."""
    folder = os.path.join(args.out_dir, "eval", f"step_{step:06d}")
    os.makedirs(folder, exist_ok=True)
    total, count = 0.0, 0
    with ema_weights(), policy_precision():
        for i in range(rank, world * math.ceil(len(test_prompts) / world), world):
            prompt = test_prompts[min(i, len(test_prompts) - 1)]
            gen = torch.Generator(device).manual_seed(args.seed + i)  # same noise at every eval: curves compare
            noise, inject, motions = sample.camera_noise(prompt, shape, gen, args.warp_mode, args.warp_strength,
                                                         device=device)
            lat, _ = sample.denoise(policy, noise, embed([prompt]), uncond, eval_sigmas, args.guidance,
                                    scheduler=wan.scheduler, inject=inject)
            if i >= len(test_prompts):
                continue
            video = sample.decode(wan.vae, lat)
            path = noise_warp.requested_path(motions, args.frames)
            t, bad, _, _ = score_videos(video, [prompt], [path], False, lat)
            if not bad.any():
                total, count = total + t.sum().item(), count + 1
            sample.save_video(os.path.join(folder, f"{i:04d}.mp4"), video[0])
    sums = all_mean({"total": total, "count": count})
    return sums["total"] / sums["count"] if sums["count"] else math.nan


# -----------------------------------------------------------------------------
# The loop

start = 0
if args.resume:
    ema_updates = checkpoint.load(resume_from, policy, trainable, ema, optimizer, fsdp=args.fsdp, device=device,
                                  optimizer_settings={k: getattr(args, k) for k in OPTIMIZER_ON_RESUME})["ema_updates"]
    if master:
        checkpoint.drop_metrics_after(args.out_dir, saved["step"])
    print0(f"resumed from {resume_from} (step {saved['step']})")
    start = saved["step"] + 1
bad_steps = 0
for step in range(start, args.max_steps):
    t0 = time.time()
    ph = phase(step)

    # 1. Rollouts: one group per prompt, all on this rank
    batch = []  # one dict per group
    model.eval()
    with policy_precision():
        for j, prompt in enumerate(tqdm(prompts_for(step), desc=f"step {step} rollouts", disable=not master,
                                        leave=False)):
            gen = rollout_generator(step, j)
            noise, inject, motions = sample.camera_noise(prompt, shape, gen, args.warp_mode, args.warp_strength,
                                                         device=device)
            cond = embed([prompt])
            window_start = int(torch.randint(0, args.steps // 2 - args.sde_window + 1, (1,), generator=gen,
                                             device=device))
            latents, window = sample.rollout(policy, cond, uncond, noise, sigmas, args.guidance,
                                             group_size=args.group_size, window_start=window_start,
                                             window_size=args.sde_window, noise_level=args.noise_level,
                                             sde_noise=args.sde_noise, generator=gen, inject=inject)
            batch.append(dict(prompt=prompt, cond=cond, window=window, latents=latents,
                              videos=sample.decode(wan.vae, latents),
                              path=noise_warp.requested_path(motions, args.frames)))
    t1 = time.time()

    # 2. Rewards -> advantages, per group (groups are rank-local). A video that cannot be scored gets a score below
    # every real video of its group; a systemic failure (out of memory, CUDA, a critic failing on every video)
    # stops all ranks together, with the last checkpoint intact.
    error, totals, bads, parts, reasons = "", [], [], [], []
    try:
        for b in batch:
            t, bad, part, why = score_videos(b["videos"], [b["prompt"]] * args.group_size,
                                             [b["path"]] * args.group_size, ph == "dynamic", b["latents"])
            totals.append(t), bads.append(bad), parts.append(part), reasons.extend(why)
    except Exception as e:  # is_systemic: every later video would fail the same way
        error = f"the reward failed at step {step} ({type(e).__name__}: {str(e)[:300]})"
    counts = Counter(r.split(":")[0] for why in reasons for r in why.split("; ") if r)
    failing = [k for k, n in counts.items() if k.endswith(" failed") and n == len(reasons) > 1]
    if failing and not error:
        error = f"{', '.join(failing)} on every video of step {step} (e.g. {reasons[0][:300]})"
    common.stop_together(error and error + f"; stopping. The last checkpoint in {args.out_dir} is intact")
    rewards, bad = torch.cat(totals).to(device), torch.cat(bads).to(device)
    group_ids = torch.arange(len(batch), device=device).repeat_interleave(args.group_size)
    filled = grpo.fill_bad(rewards, bad, group_ids)
    adv = torch.zeros_like(filled) if args.zero_advantages else grpo.group_advantages(filled, group_ids, args.adv_clip)
    t2 = time.time()

    # 3. Updates. One flat batch of this rank's window transitions, N = groups x window steps x G of them in that
    # order, each with its video's advantage; shuffled once and dealt into `updates_per_epoch` optimizer steps of
    # micro-batches. The first update is exactly on-policy (ratio 1); later ones see weights the earlier ones moved,
    # where the clip acts.
    flat = lambda key: torch.cat([b["window"][key].flatten(0, 1) for b in batch])  # noqa: E731  (W, G) -> W·G
    x, x_next, old_logp = flat("x"), flat("x_next"), flat("log_prob")  # (N, 16, T, h, w) twice, (N,)
    step_of = torch.cat([b["window"]["step"].repeat_interleave(args.group_size) for b in batch])  # (N,)
    sig, sig_next = sigmas[step_of].to(device), sigmas[step_of + 1].to(device)
    cond = torch.cat([b["cond"].expand(args.sde_window * args.group_size, -1, -1) for b in batch])  # (N, L, D)
    a = adv.view(len(batch), 1, args.group_size).expand(-1, args.sde_window, -1).flatten()  # (N,)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(hash((args.seed, step, rank)) % 2**62))
    model.train()
    stats = []
    for u in range(args.updates_per_epoch):
        chunk = order[u::args.updates_per_epoch]
        micro = chunk.split(args.micro_batch)
        for m, ids in enumerate(micro):
            if args.fsdp:
                model.set_requires_gradient_sync(m == len(micro) - 1)
            elif world > 1:  # all-reduce gradients only on the update's last micro-batch
                model.require_backward_grad_sync = m == len(micro) - 1
            ids = ids.to(device)
            kw = dict(noise_level=args.noise_level, sigma_max=float(sigmas[1]), sde_noise=args.sde_noise)
            c, uc = cond[ids], uncond.expand(len(ids), -1, -1)
            with policy_precision():
                logp, mean, std = sample.step_log_prob(model, x[ids], x_next[ids], sig[ids], sig_next[ids], c, uc,
                                                       args.guidance, **kw)
            loss, clip_frac, approx_kl = grpo.policy_loss(logp, old_logp[ids], a[ids], args.clip_range)
            kl = torch.zeros((), device=device)
            if args.beta > 0:
                with torch.no_grad(), reference_weights() as ref:
                    _, ref_mean, _ = sample.step_log_prob(ref, x[ids], x_next[ids], sig[ids], sig_next[ids], c, uc,
                                                          args.guidance, **kw)
                kl = grpo.kl_loss(mean, ref_mean, std)
            ((loss + args.beta * kl) / len(micro)).backward()
            stats.append(dict(loss=loss.item(), clip_frac=clip_frac.item(), approx_kl=approx_kl.item(),
                              kl=kl.item(), update=u))
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable.values(), args.max_grad_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if math.isfinite(grad_norm):  # the norm is taken after the all-reduce: every rank decides alike
            optimizer.step()
            bad_steps = 0
            if (step * args.updates_per_epoch + u + 1) % args.ema_every == 0:  # counts optimizer steps
                ema_updates += 1
                decay = min(args.ema_decay, (1 + ema_updates) / (10 + ema_updates))  # short memory while warming up
                with torch.no_grad():
                    for n, prm in trainable.items():
                        ema[n].lerp_(prm.detach(), 1 - decay)
        else:
            bad_steps += 1
            print0(f"step {step} update {u}: non-finite gradient norm, update skipped ({bad_steps} in a row)")
        optimizer.zero_grad(set_to_none=True)
    nonfinite = sum("not finite" in r for r in reasons)
    if nonfinite:  # a NaN/inf reward is named by reward.score; it was scored as a bad video, and counts here
        bad_steps += 1
    common.stop_together(f"{bad_steps} steps in a row with non-finite gradients or rewards; stopping. The last "
                         f"checkpoint in {args.out_dir} is intact (lower --lr or check the rewards)"
                         if bad_steps >= args.max_bad_steps else "")
    t3 = time.time()

    # 4. Log (means over ranks), eval, checkpoint
    record = {k: sum(s[k] for s in stats) / len(stats) for k in ("loss", "approx_kl", "kl")}
    for u in range(args.updates_per_epoch):  # the on-policy check: update 0's clip fraction must be 0
        record[f"clip_frac_{u}"] = sum(s["clip_frac"] for s in stats if s["update"] == u) / max(1, sum(
            s["update"] == u for s in stats))
    good = ~bad.cpu()
    record["reward"] = rewards.cpu()[good].mean().item() if good.any() else math.nan
    for key in parts[0]:
        record[key] = torch.cat([pt[key] for pt in parts])[good].float().mean().item() if good.any() else math.nan
    record.update(adv_abs=adv.abs().mean().item(), adv_max=adv.max().item(), grad_norm=grad_norm,
                  bad_videos=float(bad.sum()), lr=optimizer.param_groups[0]["lr"])
    if device.type == "cuda":  # this step's peak device memory (averaged over ranks like the rest)
        record["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    record = all_mean(record)
    gathered = [([b["prompt"] for b in batch], counts)]
    if dist.is_initialized():
        gathered = [None] * world
        dist.all_gather_object(gathered, ([b["prompt"] for b in batch], counts))
    record.update(step=step, phase=ph, t_rollout=t1 - t0, t_reward=t2 - t1, t_train=t3 - t2,
                  prompts=[q for qs, _ in gathered for q in qs], reasons=dict(sum((c for _, c in gathered), Counter())))
    print0(f"step {step:5d} {ph:7s} reward {record['reward']:.4f} "
           + " ".join(f"{k} {record[k]:.3f}" for k in ("S_meta", "S_recon", "S_traj", "R_gen") if k in record)
           + f" | adv {record['adv_abs']:.2f} clip {record['clip_frac_0']:.2f}/{record[f'clip_frac_{args.updates_per_epoch - 1}']:.2f}"
           f" approx_kl {record['approx_kl']:.2e} kl {record['kl']:.2e} loss {record['loss']:.4f}"
           f" gnorm {grad_norm:.3f} | rollout {t1 - t0:.1f}s reward {t2 - t1:.1f}s train {t3 - t2:.1f}s"
           + (f" | {int(record['bad_videos'] * world)} bad videos" if record["bad_videos"] else ""))
    if args.eval_every and (step + 1) % args.eval_every == 0:
        record["eval_reward"] = run_eval(step)
        print0(f"step {step:5d} eval reward {record['eval_reward']:.4f}")
    log(record)
    if (step + 1) % args.save_every == 0 or step == args.max_steps - 1:
        checkpoint.save(args.out_dir, step, dict(ema_updates=ema_updates, world=world, config=vars(args)), policy,
                        trainable, ema, optimizer, fsdp=args.fsdp, lora=not args.full_finetune,
                        keep_last=args.keep_last, device=device)

run.finish()
common.cleanup_dist()
