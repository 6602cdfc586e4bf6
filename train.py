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
import tracking

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
                  **TRAIN[size], "eval_steps": models.SIZES[size]["steps"],
                  "log_media_every": TRAIN[size]["eval_every"]}
           for size in TRAIN}

p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=common.HelpFormatter,
                            allow_abbrev=False)
p.add_argument("--size", choices=list(PRESETS), default="tiny",
               help="preset: tiny (random, CPU), toy (the trained toy world, CPU), small (1.3B), large (14B)")
# model and video
p.add_argument("--model", default=None, help="hub id or local diffusers folder; unset at tiny: random weights built "
                                            "in code")
p.add_argument("--frames", type=int, default=None, help="video frames, 4k+1")
p.add_argument("--height", type=int, default=None, help="video height, multiple of 16")
p.add_argument("--width", type=int, default=None, help="video width, multiple of 16")
p.add_argument("--text_len", type=int, default=None, help="UMT5 tokens per prompt")
p.add_argument("--dtype", choices=list(models.DTYPES), default=None,
               help="network weights (unset: bf16 on CUDA, fp32 on CPU); SDE math, log-probs, optimizer stay fp32")
p.add_argument("--random_weights", action="store_true",
               help="the size's real architectures with random weights, nothing downloaded (smoke runs, benchmarks)")
p.add_argument("--depth", type=int, default=None,
               help="with --random_weights: blocks per network (CPU smoke runs); unset: all of them")
# rollouts
p.add_argument("--steps", type=int, default=None, help="denoising steps per rollout (Euler ODE + SDE window)")
p.add_argument("--sde_window", type=int, default=2, help="SDE (trained) steps per rollout, in the first half")
p.add_argument("--noise_level", type=float, default=0.7,
               help="Flow-GRPO SDE noise level a of --sde_noise=sd3 (wan does not use it)")
p.add_argument("--sde_noise", choices=grpo.SDE_NOISE, default="sd3",
               help="SDE noise schedule: sd3 (Flow-GRPO paper: a·sqrt(σ/(1−σ))) or wan (Flow-GRPO's Wan trainer: σ)")
p.add_argument("--group_size", type=int, default=None, help="videos per prompt (G)")
p.add_argument("--prompts_per_rank", type=int, default=None, help="groups each rank rolls out per step")
p.add_argument("--guidance", type=float, default=sample.GUIDANCE, help="classifier-free guidance in rollouts and updates")
p.add_argument("--negative_prompt", default="", help="negative prompt (the release uses the empty string)")
p.add_argument("--warp_mode", choices=["init", "stepwise", "none"], default="init", help="camera noise injection")
p.add_argument("--warp_strength", type=float, default=None,
               help="camera noise strength; unset: " + sample.WARP_STRENGTH)
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
common.add_dist_flags(p)  # --dist_timeout, --deterministic
p.add_argument("--max_bad_steps", type=int, default=5,
               help="stop after this many steps in a row with a non-finite update or reward, or no scorable video")
# rewards
p.add_argument("--reward", choices=["world", "toy"], default="world",
               help="world: R_3D + R_gen; toy: mean of the final latents' channel 0 (reward.toy_reward, fast tests)")
p.add_argument("--renderer", choices=["auto", "gsplat", "torch"], default="auto",
               help="Gaussian rasterizer: auto = gsplat on CUDA (built and checked at start-up), torch elsewhere")
p.add_argument("--lift_res", type=int, default=None, help="Depth Anything 3 input size, longest side")
for name, (default, what) in reward.SETTINGS.items():
    p.add_argument(f"--{name}", type=type(default), default=default, help=what)
p.add_argument("--zero_advantages", action="store_true", help="control run: advantages forced to 0")
# schedule
p.add_argument("--max_steps", type=int, default=None, help="RL steps (one rollout batch each)")
p.add_argument("--dynamic_every", type=int, default=100, help="main steps between dynamic phases (0: never)")
p.add_argument("--dynamic_steps", type=int, default=50, help="steps of each dynamic phase (R_gen only)")
p.add_argument("--eval_every", type=int, default=None, help="eval on test prompts every N steps (0: never)")
p.add_argument("--eval_prompts", type=int, default=2, help="test prompts per eval")
p.add_argument("--eval_steps", type=int, default=None, help="UniPC steps of the eval, the inference sampler")
p.add_argument("--save_every", type=int, default=None, help="checkpoint every N steps (and at the end)")
p.add_argument("--keep_last", type=int, default=3, help="checkpoints kept")
# data, output
p.add_argument("--train_prompts", default="prompts/train.txt", help="3D-aware training prompts")
p.add_argument("--dynamic_prompts", default="prompts/dynamic.txt", help="dynamic-phase prompts")
p.add_argument("--test_prompts", default="prompts/test.txt", help="eval prompts")
p.add_argument("--out_dir", default="out", help="checkpoints, metrics.jsonl, eval videos, media, tracker files")
p.add_argument("--resume", action="store_true",
               help="continue from out_dir's latest sound checkpoint, with its saved config as the defaults; flags "
                    "given here override it (one that changes what is optimised only with --allow_config_change)")
