"""
The World-R1 rewards, in-process: a 3D reward from Depth Anything 3 + 3D Gaussians, and HPSv3 for quality.

    R     = w_3d * R_3D + w_gen * R_gen          (dynamic phase: R = R_gen)
    R_3D  = S_meta + S_recon + S_traj            each clipped to [0, 1], so R_3D in [0, 3]
    R_gen = gen_scale * mean_{k < gen_frames} HPSv3_mu(frame k, prompt)

Data flow for one video [F, 3, H, W] in [0, 1]: DA3 lifts the frames to per-frame depth, cameras and 3D
Gaussians (`lift`); we splat the Gaussians (`render`: gsplat on CUDA, a float64-compositing torch rasterizer on
CPU); S_recon = 1 - mean LPIPS(frame k, render at camera k); S_meta = Qwen3-VL's expected 0-9 grade of a render
from an unseen "meta" view, / 9; S_traj compares the estimated camera path with the requested one.

Departures from the official release (microsoft/World-R1 reward_server/reward_3d.py, reward_3d_backend.py,
general_reward.py; docs/DESIGN.md says why):
 1. Meta view: the middle estimated camera orbited `meta_angle` (15 deg) about its look-at point (optical axis at
    the frame's median depth), to the side away from where the estimated path went. The release renders the
    existing camera farthest from the origin, i.e. a view the video already shows.
 2. S_recon compares render k with frame k at frame k's own estimated camera, at DA3's resolution. The release
    compares the first 81 poses of a smoothed 243-pose path with the 81 frames (out of step) on a 512x512 canvas.
 3. S_traj = exp(-(mean |c_hat - c| + mean geo(R_hat, R)) / tau): translations in scene depths (no fitted scale,
    so a still camera cannot be stretched onto the path), rotations in radians, tau = half a still camera's
    error (see `s_traj`); the release blends several ad-hoc terms.
 4. R_gen is HPSv3 (mu) averaged over the first `gen_frames` frames; the release scores one random frame with
    HPSv2.1. `gen_scale` keeps it beside R_3D.
 5. Everything runs in the training process (no Flask servers, no pickle). Black, constant, non-finite and
    one-frame videos are caught up front (no critic runs); they and videos on which a critic fails come back
    "bad" with a reason, and the trainer scores them below every real video of their group (the release scores
    them 0, which beats a real video whenever HPS is negative). Systemic failures (out of memory, CUDA, a missing
    package) raise: the run stops instead of learning from a broken reward.
 6. DA3's GaussianAdapter is re-done here (`_gaussians_from_gs_head`): it imports evo and e3nn, which we do not
    install; we rotate the SH bands with a least-squares fit on gsplat's own SH basis instead of Wigner-D.

Install of DA3 (its pins would downgrade numpy and pull xformers/open3d; we use only its model code):
    pip install --no-deps depth-anything-3==0.1.1 && pip install addict omegaconf
Real runs also need LPIPS's AlexNet ImageNet weights (torchvision downloads alexnet-owt-7be5be79.pth into the
torch hub cache; seed that cache on offline clusters).
"""
import json
import math
import os
import time
from dataclasses import dataclass

import common  # first: the torchvision fix, before transformers / lpips import it
import torch
import torch.nn as nn
import torch.nn.functional as F

os.environ.setdefault("DA3_LOG_LEVEL", "WARN")  # DA3's logger prints an INFO line on every forward
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Our wording of the release's 3D-critic rubric (microsoft/World-R1 reward_server/reward_3d.py); {prompt} is the
# full video prompt.
META_PROMPT = (
    "You are an expert in 3D computer vision. The image is a render of the 3D reconstruction (a cloud of 3D "
    "Gaussians) of a generated video, seen from a viewpoint beside the video's own camera path. Judge the video "
    "through this render: a video with a consistent 3D world and a smooth camera that moves around the scene "
    "gives a dense, clean, complete reconstruction; a static, jittery or zoom-only video gives a sparse, noisy, "
    "flat or broken one.\nThe video was generated from the prompt: \"{prompt}\"\nGrade it from 0 to 9:\n"
    "9: excellent. Dense, clean, complete geometry, as from a smooth orbit around the scene.\n"
    "7-8: good. Clear 3D structure with strong parallax from an arcing camera.\n"
    "4-6: mediocre. Sparse, noisy or flat geometry; a pan or zoom instead of an orbit; some jitter.\n"
    "2-3: poor. Chaotic geometry or a flat 2D projection; a static camera.\n"
    "0-1: very poor. Nothing recognisable.\nAnswer with a single digit (0-9) only:")
# HPSv3's user text, byte for byte as it was trained (MizzenAI/HPSv3 hpsv3/dataset/data_collator_qwen.py INSTRUCTION
# and prompt_with_special_token; hpsv3/inference.py HPSv3RewardInferencer.prepare_batch sends
# HPSV3_INSTRUCTION.format(text_prompt=prompt) + HPSV3_REWARD_SUFFIX after the image). The trailing spaces and
# double spaces before some newlines are upstream's; the reward head is read at the <|Reward|> token.
HPSV3_INSTRUCTION = (
    "\n"
    "You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall "
    "score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 "
    "being the best. \n"
    "\n"
    "**Visual Quality:**  \n"
    "Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:\n"
    "- **Reasonableness:** The image should not contain any significant biological or logical errors, such as "
    "abnormal body structures or nonsensical environmental setups.\n"
    "- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to "
    "interpret, with no blurring or indistinct areas.\n"
    "- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual "
    "elements (e.g., hair, clothing, shadows).\n"
    "- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, "
    "composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of "
    "harmony and balance.\n"
    "- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or "
    "adult material. If such content is present, the image quality and satisfaction score should be the lowest "
    "possible. \n"
    "Textual prompt - {text_prompt}\n"
    "\n"
    "\n")
HPSV3_REWARD_SUFFIX = "\nPlease provide the overall ratings of this image: <|Reward|>\n\nEND\n"


