"""
Gaussian splatting for the reward: gsplat's CUDA rasterizer, and our own torch rasterizer beside it.
Imports common (collectives, for the start-up check); gsplat (CUDA only, its public `rasterization`).

`render` splats 3D Gaussians (means, wxyz quats, scales, opacities, RGB colours or spherical harmonics) into
pinhole cameras: gsplat on CUDA tensors, elsewhere (and with --renderer=torch) an exact tile-free EWA rasterizer
that composites in float64. The torch path is written out here in full with gsplat's conventions: covariance
(`covariance`), EWA projection with gsplat's Jacobian clamp and culling (`project`), its spherical-harmonic basis
(`sh_basis`, `sh_colors`), so that it needs no private gsplat code and serves as the reference every run's
renderer is checked against (`check_renderer`, at start-up on every rank). tests/test_splat.py compares each
piece with gsplat's own torch reference and the whole with a dense O(N * pixels) one.
"""
import math
import time

import common  # first: the torchvision fix
import torch
import torch.nn.functional as F

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
    chunks of at most `max_pairs` pairs, carrying each pixel's transmittance, so memory stays bounded. Covariance,
    projection, culling and SH colour are gsplat's (`covariance`, `project`, `sh_colors` below)."""
    means, dt, dev = gauss["means"], gauss["means"].dtype, gauss["means"].device
    covars = covariance(gauss["quats"], gauss["scales"])
    P = H * W
    rgbs, alphas, depths = [], [], []
    for view, K in zip(viewmats, Ks):
        radii, m2d, z, conic = project(means, covars, view, K, W, H, eps2d=0.3, near_plane=0.01)
        idx = torch.nonzero((radii > 0).all(-1))[:, 0]
        idx = idx[torch.argsort(z[idx].detach(), stable=True)]  # front to back
        if "sh" in gauss:
            dirs = means[idx] - torch.linalg.inv(view)[:3, 3]
            degree = math.isqrt(gauss["sh"].shape[1]) - 1
            col = torch.clamp_min(sh_colors(degree, dirs, gauss["sh"][idx]) + 0.5, 0)
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
        # per Gaussian: its box's first pixel, and that pixel centre's offset from the splat's centre
        corner, ox, oy = y0 * W + x0, x0.to(dt) + 0.5 - m2[:, 0], y0.to(dt) + 0.5 - m2[:, 1]
        col_c = col.double().t().unbind(0)  # channels apart: gathers and products on 1-D runs of pairs are fast
        zero = torch.zeros(P, dtype=torch.float64, device=dev)
        log_t, dep, rgb = zero, zero, [zero] * len(col_c)  # log transmittance so far, depth and colour, per pixel
        ends = torch.cumsum(cnt, 0)
        marks = torch.tensor(range(max_pairs, int(ends[-1]) if len(ends) else 0, max_pairs), device=dev)
        cuts = torch.searchsorted(ends, marks, right=True).tolist()
        at = lambda t, i: t.index_select(0, i)  # gathers; much faster than t[i] on CPU
        for a, b in zip([0] + cuts, cuts + [len(idx)]):
            if b <= a:
                continue
            n = cnt[a:b]
            gl = torch.repeat_interleave(torch.arange(a, b, device=dev), n)  # pair -> sorted-visible index
            if not len(gl):  # every box of the chunk is empty (clipped at the image's edge)
                continue
            local = torch.arange(len(gl), device=dev) - at(torch.cumsum(n, 0) - n, gl - a)  # place in its box
            w_box = at(bw, gl)
            row = torch.div(local, w_box, rounding_mode="floor")
            colx = local - row * w_box
            pix = at(corner, gl) + row * W + colx
            # alpha of every pair (its order does not matter yet), then the pairs sorted by pixel
            dx, dy = at(ox, gl) + colx, at(oy, gl) + row
            cn = at(cn_v, gl)
            sigma = 0.5 * (cn[:, 0] * dx * dx + cn[:, 2] * dy * dy) + cn[:, 1] * dx * dy
            alpha = torch.clamp_max(at(op, gl) * torch.exp(-sigma), 0.999)
            alpha = torch.where((sigma >= 0) & (alpha >= 1 / 255), alpha, 0).double()
            pix, o = torch.sort(pix, stable=True)  # stable: each pixel's run stays front to back
            gl, alpha = at(gl, o), at(alpha, o)
            la = torch.log1p(-alpha)
            ex = torch.cumsum(la, 0) - la  # exclusive cumsum over the whole chunk
            runs = torch.bincount(pix, minlength=P)
            first = (torch.cumsum(runs, 0) - runs).clamp_max(len(pix) - 1)  # each pixel's first pair
            # transmittance in front of each pair: exp(its pixel's log_t + the la of the pairs before it in its run)
            wgt = alpha * torch.exp(ex + at(log_t - at(ex, first), pix))
            rgb = [r.index_add(0, pix, at(ch, gl) * wgt) for r, ch in zip(rgb, col_c)]
            dep = dep.index_add(0, pix, at(zv, gl) * wgt)
            log_t = log_t.index_add(0, pix, la)
        acc = 1 - torch.exp(log_t)
        rgbs.append(torch.stack(rgb, -1).to(dt).view(H, W, -1))
        alphas.append(acc.to(dt).view(H, W, 1))
        depths.append((dep / acc.clamp_min(1e-10)).to(dt).view(H, W, 1))
    return torch.stack(rgbs), torch.stack(alphas), torch.stack(depths)


