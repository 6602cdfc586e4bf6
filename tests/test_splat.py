"""
Tests of splat.py, the Gaussian rasterizers: our covariance, projection and spherical harmonics against gsplat's own
torch reference (gsplat.cuda._torch_impl, imported here only), the torch rasterizer against a dense reference and
analytic cases, gradients, the start-up check's scene, and gsplat's CUDA kernels against the torch path.

    . .venv/bin/activate && python -m pytest tests/test_splat.py -q

Seconds on 2 CPU cores; the one CUDA test (gsplat vs the torch rasterizer) is skipped without a GPU.
"""
import math

import pytest
import torch
from gsplat.cuda._torch_impl import (_eval_sh_bases_fast, _fully_fused_projection, _quat_scale_to_covar_preci,
                                     _quat_to_rotmat, _spherical_harmonics)
from scipy.spatial.transform import Rotation

import splat
from test_reward import intrinsics, orbit, rot_y

# ---------------------------------------------------------------------------------------------------------------
# shared helpers


def random_gaussians(n, gen, dtype=torch.float64, depth=(3.0, 6.0), spread=1.0):
    """Gaussians in front of an identity camera (inside a ~60 deg frustum)."""
    z = depth[0] + (depth[1] - depth[0]) * torch.rand(n, generator=gen, dtype=dtype)
    xy = (torch.rand(n, 2, generator=gen, dtype=dtype) - 0.5) * spread * z[:, None] * 0.8
    q = torch.randn(n, 4, generator=gen, dtype=dtype)
    return dict(means=torch.cat([xy, z[:, None]], -1), quats=q / q.norm(dim=-1, keepdim=True),
                scales=0.05 + 0.15 * torch.rand(n, 3, generator=gen, dtype=dtype),
                opacities=0.3 + 0.65 * torch.rand(n, generator=gen, dtype=dtype),
                colors=torch.rand(n, 3, generator=gen, dtype=dtype))


def dense_render(g, viewmat, K, H, W):
    """Independent O(N*HW) reference: EWA projection written out here, every Gaussian at every pixel centre,
    per-pixel front-to-back compositing with a cumulative product."""
    w, x, y, z = (g["quats"] / g["quats"].norm(dim=-1, keepdim=True)).unbind(-1)
    R = torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
                     2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
                     2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)], -1).view(-1, 3, 3)
    M = R * g["scales"][:, None, :]
    cov_c = viewmat[:3, :3] @ (M @ M.transpose(1, 2)) @ viewmat[:3, :3].T
    t = g["means"] @ viewmat[:3, :3].T + viewmat[:3, 3]
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    tx, ty, tz = t.unbind(-1)
    J = torch.zeros(len(t), 2, 3, dtype=t.dtype)
    J[:, 0, 0], J[:, 0, 2], J[:, 1, 1], J[:, 1, 2] = fx / tz, -fx * tx / tz ** 2, fy / tz, -fy * ty / tz ** 2
    cov2 = J @ cov_c @ J.transpose(1, 2) + 0.3 * torch.eye(2, dtype=t.dtype)
    mu = torch.stack([fx * tx / tz + cx, fy * ty / tz + cy], -1)
    py, px = torch.meshgrid(torch.arange(H, dtype=t.dtype) + 0.5, torch.arange(W, dtype=t.dtype) + 0.5, indexing="ij")
    d = torch.stack([px, py], -1).view(1, -1, 2) - mu[:, None]  # (N, P, 2)
    sigma = 0.5 * torch.einsum("npi,nij,npj->np", d, torch.linalg.inv(cov2), d)
    alpha = (g["opacities"][:, None] * torch.exp(-sigma)).clamp(max=0.999)
    alpha = torch.where(alpha >= 1 / 255, alpha, torch.zeros_like(alpha))[torch.argsort(tz)]  # front to back
    T = torch.cumprod(torch.cat([torch.ones_like(alpha[:1]), 1 - alpha[:-1]]), 0)
    rgb = torch.einsum("np,nc->pc", alpha * T, g["colors"][torch.argsort(tz)])
    return rgb.view(H, W, 3), (1 - torch.prod(1 - alpha, 0)).view(H, W, 1)


