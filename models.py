"""
Every network the project builds or loads (Wan2.1, the reward critics, DINO, RAFT), and the one size table.
Imports common; diffusers, transformers, depth_anything_3, lpips and torchvision inside the builders.

Per --size, SIZES says which networks and which video: tiny builds random networks in code (tests, CPU runs); small
and large load Wan2.1-T2V-1.3B / 14B and the real critics. The real architectures can also be built with random
weights (bench.py, train.py --random_weights: real-size costs, nothing downloaded).

Depth Anything 3's pins would downgrade numpy and pull xformers/open3d; we use only its model code:
    pip install --no-deps depth-anything-3==0.1.1 && pip install addict omegaconf
Real runs also need LPIPS's AlexNet ImageNet weights (torchvision downloads alexnet-owt-7be5be79.pth into the
torch hub cache; seed that cache on offline clusters).
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

# The sizes (docs/DESIGN.md "Sizes"): per --size, the networks and the video. tiny = random networks built in
# code; small = Wan2.1-T2V-1.3B, large = Wan2.1-T2V-14B, both with the real critics. Any flag given on a command
# line wins over its preset. steps: inference (UniPC) steps; rollout_steps: train.py's rollout steps (Euler ODE +
# SDE window). stepwise_strength: λ of the release's stepwise camera guidance (microsoft/World-R1
# config/world_r1.py, wrap_strength). lift_res: Depth Anything 3's input side; hps_pixels: HPSv3's image size in
# pixels (MizzenAI/HPSv3 hpsv3/inference.py: 256*28*28). dino, dino_px, raft, flow_iters: evaluate.py's networks.
SIZES = {
    "tiny": dict(model=None, frames=9, height=64, width=64, text_len=64, steps=20, rollout_steps=10,
                 stepwise_strength=0.35, lift_res=56, hps_pixels=56 * 56, dino=None, dino_px=32, raft="small",
                 flow_iters=4),
    "toy": dict(model=os.path.join(TOY, "wan"), frames=9, height=32, width=32, text_len=32, steps=20,
                rollout_steps=10, stepwise_strength=0.35, lift_res=56, hps_pixels=56 * 56, dino=None, dino_px=32,
                raft="small", flow_iters=4),
    "small": dict(model=HUB["small"], frames=81, height=480, width=832, text_len=512, steps=50, rollout_steps=20,
                  stepwise_strength=0.35, lift_res=504, hps_pixels=256 * 28 * 28, dino=DINO, dino_px=224,
                  raft="large", flow_iters=20),
    "large": dict(model=HUB["large"], frames=81, height=480, width=832, text_len=512, steps=50, rollout_steps=20,
                  stepwise_strength=0.4, lift_res=504, hps_pixels=256 * 28 * 28, dino=DINO, dino_px=224,
                  raft="large", flow_iters=20),
}


# -----------------------------------------------------------------------------
# Wan2.1: its four parts, from the hub, a local diffusers folder, or built tiny in code

@dataclass
class Wan:
    tokenizer: object
    text_encoder: torch.nn.Module
    transformer: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object  # the checkpoint's UniPCMultistepScheduler (flow_shift 3.0 for Wan2.1 T2V at 480p)


# Enough whole words that tiny prompts tokenize mostly to words; the rest falls back to characters.
TINY_WORDS = (
    "a an the of in on at to from with and then camera push pull in out move left right orbit pan fixed "
    "city street forest room house car sky water tree river mountain lake sea beach sand rock stone wood glass "
    "metal light shadow sun moon night morning evening fog rain snow cloud bridge tower building window door "
    "table chair cup book flower grass field road path wall roof garden temple castle boat ship cliff hill "
    "valley desert ice fire smoke people crowd dog cat bird horse red blue green yellow white black golden old "
    "small large tall wide narrow behind front above below between near far foreground background distant "
    "soft bright dark warm cold wet dry style painting"
).split()


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


def build_tiny(seed=0):
    """A Wan2.1-architecture model with random weights, built in code (no download): ~40k-param transformer,
    ~70k-param VAE (its brightness following latent channel 0: `show_latent_brightness`), ~23k-param UMT5 and an
    in-memory T5 tokenizer. Same seed, same weights."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = word_tokenizer(TINY_WORDS)
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    torch.manual_seed(seed + 1)
    vae = show_latent_brightness(AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                                  temperal_downsample=[False, True, True]).eval())
    torch.manual_seed(seed + 2)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    return Wan(tokenizer, text_encoder, transformer, vae, wan_scheduler())


