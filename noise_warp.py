"""
Camera words -> camera path -> optical flow -> warped Gaussian noise, the way World-R1 steers Wan2.1.
Imports torch and einops (and common for its command line only).

A prompt such as "Camera orbit left, then push in." names camera motions. We turn them into a camera path
(4x4 camera-to-world poses, OpenCV axes: x right, y down, z forward), project a fronto-parallel plane through
each pair of consecutive poses to get optical flow, and push a Gaussian noise field along that flow with the
discrete noise transport of Go-with-the-Flow (Burgert et al., CVPR 2025, "warp + regaussianize"). The noise is
transported on a grid `warp_scale` x finer than the latent, binned back down variance-preservingly, sampled
at video frames 0, 4, 8, ... (Wan's 4x temporal compression) and mixed with fresh noise. The result is
~N(0, I) per element yet moves with the camera, so the video model is steered without new parameters.
Constants (motion totals, plane depth, focal, grid scale, degradation, injection weights) are the World-R1
release's (microsoft/World-R1 flow_grpo/diffusers_patch/camera_trajectory_utils.py).

Where we depart from the release, and why:
1. Orbit is a true orbit about the point 600 units in front of the camera, which it keeps looking at. The
   release puts the pivot behind the camera, so its camera drifts backward (end z -51.87) instead of forward
   (+51.87) and the per-step motion is not constant. Sign convention kept: orbit_left moves to +x, looks toward -x.
2. Sub-pixel flow accumulates over frames. The release rounds each frame's flow and drops the rest, so flow
   under 0.5 warp px (the centre of a push-in) never moves and 5.49 px/frame moves at 5. We round
   floor(F + u_k) with one dither u_k per frame shared by all pixels (golden-ratio sequence): each pixel's
   displacement averages to its flow, and neighbours still round alike, so the noise moves as a block.
   (A per-pixel carried remainder, tried first, decorrelates neighbours: 8-46 % of pixels torn per frame.)
3. Content leaving the frame becomes fresh noise with weight 0 instead of ~1/N, so a pixel that stays in view
   keeps its value exactly; duplicate groups are found by source index, not by float equality (same groups).
4. Binning uses full warp_scale x warp_scale blocks; the release's linspace binning drops the last warp row
   and column.
5. The first pose is the identity (release: translation (3390, 1380, 240); flow only sees relative poses),
   poses stay float64 (release: %.6g strings), and every random draw comes from the caller's generator.
"""
import math
import os
import re

import torch
from einops import rearrange, reduce

# ----------------------------------------------------------------------------------------------------------
# words -> motions

# id -> (translation total (x, y, z), yaw total in degrees, pivot depth), as the release's
# camera_trajectory_utils.py sample_motion_profiles.
# A negative yaw turns the optical axis toward -x ("left"); the orbit rotates about (0, 0, pivot).
MOTION_TABLE = {
    "push_in": ((0, 0, 600), 0, 0),
    "pull_out": ((0, 0, -600), 0, 0),
    "move_left": ((-220, 0, 0), 0, 0),
    "move_right": ((220, 0, 0), 0, 0),
    "orbit_left": ((0, 0, 0), -24, 600),
    "orbit_right": ((0, 0, 0), 24, 600),
    "pan_left": ((0, 0, 0), -14, 0),
    "pan_right": ((0, 0, 0), 14, 0),
    "fixed": ((0, 0, 0), 0, 0),
}
MOTIONS = tuple(MOTION_TABLE)
# "push in" must stand alone between non-letters: "fixed-wing" matches, "unfixed" does not (release rule)
_PHRASE = re.compile(r"(?<![a-z])(" + "|".join(m.replace("_", " ") for m in MOTIONS) + r")(?![a-z])")
TIME_STRIDE = 4  # Wan's VAE keeps video frames 0, 4, 8, ... as latent frames
GOLDEN = (math.sqrt(5) - 1) / 2  # per-frame rounding dither frac(k GOLDEN): evenly spread for every k
WARP_SCALE = 16  # the noise is transported on a grid this many times finer than the latent (the release's)
DEGRADATION = 0.35  # share of fresh noise mixed into the warped noise (the release's)
PLANE_DEPTH = 1000.0  # depth of the plane whose flow the warp follows (the release's); a path's unit of depth