@dataclass
class RewardModels:
    """Every critic, loaded once per process. gs_cfg: DA3 Gaussian-head settings, None when it has no GS head."""
    da3: nn.Module
    gs_cfg: dict | None
    qwen: nn.Module
    qwen_proc: object
    hps: nn.Module
    hps_proc: object
    lpips: nn.Module
    device: torch.device
    process_res: int  # DA3 input: longest side, each side then rounded to a multiple of 14
    hps_pixels: int  # HPSv3 images are resized to about this many pixels (upstream 256*28*28)


# ----------------------------------------------------------------------------------------------------------------
# Loaders (real weights) and tiny random builders

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


def load_da3(repo="depth-anything/DA3-GIANT", preset="da3-giant", device="cpu", depth=None):
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
    cfg = OmegaConf.to_container(load_config(MODEL_REGISTRY[preset]))
    gs_head, gs_adapter = cfg.pop("gs_head", None), cfg.pop("gs_adapter", None)
    with torch.device(device):  # build where it will run: no 4.5 GB random init on the host
        if depth is None:
            net = create_object(OmegaConf.create(cfg))
        else:
            net = DepthAnything3Net(_cut_dinov2(cfg["net"], depth), cfg["head"], cfg.get("cam_dec"), cfg.get("cam_enc"))
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
    if isinstance(net.backbone, _DinoV2):
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


def load_hpsv3(repo="MizzenAI/HPSv3", backbone="Qwen/Qwen2-VL-7B-Instruct", device="cpu", dtype=torch.bfloat16):
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


def load_reward_models(size="tiny", device="cpu", dtype=None, da3="depth-anything/DA3-GIANT",
                       qwen="Qwen/Qwen3-VL-4B-Instruct", hps="MizzenAI/HPSv3",
                       hps_backbone="Qwen/Qwen2-VL-7B-Instruct", seed=0, process_res=None):
    """size="tiny": random models built in code (fixed seed, no files, no network). Otherwise real weights
    (hub ids or local folders, e.g. from `save_reward_models`): the VLMs in `dtype` (bf16 on CUDA, fp32 on CPU);
    DA3 keeps fp32 weights and runs under bf16 autocast on CUDA like its own inference (its heads run in fp32
    inside), in plain fp32 on CPU; LPIPS is fp32. process_res: DA3's input size (default 56 tiny, 504 real)."""
    if size not in ("tiny", "small", "large"):
        raise ValueError(f"reward size {size!r}: choose tiny, small or large")
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
        res, hps_pixels = process_res or 56, 56 * 56
    else:
        from transformers import AutoProcessor, Qwen3VLForConditionalGeneration
        da3_net, gs_cfg = load_da3(da3, device=device)
        qwen_model = Qwen3VLForConditionalGeneration.from_pretrained(qwen, dtype=dtype).eval().requires_grad_(False)
        qwen_proc = AutoProcessor.from_pretrained(qwen)
        hps_model, hps_proc = load_hpsv3(hps, hps_backbone, device, dtype)
        lp = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=False, verbose=False)
        res, hps_pixels = process_res or 504, 256 * 28 * 28
    return RewardModels(da3=da3_net.to(device), gs_cfg=gs_cfg, qwen=qwen_model.to(device), qwen_proc=qwen_proc,
                        hps=hps_model.to(device), hps_proc=hps_proc, lpips=lp.eval().requires_grad_(False).to(device),
                        device=device, process_res=res, hps_pixels=hps_pixels)


def save_reward_models(models, folder, da3_preset="da3-giant"):
    """Write the critics in their released layouts (folder/da3, qwen, hps, hps_backbone) and return those paths
    as load_reward_models' keyword arguments: how tests run the real loaders on models built in code. DA3 must be
    the registry preset `da3_preset` or a cut of it. LPIPS is not written: the loader builds it from the lpips
    package (its AlexNet from torchvision's ImageNet weights)."""
    paths = {k: os.path.join(folder, k) for k in ("da3", "qwen", "hps", "hps_backbone")}
    save_da3(models.da3, paths["da3"], da3_preset)
    models.qwen.save_pretrained(paths["qwen"])
    models.qwen_proc.save_pretrained(paths["qwen"])
    save_hpsv3(models.hps, models.hps_proc, paths["hps"], paths["hps_backbone"])
    return paths


# ----------------------------------------------------------------------------------------------------------------
# Lift: video -> depth, cameras, 3D Gaussians

@dataclass
class Lift:
    """DA3's view of one video, at the lift resolution (h, w). Cameras are OpenCV (x right, y down, z forward)."""
    frames: torch.Tensor  # (F, 3, h, w) in [0, 1]: what the renders are compared with
    depth: torch.Tensor  # (F, h, w) z-depth
    w2c: torch.Tensor  # (F, 4, 4)
    c2w: torch.Tensor  # (F, 4, 4)
    K: torch.Tensor  # (F, 3, 3) pixel units of (h, w)
    gaussians: dict  # means (N,3), quats (N,4) wxyz, scales (N,3), opacities (N,), colors (N,3) or sh (N,K,3)


def _pixel_grid(h, w, like):
    """Pixel-centre coordinates (u, v), each (h, w): pixel (i, j) covers [j, j+1) x [i, i+1), as gsplat."""
    v, u = torch.meshgrid(torch.arange(h, dtype=like.dtype, device=like.device) + 0.5,
                          torch.arange(w, dtype=like.dtype, device=like.device) + 0.5, indexing="ij")
    return u, v


def _rays(u, v, K):
    """Camera-frame rays K^-1 [u, v, 1] with z = 1. u, v (..., h, w); K (F, 3, 3) -> (F, h, w, 3)."""
    fx, fy, cx, cy = (K[:, i, j, None, None] for i, j in ((0, 0), (1, 1), (0, 2), (1, 2)))
    return torch.stack([(u - cx) / fx, (v - cy) / fy, torch.ones_like(u - cx)], dim=-1)


