"""
The released model shapes end to end, on the CPU in bf16, with random weights and only the depth cut:
Wan2.1-T2V-1.3B (transformer, UMT5-XXL with its 256384-token table, the Wan2.1 VAE) and the critics (DA3-giant
with its Gaussian head, Qwen3-VL-4B, HPSv3 on Qwen2-VL-7B, LPIPS), every width, head count, patch size,
processor setting and vocabulary as released (standins.random_wan, standins.random_reward_models). Each model is saved
in its released on-disk layout and loaded back through the real loaders (models.load_wan,
models.load_reward_models), so configs and checkpoint keys are exercised: every loaded tensor must equal the one
saved. Then a reduced video, 17 frames x 128 x 224 (latent 16 x 5 x 16 x 28), goes through UMT5, one CFG
transformer step, the VAE, and reward.score on 2 videos, checking shapes, dtypes and what the processors make.

    python -m pytest -q tests/test_real_shapes.py

3 to 4 minutes on 2 CPU cores (the fp32 VAE decode ~1 min of it), 6.5 GB peak memory; marked slow.
"""
import gc
import hashlib
import json
import math

import pytest
import torch
from safetensors import safe_open

import models
import noise_warp
import reward
import sample
import standins

CPU = torch.device("cpu")
BF16 = torch.bfloat16
FRAMES, HEIGHT, WIDTH = 17, 128, 224
PROMPT = "Camera orbit left. A stone lighthouse on a cliff above a dark sea, gulls below."
# DA3's input size (504 in real runs): the networks' shapes do not depend on it, the CPU rasterizer's time grows
# with it. 84 gives 42 x 84 frames (3 x 6 patches); LPIPS's AlexNet needs frames over ~32 pixels high.
PROCESS_RES = 84

# Wan-AI/Wan2.1-T2V-1.3B-Diffusers vae/config.json (the 14B repo ships the same VAE)
WAN21_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0,
                 latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715,
                               0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
                 latents_std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652,
                              1.5579, 1.6382, 1.1253, 2.8251, 1.916])

pytestmark = pytest.mark.slow


def fingerprint(module):
    """name -> (shape, dtype, SHA-1 of the bytes): a saved-then-loaded tensor must match its original exactly.
    (Hashing the bytes in place: a float64 copy of UMT5's table would take 8 GB.)"""
    return {k: (tuple(v.shape), v.dtype, hashlib.sha1(v.contiguous().view(-1).view(torch.uint8).numpy()).hexdigest())
            for k, v in module.state_dict().items()}


def smart_resize(h, w, factor, min_pixels, max_pixels):
    """Qwen2-VL's resize rule (qwen_vl_utils / transformers' smart_resize), re-stated: each side rounded to a
    multiple of `factor` (patch x merge), then scaled up or down (ceil / floor) into [min_pixels, max_pixels]."""
    hb, wb = round(h / factor) * factor, round(w / factor) * factor
    if hb * wb > max_pixels:
        beta = math.sqrt(h * w / max_pixels)
        hb, wb = math.floor(h / beta / factor) * factor, math.floor(w / beta / factor) * factor
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb, wb = math.ceil(h * beta / factor) * factor, math.ceil(w * beta / factor) * factor
    return hb, wb


def capture_inputs(module, store):
    """Record the keyword inputs of module's forward calls."""
    return module.register_forward_pre_hook(lambda m, args, kw: store.append(dict(kw)), with_kwargs=True)