def same(ours, ref):
    """Equal up to rounding: our code does gsplat's arithmetic in gsplat's order, but a CPU's matmul kernels may sum
    in another order (bitwise equal on an AMD EPYC; up to ~40 ulps apart on an Intel Xeon)."""
    eps = 64 * torch.finfo(ref.dtype).eps
    torch.testing.assert_close(ours, ref, rtol=eps, atol=eps)


# ---------------------------------------------------------------------------------------------------------------
# covariance, projection and SH against gsplat's torch reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_covariance_matches_gsplat(dtype):
    gen = torch.Generator().manual_seed(3)
    quats = torch.randn(500, 4, generator=gen, dtype=dtype) * 3  # not unit: both normalise
    scales = torch.rand(500, 3, generator=gen, dtype=dtype) * 0.3 + 0.01
    same(splat.quat_to_rotmat(quats), _quat_to_rotmat(quats))
    same(splat.covariance(quats, scales), _quat_scale_to_covar_preci(quats, scales, True, False)[0])
    R = splat.quat_to_rotmat(quats)
    torch.testing.assert_close(R @ R.transpose(-1, -2), torch.eye(3, dtype=dtype).expand(500, 3, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_project_matches_gsplat(dtype):
    """EWA projection into a camera with an off-centre principal point, on random Gaussians around and behind it
    and on special cases: a large Gaussian beyond the right edge where the Jacobian's x/z clamp acts yet the splat
    still reaches the image, one below the bottom edge (y/z clamp), one behind the near plane, one behind the camera
    and one far off the image (all three culled)."""
    gen = torch.Generator().manual_seed(4)
    view = torch.eye(4, dtype=dtype)
    view[:3, :3] = torch.tensor(Rotation.from_rotvec([0.1, -0.2, 0.05]).as_matrix(), dtype=dtype)
    view[:3, 3] = torch.tensor([0.3, -0.2, 0.5], dtype=dtype)
    K = torch.tensor([[50.0, 0, 30.0], [0, 55.0, 26.0], [0, 0, 1]], dtype=dtype)
    W, H = 64, 48
    cam = (torch.rand(400, 3, generator=gen, dtype=dtype) - 0.5) * torch.tensor([10.0, 10.0, 12.0], dtype=dtype)
    special = torch.tensor([[3.0, 0.0, 3.0],  # x/z = 1.0 > (W - cx) / fx + 0.3 W / (2 fx) = 0.872
                            [0.0, 2.4, 3.0],  # y/z = 0.8 > (H - cy) / fy + 0.3 H / (2 fy) = 0.531
                            [0.0, 0.0, 0.005],  # in front of the camera, behind the near plane (0.01)
                            [0.0, 0.0, -2.0],  # behind the camera
                            [40.0, 0.0, 3.0]], dtype=dtype)  # far off the image
    cam = torch.cat([special, cam])
    means = (cam - view[:3, 3]) @ view[:3, :3]  # world points that sit at `cam` in the camera
    quats = torch.randn(len(means), 4, generator=gen, dtype=dtype)
    scales = torch.rand(len(means), 3, generator=gen, dtype=dtype) * 0.3 + 0.01
    scales[:2] = 0.5  # the two edge Gaussians: ~8 px standard deviation, so they reach into the image
    covars = splat.covariance(quats, scales)
    radii, means2d, depths, conics = splat.project(means, covars, view, K, W, H)
    ref = [t[0] for t in _fully_fused_projection(means, covars, view[None], K[None], W, H, eps2d=0.3,
                                                 near_plane=0.01)[:4]]
    assert torch.equal(radii, ref[0]) and radii.dtype == torch.int32 and radii.shape == (len(means), 2)
    for ours, theirs in zip((means2d, depths, conics), ref[1:]):
        same(ours, theirs)
    visible = (radii > 0).all(-1)
    assert visible[:2].all() and not visible[2:5].any()
    assert 20 < int(visible.sum()) < len(means) - 20  # random points on both sides of the culling
    # the clamp acts: without it the edge Gaussians' conics would differ (the Jacobian taken at their true x/z)
    p = means @ view[:3, :3].T + view[:3, 3]
    fx, fy = K[0, 0], K[1, 1]
    zero = torch.zeros_like(p[:, 2])
    J = torch.stack([fx / p[:, 2], zero, -fx * p[:, 0] / p[:, 2] ** 2, zero, fy / p[:, 2],
                     -fy * p[:, 1] / p[:, 2] ** 2], -1).view(-1, 2, 3)
    cov2d = J @ view[:3, :3] @ covars @ view[:3, :3].T @ J.transpose(1, 2) + 0.3 * torch.eye(2, dtype=dtype)
    unclamped = torch.stack([cov2d[:, 1, 1], -cov2d[:, 0, 1], cov2d[:, 0, 0]], -1) / torch.linalg.det(cov2d)[:, None]
    assert ((unclamped[:2] - conics[:2]).abs().amax(-1) > 0.05 * conics[:2].abs().amax(-1)).all()  # 8%, 14%
    inner = visible & ((means2d > 0) & (means2d < torch.tensor([W, H], dtype=dtype))).all(-1)
    assert inner.sum() > 10
    torch.testing.assert_close(unclamped[inner], conics[inner])  # inside the image the clamp changes nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sh_basis_and_colours_match_gsplat(dtype):
    """Degrees 0-3: the basis on unit directions; the colours on random directions of random lengths (both normalise
    them), coefficients with exactly the degree's bands and with all 16 (the higher ones ignored)."""
    gen = torch.Generator().manual_seed(6)
    dirs = torch.randn(300, 3, generator=gen, dtype=dtype) * torch.rand(300, 1, generator=gen, dtype=dtype) * 5
    coeffs = torch.randn(300, 16, 3, generator=gen, dtype=dtype)
    for degree in range(4):
        k = (degree + 1) ** 2
        unit = torch.nn.functional.normalize(dirs, dim=-1)
        basis = splat.sh_basis(degree, unit)
        assert basis.shape == (300, k)
        same(basis, _eval_sh_bases_fast(k, unit))
        same(splat.sh_colors(degree, dirs, coeffs[:, :k]), _spherical_harmonics(degree, dirs, coeffs[:, :k]))
        same(splat.sh_colors(degree, dirs, coeffs), _spherical_harmonics(degree, dirs, coeffs))
    # the DC band is gsplat's constant, one ulp from 1 / (2 sqrt(pi)) = SH_C0
    assert abs(float(splat.sh_basis(0, dirs.double())[0, 0]) - splat.SH_C0) <= math.ulp(splat.SH_C0)
    with pytest.raises(ValueError, match="only 0-3"):
        splat.sh_basis(4, dirs)


# ---------------------------------------------------------------------------------------------------------------
# rasterizer


def test_rasterizer_matches_dense_reference():
    gen = torch.Generator().manual_seed(0)
    g = random_gaussians(25, gen)
    views = torch.stack([torch.eye(4, dtype=torch.float64), torch.linalg.inv(orbit(2, 8.0, 4.0)[1])])
    K = intrinsics(2, f=30.0, h=20, w=24, dtype=torch.float64)
    rgb, alpha, depth = splat.render(g, views, K, 20, 24, with_depth=True)
    for c in range(2):
        ref_rgb, ref_alpha = dense_render(g, views[c], K[c], 20, 24)
        assert (rgb[c] - ref_rgb).abs().max() < 1e-9
        assert (alpha[c] - ref_alpha).abs().max() < 1e-9
    assert alpha.max() > 0.5 and torch.isfinite(depth).all()
    # depth-ordered chunks with carried transmittance give the same image as one chunk
    chunked = splat._render_torch(g, views, K, 20, 24, max_pairs=37)
    assert (chunked[0] - rgb).abs().max() < 1e-12 and (chunked[1] - alpha).abs().max() < 1e-12


def test_rasterizer_gradcheck():
    gen = torch.Generator().manual_seed(1)
    g = random_gaussians(3, gen, spread=0.5)
    view, K = torch.eye(4, dtype=torch.float64)[None], intrinsics(1, f=12.0, h=8, w=10, dtype=torch.float64)
    names = ["means", "quats", "scales", "opacities", "colors"]

    def f(*xs):
        rgb, alpha = splat.render(dict(zip(names, xs)), view, K, 8, 10)
        return rgb, alpha

    assert torch.autograd.gradcheck(f, [g[k].clone().requires_grad_() for k in names], eps=1e-6, atol=1e-6)


def test_single_gaussian_lands_on_its_analytic_pixel():
    view = torch.eye(4, dtype=torch.float64)
    view[:3, :3] = torch.tensor(Rotation.from_rotvec([0.1, -0.2, 0.05]).as_matrix())
    view[:3, 3] = torch.tensor([0.3, -0.2, 0.5])
    X = torch.tensor([0.4, 0.25, 5.0], dtype=torch.float64)
    Xw = view[:3, :3].T @ (X - view[:3, 3])  # the world point that sits at X in the camera
    K = torch.tensor([[50.0, 0, 33.3], [0, 55.0, 30.1], [0, 0, 1]], dtype=torch.float64)
    u, v = (K[0, 0] * X[0] / X[2] + K[0, 2]).item(), (K[1, 1] * X[1] / X[2] + K[1, 2]).item()
    g = dict(means=Xw[None], quats=torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
             scales=torch.full((1, 3), 0.1, dtype=torch.float64), opacities=torch.tensor([0.8], dtype=torch.float64),
             colors=torch.tensor([[1.0, 0.5, 0.25]], dtype=torch.float64))
    rgb, alpha = splat.render(g, view[None], K[None], 64, 64)
    a = alpha[0, ..., 0]
    ys, xs = torch.meshgrid(torch.arange(64.0, dtype=torch.float64), torch.arange(64.0, dtype=torch.float64),
                            indexing="ij")
    # pixel j covers [j, j+1): a Gaussian at u has its alpha centroid at pixel index u - 0.5
    assert abs((a * xs).sum() / a.sum() - (u - 0.5)) < 0.02 and abs((a * ys).sum() / a.sum() - (v - 0.5)) < 0.02
    assert int(a.argmax()) == int(v) * 64 + int(u)
    assert torch.allclose(rgb[0].amax((0, 1)), torch.tensor([1.0, 0.5, 0.25], dtype=torch.float64) * a.max())
    # SH degree 0 renders as colour = C0 * coefficient + 0.5, as gsplat
    sh = dict(g, sh=((g.pop("colors") - 0.5) / 0.28209479177387814)[:, None, :])
    assert torch.allclose(splat.render(sh, view[None], K[None], 64, 64)[0], rgb, atol=1e-12)


def random_sh(n, gen, degree=2, dtype=torch.float32):
    """(N, K, 3) SH coefficients: DC colours 0.2-0.8, every higher band non-zero (+-0.3)."""
    sh = (torch.rand(n, (degree + 1) ** 2, 3, generator=gen, dtype=dtype) - 0.5) * 0.6
    sh[:, 0] = (torch.rand(n, 3, generator=gen, dtype=dtype) * 0.6 - 0.3) / splat.SH_C0
    return sh


def psnr(a, b):
    return 10 * math.log10(1 / float(((a.clamp(0, 1) - b.clamp(0, 1)) ** 2).mean()))


def test_sh_colour_is_seen_from_each_camera_centre():
    """One small Gaussian with degree-2 SH seen by two cameras at different positions: its peak colour is
    (opacity-weighted) SH_2(mean - camera centre) + 0.5, the direction from each camera's own centre (gsplat's rule),
    and the two views' colours differ."""
    gen = torch.Generator().manual_seed(5)
    mean = torch.tensor([[0.1, -0.05, 3.0]], dtype=torch.float64)
    g = dict(means=mean, quats=torch.tensor([[1.0, 0, 0, 0]], dtype=torch.float64),
             scales=torch.full((1, 3), 0.2, dtype=torch.float64), opacities=torch.tensor([0.9], dtype=torch.float64),
             sh=random_sh(1, gen, dtype=torch.float64))
    c2w = torch.eye(4, dtype=torch.float64).repeat(2, 1, 1)
    c2w[1, :3, :3] = rot_y(math.radians(40))
    c2w[1, :3, 3] = mean[0] - c2w[1, :3, 2] * 3.0  # orbited 40 degrees about the Gaussian
    rgb, alpha = splat.render(g, torch.linalg.inv(c2w), intrinsics(2, dtype=torch.float64), 64, 64)
    for c in range(2):
        expected = _spherical_harmonics(2, mean - c2w[c, :3, 3], g["sh"]).clamp_min(-0.5)[0] + 0.5
        peak = int(alpha[c, ..., 0].argmax())
        assert torch.allclose(rgb[c].view(-1, 3)[peak], expected * alpha[c].view(-1)[peak], atol=1e-12)
    assert (rgb[0].amax((0, 1)) - rgb[1].amax((0, 1))).abs().max() > 0.05


def test_renderer_check_scene_has_view_dependent_colour():
    """splat.synthetic_scene (what check_renderer compares gsplat with) holds degree-2 SH whose higher bands matter:
    a renderer that dropped them (DC colour only) would score about 26 dB, far under the check's 40."""
    gs, w2c, K = splat.synthetic_scene()
    assert gs["sh"].shape == (2000, 9, 3) and (gs["sh"][:, 1:].abs() > 1e-3).float().mean() > 0.98
    full, alpha = splat.render(gs, w2c, K, 64, 64, backend="torch")
    dc_only = splat.render(dict(gs, sh=torch.cat([gs["sh"][:, :1], torch.zeros_like(gs["sh"][:, 1:])], 1)), w2c, K,
                            64, 64, backend="torch")[0]
    assert psnr(full, dc_only) < 30
    assert alpha.mean() > 0.3  # the scene fills the views
    assert len({tuple(torch.linalg.inv(v)[:3, 3].tolist()) for v in w2c}) == 3  # three camera positions


@pytest.mark.skipif(not torch.cuda.is_available(), reason="gsplat needs CUDA")
def test_gsplat_matches_torch_rasterizer():
    """gsplat's CUDA kernels (render_mode RGB+ED, sh_degree=2) against our torch rasterizer on the CPU, on Gaussians
    with random degree-2 SH seen from two camera positions, so view-dependent colour is part of what must agree."""
    gen = torch.Generator().manual_seed(2)
    g = {k: v.float() for k, v in random_gaussians(500, gen).items() if k != "colors"}
    g["sh"] = random_sh(500, gen)
    views, K = torch.eye(4).repeat(2, 1, 1), intrinsics(2, f=60.0)
    views[1, 0, 3] = 0.2
    views[1, :3, :3] = rot_y(math.radians(3)).float()
    (rgb_a, alpha_a, depth_a) = splat.render({k: v.cuda() for k, v in g.items()}, views.cuda(), K.cuda(), 64, 64,
                                              backend="gsplat", with_depth=True)
    (rgb_b, alpha_b, depth_b) = splat.render(g, views, K, 64, 64, backend="torch", with_depth=True)
    rgb_a, alpha_a, depth_a = rgb_a.cpu(), alpha_a.cpu(), depth_a.cpu()
    # gsplat stops a pixel at transmittance 1e-4 and accumulates in float32: small differences only
    assert (rgb_a - rgb_b).abs().max() < 2e-3 and (alpha_a - alpha_b).abs().max() < 2e-3
    assert psnr(rgb_a, rgb_b) > 40
    seen = alpha_b > 0.5
    assert ((depth_a - depth_b).abs() / depth_b)[seen].max() < 1e-3
    assert "matches the torch rasterizer" in splat.check_renderer(torch.device("cuda"))