# ----------------------------------------------------------------------------------------------------------------
# The torch rasterizer's geometry and colour, in gsplat's conventions (its pure-torch reference, pinhole camera)

def quat_to_rotmat(quats):
    """Rotation matrices from quaternions q = (w, x, y, z), normalised first: quats (..., 4) -> R (..., 3, 3),
        R = [[1 - 2(y² + z²),  2(xy - wz),      2(xz + wy)    ],
             [2(xy + wz),      1 - 2(x² + z²),  2(yz - wx)    ],
             [2(xz - wy),      2(yz + wx),      1 - 2(x² + y²)]]."""
    w, x, y, z = F.normalize(quats, p=2, dim=-1).unbind(-1)
    R = torch.stack([1 - 2 * (y ** 2 + z ** 2), 2 * (x * y - w * z), 2 * (x * z + w * y),
                     2 * (x * y + w * z), 1 - 2 * (x ** 2 + z ** 2), 2 * (y * z - w * x),
                     2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x ** 2 + y ** 2)], dim=-1)
    return R.reshape(quats.shape[:-1] + (3, 3))


def covariance(quats, scales):
    """World covariances Σ = R S Sᵀ Rᵀ = M Mᵀ with M = R diag(s), R = quat_to_rotmat(q): quats (..., 4) wxyz,
    scales (..., 3) -> (..., 3, 3)."""
    M = quat_to_rotmat(quats) * scales[..., None, :]
    return M @ M.transpose(-1, -2)


def project(means, covars, viewmat, K, W, H, eps2d=0.3, near_plane=0.01, far_plane=1e10):
    """EWA projection of N Gaussians into one W x H pinhole camera, as gsplat projects them. means (N, 3) and
    covars (N, 3, 3) in the world, viewmat (4, 4) world-to-camera [R | t], K (3, 3) -> radii (N, 2) int, means2d
    (N, 2) pixels, depths (N,), conics (N, 3) = the upper triangle (xx, xy, yy) of the inverse 2D covariance:
        p = R m + t,  Σ_c = R Σ Rᵀ                              (camera frame; depth = p_z)
        means2d = (fx p_x + cx p_z, fy p_y + cy p_z) / p_z
        J = [[fx / p_z, 0, -fx x / p_z²], [0, fy / p_z, -fy y / p_z²]],  x = p_z clamp(p_x / p_z, -lx0, lx1), y alike
        Σ_2 = J Σ_c Jᵀ + eps2d I,  conics = Σ_2⁻¹,  radii = ceil(3.33 sqrt(diag Σ_2))
    with lx0 = cx / fx + 0.3 tan_x, lx1 = (W - cx) / fx + 0.3 tan_x, tan_x = W / (2 fx) (y alike): the Jacobian is
    taken no further out than 15% of the image beyond its edges, where the linearisation of a Gaussian far off to the
    side would blow its footprint up across the image. eps2d is the 0.3 px² low-pass blur. Culled, radii (0, 0):
    depth outside (near_plane, far_plane), det Σ_2 <= 0, or the radii box wholly off the image."""
    R, t = viewmat[:3, :3], viewmat[:3, 3]
    p = means @ R.T + t  # (N, 3)
    cov_c = R @ covars @ R.T  # (N, 3, 3)
    px, py, pz = p.unbind(-1)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    tan_x, tan_y = 0.5 * W / fx, 0.5 * H / fy
    x = pz * torch.clamp(px / pz, min=-(cx / fx + 0.3 * tan_x), max=(W - cx) / fx + 0.3 * tan_x)
    y = pz * torch.clamp(py / pz, min=-(cy / fy + 0.3 * tan_y), max=(H - cy) / fy + 0.3 * tan_y)
    zero = torch.zeros_like(pz)
    J = torch.stack([fx / pz, zero, -fx * x / pz ** 2, zero, fy / pz, -fy * y / pz ** 2], -1).view(-1, 2, 3)
    cov2d = J @ cov_c @ J.transpose(-1, -2) + eps2d * torch.eye(2, dtype=p.dtype, device=p.device)  # (N, 2, 2)
    means2d = p @ K[:2].T / pz[:, None]
    a, b, c = cov2d[:, 0, 0], 0.5 * (cov2d[:, 0, 1] + cov2d[:, 1, 0]), cov2d[:, 1, 1]
    det = cov2d[:, 0, 0] * cov2d[:, 1, 1] - cov2d[:, 0, 1] * cov2d[:, 1, 0]
    det_safe = det.clamp(min=1e-10)  # culled below; keeps a culled Gaussian's conic finite, as gsplat's
    conics = torch.stack([c / det_safe, -b / det_safe, a / det_safe], -1)
    radii = torch.ceil(3.33 * torch.sqrt(torch.stack([a, c], -1)))
    inside = ((means2d + radii > 0) & (means2d - radii < torch.tensor([W, H], device=p.device))).all(-1)
    keep = (det > 0) & (pz > near_plane) & (pz < far_plane) & inside
    return torch.where(keep[:, None], radii, 0).int(), means2d, pz, conics


