"""
The loaders of every network the method uses (Wan2.1, the reward critics, DINO, RAFT), and the one size table.
Imports common; diffusers, transformers, depth_anything_3, lpips and torchvision inside the builders.

The stand-ins (tiny's random networks, the real architectures with random weights, writers of the released
on-disk layouts) are in standins.py.

Depth Anything 3 is installed without its dependencies (README, Install): we use only its model code.
"""
import json
import math
import os
from dataclasses import dataclass

import common  # first: the torchvision fix, before transformers / diffusers / lpips import it
import torch
import torch.nn as nn

os.environ.setdefault("DA3_LOG_LEVEL", "WARN")  # DA3's logger prints an INFO line on every forward

HUB = {"small": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "large": "Wan-AI/Wan2.1-T2V-14B-Diffusers"}
CRITICS = dict(da3="depth-anything/DA3-GIANT", qwen="Qwen/Qwen3-VL-4B-Instruct", hps="MizzenAI/HPSv3",
               hps_backbone="Qwen/Qwen2-VL-7B-Instruct")  # the reward models of the real sizes (hub ids)
DINO = "facebook/dino-vitb16"  # VBench's subject-consistency features (transformers' conversion of DINO ViT-B/16)
# The toy world's trained networks (toyworld.py builds them; committed, so a fresh clone runs --size=toy at once)
TOY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "toy")

# The sizes: one row per setting, its value at each size (in SIZE_NAMES order) and what it is. tiny: random stand-in
# networks built in code (standins.py: tests, CPU smoke runs); toy: the trained toy world (toyworld.py, CPU); small:
# Wan2.1-T2V-1.3B, large: Wan2.1-T2V-14B, both with the real critics. A flag given on a command line wins over its
# size's value; train.py, evaluate.py, sample.py and bench.py take their defaults from here (docs/DESIGN.md "Sizes").
SIZE_NAMES = ("tiny", "toy", "small", "large")
SIZE_ROWS = {
    # the networks and the video
    "model": ((None, os.path.join(TOY, "wan"), HUB["small"], HUB["large"]),
              "Wan2.1: a hub id or a local diffusers folder; unset at tiny: stand-ins built in code (standins.py)"),
    "frames": ((9, 9, 81, 81), "video frames, 4k+1"),
    "height": ((64, 32, 480, 480), "video height, a multiple of 16"),
    "width": ((64, 32, 832, 832), "video width, a multiple of 16"),
    "text_len": ((64, 32, 512, 512), "UMT5 tokens per prompt"),
    "sample_steps": ((20, 20, 50, 50), "denoising steps of the inference sampler (UniPC): sample.py, evaluate.py and "
                                       "train.py's eval"),
    "rollout_steps": ((10, 10, 20, 20), "denoising steps of train.py's rollouts (Euler ODE + SDE window)"),
    "stepwise_strength": ((0.35, 0.35, 0.35, 0.4), "λ of --warp_mode=stepwise (microsoft/World-R1 "
                                                   "config/world_r1.py, wrap_strength)"),
    # the reward (the rest of its settings are the same at every size: reward.SETTINGS)
    "lift_res": ((56, 56, 504, 504), "Depth Anything 3 input size, longest side"),
    "hps_pixels": ((56 * 56, 112 * 112, 256 * 28 * 28, 256 * 28 * 28),
                   "HPSv3's image size in pixels (MizzenAI/HPSv3 hpsv3/inference.py: 256*28*28)"),
    "w_meta": ((1.0, 0.0, 1.0, 1.0), "weight of S_meta inside R_3D (0: Qwen3-VL is not run; the toy world has no "
                                     "VLM, docs/DESIGN.md)"),
    "w_gen": ((1.0, 1.0, 1.0, 1.0), "weight of R_gen (0: HPSv3 is not run)"),
    # training (train.py)
    "group_size": ((4, 8, 8, 8), "videos per prompt (G)"),
    "prompts_per_rank": ((2, 2, 1, 1), "groups each rank rolls out per step"),
    "micro_batch": ((8, 16, 1, 1), "transitions per forward/backward"),
    "lr": ((1e-2, 3e-4, 1e-4, 1e-4), "AdamW learning rate"),
    "lora_rank": ((8, 16, 32, 32), "LoRA rank (q, k, v, out of every attention)"),
    "lora_alpha": ((16, 32, 64, 64), "LoRA alpha"),
    "fsdp": ((False, False, False, True), "FSDP2 instead of DDP"),
    "grad_checkpointing": ((False, False, True, True), "recompute each block's activations in backward "
                                                       "(81x480x832 activations outgrow an H200)"),
    "max_steps": ((3, 60, 3000, 3000), "RL steps (one rollout batch each)"),
    "eval_every": ((3, 20, 30, 30), "eval on test prompts every N steps (0: never)"),
    "save_every": ((1, 20, 60, 60), "checkpoint every N steps (and at the end)"),
    "dynamic_every": ((100, 0, 100, 100), "main steps between dynamic phases (0: never; the toy world's scenes are "
                                          "rigid)"),
    "train_prompts": (("prompts/train.txt", "prompts/toy_train.txt", "prompts/train.txt", "prompts/train.txt"),
                      "3D-aware training prompts"),
    "test_prompts": (("prompts/test.txt", "prompts/toy_test.txt", "prompts/test.txt", "prompts/test.txt"),
                     "held-out prompts: train.py's eval and evaluate.py"),
    # evaluation (evaluate.py)
    "limit": ((6, None, None, None), "prompts evaluate.py scores (unset: all)"),
    "dino": ((None, None, DINO, DINO), "subject-consistency features; unset: a tiny random ViT (standins.py)"),
    "dino_px": ((32, 32, 224, 224), "DINO's input side"),
    "raft": (("small", "small", "large", "large"), "dynamic-degree flow: RAFT large (C_T_V1 weights) or small "
                                                   "(random)"),
    "flow_iters": ((4, 4, 20, 20), "RAFT refinement iterations"),
}
SIZES = {size: {key: values[i] for key, (values, _) in SIZE_ROWS.items()} for i, size in enumerate(SIZE_NAMES)}
SIZE_HELP = {key: what for key, (_, what) in SIZE_ROWS.items()}


