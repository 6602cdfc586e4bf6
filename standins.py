"""
Stand-ins for the released networks and their files, so that everything runs with no download: the tiny random
networks of --size=tiny (tests, CPU smoke runs), the real architectures with random weights (bench.py, train.py
--random_weights: real-size costs), a stand-in reward (train.py --reward=latent), and writers of the released
on-disk layouts (how tests run models.py's real loaders on networks built here; how toyworld.py writes its own).
Imports common and models (the network classes and loaders the stand-ins mirror).
"""
import json
import os

import common  # first: the torchvision fix, before transformers / diffusers / lpips import it
import torch
import torch.nn as nn

import models


# -----------------------------------------------------------------------------
# Wan2.1: tiny, built in code


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


def build_tiny(seed=0):
    """A Wan2.1-architecture model with random weights, built in code (no download): ~40k-param transformer,
    ~70k-param VAE (its brightness following latent channel 0: `rewire_tiny_vae`), ~23k-param UMT5 and an
    in-memory T5 tokenizer. Same seed, same weights."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = models.word_tokenizer(TINY_WORDS)
    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)).eval()
    torch.manual_seed(seed + 1)
    vae = rewire_tiny_vae(AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                                  temperal_downsample=[False, True, True]).eval())
    torch.manual_seed(seed + 2)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()
    return models.Wan(tokenizer, text_encoder, transformer, vae, models.wan_scheduler())


@torch.no_grad()
def rewire_tiny_vae(vae, gain=3.0, texture=0.3):
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


def tiny_wan(device, dtype=None):
    """--size=tiny's Wan2.1 (`build_tiny`) on `device`, cast as models.load_wan casts a checkpoint: the transformer and
    text encoder in `dtype` (default: models.resolve_dtype) but diffusers' fp32 modules, the VAE in fp32."""
    dtype = dtype or models.resolve_dtype(None, device)
    wan = build_tiny()
    wan.text_encoder.to(dtype)
    models.keep_in_fp32(wan.transformer, dtype)
    for m in (wan.text_encoder, wan.transformer, wan.vae):
        m.to(device).requires_grad_(False)
    return wan


# -----------------------------------------------------------------------------
# The critics and evaluate.py's networks: tiny, built in code


def build_tiny_da3():
    """Random DA3 (ViT 32-wide, DualDPT, camera decoder, GS head; 0.4M parameters). The camera decoder's last
    layers start near identity pose and a 57 deg FOV: fully random ones predict FOV ~ 0 (focal 3.5e7)."""
    from depth_anything_3.model.da3 import DepthAnything3Net
    from depth_anything_3.model.dinov2.vision_transformer import DinoVisionTransformer
    obj = lambda name, path: {"__object__": dict(path="depth_anything_3.model." + path, name=name, args="as_params")}
    dpt = dict(dim_in=64, features=16, out_channels=[8, 16, 32, 32])
    vit = DinoVisionTransformer(img_size=56, patch_size=14, embed_dim=32, depth=8, num_heads=2, alt_start=4,
                                qknorm_start=4, rope_start=4, cat_token=True)
    net = DepthAnything3Net(models.DinoV2(vit, (1, 3, 5, 7)),
                            head={**obj("DualDPT", "dualdpt"), **dpt, "output_dim": 2},
                            cam_dec={**obj("CameraDec", "cam_dec"), "dim_in": 64},
                            cam_enc={**obj("CameraEnc", "cam_enc"), "dim_out": 32})
    gs_adapter = dict(sh_degree=2, pred_color=False, pred_offset_depth=True, pred_offset_xy=True,
                      gaussian_scale_min=1e-5, gaussian_scale_max=1.0)  # giant: 30, too big for random heads
    net, gs_cfg = models.attach_gs_head(net, {**obj("GSDPT", "gsdpt"), **dpt, "output_dim": 38}, gs_adapter)
    dec = net.cam_dec
    with torch.no_grad():
        for lin, bias in ((dec.fc_t, [0.0, 0, 0]), (dec.fc_qvec, [0.0, 0, 0, 1]), (dec.fc_fov[0], [1.0, 1.0])):
            lin.weight.mul_(0.02)
            lin.bias.copy_(torch.tensor(bias))
    return net.requires_grad_(False), gs_cfg


QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")  # ids 151643.. in Qwen's vocab


def byte_tokenizer(extra=(), real_ids=False):
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


