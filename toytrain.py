"""
The toy world's training stages, each a plain PyTorch loop that resumes where it stopped: the VAE, the base model
(text encoder + transformer, rectified flow), Depth Anything 3, the judge, the preference model (HPSv3's
architecture, for R_gen), and what the build measures on held-out ground truth. `python toyworld.py` runs them in
order (toyworld.main); the world they learn from (scenes, renderer, corruptions, data sets) is toyworld.py.
Imports toyworld, and models, reward and standins (the networks, the reward's input preparation, the writers).
"""
import math
import os

import torch
import torch.nn.functional as F

from toyworld import (COLOURS, FOCAL, MOTIONS, SCALES, SCENE_DEPTH, SHAPES, TARGET_Z, WORDS, Scene, fork_pool,
                      judge_videos, make_dataset, sample_scene, to_unit)

# -----------------------------------------------------------------------------
# The loop every stage runs

SAVE_EVERY = 250  # steps between a stage's saves: a kill loses at most this many (a minute or two of any stage)


def resumable(path, modules, optimizer, steps, step_fn, *, lr, seed, warmup=100, log_every=100, name=""):
    """Run step_fn(step) -> loss (a scalar tensor) for `steps` AdamW steps, warm-up then cosine decay to 10% of lr.
    Every SAVE_EVERY steps the modules, the optimizer and the loss of every step so far go to `path` (written to a
    temporary name, then renamed), and a run killed at any point resumes from there. Batches come from step-seeded
    generators (batch_ids), and whatever step_fn draws from torch's global generator (the VAE's posterior samples,
    dropout) from the global generator seeded with (seed, step): a resumed stage ends with the weights of an
    unbroken one, bit for bit, whatever the process drew before it."""
    import time
    start, losses = 0, []
    if os.path.exists(path):
        state = torch.load(path, weights_only=True)
        for k, m in modules.items():
            m.load_state_dict(state[k])
        optimizer.load_state_dict(state["optimizer"])
        start, losses = int(state["step"]), state["losses"].tolist()
        print(f"[{name}] resumed at step {start}", flush=True)
    t0, recent = time.time(), []
    with torch.random.fork_rng(devices=[]):  # the caller's global generator is left as it was
        for step in range(start, steps):
            torch.manual_seed(seed * 1_000_003 + 500_000 + step)  # apart from batch_ids' seeds (steps < 500k)
            scale = min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
            for group in optimizer.param_groups:
                group["lr"] = lr * scale
            loss = step_fn(step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
            optimizer.step()
            recent.append(loss.item())
            losses.append(recent[-1])
            if (step + 1) % log_every == 0 or step == steps - 1:
                print(f"[{name}] step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                      f"({(time.time() - t0) / (step + 1 - start):.3f} s/step)", flush=True)
                recent = []
            if (step + 1) % SAVE_EVERY == 0 or step == steps - 1:
                state = {k: m.state_dict() for k, m in modules.items()}
                torch.save({**state, "optimizer": optimizer.state_dict(), "step": step + 1,
                            "losses": torch.tensor(losses)}, path + ".tmp")
                os.replace(path + ".tmp", path)


def batch_ids(n, size, seed, step):
    """`size` indices into n examples for one step: a pure function of (seed, step), so resumes draw the same."""
    return torch.randint(n, (size,), generator=torch.Generator().manual_seed(seed * 1_000_003 + step))


def vae_loss(vae, x):
    """x (B, 3, F, H, W) in [-1, 1]: MSE + 0.5 L1 + 10 x chroma MSE + 1e-6 KL. The chroma term (each pixel minus
    its grey level) keeps a small VAE from trading colour for brightness: without it red, yellow and blue objects
    decode as similar browns."""
    post = vae.encode(x).latent_dist
    y = vae.decode(post.sample()).sample
    chroma = lambda t: t - t.mean(1, keepdim=True)  # noqa: E731
    kl = 0.5 * (post.mean ** 2 + post.var - 1 - post.logvar).mean()
    return F.mse_loss(y, x) + 0.5 * F.l1_loss(y, x) + 10 * F.mse_loss(chroma(y), chroma(x)) + 1e-6 * kl


def train_vae(vae, data, path, *, images, clips, seed=0):
    """The VAE: single frames first (a 1-frame clip costs a ninth of a 9-frame one and carries most of what the
    VAE must learn), then whole clips (the causal temporal layers). images, clips: (steps, batch)."""
    videos = data["video"]  # (N, F, 3, H, W) uint8
    n, frames = videos.shape[:2]
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)

    def step_fn(step):
        if step < images[0]:
            ids = batch_ids(n, images[1], seed, step)
            k = batch_ids(frames, images[1], seed + 1, step)
            x = to_unit(videos[ids, k])[:, :, None]  # (B, 3, 1, H, W)
        else:
            x = to_unit(videos[batch_ids(n, clips[1], seed, step)]).transpose(1, 2)  # (B, 3, F, H, W)
        return vae_loss(vae, x * 2 - 1)
    vae.train()
    resumable(path, {"vae": vae}, opt, images[0] + clips[0], step_fn, lr=1e-3, seed=seed, name="vae")
    vae.eval()


@torch.no_grad()
def encode_videos(vae, videos, batch=32):
    """uint8 videos (N, F, 3, H, W) -> the VAE posterior means (N, 16, T, h, w) and the decoded reconstructions
    (uint8, same shape as the input): the latents the base model learns, the videos its critics and judge see."""
    latents, recons = [], []
    for chunk in videos.split(batch):
        x = to_unit(chunk).transpose(1, 2) * 2 - 1
        z = vae.encode(x).latent_dist.mean
        y = vae.decode(z).sample.clamp(-1, 1)
        latents.append(z)
        recons.append(((y.transpose(1, 2) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(latents), torch.cat(recons)


def psnr(a, b):
    """PSNR in dB of float images in [0, 1] (mean over everything)."""
    return float(10 * torch.log10(1 / F.mse_loss(a.float(), b.float()).clamp_min(1e-10)))


def tokenize(tokenizer, captions, text_len):
    """Captions -> (ids, mask), each (N, text_len), as sample.encode tokenizes them."""
    tok = tokenizer(captions, padding="max_length", max_length=text_len, truncation=True, add_special_tokens=True,
                    return_attention_mask=True, return_tensors="pt")
    return tok.input_ids, tok.attention_mask


def train_t2v(wan, latents, captions, path, steps, batch, *, text_len, drop=0.1, seed=0):
    """The base model: rectified flow on normalised VAE latents, the text encoder trained with the transformer.
        x_sigma = (1 - sigma) x_0 + sigma eps, v_target = eps - x_0,  loss = |v(x_sigma, 1000 sigma, text) - v_target|^2
    sigma = shift s / (1 + (shift - 1) s), s ~ U(0, 1): the noise levels of the sampler's shifted grid
    (sample.flow_sigmas). A `drop` share of captions is replaced by the empty prompt, the unconditional input of
    classifier-free guidance (train.py's negative prompt is empty too). Peak learning rate 1e-3 for 4,000 steps
    (BUILD): 2,000 steps at 5e-4 gave a base model whose videos follow their camera words 25% of the time (the
    judge, 60 held-out captions), 4,000 at 1e-3 one that follows them 90% of the time (BENCHMARKS.md)."""
    ids, mask = tokenize(wan.tokenizer, list(captions), text_len)
    empty_ids, empty_mask = tokenize(wan.tokenizer, [""], text_len)
    shift = wan.scheduler.config.flow_shift
    params = list(wan.transformer.parameters()) + list(wan.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

    def step_fn(step):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step + 7)
        idx = batch_ids(len(latents), batch, seed, step)
        x0 = latents[idx]
        eps = torch.randn(x0.shape, generator=gen)
        s = torch.rand(batch, generator=gen)
        sigma = (shift * s / (1 + (shift - 1) * s)).view(-1, 1, 1, 1, 1)
        keep = (torch.rand(batch, generator=gen) >= drop)[:, None]
        tok_ids, tok_mask = torch.where(keep, ids[idx], empty_ids), torch.where(keep, mask[idx], empty_mask)
        states = wan.text_encoder(tok_ids, tok_mask).last_hidden_state * tok_mask[..., None]
        v = wan.transformer(hidden_states=(1 - sigma) * x0 + sigma * eps, timestep=1000 * sigma.flatten(),
                            encoder_hidden_states=states, return_dict=False)[0]
        return F.mse_loss(v, eps - x0)
    wan.transformer.train(), wan.text_encoder.train()
    resumable(path, {"transformer": wan.transformer, "text_encoder": wan.text_encoder}, opt, steps, step_fn,
              lr=1e-3, seed=seed, warmup=200, name="t2v")
    wan.transformer.eval(), wan.text_encoder.eval()


def da3_input(frames):
    """Frames (B, F, 3, h, w) in [0, 1] -> Depth Anything 3's input, exactly as reward.lift prepares it: resized to
    the lift size (bilinear, antialiased), ImageNet-normalised."""
    import models
    import reward
    B, Fn = frames.shape[:2]
    h, w = reward.lift_size(*frames.shape[-2:], models.SIZES["toy"]["lift_res"])
    x = F.interpolate(frames.flatten(0, 1), size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    mean, std = (torch.tensor(t)[:, None, None] for t in (reward.IMAGENET_MEAN, reward.IMAGENET_STD))
    return ((x.clamp(0, 1) - mean) / std).view(B, Fn, 3, h, w)


def relative(c2w):
    """Poses relative to the first: inv(c2w_0) c2w_k, (B, F, 4, 4)."""
    return torch.linalg.inv(c2w[:, :1]) @ c2w


def geodesic(Ra, Rb):
    """Angle (radians) of the rotation between Ra and Rb (..., 3, 3): acos((tr(Ra^T Rb) - 1) / 2). A training loss,
    so not noise_warp.geodesic_deg: its atan2 form takes the norm of a vector that is 0 where the rotations agree,
    whose gradient is undefined there; the clamped acos has a finite one."""
    cos = ((Ra.transpose(-1, -2) @ Rb).diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    return torch.acos(cos.clamp(-1 + 1e-6, 1 - 1e-6))


def da3_losses(net, frames, depth, c2w):
    """Depth Anything 3 against the truth of toy videos, frames (B, F, 3, h, w) in [0, 1], depth (B, F, h, w),
    c2w (B, F, 4, 4): |log depth error| (depth resized to the lift size); for frames 1.. the geodesic angle
    (radians) between predicted and true rotations relative to frame 0 and the distance between relative
    translations (in scene depths; DA3's world frame is its reference view's, so only relative poses are
    defined); |log focal error|. Returns the four terms."""
    x = da3_input(frames)
    out = net(x)  # the reference view chosen as reward.lift has it chosen
    size = x.shape[-2:]
    d_true = F.interpolate(depth.float(), size=size, mode="bilinear", align_corners=False)
    l_depth = (out["depth"].clamp_min(1e-4).log() - d_true.log()).abs().mean()
    w2c = torch.eye(4).repeat(*out["extrinsics"].shape[:2], 1, 1)
    w2c[..., :3, :] = out["extrinsics"]
    rel, rel_true = relative(torch.linalg.inv(w2c))[:, 1:], relative(c2w.float())[:, 1:]
    l_rot = geodesic(rel[..., :3, :3], rel_true[..., :3, :3]).mean()
    l_trans = (rel[..., :3, 3] - rel_true[..., :3, 3]).norm(dim=-1).mean() / SCENE_DEPTH
    focal = FOCAL * size[1]
    l_focal = (out["intrinsics"][..., 0, 0].log() - math.log(focal)).abs().mean()
    return l_depth, l_rot, l_trans, l_focal


def train_da3(net, videos, recon, depth, c2w, path, steps, batch, *, seed=0):
    """Depth Anything 3 on toy videos with their true depth and cameras, half of each batch as rendered and half as
    the reward sees them (decoded by the VAE, which blurs the floor's texture in every frame after the first).
    The rendered half teaches features that track texture between frames; from decoded videos alone the camera
    decoder stays at the mean pose (measured: no fall of the rotation error in 500 steps). Corrupted videos are
    included: their cameras and per-frame depths are exact all the same."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
    half = (torch.arange(batch) < batch // 2)[:, None, None, None, None]

    def step_fn(step):
        idx = batch_ids(len(videos), batch, seed, step)
        frames = to_unit(torch.where(half, videos[idx], recon[idx]))
        l_depth, l_rot, l_trans, l_focal = da3_losses(net, frames, depth[idx], c2w[idx])
        return l_depth + 10 * l_rot + 10 * l_trans + l_focal
    net.train()
    resumable(path, {"da3": net}, opt, steps, step_fn, lr=1e-3, seed=seed, warmup=100, name="da3")
    net.eval().requires_grad_(False)




# -----------------------------------------------------------------------------
# The judge's training (the judge itself, used by evaluate.py only: toyworld.Judge)

MIRROR = {"move_left": "move_right", "move_right": "move_left", "orbit_left": "orbit_right",
          "orbit_right": "orbit_left", "pan_left": "pan_right", "pan_right": "pan_left"}  # a video seen in a mirror


def mirror(video, camera):
    """The video flipped left-right and its camera-motion labels swapped to match (an orbit left seen in a mirror is
    an orbit right); doubles the judge's data."""
    swap = torch.tensor([MOTIONS.index(MIRROR.get(m, m)) for m in MOTIONS])
    return video.flip(-1), swap[camera]


def jitter(video, gen, pixels=3):
    """Augmentation for the judge that keeps both labels: each video (B, F, 3, H, W) shifted by up to `pixels` in
    x and y, the same shift in every frame with the edges repeated (a framing, not a motion)."""
    b, f, c, h, w = video.shape
    padded = F.pad(video.reshape(b, f * c, h, w), (pixels,) * 4, mode="replicate")
    dy, dx = torch.randint(2 * pixels + 1, (2, b), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)]).view(b, f, c, h, w)


def native_bf16():
    """Whether this CPU multiplies bf16 in hardware: AMX tiles (Intel Sapphire Rapids on) or AVX512-BF16 dot
    products (AMD Zen 4 on, Intel Cooper Lake). The judge's 3-D convolutions train 2.4x (AVX512-BF16) to 3x (AMX)
    faster under bf16 autocast there (BENCHMARKS.md); torch has no public query for either."""
    return torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()


def train_judge(judge, videos, consistent, camera, path, steps, batch, *, seed=0, bf16=None):
    """The judge on ground-truth toy videos (decoded by the VAE, as generated videos are), half of them mirrored, all
    shifted a little (jitter): binary cross-entropy for 'consistent rigid scene', cross-entropy over the 9 camera
    motions. `bf16` (default: native_bf16()) runs the forward pass under bf16 autocast: 2-3x faster per step than
    float32 where the CPU multiplies bf16 natively, at the same held-out accuracy; elsewhere oneDNN emulates bf16 and
    a step is 2x (AVX-512) to 9x (AVX2) slower than float32 (BENCHMARKS.md). The judge is used in float32
    (judge_videos)."""
    bf16 = native_bf16() if bf16 is None else bf16
    print(f"[judge] forward pass in {'bf16' if bf16 else 'float32'}", flush=True)
    opt = torch.optim.AdamW(judge.parameters(), lr=1e-3, weight_decay=0.01)

    def step_fn(step):
        idx = batch_ids(len(videos), batch, seed, step)
        x, cam = to_unit(videos[idx]), camera[idx]
        flip = torch.rand(batch, generator=torch.Generator().manual_seed(seed + step)) < 0.5
        xf, camf = mirror(x, cam)
        x, cam = torch.where(flip[:, None, None, None, None], xf, x), torch.where(flip, camf, cam)
        x = jitter(x, torch.Generator().manual_seed(seed * 1_000_003 + step + 7))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logit, motion = judge(x)
        return (F.binary_cross_entropy_with_logits(logit.float(), consistent[idx].float())
                + F.cross_entropy(motion.float(), cam))
    judge.train()
    resumable(path, {"judge": judge}, opt, steps, step_fn, lr=1e-3, seed=seed, warmup=100, name="judge")
    judge.eval().requires_grad_(False)




# -----------------------------------------------------------------------------
# The preference model: HPSv3's architecture trained on toy pairs, so R_gen has something to grade at the toy size

def build_hpsv3(seed=0):
    """The toy world's HPSv3, untrained: models.HPSv3Reward on a Qwen2-VL whose language model is 4 layers 128 wide
    and whose vision tower is 4 blocks 64 wide (patch 14, merge 2: a 32x32 frame resized to the toy hps_pixels,
    112x112, is 16 tokens); 1.1M parameters. The tokenizer is byte-level (standins.byte_tokenizer) plus one token
    per caption word and one per constant piece of HPSv3's prompt: byte by byte, the instruction alone is ~1,900
    tokens that tell a toy model nothing and would be most of its cost. -> (model, processor)."""
    import reward
    import standins
    from tokenizers import AddedToken
    tok = standins.byte_tokenizer(extra=("<|Reward|>",))
    head, tail = reward.HPSV3_INSTRUCTION.split("{text_prompt}")
    before, after = reward.HPSV3_REWARD_SUFFIX.split("<|Reward|>")
    tok.add_tokens([AddedToken(t, normalized=False) for t in (head, tail + before, after)]
                   + [AddedToken(w, single_word=True, normalized=False) for w in WORDS + ["user", "assistant"]])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return standins.small_hpsv3(tok, 128, 4, 64, 4, [8, 4, 4])


def edit_scene(scene, gen):
    """The scene with one thing changed, as a text-to-video model misreads a caption: one object's colour, shape or
    size, or (in a scene of two or three) one object left out."""
    from dataclasses import replace
    things = list(scene.things)
    i = int(torch.randint(len(things), (1,), generator=gen))
    what = int(torch.randint(4 if len(things) > 1 else 3, (1,), generator=gen))
    if what == 3:
        del things[i]
    else:
        key, pool = (("colour", list(COLOURS)), ("shape", list(SHAPES)), ("scale", list(SCALES)))[what]
        others = [v for v in pool if v != getattr(things[i], key)]
        things[i] = replace(things[i], **{key: others[int(torch.randint(len(others), (1,), generator=gen))]})
    return Scene(things)


def preference_data(vae, n, seed):
    """n consistent, camera-following ground-truth videos and, with the same camera, each one's edited scene
    (edit_scene), both decoded by the VAE as generated videos are: uint8 'video' and 'edited' (n, F, 3, H, W),
    and the captions of the unedited scenes."""
    gen = torch.Generator().manual_seed(seed)
    scenes = [sample_scene(gen) for _ in range(n)]
    clean = dict(corrupt=0.0, wrong_camera=0.0)
    true = make_dataset(n, seed, mix=clean, scenes=scenes)  # same seed: the same motions for both
    edited = make_dataset(n, seed, mix=clean, scenes=[edit_scene(s, gen) for s in scenes])
    return dict(video=encode_videos(vae, true["video"])[1], edited=encode_videos(vae, edited["video"])[1],
                caption=true["caption"])


# What a preferred frame is preferred to, for the same caption: the frame of the edited scene (the caption is
# misread), a frame of another scene (the caption is ignored), the frame blurred (detail lost), and the frame
# smeared into a colour field (what an RL policy found when nothing graded quality: DA3 reconstructs a smooth
# field well and S_recon rose while the scene dissolved). One kind per pair, each equally often.
NEGATIVES = ("edited", "other", "blurred", "smeared")


def blur(frames, sigma):
    """Gaussian blur of frames (N, 3, H, W), one sigma (pixels) per frame, reflecting at the border."""
    r = 9
    x = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (x / sigma[:, None]) ** 2)
    k = k / k.sum(1, keepdim=True)  # (N, 2r + 1)
    n, c, h, w = frames.shape
    y = F.pad(frames.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    kk = k.repeat_interleave(c, 0)  # (N * 3, 2r + 1)
    y = F.conv2d(y, kk[:, None, None, :], groups=n * c)
    return F.conv2d(y, kk[:, None, :, None], groups=n * c).reshape(n, c, h, w)


def negatives(data, ids, frame, kinds, gen):
    """The dispreferred frame of each pair (ids, frame, kinds: (B,) indices) -> floats (B, 3, H, W) in [0, 1]."""
    pos = to_unit(data["video"][ids, frame])
    other = (ids + 1 + torch.randint(len(data["video"]) - 1, ids.shape, generator=gen)) % len(data["video"])
    weak = blur(pos, 0.8 + 1.2 * torch.rand(len(ids), generator=gen))
    gain = 0.6 + 0.8 * torch.rand(len(ids), 3, 1, 1, generator=gen)
    smear = (blur(pos, 2.5 + 3.5 * torch.rand(len(ids), generator=gen)) * gain).clamp(0, 1)
    choices = torch.stack([to_unit(data["edited"][ids, frame]), to_unit(data["video"][other, frame]), weak, smear])
    return choices[kinds, torch.arange(len(ids))]


def preference_loss(hps, proc, pos, neg, captions, pixels):
    """Bradley-Terry on HPSv3's mu: -log sigmoid(mu(pos) - mu(neg)), mean over the pairs (B, 3, H, W) each."""
    import reward
    inp = reward.hpsv3_inputs(proc, torch.cat([pos, neg]), captions * 2, pixels)
    mu = hps(**inp)[:, 0]
    return -F.logsigmoid(mu[:len(pos)] - mu[len(pos):]).mean()


def train_preference(hps, proc, data, path, steps, batch, *, pixels, seed=0):
    """The preference model on pairs of frames for one caption: its own scene's frame over one of NEGATIVES."""
    opt = torch.optim.AdamW(hps.parameters(), lr=5e-4, weight_decay=0.01)
    n, frames = data["video"].shape[:2]

    def step_fn(step):
        ids, frame = batch_ids(n, batch, seed, step), batch_ids(frames, batch, seed + 1, step)
        kinds = batch_ids(len(NEGATIVES), batch, seed + 2, step)
        neg = negatives(data, ids, frame, kinds, torch.Generator().manual_seed(seed + step))
        return preference_loss(hps, proc, to_unit(data["video"][ids, frame]), neg,
                               [data["caption"][i] for i in ids], pixels)
    hps.train()
    resumable(path, {"hps": hps}, opt, steps, step_fn, lr=5e-4, seed=seed, warmup=100, name="hps")
    hps.eval().requires_grad_(False)


@torch.no_grad()
def calibrate_preference(hps, proc, data, pixels, top=10.0, seed=0):
    """Score every held-out frame 4 against each kind of negative; report the pairwise accuracy per kind; then fold
    an affine map into the head's last layer so the held-out preferred frames average `top` and the dispreferred
    ones 0: HPSv3's own range, so R_gen = gen_scale * mu sits beside R_3D as it does in the real run."""
    import reward
    n, frame = len(data["video"]), torch.full((len(data["video"]),), 4)
    ids, gen = torch.arange(n), torch.Generator().manual_seed(seed)
    score = lambda x: torch.cat([hps(**reward.hpsv3_inputs(proc, x[i:i + 64], data["caption"][i:i + 64], pixels))  # noqa: E731
                                 [:, 0] for i in range(0, n, 64)])
    pos = score(to_unit(data["video"][ids, frame]))
    report, negs = {}, []
    for k, kind in enumerate(NEGATIVES):
        neg = score(negatives(data, ids, frame, torch.full((n,), k), gen))
        report[f"hps_pair_acc_{kind}"] = float((pos > neg).float().mean())
        negs.append(neg)
    lo, hi = float(torch.cat(negs).mean()), float(pos.mean())
    a = top / (hi - lo)
    last = hps.rm_head[-1]
    last.weight[0] *= a
    last.bias[0] = a * (last.bias[0] - lo)
    report["hps_calibration"] = dict(preferred=hi, dispreferred=lo, scale=a)
    return report


# -----------------------------------------------------------------------------
# What the build measured, and helpers of its script (toyworld.main)

def evaluate_stages(da3, judge, heldout, recon):
    """What the build measured on held-out ground-truth videos: VAE PSNR (all pixels and object pixels, where
    depth is nearer than the floor behind the objects), Depth Anything 3's depth AbsRel and relative-pose errors,
    and the judge's accuracy on both heads (judge_report), on raw renders and on VAE reconstructions."""
    truth = raw = to_unit(heldout["video"])
    rec = to_unit(recon)
    near = (heldout["depth"].float() < TARGET_Z + 1.5)[:, :, None].expand_as(truth)  # objects and the near floor
    report = dict(vae_psnr=psnr(rec, truth), vae_psnr_near=psnr(rec[near], truth[near]))
    true_rel = relative(heldout["c2w"])[:, -1]
    report.update(mean_last_frame_rotation_deg=float(geodesic(true_rel[:, :3, :3], torch.eye(3)).rad2deg().mean()),
                  mean_last_frame_translation=float(true_rel[:, :3, 3].norm(dim=-1).mean() / SCENE_DEPTH))
    for name, videos in (("raw", raw), ("vae", rec)):
        errs = []
        with torch.no_grad():
            for i in range(0, len(videos), 16):
                sl = slice(i, i + 16)
                out = da3(da3_input(videos[sl]))
                d_true = F.interpolate(heldout["depth"][sl].float(), size=out["depth"].shape[-2:], mode="bilinear")
                w2c = torch.eye(4).repeat(*out["extrinsics"].shape[:2], 1, 1)
                w2c[..., :3, :] = out["extrinsics"]
                rel = relative(torch.linalg.inv(w2c))[:, -1]
                errs.append(torch.stack([((out["depth"] - d_true).abs() / d_true).mean((1, 2, 3)),
                                         geodesic(rel[:, :3, :3], true_rel[sl, :3, :3]).rad2deg(),
                                         (rel[:, :3, 3] - true_rel[sl, :3, 3]).norm(dim=-1) / SCENE_DEPTH], 1))
        absrel, rot, trans = torch.cat(errs).mean(0).tolist()
        report.update({f"da3_depth_absrel_{name}": absrel, f"da3_last_frame_rot_err_deg_{name}": rot,
                       f"da3_last_frame_trans_err_{name}": trans})
    return {**report, **judge_report(judge, heldout, recon)}


def judge_report(judge, heldout, recon):
    """The judge's accuracy on both heads, on held-out raw renders and on their VAE reconstructions `recon`."""
    report, consistent = {}, heldout["corruption"] == 0
    for name, videos in (("raw", heldout["video"]), ("vae", recon)):
        p, seen = judge_videos(judge, to_unit(videos))
        report[f"judge_consistent_acc_{name}"] = float(((p > 0.5) == consistent).float().mean())
        report[f"judge_motion_acc_{name}"] = float((seen == heldout["camera"]).float().mean())
    return report


def encode_all(vae, data, heldout, jobs=1, chunk=1024):
    """The training videos' latents and reconstructions, and the held-out videos' reconstructions (encode_videos), in
    chunks of `chunk` videos, `jobs` processes at a time. A chunk is a whole number of encode_videos' batches, so
    each batch is the same and so is every number, for any number of jobs."""
    train = data["video"].split(chunk)
    parts = [*train, *heldout["video"].split(chunk)]
    if jobs > 1:
        with fork_pool(jobs) as pool:
            out = pool.starmap(encode_videos, [(vae, part) for part in parts])
    else:
        out = [encode_videos(vae, part) for part in parts]
    k = len(train)
    return dict(latents=torch.cat([z for z, _ in out[:k]]), recon=torch.cat([y for _, y in out[:k]]),
                heldout_recon=torch.cat([y for _, y in out[k:]]))


def first_last(losses):
    """A stage's mean loss over its first and its last tenth of steps."""
    k = max(1, len(losses) // 10)
    return [float(losses[:k].mean()), float(losses[-k:].mean())]

