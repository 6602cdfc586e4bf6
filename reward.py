"""
The World-R1 rewards, in-process: a 3D reward from Depth Anything 3 + 3D Gaussians, and HPSv3 for quality.
Imports common, noise_warp (path geometry), splat (the Gaussian rasterizers) and models (the size table).

    R     = w_3d * R_3D + w_gen * R_gen          (dynamic phase: R = R_gen)
    R_3D  = w_meta * S_meta + w_recon * S_recon + S_traj   each term clipped to [0, 1]; the paper's weights are 1
                                                         (R_3D in [0, 3]), and the toy world's w_meta is 0
    R_gen = gen_scale * mean_{k < gen_frames} HPSv3_mu(frame k, prompt)

Data flow for one video [F, 3, H, W] in [0, 1]: DA3 lifts the frames to per-frame depth, cameras and 3D
Gaussians (`lift`); we splat the Gaussians (`splat.render`: gsplat on CUDA, a float64-compositing torch rasterizer
on CPU); S_recon = 1 - mean LPIPS(frame k, render at camera k); S_meta = Qwen3-VL's expected 0-9 grade of a render
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
    install; we rotate the SH bands with a least-squares fit on the renderer's SH basis instead of Wigner-D.

The critics themselves are built and loaded in models.py (RewardModels, load_reward_models).
"""
import enum
import math
from dataclasses import dataclass

import common  # noqa: F401  (first: the torchvision fix, before transformers / lpips import it)
import torch
import torch.nn.functional as F

import models
import noise_warp
import splat

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# The reward's settings that are the same at every size, declared once ({name: (default, what it is)}): score's
# defaults, train.py's flags, and evaluate.py's defaults for a checkpoint that does not name them. The weights that
# differ by size, w_meta and w_gen, are rows of models.SIZES.
SETTINGS = {
    "w_3d": (1.0, "weight of R_3D = w_meta S_meta + w_recon S_recon + S_traj"),
    "w_recon": (1.0, "weight of S_recon inside R_3D (above 1 the toy world's policy trades the scene for flat colour "
                     "that reconstructs well: BENCHMARKS.md)"),
    "gen_frames": (4, "HPSv3 averages the first K frames"),
    "gen_scale": (0.1, "HPSv3 mu is multiplied by this"),
    "meta_angle": (15.0, "meta view orbit angle, degrees"),
    "traj_rot_scale": (10.0, "S_traj: a 'fixed' request is judged as strictly as a pan of this many degrees"),
}
DEFAULTS = {name: default for name, (default, _) in SETTINGS.items()}
WEIGHTS = ("w_meta", "w_gen")  # score's per-size settings (models.SIZES); 1 and 1 is the paper's reward


def defaults(size):
    """Every setting score takes, as a --size sets it: DEFAULTS and the size's weights."""
    return {**DEFAULTS, **{k: models.SIZES[size][k] for k in WEIGHTS}}


# The fewest video frames (4k + 1) the world reward and evaluate.py's metrics can use: S_traj compares a path of
# cameras, the novel view holds out a frame between two lifted ones. A one-frame video is "bad" for every critic.
MIN_FRAMES = 5


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
    f_world(d) = f_cam(R^T d). Fitted by least squares on the renderer's SH basis (gsplat's) at 64 fixed directions
    (exact: each band is rotation-invariant); DA3 uses e3nn's Wigner-D here."""
    d = F.normalize(torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=-1)
    d = d.to(R.device)
    B = splat.sh_basis(degree, d)  # (64, K)
    B_rot = splat.sh_basis(degree, torch.einsum("fji,nj->fni", R.double(), d))  # Y(R^T d): (F, 64, K)
    return torch.linalg.lstsq(B.expand(len(R), -1, -1), B_rot).solution.to(R.dtype)  # (F, K, K)


