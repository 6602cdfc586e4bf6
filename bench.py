"""
Speed of every stage of one World-R1 RL step, and the figures BENCHMARKS.md records.

    python bench.py                                   # tiny models on the CPU, every stage, ~1-2 min
    python bench.py --stages warp_full                # the full 81x480x832 camera-noise warp (CPU: < 60 s)
    python bench.py --size=small --random_weights     # GPU: Wan2.1-1.3B and real-size reward models, random weights
    python bench.py --size=small --random_weights --release_config   # the release's schedule, same code

Each stage is timed as the median of `--repeats` runs after one warm-up (CUDA events on GPU, perf_counter on
CPU). FLOPs are counted from shapes: a transformer forward is 2·params·tokens + 4·layers·tokens²·dim (the
attention score and value matmuls), against the measured matmul peak of the device.
"""
import common  # first: the CPU torchvision fix

import argparse
import json
import platform
import statistics
import sys
import time

import torch

import grpo
import noise_warp
import sample

# Wan2.1 transformer configs (the checkpoints' transformer/config.json)
WAN_CONFIGS = {
    "small": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30, text_dim=4096,
                  freq_dim=256, in_channels=16, out_channels=16, patch_size=(1, 2, 2), cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=1024),
    "large": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40, text_dim=4096,
                  freq_dim=256, in_channels=16, out_channels=16, patch_size=(1, 2, 2), cross_attn_norm=True,
                  qk_norm="rms_norm_across_heads", rope_max_seq_len=1024),
}
# The reward models' and UMT5's real shapes (the main fields of the hub checkpoints' config.json), so a GPU can time
# real-size stages with random weights and no download. tests/test_bench.py checks the parameter counts.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")
QWEN3_VL_4B = dict(
    text_config=dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936, bos_token_id=151643,
                     eos_token_id=151645,
                     rope_parameters={"rope_type": "default", "rope_theta": 5e6, "mrope_section": [24, 20, 20],
                                      "mrope_interleaved": True}),
    vision_config=dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, patch_size=16,
                       spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=2560,
                       num_position_embeddings=2304, deepstack_visual_indexes=[5, 11, 17]),
    tie_word_embeddings=True)
QWEN2_VL_7B = dict(  # HPSv3's backbone
    text_config=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, bos_token_id=151643, eos_token_id=151645,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                       spatial_merge_size=2, temporal_patch_size=2))