# -----------------------------------------------------------------------------
# Wan2.1: its four parts, from the hub or a local diffusers folder

@dataclass
class Wan:
    tokenizer: object
    text_encoder: torch.nn.Module
    transformer: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object  # the checkpoint's UniPCMultistepScheduler (flow_shift 3.0 for Wan2.1 T2V at 480p)


def word_tokenizer(words):
    """An in-memory T5 tokenizer whose pieces are `words` (whole words, case kept) plus single characters, so any
    text tokenizes and the listed words are one token each (transformers 5: tokenizers-backed, no sentencepiece)."""
    from transformers import T5Tokenizer
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -2.0) for w in words]
    vocab += [("\u2581", -3.0)] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def wan_scheduler():
    """The scheduler Wan2.1-T2V ships (its scheduler_config.json): UniPC on flow sigmas with shift 3."""
    from diffusers import UniPCMultistepScheduler
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                   solver_order=2, solver_type="bh2", predict_x0=True, lower_order_final=True,
                                   final_sigmas_type="zero")


def build_toy(words, seed=0):
    """The toy world's Wan2.1, untrained (toyworld.py trains it): a 1.0M-parameter transformer (4 blocks, 4 heads
    of 32, patch 1x1x1 on the 4x4 latent of a 32x32 video), a 0.25M-parameter VAE (base width 16), a 2-layer
    UMT5 of width 64 and a tokenizer whose words are the toy captions' `words`. Same seed, same weights."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = word_tokenizer(words)
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(seed + 2)
    transformer = WanTransformer3DModel(
        patch_size=(1, 1, 1), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
        text_dim=64, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)
    return Wan(tokenizer, text_encoder, transformer, vae, wan_scheduler())


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_dtype(name, device):
    """--dtype -> torch dtype: bf16 or fp32 as asked; None picks bf16 on CUDA (what the real runs use) and fp32 on a
    CPU (where bf16 matmuls are slow). Only the networks' weights follow it: SDE math, log-probs, noise, the VAE
    and the optimizer state stay fp32."""
    if name is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def load_wan(model, device, dtype=None):
    """model: a hub id (Wan-AI/...) or a local diffusers folder (standins.tiny_wan builds tiny's in code).
    The transformer and text encoder hold `dtype` weights (default: resolve_dtype(None, device)), except the
    modules diffusers keeps in fp32 (time embedding, norms, scale-shift tables); the VAE stays fp32."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    dtype = dtype or resolve_dtype(None, device)
    kw = dict(torch_dtype=dtype)
    wan = Wan(AutoTokenizer.from_pretrained(model, subfolder="tokenizer"),
              UMT5EncoderModel.from_pretrained(model, subfolder="text_encoder", **kw).eval(),
              WanTransformer3DModel.from_pretrained(model, subfolder="transformer", **kw).eval(),
              AutoencoderKLWan.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32).eval(),
              UniPCMultistepScheduler.from_pretrained(model, subfolder="scheduler"))
    for m in (wan.text_encoder, wan.transformer, wan.vae):
        m.to(device).requires_grad_(False)
    return wan