def unproject_gaussians(frames, depth, K, c2w, footprint=12 ** -0.5):
    """Pixel-aligned Gaussians from z-depth: mean = c2w (depth * K^-1 [u, v, 1]), the pixel's colour, opacity 1,
    isotropic scale = `footprint` pixels at that depth (footprint * z / f); the default is the standard deviation
    of a 1-pixel box, the rasterizer's 0.3 px^2 blur closes the gaps. frames (F,3,h,w), depth (F,h,w), K (F,3,3),
    c2w (F,4,4)."""
    u, v = _pixel_grid(*depth.shape[-2:], depth)
    pts = _rays(u, v, K) * depth[..., None]  # (F, h, w, 3) camera frame
    means = torch.einsum("fij,fhwj->fhwi", c2w[:, :3, :3], pts) + c2w[:, None, None, :3, 3]
    f = 0.5 * (K[:, 0, 0] + K[:, 1, 1])
    s = (footprint * depth / f[:, None, None]).reshape(-1, 1).expand(-1, 3)
    n = s.shape[0]
    quats = torch.zeros(n, 4, dtype=depth.dtype, device=depth.device)
    quats[:, 0] = 1
    return dict(means=means.reshape(-1, 3), quats=quats, scales=s.contiguous(),
                opacities=torch.ones(n, dtype=depth.dtype, device=depth.device),
                colors=frames.permute(0, 2, 3, 1).reshape(-1, 3).to(depth.dtype))


def _sh_rotation(R, degree):
    """(F,3,3) rotations -> (F,K,K) matrices M with SH_coeffs_world = M @ SH_coeffs_cam, i.e.
    f_world(d) = f_cam(R^T d). Fitted by least squares on gsplat's own SH basis at 64 fixed directions (exact:
    each band is rotation-invariant); DA3 uses e3nn's Wigner-D here."""
    from gsplat.cuda._torch_impl import _eval_sh_bases_fast
    k = (degree + 1) ** 2
    d = F.normalize(torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=-1)
    d = d.to(R.device)
    B = _eval_sh_bases_fast(k, d)  # (64, K)
    B_rot = _eval_sh_bases_fast(k, torch.einsum("fji,nj->fni", R.double(), d))  # Y(R^T d): (F, 64, K)
    return torch.linalg.lstsq(B.expand(len(R), -1, -1), B_rot).solution.to(R.dtype)  # (F, K, K)


def _gaussians_from_gs_head(raw, opacity, depth, K, c2w, cfg):
    """DA3's GS-head outputs -> world Gaussians, as DA3's GaussianAdapter builds them (da3-giant settings).
    raw (F,h,w,C): [xy offset 2 | scale 3 | quat 4 | SH 3*K | depth offset 1]; opacity, depth (F,h,w).
    Means sit on the unit ray at (depth + offset), as DA3 does; scales are sigmoid-ranged and scaled by depth and
    the pixel footprint 0.1 (1/fx + 1/fy); quats go through DA3's own conversion so the renderer sees exactly what
    DA3's renderer sees; SH bands are damped by DA3's mask and rotated from camera to world."""
    from depth_anything_3.model.utils.transform import cam_quat_xyzw_to_world_quat_wxyz
    Fn, h, w, _ = raw.shape
    if cfg["pred_offset_depth"]:
        depth, raw = depth + raw[..., -1], raw[..., :-1]
    u, v = _pixel_grid(h, w, depth)
    if cfg["pred_offset_xy"]:
        u, v, raw = u + raw[..., 0], v + raw[..., 1], raw[..., 2:]
    ray = F.normalize(_rays(u, v, K), dim=-1)
    means = torch.einsum("fij,fhwj->fhwi", c2w[:, :3, :3], ray) * depth[..., None] + c2w[:, None, None, :3, 3]
    k = (cfg["sh_degree"] + 1) ** 2
    scale, quat, sh = raw.split([3, 4, 3 * k], dim=-1)
    lo, hi = cfg["gaussian_scale_min"], cfg["gaussian_scale_max"]
    footprint = 0.1 * (1 / K[:, 0, 0] + 1 / K[:, 1, 1])
    scales = (lo + (hi - lo) * scale.sigmoid()) * depth[..., None] * footprint[:, None, None, None]
    quat = F.normalize(quat, dim=-1).reshape(Fn, 1, h * w, 4)
    quats = torch.cat([cam_quat_xyzw_to_world_quat_wxyz(q, c.expand(1, h * w, 4, 4))[0] for q, c in zip(quat, c2w)])
    mask = torch.tensor([0.1 * 0.25 ** math.isqrt(i) if i else 1.0 for i in range(k)], device=raw.device)
    sh = sh.reshape(Fn, h, w, 3, k) * mask  # DA3's layout: (channel, band)
    sh = torch.einsum("fkj,fhwcj->fhwkc", _sh_rotation(c2w[:, :3, :3], cfg["sh_degree"]), sh)
    return dict(means=means.reshape(-1, 3), quats=quats, scales=scales.reshape(-1, 3),
                opacities=opacity.reshape(-1), sh=sh.reshape(-1, k, 3))


def _lift_size(h, w, res):
    """DA3's preprocessing size: longest side -> res, then each side to the nearest multiple of 14."""
    s = res / max(h, w)
    return max(14, round(h * s / 14) * 14), max(14, round(w * s / 14) * 14)