p.add_argument("--allow_config_change", action="store_true",
               help="let --resume change what is optimised (reward terms and scales, warp, noise, guidance, schedules)")
p.add_argument("--config", default=None,
               help="JSON of flag values to start from, e.g. a run's ckpt_N/state.json; flags given here override it")
p.add_argument("--overwrite", action="store_true",
               help="start fresh in an out_dir that holds a run; the old run moves to out_dir/replaced_<time>/")
p.add_argument("--save_on_signal", action=argparse.BooleanOptionalAction, default=True,
               help="on SIGTERM or SIGINT, checkpoint the last finished step before stopping (if it has none)")
p.add_argument("--seed", type=int, default=0, help="all randomness derives from it and the step")
# tracking (rank 0): metrics.jsonl always; media under out_dir/media/step_N/ and the tracker's files under out_dir
p.add_argument("--report_to", choices=["none", "wandb", "tensorboard"], default="none",
               help="tracker for scalars, eval videos and media (pip install wandb or tensorboard, see README)")
p.add_argument("--tracker_project", default="world-r1-nano", help="wandb project")
p.add_argument("--log_media_every", type=int, default=None,
               help="every N steps: rollout videos with their rewards, the novel view S_meta graded, the estimated vs "
                    "requested camera path (0: never)")


# How this process was started, not what the run is: never saved as the run's config, never taken from it.
META = ("config", "resume", "overwrite", "allow_config_change")