def keep_in_fp32(transformer, dtype):
    """Cast a Wan transformer to `dtype` except the modules diffusers keeps in fp32 (`_keep_in_fp32_modules`)."""
    keep = transformer._keep_in_fp32_modules
    for name, p in transformer.named_parameters():
        if not any(k in name.split(".") for k in keep):
            p.data = p.data.to(dtype)
    return transformer


def compute_dtype(transformer):
    """The dtype the transformer's inputs must have: its patch embedding's. Not "the first parameter": diffusers keeps
    `scale_shift_table`, the time embedder and the norms in fp32 even when the model runs in bf16."""
    return getattr(transformer, "module", transformer).patch_embedding.weight.dtype


# -----------------------------------------------------------------------------
# Reward critics: Depth Anything 3, Qwen3-VL, HPSv3, LPIPS

@dataclass
class RewardModels:
    """Every critic, loaded once per process. gs_cfg: DA3 Gaussian-head settings, None when it has no GS head."""
    da3: nn.Module
    gs_cfg: dict | None
    qwen: nn.Module | None  # None at the toy size (S_meta has weight 0 there)
    qwen_proc: object
    hps: nn.Module
    hps_proc: object
    lpips: nn.Module
    device: torch.device
    process_res: int  # DA3 input: longest side, each side then rounded to a multiple of 14
    hps_pixels: int  # HPSv3 images are resized to about this many pixels (upstream 256*28*28)


def _hub_file(repo, filename):
    """A local folder or a hub repo id -> path of `filename` (real runs only; tests never call this)."""
    if os.path.isdir(repo):
        return os.path.join(repo, filename)
    from huggingface_hub import hf_hub_download
    return hf_hub_download(repo, filename)


class _RawGaussians(nn.Module):
    """Stands in for DA3's GaussianAdapter inside DepthAnything3Net: hands the GS head's raw outputs back to us
    (its adapter imports evo and e3nn; `_gaussians_from_gs_head` does its job). No parameters, so checkpoints
    still load strictly."""

    def forward(self, **kw):
        return kw


def attach_gs_head(net, gs_head, gs_adapter):
    from depth_anything_3.cfg import create_object
    if gs_head is None:
        return net.eval(), None
    net.gs_head = create_object(gs_head)
    net.gs_adapter = _RawGaussians()
    return net.eval(), {k: v for k, v in gs_adapter.items() if k != "__object__"}


def load_da3(repo=CRITICS["da3"], preset="da3-giant", device="cpu", depth=None):
    """DA3 network built from the package's registry preset (the one named in the repo's config.json if any),
    weights from `model.safetensors`. That file was written by huggingface_hub's save_model from DA3's wrapper,
    which keeps the network at `.model` and stores tensors its heads share only once, so we load it the same way
    (safetensors' load_model, strict) into a holder with the same layout. repo=None: the preset with random
    weights (bench.py's real-size timings). depth (or a "depth" entry in config.json, which `standins.save_da3`
    writes and the released configs never have): the backbone cut to that many blocks (`cut_dinov2`)."""
    from depth_anything_3.cfg import create_object, load_config
    from depth_anything_3.model.da3 import DepthAnything3Net
    from depth_anything_3.registry import MODEL_REGISTRY
    from omegaconf import OmegaConf
    from huggingface_hub.errors import EntryNotFoundError
    from safetensors.torch import load_model
    try:
        if repo is not None:
            with open(_hub_file(repo, "config.json")) as f:
                saved = json.load(f)
            preset, depth = saved.get("model_name", preset), saved.get("depth", depth)
    except (OSError, ValueError, EntryNotFoundError):
        pass  # no (readable) config.json: keep the arguments
    if preset == "toy":
        cfg = {}
    else:
        cfg = OmegaConf.to_container(load_config(MODEL_REGISTRY[preset]))
    gs_head, gs_adapter = cfg.pop("gs_head", None), cfg.pop("gs_adapter", None)
    with torch.device(device):  # build where it will run: no 4.5 GB random init on the host
        if preset == "toy":
            net, gs_cfg = build_toy_da3()
        elif depth is None:
            net = create_object(OmegaConf.create(cfg))
        else:
            net = DepthAnything3Net(cut_dinov2(cfg["net"], depth), cfg["head"], cfg.get("cam_dec"), cfg.get("cam_enc"))
        if preset != "toy":
            net, gs_cfg = attach_gs_head(net, gs_head, gs_adapter)
    if repo is not None:
        holder = nn.Module()
        holder.model = net
        load_model(holder, _hub_file(repo, "model.safetensors"), strict=True, device=str(device))
    return net.requires_grad_(False), gs_cfg