def _gaussians_from_gs_head(head, opacity, depth, K, c2w, cfg):
    """DA3's GS-head outputs -> world Gaussians, as DA3's GaussianAdapter builds them (da3-giant settings).
    head (F,h,w,C): [xy offset 2 | scale 3 | quat 4 | SH 3*K | depth offset 1]; opacity, depth (F,h,w).
    Means sit on the unit ray at (depth + offset), as DA3 does; scales are sigmoid-ranged and scaled by depth and
    the pixel footprint 0.1 (1/fx + 1/fy); quats go through DA3's own conversion so the renderer sees exactly what
    DA3's renderer sees; SH bands are damped by DA3's mask and rotated from camera to world."""
    from depth_anything_3.model.utils.transform import cam_quat_xyzw_to_world_quat_wxyz
    Fn, h, w, _ = head.shape
    if cfg["pred_offset_depth"]:
        depth, head = depth + head[..., -1], head[..., :-1]
    u, v = _pixel_grid(h, w, depth)
    if cfg["pred_offset_xy"]:
        u, v, head = u + head[..., 0], v + head[..., 1], head[..., 2:]
    ray = F.normalize(_rays(u, v, K), dim=-1)
    means = torch.einsum("fij,fhwj->fhwi", c2w[:, :3, :3], ray) * depth[..., None] + c2w[:, None, None, :3, 3]
    k = (cfg["sh_degree"] + 1) ** 2
    scale, quat, sh = head.split([3, 4, 3 * k], dim=-1)
    lo, hi = cfg["gaussian_scale_min"], cfg["gaussian_scale_max"]
    footprint = 0.1 * (1 / K[:, 0, 0] + 1 / K[:, 1, 1])
    scales = (lo + (hi - lo) * scale.sigmoid()) * depth[..., None] * footprint[:, None, None, None]
    quat = F.normalize(quat, dim=-1).reshape(Fn, 1, h * w, 4)
    quats = torch.cat([cam_quat_xyzw_to_world_quat_wxyz(q, c.expand(1, h * w, 4, 4))[0] for q, c in zip(quat, c2w)])
    mask = torch.tensor([0.1 * 0.25 ** math.isqrt(i) if i else 1.0 for i in range(k)], device=head.device)
    sh = sh.reshape(Fn, h, w, 3, k) * mask  # DA3's layout: (channel, band)
    sh = torch.einsum("fkj,fhwcj->fhwkc", _sh_rotation(c2w[:, :3, :3], cfg["sh_degree"]), sh)
    return dict(means=means.reshape(-1, 3), quats=quats, scales=scales.reshape(-1, 3),
                opacities=opacity.reshape(-1), sh=sh.reshape(-1, k, 3))


def lift_size(h, w, res):
    """DA3's preprocessing size: longest side -> res, then each side to the nearest multiple of 14."""
    s = res / max(h, w)
    return max(14, round(h * s / 14) * 14), max(14, round(w * s / 14) * 14)


@torch.no_grad()
def lift(critics, video):
    """video (F, 3, H, W) in [0, 1] -> Lift. DA3 is called directly on ImageNet-normalised frames (its
    `inference()` wraps fp16 autocast on CPU); its extrinsics are world-to-camera 3x4 OpenCV."""
    dev = critics.device
    h, w = lift_size(*video.shape[-2:], critics.process_res)
    frames = F.interpolate(video.to(dev, torch.float32), size=(h, w), mode="bilinear", antialias=True,
                           align_corners=False).clamp(0, 1)
    mean, std = (torch.tensor(t, device=dev)[:, None, None] for t in (IMAGENET_MEAN, IMAGENET_STD))
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        out = critics.da3(((frames - mean) / std)[None], infer_gs=critics.gs_cfg is not None)
    depth, K = out["depth"][0].float(), out["intrinsics"][0].float()
    w2c = torch.eye(4, device=dev).repeat(len(frames), 1, 1)
    w2c[:, :3] = out["extrinsics"][0, :, :3].float()
    c2w = torch.linalg.inv(w2c)
    if critics.gs_cfg is not None:
        head_out = out["gaussians"]
        gs = _gaussians_from_gs_head(head_out["raw_gaussians"][0].float(), head_out["opacities"][0].float(), depth,
                                     K, c2w, critics.gs_cfg)
    else:
        gs = unproject_gaussians(frames, depth, K, c2w)
    return Lift(frames, depth, w2c, c2w, K, gs)