def parse_camera(prompt):
    """Motion ids named in `prompt`, in textual order, repeats kept: "Pan left, then push in" -> [pan_left, push_in].

    Case-insensitive; connectors ("then", "and", commas) carry no meaning, so composites are always sequential.
    No phrase -> []. The phrases cannot overlap, so one left-to-right scan equals the release's sorted matches.
    """
    return [m.group(1).replace(" ", "_") for m in _PHRASE.finditer(prompt.lower())]


VALID_PHRASES = tuple(m.replace("_", " ") for m in MOTIONS)  # what parse_camera recognises, nothing else
# Camera talk that parse_camera does not recognise (the release accepts no synonyms, on purpose): film jargon
# anywhere ("zoom in", "dolly", "push-in", "pans left", "tilt up", "tracking shot"), and any motion verb within two
# words after "camera" ("the camera slowly moves left", "camera rises"). Scene text ("a boat is pulled up on the
# shore") is left alone: verbs count only right after "camera".
_DIRECTION = r"(?:\s+[a-z]+ly)?[\s-]+(?:in|out|left|right|up|down|forwards?|backwards?|back|around|away|closer)"
_CAMERA_JARGON = re.compile(
    r"(?<![a-z])(?:zoom(?:s|ed|ing)?(?:[\s-]+(?:in|out))?|doll(?:y|ies|ied|ying)(?:[\s-]+(?:in|out))?"
    r"|(?:push|pull)-(?:in|out)|pan(?:s|ned|ning)\s+(?:left|right)|tilt(?:s|ed|ing)?\s+(?:up|down)"
    r"|tracking shot|crane shot|handheld|(?:static|still|stationary|locked[- ]off) (?:shot|camera))(?![a-z])")
_CAMERA_VERB = re.compile(
    r"(?<![a-z])camera(?:\s+[a-z]+){0,2}?\s+(?P<words>(?:push|pull|mov|orbit|pan|zoom|doll|truck|track|tilt|cran"
    r"|rotat|fl|ris|ascend|descend|glid|slid|swing|circl|sweep|spin|turn|travel|arc)"
    r"(?:e|es|ed|ing|s|ning|ned|ling|led|y|ies|ying|ied)?(?:" + _DIRECTION + r")?)(?![a-z])")


def unknown_camera_words(prompt):
    """Camera-like phrases in `prompt` that parse_camera does not turn into a motion, in textual order:
    "Camera zooms in, then pan left." -> ["zooms in"]. Spans overlapping a recognised phrase are not reported."""
    text = prompt.lower()
    known = [m.span() for m in _PHRASE.finditer(text)]
    found = [(m.start(), m.end()) for m in _CAMERA_JARGON.finditer(text)]
    found += [m.span("words") for m in _CAMERA_VERB.finditer(text)]
    return [text[a:b] for a, b in sorted(set(found)) if not any(x < b and a < y for x, y in known)]


# ----------------------------------------------------------------------------------------------------------
# motions -> poses (4x4 camera-to-world, float64)

def _rot_y(deg):
    """Ry(theta) = [[c, 0, s], [0, 1, 0], [-s, 0, c]] for a tensor of angles (...,) -> (..., 3, 3)."""
    th = torch.deg2rad(deg)
    c, s, o, z = th.cos(), th.sin(), torch.ones_like(th), torch.zeros_like(th)
    return torch.stack([c, z, s, z, o, z, -s, z, c], -1).reshape(*th.shape, 3, 3)


