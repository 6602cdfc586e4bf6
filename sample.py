"""
Sample videos from Wan2.1 with our own denoising loop: camera words -> warped noise -> ODE/SDE steps -> VAE -> mp4.
Imports common, grpo (the SDE step), models (Wan), standins (tiny's Wan) and noise_warp (camera noise). Its
commands: README.md.

The loop in `denoise` is the one loop of the project: inference (UniPC, the checkpoint's scheduler), GRPO
rollouts (Euler ODE with an SDE window, log-probs recorded, the group branching at the window) and evaluation all
run through it, so what we train is what we sample. We borrow diffusers' Wan model classes, not its pipeline.
"""
import common  # noqa: F401  (first: the CPU torchvision fix must run before diffusers imports torchvision)

import argparse
import copy
import errno
import html
import json
import os
import re
import sys
import time
import uuid

import imageio
import torch
from tqdm import tqdm

import grpo
import models
import noise_warp
import standins

LORA_FILE = "pytorch_lora_weights.safetensors"  # what train.py exports and diffusers' load_lora_weights reads
PEFT_FILES = ("adapter_model.safetensors", "adapter_config.json")  # peft's save_pretrained (flow_grpo, the release)
SAMPLING_FILE = "sampling.json"  # beside train.py's export: how the LoRA was trained to sample (train.py writes it)
SAMPLING = ("size", "model", "frames", "height", "width", "text_len", "sample_steps", "guidance", "negative_prompt",
            "warp_mode", "warp_strength")  # its keys: the flags of this script that it sets
GUIDANCE = 5.0  # classifier-free guidance of Wan2.1's pipeline and of the release's rollouts
MAX_TEXT_LEN = 512  # Wan2.1's UMT5 text length (the pipeline's max_sequence_length): the most tokens a prompt gives
BAR_DELAY = 5.0  # train.py and evaluate.py: a denoising loop shows its bar once it has run this long (real sizes)

# -----------------------------------------------------------------------------
# Prompts -> UMT5 embeddings

def clean_prompt(text):
    """What Wan's pipeline does to a prompt before tokenizing: unescape HTML twice, collapse whitespace."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text))).strip()


@torch.no_grad()
def encode(wan, prompts, text_len):
    """prompts: list[str] -> (B, text_len, D) UMT5 states, zeroed after each prompt's true length (as Wan)."""
    tok = wan.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=text_len,
                        truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    device = next(wan.text_encoder.parameters()).device
    ids, mask = tok.input_ids.to(device), tok.attention_mask.to(device)
    states = wan.text_encoder(ids, mask).last_hidden_state  # (B, L, D)
    return states * mask[..., None].to(states.dtype)


@torch.no_grad()
def encode_all(wan, prompts, text_len, batch=16):
    """{prompt: (n_tokens, D) UMT5 states} on the host, each trimmed to its true length (the rest is zeros): encode
    every prompt of a run once, then free the text encoder. pad_tokens restores encode's (text_len, D) exactly."""
    out = {}
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        lengths = wan.tokenizer([clean_prompt(p) for p in chunk], max_length=text_len, truncation=True,
                                add_special_tokens=True).input_ids
        for p, n, states in zip(chunk, map(len, lengths), encode(wan, chunk, text_len)):
            out[p] = states[:n].cpu()
    return out


def encode_once(wan, prompts, text_len):
    """encode_all of every prompt a run can draw (duplicates once), then the text encoder leaves the device: UMT5-XXL
    is 11 GB of bf16 that would otherwise sit idle beside the policy. -> {prompt: (n_tokens, D)} on the host."""
    embeddings = encode_all(wan, sorted(set(prompts)), text_len)
    del wan.text_encoder
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return embeddings


def pad_tokens(states, text_len):
    """(n, D) -> (text_len, D), zeros after the n tokens (as encode returns them)."""
    return torch.cat([states, states.new_zeros(text_len - len(states), states.shape[-1])])


# -----------------------------------------------------------------------------
# Noise: plain Gaussian, or transported along the camera path the prompt names

