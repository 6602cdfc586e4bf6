"""
The World-R1 rewards, in-process: a 3D reward from Depth Anything 3 + 3D Gaussians, and HPSv3 for quality.
Imports common, noise_warp (path geometry) and models (the critics, for the demo at the bottom); gsplat to render.

    R     = w_3d * R_3D + w_gen * R_gen          (dynamic phase: R = R_gen)
    R_3D  = w_meta * S_meta + S_recon + S_traj   each clipped to [0, 1], so R_3D in [0, 3]; w_meta = 1
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

The critics themselves are built and loaded in models.py (RewardModels, load_reward_models).
"""
import math
import time
from dataclasses import dataclass

import common  # first: the torchvision fix, before transformers / lpips import it
import torch
import torch.nn.functional as F

import models
import noise_warp

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

# The reward's settings, declared once ({name: (default, what it is)}): score's defaults, train.py's flags, and
# evaluate.py's defaults for a checkpoint that does not name them.
SETTINGS = {
    "w_3d": (1.0, "weight of R_3D = w_meta S_meta + S_recon + S_traj"),
    "w_meta": (1.0, "weight of S_meta inside R_3D (0: Qwen3-VL is not run)"),
    "w_gen": (1.0, "weight of R_gen (0: HPSv3 is not run)"),
    "gen_frames": (4, "HPSv3 averages the first K frames"),
    "gen_scale": (0.1, "HPSv3 mu is multiplied by this"),
    "meta_angle": (15.0, "meta view orbit angle, degrees"),
    "traj_rot_scale": (10.0, "S_traj: a 'fixed' request is judged as strictly as a pan of this many degrees"),
}
DEFAULTS = {name: default for name, (default, _) in SETTINGS.items()}
# Where a size departs from them. The toy world has no VLM and no preference model that grade what Qwen3-VL and
# HPSv3 grade (a rendered view's 3D quality, human preference), so its reward is S_recon + S_traj, the two terms its
# trained Depth Anything 3 measures (docs/DESIGN.md, "The toy world").
SIZE_SETTINGS = {"toy": dict(w_meta=0.0, w_gen=0.0)}