class DinoV2(nn.Module):
    """DA3's DinoV2 wrapper (same forward, same `pretrained.*` keys) around a ViT of any size: DA3's own class
    fixes the depth by name (vitg: 40 blocks) and builds ViT-S and up only."""

    def __init__(self, vit, out_layers):
        super().__init__()
        self.pretrained = vit
        self.out_layers = list(out_layers)

    def forward(self, x, **kw):
        return self.pretrained.get_intermediate_layers(x, self.out_layers, **kw)


def cut_dinov2(net, depth):
    """A registry preset's DinoV2 (`net`: name, out_layers, alt_start, qknorm_start, rope_start, cat_token) with
    max(depth, 4) blocks, everything else as released. The block pattern is kept in small: the heads read four
    out layers (here the last four blocks); from alt_start on (here depth - 2: the giant's 13 of 40) blocks get
    the camera token, QK-norm and RoPE, and odd blocks attend globally; the block before picks the reference view
    (it needs a finished block before it, so alt_start >= 2)."""
    from depth_anything_3.model.dinov2 import vision_transformer as vt
    depth = max(depth, 4)
    start = {k: depth - 2 if net[k] != -1 else -1 for k in ("alt_start", "qknorm_start", "rope_start")}
    build = dict(vits=vt.vit_small, vitb=vt.vit_base, vitl=vt.vit_large, vitg=vt.vit_giant2)[net["name"]]
    vit = build(img_size=518, patch_size=14, depth=depth, ffn_layer="swiglufused" if net["name"] == "vitg" else "mlp",
                cat_token=net["cat_token"], **start)  # DA3's DinoV2 arguments for every preset
    return DinoV2(vit, range(depth - 4, depth))


def build_toy_da3():
    """The toy world's Depth Anything 3 (toyworld.py trains it), in DA3's own classes: a 6-block ViT 64 wide on 56 px
    frames (4x4 patches of 14), DualDPT depth head, camera decoder and encoder; no Gaussian head (the reward then
    unprojects its depth, reward.unproject_gaussians). 0.5M parameters. The camera decoder starts at the identity
    pose and the toy camera's field of view (2 atan(1 / 2.4), focal 1.2 x width), so the first steps train
    relative poses rather than an escape from a degenerate focal length."""
    from depth_anything_3.model.da3 import DepthAnything3Net
    from depth_anything_3.model.dinov2.vision_transformer import DinoVisionTransformer
    obj = lambda name, path: {"__object__": dict(path="depth_anything_3.model." + path, name=name, args="as_params")}
    vit = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=64, depth=6, num_heads=4, alt_start=2,
                                qknorm_start=2, rope_start=2, cat_token=True)
    net = DepthAnything3Net(DinoV2(vit, (2, 3, 4, 5)),
                            head={**obj("DualDPT", "dualdpt"), "dim_in": 128, "features": 16,
                                  "out_channels": [16, 32, 32, 32], "output_dim": 2},
                            cam_dec={**obj("CameraDec", "cam_dec"), "dim_in": 128},
                            cam_enc={**obj("CameraEnc", "cam_enc"), "dim_out": 64})
    fov = 2 * math.atan(1 / 2.4)
    with torch.no_grad():
        for lin, bias in ((net.cam_dec.fc_t, [0.0, 0, 0]), (net.cam_dec.fc_qvec, [0.0, 0, 0, 1]),
                          (net.cam_dec.fc_fov[0], [fov, fov])):
            lin.weight.mul_(0.1)
            lin.bias.copy_(torch.tensor(bias))
    return net.eval(), None