@torch.no_grad()
def show_latent_brightness(vae, gain=3.0, texture=0.3):
    """Give the random tiny VAE what a trained one has: pixels that follow the latents. A random Wan decoder
    normalises each position's features over channels (RMS norm), so shifting a latent channel barely moves the
    decoded colour (~0.003 per unit) and no pixel reward gives the policy a direction to learn. Here latent
    channel 0 is carried through the decoder (one centre tap per layer, `gain` at the input) onto all three
    colours: brightness rises steadily with it (~0.1 per unit), while the random layers, scaled by `texture`,
    keep a spatial pattern for the critics to see. Returns `vae`, changed in place."""
    dec = vae.decoder
    vae.post_quant_conv.weight[0, 0, -1, 0, 0] += gain  # causal 3-D convs: the last temporal tap is the frame itself
    dec.conv_in.weight[0, 0, -1, 1, 1] += gain
    for block in dec.up_blocks:
        for res in block.resnets:  # identity shortcuts carry channel 0 already; the 1x1 ones need a tap
            if not isinstance(res.conv_shortcut, nn.Identity):
                res.conv_shortcut.weight[0, 0, -1, 0, 0] += 1
        for up in block.upsamplers or []:
            up.resample[1].weight[0, 0, 1, 1] += 1
            if hasattr(up, "time_conv"):  # doubles the frames: output channels [0, C) and [C, 2C) are the two
                half = up.time_conv.weight.shape[0] // 2
                up.time_conv.weight[0, 0, -1, 0, 0] += 1
                up.time_conv.weight[half, 0, -1, 0, 0] += 1
    dec.conv_out.weight.mul_(texture)
    dec.conv_out.weight[:, 0, -1, 1, 1] += 1
    return vae


def save_pretrained(wan, folder):
    """Write a diffusers folder (model_index.json + one subfolder per part) that `load_wan(folder)` and
    diffusers' WanPipeline.from_pretrained both read: how tests exercise the real loading path."""
    from diffusers import WanPipeline

    WanPipeline(tokenizer=wan.tokenizer, text_encoder=wan.text_encoder, vae=wan.vae, transformer=wan.transformer,
                scheduler=wan.scheduler).save_pretrained(folder)


DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_dtype(name, device):
    """--dtype -> torch dtype: bf16 or fp32 as asked; None picks bf16 on CUDA (what the real runs use) and fp32 on a
    CPU (where bf16 matmuls are slow). Only the networks' weights follow it: SDE math, log-probs, noise, the VAE
    and the optimizer state stay fp32."""
    if name is None:
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def load_wan(model, device, dtype=None):
    """model: None (tiny, built in code), a hub id (Wan-AI/...), or a local diffusers folder.
    The transformer and text encoder hold `dtype` weights (default: resolve_dtype(None, device)), except the
    modules diffusers keeps in fp32 (time embedding, norms, scale-shift tables); the VAE stays fp32."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    dtype = dtype or resolve_dtype(None, device)
    if model is not None:
        kw = dict(torch_dtype=dtype)
        wan = Wan(AutoTokenizer.from_pretrained(model, subfolder="tokenizer"),
                  UMT5EncoderModel.from_pretrained(model, subfolder="text_encoder", **kw).eval(),
                  WanTransformer3DModel.from_pretrained(model, subfolder="transformer", **kw).eval(),
                  AutoencoderKLWan.from_pretrained(model, subfolder="vae", torch_dtype=torch.float32).eval(),
                  UniPCMultistepScheduler.from_pretrained(model, subfolder="scheduler"))
    else:  # built in fp32: cast as from_pretrained(torch_dtype=dtype) would
        wan = build_tiny()
        wan.text_encoder.to(dtype)
        keep_in_fp32(wan.transformer, dtype)
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
    hps: nn.Module | None  # None at the toy size (R_gen has weight 0 there)
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


def _attach_gs_head(net, gs_head, gs_adapter):
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
    weights (bench.py's real-size timings). depth (or a "depth" entry in config.json, which `save_da3` writes and
    the released configs never have): the backbone cut to that many blocks (`_cut_dinov2`)."""
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
            net = DepthAnything3Net(_cut_dinov2(cfg["net"], depth), cfg["head"], cfg.get("cam_dec"), cfg.get("cam_enc"))
        if preset != "toy":
            net, gs_cfg = _attach_gs_head(net, gs_head, gs_adapter)
    if repo is not None:
        holder = nn.Module()
        holder.model = net
        load_model(holder, _hub_file(repo, "model.safetensors"), strict=True, device=str(device))
    return net.requires_grad_(False), gs_cfg


