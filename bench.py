"""
Speed of every stage of one World-R1 RL step, and the figures BENCHMARKS.md records.
Imports common, models, standins, sample, reward, splat, grpo, noise_warp and toyworld. Its commands: README.md.

Each stage is timed as the median of `--repeats` runs after one warm-up (CUDA events on GPU, perf_counter on
CPU); at 832x480x81 the multi-step stages (loop, rollout, release) run minutes each and get no warm-up run.
`--rollout_group` times the rollout on a smaller group and scales it by the forward-pass count (labelled so).
The train stage uses gradient checkpointing where train.py does (small, large). FLOPs are counted from shapes: a
transformer forward is 2·params·tokens + 4·layers·tokens²·dim (the attention score and value matmuls), against the
measured matmul peak of the device. `--json` is rewritten after every stage; a stage that raises (out of memory,
say) is recorded with its error, the next stages run, and the script exits 1 at the end. `--stages` picks stages,
so a time-limited machine can run them in separate commands (tools/gpu_check.sh does).
"""
import common  # first: the CPU torchvision fix

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time

import torch

import grpo
import models
import noise_warp
import reward
import sample
import splat
import standins
import toyworld

# The release's rollout schedule (microsoft/World-R1 config/world_r1.py, scripts/train_world_r1.py):
# 50 full UniPC steps per sample, groups of 2, the first 24 steps trained for every sample, one optimizer step per epoch.
RELEASE = dict(rollout_steps=50, group_size=2, trained_steps=24, updates_per_epoch=1)


def timeit(fn, repeats=3, warmup=1):
    """Median seconds of fn() after `warmup` calls; CUDA-synchronised when a GPU is present."""
    cuda = torch.cuda.is_available()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(device, dtype, n=None):
    """Measured dense matmul throughput (FLOP/s): the denominator of every utilisation figure."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / timeit(lambda: a @ b, repeats=5, warmup=2)


def transformer_flops(transformer, tokens, batch):
    """2·params·tokens for every weight matmul + 4·layers·tokens²·dim for attention, per forward of `batch`.
    The cross-attention to the L text tokens is left out (its score term is L/tokens = 1.6% of the self-attention
    at 832x480x81 with L = 512); tests/test_bench.py checks the rest against torch's FlopCounterMode."""
    cfg = transformer.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    params = sum(p.numel() for p in transformer.blocks.parameters())
    return batch * (2 * params * tokens + 4 * cfg.num_layers * tokens**2 * dim)


def transformer_bytes(transformer, tokens, batch):
    """Memory traffic of one forward of `batch`, a lower bound: every block weight read once, plus each block's
    activations written and read once: q, k, v, attention out, the residual stream and the norms (about 12
    tensors of tokens x dim) and the FFN's hidden layer (2 x tokens x ffn_dim), in the weights' dtype."""
    cfg = transformer.config
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    size = transformer.dtype.itemsize  # the blocks' dtype (diffusers skips the fp32 modules it keeps)
    weights = sum(p.numel() for p in transformer.blocks.parameters()) * size
    return weights + batch * cfg.num_layers * tokens * (12 * dim + 2 * cfg.ffn_dim) * size