class HPSv3Reward(nn.Module):
    """HPSv3 on transformers 5.x: a Qwen2-VL backbone and the ranknet head read at the <|Reward|> token.
    forward -> [B, 2] = (mu, sigma); the score is mu. The head stays fp32 (upstream does the same).

    The forward is upstream's (MizzenAI/HPSv3 hpsv3/model/qwen2vl_trainer.py, Qwen2VLRewardModelBT.forward), not
    Qwen2-VL's own: the token embeddings get the vision tower's merged patch features scattered in at the
    <|image_pad|> slots, and the language model then runs on those embeddings with plain sequential positions,
        pos[b, t] = #{real tokens of row b before t}      the same on all three M-RoPE axes (temporal, h, w),
    never Qwen2-VL's 3-D image positions (the checkpoint was trained without them). Upstream passes
    position_ids=None to its right-padded batches, i.e. 0..T-1; counting real tokens gives the same positions on
    every real token of a right-padded row and keeps a left-padded batch exact too."""

    def __init__(self, config, reward_token_id):
        super().__init__()
        from transformers import Qwen2VLModel
        self.backbone = Qwen2VLModel(config)
        h = config.text_config.hidden_size
        self.rm_head = nn.Sequential(nn.Linear(h, 1024), nn.ReLU(), nn.Dropout(0.05), nn.Linear(1024, 16),
                                     nn.ReLU(), nn.Linear(16, 2))
        self.reward_token_id = reward_token_id

    def forward(self, input_ids, attention_mask, pixel_values, image_grid_thw, **_):
        """input_ids, attention_mask (B, T); pixel_values (sum_i t*h*w patches, C*2*14*14); image_grid_thw (B, 3)."""
        bb = self.backbone
        emb = bb.language_model.embed_tokens(input_ids)  # (B, T, D)
        img = bb.visual(pixel_values.type(bb.visual.dtype), grid_thw=image_grid_thw).pooler_output  # (N_img, D)
        slots = input_ids == bb.config.image_token_id
        assert int(slots.sum()) == img.shape[0], "image tokens and image features differ in number"
        emb = emb.masked_scatter(slots[..., None], img.to(emb.dtype))
        pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T); the text model repeats it on 3 axes
        hs = bb.language_model(inputs_embeds=emb, attention_mask=attention_mask, position_ids=pos,
                               use_cache=False).last_hidden_state
        at = input_ids == self.reward_token_id  # (B, T), exactly one per row
        assert (at.sum(1) == 1).all(), "every HPSv3 prompt needs exactly one <|Reward|> token"
        return self.rm_head(hs[at].float())


def remap_hpsv3_key(key):
    """HPSv3.safetensors was written with transformers 4.45's Qwen2VLForConditionalGeneration layout
    (visual.*, model.*, lm_head.*, rm_head.*); ours is backbone.visual.*, backbone.language_model.*, rm_head.*.
    The >= 4.52 layout (model.visual.*, model.language_model.*) maps too. None = dropped (the unused LM head)."""
    key = key.removeprefix("module.")  # a DDP/DeepSpeed wrapper prefix, if the checkpoint kept one
    if key.startswith("lm_head."):
        return None
    for old, new in (("model.visual.", "backbone.visual."), ("model.language_model.", "backbone.language_model."),
                     ("visual.", "backbone.visual."), ("model.", "backbone.language_model.")):
        if key.startswith(old):
            return new + key.removeprefix(old)
    return key


def remap_hpsv3_state_dict(sd):
    return {new: v for k, v in sd.items() if (new := remap_hpsv3_key(k)) is not None}