def save_da3(net, folder, preset="da3-giant"):
    """Write `net` (a registry preset's DepthAnything3Net, or its `_cut_dinov2` cut) as the hub repos lay it out:
    config.json naming the preset (+ "depth" for a cut backbone) and model.safetensors as huggingface_hub's
    save_model writes DA3's wrapper: the network under `model.`, tensors shared by the heads stored once."""
    from safetensors.torch import save_model
    os.makedirs(folder, exist_ok=True)
    cfg = {"model_name": preset}
    if isinstance(net.backbone, _DinoV2) and preset != "toy":
        cfg["depth"] = len(net.backbone.pretrained.blocks)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    holder = nn.Module()
    holder.model = net
    save_model(holder, os.path.join(folder, "model.safetensors"))


class _DinoV2(nn.Module):
    """DA3's DinoV2 wrapper (same forward, same `pretrained.*` keys) around a ViT of any size: DA3's own class
    fixes the depth by name (vitg: 40 blocks) and builds ViT-S and up only."""

    def __init__(self, vit, out_layers):
        super().__init__()
        self.pretrained = vit
        self.out_layers = list(out_layers)

    def forward(self, x, **kw):
        return self.pretrained.get_intermediate_layers(x, self.out_layers, **kw)


def _cut_dinov2(net, depth):
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
    return _DinoV2(vit, range(depth - 4, depth))


def build_tiny_da3():
    """Random DA3 (ViT 32-wide, DualDPT, camera decoder, GS head; 0.4M parameters). The camera decoder's last
    layers start near identity pose and a 57 deg FOV: fully random ones predict FOV ~ 0 (focal 3.5e7)."""
    from depth_anything_3.model.da3 import DepthAnything3Net
    from depth_anything_3.model.dinov2.vision_transformer import DinoVisionTransformer
    obj = lambda name, path: {"__object__": dict(path="depth_anything_3.model." + path, name=name, args="as_params")}
    dpt = dict(dim_in=64, features=16, out_channels=[8, 16, 32, 32])
    vit = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=32, depth=8, num_heads=2, alt_start=4,
                                qknorm_start=4, rope_start=4, cat_token=True)
    net = DepthAnything3Net(_DinoV2(vit, (1, 3, 5, 7)), head={**obj("DualDPT", "dualdpt"), **dpt, "output_dim": 2},
                            cam_dec={**obj("CameraDec", "cam_dec"), "dim_in": 64},
                            cam_enc={**obj("CameraEnc", "cam_enc"), "dim_out": 32})
    gs_adapter = dict(sh_degree=2, pred_color=False, pred_offset_depth=True, pred_offset_xy=True,
                      gaussian_scale_min=1e-5, gaussian_scale_max=1.0)  # giant: 30, too big for random heads
    net, gs_cfg = _attach_gs_head(net, {**obj("GSDPT", "gsdpt"), **dpt, "output_dim": 38}, gs_adapter)
    dec = net.cam_dec
    with torch.no_grad():
        for lin, bias in ((dec.fc_t, [0.0, 0, 0]), (dec.fc_qvec, [0.0, 0, 0, 1]), (dec.fc_fov[0], [1.0, 1.0])):
            lin.weight.mul_(0.02)
            lin.bias.copy_(torch.tensor(bias))
    return net.requires_grad_(False), gs_cfg


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
    net = DepthAnything3Net(_DinoV2(vit, (2, 3, 4, 5)),
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


QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")  # ids 151643.. in Qwen's vocab


def _tiny_tokenizer(extra=(), real_ids=False):
    """Byte-level Qwen tokenizer with no merges (every byte, so every digit, is one token) + Qwen's specials.
    real_ids: the ids Qwen's own vocabulary gives them (bytes 0..255 in GPT-2's byte order, so "0".."9" are
    15..24; <|endoftext|> 151643 ... <|video_pad|> 151656; `extra` after those), with never-produced filler
    tokens in between, so a real-size embedding is read at the rows a real prompt reads."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    if real_ids:
        vocab = {c: i for i, c in enumerate(bytes_to_unicode().values())}
        vocab.update({f"<filler_{i}>": i for i in range(len(vocab), 151643)})
        vocab.update({t: 151643 + i for i, t in enumerate(QWEN_SPECIALS)})
    else:
        vocab = {c: i for i, c in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token="<|endoftext|>", eos_token="<|im_end|>",
                         pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|vision_start|>", "<|vision_end|>",
                                                          "<|image_pad|>", "<|video_pad|>", *extra]})
    return tok


TINY_CHAT_TEMPLATE = (  # the Qwen-VL chat layout, minus the default system turn
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _vision_token_ids(tok):
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def build_tiny_qwen():
    """Random Qwen3-VL (2 layers, 64 wide) with a local tokenizer and processor (patch 16, merge 2)."""
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor, Qwen3VLVideoProcessor)
    tok = _tiny_tokenizer()
    kw = dict(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    proc = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64}, **kw),
        video_processor=Qwen3VLVideoProcessor(size={"shortest_edge": 32 * 32, "longest_edge": 64 * 64 * 8}, **kw),
        tokenizer=tok, chat_template=TINY_CHAT_TEMPLATE)
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, eos_token_id=eos,
                         pad_token_id=pad, bos_token_id=None, rope_parameters={
                             "rope_type": "default", "rope_theta": 1e4, "mrope_section": [4, 2, 2],
                             "mrope_interleaved": True}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64,
                           num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
        **_vision_token_ids(tok))
    return Qwen3VLForConditionalGeneration(cfg).eval().requires_grad_(False), proc


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


def save_hpsv3(model, proc, folder, backbone_folder):
    """Write an HPSv3Reward as the release lays it out: `folder`/HPSv3.safetensors in transformers 4.45's
    Qwen2-VL key layout (visual.*, model.*, rm_head.*; the inverse of `remap_hpsv3_key`, without the unused LM
    head), and the backbone's config and processor in `backbone_folder`, where the Qwen2-VL repo has them."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    old = {}
    for k, v in model.state_dict().items():
        for new, was in (("backbone.visual.", "visual."), ("backbone.language_model.", "model.")):
            if k.startswith(new):
                k = was + k.removeprefix(new)
        old[k] = v.contiguous()
    save_file(old, os.path.join(folder, "HPSv3.safetensors"))
    model.backbone.config.save_pretrained(backbone_folder)
    proc.save_pretrained(backbone_folder)


def build_tiny_hpsv3():
    """Random HPSv3 (Qwen2-VL backbone 2 layers, 64 wide, patch 14) with a local tokenizer and processor."""
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor
    tok = _tiny_tokenizer(extra=("<|Reward|>",))
    kw = dict(patch_size=14, merge_size=2, temporal_patch_size=2)
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), video_processor=Qwen2VLVideoProcessor(**kw),
                            tokenizer=tok, chat_template=TINY_CHAT_TEMPLATE)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        **_vision_token_ids(tok))
    return HPSv3Reward(cfg, tok.convert_tokens_to_ids("<|Reward|>")).eval().requires_grad_(False), proc