def motion_poses(motion, n):
    """Local poses of one segment, (n, 4, 4): L(p) = T(c) Ry(yaw p) T(-c) T(t p), p = i / max(n-1, 1).

    c = (0, 0, pivot). p = 0 gives the identity, p = 1 the motion's total; translation, pan and orbit are all
    one-parameter groups, so every step between consecutive frames is the same rigid motion.
    """
    if motion not in MOTION_TABLE:
        raise ValueError(f"unknown camera motion {motion!r}; valid: {', '.join(MOTIONS)}")
    t, yaw, pivot = MOTION_TABLE[motion]
    p = torch.arange(n, dtype=torch.float64) / max(n - 1, 1)
    c = torch.tensor([0.0, 0.0, pivot], dtype=torch.float64)
    R = _rot_y(yaw * p)  # (n, 3, 3)
    L = torch.eye(4, dtype=torch.float64).repeat(n, 1, 1)
    L[:, :3, :3] = R
    # T(c) R T(-c) T(t p): position = c - R c + R t p
    L[:, :3, 3] = c - R @ c + (R @ torch.tensor(t, dtype=torch.float64)) * p[:, None]
    return L


def resample_path(poses, num_frames):
    """(N, 4, 4) -> (F, 4, 4) as the release: index round(i (N-1) / (F-1)), half to even; N < F repeats the last."""
    N = len(poses)
    if N < num_frames:
        return torch.cat([poses, poses[-1:].expand(num_frames - N, 4, 4)])
    i = torch.arange(num_frames, dtype=torch.float64) * (N - 1) / max(num_frames - 1, 1)
    return poses[torch.round(i).long()]  # torch.round is half-to-even like Python's round