def load_hpsv3(repo=CRITICS["hps"], backbone=CRITICS["hps_backbone"], device="cpu", dtype=torch.bfloat16):
    """Backbone config and processor from Qwen2-VL-7B-Instruct, weights from `HPSv3.safetensors`, remapped."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoProcessor
    proc = AutoProcessor.from_pretrained(backbone)
    proc.tokenizer.add_tokens(["<|Reward|>"], special_tokens=True)
    config = AutoConfig.from_pretrained(backbone)
    sd = remap_hpsv3_state_dict(load_file(_hub_file(repo, "HPSv3.safetensors"), device=str(device)))
    config.text_config.vocab_size = sd["backbone.language_model.embed_tokens.weight"].shape[0]
    with common.build_in(device, dtype):
        model = HPSv3Reward(config, proc.tokenizer.convert_tokens_to_ids("<|Reward|>"))
    model.rm_head.float()  # before loading: the head's fp32 weights must not pass through bf16
    model.load_state_dict(sd, strict=True)
    return model.eval().requires_grad_(False), proc


def load_reward_models(size, device="cpu", dtype=None, da3=CRITICS["da3"], qwen=CRITICS["qwen"],
                       hps=CRITICS["hps"], hps_backbone=CRITICS["hps_backbone"], seed=0, process_res=None):
    """size="toy": the toy world's trained Depth Anything 3 and HPSv3 (`da3`, `hps`, `hps_backbone` default to the
    committed folders) and LPIPS; no Qwen3-VL (the toy world weighs S_meta 0, docs/DESIGN.md). small, large: real
    weights (hub ids or local folders, e.g. from standins.save_reward_models): the VLMs in `dtype` (bf16 on CUDA,
    fp32 on CPU); DA3 keeps fp32 weights and runs under bf16 autocast on CUDA like its own inference (its heads run
    in fp32 inside), in plain fp32 on CPU; LPIPS is fp32. process_res: DA3's input size (default: the size's
    lift_res). tiny's critics are stand-ins built in code (standins.tiny_reward_models)."""
    if size not in SIZES or size == "tiny":
        raise ValueError(f"reward size {size!r}: choose toy, small or large (tiny: standins.tiny_reward_models)")
    import lpips
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if size == "toy":
        mine = lambda name, given: os.path.join(TOY, name) if given == CRITICS[name] else given  # noqa: E731
        da3_net, gs_cfg = load_da3(mine("da3", da3), device=device)
        hps_model, hps_proc = load_hpsv3(mine("hps", hps), mine("hps_backbone", hps_backbone), device, dtype)
        qwen_model = qwen_proc = None
        with torch.random.fork_rng(devices=[]):  # the toy world downloads nothing: a random, seeded AlexNet
            torch.manual_seed(seed)
            lp = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)
    else:
        from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
        da3_net, gs_cfg = load_da3(da3, device=device)
        qwen_model = Qwen3VLForConditionalGeneration.from_pretrained(qwen, dtype=dtype).eval().requires_grad_(False)
        qwen_proc = AutoProcessor.from_pretrained(qwen)
        hps_model, hps_proc = load_hpsv3(hps, hps_backbone, device, dtype)
        lp = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=False, verbose=False)
    to = lambda m: m if m is None else m.to(device)  # noqa: E731
    return RewardModels(da3=da3_net.to(device), gs_cfg=gs_cfg, qwen=to(qwen_model), qwen_proc=qwen_proc,
                        hps=to(hps_model), hps_proc=hps_proc, lpips=lp.eval().requires_grad_(False).to(device),
                        device=device, process_res=process_res or SIZES[size]["lift_res"],
                        hps_pixels=SIZES[size]["hps_pixels"])


# -----------------------------------------------------------------------------
# Evaluation networks: DINO (subject consistency) and RAFT (dynamic degree)


def load_dino(repo, device):
    """A hub id or folder through transformers: facebook/dino-vitb16 (ViTModel, the
    DINO ViT-B/16 weights VBench uses) or a DINOv2 checkpoint (Dinov2Model). DINO has no pooler: we read the CLS
    token of the last (layer-normed) hidden state, which is what DINO's own forward returns."""
    from transformers import AutoConfig, AutoModel, ViTModel
    if AutoConfig.from_pretrained(repo).model_type == "vit":
        model = ViTModel.from_pretrained(repo, add_pooling_layer=False)
    else:
        model = AutoModel.from_pretrained(repo)
    return model.eval().requires_grad_(False).to(device)


def load_raft(kind, device, seed=0):
    """torchvision RAFT: "large" with the C_T_V1 weights (the RAFT authors' raft-things.pth, as VBench), "small"
    with random weights (tiny runs; seeded so every rank builds the same network)."""
    from torchvision.models.optical_flow import Raft_Large_Weights, raft_large, raft_small
    if kind == "large":
        model = raft_large(weights=Raft_Large_Weights.C_T_V1)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = raft_small(weights=None)
    return model.eval().requires_grad_(False).to(device)