# Their processors: Qwen/Qwen3-VL-4B-Instruct's preprocessor_config.json (images: 256x256 to 4096x4096 pixels)
# and video_preprocessor_config.json; Qwen/Qwen2-VL-7B-Instruct's preprocessor_config.json (min_pixels 3136,
# max_pixels 12845056, CLIP's mean and std; HPSv3 then asks for min = max = 256*28*28 per image).
QWEN3_VL_IMAGES = dict(size={"shortest_edge": 65536, "longest_edge": 16777216}, patch_size=16, merge_size=2,
                       temporal_patch_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
QWEN3_VL_VIDEOS = {**QWEN3_VL_IMAGES, "size": {"shortest_edge": 4096, "longest_edge": 25165824}}
QWEN2_VL_IMAGES = dict(size={"shortest_edge": 3136, "longest_edge": 12845056}, patch_size=14, merge_size=2,
                       temporal_patch_size=2, image_mean=[0.48145466, 0.4578275, 0.40821073],
                       image_std=[0.26862954, 0.26130258, 0.27577711])
# The release's rollout schedule (microsoft/World-R1 config/world_r1.py, scripts/train_world_r1.py):
# 50 full UniPC steps per sample, groups of 2, the first 24 steps trained for every sample, one optimizer step per epoch.
RELEASE = dict(steps=50, group_size=2, trained_steps=24, updates_per_epoch=1)


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


def random_hf(build):
    """build() -> a transformers model, built in place (under common.build_in) with each weight drawn once; the
    default init draws UMT5-XXL's 256384 x 4096 table five times (two nn.Embedding constructors, then once per
    module that holds it), 50 s on a CPU. Weights of 2+ dims ~ N(0, 0.02^2) (transformers' initializer_range), other
    weights (norm scales) 1, biases 0; buffers (RoPE frequencies) as the constructor computes them."""
    from transformers.initialization import no_init_weights
    with no_init_weights():
        model = build()
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    for name, p in model.named_parameters():  # tied tensors come once
        if p.ndim >= 2:
            p.data.normal_(0, 0.02)
        else:
            p.data.fill_(0.0 if name.endswith("bias") else 1.0)
    return model


def random_wan(size, device, dtype=torch.bfloat16, depth=None):
    """Real Wan2.1 shapes with random weights (no download), in the dtypes load_wan gives a checkpoint: the
    transformer from its config in `dtype` with diffusers' fp32 modules (RoPE, time embedding, norms, scale-shift
    tables) in fp32, a UMT5-XXL encoder in `dtype`, the Wan2.1 VAE in fp32 (diffusers' AutoencoderKLWan defaults
    are Wan2.1's vae/config.json), each built in place. depth: transformer blocks and UMT5 layers cut to that many
    (every width as released). The tiny tokenizer stands in for UMT5's (token ids do not change the cost)."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    wan = sample.build_tiny()
    layers = {} if depth is None else dict(num_layers=depth)
    with common.build_in(device, dtype):
        wan.transformer = WanTransformer3DModel(**{**WAN_CONFIGS[size], **layers}).eval().requires_grad_(False)
        wan.text_encoder = random_hf(lambda: UMT5EncoderModel(UMT5Config(**{**UMT5_XXL, **layers})))
        wan.text_encoder.eval().requires_grad_(False)
    with common.build_in(device, torch.float32):
        wan.vae = AutoencoderKLWan().eval().requires_grad_(False)
    keep = wan.transformer._keep_in_fp32_modules
    for name, p in wan.transformer.named_parameters():
        if any(k in name.split(".") for k in keep):
            p.data = p.data.float()
    return wan


def real_processors():
    """Qwen3-VL-4B's and Qwen2-VL-7B's processors with their released settings around stand-in tokenizers (no
    download) that give Qwen's special tokens and digits their real ids; HPSv3's has its <|Reward|> token."""
    import reward
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor, Qwen3VLProcessor
    from transformers import Qwen3VLVideoProcessor
    qwen = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**QWEN3_VL_IMAGES),
                            video_processor=Qwen3VLVideoProcessor(**QWEN3_VL_VIDEOS),
                            tokenizer=reward._tiny_tokenizer(real_ids=True), chat_template=reward.TINY_CHAT_TEMPLATE)
    hps = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**QWEN2_VL_IMAGES),
                           video_processor=Qwen2VLVideoProcessor(**QWEN2_VL_IMAGES),
                           tokenizer=reward._tiny_tokenizer(extra=("<|Reward|>",), real_ids=True),
                           chat_template=reward.TINY_CHAT_TEMPLATE)
    return qwen, hps


def random_reward_models(device, dtype=torch.bfloat16, depth=None, process_res=504):
    """The real-size critics with random weights: DA3-giant (its registry preset, with its Gaussian head) in fp32,
    Qwen3-VL-4B and HPSv3 on Qwen2-VL-7B in `dtype` (the reward head in fp32), LPIPS AlexNet; the released
    processors (`real_processors`). depth: every decoder and vision stack cut to that many blocks, widths and
    vocabularies as released, except where the index lists need more: DA3's backbone keeps four out layers
    (reward._cut_dinov2: at least 4 blocks) and Qwen3-VL's vision tower its three DeepStack taps (at least 3,
    the last three blocks)."""
    import lpips
    import reward
    from transformers import Qwen2VLConfig, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    qwen_proc, hps_proc = real_processors()
    q3, q2 = QWEN3_VL_4B, QWEN2_VL_7B
    if depth is not None:
        taps = len(q3["vision_config"]["deepstack_visual_indexes"])
        v3 = max(depth, taps)
        q3 = dict(q3, text_config={**q3["text_config"], "num_hidden_layers": depth}, vision_config={
            **q3["vision_config"], "depth": v3, "deepstack_visual_indexes": list(range(v3 - taps, v3))})
        q2 = dict(q2, text_config={**q2["text_config"], "num_hidden_layers": depth},
                  vision_config={**q2["vision_config"], "depth": depth})
    if torch.device(device).type == "meta":  # shapes only (tests): DA3's constructor calls .item()
        from accelerate import init_empty_weights
        with init_empty_weights():
            da3, gs_cfg = reward.load_da3(None, device="cpu", depth=depth)
    else:
        da3, gs_cfg = reward.load_da3(None, device=device, depth=depth)
    with common.build_in(device, dtype):
        qwen = random_hf(lambda: Qwen3VLForConditionalGeneration(
            Qwen3VLConfig(**q3, **reward._vision_token_ids(qwen_proc.tokenizer))))
        hps = random_hf(lambda: reward.HPSv3Reward(
            Qwen2VLConfig(**q2, **reward._vision_token_ids(hps_proc.tokenizer)),
            hps_proc.tokenizer.convert_tokens_to_ids("<|Reward|>")))
    hps.rm_head.float()  # as load_hpsv3: the head stays fp32
    return reward.RewardModels(
        da3=da3, gs_cfg=gs_cfg, qwen=qwen.eval().requires_grad_(False), qwen_proc=qwen_proc,
        hps=hps.eval().requires_grad_(False), hps_proc=hps_proc,
        lpips=lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval().to(device),
        device=torch.device(device), process_res=process_res, hps_pixels=256 * 28 * 28)


def forward_passes(steps, group, window, release=False):
    """Transformer forward passes (CFG pair counted as 2, as the release runs them) to roll out one group and
    recompute its trained log-probs, with the reference pass for the KL. Ours: the prefix is shared by the group."""
    if release:
        rollout = group * RELEASE["steps"] * 2
        train = group * RELEASE["trained_steps"] * 2 * 2  # policy + reference, each with CFG
        return rollout, train
    start = steps // 4  # the window's expected start in the first half
    rollout = 2 * start + group * 2 * (steps - start)
    train = group * window * 2 * 2
    return rollout, train


def main(argv):
    stage_names = ("encode", "step", "loop", "decode", "warp", "warp_full", "rollout", "passes", "train", "reward")
    ap = argparse.ArgumentParser(description="Benchmark every stage of one RL step.")
    ap.add_argument("--size", choices=["tiny", "small", "large"], default="tiny", help="model and video size")
    ap.add_argument("--random_weights", action="store_true", help="real architectures, random weights (GPU)")
    ap.add_argument("--release_config", action="store_true", help="also time the release's rollout schedule")
    ap.add_argument("--stages", default="all", help="comma list: " + ",".join(stage_names))
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per stage (median)")
    ap.add_argument("--group_size", type=int, default=8, help="videos per group")
    ap.add_argument("--steps", type=int, default=None, help="rollout steps (default 20, tiny 10)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--dtype", choices=list(sample.DTYPES), default=None,
                    help="network weights (default: bf16 on CUDA, fp32 on CPU)")
    args = common.parse_flags(ap, argv)
    if args.random_weights and args.size == "tiny":
        common.fail("--random_weights builds the real sizes; use it with --size=small or --size=large")
    common.check_numbers(args, positive=("repeats", "group_size", "steps"))
    stages = set(args.stages.split(",")) if args.stages != "all" else set(stage_names) - {"warp_full"}
    common.check_choices(sorted(stages), stage_names, "--stages", "all or a comma list of")
    if "rollout" in stages and args.steps is not None and args.steps < 2:
        common.fail(f"--steps={args.steps}: the rollout's SDE window needs at least 2 steps")
    if args.json is not None:
        common.check_writable_file(args.json, "--json", [".json"])

    rows = []
    steps = args.steps or (10 if args.size == "tiny" else 20)
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
        if stages == {"passes"}:
            return
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    preset = sample.SIZES[args.size]
    frames, height, width = preset["frames"], preset["height"], preset["width"]
    shape = sample.latent_shape(frames, height, width)
    dtype = sample.resolve_dtype(args.dtype, device)
    wan = random_wan(args.size, device, dtype) if args.random_weights else sample.load_wan(preset["model"], device,
                                                                                          dtype)
    wan.text_encoder.to(device)
    wan.vae.to(device)
    tr = wan.transformer
    peak = matmul_peak(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    tokens = tokens_of(shape, tr)

    def row(stage, seconds, flops=None, note="", nbytes=None):
        r = dict(stage=stage, seconds=seconds, note=note)
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
        util = f"  {r['tflops']:.2f} TFLOP/s ({100 * r['util']:.0f}% of peak)" if flops else ""
        print(f"{stage:28s} {seconds:9.4f} s{util}  {note}", flush=True)

    prompt = "Camera orbit left, then push in. A stone lighthouse on a cliff above a dark sea, gulls below."
    cond = sample.encode(wan, [prompt], preset["text_len"])
    uncond = sample.encode(wan, [""], preset["text_len"])
    x = torch.randn(1, *shape, device=device)
    sigmas = sample.flow_sigmas(steps, 3.0)
    print(f"device {device} ({torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor()}, "
          f"{torch.get_num_threads()} threads), matmul peak {peak / 1e12:.2f} TFLOP/s, size {args.size}, "
          f"video {frames}x{height}x{width}, latent {shape}, {tokens} tokens")

    if "encode" in stages:
        row("prompt encoding", timeit(lambda: sample.encode(wan, [prompt], preset["text_len"]), args.repeats))
    if "step" in stages:
        with torch.no_grad():
            row("transformer step (CFG)", timeit(lambda: sample.velocity(tr, x, 0.5, cond, uncond, 5.0), args.repeats),
                transformer_flops(tr, tokens, 2), nbytes=transformer_bytes(tr, tokens, 2))
    if "loop" in stages:
        row(f"sampling loop ({steps} Euler)", timeit(lambda: sample.denoise(tr, x, cond, uncond, sigmas, 5.0),
                                                     args.repeats), steps * transformer_flops(tr, tokens, 2))
    if "decode" in stages:
        lat = torch.randn(1, *shape, device=device)
        row("VAE decode", timeit(lambda: sample.decode(wan.vae, lat), args.repeats))
    if "warp" in stages:
        g = torch.Generator(device).manual_seed(0)
        row("camera noise warp", timeit(lambda: noise_warp.warped_noise(prompt, shape, g, device=device), args.repeats),
            note=f"warp grid {shape[2] * 16}x{shape[3] * 16}")
    if "warp_full" in stages:
        g = torch.Generator(device).manual_seed(0)
        full = sample.latent_shape(81, 480, 832)
        row("camera noise warp 81x480x832", timeit(lambda: noise_warp.warped_noise(prompt, full, g, device=device),
                                                   1, 0), note="warp grid 960x1664, 16 channels, 80 steps")
    if "rollout" in stages:
        G = args.group_size

        def group():
            return sample.rollout(tr, cond, uncond, x, sigmas, 5.0, group_size=G, window_start=steps // 4,
                                  window_size=2, generator=torch.Generator(device).manual_seed(0))
        passes, _ = forward_passes(steps, G, 2)
        row(f"rollout group of {G} ({steps} steps)", timeit(group, args.repeats),
            passes / 2 * transformer_flops(tr, tokens, 2))
        if args.release_config:
            xs = x.expand(RELEASE["group_size"], -1, -1, -1, -1)
            rs = sample.flow_sigmas(RELEASE["steps"], 3.0)
            row(f"release group of {RELEASE['group_size']} (50 UniPC)",
                timeit(lambda: sample.denoise(tr, xs, cond.expand(2, -1, -1), uncond.expand(2, -1, -1), rs, 5.0,
                                              scheduler=wan.scheduler), args.repeats),
                RELEASE["steps"] * transformer_flops(tr, tokens, 2 * RELEASE["group_size"]))
    if "train" in stages:
        from peft import LoraConfig
        if not getattr(tr, "peft_config", None):
            tr.add_adapter(LoraConfig(r=32 if args.size != "tiny" else 8, lora_alpha=64 if args.size != "tiny" else 16,
                                      init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        xb, xn = x.expand(1, -1, -1, -1, -1), x.expand(1, -1, -1, -1, -1) * 0.99

        def micro_step():
            logp, mean, std = sample.step_log_prob(tr, xb, xn, 0.8, 0.75, cond, uncond, 5.0, noise_level=0.7,
                                                   sigma_max=float(sigmas[1]))
            loss, _, _ = grpo.policy_loss(logp, logp.detach(), torch.ones(1, device=device), 1e-3)
            loss.backward()
        row("train micro-step (fwd+bwd, CFG)", timeit(micro_step, args.repeats),
            3 * transformer_flops(tr, tokens, 2), note="LoRA; backward counted as 2x forward")
    if "reward" in stages:
        import reward
        models = random_reward_models(device) if args.random_weights else reward.load_reward_models(args.size, device)
        video = torch.rand(args.group_size if args.size == "tiny" else 1, frames, 3, height, width, device=device)
        path = noise_warp.camera_path(noise_warp.parse_camera(prompt), frames)
        row(f"reward.score ({video.shape[0]} videos)",
            timeit(lambda: reward.score(models, video, [prompt] * len(video), [path] * len(video)), args.repeats))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=str(device), size=args.size, rows=rows), f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1:])