def defaults(size):
    """The reward settings of a --size: DEFAULTS with the size's departures."""
    return {**DEFAULTS, **SIZE_SETTINGS.get(size, {})}


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
    f_world(d) = f_cam(R^T d). Fitted by least squares on gsplat's own SH basis at 64 fixed directions (exact:
    each band is rotation-invariant); DA3 uses e3nn's Wigner-D here."""
    from gsplat.cuda._torch_impl import _eval_sh_bases_fast
    k = (degree + 1) ** 2
    d = F.normalize(torch.randn(64, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=-1)
    d = d.to(R.device)
    B = _eval_sh_bases_fast(k, d)  # (64, K)
    B_rot = _eval_sh_bases_fast(k, torch.einsum("fji,nj->fni", R.double(), d))  # Y(R^T d): (F, 64, K)
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


def _lift_size(h, w, res):
    """DA3's preprocessing size: longest side -> res, then each side to the nearest multiple of 14."""
    s = res / max(h, w)
    return max(14, round(h * s / 14) * 14), max(14, round(w * s / 14) * 14)


@torch.no_grad()
def lift(critics, video):
    """video (F, 3, H, W) in [0, 1] -> Lift. DA3 is called directly on ImageNet-normalised frames (its
    `inference()` wraps fp16 autocast on CPU); its extrinsics are world-to-camera 3x4 OpenCV."""
    dev = critics.device
    h, w = _lift_size(*video.shape[-2:], critics.process_res)
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


def lift_from_depth(frames, depth, K, c2w):
    """A Lift from known depth and cameras, for the synthetic scenes of the tests: Gaussians by unprojection."""
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


def _render_gsplat(gauss, viewmats, Ks, H, W):
    from gsplat import rasterization
    f32 = lambda t: t.float()
    colors, deg = (gauss["sh"], math.isqrt(gauss["sh"].shape[1]) - 1) if "sh" in gauss else (gauss["colors"], None)
    out, alpha, _ = rasterization(f32(gauss["means"]), f32(gauss["quats"]), f32(gauss["scales"]),
                                  f32(gauss["opacities"]), f32(colors), f32(viewmats), f32(Ks), W, H,
                                  near_plane=0.01, eps2d=0.3, sh_degree=deg, packed=False, render_mode="RGB+ED",
                                  rasterize_mode="classic")
    return out[..., :3], alpha, out[..., 3:]


def _render_torch(gauss, viewmats, Ks, H, W, max_pairs=1 << 22):
    """Exact EWA splatting without tiles: enumerate (Gaussian, pixel) pairs inside each splat's alpha >= 1/255 box,
    sort them by pixel with Gaussians pre-sorted front to back, and composite with a segmented exclusive cumsum
    of log(1 - alpha) in float64 (float32 cancels catastrophically over long runs). Gaussians go in depth-ordered
    chunks of at most `max_pairs` pairs, carrying each pixel's transmittance, so memory stays bounded."""
    from gsplat.cuda._torch_impl import _fully_fused_projection, _quat_scale_to_covar_preci, _spherical_harmonics
    means, dt, dev = gauss["means"], gauss["means"].dtype, gauss["means"].device
    covars, _ = _quat_scale_to_covar_preci(gauss["quats"], gauss["scales"], True, False)
    P = H * W
    rgbs, alphas, depths = [], [], []
    for view, K in zip(viewmats, Ks):
        radii, m2d, z, conic, _ = _fully_fused_projection(means, covars, view[None], K[None], W, H, eps2d=0.3,
                                                          near_plane=0.01)
        radii, m2d, z, conic = radii[0], m2d[0], z[0], conic[0]
        idx = torch.nonzero((radii > 0).all(-1))[:, 0]
        idx = idx[torch.argsort(z[idx].detach(), stable=True)]  # front to back
        if "sh" in gauss:
            dirs = means[idx] - torch.linalg.inv(view)[:3, 3]
            degree = math.isqrt(gauss["sh"].shape[1]) - 1
            col = torch.clamp_min(_spherical_harmonics(degree, dirs, gauss["sh"][idx]) + 0.5, 0)
        else:
            col = gauss["colors"][idx]
        m2, cn_v, op, zv = m2d[idx], conic[idx], gauss["opacities"][idx], z[idx].double()  # visible, front to back
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


SH_C0 = 0.28209479177387814  # the degree-0 spherical-harmonic basis, 1 / (2 sqrt(pi)): colour = SH_C0 * c + 0.5


def synthetic_scene(n=2000, device="cpu", seed=0, sh_degree=2):
    """A small random scene for renderer checks: n Gaussians 2-4 units in front of the origin, coloured as DA3's
    Gaussian head colours them, by degree-2 spherical harmonics (N, 9, 3): the DC band gives 0.2-0.8, every higher
    band is non-zero (uniform in +-0.3), so each Gaussian's colour depends on the direction it is seen from. Three
    cameras (w2c) orbit the scene's centre 10 degrees apart (each from its own position), 64x64 pinhole K."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.rand(n, 3, generator=gen) * torch.tensor([2.0, 2.0, 2.0]) + torch.tensor([-1.0, -1.0, 2.0])
    quats = F.normalize(torch.randn(n, 4, generator=gen), dim=-1)
    k = (sh_degree + 1) ** 2
    sh = (torch.rand(n, k, 3, generator=gen) - 0.5) * 0.6  # (N, K, 3)
    sh[:, 0] = (torch.rand(n, 3, generator=gen) * 0.6 - 0.3) / SH_C0
    gs = dict(means=means, quats=quats, scales=torch.rand(n, 3, generator=gen) * 0.03 + 0.01,
              opacities=torch.rand(n, generator=gen) * 0.5 + 0.4, sh=sh)
    centre, c2w = torch.tensor([0.0, 0.0, 3.0]), torch.eye(4).repeat(3, 1, 1)
    for i, deg in enumerate((-10.0, 0.0, 10.0)):
        a = math.radians(deg)
        c2w[i, :3, :3] = torch.tensor([[math.cos(a), 0, math.sin(a)], [0, 1, 0], [-math.sin(a), 0, math.cos(a)]])
        c2w[i, :3, 3] = centre - c2w[i, :3, 2] * 3.0  # 3 units back along its optical axis from the centre
    K = torch.tensor([[60.0, 0, 32], [0, 60.0, 32], [0, 0, 1]]).repeat(3, 1, 1)
    return {k: v.to(device) for k, v in gs.items()}, torch.linalg.inv(c2w).to(device), K.to(device)


def check_renderer(device, backend="auto"):
    """Build the renderer this process will use and prove it on a synthetic scene, before any training step.
    The reference is our torch rasterizer on the CPU (float64 compositing; tests/test_reward.py checks it against a
    dense reference), with view-dependent degree-2 SH colour as every real reward renders. On CUDA the renderer the
    run will use (gsplat, whose kernels are compiled on first use by torch's JIT and need nvcc; or the torch path
    with --renderer=torch) must match it at PSNR > 40 dB. Sets RENDERER; returns a one-line summary; any failure
    stops the run with a line saying what to do (a reward with a broken renderer would train on zeros)."""
    global RENDERER
    device = torch.device(device)
    if backend == "gsplat" and device.type != "cuda":
        raise SystemExit("error: --renderer=gsplat needs a CUDA device; use --renderer=torch (or auto) on a CPU")
    gs, w2c, K = synthetic_scene()
    try:
        ref, _ = render(gs, w2c, K, 64, 64, backend="torch")
    except Exception as e:  # the per-run boundary: a renderer that cannot run must stop the run, with the reason
        raise SystemExit(f"error: the torch Gaussian rasterizer failed on a synthetic scene ({type(e).__name__}: "
                         f"{str(e)[:200]})") from None
    if not bool(torch.isfinite(ref).all()) or float(ref.amax()) <= 0:
        raise SystemExit("error: the torch Gaussian rasterizer rendered an empty or non-finite synthetic scene")
    if device.type != "cuda":
        RENDERER = "torch"
        return "renderer: torch rasterizer (checked on a synthetic scene of degree-2 SH Gaussians)"
    name = "gsplat" if backend in ("auto", "gsplat") else "torch"
    try:
        t0 = time.time()
        out, _ = render({k: v.to(device) for k, v in gs.items()}, w2c.to(device), K.to(device), 64, 64, backend=name)
        torch.cuda.synchronize(device)
        seconds = time.time() - t0
    except Exception as e:  # ImportError, a failed nvcc build, a CUDA error: all mean "no gsplat here"
        if name == "torch":
            raise SystemExit(f"error: the torch Gaussian rasterizer failed on {device} ({type(e).__name__}: "
                             f"{str(e)[:200]})") from None
        raise SystemExit(f"error: gsplat could not render ({type(e).__name__}: {str(e)[:200]}); install a CUDA "
                         "toolkit (nvcc) that matches torch's CUDA so gsplat can build its kernels, or pass "
                         "--renderer=torch") from None
    mse = float(((out.cpu().clamp(0, 1) - ref.clamp(0, 1)) ** 2).mean())
    psnr = 10 * math.log10(1 / max(mse, 1e-12))
    if psnr <= 40:
        raise SystemExit(f"error: {name} on {device} and the torch rasterizer on the CPU disagree on a synthetic scene "
                         f"(PSNR {psnr:.1f} dB <= 40); check the gsplat build, or pass --renderer=torch")
    RENDERER = name
    return (f"renderer: {name}, matches the torch rasterizer at {psnr:.1f} dB on degree-2 SH Gaussians (first call"
            f"{' incl. build' if name == 'gsplat' else ''} {seconds:.1f} s)")


def check_renderer_on_every_rank(device, backend, rank, local_rank):
    """Collective check_renderer in three turns, so that at most one process builds gsplat's CUDA kernels in any one
    extensions folder (gsplat deletes a build folder that holds no finished library, so two builders in one folder
    destroy each other's work): global rank 0 first; then the first rank of every other node (where
    TORCH_EXTENSIONS_DIR is shared by all nodes, a home directory say, they only load rank 0's build; where it is
    node-local, each builds its node's once); then every other rank (they load their node's build). A failure on
    any rank stops every rank with its line at the end of that turn."""
    turn = 0 if rank == 0 else 1 if local_rank == 0 else 2
    for t in range(3):
        error = ""
        if t == turn:
            try:
                print(f"[rank {rank}] " + check_renderer(device, backend), flush=True)
            except SystemExit as e:
                error = str(e.code)
        common.stop_together(error)


# ----------------------------------------------------------------------------------------------------------------
# The three 3D terms

@torch.no_grad()
def lpips_distance(critics, a, b):
    """LPIPS (AlexNet) between image batches a, b (N, 3, H, W) in [0, 1] -> (N,)."""
    lp = critics.lpips
    dev = next(lp.parameters()).device
    return lp(a.to(dev, torch.float32) * 2 - 1, b.to(dev, torch.float32) * 2 - 1).flatten()


@torch.no_grad()
def own_view_renders(lf):
    """All Gaussians rendered at each frame's own estimated camera: (F, 3, h, w) in [0, 1], beside lf.frames."""
    h, w = lf.frames.shape[-2:]
    rgb, _ = render(lf.gaussians, lf.w2c, lf.K, h, w)  # (F, h, w, 3)
    return rgb.clamp(0, 1).permute(0, 3, 1, 2)


@torch.no_grad()
def s_recon(critics, lf):
    """1 - mean_k LPIPS(frame k, render of all Gaussians at camera k), clipped to [0, 1]."""
    return float((1 - lpips_distance(critics, own_view_renders(lf), lf.frames).mean()).clamp(0, 1))


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
def meta_view(lf, angle=DEFAULTS["meta_angle"]):
    """The render S_meta grades: all Gaussians seen from meta_camera, at the middle camera's intrinsics and the lift
    resolution -> (3, h, w), not clamped (qwen_grade takes uint8 levels of it)."""
    h, w = lf.frames.shape[-2:]
    view = meta_camera(lf.c2w, lf.depth, angle)
    rgb, _ = render(lf.gaussians, torch.linalg.inv(view)[None], lf.K[len(lf.K) // 2][None], h, w)
    return rgb[0].permute(2, 0, 1)


@torch.no_grad()
def s_meta(critics, lf, prompt, angle=DEFAULTS["meta_angle"], keep=None):
    """Qwen3-VL's grade of the render from the meta view (meta_view); keep: a dict that receives the render
    (train.py's media)."""
    image = meta_view(lf, angle)
    if keep is not None:
        keep["meta_view"] = image.cpu()
    return qwen_grade(critics, image, prompt)


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

@torch.no_grad()
def hpsv3_score(critics, images, prompts):
    """HPSv3 mu for images (N, 3, H, W) in [0, 1] with their prompts -> (N,) float32, prompted as upstream
    (one image, then HPSV3_INSTRUCTION + HPSV3_REWARD_SUFFIX, chat template with the generation prompt). Each image
    is resized by the processor to about `hps_pixels` pixels (upstream: min_pixels = max_pixels = 256*28*28)."""
    proc, model = critics.hps_proc, critics.hps
    msgs = [[{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": HPSV3_INSTRUCTION.format(text_prompt=p) + HPSV3_REWARD_SUFFIX}]}]
        for p in prompts]
    texts = [proc.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in msgs]
    px = critics.hps_pixels
    inp = proc(text=texts, images=list(to_uint8(images).cpu()), return_tensors="pt", padding=True,
               size={"shortest_edge": px, "longest_edge": px}).to(critics.device)
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


def guard(reasons, what, fn, *args, failed=math.nan):
    """Run one critic (or one of evaluate.py's metric groups) on one video. A failure, or a float that is not finite,
    gives `failed` and appends a reason; a systemic failure (is_systemic) is raised."""
    try:
        v = fn(*args)
    except Exception as e:  # the per-video boundary: a critic that fails on one video's content must not stop the run
        if is_systemic(e):
            raise
        reasons.append(f"{what} failed: {type(e).__name__}: {str(e)[:160]}")
        return failed
    if isinstance(v, float) and not math.isfinite(v):
        reasons.append(f"{what} not finite")
        return failed
    return v


def score(critics, videos, prompts, paths, dynamic=False, *, lifts=None, seen=None, **settings):
    """videos (B, F, 3, H, W) in [0, 1]; prompts list[str]; paths: requested c2w (F, 4, 4) per video or None
    (no camera words); settings: any of SETTINGS (w_3d, w_meta, w_gen, gen_frames, gen_scale, meta_angle,
    traj_rot_scale), the rest at their defaults; a term whose weight is 0 (S_meta, R_gen) is not computed and reads 0.
    -> (scores, reasons): scores a dict of float32 (B,) tensors S_meta, S_recon, S_traj, R_3D, R_gen, total and a
    bool (B,) tensor "bad"; reasons a list[str] ("" when fine). dynamic=True skips R_3D
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
    if set(settings) - set(DEFAULTS):
        raise TypeError(f"score: unknown settings {sorted(set(settings) - set(DEFAULTS))}; valid: {list(DEFAULTS)}")
    s = {**DEFAULTS, **settings}
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
            bad = f"unreadable video: {type(e).__name__}: {str(e)[:160]}"
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
                        reasons.append("no camera words")
                    else:
                        out["S_traj"][i] = guard(reasons, "S_traj", s_traj, lf.c2w, paths[i], s["traj_rot_scale"],
                                                 float(lf.depth[0].median()))
            k = min(s["gen_frames"], len(video))
            if s["w_gen"] or dynamic:
                out["R_gen"][i] = s["gen_scale"] * guard(reasons, "HPSv3", lambda: float(
                    hpsv3_score(critics, video[:k], [prompts[i]] * k).mean()))
        reason = "; ".join(r for r in reasons if r)
        if reason and reason != "no camera words":  # that one is a defined S_traj = 0; train.py says it once
            print(f"[reward] video {i} ({prompts[i][:60]!r}): {reason}", flush=True)
        all_reasons.append(reason)
    scores = {k: torch.tensor(v, dtype=torch.float32) for k, v in out.items()}
    for k in ("S_meta", "S_recon", "S_traj"):
        scores[k] = scores[k].clamp(0, 1)
    scores["R_3D"] = s["w_meta"] * scores["S_meta"] + scores["S_recon"] + scores["S_traj"]
    scores["total"] = scores["R_gen"] if dynamic else s["w_3d"] * scores["R_3D"] + s["w_gen"] * scores["R_gen"]
    scores["bad"] = ~torch.isfinite(scores["total"])
    return scores, all_reasons


# ----------------------------------------------------------------------------------------------------------------
# Toy reward for learning tests

def toy_reward(latents):
    """Mean of the final latents' first channel: (B, 16, T, h, w) -> (B,). For train.py's fast tests.

    It tests the RL loop alone, in seconds: a latent channel's mean is a target the policy reaches by a steady
    shift of its velocity, so the reward must rise if log-probs, advantages and updates are right. 30 tiny steps
    take ~30 s on 2 CPU cores, ~110 s with the world reward (whose own learning test is in tests/test_train.py)."""
    return latents.float()[:, 0].mean(dim=(1, 2, 3)).cpu()


if __name__ == "__main__":  # tiny critics on a random video: every component and the time per stage
    t0 = time.time()
    critics = models.load_reward_models("tiny")
    t1 = time.time()
    videos = torch.rand(2, 9, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    scores, reasons = score(critics, videos, ["a cat in a room"] * 2,
                            [None, torch.eye(4, dtype=torch.float64).repeat(9, 1, 1)])
    t2 = time.time()
    print({k: v.tolist() for k, v in scores.items()}, reasons)
    print(f"load {t1 - t0:.1f}s, score(2 videos of 9x64x64) {t2 - t1:.1f}s")