def sh_basis(degree, dirs):
    """The real spherical-harmonic basis at unit directions dirs (..., 3) -> (..., (degree + 1)²) for
    degree 0-3, in gsplat's order, signs and constants (Sloan, "Efficient Spherical Harmonic Evaluation", JCGT 2013).
    With (x, y, z) = d, band l holds 2l + 1 functions, at index l² + l + m for m = -l..l:
        l = 0:  0.2821                                                     (1 / (2 sqrt(pi)))
        l = 1:  -0.4886 y, 0.4886 z, -0.4886 x                             (sqrt(3 / (4 pi)))
        l = 2:  1.0925 xy, -1.0925 yz, 0.3154 (3z² - 1), -1.0925 xz, 0.5463 (x² - y²)
        l = 3:  -0.5900 (3x²y - y³), 2.8906 xyz, -0.4570 y (5z² - 1), 0.3732 z (5z² - 3), -0.4570 x (5z² - 1),
                1.4453 z (x² - y²), -0.5900 (x³ - 3xy²)
    Written as gsplat writes it (the same products in the same order), so the values agree to the last bit."""
    if not 0 <= degree <= 3:
        raise ValueError(f"SH degree {degree}: only 0-3")
    x, y, z = dirs.unbind(-1)
    # DC is gsplat's literal 0.2820947917738781, one ulp below 1 / (2 sqrt(pi)) = SH_C0: the colours match gsplat's
    Y = [torch.full_like(x, 0.2820947917738781)]
    if degree >= 1:
        Y += [-0.48860251190292 * y, 0.48860251190292 * z, -0.48860251190292 * x]
    if degree >= 2:
        z2, b = z * z, -1.092548430592079 * z
        c1, s1 = x * x - y * y, 2 * x * y  # Re, Im (x + iy)²
        Y += [0.5462742152960395 * s1, b * y, 0.9461746957575601 * z2 - 0.3153915652525201, b * x,
              0.5462742152960395 * c1]
    if degree >= 3:
        c, b = -2.285228997322329 * z2 + 0.4570457994644658, 1.445305721320277 * z
        c2, s2 = x * c1 - y * s1, x * s1 + y * c1  # Re, Im (x + iy)³
        Y += [-0.5900435899266435 * s2, b * s1, c * y, z * (1.865881662950577 * z2 - 1.119528997770346), c * x,
              b * c1, -0.5900435899266435 * c2]
    return torch.stack(Y, -1)


def sh_colors(degree, dirs, coeffs):
    """View-dependent colour from SH coefficients, as gsplat evaluates it: dirs (..., 3) (any length), coeffs
    (..., K, C) with K >= (degree + 1)² -> (..., C) = sum_{k < (degree + 1)²} Y_k(dirs / |dirs|) coeffs_k; higher
    bands are ignored. The rasterizers add 0.5 and clamp at 0."""
    k = (degree + 1) ** 2
    return (sh_basis(degree, F.normalize(dirs, p=2, dim=-1))[..., None] * coeffs[..., :k, :]).sum(-2)


# ----------------------------------------------------------------------------------------------------------------
# The start-up check: a synthetic scene, the torch path on the CPU as the reference

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
    The reference is our torch rasterizer on the CPU (float64 compositing; tests/test_splat.py checks it against a
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