def tokens_of(shape, transformer):
    _, t, h, w = shape
    pt, ph, pw = transformer.config.patch_size
    return (t // pt) * (h // ph) * (w // pw)


def forward_passes(steps, group, window, release=False):
    """Transformer forward passes (CFG pair counted as 2, as the release runs them) to roll out one group and
    recompute its trained log-probs, with the reference pass for the KL. Ours: the prefix is shared by the group."""
    if release:
        rollout = group * RELEASE["rollout_steps"] * 2
        train = group * RELEASE["trained_steps"] * 2 * 2  # policy + reference, each with CFG
        return rollout, train
    start = steps // 4  # the window's expected start in the first half
    rollout = 2 * start + group * 2 * (steps - start)
    train = group * window * 2 * 2
    return rollout, train


# From this many latent tokens on (832x480x81 has 32,760), the multi-step stages (loop, rollout, release) take minutes
# per run: they are timed without a warm-up run (the first forward's one-time set-up is small beside minutes).
COLD_TOKENS = 8192


def main(argv):
    stage_names = ("encode", "step", "loop", "decode", "warp", "warp_full", "rollout", "passes", "train", "reward")
    ap = argparse.ArgumentParser(description="Benchmark every stage of one RL step.")
    ap.add_argument("--size", choices=list(models.SIZES), default="tiny", help="model and video size")
    ap.add_argument("--random_weights", action="store_true", help="real architectures, random weights (GPU)")
    ap.add_argument("--release_config", action="store_true", help="also time the release's rollout schedule")
    ap.add_argument("--stages", default="all", help="comma list: " + ",".join(stage_names))
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per stage (median)")
    ap.add_argument("--group_size", type=int, default=8, help="videos per group")
    ap.add_argument("--rollout_group", type=int, default=None,
                    help="time the rollout on a group of this many and scale it to --group_size by the forward-pass "
                         "count (a group of 8 at 832x480x81 takes minutes; default: --group_size)")
    ap.add_argument("--rollout_steps", type=int, default=None, help=models.SIZE_HELP["rollout_steps"])
    ap.add_argument("--grad_checkpointing", action=argparse.BooleanOptionalAction, default=None,
                    help="train stage: " + models.SIZE_HELP["grad_checkpointing"] + " (default: the size's)")
    ap.add_argument("--json", default=None, help="also write the results here (rewritten after every stage)")
    ap.add_argument("--dtype", choices=list(models.DTYPES), default=None,
                    help="network weights (default: bf16 on CUDA, fp32 on CPU)")
    # the real shapes cut down, for a dry run on a CPU (tools/gpu_check.sh)
    ap.add_argument("--depth", type=int, default=None, help="with --random_weights: blocks per network")
    ap.add_argument("--frames", type=int, default=None, help="video frames, 4k+1 (default: the size's)")
    ap.add_argument("--height", type=int, default=None, help="video height, multiple of 16 (default: the size's)")
    ap.add_argument("--width", type=int, default=None, help="video width, multiple of 16 (default: the size's)")
    ap.add_argument("--text_len", type=int, default=None, help="UMT5 tokens per prompt (default: the size's)")
    ap.add_argument("--lift_res", type=int, default=None, help="Depth Anything 3's input side (default: the size's)")
    args = common.parse_flags(ap, argv)
    if args.random_weights and args.size == "tiny":
        common.fail("--random_weights builds the real sizes; use it with --size=small or --size=large")
    if args.depth is not None and not args.random_weights:
        common.fail("--depth cuts the real architectures: use it with --random_weights")
    common.check_numbers(args, positive=("repeats", "group_size", "rollout_group", "rollout_steps", "depth", "text_len",
                                         "lift_res"))
    stages = set(args.stages.split(",")) if args.stages != "all" else set(stage_names) - {"warp_full"}
    common.check_choices(sorted(stages), stage_names, "--stages", "all or a comma list of")
    if "rollout" in stages and args.rollout_steps is not None and args.rollout_steps < 2:
        common.fail(f"--rollout_steps={args.rollout_steps}: the rollout's SDE window needs at least 2 steps")
    preset = models.SIZES[args.size]
    frames, height, width = (getattr(args, k) or preset[k] for k in ("frames", "height", "width"))
    sample.check_video_size(frames, height, width)
    if args.size == "toy" and "reward" in stages and height != width:  # toyworld renders square scenes only
        common.fail(f"--height={height} --width={width}: the toy reward stage scores toy scenes, which are "
                    "square; give equal sizes")
    text_len = args.text_len or preset["text_len"]
    if args.json is not None:
        common.check_writable_file(args.json, "--json", [".json"])

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    rows, failed = [], []
    result = dict(device=str(device), size=args.size, video=[frames, height, width], depth=args.depth, rows=rows)

    def save():
        """The JSON so far, replaced whole (a run killed at its time limit keeps every finished stage's figures)."""
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(result, f, indent=1)
            os.replace(args.json + ".tmp", args.json)

    steps = args.rollout_steps or preset["rollout_steps"]
    if "passes" in stages:  # arithmetic only: runs before (and without) any model
        ours, ours_train = forward_passes(steps, args.group_size, 2)
        rel, rel_train = forward_passes(steps, RELEASE["group_size"], RELEASE["trained_steps"], release=True)
        G, Gr = args.group_size, RELEASE["group_size"]
        print(f"forward passes per sample ({steps} steps, group {G}): ours {ours / G:.1f} rollout + "
              f"{ours_train / G:.1f} train = {(ours + ours_train) / G:.1f};  release {rel / Gr:.1f} rollout + "
              f"{rel_train / Gr:.1f} train = {(rel + rel_train) / Gr:.1f}  "
              f"({(rel + rel_train) / Gr / ((ours + ours_train) / G):.1f}x fewer)", flush=True)
        rows.append(dict(stage="forward passes per sample", ours=(ours + ours_train) / G,
                         release=(rel + rel_train) / Gr))
        save()
        if stages == {"passes"}:
            return
    shape = sample.latent_shape(frames, height, width)
    dtype = models.resolve_dtype(args.dtype, device)
    wan = standins.wan_for_run(args.size, preset["model"], device, dtype, random_weights=args.random_weights,
                               depth=args.depth)
    wan.text_encoder.to(device)
    wan.vae.to(device)
    transformer = wan.transformer
    peak = matmul_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokens = tokens_of(shape, transformer)
    warm = 0 if tokens >= COLD_TOKENS else 1  # of the multi-step stages
    device_name = (torch.cuda.get_device_name() if device.type == "cuda"
                   else platform.processor() or platform.machine())
    result.update(device_name=device_name, threads=torch.get_num_threads(), matmul_peak_tflops=peak / 1e12,
                  latent=list(shape), tokens=tokens)

    def row(stage, seconds, flops=None, note="", nbytes=None, **extra):
        r = dict(stage=stage, seconds=seconds, note=note, **extra)
        if flops:
            r.update(tflops=flops / seconds / 1e12, util=flops / seconds / peak)
        if flops and nbytes:  # FLOP per byte moved: above the device's ridge point the stage can be compute-bound
            r.update(gbytes=nbytes / 1e9, flop_per_byte=flops / nbytes)
            note = f"{flops / nbytes:.0f} FLOP/byte " + note
        if device.type == "cuda":  # this stage's own peak: the counter is reset after every row
            r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            torch.cuda.reset_peak_memory_stats()
            note += f" peak {r['peak_gib']:.1f} GiB"
        rows.append(r)
        save()
        util = f"  {r['tflops']:.2f} TFLOP/s ({100 * r['util']:.0f}% of peak)" if flops else ""
        print(f"{stage:28s} {seconds:9.4f} s{util}  {note}", flush=True)

    @contextlib.contextmanager
    def stage(name):
        """One stage; if it raises (out of memory, say), its error becomes its row and the next stage runs."""
        try:
            yield
        except Exception as e:  # the per-stage boundary: one stage's failure must not cost the others' figures
            failed.append(name)
            rows.append(dict(stage=name, error=f"{type(e).__name__}: {str(e)[:500]}"))
            save()
            print(f"{name:28s} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()

    prompt = "Camera orbit left, then push in. A stone lighthouse on a cliff above a dark sea, gulls below."
    cond = sample.encode(wan, [prompt], text_len)
    uncond = sample.encode(wan, [""], text_len)
    x = torch.randn(1, *shape, device=device)
    sigmas = sample.flow_sigmas(steps, 3.0)
    save()
    print(f"device {device} ({device_name}, {torch.get_num_threads()} threads), matmul peak {peak / 1e12:.2f} "
          f"TFLOP/s, size {args.size}, video {frames}x{height}x{width}, latent {shape}, {tokens} tokens")

    if "encode" in stages:
        with stage("encode"):
            row("prompt encoding", timeit(lambda: sample.encode(wan, [prompt], text_len), args.repeats))
    if "step" in stages:
        with stage("step"), torch.no_grad():
            row("transformer step (CFG)",
                timeit(lambda: sample.velocity(transformer, x, 0.5, cond, uncond, 5.0), args.repeats),
                transformer_flops(transformer, tokens, 2), nbytes=transformer_bytes(transformer, tokens, 2))
    if "loop" in stages:
        with stage("loop"):
            row(f"sampling loop ({steps} Euler)",
                timeit(lambda: sample.denoise(transformer, x, cond, uncond, sigmas, 5.0), args.repeats, warm),
                steps * transformer_flops(transformer, tokens, 2), note="" if warm else "no warm-up run")
    if "decode" in stages:
        with stage("decode"):
            lat = torch.randn(1, *shape, device=device)
            row("VAE decode", timeit(lambda: sample.decode(wan.vae, lat), args.repeats))
    if "warp" in stages:
        with stage("warp"):
            gen = torch.Generator(device).manual_seed(0)
            row("camera noise warp",
                timeit(lambda: noise_warp.warped_noise(prompt, shape, gen, device=device), args.repeats),
                note=f"warp grid {shape[2] * 16}x{shape[3] * 16}")
    if "warp_full" in stages:
        with stage("warp_full"):
            gen = torch.Generator(device).manual_seed(0)
            full = sample.latent_shape(81, 480, 832)
            row("camera noise warp 81x480x832", timeit(lambda: noise_warp.warped_noise(prompt, full, gen,
                                                                                        device=device), 1, 0),
                note="warp grid 960x1664, 16 channels, 80 steps")
    if "rollout" in stages:
        with stage("rollout"):
            G, g = args.group_size, args.rollout_group or args.group_size

            def group():
                return sample.rollout(transformer, cond, uncond, x, sigmas, 5.0, group_size=g,
                                      window_start=steps // 4, window_size=2,
                                      generator=torch.Generator(device).manual_seed(0))
            passes, measured = forward_passes(steps, G, 2)[0], forward_passes(steps, g, 2)[0]
            seconds = timeit(group, args.repeats, warm)
            note = "" if warm else "no warm-up run"
            if g != G:  # the prefix is shared, so the cost is the forward-pass count, not G / g
                note += f" measured on a group of {g}: {seconds:.2f} s, scaled by {passes}/{measured} forward passes"
            row(f"rollout group of {G} ({steps} steps)", seconds * passes / measured,
                passes / 2 * transformer_flops(transformer, tokens, 2), note=note.strip(), measured_group=g,
                measured_seconds=seconds)
            if args.release_config:
                xs = x.expand(RELEASE["group_size"], -1, -1, -1, -1)
                rs = sample.flow_sigmas(RELEASE["rollout_steps"], 3.0)
                row(f"release group of {RELEASE['group_size']} (50 UniPC)",
                    timeit(lambda: sample.denoise(transformer, xs, cond.expand(2, -1, -1), uncond.expand(2, -1, -1),
                                                  rs, 5.0, scheduler=wan.scheduler), args.repeats, warm),
                    RELEASE["rollout_steps"] * transformer_flops(transformer, tokens, 2 * RELEASE["group_size"]),
                    note="" if warm else "no warm-up run")
    if "train" in stages:
        with stage("train"):
            from peft import LoraConfig
            checkpointing = (preset["grad_checkpointing"] if args.grad_checkpointing is None
                             else args.grad_checkpointing)
            if not getattr(transformer, "peft_config", None):
                transformer.add_adapter(LoraConfig(r=32 if args.size != "tiny" else 8,
                                                   lora_alpha=64 if args.size != "tiny" else 16,
                                                   init_lora_weights="gaussian",
                                                   target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
            for prm in transformer.parameters():
                if prm.requires_grad:
                    prm.data = prm.data.float()  # as train.py: fp32 master LoRA weights beside the bf16 base
            if checkpointing:
                transformer.enable_gradient_checkpointing()
            xb, xn = x.expand(1, -1, -1, -1, -1), x.expand(1, -1, -1, -1, -1) * 0.99

            def micro_step():
                logp, mean, std = sample.step_log_prob(transformer, xb, xn, 0.8, 0.75, cond, uncond, 5.0,
                                                       noise_level=0.7, sigma_max=float(sigmas[1]))
                loss, _, _ = grpo.policy_loss(logp, logp.detach(), torch.ones(1, device=device), 1e-3)
                loss.backward()
            row("train micro-step (fwd+bwd, CFG)", timeit(micro_step, args.repeats),
                3 * transformer_flops(transformer, tokens, 2), grad_checkpointing=checkpointing,
                note="LoRA; backward counted as 2x forward" + ("; gradient checkpointing (its recomputed forward "
                                                                "not counted)" if checkpointing else ""))
    if "reward" in stages:
        with stage("reward"):
            lift_res = args.lift_res or preset["lift_res"]
            critics = standins.critics_for_run(args.size, device, dtype if args.random_weights else None,
                                               random_weights=args.random_weights, depth=args.depth,
                                               process_res=lift_res)
            print(splat.check_renderer(device), flush=True)  # builds gsplat outside the timing, as train.py does
            if args.size == "toy":  # a group of toy-world scenes with their captions: what train.py's reward sees
                data = toyworld.make_dataset(args.group_size, seed=0, frames=frames, size=height)
                video, prompts = toyworld.to_unit(data["video"]).to(device), data["caption"]
                what = "toy scenes"
            else:  # noise; one video past tiny, where a full-size group would take minutes
                video = torch.rand(args.group_size if args.size == "tiny" else 1, frames, 3, height, width,
                                   device=device)
                prompts, what = [prompt] * len(video), "videos"
            paths = [noise_warp.camera_path(noise_warp.parse_camera(p), frames) for p in prompts]
            row(f"reward.score ({video.shape[0]} {what})",
                timeit(lambda: reward.score(critics, video, prompts, paths, **reward.defaults(args.size)),
                       args.repeats))
    if failed:
        raise SystemExit(f"error: stage {', '.join(failed)} failed (above); the other stages' figures are "
                         + (f"in {args.json}" if args.json else "printed above"))


if __name__ == "__main__":
    main(sys.argv[1:])