def load_reward_models(size="tiny", device="cpu", dtype=None, da3=CRITICS["da3"], qwen=CRITICS["qwen"],
                       hps=CRITICS["hps"], hps_backbone=CRITICS["hps_backbone"], seed=0, process_res=None):
    """size="tiny": random models built in code (fixed seed, no files, no network). size="toy": the toy world's
    trained Depth Anything 3 (`da3` defaults to its committed folder) and LPIPS; no Qwen3-VL or HPSv3 (the toy reward
    weighs S_meta and R_gen 0). Otherwise real weights
    (hub ids or local folders, e.g. from `save_reward_models`): the VLMs in `dtype` (bf16 on CUDA, fp32 on CPU);
    DA3 keeps fp32 weights and runs under bf16 autocast on CUDA like its own inference (its heads run in fp32
    inside), in plain fp32 on CPU; LPIPS is fp32. process_res: DA3's input size (default: the size's lift_res)."""
    if size not in SIZES:
        raise ValueError(f"reward size {size!r}: choose {', '.join(list(SIZES)[:-1])} or {list(SIZES)[-1]}")
    import lpips
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if size == "tiny":
        with torch.random.fork_rng(devices=[]):  # tiny models do not disturb the caller's RNG stream
            torch.manual_seed(seed)
            da3_net, gs_cfg = build_tiny_da3()
            qwen_model, qwen_proc = build_tiny_qwen()
            hps_model, hps_proc = build_tiny_hpsv3()
            lp = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)  # random AlexNet
    elif size == "toy":
        da3_net, gs_cfg = load_da3(os.path.join(TOY, "da3") if da3 == CRITICS["da3"] else da3, device=device)
        qwen_model = qwen_proc = hps_model = hps_proc = None
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


