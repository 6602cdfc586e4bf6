"""
train.py's configuration: its flags (each size's defaults from models.SIZES, any --key=value overrides them),
--config and --resume (a saved run's config as the defaults), and every check that runs before a model loads.
Imports common, checkpoint, grpo, models, reward, sample and tracking (their settings and checks); train.py imports it.
"""
import argparse
import importlib.util
import json
import os

import checkpoint
import common
import grpo
import models
import reward
import sample
import tracking

DESCRIPTION = ("World-R1: reinforcement learning that makes Wan2.1 produce 3D-consistent video (Flow-GRPO-Fast + "
               "3D rewards).")
# Each size's defaults: its row values in models.SIZES; the media cadence follows the eval's.
PRESETS = {size: {**preset, "log_media_every": preset["eval_every"]} for size, preset in models.SIZES.items()}


def size_flag(parser, name, type=None, **kw):
    """A flag whose default comes from the size table, with the table's description as its help."""
    parser.add_argument(f"--{name}", type=type, default=None, help=models.SIZE_HELP[name], **kw)


p = argparse.ArgumentParser(description=DESCRIPTION, formatter_class=common.HelpFormatter, allow_abbrev=False)
p.add_argument("--size", choices=list(PRESETS), default="tiny",
               help="preset: tiny (random, CPU), toy (the trained toy world, CPU), small (1.3B), large (14B)")
# model and video
size_flag(p, "model")
for name in ("frames", "height", "width", "text_len"):
    size_flag(p, name, int)
p.add_argument("--dtype", choices=list(models.DTYPES), default=None,
               help="network weights (unset: bf16 on CUDA, fp32 on CPU); SDE math, log-probs, optimizer stay fp32")
p.add_argument("--random_weights", action="store_true",
               help="the size's real architectures with random weights, nothing downloaded (smoke runs, benchmarks)")
p.add_argument("--depth", type=int, default=None,
               help="with --random_weights: blocks per network (CPU smoke runs); unset: all of them")
# rollouts
size_flag(p, "rollout_steps", int)
p.add_argument("--sde_window", type=int, default=2, help="SDE (trained) steps per rollout, in the first half")
p.add_argument("--noise_level", type=float, default=0.7,
               help="Flow-GRPO SDE noise level a of --sde_noise=sd3 (wan does not use it)")
p.add_argument("--sde_noise", choices=grpo.SDE_NOISE, default="sd3",
               help="SDE noise schedule: sd3 (Flow-GRPO paper: a·sqrt(σ/(1−σ))) or wan (Flow-GRPO's Wan trainer: σ)")
size_flag(p, "group_size", int)
size_flag(p, "prompts_per_rank", int)
p.add_argument("--guidance", type=float, default=sample.GUIDANCE,
               help="classifier-free guidance in rollouts and updates")
p.add_argument("--negative_prompt", default="", help="negative prompt (the release uses the empty string)")
p.add_argument("--warp_mode", choices=["init", "stepwise", "none"], default="init", help="camera noise injection")
p.add_argument("--warp_strength", type=float, default=None,
               help="camera noise strength; unset: " + sample.WARP_STRENGTH)
# optimisation
size_flag(p, "lr", float)
p.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
p.add_argument("--updates_per_epoch", type=int, default=2, help="optimizer steps per batch of rollouts")
size_flag(p, "micro_batch", int)
p.add_argument("--clip_range", type=float, default=1e-3, help="PPO ratio clip ε")
p.add_argument("--adv_clip", type=float, default=5.0, help="advantage clip")
p.add_argument("--beta", type=float, default=0.004, help="KL weight to the pre-trained model")
p.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping")
size_flag(p, "lora_rank", int)
size_flag(p, "lora_alpha", float)
p.add_argument("--full_finetune", action="store_true", help="train all weights (reference = a frozen copy)")
p.add_argument("--ema_decay", type=float, default=0.9, help="EMA of the trained weights, used for eval and export")
p.add_argument("--ema_every", type=int, default=1, help="optimizer steps between EMA updates (the release: 8)")
size_flag(p, "fsdp", action=argparse.BooleanOptionalAction)
size_flag(p, "grad_checkpointing", action=argparse.BooleanOptionalAction)
common.add_dist_flags(p)  # --dist_timeout, --deterministic
p.add_argument("--max_bad_steps", type=int, default=5,
               help="stop after this many steps in a row with a non-finite update or reward, or no scorable video")
# rewards
p.add_argument("--reward", choices=["world", "latent"], default="world",
               help="world: R_3D + R_gen; latent: mean of the final latents' channel 0 (standins.latent_reward, fast "
                    "tests of the RL loop)")
p.add_argument("--renderer", choices=["auto", "gsplat", "torch"], default="auto",
               help="Gaussian rasterizer: auto = gsplat on CUDA (built and checked at start-up), torch elsewhere")
size_flag(p, "lift_res", int)
size_flag(p, "w_meta", float)
size_flag(p, "w_gen", float)
for name, (default, what) in reward.SETTINGS.items():
    p.add_argument(f"--{name}", type=type(default), default=default, help=what)