def camera_path(motions, num_frames):
    """Motion ids -> camera-to-world path (num_frames, 4, 4), float64, first pose the identity.

    Release frame budget: n motions get max(2, ceil(F / n)) frames each; segment k is P_k L_k(i) with
    P_{k+1} = P_k L_k(last), so each motion is expressed in the camera frame where the previous one ended and
    its first frame repeats that end pose. Then resampled to F frames. [] or ["fixed"] -> a static path.
    """
    eye = torch.eye(4, dtype=torch.float64)
    if not motions:
        return eye.repeat(num_frames, 1, 1)
    n_seg = max(2, -(-num_frames // len(motions)))
    start, segments = eye, []
    for m in motions:
        L = start @ motion_poses(m, n_seg)
        segments.append(L)
        start = L[-1]
    return resample_path(torch.cat(segments), num_frames)


def requested_path(motions, num_frames):
    """The camera path a prompt's motions request, (num_frames, 4, 4); None when it names none (the reward then
    has no path to compare with, and S_traj is 0)."""
    return camera_path(motions, num_frames) if motions else None


def geodesic_deg(R1, R2):
    """Rotation angle of R1^T R2 in degrees, (..., 3, 3) -> (...); atan2 form, accurate near 0 and 180."""
    M = R1.transpose(-1, -2) @ R2
    cos = (M.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2
    sin = torch.stack([M[..., 2, 1] - M[..., 1, 2], M[..., 0, 2] - M[..., 2, 0], M[..., 1, 0] - M[..., 0, 1]], -1)
    return torch.rad2deg(torch.atan2(sin.norm(dim=-1) / 2, cos))


def path_stats(path):
    """(length, degrees) travelled along a path (F, 4, 4): sums of per-step distances and geodesic rotation angles."""
    step = path[1:, :3, 3] - path[:-1, :3, 3]
    return step.norm(dim=-1).sum().item(), geodesic_deg(path[:-1, :3, :3], path[1:, :3, :3]).sum().item()


# ----------------------------------------------------------------------------------------------------------
# poses -> optical flow

def plane_flow(pose_a, pose_b, height, width, focal=None, depth=PLANE_DEPTH):
    """Flow (2, H, W) = (dx, dy) in pixels of a plane Z = depth (in camera a) seen from rigid pose_a then pose_b.

    [R | t] = pose_b^-1 pose_a; X = (u d/f, v d/f, d) with u = j - W/2, v = i - H/2; X' = R X + t;
    flow = f X'_xy / max(X'_z, 0.01) - (u, v). Identical poses give 0 up to the rounding of Rb^T Ra in float64
    (exactly 0 where that product is exactly I; ~1e-15 px on some BLAS). As the release, the field is
    scaled down if its largest vector exceeds 0.25 max(H, W) (never for the shipped motions).
    """
    f = 1.2 * width if focal is None else focal
    Rb, tb = pose_b[:3, :3], pose_b[:3, 3]
    R = (Rb.T @ pose_a[:3, :3]).float()  # rigid inverse, no linalg.inv (which syncs on CUDA)
    t = (Rb.T @ (pose_a[:3, 3] - tb)).float()
    dev = pose_a.device
    u = (torch.arange(width, device=dev, dtype=torch.float32) - width / 2)[None, :]  # (1, W)
    v = (torch.arange(height, device=dev, dtype=torch.float32) - height / 2)[:, None]  # (H, 1)
    # X' scaled by f/d: (x, y, z) = R (u, v, f) + t f/d, so R = I and t = 0 give x = u and z = f bit for bit
    t = t * (f / depth)
    x = R[0, 0] * u + R[0, 1] * v + R[0, 2] * f + t[0]
    y = R[1, 0] * u + R[1, 1] * v + R[1, 2] * f + t[1]
    z = (R[2, 0] * u + R[2, 1] * v + R[2, 2] * f + t[2]).clamp(min=0.01 * f / depth) / f  # z' / d, z' >= 0.01
    flow = torch.stack([x / z - u, y / z - v])  # (2, H, W); not f / z: scalar / tensor is reciprocal-times, inexact
    cap = 0.25 * max(height, width)
    return flow * (cap / flow.square().sum(0).max().sqrt().clamp(min=cap))  # no host sync: factor 1 below the cap


# ----------------------------------------------------------------------------------------------------------
# flow -> transported noise (Go-with-the-Flow on the warp grid)

def _pixel(x, y, H, W):
    """Integer pixel coordinates -> (in-bounds mask, flat row-major index clamped into the grid)."""
    inb = (x >= 0) & (x < W) & (y >= 0) & (y < H)
    return inb, y.clamp(0, H - 1).long() * W + x.clamp(0, W - 1).long()


def transport(noise, weight, flow, generator, phase=0.5):
    """One discrete noise-transport step on an H x W grid; noise (N, C), weight (N,), flow (2, H, W), N = H W.

    Content at pixel p moves by floor(F(p) + phase) (phase 0.5: nearest, the release; see warp_path). Pixels
    nothing reaches copy their nearest backward sample p - F(p); a value copied n times becomes
    x/sqrt(n) + z - mean_group(z) per copy; colliding values combine as sum(x w)/sqrt(sum w^2), w the density.
    Content leaving the grid and backward samples from outside become fresh noise. Output ~N(0, 1) per element;
    zero flow returns `noise` bit for bit.
    """
    N, C = noise.shape
    H, W = flow.shape[-2:]
    ar = torch.arange(N, device=noise.device)
    px, py = (ar % W).float(), (ar // W).float()
    fx, fy = flow.reshape(2, N)

    # 1. forward: content moves by its flow, rounded with the step's shared dither (departure 2)
    inb, dst = _pixel(px + (fx + phase).floor(), py + (fy + phase).floor(), H, W)
    dst = torch.where(inb, dst, ar)  # content that left: its pixel holds fresh noise unless something arrives
    arrivals = torch.zeros(N, device=noise.device).index_add_(0, dst, inb.float())

    # 2. backward: a hole (no arrival, own content still in view) copies its nearest source at p - F(p)
    hole = (arrivals == 0) & inb
    b_inb, near = _pixel((px - fx + 0.5).floor(), (py - fy + 0.5).floor(), H, W)
    copy = hole & b_inb
    src = torch.where(copy, near, ar)
    count = inb.float().index_add_(0, src, copy.float())  # copies made of each source value: its group size

    # density: each copy carries 1/n of its source's weight; collisions add weights (release steps e-g)
    w = weight / count.clamp(min=1)
    den = torch.zeros(N, device=noise.device).index_add_(0, dst, inb * w**2)
    w_out = torch.zeros(N, device=noise.device).index_add_(0, dst, inb * w) + copy * w[src]

    # 3. most pixels receive one value nobody else shares: a plain gather, bit-exact
    top = torch.full((N,), -1, device=noise.device).scatter_reduce_(0, dst, torch.where(inb, ar, -1), "amax")
    inv = torch.where(copy, src, top).clamp(min=0)
    out = noise.index_select(0, inv)

    # 4. recompute the rest: collisions, duplicated values, fresh noise (host syncs: sizes depend on the data)
    fresh = (arrivals == 0) & ~copy
    fix = (arrivals > 1) | (((arrivals == 1) | copy) & (count[inv] > 1)) | fresh
    rows = fix.nonzero().squeeze(1)  # destination pixels to recompute
    srcs = (inb & fix[dst]).nonzero().squeeze(1)  # forward copies that land on them
    origin = torch.cat([srcs, inv[rows]])  # whose value each entry carries
    d = torch.cat([dst[srcs], rows])  # where it lands
    a = torch.cat([w[srcs] * den[dst[srcs]].rsqrt(), (copy | fresh)[rows].float()])  # collision weight
    member = torch.cat([torch.ones_like(srcs, dtype=torch.bool), copy[rows]]) & (count[origin] > 1)
    z = torch.randn(len(origin), C, generator=generator, device=noise.device)
    gid, ginv = torch.unique(origin, return_inverse=True)
    zsum = torch.zeros(len(gid), C, device=noise.device).index_add_(0, ginv, z * member[:, None])
    n = count[origin].clamp(min=1)[:, None]
    val = noise[origin] / n.sqrt() + member[:, None] * (z - zsum[ginv] / n)  # regaussianize: group sum stays sqrt(n) x
    val = torch.where(torch.cat([torch.zeros_like(srcs, dtype=torch.bool), fresh[rows]])[:, None], z, val)
    out.index_fill_(0, rows, 0).index_add_(0, d, val * a[:, None])

    # density renormalised as Go-with-the-Flow does, so weights neither vanish nor run away
    weight = (w_out / w_out.mean() + 1e-5) ** 0.9999
    return out, weight


def bin_noise(x, scale):
    """Variance-preserving binning (H, W, ...) -> (H/s, W/s, ...): block sums / s, so iid N(0,1) stays N(0,1).

    Channels last, like the warp state: reducing over leading axes is ~8x faster here than over trailing ones.
    """
    return reduce(x, "(h a) (w b) ... -> h w ...", "sum", a=scale, b=scale) / scale


def warp_path(path, channels, h, w, generator, warp_scale=WARP_SCALE, every=TIME_STRIDE, dither=True):
    """Transport noise along a camera path (F, 4, 4); returns video frames 0, every, 2 every, ... as (C, T, h, w).

    The warp grid is (h s, w s) with focal 1.2 w s and the plane at depth 1000 (release section 2); frame k
    is read out by `bin_noise`. Step k rounds with the dither frac(k / golden ratio): a low-discrepancy
    sequence: for any flow value, k rounded steps sum to within 2 px of k F (k <= 80); dither=False rounds
    to nearest as the release. Randomness: all from `generator`, whose device is the compute device.
    """
    dev = generator.device
    H, W = h * warp_scale, w * warp_scale
    path = path.to(dev)
    noise = torch.randn(H * W, channels, generator=generator, device=dev)  # (N, C): channels last for row moves
    weight = torch.ones(H * W, device=dev)

    def readout(x):  # (N, C) warp grid -> (C, h, w) latent grid
        return rearrange(bin_noise(x.view(H, W, channels), warp_scale), "h w c -> c h w")

    frames = [readout(noise)]
    for k in range(1, len(path)):
        flow = plane_flow(path[k - 1], path[k], H, W)
        noise, weight = transport(noise, weight, flow, generator, phase=(k * GOLDEN) % 1.0 if dither else 0.5)
        if k % every == 0:
            frames.append(readout(noise))
    return torch.stack(frames, 1)


def degrade(x, generator, amount=DEGRADATION):
    """(a xi + (1 - a) x) / sqrt(a^2 + (1 - a)^2), xi fresh N(0, 1), a = amount: stays N(0, 1), loosens the warp."""
    xi = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (amount * xi + (1 - amount) * x) / math.hypot(amount, 1 - amount)


WARP_BYTES = 1024  # host memory per warp-grid cell while transporting (measured ~700: state, flow, indices)


def check_warp_memory(height, width, warp_scale):
    """Refuse a --warp_scale whose grid, (H/8 s) x (W/8 s) cells of WARP_BYTES each, would not fit in this host's
    memory: an absurd value would otherwise run the machine out of memory."""
    import common  # the command lines' one-line errors (only they call this)
    cells = height // 8 * warp_scale * (width // 8 * warp_scale)
    need, have = cells * WARP_BYTES, os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        common.fail(f"--warp_scale={warp_scale} needs about {need / 2**30:,.0f} GiB for the noise warp grid at "
                    f"{width}x{height} ({cells:,} cells), more than this machine's {have / 2**30:.0f} GiB; lower it "
                    f"(the release uses {WARP_SCALE})")


def warped_noise(prompt_or_path, latent_shape, generator, *, warp_scale=WARP_SCALE, degradation=DEGRADATION,
                 device=None, dither=True):
    """Camera-warped initial noise (C, T, h, w), float32, ~N(0, 1) per element.

    `prompt_or_path`: a prompt, a list of motion ids, or a (F', 4, 4) path (resampled to F = 4 (T-1) + 1).
    A prompt or list without motion gives plain N(0, 1) noise from `generator` (the release: no warp).
    Deterministic per generator seed on the CPU (on CUDA, float index_add_ adds with atomics unless torch's
    deterministic mode is on); runs where the generator lives (`device`, if given, must match it).
    dither=False: the release's per-frame nearest rounding (departure 2), for ablations.
    """
    C, T, h, w = latent_shape
    if device is not None and torch.device(device).type != generator.device.type:
        raise ValueError(f"generator is on {generator.device} but device={device}; create it there")
    F = TIME_STRIDE * (T - 1) + 1
    path = prompt_or_path
    if isinstance(path, str):
        path = parse_camera(path)
    if isinstance(path, (list, tuple)):
        if not path:
            return torch.randn(C, T, h, w, generator=generator, device=generator.device)
        path = camera_path(list(path), F)
    path = resample_path(path.to(torch.float64), F)
    x = warp_path(path, C, h, w, generator, warp_scale, dither=dither)
    return degrade(x, generator, degradation) if degradation > 0 else x


# ----------------------------------------------------------------------------------------------------------
# injection into sampling (camera_trajectory_utils.py prepare_latents_with_camera; wired in sample.py)

def lowpass_delta(warped, base, kernel=9):
    """delta_unit = box_k(warped - base) / (std + 1e-6): per frame and channel, zero padding counted in the mean.

    Shapes (C, T, h, w) or (B, C, T, h, w); std is per sample over all non-batch dims (unbiased). Unit std.
    """
    assert kernel % 2 == 1, "kernel must be odd so the output keeps its size"
    d = (warped - base).float()
    low = torch.nn.functional.avg_pool2d(d.reshape(-1, 1, *d.shape[-2:]), kernel, 1, kernel // 2).reshape(d.shape)
    dims = tuple(range(d.ndim - 4, d.ndim))  # (C, T, h, w) of each sample
    return low / (low.std(dims, keepdim=True) + 1e-6)


def stepwise_weights(n=8):
    """linspace(1, 0.1, n) / its sum: the share of the warped delta added after each of the first n steps (sum 1)."""
    w = torch.linspace(1.0, 0.1, n, dtype=torch.float64)
    return (w / w.sum()).float()


def inject_stepwise(x, delta_unit, weight, strength):
    """x' = x + strength weight std(x) delta_unit, then re-standardised to x's own per-sample mean and std.

    x (B, C, T, h, w), delta_unit broadcastable to it; statistics per sample in fp32 (x may be bf16).
    """
    assert x.ndim == 5, f"x must be (B, C, T, h, w), got {tuple(x.shape)}"
    dims = tuple(range(1, x.ndim))
    xf = x.float()
    m, s = xf.mean(dims, keepdim=True), xf.std(dims, keepdim=True)
    y = xf + strength * weight * s * delta_unit.float()
    y = (y - y.mean(dims, keepdim=True)) / (y.std(dims, keepdim=True) + 1e-6) * s + m
    return y.to(x.dtype)


def blend(base, warped, strength):
    """(l warped + (1 - l) base) / sqrt(l^2 + (1 - l)^2), l = strength: N(0,1) if independent; l >= 1: warped."""
    if strength >= 1:
        return warped
    return (strength * warped + (1 - strength) * base) / math.hypot(strength, 1 - strength)


# ----------------------------------------------------------------------------------------------------------
# visualiser: python noise_warp.py --prompt "Camera orbit left, then push in." --out warp.mp4

def _flow_rgb(flow, max_mag):
    """(2, H, W) -> (H, W, 3) uint8 colour wheel: hue = direction, saturation = magnitude / max_mag, white = still."""
    from matplotlib.colors import hsv_to_rgb
    hue = torch.atan2(-flow[1], -flow[0]) / (2 * math.pi) + 0.5  # direction -> [0, 1]
    sat = (flow.norm(dim=0) / max(max_mag, 1e-8)).clamp(0, 1)
    return (hsv_to_rgb(torch.stack([hue, sat, torch.ones_like(sat)], -1).numpy()) * 255).round().astype("uint8")


if __name__ == "__main__":
    import argparse
    import sys
    import time

    import common

    parser = argparse.ArgumentParser(description="Show a prompt's camera-warped noise: a flow | noise video and a "
                                     "top-down plot of the camera path.")
    parser.add_argument("--prompt", default="Camera orbit left, then push in.", help="prompt naming camera motions")
    parser.add_argument("--out", default="warp.mp4", help="mp4: flow colour wheel | warped noise, channels 0-2 as RGB")
    parser.add_argument("--png", default=None, help="top-down camera path plot (default: <out>_path.png)")
    parser.add_argument("--frames", type=int, default=81, help="video frames, 4k+1")
    parser.add_argument("--height", type=int, default=480, help="video height in pixels, a multiple of 16")
    parser.add_argument("--width", type=int, default=832, help="video width in pixels, a multiple of 16")
    parser.add_argument("--warp_scale", type=int, default=WARP_SCALE, help="warp grid = latent grid x this")
    parser.add_argument("--degradation", type=float, default=DEGRADATION, help="share of fresh noise in latents, in [0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="generator seed")
    parser.add_argument("--device", default="cpu", help="torch device for the warp, e.g. cpu or cuda")
    parser.add_argument("--fps", type=int, default=16, help="frames per second of the video")
    args = common.parse_flags(parser, sys.argv[1:])
    if args.frames < 1 or (args.frames - 1) % TIME_STRIDE:
        common.fail(f"--frames={args.frames} must be 4k+1 (e.g. 9, 81)")
    if args.height < 16 or args.width < 16 or args.height % 16 or args.width % 16:
        common.fail(f"--height and --width must be positive multiples of 16, got {args.height}x{args.width}")
    common.check_numbers(args, positive=("warp_scale", "fps"), nonnegative=("degradation",))
    check_warp_memory(args.height, args.width, args.warp_scale)
    if args.degradation > 1:
        common.fail(f"--degradation={args.degradation} must be in [0, 1]")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        common.fail("--device cuda asked for, but torch sees no GPU; use --device cpu")
    motions = parse_camera(common.check_text(args.prompt, "--prompt"))
    unknown = unknown_camera_words(args.prompt)
    if unknown and not motions:
        common.fail(f"--prompt names no known camera motion ({', '.join(repr(w) for w in unknown)} not recognised); "
                    f"use one of: {', '.join(VALID_PHRASES)} (no synonyms)")
    common.check_writable_file(args.out, "--out", [".mp4"])
    png = common.check_writable_file(args.png or os.path.splitext(args.out)[0] + "_path.png", "--png", [".png"])
    if unknown:
        print(f"warning: --prompt: {', '.join(repr(w) for w in unknown)} not recognised (no synonyms), only "
              f"{', '.join(motions)} moves the camera; known phrases: {', '.join(VALID_PHRASES)}", file=sys.stderr)
    import imageio.v2 as imageio
    import matplotlib
    import numpy as np
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    path = camera_path(motions, args.frames)
    length, rotation = path_stats(path)
    print(f"motions: {motions or 'none (static path; warped_noise would return plain noise)'}")
    print(f"path length {length:.3f} units, total rotation {rotation:.3f} deg over {args.frames} frames")

    gen = torch.Generator(args.device).manual_seed(args.seed)
    h, w = args.height // 8, args.width // 8
    t0 = time.perf_counter()
    frames = warp_path(path, 16, h, w, gen, args.warp_scale, every=1)  # (16, F, h, w): every video frame
    latents = degrade(frames[:, ::TIME_STRIDE], gen, args.degradation).cpu()  # = warped_noise(...) for this seed
    print(f"warp: {time.perf_counter() - t0:.2f} s on {args.device}; latents {tuple(latents.shape)}")
    lag1 = torch.nn.functional.cosine_similarity(latents[:, 1:].flatten(2), latents[:, :-1].flatten(2), dim=-1).mean()
    print(f"latent noise: mean {latents.mean():+.4f}, std {latents.std():.4f}, min {latents.min():.2f}, "
          f"max {latents.max():.2f}, correlation of consecutive latent frames {lag1:.3f}")

    flows = [torch.zeros(2, args.height, args.width)] + [plane_flow(path[k - 1], path[k], args.height, args.width)
                                                           for k in range(1, args.frames)]
    max_mag = max(f.norm(dim=0).max().item() for f in flows)
    video = []
    for k in range(args.frames):
        cells = frames[:3, k].cpu().repeat_interleave(8, -2).repeat_interleave(8, -1)  # latent cell -> 8x8 pixels
        noise_rgb = (cells / 6 + 0.5).clamp(0, 1).permute(1, 2, 0).mul(255).round().byte().numpy()  # +-3 sigma
        video.append(np.concatenate([_flow_rgb(flows[k], max_mag), noise_rgb], 1))  # (H, 2 W, 3)
    imageio.mimwrite(args.out, video, fps=args.fps)
    print(f"wrote {args.out} ({args.frames} frames, max flow {max_mag:.2f} px at {args.width}x{args.height})")

    pos, fwd = path[:, :3, 3].numpy(), path[:, :3, 2].numpy()  # camera centres and optical axes
    span = max(float(abs(pos[:, [0, 2]]).max()), 100.0)
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot(pos[:, 0], pos[:, 2], "-", color="0.6")
    sc = ax.scatter(pos[:, 0], pos[:, 2], c=range(len(pos)), cmap="viridis", s=12, zorder=3)
    every = max(1, len(pos) // 12)
    ax.quiver(pos[::every, 0], pos[::every, 2], fwd[::every, 0], fwd[::every, 2], angles="xy", scale_units="xy",
              scale=1 / (0.15 * span), color="tab:red", width=0.004)
    ax.set(xlabel="x (right)", ylabel="z (forward)", aspect="equal", title=", ".join(motions) or "static")
    ax.text(0.02, 0.98, f"top view, arrows: view direction\nlength {length:.1f}, rotation {rotation:.1f} deg",
            transform=ax.transAxes, va="top")
    ax.set_xlim(-1.3 * span, 1.3 * span), ax.set_ylim(-1.3 * span, 1.3 * span)
    fig.colorbar(sc, ax=ax, label="frame")
    fig.savefig(png, dpi=100, bbox_inches="tight")
    print(f"wrote {png}")