def save_reward_models(critics, folder, da3_preset="da3-giant"):
    """Write the critics in their released layouts (folder/da3, qwen, hps, hps_backbone) and return those paths
    as load_reward_models' keyword arguments: how tests run the real loaders on models built in code. DA3 must be
    the registry preset `da3_preset` or a cut of it. LPIPS is not written: the loader builds it from the lpips
    package (its AlexNet from torchvision's ImageNet weights)."""
    paths = {k: os.path.join(folder, k) for k in ("da3", "qwen", "hps", "hps_backbone")}
    save_da3(critics.da3, paths["da3"], da3_preset)
    critics.qwen.save_pretrained(paths["qwen"])
    critics.qwen_proc.save_pretrained(paths["qwen"])
    save_hpsv3(critics.hps, critics.hps_proc, paths["hps"], paths["hps_backbone"])
    return paths


# -----------------------------------------------------------------------------
# Evaluation networks: DINO (subject consistency) and RAFT (dynamic degree)

def build_tiny_dino(seed=0):
    """Random ViT with DINO ViT-B/16's architecture family (2 layers, 32 wide, patch 8): no download."""
    from transformers import ViTConfig, ViTModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  image_size=32, patch_size=8), add_pooling_layer=False).eval()


def load_dino(repo, device):
    """repo None: tiny random. Else a hub id or folder through transformers: facebook/dino-vitb16 (ViTModel, the
    DINO ViT-B/16 weights VBench uses) or a DINOv2 checkpoint (Dinov2Model). DINO has no pooler: we read the CLS
    token of the last (layer-normed) hidden state, which is what DINO's own forward returns."""
    from transformers import AutoConfig, AutoModel, ViTModel
    if repo is None:
        model = build_tiny_dino()
    elif AutoConfig.from_pretrained(repo).model_type == "vit":
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


# -----------------------------------------------------------------------------
# The real architectures with random weights (bench.py, train.py --random_weights): real-size costs, no download

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

    wan = build_tiny()
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
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor, Qwen3VLProcessor
    from transformers import Qwen3VLVideoProcessor
    qwen = Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**QWEN3_VL_IMAGES),
                            video_processor=Qwen3VLVideoProcessor(**QWEN3_VL_VIDEOS),
                            tokenizer=_tiny_tokenizer(real_ids=True), chat_template=TINY_CHAT_TEMPLATE)
    hps = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**QWEN2_VL_IMAGES),
                           video_processor=Qwen2VLVideoProcessor(**QWEN2_VL_IMAGES),
                           tokenizer=_tiny_tokenizer(extra=("<|Reward|>",), real_ids=True),
                           chat_template=TINY_CHAT_TEMPLATE)
    return qwen, hps


def random_reward_models(device, dtype=torch.bfloat16, depth=None, process_res=SIZES["small"]["lift_res"]):
    """The real-size critics with random weights: DA3-giant (its registry preset, with its Gaussian head) in fp32,
    Qwen3-VL-4B and HPSv3 on Qwen2-VL-7B in `dtype` (the reward head in fp32), LPIPS AlexNet; the released
    processors (`real_processors`). depth: every decoder and vision stack cut to that many blocks, widths and
    vocabularies as released, except where the index lists need more: DA3's backbone keeps four out layers
    (_cut_dinov2: at least 4 blocks) and Qwen3-VL's vision tower its three DeepStack taps (at least 3,
    the last three blocks)."""
    import lpips
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
            da3, gs_cfg = load_da3(None, device="cpu", depth=depth)
    else:
        da3, gs_cfg = load_da3(None, device=device, depth=depth)
    with common.build_in(device, dtype):
        qwen = random_hf(lambda: Qwen3VLForConditionalGeneration(
            Qwen3VLConfig(**q3, **_vision_token_ids(qwen_proc.tokenizer))))
        hps = random_hf(lambda: HPSv3Reward(
            Qwen2VLConfig(**q2, **_vision_token_ids(hps_proc.tokenizer)),
            hps_proc.tokenizer.convert_tokens_to_ids("<|Reward|>")))
    hps.rm_head.float()  # as load_hpsv3: the head stays fp32
    return RewardModels(
        da3=da3, gs_cfg=gs_cfg, qwen=qwen.eval().requires_grad_(False), qwen_proc=qwen_proc,
        hps=hps.eval().requires_grad_(False), hps_proc=hps_proc,
        lpips=lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval().to(device),
        device=torch.device(device), process_res=process_res, hps_pixels=SIZES["small"]["hps_pixels"])