def vision_token_ids(tok):
    ids = tok.convert_tokens_to_ids
    return dict(image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"))


def build_tiny_qwen():
    """Random Qwen3-VL (2 layers, 64 wide) with a local tokenizer and processor (patch 16, merge 2)."""
    from transformers import (Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor, Qwen3VLVideoProcessor)
    tok = byte_tokenizer()
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
        **vision_token_ids(tok))
    return Qwen3VLForConditionalGeneration(cfg).eval().requires_grad_(False), proc


def small_hpsv3(tok, width, layers, vision_width, vision_depth, mrope_section):
    """An untrained HPSv3Reward on a small Qwen2-VL (language model `layers` x `width`, 4 heads, 2 KV heads; vision
    tower `vision_depth` x `vision_width`, patch 14, merge 2) and a processor around `tok`, which must hold
    <|Reward|> and Qwen's vision tokens (byte_tokenizer). -> (model, processor). tiny's HPSv3 and the toy world's."""
    from transformers import Qwen2VLConfig, Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor
    kw = dict(patch_size=14, merge_size=2, temporal_patch_size=2)
    proc = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), video_processor=Qwen2VLVideoProcessor(**kw),
                            tokenizer=tok, chat_template=TINY_CHAT_TEMPLATE)
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=None, eos_token_id=None,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": mrope_section}),
        vision_config=dict(depth=vision_depth, embed_dim=vision_width, hidden_size=width, num_heads=4, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
        **vision_token_ids(tok))
    return models.HPSv3Reward(cfg, tok.convert_tokens_to_ids("<|Reward|>")), proc


def build_tiny_hpsv3():
    """Random HPSv3 (Qwen2-VL backbone 2 layers, 64 wide, patch 14) with a local tokenizer and processor."""
    model, proc = small_hpsv3(byte_tokenizer(extra=("<|Reward|>",)), 64, 2, 32, 2, [2, 3, 3])
    return model.eval().requires_grad_(False), proc


def tiny_reward_models(device="cpu", dtype=None, seed=0, process_res=None):
    """--size=tiny's critics: random DA3 (with its Gaussian head), Qwen3-VL, HPSv3 and LPIPS AlexNet, built in code
    from a fixed seed without disturbing the caller's random stream; dtype as models.load_reward_models."""
    import lpips
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        da3, gs_cfg = build_tiny_da3()
        qwen, qwen_proc = build_tiny_qwen()
        hps, hps_proc = build_tiny_hpsv3()
        lp = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False)  # random AlexNet
    return models.RewardModels(da3=da3.to(device), gs_cfg=gs_cfg, qwen=qwen.to(device), qwen_proc=qwen_proc,
                               hps=hps.to(device), hps_proc=hps_proc, lpips=lp.eval().requires_grad_(False).to(device),
                               device=device, process_res=process_res or models.SIZES["tiny"]["lift_res"],
                               hps_pixels=models.SIZES["tiny"]["hps_pixels"])


def build_tiny_dino(seed=0):
    """Random ViT with DINO ViT-B/16's architecture family (2 layers, 32 wide, patch 8): no download."""
    from transformers import ViTConfig, ViTModel
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                  image_size=32, patch_size=8), add_pooling_layer=False).eval()


# -----------------------------------------------------------------------------
# The real architectures with random weights (bench.py, train.py --random_weights): real-size costs


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
    module that holds it). Weights of 2+ dims ~ N(0, 0.02^2) (transformers' initializer_range), other
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
                            tokenizer=byte_tokenizer(real_ids=True), chat_template=TINY_CHAT_TEMPLATE)
    hps = Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**QWEN2_VL_IMAGES),
                           video_processor=Qwen2VLVideoProcessor(**QWEN2_VL_IMAGES),
                           tokenizer=byte_tokenizer(extra=("<|Reward|>",), real_ids=True),
                           chat_template=TINY_CHAT_TEMPLATE)
    return qwen, hps