@torch.no_grad()
def lift(models, video):
    """video (F, 3, H, W) in [0, 1] -> Lift. DA3 is called directly on ImageNet-normalised frames (its
    `inference()` wraps fp16 autocast on CPU); its extrinsics are world-to-camera 3x4 OpenCV."""
    dev = models.device
    h, w = _lift_size(*video.shape[-2:], models.process_res)
    frames = F.interpolate(video.to(dev, torch.float32), size=(h, w), mode="bilinear", antialias=True,
                           align_corners=False).clamp(0, 1)
    mean, std = (torch.tensor(t, device=dev)[:, None, None] for t in (IMAGENET_MEAN, IMAGENET_STD))
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        out = models.da3(((frames - mean) / std)[None], infer_gs=models.gs_cfg is not None)
    depth, K = out["depth"][0].float(), out["intrinsics"][0].float()
    w2c = torch.eye(4, device=dev).repeat(len(frames), 1, 1)
    w2c[:, :3] = out["extrinsics"][0, :, :3].float()
    c2w = torch.linalg.inv(w2c)
    if models.gs_cfg is not None:
        raw = out["gaussians"]
        gs = _gaussians_from_gs_head(raw["raw_gaussians"][0].float(), raw["opacities"][0].float(), depth, K, c2w,
                                     models.gs_cfg)
    else:
        gs = unproject_gaussians(frames, depth, K, c2w)
    return Lift(frames, depth, w2c, c2w, K, gs)


def lift_from_depth(frames, depth, K, c2w):
    """A Lift from known depth and cameras (tests, and evaluate.py's oracle): Gaussians by unprojection."""
    return Lift(frames, depth, torch.linalg.inv(c2w), c2w, K, unproject_gaussians(frames, depth, K, c2w))


# ----------------------------------------------------------------------------------------------------------------
# Render: gsplat on CUDA, a pure-torch rasterizer (float64 compositing) elsewhere

RENDERER = "auto"  # set once per process by check_renderer: "auto" = gsplat for CUDA tensors, torch elsewhere


def render(gaussians, viewmats, Ks, height, width, *, backend=None, with_depth=False, chunk=4):
    """Splat Gaussians into C cameras. viewmats (C,4,4) world-to-camera, Ks (C,3,3) -> rgb (C,H,W,3),
    alpha (C,H,W,1) [, expected z-depth (C,H,W,1)]. Black background, not clamped. Same alpha rules on both
    backends (alpha = min(0.999, o exp(-sigma)), dropped below 1/255, 0.3 px^2 blur); gsplat also stops a pixel
    once its transmittance falls below 1e-4. Cameras go `chunk` at a time (gsplat holds (C, N) buffers).
    backend: "gsplat", "torch", or None for the process's RENDERER."""
    backend = backend or RENDERER
    if backend == "auto":
        backend = "gsplat" if gaussians["means"].is_cuda else "torch"
    viewmats, Ks = viewmats.to(gaussians["means"].dtype), Ks.to(gaussians["means"].dtype)
    outs = [(_render_gsplat if backend == "gsplat" else _render_torch)(
        gaussians, viewmats[i:i + chunk], Ks[i:i + chunk], height, width) for i in range(0, len(viewmats), chunk)]
    rgb, alpha, depth = (torch.cat(t) for t in zip(*outs))
    return (rgb, alpha, depth) if with_depth else (rgb, alpha)


def _render_gsplat(g, viewmats, Ks, H, W):
    from gsplat import rasterization
    f32 = lambda t: t.float()
    colors, deg = (g["sh"], math.isqrt(g["sh"].shape[1]) - 1) if "sh" in g else (g["colors"], None)
    out, alpha, _ = rasterization(f32(g["means"]), f32(g["quats"]), f32(g["scales"]), f32(g["opacities"]),
                                  f32(colors), f32(viewmats), f32(Ks), W, H, near_plane=0.01, eps2d=0.3,
                                  sh_degree=deg, packed=False, render_mode="RGB+ED", rasterize_mode="classic")
    return out[..., :3], alpha, out[..., 3:]