def read_json(path, flag):
    """A JSON file given by `flag`, or one line saying why it cannot be read."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        common.fail(f"{flag}={path} cannot be read ({e.strerror or e}); pass a JSON file of flag values")
    except ValueError as e:
        common.fail(f"{flag}={path} is not valid JSON ({e})")


def saved_config(out_dir):
    """(folder, config) of the checkpoint --resume will continue: `latest`, else the newest with a readable
    state.json; (None, {}) if there is none (checkpoint.claim then says so, and checks the one it picks)."""
    folders = [checkpoint.read_latest(out_dir)] + [path for _, path in reversed(checkpoint.our_checkpoints(out_dir))]
    for folder in filter(None, folders):
        try:
            return folder, dict(checkpoint.read_state(folder)["config"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None, {}


def parse_config(argv):
    """Flags -> config, validated: every mistake stops here with one line, before any model loads. Defaults, lowest
    first: the --size preset; --config's file, or with --resume the checkpoint's saved config; then the flags given.
    A resumed run that would change what is optimised (OBJECTIVE_ON_RESUME) stops unless --allow_config_change."""
    args = common.parse_flags(p, argv, PRESETS)
    if args.config and args.resume:
        common.fail("--config starts a run from a file, --resume continues one from its checkpoint's config: pick one")
    if args.config:
        values = read_json(args.config, "--config")
        if isinstance(values, dict) and isinstance(values.get("config"), dict) and "step" in values:  # a state.json
            values = {k: v for k, v in values["config"].items() if k in vars(args)}  # a removed flag: ignored
            values.pop("out_dir", None)  # a new run, not one into the old run's folder
        words = common.config_argv(p, values, f"--config={args.config}", ignore=META)
        args = common.parse_flags(p, words + argv, PRESETS)
    elif args.resume:
        folder, saved = saved_config(args.out_dir)
        # a removed flag is ignored; the run folder is where it is now
        saved = {k: v for k, v in saved.items() if k in vars(args) and k not in META and k != "out_dir"}
        args = common.parse_flags(p, common.config_argv(p, saved, f"{folder}/state.json") + argv, PRESETS)
        changed = [k for k in OBJECTIVE_ON_RESUME if k in saved and saved[k] != getattr(args, k)]
        if changed and not args.allow_config_change:
            common.fail("--resume: " + ", ".join(f"--{k}={getattr(args, k)} (checkpoint: {saved[k]})" for k in changed)
                        + " would change what is optimised; drop them to continue the run as it was, or pass "
                          "--allow_config_change to change it on purpose")
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
        (args.reward == "toy" or args.frames >= reward.MIN_FRAMES, f"--frames={args.frames}: the world reward "
                                                                   f"needs at least {reward.MIN_FRAMES} frames"),
        (not args.fsdp or "RANK" in os.environ, "--fsdp shards the model over torchrun's processes: start train.py "
                                                "with torchrun (--size=large turns --fsdp on; --no-fsdp turns it off)"),
    ]
    for ok, message in checks:
        if not ok:
            common.fail(message)
    sample.check_text_len(args.text_len)
    common.check_text(args.negative_prompt, "--negative_prompt")
    if args.report_to != "none" and importlib.util.find_spec(args.report_to) is None:
        common.fail(f"--report_to={args.report_to} needs the {args.report_to} package: {tracking.INSTALL}")
    args.warp_strength = sample.warp_strength(args.size, args.warp_mode, args.warp_strength)
    return args


# Settings a resumed run must share with its checkpoint (the weights, the rollouts or the rewards would not fit);
# settings that change what is optimised (refused on resume unless --allow_config_change); settings applied to the
# restored optimizer. Any other change (steps, cadences, logging) just takes effect.
FIXED_ON_RESUME = ("size", "model", "random_weights", "depth", "frames", "height", "width", "text_len", "lora_rank",
                   "lora_alpha", "full_finetune", "fsdp", "reward", "group_size")
OBJECTIVE_ON_RESUME = (*reward.SETTINGS, "lift_res", "warp_mode", "warp_strength", "noise_level", "sde_noise",
                       "sde_window", "steps", "guidance", "negative_prompt", "clip_range", "adv_clip", "beta",
                       "updates_per_epoch", "max_grad_norm", "ema_decay", "ema_every", "prompts_per_rank",
                       "dynamic_every", "dynamic_steps", "train_prompts", "dynamic_prompts", "zero_advantages")
OPTIMIZER_ON_RESUME = ("lr", "weight_decay")


args = parse_config(sys.argv[1:])
rank, local_rank, world, device = common.setup_dist(args.dist_timeout, args.deterministic)
master = rank == 0


def print0(line):
    """Print on rank 0, above the progress bar once there is one (print would tear it)."""
    if master:
        tqdm.write(line)
        sys.stdout.flush()


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
config = {k: v for k, v in vars(args).items() if k not in META}  # saved with every checkpoint
lock, resume_from, saved = checkpoint.claim(args.out_dir, config, resume=args.resume, overwrite=args.overwrite,
                                            fixed=FIXED_ON_RESUME + (() if args.allow_config_change else
                                                                     OBJECTIVE_ON_RESUME))
common.catch_signals(lambda: checkpoint.last_words(args.out_dir))  # SIGTERM, SIGINT: save and stop at a safe point
print0(json.dumps(config, indent=1))
print0(f"{world} ranks x {args.prompts_per_rank} prompts x {args.group_size} videos = "
       f"{groups_per_step * args.group_size} videos per step; {transitions_per_rank} window transitions per rank "
       f"-> {args.updates_per_epoch} updates of {micro_per_update} micro-batches of <= {args.micro_batch}")

# The tracker (rank 0; a no-op elsewhere), started before any model loads so that a login problem costs nothing; a
# resumed run continues the tracker run its checkpoint names.
tracker, error = tracking.Tracker(), ""
if master:
    try:
        tracker = tracking.start(args.report_to, args.out_dir, config, project=args.tracker_project,
                                 saved=(saved or {}).get("tracker"), first_step=saved["step"] + 1 if saved else 0)
    except SystemExit as e:
        error = str(e.code)
common.stop_together(error)
provenance = checkpoint.provenance()  # state.json: the code's git commit and the library versions

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
    # the exported adapter names its base model (peft's adapter metadata; None would leave a LoRA nobody can place)
    policy.peft_config["default"].base_model_name_or_path = (args.model if args.model and not args.random_weights
                                                             else f"random {args.size} Wan2.1 (models.py)")
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
# lora/sampling.json of every checkpoint: how the LoRA was trained to sample, for sample.py and evaluate.py --lora
sampling = {k: getattr(args, k) for k in sample.SAMPLING} | {"steps": args.eval_steps}

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
# Logging: means over ranks, metrics.jsonl always; the tracker on rank 0 when asked (a no-op object otherwise, so the
# loop never branches)

def all_mean(values):
    """Mean over ranks of a dict of floats (every rank holds the same keys); NaN where any rank has NaN."""
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
        t /= world
    return dict(zip(values, t.tolist()))


def log(record):
    """One strict-JSON line per step: a non-finite number becomes null and its key is listed under "nonfinite"."""
    bad = sorted(k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v))
    record = {k: (None if k in bad else v) for k, v in record.items()} | ({"nonfinite": bad} if bad else {})
    tracker.log(record, record["step"])
    error = ""
    if master:
        try:  # a line and its newline, or nothing (a full disk): never half a line
            common.append_line(os.path.join(args.out_dir, "metrics.jsonl"), json.dumps(record, allow_nan=False))
        except OSError as e:
            error = (f"cannot append step {record['step']} to metrics.jsonl ({common.why(e)}); "
                     + checkpoint.last_words(args.out_dir))
    common.stop_together(error)


def score_videos(videos, prompts, paths, dynamic, latents, seen=None):
    """Rewards of one group -> (totals (G,) with NaN where bad, bad (G,) bool, components {name: (G,)}, reasons).
    seen: a list that receives what the 3D terms looked at, per video (reward.score; the media of this step)."""
    if args.reward == "toy":
        t = reward.toy_reward(latents)
        bad = ~torch.isfinite(t)
        for i in bad.nonzero()[:, 0].tolist():
            print(f"[reward] video {i} ({prompts[i][:60]!r}): toy reward not finite", flush=True)
        return t, bad, {}, ["toy reward not finite" if b else "" for b in bad]
    scores, reasons = reward.score(critics, videos, prompts, paths, dynamic, seen=seen,
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
    total, count, error = 0.0, 0, ""
    with ema_weights(), policy_precision():
        for i in range(rank, world * math.ceil(len(test_prompts) / world), world):
            prompt = test_prompts[min(i, len(test_prompts) - 1)]
            gen = torch.Generator(device).manual_seed(args.seed + i)  # same noise at every eval: curves compare
            noise, inject, motions = sample.camera_noise(prompt, shape, gen, args.warp_mode, args.warp_strength,
                                                         device=device)
            lat, _ = sample.denoise(policy, noise, embed([prompt]), uncond, eval_sigmas, args.guidance,
                                    scheduler=wan.scheduler, inject=inject, progress=master, delay=sample.BAR_DELAY)
            if i >= len(test_prompts):
                continue
            video = sample.decode(wan.vae, lat)
            path = noise_warp.requested_path(motions, args.frames)
            t, bad, _, _ = score_videos(video, [prompt], [path], False, lat)
            if not bad.any():
                total, count = total + t.sum().item(), count + 1
            try:
                sample.save_video(os.path.join(folder, f"{i:04d}.mp4"), video[0])
            except OSError as e:
                error = error or f"cannot write the eval video {folder}/{i:04d}.mp4 ({common.why(e)})"
    common.stop_together(error and f"{error}; {checkpoint.last_words(args.out_dir)}")
    sums = all_mean({"total": total, "count": count})  # every rank has written its videos once this returns
    tracker.media(step, [("eval/video", os.path.join(folder, f"{i:04d}.mp4"), f"#{i} {prompt}")
                         for i, prompt in enumerate(test_prompts)])
    return sums["total"] / sums["count"] if sums["count"] else math.nan


def save(step):
    """Checkpoint the state after `step` (checkpoint.save: atomic, validated, rotated)."""
    checkpoint.save(args.out_dir, step, dict(ema_updates=ema_updates, world=world, config=config, tracker=tracker.ref,
                                             **provenance), policy, trainable, ema, optimizer, fsdp=args.fsdp,
                    lora=None if args.full_finetune else sampling, keep_last=args.keep_last, device=device)


def stop_if_signalled(done):
    """Collective, at a safe point where the weights are as step `done` left them: after SIGTERM or SIGINT on any
    rank, checkpoint step `done` if it has no checkpoint yet (unless --no-save_on_signal), say in one line where the
    run stands, and stop with a non-zero exit."""
    name = common.signal_received()
    if not name:
        return
    if args.save_on_signal and done >= start and (done + 1) % args.save_every:  # a due step was saved already
        save(done)
    common.stop(f"{name}: stopped " + (f"after step {done}" if done >= 0 else "before the first step") + "; "
                + checkpoint.last_words(args.out_dir))


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
bar = tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, unit="step", disable=not master,
           dynamic_ncols=True)  # the stage in its description, the last step's reward and time in its postfix
for step in bar:
    stop_if_signalled(step - 1)
    t0 = time.time()
    ph = phase(step)
    show = args.log_media_every and (step + 1) % args.log_media_every == 0  # rollout media of this step (rank 0)

    # 1. Rollouts: one group per prompt, all on this rank
    batch = []  # one dict per group
    model.eval()
    with policy_precision():
        for j, prompt in enumerate(prompts := prompts_for(step)):
            bar.set_description(f"step {step} rollout {j + 1}/{len(prompts)}")
            gen = rollout_generator(step, j)
            noise, inject, motions = sample.camera_noise(prompt, shape, gen, args.warp_mode, args.warp_strength,
                                                         device=device)
            cond = embed([prompt])
            window_start = int(torch.randint(0, args.steps // 2 - args.sde_window + 1, (1,), generator=gen,
                                             device=device))
            latents, window = sample.rollout(policy, cond, uncond, noise, sigmas, args.guidance,
                                             group_size=args.group_size, window_start=window_start,
                                             window_size=args.sde_window, noise_level=args.noise_level,
                                             sde_noise=args.sde_noise, generator=gen, inject=inject,
                                             progress=master, delay=sample.BAR_DELAY)
            batch.append(dict(prompt=prompt, cond=cond, window=window, latents=latents,
                              videos=sample.decode(wan.vae, latents),
                              path=noise_warp.requested_path(motions, args.frames)))
    t1 = time.time()
    stop_if_signalled(step - 1)  # abandon this step before it changes anything: the weights are still step - 1's

    # 2. Rewards -> advantages, per group (groups are rank-local). A video that cannot be scored gets a score below
    # every real video of its group; a systemic failure (out of memory, CUDA, a critic failing on every video)
    # stops all ranks together, with the last checkpoint intact.
    bar.set_description(f"step {step} reward")
    error, totals, bads, parts, reasons, seen = "", [], [], [], [], []
    try:
        for k, b in enumerate(batch):
            t, bad, part, why = score_videos(b["videos"], [b["prompt"]] * args.group_size,
                                             [b["path"]] * args.group_size, ph == "dynamic", b["latents"],
                                             seen if master and show and k == 0 else None)
            totals.append(t), bads.append(bad), parts.append(part), reasons.extend(why)
    except Exception as e:  # is_systemic: every later video would fail the same way
        error = f"the reward failed at step {step} ({type(e).__name__}: {str(e)[:300]})"
    counts = Counter(r.split(":")[0] for why in reasons for r in why.split("; ") if r)
    failing = [k for k, n in counts.items() if k.endswith(" failed") and n == len(reasons) > 1]
    if failing and not error:
        error = f"{', '.join(failing)} on every video of step {step} (e.g. {reasons[0][:300]})"
    common.stop_together(error and error + f"; stopping. The last checkpoint in {args.out_dir} is intact")
    rewards, bad = torch.cat(totals).to(device), torch.cat(bads).to(device)
    unusable = bool(bad.all()) or any("not finite" in r for r in reasons)  # counts toward --max_bad_steps
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
    bar.set_description(f"step {step} update")
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
            bad_steps = bad_steps if unusable else 0
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
    if unusable:  # a NaN/inf reward (named by reward.score, scored as a bad video) or no video to learn from
        bad_steps += 1
    common.stop_together(f"{bad_steps} steps in a row with non-finite gradients or rewards or no scorable video; "
                         f"stopping. The last checkpoint in {args.out_dir} is intact (lower --lr or check the rewards)"
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
    error = ""
    if master and show:  # what the reward rewarded: rank 0's first group, under out_dir/media/step_N/
        b, folder = batch[0], os.path.join(args.out_dir, "media", f"step_{step:06d}")
        try:
            tracker.media(step, tracking.rollout_media(folder, b["videos"], b["prompt"], totals[0], parts[0],
                                                       reasons[:args.group_size], seen, b["path"],
                                                       noise_warp.PLANE_DEPTH, sample.save_video))
        except OSError as e:  # a full disk
            error = f"cannot write the media of step {step} in {folder} ({common.why(e)}); " \
                    + checkpoint.last_words(args.out_dir)
    common.stop_together(error)
    if args.eval_every and (step + 1) % args.eval_every == 0:
        bar.set_description(f"step {step} eval")
        record["eval_reward"] = run_eval(step)
        print0(f"step {step:5d} eval reward {record['eval_reward']:.4f}")
    log(record)
    if (step + 1) % args.save_every == 0 or step == args.max_steps - 1:
        bar.set_description(f"step {step} save")
        save(step)
    bar.set_postfix_str(f"reward {record['reward']:.4f}, last step {time.time() - t0:.1f} s")

bar.close()
tracker.finish()
common.cleanup_dist()