def test_wan_real_shapes_save_load_and_one_step(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        wan = standins.random_wan("small", CPU, BF16, depth=1)
    tc, ec = wan.transformer.config, wan.text_encoder.config
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else v
    for k, v in dict(standins.WAN_CONFIGS["small"], num_layers=1).items():  # every field as released but the depth
        assert as_list(tc[k]) == as_list(v), k
    assert (ec.vocab_size, ec.d_model, ec.d_ff, ec.num_heads, ec.num_layers) == (256384, 4096, 10240, 64, 1)
    assert {k: as_list(wan.vae.config[k]) for k in WAN21_VAE} == WAN21_VAE  # diffusers' defaults are Wan2.1's VAE
    before = {part: fingerprint(getattr(wan, part)) for part in ("transformer", "text_encoder", "vae")}
    standins.save_pretrained(wan, tmp_path)
    del wan
    gc.collect()

    wan = models.load_wan(str(tmp_path), CPU, BF16)
    for part, fp in before.items():
        assert fingerprint(getattr(wan, part)) == fp, part  # same keys, shapes, dtypes and values
    # dtypes: transformer in bf16 but the modules diffusers keeps in fp32; UMT5 bf16; VAE fp32
    transformer = wan.transformer
    assert transformer.dtype == BF16
    keep = transformer._keep_in_fp32_modules
    for name, p in transformer.named_parameters():
        assert p.dtype == (torch.float32 if any(k in name.split(".") for k in keep) else BF16), name
    assert {p.dtype for p in wan.text_encoder.parameters()} == {BF16}
    assert {p.dtype for p in wan.vae.parameters()} == {torch.float32}

    emb = sample.encode(wan, [PROMPT, ""], models.SIZES["small"]["text_len"])
    n = wan.tokenizer(PROMPT).input_ids
    assert emb.shape == (2, 512, 4096) and emb.dtype == BF16 and torch.isfinite(emb).all()
    assert (emb[0, len(n):] == 0).all() and (emb[0, :len(n)] != 0).any(dim=-1).all()
    cond, uncond = emb.to(transformer.dtype).chunk(2)

    shape = sample.latent_shape(FRAMES, HEIGHT, WIDTH)
    assert shape == (16, 5, 16, 28)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        v = sample.velocity(transformer, x, 0.5, cond, uncond, 5.0)
    assert v.shape == x.shape and v.dtype == torch.float32 and torch.isfinite(v).all() and v.std() > 0

    video = sample.decode(wan.vae, x)
    assert video.shape == (1, FRAMES, 3, HEIGHT, WIDTH) and video.dtype == torch.float32
    assert torch.isfinite(video).all() and 0 <= video.min() and video.max() <= 1


def test_reward_models_real_shapes_save_load_and_score(tmp_path, monkeypatch):
    import lpips
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        critics = standins.random_reward_models(CPU, BF16, depth=1, process_res=PROCESS_RES)
    vit = critics.da3.backbone.pretrained
    assert (vit.embed_dim, vit.num_heads, vit.patch_size, len(vit.blocks)) == (1536, 24, 14, 4)
    assert critics.gs_cfg["sh_degree"] == 2 and critics.gs_cfg["gaussian_scale_max"] == 30.0  # da3-giant's adapter
    qc, hc = critics.qwen.config, critics.hps.backbone.config
    assert (qc.text_config.vocab_size, qc.text_config.hidden_size, qc.vision_config.hidden_size) == (151936, 2560, 1024)
    assert qc.vision_config.deepstack_visual_indexes == [0, 1, 2] and qc.text_config.num_hidden_layers == 1
    assert (hc.text_config.vocab_size, hc.text_config.hidden_size, hc.vision_config.embed_dim) == (152064, 3584, 1280)
    tok = critics.qwen_proc.tokenizer  # the stand-in tokenizer gives Qwen's ids
    assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                                   "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")] == \
        [151643, 151644, 151645, 151652, 151653, 151655, 151656]
    assert reward._digit_ids(tok) == list(range(15, 25))
    assert (qc.image_token_id, hc.image_token_id, critics.hps.reward_token_id) == (151655, 151655, 151657)
    before = {k: fingerprint(getattr(critics, k)) for k in ("da3", "qwen", "hps")}

    paths = standins.save_reward_models(critics, tmp_path)
    del critics
    gc.collect()
    assert json.loads((tmp_path / "da3" / "config.json").read_text()) == {"model_name": "da3-giant", "depth": 4}
    with safe_open(tmp_path / "da3" / "model.safetensors", "pt") as f:
        assert all(k.startswith("model.") for k in f.keys())
    with safe_open(tmp_path / "hps" / "HPSv3.safetensors", "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"visual", "model", "rm_head"}  # transformers 4.45's layout
    pre = json.loads((tmp_path / "qwen" / "processor_config.json").read_text())["image_processor"]  # 5.x layout
    assert pre["size"] == {"shortest_edge": 65536, "longest_edge": 16777216} and pre["patch_size"] == 16

    build = lpips.LPIPS  # LPIPS's ImageNet AlexNet cannot be had offline: check it is asked for, build a random one

    def offline_lpips(pnet_rand, **kw):
        assert pnet_rand is False, "real runs must ask for the ImageNet AlexNet"
        return build(pnet_rand=True, **kw)

    monkeypatch.setattr(lpips, "LPIPS", offline_lpips)
    critics = models.load_reward_models("small", CPU, BF16, process_res=PROCESS_RES, **paths)
    for k, fp in before.items():
        assert fingerprint(getattr(critics, k)) == fp, k  # same keys, shapes, dtypes and values
    # dtypes: DA3 fp32 (no autocast on the CPU), the VLMs bf16, HPSv3's head and LPIPS fp32
    assert {p.dtype for p in critics.da3.parameters()} == {torch.float32}
    assert {p.dtype for p in critics.qwen.parameters()} == {BF16}
    assert {p.dtype for p in critics.hps.backbone.parameters()} == {BF16}
    assert {p.dtype for p in critics.hps.rm_head.parameters()} == {torch.float32}
    assert {p.dtype for p in critics.lpips.parameters()} == {torch.float32}
    assert list(critics.qwen_proc.image_processor.image_mean) == [0.5] * 3
    assert list(critics.hps_proc.image_processor.image_mean) == standins.QWEN2_VL_IMAGES["image_mean"]

    lifts, qwen_in, hps_in = [], [], []
    lift = reward.lift
    monkeypatch.setattr(reward, "lift", lambda m, v: lifts.append(lift(m, v)) or lifts[-1])
    hooks = [capture_inputs(critics.qwen, qwen_in), capture_inputs(critics.hps, hps_in)]
    videos = torch.rand(2, FRAMES, 3, HEIGHT, WIDTH, generator=torch.Generator().manual_seed(2))
    path = noise_warp.camera_path(noise_warp.parse_camera(PROMPT), FRAMES)
    r, why = reward.score(critics, videos, [PROMPT, PROMPT], [path, path])
    for h in hooks:
        h.remove()
    assert why == [[], []]
    for k in ("S_meta", "S_recon", "S_traj", "R_gen", "R_3D", "total"):
        assert r[k].shape == (2,) and torch.isfinite(r[k]).all(), k
    assert ((r["S_meta"] > 0) & (r["S_meta"] < 1)).all() and (r["R_gen"] != 0).all()

    h, w = reward.lift_size(HEIGHT, WIDTH, PROCESS_RES)
    assert (h, w) == (42, 84) and len(lifts) == len(qwen_in) == len(hps_in) == 2
    for lf in lifts:  # DA3's Gaussian head: one Gaussian per pixel, degree-2 SH
        n = FRAMES * h * w
        assert lf.depth.shape == (FRAMES, h, w) and lf.c2w.shape == (FRAMES, 4, 4) and lf.K.shape == (FRAMES, 3, 3)
        assert lf.gaussians["sh"].shape == (n, 9, 3) and lf.gaussians["means"].shape == (n, 3)
        assert all(torch.isfinite(t).all() for t in (lf.depth, lf.c2w, lf.K, *lf.gaussians.values()))
    # Qwen3-VL grades the 42 x 84 meta render, resized to >= 65536 pixels in steps of 32 (patch 16, merge 2)
    gh, gw = smart_resize(h, w, 32, 65536, 16777216)
    assert (gh, gw) == (192, 384)
    for kw in qwen_in:
        assert kw["image_grid_thw"].tolist() == [[1, gh // 16, gw // 16]]
        assert kw["pixel_values"].shape == (gh * gw // 256, 3 * 2 * 16 * 16) and kw["pixel_values"].dtype == BF16
        assert int((kw["input_ids"] == 151655).sum()) == gh * gw // (32 * 32)
    # HPSv3 scores the first 4 frames at 128 x 224, resized to about 256*28*28 pixels (patch 14, merge 2)
    gh, gw = smart_resize(HEIGHT, WIDTH, 28, 256 * 28 * 28, 256 * 28 * 28)
    assert (gh, gw) == (364, 616)
    for kw in hps_in:
        assert kw["image_grid_thw"].tolist() == [[1, gh // 14, gw // 14]] * 4
        assert kw["pixel_values"].dtype == BF16 and kw["pixel_values"].shape[1] == 3 * 2 * 14 * 14
        assert int((kw["input_ids"] == 151655).sum()) == 4 * gh * gw // (28 * 28)
        assert ((kw["input_ids"] == 151657).sum(1) == 1).all()  # one <|Reward|> per prompt


def test_train_one_rl_step_on_the_real_shapes_then_resume(tmp_path):
    """train.py on the released shapes (Wan2.1-1.3B, UMT5-XXL, the Wan VAE, DA3-giant with its Gaussian head,
    Qwen3-VL-4B, HPSv3 on Qwen2-VL-7B; one block each) in bf16 on the CPU at a reduced video: camera noise, encoding,
    a rollout with the SDE window, decoding, every reward term, the update and a checkpoint; then --resume takes a
    second step from that checkpoint."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Camera orbit left. A stone lighthouse on a cliff above a dark sea.\n"
                       "Camera push in. A narrow alley of red lanterns at dusk.\n")
    out = tmp_path / "run"
    args = [sys.executable, "train.py", "--size=small", "--random_weights", "--depth=1", "--dtype=bf16", "--frames=9",
            "--height=64", "--width=112", f"--lift_res={PROCESS_RES}", "--rollout_steps=4", "--text_len=64",
            "--group_size=2", "--prompts_per_rank=1", "--eval_every=0", "--dynamic_every=0", "--save_every=1",
            f"--train_prompts={prompts}", f"--out_dir={out}"]
    for extra in (["--max_steps=1"], ["--max_steps=2", "--resume"]):
        proc = subprocess.run(args + extra, cwd=root, capture_output=True, text=True, timeout=1800)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in recs] == [0, 1] and "resumed from" in proc.stdout
    for r in recs:
        for key in ("reward", "S_meta", "S_recon", "S_traj", "R_gen", "loss", "kl", "grad_norm"):
            assert r[key] is not None and math.isfinite(r[key]), (key, r)
    assert (out / "ckpt_000001" / "lora").is_dir()