def _render_torch(g, viewmats, Ks, H, W, max_pairs=1 << 22):
    """Exact EWA splatting without tiles: enumerate (Gaussian, pixel) pairs inside each splat's alpha >= 1/255 box,
    sort them by pixel with Gaussians pre-sorted front to back, and composite with a segmented exclusive cumsum
    of log(1 - alpha) in float64 (float32 cancels catastrophically over long runs). Gaussians go in depth-ordered
    chunks of at most `max_pairs` pairs, carrying each pixel's transmittance, so memory stays bounded."""
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics
    means, dt, dev = g["means"], g["means"].dtype, g["means"].device
    covars, _ = _quat_scale_to_covar_preci(g["quats"], g["scales"], True, False)
    P = H * W
    rgbs, alphas, depths = [], [], []
    for view, K in zip(viewmats, Ks):
        radii, m2d, z, conic, _ = _fully_fused_projection(means, covars, view[None], K[None], W, H, eps2d=0.3,
                                                          near_plane=0.01)
        radii, m2d, z, conic = radii[0], m2d[0], z[0], conic[0]
        idx = torch.nonzero((radii > 0).all(-1))[:, 0]
        idx = idx[torch.argsort(z[idx].detach(), stable=True)]  # front to back
        if "sh" in g:
            dirs = means[idx] - torch.linalg.inv(view)[:3, 3]
            col = torch.clamp_min(_spherical_harmonics(math.isqrt(g["sh"].shape[1]) - 1, dirs, g["sh"][idx]) + 0.5, 0)
        else:
            col = g["colors"][idx]
        m2, cn_v, op, zv = m2d[idx], conic[idx], g["opacities"][idx], z[idx].double()  # visible, front to back
        # the pixel centres where alpha = o exp(-sigma) can reach 1/255: sigma <= ln(255 o), an ellipse whose
        # half-extents are sqrt(2 ln(255 o) cov_xx), sqrt(2 ln(255 o) cov_yy); tighter than gsplat's 3.33-sigma tile
        # box (3x fewer pairs for pixel-sized splats) and it drops only pairs the alpha rule zeroes anyway
        with torch.no_grad():
            a_, b_, c_ = conic[idx].unbind(-1)
            k = 2 * torch.log(255 * op.detach()).clamp_min(0) / (a_ * c_ - b_ * b_)
            rx, ry, c2 = (k * c_).sqrt(), (k * a_).sqrt(), m2.detach()
            x0 = (c2[:, 0] - rx - 0.5).ceil().clamp(0, W).long()
            x1 = (c2[:, 0] + rx - 0.5).floor().add(1).clamp(0, W).long()
            y0 = (c2[:, 1] - ry - 0.5).ceil().clamp(0, H).long()
            y1 = (c2[:, 1] + ry - 0.5).floor().add(1).clamp(0, H).long()
        bw, cnt = x1 - x0, ((x1 - x0) * (y1 - y0)).clamp_min(0)
        log_t = torch.zeros(P, dtype=torch.float64, device=dev)  # log transmittance so far, per pixel
        rgb = torch.zeros(P, col.shape[-1], dtype=torch.float64, device=dev)
        dep = torch.zeros(P, dtype=torch.float64, device=dev)
        ends = torch.cumsum(cnt, 0)
        marks = torch.tensor(range(max_pairs, int(ends[-1]) if len(ends) else 0, max_pairs), device=dev)
        cuts = torch.searchsorted(ends, marks, right=True).tolist()
        at = lambda t, i: t.index_select(0, i)  # gathers; much faster than t[i] on CPU
        for a, b in zip([0] + cuts, cuts + [len(idx)]):
            if b <= a:
                continue
            n = cnt[a:b]
            gl = torch.repeat_interleave(torch.arange(a, b, device=dev), n)  # pair -> sorted-visible index
            local = torch.arange(len(gl), device=dev) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
            w_box = at(bw, gl)
            pix = (at(y0, gl) + local // w_box) * W + at(x0, gl) + local % w_box
            pix, o = torch.sort(pix, stable=True)  # stable: each pixel's run stays front to back
            gl = at(gl, o)
            d = torch.stack([pix % W, pix // W], -1).to(dt) + 0.5 - at(m2, gl)
            cn = at(cn_v, gl)
            sigma = 0.5 * (cn[:, 0] * d[:, 0] ** 2 + cn[:, 2] * d[:, 1] ** 2) + cn[:, 1] * d[:, 0] * d[:, 1]
            alpha = torch.clamp_max(at(op, gl) * torch.exp(-sigma), 0.999)
            alpha = torch.where((sigma >= 0) & (alpha >= 1 / 255), alpha, torch.zeros_like(alpha)).double()
            la = torch.log1p(-alpha)
            ex = torch.cumsum(la, 0) - la  # exclusive cumsum over the whole chunk
            first = torch.ones_like(pix, dtype=torch.bool)
            first[1:] = pix[1:] != pix[:-1]
            start = torch.cummax(torch.where(first, torch.arange(len(pix), device=dev), 0), 0).values
            wgt = alpha * torch.exp(ex - at(ex, start) + at(log_t, pix))  # transmittance in front of each pair
            rgb = rgb.index_add(0, pix, wgt[:, None] * at(col, gl).double())
            dep = dep.index_add(0, pix, wgt * at(zv, gl))
            log_t = log_t.index_add(0, pix, la)
        acc = 1 - torch.exp(log_t)
        rgbs.append(rgb.to(dt).view(H, W, -1))
        alphas.append(acc.to(dt).view(H, W, 1))
        depths.append((dep / acc.clamp_min(1e-10)).to(dt).view(H, W, 1))
    return torch.stack(rgbs), torch.stack(alphas), torch.stack(depths)


def synthetic_scene(n=2000, device="cpu", seed=0):
    """A small random scene of coloured Gaussians 2-4 units in front of an identity camera, and 3 cameras (w2c)
    looking at it from a few degrees apart, with a 64x64 pinhole K. For renderer checks."""
    g = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 3, generator=g) * torch.tensor([2.0, 2.0, 2.0]) + torch.tensor([-1.0, -1.0, 2.0])
    quats = F.normalize(torch.randn(n, 4, generator=g), dim=-1)
    gs = dict(means=means, quats=quats, scales=torch.rand(n, 3, generator=g) * 0.03 + 0.01,
              opacities=torch.rand(n, generator=g) * 0.5 + 0.4, colors=torch.rand(n, 3, generator=g))
    w2c = torch.eye(4).repeat(3, 1, 1)
    for i, deg in enumerate((-4.0, 0.0, 4.0)):
        a = math.radians(deg)
        w2c[i, :3, :3] = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
    K = torch.tensor([[60.0, 0, 32], [0, 60.0, 32], [0, 0, 1]]).repeat(3, 1, 1)
    return {k: v.to(device) for k, v in gs.items()}, w2c.to(device), K.to(device)


def check_renderer(device, backend="auto"):
    """Build the renderer this process will use and prove it on a synthetic scene, before any training step.
    On CUDA with gsplat: its kernels are compiled on first use (torch's JIT, needs nvcc), then its render must
    match our torch rasterizer at PSNR > 40 dB. Sets RENDERER; returns a one-line summary; any failure stops the
    run with a line saying what to do (a reward with a broken renderer would train on zeros)."""
    global RENDERER
    device = torch.device(device)
    if backend == "gsplat" and device.type != "cuda":
        raise SystemExit("error: --renderer=gsplat needs a CUDA device; use --renderer=torch (or auto) on a CPU")
    use_gsplat = device.type == "cuda" and backend in ("auto", "gsplat")
    gs, w2c, K = synthetic_scene(device=device)
    try:
        ref, _ = render(gs, w2c, K, 64, 64, backend="torch")
    except Exception as e:  # the per-run boundary: a renderer that cannot run must stop the run, with the reason
        raise SystemExit(f"error: the torch Gaussian rasterizer failed on a synthetic scene ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    if not bool(torch.isfinite(ref).all()) or float(ref.amax()) <= 0:
        raise SystemExit("error: the torch Gaussian rasterizer rendered an empty or non-finite synthetic scene")
    if not use_gsplat:
        RENDERER = "torch"
        return "renderer: torch rasterizer (checked on a synthetic scene)"
    try:
        t0 = time.time()
        out, _ = render(gs, w2c, K, 64, 64, backend="gsplat")
        torch.cuda.synchronize(device)
        seconds = time.time() - t0
    except Exception as e:  # ImportError, a failed nvcc build, a CUDA error: all mean "no gsplat here"
        raise SystemExit(f"error: gsplat could not render ({type(e).__name__}: {str(e)[:200]}); install a CUDA "
                         "toolkit (nvcc) that matches torch's CUDA so gsplat can build its kernels, or pass "
                         "--renderer=torch") from None
    mse = float(((out.clamp(0, 1) - ref.clamp(0, 1)) ** 2).mean())
    psnr = 10 * math.log10(1 / max(mse, 1e-12))
    if psnr <= 40:
        raise SystemExit(f"error: gsplat and the torch rasterizer disagree on a synthetic scene (PSNR {psnr:.1f} dB "
                         "<= 40); check the gsplat build, or pass --renderer=torch")
    RENDERER = "gsplat"
    return f"renderer: gsplat, matches the torch rasterizer at {psnr:.1f} dB (first call incl. build {seconds:.1f} s)"


# ----------------------------------------------------------------------------------------------------------------
# The three 3D terms

@torch.no_grad()
def lpips_distance(models, a, b):
    """LPIPS (AlexNet) between image batches a, b (N, 3, H, W) in [0, 1] -> (N,)."""
    lp = models.lpips
    dev = next(lp.parameters()).device
    return lp(a.to(dev, torch.float32) * 2 - 1, b.to(dev, torch.float32) * 2 - 1).flatten()


@torch.no_grad()
def own_view_renders(lf):
    """All Gaussians rendered at each frame's own estimated camera: (F, 3, h, w) in [0, 1], beside lf.frames."""
    h, w = lf.frames.shape[-2:]
    rgb, _ = render(lf.gaussians, lf.w2c, lf.K, h, w)  # (F, h, w, 3)
    return rgb.clamp(0, 1).permute(0, 3, 1, 2)


@torch.no_grad()
def s_recon(models, lf):
    """1 - mean_k LPIPS(frame k, render of all Gaussians at camera k), clipped to [0, 1]."""
    return float((1 - lpips_distance(models, own_view_renders(lf), lf.frames).mean()).clamp(0, 1))


def meta_camera(c2w, depth, angle=15.0):
    """The meta view (c2w 4x4): the middle camera orbited `angle` degrees about its look-at point (on its optical
    axis at the frame's median depth d), around its own y axis, to the side the video did not go. The side: the
    sign of the net rightward motion seen from the middle camera, x-translation / d (+ net yaw when the camera
    did not translate); a path that went right gets a meta view from the left, and vice versa. c2w (F,4,4)."""
    m = len(c2w) // 2
    C = c2w[m].double()
    R, c = C[:3, :3], C[:3, 3]
    d = depth[m].double().median().clamp_min(1e-6)
    p = c + d * R[:, 2]  # look-at point
    right = (R.T @ (c2w[-1, :3, 3].double() - c2w[0, :3, 3].double()))[0] / d
    if abs(right) < 1e-3:  # no sideways travel: use the turn (yaw of the forward axis, right positive)
        fwd = [R.T @ c2w[i, :3, 2].double() for i in (0, -1)]
        right = torch.atan2(fwd[1][0], fwd[1][2]) - torch.atan2(fwd[0][0], fwd[0][2])
    phi = math.radians(angle) * (1.0 if right >= 0 else -1.0)  # +phi about y moves the camera to its left
    cp, sp = math.cos(phi), math.sin(phi)
    Ry = torch.tensor([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]], dtype=torch.float64, device=c2w.device)
    Rw = R @ Ry @ R.T  # the orbit, in world axes, about the line through p along the camera's y
    out = torch.eye(4, dtype=torch.float64, device=c2w.device)
    out[:3, :3], out[:3, 3] = Rw @ R, p + Rw @ (c - p)
    return out.to(c2w.dtype)


def _to_uint8(img):
    """(..., 3, H, W) or (H, W, 3) float in [0, 1] -> uint8, as a PNG/JPEG round trip would give."""
    return (img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def _digit_ids(tok):
    ids = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert len(set(ids)) == 10 and tok.unk_token_id not in ids, "digits must be single tokens"
    return ids


@torch.no_grad()
def qwen_grade(models, image, prompt):
    """Qwen3-VL's expected grade of `image` (3, H, W) in [0, 1] for the video prompt: one forward pass, softmax
    over the logits of the tokens "0".."9" at the answer position, E[d] / 9 in [0, 1] (no sampling)."""
    proc, model = models.qwen_proc, models.qwen
    text = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": META_PROMPT.format(prompt=prompt)}]}], add_generation_prompt=True,
        tokenize=False)
    inp = proc(text=[text], images=[_to_uint8(image)], return_tensors="pt").to(models.device)
    inp["pixel_values"] = inp["pixel_values"].to(model.dtype)
    logits = model(**inp, use_cache=False, logits_to_keep=1).logits[0, -1].float()
    p = torch.softmax(logits[_digit_ids(proc.tokenizer)], dim=0)
    return float((p * torch.arange(10, device=p.device)).sum() / 9)


@torch.no_grad()
def s_meta(models, lf, prompt, angle=15.0):
    """Qwen3-VL's grade of the render from the meta view (at the middle camera's intrinsics)."""
    h, w = lf.frames.shape[-2:]
    view = meta_camera(lf.c2w, lf.depth, angle)
    rgb, _ = render(lf.gaussians, torch.linalg.inv(view)[None], lf.K[len(lf.K) // 2][None], h, w)
    return qwen_grade(models, rgb[0].permute(2, 0, 1), prompt)


def umeyama(src, dst, with_scale=True):
    """Least-squares similarity dst ~ s R src + t (Umeyama 1991). src, dst (N, 3) -> (s, R (3,3), t (3,)).
    A degenerate src (all points equal) gives s = 1."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    U, D, Vt = torch.linalg.svd(xd.T @ xs / len(src))
    S = torch.ones(3, dtype=src.dtype, device=src.device)
    S[2] = torch.sign(torch.linalg.det(U) * torch.linalg.det(Vt))  # a rotation, never a reflection
    R = U @ torch.diag(S) @ Vt
    var = (xs ** 2).sum(1).mean()
    s = (D * S).sum() / var if with_scale and var > 1e-12 else torch.ones((), dtype=src.dtype, device=src.device)
    return s, R, mu_d - s * R @ mu_s


def geodesic_deg(R1, R2):
    """Rotation angle of R1^T R2 in degrees, (..., 3, 3) -> (...); atan2 form, accurate near 0 and 180."""
    M = R1.transpose(-1, -2) @ R2
    cos = (M.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    sin = torch.stack([M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0], M[..., 1, 0] - M[..., 0, 1]], -1)
    return torch.rad2deg(torch.atan2(sin.norm(dim=-1) / 2, cos))


def _relative(c2w):
    return torch.linalg.inv(c2w[0]) @ c2w


def _pose_error(c2w_a, c2w_b):
    """Per-frame pose error |c_a - c_b| + geo(R_a, R_b) in radians, (F, 4, 4) x2 -> (F,)."""
    return (c2w_a[:, :3, 3] - c2w_b[:, :3, 3]).norm(dim=-1) + torch.deg2rad(geodesic_deg(c2w_a[:, :3, :3],
                                                                                         c2w_b[:, :3, :3]))


def s_traj(est_c2w, req_c2w, rot_scale=10.0, scene_depth=1.0, req_depth=1000.0, kappa=0.5):
    """How well the estimated camera path follows the requested one, in [0, 1], float64 inside:

        S   = exp(-(mean_i |c_hat_i - c_i| + mean_i geo(R_hat_i, R_i)) / tau)     L2 translation + geodesic rotation
        tau = kappa max(E_0, rad(theta) / 2),   E_0 = mean_i |c_i| + geo(I, R_i)  (the error of a still camera)

    est_c2w (F, 4, 4) from Depth Anything 3 in its units, F >= 2; req_c2w (M, 4, 4) in trajectory units,
    resampled to F frames by nearest index; theta = rot_scale (degrees). Both paths are taken relative to their
    first camera (this removes DA3's world frame), then each translation is divided by its scene depth: the
    estimate's by `scene_depth` (median DA3 depth of frame 0), the request's by `req_depth` (the plane the camera
    warp moves, 1000 in noise_warp). So c_hat and c are in scene depths and no scale is fitted: a video shows
    only translation / depth (parallax) and the warp asks for exactly that, while a fitted scale would stretch a
    still or barely moving camera onto any requested path. geo is in radians: a pan of x rad and a sideways step
    of x scene depths move the image centre by the same f x pixels, so the two terms add in one unit.
    tau makes every error a fraction of what a still camera gets wrong: a still camera scores exp(-1 / kappa) =
    0.135 against every moving request (push, pan, orbit, composites alike), the exact path 1, a straight path at
    a times the speed exp(-|1 - a| / kappa) (opposite 0.018); a scene depth read k times too deep reads as speed
    1 / k. A "fixed" request (E_0 = 0) is judged as strictly as a theta-degree pan, whose still-camera error is
    rad(theta) / 2. Fewer than 2 frames, a non-finite estimate or a non-positive scene depth raise ValueError."""
    est = est_c2w.double()
    req = torch.as_tensor(req_c2w, dtype=torch.float64, device=est.device)
    n = len(est)
    if n < 2 or not torch.isfinite(est).all() or not scene_depth > 0:
        raise ValueError(f"s_traj: need >= 2 finite poses and a positive scene depth (got {n} frames, "
                         f"scene depth {scene_depth})")
    if len(req) != n:
        req = req[torch.round(torch.arange(n) * (len(req) - 1) / max(n - 1, 1)).long()]
    est, req = _relative(est), _relative(req)
    est[:, :3, 3] /= float(scene_depth)
    req[:, :3, 3] /= float(req_depth)
    err = _pose_error(est, req).mean()
    still = _pose_error(torch.eye(4, dtype=torch.float64, device=est.device).expand_as(req), req).mean()
    tau = kappa * torch.clamp(still, min=math.radians(rot_scale) / 2)
    return float(torch.exp(-err / tau))


# ----------------------------------------------------------------------------------------------------------------
# R_gen: HPSv3

@torch.no_grad()
def hpsv3_score(models, images, prompts):
    """HPSv3 mu for images (N, 3, H, W) in [0, 1] with their prompts -> (N,) float32, prompted as upstream
    (one image, then HPSV3_INSTRUCTION + HPSV3_REWARD_SUFFIX, chat template with the generation prompt). Each image
    is resized by the processor to about `hps_pixels` pixels (upstream: min_pixels = max_pixels = 256*28*28)."""
    proc, model = models.hps_proc, models.hps
    msgs = [[{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": HPSV3_INSTRUCTION.format(text_prompt=p) + HPSV3_REWARD_SUFFIX}]}]
        for p in prompts]
    texts = [proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    px = models.hps_pixels
    inp = proc(text=texts, images=list(_to_uint8(images)), return_tensors="pt", padding=True,
               size={"shortest_edge": px, "longest_edge": px}).to(models.device)
    inp["pixel_values"] = inp["pixel_values"].to(next(model.backbone.parameters()).dtype)
    return model(**inp)[:, 0].float().cpu()


# ----------------------------------------------------------------------------------------------------------------
# score: every component for a batch, never raising

def check_video(video):
    """Cheap up-front checks -> "" or why the video cannot be scored. video (F, 3, H, W)."""
    if video.ndim != 4 or video.shape[1] != 3:
        return f"bad video shape {tuple(video.shape)}"
    if not torch.isfinite(video).all():
        return "non-finite video (NaN/Inf)"
    if video.shape[0] < 2:
        return "one-frame video"
    if video.max() < 0.02:
        return "black video"
    if video.float().std() < 2 / 255:
        return "constant video"
    return ""


def is_systemic(e):
    """A failure that is not about one video's content (a missing package, memory, the GPU itself): it stops the
    run instead of scoring the video, because every later video would fail the same way."""
    return isinstance(e, (ImportError, MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in ("CUDA", "cuDNN", "NCCL", "out of memory")))


def _guard(reasons, what, fn, *args):
    """Run one critic on one video. A failure or a non-finite value gives NaN and a reason; a systemic failure
    (is_systemic) is raised."""
    try:
        v = fn(*args)
    except Exception as e:  # the per-video boundary: a critic that fails on one video's content must not stop the run
        if is_systemic(e):
            raise
        reasons.append(f"{what} failed: {type(e).__name__}: {str(e)[:160]}")
        return math.nan
    if not math.isfinite(v):
        reasons.append(f"{what} not finite")
        return math.nan
    return v


def score(models, videos, prompts, paths, dynamic=False, *, w_3d=1.0, w_gen=1.0, gen_frames=4, gen_scale=0.1,
          meta_angle=15.0, traj_rot_scale=10.0, lifts=None):
    """videos (B, F, 3, H, W) in [0, 1]; prompts list[str]; paths: requested c2w (F, 4, 4) per video or None
    (no camera words). -> dict of float32 (B,) tensors S_meta, S_recon, S_traj, R_3D, R_gen, total, a bool (B,)
    tensor "bad", and "reasons" (list[str], "" when fine). dynamic=True skips R_3D (total = R_gen).
    A video whose content cannot be scored (check_video: black, constant, non-finite, one frame) or on which a
    critic fails or returns a non-finite value is "bad": its failed terms and its total are NaN, and the trainer
    gives it a score below every real video of its group (grpo.fill_bad). A prompt without camera words has
    S_traj = 0 (defined, not bad). A systemic failure (is_systemic: out of memory, CUDA, a missing package) raises.
    lifts: a Lift per video already computed (evaluate.py), so Depth Anything 3 does not run twice."""
    if not len(videos) == len(prompts) == len(paths):
        raise ValueError(f"score: {len(videos)} videos, {len(prompts)} prompts, {len(paths)} paths; need one each")
    keys = ("S_meta", "S_recon", "S_traj", "R_gen")
    out = {k: [0.0] * len(videos) for k in keys}
    all_reasons = []
    for i, video in enumerate(videos):
        reasons = []
        try:
            bad = check_video(video)
        except Exception as e:  # not even a tensor of the right kind
            bad = f"unreadable video: {type(e).__name__}: {str(e)[:160]}"
        if bad:
            reasons.append(bad)
            for k in keys:
                out[k][i] = math.nan
        else:
            if not dynamic:
                try:
                    lf = lifts[i] if lifts is not None else lift(models, video)
                except Exception as e:  # DA3 failing on this video's content; systemic failures are raised
                    if is_systemic(e):
                        raise
                    lf = None
                    reasons.append(f"lift failed: {type(e).__name__}: {str(e)[:160]}")
                    out["S_recon"][i] = out["S_meta"][i] = out["S_traj"][i] = math.nan
                if lf is not None:
                    out["S_recon"][i] = _guard(reasons, "S_recon", s_recon, models, lf)
                    out["S_meta"][i] = _guard(reasons, "S_meta", s_meta, models, lf, prompts[i], meta_angle)
                    if paths[i] is None:
                        reasons.append("no camera words")
                    else:
                        out["S_traj"][i] = _guard(reasons, "S_traj", s_traj, lf.c2w, paths[i], traj_rot_scale,
                                                  float(lf.depth[0].median()))
            k = min(gen_frames, len(video))
            out["R_gen"][i] = gen_scale * _guard(reasons, "HPSv3", lambda: float(
                hpsv3_score(models, video[:k], [prompts[i]] * k).mean()))
        reason = "; ".join(r for r in reasons if r)
        if reason and reason != "no camera words":  # that one is a defined S_traj = 0; train.py says it once
            print(f"[reward] video {i} ({prompts[i][:60]!r}): {reason}", flush=True)
        all_reasons.append(reason)
    res = {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}
    for k in ("S_meta", "S_recon", "S_traj"):
        res[k] = res[k].clamp(0, 1)
    res["R_3D"] = res["S_meta"] + res["S_recon"] + res["S_traj"]
    res["total"] = res["R_gen"] if dynamic else w_3d * res["R_3D"] + w_gen * res["R_gen"]
    res["bad"] = ~torch.isfinite(res["total"])
    res["reasons"] = all_reasons
    return res


# ----------------------------------------------------------------------------------------------------------------
# Toy reward for learning tests

def toy_reward(latents):
    """Mean of the final latents' first channel: (B, 16, T, h, w) -> (B,). Only for train.py's learning test.

    It scores latents, not pixels, on purpose: the random tiny VAE decodes every latent to nearly the same video
    (its norms wash out latent offsets; a unit shift moves the mean colour by ~0.003), so a pixel reward would
    test the VAE, not the RL loop. A latent channel's mean is a target the policy can reach by a steady shift of
    its velocity, so the reward must rise if log-probs, advantages and updates are right."""
    return latents.float()[:, 0].mean(dim=(1, 2, 3)).cpu()


if __name__ == "__main__":  # tiny models on a random video: every component and the time per stage
    import time
    t0 = time.time()
    models = load_reward_models("tiny")
    t1 = time.time()
    videos = torch.rand(2, 9, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    r = score(models, videos, ["a cat in a room"] * 2, [None, torch.eye(4, dtype=torch.float64).repeat(9, 1, 1)])
    t2 = time.time()
    print({k: v.tolist() if torch.is_tensor(v) else v for k, v in r.items()})
    print(f"load {t1 - t0:.1f}s, score(2 videos of 9x64x64) {t2 - t1:.1f}s")