# ----------------------------------------------------------------------------------------------------------------
# Render: the Gaussians seen from each frame's own camera, and from the meta view beside the path

@torch.no_grad()
def own_view_renders(lf):
    """All Gaussians rendered at each frame's own estimated camera: (F, 3, h, w) in [0, 1], beside lf.frames."""
    h, w = lf.frames.shape[-2:]
    rgb, _ = splat.render(lf.gaussians, lf.w2c, lf.K, h, w)  # (F, h, w, 3)
    return rgb.clamp(0, 1).permute(0, 3, 1, 2)


def meta_camera(c2w, depth, angle=DEFAULTS["meta_angle"]):
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


@torch.no_grad()
def meta_view(lf, angle=DEFAULTS["meta_angle"]):
    """The render S_meta grades: all Gaussians seen from meta_camera, at the middle camera's intrinsics and the lift
    resolution -> (3, h, w), not clamped (qwen_grade takes uint8 levels of it)."""
    h, w = lf.frames.shape[-2:]
    view = meta_camera(lf.c2w, lf.depth, angle)
    rgb, _ = splat.render(lf.gaussians, torch.linalg.inv(view)[None], lf.K[len(lf.K) // 2][None], h, w)
    return rgb[0].permute(2, 0, 1)


# ----------------------------------------------------------------------------------------------------------------
# S_meta: Qwen3-VL grades the render from the meta view

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


def to_uint8(img):
    """Floats in [0, 1], any shape -> uint8 levels on the same device, as a PNG, JPEG or mp4 round trip gives them."""
    return (img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)


def _digit_ids(tok):
    ids = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]
    assert len(set(ids)) == 10 and tok.unk_token_id not in ids, "digits must be single tokens"
    return ids


@torch.no_grad()
def qwen_grade(critics, image, prompt):
    """Qwen3-VL's expected grade of `image` (3, H, W) in [0, 1] for the video prompt: one forward pass, softmax
    over the logits of the tokens "0".."9" at the answer position, E[d] / 9 in [0, 1] (no sampling)."""
    proc, model = critics.qwen_proc, critics.qwen
    text = proc.apply_chat_template([{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": META_PROMPT.format(prompt=prompt)}]}], add_generation_prompt=True,
        tokenize=False)
    inp = proc(text=[text], images=[to_uint8(image).cpu()], return_tensors="pt").to(critics.device)
    inp["pixel_values"] = inp["pixel_values"].to(model.dtype)
    logits = model(**inp, use_cache=False, logits_to_keep=1).logits[0, -1].float()
    p = torch.softmax(logits[_digit_ids(proc.tokenizer)], dim=0)
    return float((p * torch.arange(10, device=p.device)).sum() / 9)


@torch.no_grad()
def s_meta(critics, lf, prompt, angle=DEFAULTS["meta_angle"], keep=None):
    """Qwen3-VL's grade of the render from the meta view (meta_view); keep: a dict that receives the render
    (train.py's media)."""
    image = meta_view(lf, angle)
    if keep is not None:
        keep["meta_view"] = image.cpu()
    return qwen_grade(critics, image, prompt)


# ----------------------------------------------------------------------------------------------------------------
# S_recon: the own-view renders against the frames

@torch.no_grad()
def lpips_distance(critics, a, b):
    """LPIPS (AlexNet) between image batches a, b (N, 3, H, W) in [0, 1] -> (N,)."""
    lp = critics.lpips
    dev = next(lp.parameters()).device
    return lp(a.to(dev, torch.float32) * 2 - 1, b.to(dev, torch.float32) * 2 - 1).flatten()


@torch.no_grad()
def s_recon(critics, lf):
    """1 - mean_k LPIPS(frame k, render of all Gaussians at camera k), clipped to [0, 1]."""
    return float((1 - lpips_distance(critics, own_view_renders(lf), lf.frames).mean()).clamp(0, 1))


# ----------------------------------------------------------------------------------------------------------------
# S_traj: the estimated camera path against the requested one

def _relative(c2w):
    return torch.linalg.inv(c2w[0]) @ c2w


def _pose_error(c2w_a, c2w_b):
    """Per-frame pose error |c_a - c_b| + geo(R_a, R_b) in radians, (F, 4, 4) x2 -> (F,)."""
    return (c2w_a[:, :3, 3] - c2w_b[:, :3, 3]).norm(dim=-1) + torch.deg2rad(noise_warp.geodesic_deg(c2w_a[:, :3, :3],
                                                                                         c2w_b[:, :3, :3]))


def s_traj(est_c2w, req_c2w, rot_scale=DEFAULTS["traj_rot_scale"], scene_depth=1.0,
           req_depth=noise_warp.PLANE_DEPTH, kappa=0.5):
    """How well the estimated camera path follows the requested one, in [0, 1], float64 inside:

        S   = exp(-(mean_i |c_hat_i - c_i| + mean_i geo(R_hat_i, R_i)) / tau)     L2 translation + geodesic rotation
        tau = kappa max(E_0, rad(theta) / 2),   E_0 = mean_i |c_i| + geo(I, R_i)  (the error of a still camera)

    est_c2w (F, 4, 4) from Depth Anything 3 in its units, F >= 2; req_c2w (M, 4, 4) in trajectory units,
    resampled to F frames (noise_warp.resample_path); theta = rot_scale (degrees). Both paths are taken relative to
    their first camera (this removes DA3's world frame), then each translation is divided by its scene depth: the
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
        req = noise_warp.resample_path(req, n)
    est, req = _relative(est), _relative(req)
    est[:, :3, 3] /= float(scene_depth)
    req[:, :3, 3] /= float(req_depth)
    err = _pose_error(est, req).mean()
    still = _pose_error(torch.eye(4, dtype=torch.float64, device=est.device).expand_as(req), req).mean()
    tau = kappa * torch.clamp(still, min=math.radians(rot_scale) / 2)
    return float(torch.exp(-err / tau))


# ----------------------------------------------------------------------------------------------------------------
# R_gen: HPSv3

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


def hpsv3_inputs(proc, images, prompts, pixels):
    """HPSv3's inputs for images (N, 3, H, W) in [0, 1] with their prompts, prompted as upstream (one image, then
    HPSV3_INSTRUCTION + HPSV3_REWARD_SUFFIX, chat template with the generation prompt); each image is resized by the
    processor to about `pixels` pixels (upstream: min_pixels = max_pixels = 256*28*28). -> the processor's batch
    (input_ids, attention_mask, pixel_values, image_grid_thw). toyworld.py trains the toy HPSv3 on these too."""
    msgs = [[{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": HPSV3_INSTRUCTION.format(text_prompt=p) + HPSV3_REWARD_SUFFIX}]}]
        for p in prompts]
    texts = [proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    return proc(text=texts, images=list(to_uint8(images).cpu()), return_tensors="pt", padding=True,
                size={"shortest_edge": pixels, "longest_edge": pixels})


@torch.no_grad()
def hpsv3_score(critics, images, prompts):
    """HPSv3 mu for images (N, 3, H, W) in [0, 1] with their prompts (hpsv3_inputs) -> (N,) float32."""
    model = critics.hps
    inp = hpsv3_inputs(critics.hps_proc, images, prompts, critics.hps_pixels).to(critics.device)
    inp["pixel_values"] = inp["pixel_values"].to(next(model.backbone.parameters()).dtype)
    return model(**inp)[:, 0].float().cpu()


# ----------------------------------------------------------------------------------------------------------------
# score: every component for a batch, never raising

class Kind(enum.Enum):
    """Why a video, or one term of it, has no score: a fixed set that train.py and evaluate.py branch on."""
    BAD_VIDEO = "bad_video"  # check_video: a wrong shape, one frame, black or constant; no critic runs
    NOT_FINITE = "not_finite"  # NaN or inf, in the video itself or in a critic's score
    CRITIC_FAILED = "critic_failed"  # a critic raised on this video's content
    NO_CAMERA_WORDS = "no_camera_words"  # the prompt names no camera motion: S_traj = 0, defined, the video is fine


@dataclass(frozen=True)
class Failure:
    """One reason: its kind, what it is about ("video", or a critic or term: lift, S_meta, S_recon, S_traj, HPSv3;
    evaluate.py's metric groups), and a detail for people (never parsed)."""
    kind: Kind
    what: str
    detail: str = ""

    @property
    def key(self):
        """What metrics.jsonl counts per step: "<what> <kind>"."""
        return f"{self.what} {self.kind.value}"

    def __str__(self):
        return self.key + (f" ({self.detail})" if self.detail else "")


def check_video(video):
    """Cheap up-front checks -> None, or the Failure that keeps the video from being scored. video (F, 3, H, W)."""
    if video.ndim != 4 or video.shape[1] != 3:
        return Failure(Kind.BAD_VIDEO, "video", f"shape {tuple(video.shape)}")
    if not torch.isfinite(video).all():
        return Failure(Kind.NOT_FINITE, "video", "NaN/Inf pixels")
    if video.shape[0] < 2:
        return Failure(Kind.BAD_VIDEO, "video", "one frame")
    if video.max() < 0.02:
        return Failure(Kind.BAD_VIDEO, "video", "black")
    if video.float().std() < 2 / 255:
        return Failure(Kind.BAD_VIDEO, "video", "constant")
    return None


def is_systemic(e):
    """A failure that is not about one video's content (a missing package, memory, the GPU itself): it stops the
    run instead of scoring the video, because every later video would fail the same way."""
    return isinstance(e, (ImportError, MemoryError, torch.OutOfMemoryError)) or (
        isinstance(e, RuntimeError) and any(s in str(e) for s in ("CUDA", "cuDNN", "NCCL", "out of memory")))


def guard(reasons, what, fn, *args, failed=math.nan):
    """Run one critic (or one of evaluate.py's metric groups) on one video. A failure, or a float that is not finite,
    gives `failed` and appends a Failure to `reasons`; a systemic failure (is_systemic) is raised."""
    try:
        v = fn(*args)
    except Exception as e:  # the per-video boundary: a critic that fails on one video's content must not stop the run
        if is_systemic(e):
            raise
        reasons.append(Failure(Kind.CRITIC_FAILED, what, f"{type(e).__name__}: {str(e)[:160]}"))
        return failed
    if isinstance(v, float) and not math.isfinite(v):
        reasons.append(Failure(Kind.NOT_FINITE, what))
        return failed
    return v


def combine(terms, dynamic=False, *, w_3d, w_meta, w_recon, w_gen):
    """The reward from its terms (tensors or floats; S_* already clipped to [0, 1]) -> (R_3D, total):
    R_3D = w_meta S_meta + w_recon S_recon + S_traj and total = w_3d R_3D + w_gen R_gen (dynamic: total = R_gen).
    score's last step, and what tools/toy_reward_check.py uses to recombine the same terms at other weights."""
    r_3d = w_meta * terms["S_meta"] + w_recon * terms["S_recon"] + terms["S_traj"]
    return r_3d, terms["R_gen"] if dynamic else w_3d * r_3d + w_gen * terms["R_gen"]


def score(critics, videos, prompts, paths, dynamic=False, *, lifts=None, seen=None, **settings):
    """videos (B, F, 3, H, W) in [0, 1]; prompts list[str]; paths: requested c2w (F, 4, 4) per video or None
    (no camera words); settings: any of SETTINGS and WEIGHTS, the rest as `defaults("small")` (the paper's); a term
    whose weight is 0 (S_meta, R_gen) is not computed and reads 0.
    -> (scores, reasons): scores a dict of float32 (B,) tensors S_meta, S_recon, S_traj, R_3D, R_gen, total and a
    bool (B,) tensor "bad"; reasons, per video, a list of Failure (empty when fine). dynamic=True skips R_3D
    (total = R_gen). A video whose content cannot be scored (check_video: black, constant, non-finite, one frame)
    or on which a critic fails or returns a non-finite value is "bad": its failed terms and its total are NaN, and
    the trainer gives it a score below every real video of its group (grpo.fill_bad). A prompt without camera words
    has S_traj = 0 (defined, not bad). A systemic failure (is_systemic: out of memory, CUDA, a missing package)
    raises. lifts: a Lift per video already computed (evaluate.py), so Depth Anything 3 does not run twice.
    seen: a list that receives per video what the 3D terms looked at (train.py's media; nothing is kept without it):
    {"meta_view": the render S_meta graded (3, h, w), "c2w": the estimated cameras (F, 4, 4), "scene_depth": the
    median depth of frame 0 that S_traj divides by}, as far as it got (empty for a bad video)."""
    if not len(videos) == len(prompts) == len(paths):
        raise ValueError(f"score: {len(videos)} videos, {len(prompts)} prompts, {len(paths)} paths; need one each")
    s = defaults("small")
    if set(settings) - set(s):
        raise TypeError(f"score: unknown settings {sorted(set(settings) - set(s))}; valid: {list(s)}")
    s.update(settings)
    keys = ("S_meta", "S_recon", "S_traj", "R_gen")
    out = {k: [0.0] * len(videos) for k in keys}
    all_reasons = []
    for i, video in enumerate(videos):
        reasons, kept = [], {}
        if seen is not None:
            seen.append(kept)
        try:
            bad = check_video(video)
        except Exception as e:  # not even a tensor of the right kind
            bad = Failure(Kind.BAD_VIDEO, "video", f"unreadable: {type(e).__name__}: {str(e)[:160]}")
        if bad:
            reasons.append(bad)
            for k in keys:
                out[k][i] = math.nan
        else:
            if not dynamic:
                lf = lifts[i] if lifts is not None else guard(reasons, "lift", lift, critics, video, failed=None)
                if lf is None:  # DA3 failed on this video's content
                    out["S_recon"][i] = out["S_meta"][i] = out["S_traj"][i] = math.nan
                else:
                    out["S_recon"][i] = guard(reasons, "S_recon", s_recon, critics, lf)
                    if s["w_meta"]:
                        out["S_meta"][i] = guard(reasons, "S_meta", s_meta, critics, lf, prompts[i], s["meta_angle"],
                                                 kept if seen is not None else None)
                    if seen is not None:
                        kept.update(c2w=lf.c2w.cpu(), scene_depth=float(lf.depth[0].median()))
                    if paths[i] is None:
                        reasons.append(Failure(Kind.NO_CAMERA_WORDS, "S_traj"))
                    else:
                        out["S_traj"][i] = guard(reasons, "S_traj", s_traj, lf.c2w, paths[i], s["traj_rot_scale"],
                                                 float(lf.depth[0].median()))
            k = min(s["gen_frames"], len(video))
            if s["w_gen"] or dynamic:
                out["R_gen"][i] = s["gen_scale"] * guard(reasons, "HPSv3", lambda: float(
                    hpsv3_score(critics, video[:k], [prompts[i]] * k).mean()))
        shown = [str(r) for r in reasons if r.kind is not Kind.NO_CAMERA_WORDS]  # that one is a defined S_traj = 0
        if shown:
            print(f"[reward] video {i} ({prompts[i][:60]!r}): {'; '.join(shown)}", flush=True)
        all_reasons.append(reasons)
    scores = {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}
    for k in ("S_meta", "S_recon", "S_traj"):
        scores[k] = scores[k].clamp(0, 1)
    weights = {w: s[w] for w in ("w_3d", "w_meta", "w_recon", "w_gen")}
    scores["R_3D"], scores["total"] = combine(scores, dynamic, **weights)
    scores["bad"] = ~torch.isfinite(scores["total"])
    return scores, all_reasons