def latent_shape(frames, height, width):
    """Video (F, H, W) -> Wan2.1 latent (16, (F - 1)/4 + 1, H/8, W/8)."""
    return (16, (frames - 1) // 4 + 1, height // 8, width // 8)


def camera_noise(prompt, shape, generator, warp_mode="init", warp_strength=None, warp_scale=noise_warp.WARP_SCALE,
                 degradation=noise_warp.DEGRADATION, device=None):
    """Initial latent (1, 16, T, h, w) and the per-step injection for the prompt's camera words.

    warp_mode "init" (the paper): x0 = blend(base, warped, λ), λ = warp_strength (default 1: the warped noise,
    which already carries `degradation` fresh noise); no injection.
    warp_mode "stepwise" (the release): x0 = base; after each of the first 8 steps a low-passed, unit-std
    (warped − base) is added with weights ∝ linspace(1, 0.1, 8), then x is re-standardised (microsoft/World-R1
    scripts/train_world_r1.py); λ = warp_strength, default 0.35 (the release's value for Wan2.1-1.3B).
    A prompt with no camera words (or warp_mode "none") gives plain noise. Returns (x0, inject or None, motions).
    """
    base = torch.randn((1, *shape), generator=generator, device=device)
    motions = noise_warp.parse_camera(prompt) if warp_mode != "none" else []
    if not motions:
        return base, None, motions
    warped = noise_warp.warped_noise(motions, shape, generator, warp_scale=warp_scale, degradation=degradation,
                                     device=device)[None]
    if warp_mode == "init":
        return noise_warp.blend(base, warped, 1.0 if warp_strength is None else warp_strength), None, motions
    delta = noise_warp.lowpass_delta(warped, base)
    weights = noise_warp.stepwise_weights(8).tolist()
    strength = models.SIZES["small"]["stepwise_strength"] if warp_strength is None else warp_strength

    def inject(i, x):
        return noise_warp.inject_stepwise(x, delta, weights[i], strength) if i < len(weights) else x
    inject.steps = len(weights)  # denoise turns UniPC's corrector off after these steps, so the injection stays
    return base, inject, motions


# -----------------------------------------------------------------------------
# The sampling loop

def flow_sigmas(steps, shift):
    """Wan's flow-matching noise levels: σ_k = shift·s / (1 + (shift − 1)·s), s = 1 − k/steps, k = 0..steps.
    (steps + 1,) float32 from 1 to 0; the same grid as the checkpoint's UniPC flow sigmas."""
    s = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float()


def velocity(transformer, x, sigma, cond, uncond, guidance, timestep=None):
    """Classifier-free-guided velocity v = v_u + g·(v_c − v_u), both passes in one batch.
    x: (B, 16, T, h, w) fp32; cond, uncond: (B, L, D); sigma: a float or (B,) (train.py mixes window steps in
    one batch); timestep defaults to 1000·σ (taken in float64, as the pipeline does) and stays fp32 (the time
    embedder is fp32; bf16 would round t = 937.1 to 936). Latents and text go in the transformer's compute dtype.
    Returns fp32 (B, ...)."""
    dtype = models.compute_dtype(transformer)
    t = torch.as_tensor(1000 * torch.as_tensor(sigma, dtype=torch.float64) if timestep is None else timestep,
                        device=x.device).float().expand(x.shape[0])
    t = torch.cat([t, t])
    out = transformer(hidden_states=torch.cat([x, x]).to(dtype), timestep=t,
                      encoder_hidden_states=torch.cat([cond, uncond]).to(dtype), return_dict=False)[0].float()
    v_cond, v_uncond = out.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


@torch.no_grad()
def denoise(transformer, x, cond, uncond, sigmas, guidance, *, scheduler=None, window=(), noise_level=0.7,
            sde_noise="sd3", branch_at=None, group_size=1, generator=None, inject=None, progress=False, delay=0.0):
    """Integrate x from σ = sigmas[0] to 0. Step i moves σ_i -> σ_{i+1}:
      - i in `window`: Flow-GRPO SDE step (grpo.sde_step), transition (x, x_next, log p) recorded;
      - else, with `scheduler`: its multistep update (UniPC, the inference default; its own sigmas);
      - else Euler: x + (σ_{i+1} − σ_i)·v  (the rollout ODE).
    At i == branch_at the batch is repeated group_size times: the group shares the ODE prefix, then branches.
    inject(i, x) -> x runs after step i (the release's stepwise camera guidance). progress: a tqdm bar over the
    steps, shown once the loop has run `delay` seconds (train.py and evaluate.py: only where sampling is slow).
    x: (B, 16, T, h, w) fp32; cond, uncond: (B, L, D). Returns (x at σ = 0, the window's transitions stacked: a dict
    with x, x_next (W, B', 16, T, h, w), log_prob (W, B') and step (W,) the step indices; None without a window).
    """
    if scheduler is not None:  # UniPC keeps state across steps: work on a fresh copy at its own sigmas
        scheduler = copy.deepcopy(scheduler)
        scheduler.set_timesteps(len(sigmas) - 1, device=x.device)
        sigmas = scheduler.sigmas
        # UniPC's corrector rebuilds step i's result from the sample *before* step i, which would undo an injection
        # made after step i (measured: 0.55% of the effect Euler keeps). Off after the injected steps, the predictor
        # starts from the injected sample, as Euler does.
        scheduler.disable_corrector = list(range(getattr(inject, "steps", 0)))
    recorded = []  # (step, x, x_next, log p) of each window step
    for i in tqdm(range(len(sigmas) - 1), desc="denoise", disable=not progress, leave=False, delay=delay):
        if i == branch_at:
            x, cond, uncond = (t.repeat_interleave(group_size, 0) for t in (x, cond, uncond))
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if i in window:
            v = velocity(transformer, x, sigma, cond, uncond, guidance)
            x_next, logp, _, _ = grpo.sde_step(x, v, sigma, sigma_next, noise_level, sigma_max=float(sigmas[1]),
                                               generator=generator, schedule=sde_noise)
            recorded.append((i, x, x_next, logp))
        elif scheduler is not None:
            t = scheduler.timesteps[i]
            v = velocity(transformer, x, sigma, cond, uncond, guidance, timestep=t)
            x_next = scheduler.step(v, t, x, return_dict=False)[0]
        else:
            v = velocity(transformer, x, sigma, cond, uncond, guidance)
            x_next = x + (sigma_next - sigma) * v
        x = inject(i, x_next) if inject is not None else x_next
    if not recorded:
        return x, None
    steps, xs, x_nexts, logps = zip(*recorded)
    return x, dict(step=torch.tensor(steps), x=torch.stack(xs), x_next=torch.stack(x_nexts),
                   log_prob=torch.stack(logps))


def rollout(transformer, cond, uncond, noise, sigmas, guidance, *, group_size, window_start, window_size=2,
            noise_level=0.7, sde_noise="sd3", generator=None, inject=None, progress=False, delay=0.0):
    """Flow-GRPO-Fast rollout of one prompt's group: one Euler ODE prefix to `window_start`, then group_size
    branches through `window_size` SDE steps, each finished by ODE. All branches run as one batch.
    cond, uncond: (1, L, D); noise: (1, 16, T, h, w). Returns final latents (G, 16, T, h, w) and the window's
    transitions stacked: x, x_next (window_size, G, 16, T, h, w), log_prob (window_size, G), step (window_size,)."""
    window = range(window_start, window_start + window_size)
    assert window_start >= 0 and window.stop <= len(sigmas) - 1, f"window {window} outside {len(sigmas) - 1} steps"
    return denoise(transformer, noise, cond, uncond, sigmas, guidance, window=window, noise_level=noise_level,
                   sde_noise=sde_noise, branch_at=window_start, group_size=group_size, generator=generator,
                   inject=inject, progress=progress, delay=delay)


def step_log_prob(transformer, x, x_next, sigma, sigma_next, cond, uncond, guidance, *, noise_level, sigma_max,
                  sde_noise="sd3"):
    """Log-prob (B,) of stored transitions x -> x_next under the current transformer (with grad, with CFG),
    plus the step mean and std for the KL. For train.py; the same math as the rollout's SDE steps."""
    v = velocity(transformer, x, sigma, cond, uncond, guidance)
    _, logp, mean, std = grpo.sde_step(x, v, sigma, sigma_next, noise_level, sigma_max=sigma_max, prev_sample=x_next,
                                       schedule=sde_noise)
    return logp, mean, std


@torch.no_grad()
def decode(vae, latents):
    """Latents (B, 16, T, h, w) -> video (B, F, 3, H, W) in [0, 1]: un-normalise with the VAE's per-channel
    latent mean/std, decode, map [-1, 1] -> [0, 1]. One video at a time: the Wan VAE's activations at 480x832
    grow with the batch (several GB per video in fp32), and a group of 8 at once would not fit beside the rest."""
    mean = torch.tensor(vae.config.latents_mean, device=latents.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, device=latents.device).view(1, -1, 1, 1, 1)
    videos = []
    for z in latents.split(1):
        video = vae.decode((z * std + mean).to(vae.dtype), return_dict=False)[0]  # (1, 3, F, H, W)
        videos.append((video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4))
    return torch.cat(videos)


def generate(wan, prompt, seed, *, frames, height, width, sample_steps, text_len, guidance=GUIDANCE, sampler="unipc",
             negative_prompt="", warp_mode="init", warp_strength=None, warp_scale=noise_warp.WARP_SCALE,
             degradation=noise_warp.DEGRADATION, progress=False, delay=0.0, embeddings=None):
    """One prompt -> video (F, 3, H, W) in [0, 1]. Deterministic per seed on the CPU (all draws from one generator;
    on CUDA see docs/DESIGN.md, Determinism).
    embeddings: {prompt: states} from encode_all (holding `prompt` and `negative_prompt`), so a caller that encoded
    its prompts up front can free the text encoder; else the prompt is encoded here."""
    device = next(wan.transformer.parameters()).device
    generator = torch.Generator(device).manual_seed(seed)
    if embeddings is None:
        cond, uncond = encode(wan, [prompt, negative_prompt], text_len).chunk(2)
    else:
        cond, uncond = (pad_tokens(embeddings[q], text_len)[None].to(device) for q in (prompt, negative_prompt))
    x, inject, _ = camera_noise(prompt, latent_shape(frames, height, width), generator, warp_mode, warp_strength,
                                warp_scale, degradation, device)
    sigmas = flow_sigmas(sample_steps, wan.scheduler.config.flow_shift)
    x, _ = denoise(wan.transformer, x, cond, uncond, sigmas, guidance, generator=generator, inject=inject,
                   scheduler=wan.scheduler if sampler == "unipc" else None, progress=progress, delay=delay)
    return decode(wan.vae, x)[0]


def save_video(path, video, fps=16):
    """video (F, 3, H, W) in [0, 1] -> H.264 mp4 (Wan2.1 makes 16 fps video). Written under a fresh hidden name,
    read back (ffmpeg counts its frames) and only then renamed to `path`: ffmpeg does not tell its caller when a
    write fails (a full disk), so without the count a cut, unplayable file would pass. Raises OSError then, and
    leaves no file behind."""
    import imageio_ffmpeg
    frames = (video.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{uuid.uuid4().hex[:8]}.{name}")  # still .mp4: ffmpeg picks the container by it
    try:
        imageio.mimwrite(tmp, frames, fps=fps, codec="libx264", macro_block_size=1, ffmpeg_log_level="quiet")
        try:
            written = imageio_ffmpeg.count_frames_and_secs(tmp)[0]
        except (OSError, RuntimeError):  # no readable video at all
            written = 0
        if written != len(frames):
            raise OSError(errno.EIO, f"ffmpeg wrote {written} of its {len(frames)} frames; is the disk full?")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# -----------------------------------------------------------------------------
# LoRA adapters and prompts, checked before any sampling

def lora_layout(folder, flag="--lora"):
    """A LoRA folder -> (its weights file, the prefix of its keys before the module names). Two layouts:
    train.py's (diffusers: LORA_FILE, keys `transformer.<module>.lora_A.weight`, its LoraConfig in the file's
    metadata) and peft's save_pretrained (PEFT_FILES: keys `base_model.model.<module>.lora_A.weight`, the LoraConfig
    in adapter_config.json), in which flow_grpo and the World-R1 release publish theirs."""
    if not os.path.isdir(folder):
        common.fail(f"{flag}={folder} is not a folder; pass one exported by train.py")
    if os.path.isfile(os.path.join(folder, LORA_FILE)):
        return os.path.join(folder, LORA_FILE), "transformer."
    if os.path.isfile(os.path.join(folder, PEFT_FILES[0])):
        if not os.path.isfile(os.path.join(folder, PEFT_FILES[1])):
            common.fail(f"{flag}={folder} has {PEFT_FILES[0]} but no {PEFT_FILES[1]} (peft's LoRA settings); copy "
                        "both files of the adapter")
        return os.path.join(folder, PEFT_FILES[0]), "base_model.model."
    common.fail(f"{flag}={folder} has no {LORA_FILE} (train.py's export) and no {' + '.join(PEFT_FILES)} (peft's "
                "save_pretrained); pass a LoRA folder")


def check_lora_file(folder, flag="--lora"):
    """Before any model loads: `folder` holds a readable LoRA (lora_layout) whose tensors are all finite and include
    `<prefix><module>.lora_A/B` ones. Tensors are read one at a time (LoRAs are small)."""
    from safetensors import SafetensorError, safe_open

    path, prefix = lora_layout(folder, flag)
    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
            for key in keys:
                t = f.get_tensor(key)
                if not torch.isfinite(t).all():
                    common.fail(f"{flag}: tensor {key} of {path} is not finite (NaN or inf); the training run "
                                "that wrote it diverged, use an earlier checkpoint")
    except (SafetensorError, OSError) as e:
        common.fail(f"{flag}: {path} is not a readable safetensors file ({e}); it may be truncated, re-copy it")
    if not any(k.startswith(prefix) and ".lora_" in k for k in keys):
        common.fail(f"{flag}: {path} holds no {prefix}*.lora_A/B tensors "
                    f"({f'first key {keys[0]}' if keys else 'no tensors'}); pass a folder exported by train.py")


def sampling_settings(folder, flag="--lora"):
    """{flag: value} of the LoRA folder's SAMPLING_FILE (how its run sampled: size, video, sample_steps, guidance,
    negative prompt, camera warp), {} where there is none (a peft folder); unreadable -> one line."""
    path = os.path.join(folder, SAMPLING_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except (OSError, ValueError) as e:
        common.fail(f"{flag}: {path} is not readable JSON ({e}); delete it to sample with this script's defaults")
    if not isinstance(settings, dict):
        common.fail(f"{flag}: {path} must hold a JSON object; delete it to sample with this script's defaults")
    return {k: v for k, v in settings.items() if k in SAMPLING}


def load_lora(transformer, folder, flag="--lora"):
    """Load a LoRA folder of either layout (lora_layout) into `transformer` (diffusers' load_lora_adapter) and prove
    it landed: each `<prefix><module>.lora_{A,B}.weight` of the file must afterwards equal the model's
    `<module>.lora_{A,B}.<adapter>.weight`. None -> error (sampling would silently use the base model); some -> a
    warning with the counts. A file naming no module of this model stops before loading. Returns the adapter name."""
    import warnings

    from diffusers.utils import logging as diffusers_logging
    from safetensors import safe_open

    path, prefix = lora_layout(folder, flag)
    with safe_open(path, "pt") as f:
        keys = {k.removeprefix(prefix): k for k in f.keys() if k.startswith(prefix) and ".lora_" in k}
    modules = {name for name, _ in transformer.named_modules()}
    targets = {k.split(".lora_")[0] for k in keys}
    if not targets & modules:
        common.fail(f"{flag}={folder}: none of its {len(targets)} LoRA layers exist in this model (e.g. "
                    f"{min(targets)}); was it trained on another model?")
    before = set(getattr(transformer, "peft_config", {}))
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # its multi-line notes; we report in one line
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if prefix == "transformer.":  # its LoraConfig rides in the file's metadata
                transformer.load_lora_adapter(folder, prefix="transformer", weight_name=LORA_FILE)
            else:  # peft's: the same tensors under diffusers' names, the LoraConfig from adapter_config.json
                from peft import LoraConfig
                from safetensors.torch import load_file
                config = LoraConfig.from_pretrained(folder).to_dict()
                weights = {"transformer." + k.removeprefix(prefix): t for k, t in load_file(path).items()
                           if k.startswith(prefix) and ".lora_" in k}
                transformer.load_lora_adapter(weights, prefix="transformer",
                                              metadata={f"transformer.{k}": v for k, v in config.items()})
    except (RuntimeError, ValueError) as e:
        common.fail(f"{flag}={folder} does not fit this model ({str(e).splitlines()[0]})")
    finally:
        diffusers_logging.set_verbosity(verbosity)
    adapter = (set(transformer.peft_config) - before).pop()
    params = dict(transformer.named_parameters())
    landed = 0
    with safe_open(path, "pt") as f:
        for short, key in keys.items():
            module, kind, leaf = short.rsplit(".", 2)  # blocks.0.attn1.to_q, lora_A, weight
            p = params.get(f"{module}.{kind}.{adapter}.{leaf}")
            t = f.get_tensor(key)
            landed += p is not None and p.shape == t.shape and torch.equal(p.detach().cpu(), t.to(p.dtype))
    if landed == 0:
        common.fail(f"{flag}={folder}: none of its {len(keys)} LoRA tensors loaded into the model; sampling would "
                    "use the base model")
    if landed < len(keys):
        missing = targets - modules
        why = (f"{len(missing)} of {len(targets)} layers missing, e.g. {min(missing)}" if missing else
               "the rest differ in shape or value once loaded")
        warn(f"{flag}={folder}: only {landed} of {len(keys)} LoRA tensors match this model ({why}); the rest is "
             "ignored")
    return adapter


def camera_warnings(prompts, warp_mode="init"):
    """Start-up warnings over all prompts, one line per kind (count + first example): camera words the parser
    does not know (noise_warp.unknown_camera_words), and prompts naming no camera at all."""
    lines = []
    odd = [(i, words) for i, prompt in enumerate(prompts) if (words := noise_warp.unknown_camera_words(prompt))]
    if odd:
        lines.append(f"{len(odd)} of {len(prompts)} prompt(s) use camera words the parser does not know (e.g. "
                     f"#{odd[0][0]}: {', '.join(repr(w) for w in odd[0][1])}), which steer nothing; the known "
                     f"phrases are: {', '.join(noise_warp.VALID_PHRASES)}")
    flagged = {i for i, _ in odd}
    plain = [i for i, prompt in enumerate(prompts) if i not in flagged and not noise_warp.parse_camera(prompt)]
    if warp_mode != "none" and plain:
        lines.append(f"{len(plain)} of {len(prompts)} prompt(s) name no camera motion (e.g. #{plain[0]}: "
                     f"{prompts[plain[0]][:60]!r}) and get plain Gaussian noise; start a prompt with e.g. "
                     "'Camera orbit left.' to steer the camera")
    return lines


def length_warning(tokenizer, prompts, text_len):
    """A line if any prompt is longer than `text_len` UMT5 tokens (special tokens counted, as `encode` counts
    them), which `encode` cuts; else None."""
    ids = tokenizer([clean_prompt(p) for p in prompts], add_special_tokens=True, truncation=False,
                    verbose=False).input_ids
    counts = [len(x) for x in ids]
    cut = [i for i, n in enumerate(counts) if n > text_len]
    if not cut:
        return None
    longest = max(cut, key=lambda i: counts[i])
    return (f"{len(cut)} of {len(prompts)} prompt(s) are longer than --text_len={text_len} tokens and are cut "
            f"(longest: #{longest}, {counts[longest]} tokens); raise --text_len or shorten them")


def warn(line):
    """A start-up warning: one line on stderr, from rank 0 only."""
    common.print0(f"warning: {line}", file=sys.stderr)


# -----------------------------------------------------------------------------
# Command line

def check_video_size(frames, height, width):
    """Wan2.1's VAE compresses time 4x (plus the first frame) and space 8x; the transformer patches 2x2."""
    if frames < 1 or (frames - 1) % 4:
        common.fail(f"--frames={frames} must be 4k+1 (e.g. 9, 17, 81)")
    for name, v in (("height", height), ("width", width)):
        if v <= 0 or v % 16:
            common.fail(f"--{name}={v} must be a positive multiple of 16 (e.g. 480, 832)")


def check_text_len(text_len):
    """--text_len pads every prompt to that many tokens: beyond MAX_TEXT_LEN it is padding the model never saw,
    and the text encoder's attention memory grows with its square (an absurd value would exhaust the host)."""
    if text_len > MAX_TEXT_LEN:
        common.fail(f"--text_len={text_len} is more than {MAX_TEXT_LEN} tokens, the text length Wan2.1 was trained "
                    f"with; use at most {MAX_TEXT_LEN}")


# What --warp_strength means when unset (the help of every script that has the flag).
WARP_STRENGTH = ("1 with --warp_mode=init (the warped noise whole), the size's λ with stepwise ("
                 + ", ".join(f"{size} {c['stepwise_strength']}" for size, c in models.SIZES.items()) + ")")


def warp_strength(size, warp_mode, strength):
    """--warp_strength as given; unset in stepwise mode, the size's λ (models.SIZES stepwise_strength); unset in
    init mode, None (camera_noise then takes the warped noise whole)."""
    if strength is None and warp_mode == "stepwise":
        return models.SIZES[size]["stepwise_strength"]
    return strength


def check_model_arg(model):
    """A path-like --model must be a diffusers folder (a hub id is checked when it loads)."""
    if model is not None and (model.startswith((".", "/")) or os.path.exists(model)) \
            and not os.path.isfile(os.path.join(model, "model_index.json")):
        common.fail(f"--model={model} is not a diffusers folder (no model_index.json)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description="Generate videos with Wan2.1 and camera-warped noise.",
                                formatter_class=common.HelpFormatter)
    p.add_argument("--size", choices=list(models.SIZES), default="tiny",
                   help="preset: tiny (random, CPU), toy (the trained toy world, CPU), small, large")
    p.add_argument("--model", default=None, help=models.SIZE_HELP["model"])
    p.add_argument("--lora", default=None,
                   help=f"LoRA folder: train.py's export (its {SAMPLING_FILE}, how it was trained to sample, gives the "
                        f"defaults of {', '.join('--' + k for k in SAMPLING)}) or peft's save_pretrained")
    p.add_argument("--prompt", default=None, help="text prompt; camera words like 'Camera orbit left.' steer it")
    p.add_argument("--prompts", default=None, help="file with one prompt per line (then --out is a folder)")
    p.add_argument("--negative_prompt", default="", help="negative prompt for classifier-free guidance")
    p.add_argument("--out", default=None, help="output: an mp4 for --prompt (unset: out.mp4), a folder for --prompts "
                                               "(unset: videos/)")
    p.add_argument("--seed", type=int, default=0, help="seed of prompt 0; prompt i uses seed + i")
    for name in ("sample_steps", "frames", "height", "width"):
        p.add_argument(f"--{name}", type=int, default=None, help=models.SIZE_HELP[name])
    p.add_argument("--guidance", type=float, default=GUIDANCE, help="classifier-free guidance scale")
    p.add_argument("--sampler", choices=["unipc", "euler"], default="unipc",
                   help="unipc (the checkpoint's scheduler) or the Euler ODE")
    p.add_argument("--warp_mode", choices=["init", "stepwise", "none"], default="init",
                   help="camera noise: init (warp the initial noise, paper), stepwise (release), none")
    p.add_argument("--warp_strength", type=float, default=None,
                   help="init: blend weight of the warped noise; stepwise: λ. Unset: " + WARP_STRENGTH)
    p.add_argument("--warp_scale", type=int, default=noise_warp.WARP_SCALE, help="noise warp grid = latent grid x this")
    p.add_argument("--degradation", type=float, default=noise_warp.DEGRADATION,
                   help="fresh-noise share mixed into warped noise")
    p.add_argument("--text_len", type=int, default=None, help=models.SIZE_HELP["text_len"])
    p.add_argument("--fps", type=int, default=16, help="frames per second of the mp4")
    args = common.parse_flags(p, argv, models.SIZES)
    if args.lora is not None:  # sample as the LoRA was trained: its sampling.json, then the flags given here
        check_lora_file(args.lora)
        if trained := sampling_settings(args.lora):
            words = common.config_argv(p, trained, os.path.join(args.lora, SAMPLING_FILE))
            args = common.parse_flags(p, words + argv, models.SIZES)
            print(f"--lora: sampling as trained ({', '.join(f'{k}={v!r}' for k, v in trained.items() if v is not None)}"
                  f"; {SAMPLING_FILE}), flags given here override it", flush=True)

    # Validate everything before any model loads.
    check_video_size(args.frames, args.height, args.width)
    common.check_numbers(args, positive=("sample_steps", "warp_scale", "text_len", "fps"),
                         nonnegative=("warp_strength", "degradation"), finite=("guidance",))
    check_text_len(args.text_len)
    noise_warp.check_warp_memory(args.height, args.width, args.warp_scale)
    if args.degradation > 1:
        common.fail(f"--degradation={args.degradation} must be in [0, 1]")
    if (args.prompt is None) == (args.prompts is None):
        common.fail("give exactly one of --prompt \"...\" or --prompts FILE")
    common.check_text(args.negative_prompt, "--negative_prompt")
    if args.prompt is not None:
        if not common.check_text(args.prompt, "--prompt").strip():
            common.fail("--prompt is empty; describe the video, e.g. --prompt \"Camera pan left. A harbour.\"")
        args.out = args.out or "out.mp4"
        prompts, outs = [args.prompt.strip()], [common.check_writable_file(args.out, "--out", [".mp4"])]
    else:
        prompts, args.out = common.read_lines(args.prompts, "--prompts"), args.out or "videos"
        if args.out.lower().endswith(".mp4"):
            common.fail(f"--out={args.out} names a file, but --prompts writes one video per line: pass a folder")
        common.check_writable_dir(args.out, "--out")
        outs = [os.path.join(args.out, f"{i:04d}.mp4") for i in range(len(prompts))]
    check_model_arg(args.model)
    args.warp_strength = warp_strength(args.size, args.warp_mode, args.warp_strength)
    for line in camera_warnings(prompts, args.warp_mode):
        warn(line)

    _, _, _, device = common.setup_dist()
    t0 = time.time()
    wan = standins.wan_for_run(args.size, args.model, device)
    if args.lora is not None:
        load_lora(wan.transformer, args.lora)
    if line := length_warning(wan.tokenizer, prompts, args.text_len):
        warn(line)
    print(f"loaded {args.model or 'the tiny random Wan2.1'}" + (f" + {args.lora}" if args.lora else "")
          + f" on {device} in {time.time() - t0:.1f} s", flush=True)
    t0 = time.time()
    for i, (prompt, out) in enumerate(zip(prompts, outs)):
        video = generate(wan, prompt, args.seed + i, frames=args.frames, height=args.height, width=args.width,
                         sample_steps=args.sample_steps, guidance=args.guidance, sampler=args.sampler,
                         text_len=args.text_len, negative_prompt=args.negative_prompt, warp_mode=args.warp_mode,
                         warp_strength=args.warp_strength, warp_scale=args.warp_scale,
                         degradation=args.degradation, progress=True)
        try:
            save_video(out, video, args.fps)
        except OSError as e:
            common.fail(f"cannot write {out} ({common.why(e)})" + (f"; the {i} video(s) before it are complete" if i
                                                                    else ""))
        print(f"wrote {out}  video {tuple(video.shape)} (F, 3, H, W)  {time.time() - t0:.1f} s")
        t0 = time.time()


if __name__ == "__main__":
    common.exit_on_signal("stopped; every video reported written is complete")
    main(sys.argv[1:])