def random_reward_models(device, dtype=torch.bfloat16, depth=None, process_res=models.SIZES["small"]["lift_res"]):
    """The real-size critics with random weights: DA3-giant (its registry preset, with its Gaussian head) in fp32,
    Qwen3-VL-4B and HPSv3 on Qwen2-VL-7B in `dtype` (the reward head in fp32), LPIPS AlexNet; the released
    processors (`real_processors`). depth: every decoder and vision stack cut to that many blocks, widths and
    vocabularies as released, except where the index lists need more: DA3's backbone keeps four out layers
    (models.cut_dinov2: at least 4 blocks) and Qwen3-VL's vision tower its three DeepStack taps (at least 3,
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
            da3, gs_cfg = models.load_da3(None, device="cpu", depth=depth)
    else:
        da3, gs_cfg = models.load_da3(None, device=device, depth=depth)
    with common.build_in(device, dtype):
        qwen = random_hf(lambda: Qwen3VLForConditionalGeneration(
            Qwen3VLConfig(**q3, **vision_token_ids(qwen_proc.tokenizer))))
        hps = random_hf(lambda: models.HPSv3Reward(
            Qwen2VLConfig(**q2, **vision_token_ids(hps_proc.tokenizer)),
            hps_proc.tokenizer.convert_tokens_to_ids("<|Reward|>")))
    hps.rm_head.float()  # as load_hpsv3: the head stays fp32
    return models.RewardModels(
        da3=da3, gs_cfg=gs_cfg, qwen=qwen.eval().requires_grad_(False), qwen_proc=qwen_proc,
        hps=hps.eval().requires_grad_(False), hps_proc=hps_proc,
        lpips=lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval().to(device),
        device=torch.device(device), process_res=process_res, hps_pixels=models.SIZES["small"]["hps_pixels"])


# -----------------------------------------------------------------------------
# The networks a run gets: stand-ins where its size or flags ask for them, models.py's loaders otherwise

def wan_for_run(size, model, device, dtype=None, *, random_weights=False, depth=None):
    """The Wan2.1 of train.py, evaluate.py, sample.py and bench.py: the size's real architecture with random weights
    (random_weights, cut to `depth` blocks), tiny's stand-ins (model None), else models.load_wan(model). dtype: the
    networks' weights (default: models.resolve_dtype)."""
    dtype = dtype or models.resolve_dtype(None, device)
    if random_weights:
        return random_wan(size, device, dtype, depth=depth)
    if model is None:
        return tiny_wan(device, dtype)
    return models.load_wan(model, device, dtype)


def critics_for_run(size, device, dtype=None, *, random_weights=False, depth=None, process_res=None):
    """The reward models of those scripts: the real architectures with random weights (random_weights), tiny's
    stand-ins (size tiny), else models.load_reward_models(size). process_res: DA3's input side (default: the size's
    lift_res)."""
    process_res = process_res or models.SIZES[size]["lift_res"]
    if random_weights:
        return random_reward_models(device, dtype or models.resolve_dtype(None, device), depth=depth,
                                    process_res=process_res)
    if size == "tiny":
        return tiny_reward_models(device, dtype, process_res=process_res)
    return models.load_reward_models(size, device, dtype, process_res=process_res)


# -----------------------------------------------------------------------------
# A stand-in reward (train.py --reward=latent)

def latent_reward(latents):
    """Mean of the final latents' first channel: (B, 16, T, h, w) -> (B,). For train.py's fast tests of the RL loop
    alone: a latent channel's mean is a target the policy reaches by a steady shift of its velocity, so the reward
    must rise if log-probs, advantages and updates are right."""
    return latents.float()[:, 0].mean(dim=(1, 2, 3)).cpu()


# -----------------------------------------------------------------------------
# The released on-disk layouts, written (what models.py's loaders read)


def save_pretrained(wan, folder):
    """Write a diffusers folder (model_index.json + one subfolder per part) that `load_wan(folder)` and
    diffusers' WanPipeline.from_pretrained both read: how tests exercise the real loading path."""
    from diffusers import WanPipeline

    WanPipeline(tokenizer=wan.tokenizer, text_encoder=wan.text_encoder, vae=wan.vae, transformer=wan.transformer,
                scheduler=wan.scheduler).save_pretrained(folder)


def save_da3(net, folder, preset="da3-giant"):
    """Write `net` (a registry preset's DepthAnything3Net, or its `models.cut_dinov2` cut) as the hub repos lay it out:
    config.json naming the preset (+ "depth" for a cut backbone) and model.safetensors as huggingface_hub's
    save_model writes DA3's wrapper: the network under `model.`, tensors shared by the heads stored once."""
    from safetensors.torch import save_model
    os.makedirs(folder, exist_ok=True)
    cfg = {"model_name": preset}
    if isinstance(net.backbone, models.DinoV2) and preset != "toy":
        cfg["depth"] = len(net.backbone.pretrained.blocks)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f)
    holder = nn.Module()
    holder.model = net
    save_model(holder, os.path.join(folder, "model.safetensors"))


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