p.add_argument("--zero_advantages", action="store_true", help="control run: advantages forced to 0")
# schedule
size_flag(p, "max_steps", int)
size_flag(p, "dynamic_every", int)
p.add_argument("--dynamic_steps", type=int, default=50, help="steps of each dynamic phase (R_gen only)")
size_flag(p, "eval_every", int)
p.add_argument("--eval_prompts", type=int, default=2, help="test prompts per eval")
size_flag(p, "sample_steps", int)
size_flag(p, "save_every", int)
p.add_argument("--keep_last", type=int, default=3, help="checkpoints kept")
# data, output
size_flag(p, "train_prompts")
p.add_argument("--dynamic_prompts", default="prompts/dynamic.txt", help="dynamic-phase prompts")
size_flag(p, "test_prompts")
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


def parse(argv):
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
    common.check_numbers(args, positive=("rollout_steps", "group_size", "prompts_per_rank", "sde_window",
                                         "updates_per_epoch", "micro_batch", "lr", "max_steps", "save_every",
                                         "keep_last", "ema_every", "text_len", "max_bad_steps", "eval_prompts",
                                         "sample_steps", "depth", "lift_res", "clip_range", "adv_clip",
                                         "max_grad_norm", "lora_rank", "lora_alpha"),
                         nonnegative=("noise_level", "weight_decay", "beta", "guidance", "ema_decay", "w_3d",
                                      "w_meta", "w_recon", "w_gen", "gen_frames", "gen_scale", "dynamic_every",
                                      "dynamic_steps", "eval_every"),
                         finite=("meta_angle", "traj_rot_scale", "warp_strength"))
    checks = [
        (args.group_size >= 2, f"--group_size={args.group_size}: a group needs at least 2 videos to compare"),
        (args.sde_window <= args.rollout_steps // 2, f"--sde_window={args.sde_window} must fit in the first half of "
                                                     f"--rollout_steps={args.rollout_steps}"),
        (args.ema_decay < 1, f"--ema_decay={args.ema_decay} must be below 1"),
        (args.depth is None or args.random_weights,
         "--depth cuts the real architectures: use it with --random_weights"),
        (not (args.random_weights and args.size == "tiny"), "--random_weights builds the real sizes; use --size=small "
                                                            "or --size=large (tiny is random already)"),
        (not (args.resume and args.overwrite), "--resume continues the run in --out_dir, --overwrite replaces it: "
                                               "pick one"),
        (args.reward == "latent" or args.frames >= reward.MIN_FRAMES,
         f"--frames={args.frames}: the world reward needs at least {reward.MIN_FRAMES} frames"),
        (args.prompts_per_rank * args.group_size * args.sde_window >= args.updates_per_epoch,
         f"{args.prompts_per_rank * args.group_size * args.sde_window} transitions per rank cannot feed "
         f"{args.updates_per_epoch} updates; raise --group_size/--prompts_per_rank or lower --updates_per_epoch"),
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


def read_prompts(args, world):
    """The prompt files -> (train, dynamic, test) prompt lists, each read only where the run uses it; one line and a
    stop where one cannot feed every rank's groups."""
    train = common.read_lines(args.train_prompts, "--train_prompts")
    dynamic = common.read_lines(args.dynamic_prompts, "--dynamic_prompts") if args.dynamic_every else []
    test = common.read_lines(args.test_prompts, "--test_prompts")[:args.eval_prompts] if args.eval_every else []
    for name, prompts in (("--train_prompts", train), ("--dynamic_prompts", dynamic)):
        if prompts and len(prompts) < world * args.prompts_per_rank:
            common.fail(f"{name} has {len(prompts)} prompts, fewer than {world} ranks x {args.prompts_per_rank} "
                        "prompts per rank; lower --prompts_per_rank or add prompts")
    return train, dynamic, test


# Settings a resumed run must share with its checkpoint (the weights, the rollouts or the rewards would not fit);
# settings that change what is optimised (refused on resume unless --allow_config_change); settings applied to the
# restored optimizer. Any other change (max_steps, cadences, logging) just takes effect.
FIXED_ON_RESUME = ("size", "model", "random_weights", "depth", "frames", "height", "width", "text_len", "lora_rank",
                   "lora_alpha", "full_finetune", "fsdp", "reward", "group_size")
OBJECTIVE_ON_RESUME = (*reward.SETTINGS, *reward.WEIGHTS, "lift_res", "warp_mode", "warp_strength", "noise_level",
                       "sde_noise", "sde_window", "rollout_steps", "guidance", "negative_prompt", "clip_range",
                       "adv_clip", "beta", "updates_per_epoch", "max_grad_norm", "ema_decay", "ema_every",
                       "prompts_per_rank", "dynamic_every", "dynamic_steps", "train_prompts", "dynamic_prompts",
                       "zero_advantages")
OPTIMIZER_ON_RESUME = ("lr", "weight_decay")

