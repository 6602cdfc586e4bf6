"""
Weight-free tests of reward.py: the SH rotation of the lift, the camera maths against scipy, a synthetic-scene
round trip through the depth lift and the three 3D terms, and the tiny DA3 / Qwen3-VL / HPSv3 critics end to end,
including every bad-video path (the rasterizers are tested in tests/test_splat.py).

    . .venv/bin/activate && python -m pytest tests/test_reward.py -q -s     (-s shows the timings printed)

About a minute on 2 CPU cores.
"""
import dataclasses
import math
import time

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

import models
import noise_warp
import reward
import splat
import standins

# ---------------------------------------------------------------------------------------------------------------
# shared helpers


@pytest.fixture(scope="module")
def critics():
    return standins.tiny_reward_models()


def rot_y(a):
    c, s = math.cos(a), math.sin(a)
    return torch.tensor([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=torch.float64)


def orbit(F=9, deg=20.0, r=4.5):
    """c2w path orbiting the point r ahead of the first camera (first pose = identity, OpenCV axes)."""
    p, out = torch.tensor([0, 0, r], dtype=torch.float64), []
    for th in torch.linspace(0, math.radians(deg), F).tolist():
        T = torch.eye(4, dtype=torch.float64)
        T[:3, :3] = rot_y(th)
        T[:3, 3] = p + rot_y(th) @ torch.tensor([0, 0, -r], dtype=torch.float64)
        out.append(T)
    return torch.stack(out)


def straight(F=9, direction=(0, 0, 1), length=2.0):
    T = torch.eye(4, dtype=torch.float64).repeat(F, 1, 1)
    T[:, :3, 3] = torch.linspace(0, length, F, dtype=torch.float64)[:, None] * torch.tensor(direction).double()
    return T


def pan_right(F=9, deg=14.0):
    T = torch.eye(4, dtype=torch.float64).repeat(F, 1, 1)
    T[:, :3, :3] = torch.stack([rot_y(math.radians(a)) for a in torch.linspace(0, deg, F).tolist()])
    return T


def lift_from_depth(frames, depth, K, c2w):
    """A Lift from known depth and cameras (a synthetic scene's): Gaussians by unprojection, no DA3."""
    return reward.Lift(frames, depth, torch.linalg.inv(c2w), c2w, K, reward.unproject_gaussians(frames, depth, K, c2w))


def intrinsics(F, f=60.0, h=64, w=64, dtype=torch.float32):
    return torch.tensor([[f, 0, w / 2], [0, f, h / 2], [0, 0, 1]], dtype=dtype).repeat(F, 1, 1)


# ---------------------------------------------------------------------------------------------------------------
# lift: DA3's SH bands rotated from camera to world


def test_sh_rotation_is_exact():
    from gsplat.cuda._torch_impl import _spherical_harmonics
    R = torch.tensor(Rotation.random(3, random_state=0).as_matrix())
    M = reward._sh_rotation(R, 2)  # (3, 9, 9)
    coeffs = torch.randn(3, 9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    d = torch.nn.functional.normalize(torch.randn(3, 50, 3, dtype=torch.float64), dim=-1)
    world = _spherical_harmonics(2, d, (M @ coeffs)[:, None].expand(-1, 50, -1, -1))
    cam = _spherical_harmonics(2, torch.einsum("fji,fnj->fni", R, d), coeffs[:, None].expand(-1, 50, -1, -1))
    assert (world - cam).abs().max() < 1e-10  # f_world(d) = f_cam(R^T d)


# ---------------------------------------------------------------------------------------------------------------
# camera maths


def test_geodesic_distance_on_known_rotations():
    axis = np.array([1.0, 2.0, -0.5]) / np.linalg.norm([1.0, 2.0, -0.5])
    for deg in (0.0, 1e-4, 30.0, 90.0, 179.0):
        R = torch.tensor(Rotation.from_rotvec(axis * math.radians(deg)).as_matrix())
        assert abs(float(noise_warp.geodesic_deg(torch.eye(3, dtype=torch.float64), R)) - deg) < 1e-7
    A, B = Rotation.random(5, random_state=2), Rotation.random(5, random_state=3)
    ref = np.degrees((A.inv() * B).magnitude())
    got = noise_warp.geodesic_deg(torch.tensor(A.as_matrix()), torch.tensor(B.as_matrix())).numpy()
    assert np.abs(got - ref).max() < 1e-7


def test_s_traj_values():
    """Analytic cases of S = exp(-E / (kappa max(E_0, rad(theta) / 2))), kappa = 0.5, theta = 10 deg; here the
    request is in scene units (req_depth = the scene depth), as if the warp plane sat at the scene."""
    d = 5.0
    S = lambda est, req, **kw: reward.s_traj(est, req, **{"scene_depth": d, "req_depth": d, **kw})  # noqa: E731
    req = orbit()
    assert S(req, req) > 1 - 1e-9
    # the same path in another world frame and scale (DA3's gauge), the scene depth in that scale: still 1
    T = torch.eye(4, dtype=torch.float64)
    T[:3, :3] = torch.tensor(Rotation.random(random_state=4).as_matrix())
    T[:3, 3] = torch.tensor([1.0, -2.0, 0.5])
    est = T @ req
    est[:, :3, 3] *= 0.37
    assert S(est, req, scene_depth=0.37 * d) > 1 - 1e-9
    # straight moves: speed a along the request scores exp(-|1 - a| / kappa); a still camera exp(-2) whatever
    # the path, so no alignment can stretch it onto the request
    push = straight()
    for a in (-1.0, 0.0, 0.5, 2.0):
        assert abs(S(straight(length=2.0 * a), push) - math.exp(-abs(1 - a) / 0.5)) < 1e-9
    # the exact push with a scene depth read 1.6 times too deep looks slower: speed 1 / 1.6, E = 0.375 E_0
    assert abs(S(push, push, scene_depth=1.6 * d) - math.exp(-0.375 / 0.5)) < 1e-9
    still = torch.eye(4, dtype=torch.float64).repeat(9, 1, 1)
    for moving in (req, push, pan_right()):
        assert abs(S(still, moving) - math.exp(-2.0)) < 1e-9
    # per-frame error: translation in scene depths plus rotation in radians; a push estimate against a pan request
    # errs by |c_i| / d + (the pan angle); E_0 = mean pan angle = 7 deg
    pan = pan_right()
    e = (torch.linspace(0, 2.0, 9) / d).mean() + math.radians(7.0)
    assert abs(S(push, pan) - math.exp(-e / (0.5 * math.radians(7.0)))) < 1e-9
    # a fixed request is judged as strictly as a theta pan: tolerance kappa rad(theta) / 2 = rad(2.5 deg)
    assert S(still, still) == 1.0
    assert abs(S(pan, still) - math.exp(-7.0 / 2.5)) < 1e-9
    assert abs(S(pan, still, rot_scale=20.0) - math.exp(-7.0 / 5.0)) < 1e-9
    drift = straight(direction=(1, 0, 0), length=0.8)  # mean drift 0.4 = 0.08 scene depths
    assert abs(S(drift, still) - math.exp(-0.08 / (0.5 * math.radians(5.0)))) < 1e-9
    # a request sampled at another frame rate is resampled to the estimate's frames
    assert S(orbit(F=9), orbit(F=17)) > 1 - 1e-9
    # nothing to compare: one frame, a non-finite pose, no scene depth
    nan = req.clone()
    nan[3, 0, 3] = float("nan")
    for bad, kw in ((req[:1], {}), (nan, {}), (req, {"scene_depth": 0.0}), (req, {"scene_depth": float("nan")})):
        with pytest.raises(ValueError):
            S(bad, req, **kw)


def test_combine_weighs_the_terms():
    """R_3D = w_meta S_meta + w_recon S_recon + S_traj, total = w_3d R_3D + w_gen R_gen (dynamic: R_gen alone), on
    floats worked by hand and on tensors."""
    terms = dict(S_meta=0.1, S_recon=0.2, S_traj=0.3, R_gen=5.0)
    r_3d, total = reward.combine(terms, w_3d=2.0, w_meta=3.0, w_recon=4.0, w_gen=0.5)
    assert r_3d == pytest.approx(0.3 + 0.8 + 0.3) and total == pytest.approx(2 * 1.4 + 2.5)
    assert reward.combine(terms, True, w_3d=2.0, w_meta=3.0, w_recon=4.0, w_gen=0.5)[1] == 5.0
    batch = {k: torch.tensor([v, 2 * v]) for k, v in terms.items()}
    _, total = reward.combine(batch, w_3d=1.0, w_meta=0.0, w_recon=1.0, w_gen=1.0)
    assert torch.allclose(total, torch.tensor([5.5, 11.0]))


def test_meta_camera_orbits_away_from_the_path():
    depth = torch.full((9, 8, 8), 4.0, dtype=torch.float64)
    for path, side in ((straight(direction=(1, 0, 0)), -1), (straight(direction=(-1, 0, 0)), 1)):
        m = reward.meta_camera(path, depth, 15.0)
        mid = path[4]
        p = mid[:3, 3] + 4.0 * mid[:3, 2]  # the look-at point
        c = m[:3, 3]
        assert abs(float((c - p).norm()) - 4.0) < 1e-9  # on the orbit circle
        assert float(torch.nn.functional.cosine_similarity(m[:3, 2], p - c, dim=0)) > 1 - 1e-12  # still looks at p
        assert abs(float(noise_warp.geodesic_deg(mid[:3, :3], m[:3, :3])) - 15.0) < 1e-9
        assert side * float((mid[:3, :3].T @ (c - mid[:3, 3]))[0]) > 0.5  # moved to the side the path did not go
    pan = pan_right()
    m = reward.meta_camera(pan, depth, 15.0)
    assert float((pan[4, :3, :3].T @ (m[:3, 3] - pan[4, :3, 3]))[0]) < 0  # a right pan gets a view from the left


# ---------------------------------------------------------------------------------------------------------------
# synthetic scene round trip: render -> lift from the true depth and cameras -> the three 3D terms


def smooth_scene():
    """An opaque bumpy backdrop and a nearer square patch, made of small Gaussians whose random colours come from
    a random smooth field (a surface, so the expected depth of a pixel is the depth of what it shows)."""
    k = torch.randn(3, 4, 2, generator=torch.Generator().manual_seed(5)) * 0.6
    phase = torch.rand(3, 4, generator=torch.Generator().manual_seed(6)) * 6.28
    field = lambda p: (0.5 + 0.12 * torch.sin(torch.einsum("cfd,nd->ncf", k, p[:, :2]) + phase).sum(-1)).clamp(0, 1)
    gx, gy = torch.meshgrid(torch.linspace(-6, 6, 61), torch.linspace(-6, 6, 61), indexing="ij")
    x, y = gx.flatten(), gy.flatten()
    back = torch.stack([x, y, 7 + 0.8 * torch.sin(0.8 * x) * torch.cos(0.6 * y)], -1)
    px, py = torch.meshgrid(torch.linspace(-1, 1, 21), torch.linspace(-1.2, 0.8, 21), indexing="ij")
    patch = torch.stack([px.flatten(), py.flatten(), torch.full((441,), 4.0)], -1)
    means = torch.cat([back, patch])
    quats = torch.zeros(len(means), 4)
    quats[:, 0] = 1
    return dict(means=means, quats=quats, scales=torch.full((len(means), 3), 0.12), opacities=torch.ones(len(means)),
                colors=torch.cat([field(back), field(patch * 3 + 1)]))


def requested(prompt, F=9, pivot=4.5):
    """noise_warp's path for the prompt's camera words, translations scaled so its orbit pivot (600 units ahead)
    sits at `pivot`, inside our synthetic scene."""
    path = noise_warp.camera_path(noise_warp.parse_camera(prompt), F)
    path[:, :3, 3] *= pivot / 600
    return path


@pytest.fixture(scope="module")
def synthetic():
    c2w, K = requested("Camera orbit left."), intrinsics(9)
    rgb, alpha, depth = splat.render(smooth_scene(), torch.linalg.inv(c2w).float(), K, 64, 64, with_depth=True)
    return rgb.clamp(0, 1).permute(0, 3, 1, 2), depth[..., 0], alpha[..., 0] > 0.99, K, c2w


def masked_psnr(lf, frames, mask):
    out, _ = splat.render(lf.gaussians, lf.w2c, lf.K, 64, 64)
    err = ((out.clamp(0, 1) - frames.permute(0, 2, 3, 1)) ** 2)[mask].mean()
    return float(-10 * torch.log10(err))


@pytest.mark.full
def test_synthetic_roundtrip_psnr_and_s_recon(critics, synthetic):
    frames, depth, mask, K, c2w = synthetic
    assert mask.float().mean() > 0.7
    lf = lift_from_depth(frames, depth, K, c2w.float())
    psnr, s = masked_psnr(lf, frames, mask), reward.s_recon(critics, lf)
    scale = (1 + 0.5 * (-1) ** torch.arange(9)).view(9, 1, 1)  # frames alternately 50% too far and too near
    bad_depth = lift_from_depth(frames, depth * scale, K, c2w.float())
    gl = torch.diag(torch.tensor([1.0, -1, -1, 1]))  # OpenCV <-> OpenGL axes
    flipped = lift_from_depth(frames, depth, K, c2w.float() @ gl)
    psnr_d, s_d = masked_psnr(bad_depth, frames, mask), reward.s_recon(critics, bad_depth)
    psnr_f, s_f = masked_psnr(flipped, frames, mask), reward.s_recon(critics, flipped)
    print(f"\nsynthetic round trip PSNR {psnr:.1f} dB (perturbed depth {psnr_d:.1f}, flipped cameras {psnr_f:.1f}); "
          f"S_recon {s:.4f} / {s_d:.4f} / {s_f:.4f}")
    assert psnr >= 25 and psnr_d < psnr - 6 and psnr_f < psnr - 6
    # a random AlexNet compresses LPIPS, so compare distances, not absolute scores
    assert (1 - s_d) > 3 * (1 - s) and (1 - s_f) > 3 * (1 - s)


def test_synthetic_s_traj(synthetic):
    frames, depth, mask, K, c2w = synthetic
    lf = lift_from_depth(frames, depth, K, c2w.float())
    # requested() scales the warp so its plane (depth 1000) sits at 7.5, just behind the backdrop (7 +- 0.8)
    d, plane = float(lf.depth[0].median()), 1000 * 4.5 / 600
    assert 6.5 < d < 7.5
    S = lambda est, req: reward.s_traj(est, req, scene_depth=d, req_depth=d)  # noqa: E731  (the scene's own units)
    good = S(lf.c2w, c2w)
    at_plane = reward.s_traj(lf.c2w, c2w, scene_depth=d, req_depth=plane)  # as score() judges it
    other = S(lf.c2w, requested("Camera orbit right."))
    push = S(lf.c2w, requested("Camera push in."))
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    shuffled = lift_from_depth(frames[perm], depth[perm], K, c2w[perm].float())
    shuf = S(shuffled.c2w, c2w)
    print(f"\nS_traj: true path {good:.4f} (warp plane at 7.5 instead of the scene depth {d:.2f}: {at_plane:.4f}), "
          f"orbit right {other:.2e}, push in {push:.3f}, shuffled frames {shuf:.3f}")
    assert good >= 0.95 and at_plane >= 0.7 and other < 0.1 and push < 0.5 and shuf < 0.5


# ---------------------------------------------------------------------------------------------------------------
# the tiny critics end to end


def test_da3_lift_from_gs_head_and_unprojection(critics):
    video = torch.rand(9, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    t = time.time()
    lf = reward.lift(critics, video)
    t_lift = time.time() - t
    F_, h, w = lf.depth.shape
    assert (F_, h, w) == (9, 56, 56) and lf.frames.shape == (9, 3, 56, 56)
    assert torch.allclose(lf.w2c @ lf.c2w, torch.eye(4).expand(9, 4, 4), atol=1e-4)
    g = lf.gaussians
    assert g["means"].shape == (9 * 56 * 56, 3) and g["sh"].shape == (9 * 56 * 56, 9, 3)
    assert all(torch.isfinite(v).all() for v in g.values()) and (g["scales"] > 0).all()
    t = time.time()
    s = reward.s_recon(critics, lf)
    t_recon = time.time() - t
    print(f"\ntiny DA3 on 9x64x64: lift {t_lift:.2f} s, S_recon (render 9 views + LPIPS) {t_recon:.2f} s")
    assert 0 <= s <= 1
    # a DA3 without a GS head lifts by unprojecting its depth
    lf2 = reward.lift(dataclasses.replace(critics, gs_cfg=None), video)
    assert "colors" in lf2.gaussians and torch.allclose(lf2.depth, lf.depth)


def test_gs_head_means_project_back_to_their_pixels():
    gen = torch.Generator().manual_seed(3)
    F_, h, w = 2, 6, 7
    cfg = dict(sh_degree=2, pred_offset_depth=True, pred_offset_xy=True, gaussian_scale_min=1e-5,
               gaussian_scale_max=1.0)
    head = 0.3 * torch.randn(F_, h, w, 2 + 3 + 4 + 27 + 1, generator=gen, dtype=torch.float64)
    depth = 2 + torch.rand(F_, h, w, generator=gen, dtype=torch.float64)
    K = intrinsics(F_, f=9.0, h=h, w=w, dtype=torch.float64)
    c2w = orbit(F_, 10.0)
    gauss = reward._gaussians_from_gs_head(head, torch.rand(F_, h, w, dtype=torch.float64), depth, K, c2w, cfg)
    X = torch.einsum("fij,fnj->fni", torch.linalg.inv(c2w)[:, :3, :3], gauss["means"].view(F_, -1, 3)) \
        + torch.linalg.inv(c2w)[:, None, :3, 3]
    uv = torch.einsum("fij,fnj->fni", K, X)
    uv = (uv[..., :2] / uv[..., 2:]).view(F_, h, w, 2)
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                          indexing="ij")
    assert torch.allclose(uv, torch.stack([u, v], -1) + head[..., :2], atol=1e-9)  # pixel centre + xy offset
    assert torch.allclose(X.norm(dim=-1).view(F_, h, w), depth + head[..., -1], atol=1e-9)  # on the unit ray


def test_s_meta_is_the_expected_digit_of_the_tiny_qwen(critics):
    image = torch.rand(3, 56, 56, generator=torch.Generator().manual_seed(0))
    got = reward.qwen_grade(critics, image, "Camera orbit left. A red car.")
    # hand computation, through generate()'s own cached forward
    proc, tok = critics.qwen_proc, critics.qwen_proc.tokenizer
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": reward.META_PROMPT.format(
        prompt="Camera orbit left. A red car.")}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    inp = proc(text=[text], images=[(image * 255).round().to(torch.uint8)], return_tensors="pt")
    out = critics.qwen.generate(**inp, max_new_tokens=1, do_sample=False, output_logits=True,
                               return_dict_in_generate=True)
    digits = [tok.encode(str(d), add_special_tokens=False) for d in range(10)]
    assert all(len(d) == 1 for d in digits)
    z = out.logits[0][0, [d[0] for d in digits]].double().numpy()
    p = np.exp(z - z.max())
    p /= p.sum()
    assert abs(got - float((p * np.arange(10)).sum() / 9)) < 1e-5


def test_hpsv3_key_remap_loads_the_old_layout(critics):
    sd = critics.hps.state_dict()
    old = {}
    for k, v in sd.items():  # the layout transformers 4.45 wrote
        k = k.replace("backbone.language_model.", "model.").replace("backbone.visual.", "visual.")
        old[k] = v.clone()
    old["lm_head.weight"] = torch.zeros(3, 3)
    assert not any(k.startswith("backbone.") for k in old)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        fresh, _ = standins.build_tiny_hpsv3()
    fresh.load_state_dict(models.remap_hpsv3_state_dict(old), strict=True)
    assert models.remap_hpsv3_key("module.model.layers.0.mlp.up_proj.weight") == \
        "backbone.language_model.layers.0.mlp.up_proj.weight"
    assert models.remap_hpsv3_key("rm_head.0.weight") == "rm_head.0.weight"
    assert models.remap_hpsv3_key("model.visual.merger.mlp.0.bias") == "backbone.visual.merger.mlp.0.bias"  # 4.52+
    assert models.remap_hpsv3_key("model.language_model.norm.weight") == "backbone.language_model.norm.weight"
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    a = reward.hpsv3_score(critics, images, ["a cat", "a dog"])
    b = reward.hpsv3_score(dataclasses.replace(critics, hps=fresh), images, ["a cat", "a dog"])
    assert torch.equal(a, b)


def test_hpsv3_scores_images_end_to_end(critics):
    images = torch.rand(3, 3, 48, 80, generator=torch.Generator().manual_seed(2))
    s = reward.hpsv3_score(critics, images, ["a cat", "a dog running on a beach", "x"])
    assert s.shape == (3,) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert len(set(s.tolist())) == 3
    alone = reward.hpsv3_score(critics, images[1:2], ["a dog running on a beach"])
    assert abs(float(alone[0] - s[1])) < 1e-4  # padding in a batch does not change a score


@pytest.mark.full
def test_real_loaders_from_local_folders(critics, tmp_path, monkeypatch):
    """load_reward_models' real path, offline: a DA3 registry preset (da3-small, random) saved in DA3's hub
    checkpoint layout, the tiny Qwen3-VL and HPSv3 saved as hub folders (HPSv3 in the transformers-4.45 key
    layout). LPIPS's ImageNet AlexNet cannot be had offline: we check it is asked for, and build a random one."""
    import lpips
    from depth_anything_3.cfg import create_object, load_config
    from depth_anything_3.registry import MODEL_REGISTRY
    from safetensors.torch import save_file, save_model
    da3_dir, qwen_dir, bb_dir, hps_dir = (tmp_path / d for d in ("da3", "qwen", "qwen2vl", "hps"))
    da3_dir.mkdir()
    hps_dir.mkdir()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = create_object(load_config(MODEL_REGISTRY["da3-small"]))
    (da3_dir / "config.json").write_text('{"model_name": "da3-small"}')
    holder = torch.nn.Module()  # DA3's hub wrapper: the network at .model, saved by huggingface_hub's save_model
    holder.model = net
    save_model(holder, str(da3_dir / "model.safetensors"))
    critics.qwen.save_pretrained(qwen_dir)
    critics.qwen_proc.save_pretrained(qwen_dir)
    critics.hps_proc.save_pretrained(bb_dir)
    critics.hps.backbone.config.save_pretrained(bb_dir)
    old = {k.replace("backbone.language_model.", "model.").replace("backbone.visual.", "visual."): v.contiguous()
           for k, v in critics.hps.state_dict().items()}
    save_file(old, hps_dir / "HPSv3.safetensors")
    build = lpips.LPIPS

    def offline_lpips(pnet_rand, **kw):
        assert pnet_rand is False, "real runs must ask for the ImageNet AlexNet"
        return build(pnet_rand=True, **kw)

    monkeypatch.setattr(lpips, "LPIPS", offline_lpips)
    real = models.load_reward_models("small", "cpu", da3=str(da3_dir), qwen=str(qwen_dir), hps=str(hps_dir),
                                     hps_backbone=str(bb_dir))
    (da3_dir / "model.safetensors").unlink()  # 137 MB
    assert real.gs_cfg is None and real.process_res == 504 and real.hps_pixels == 256 * 28 * 28
    assert all(torch.equal(a, b) for a, b in zip(real.da3.state_dict().values(), net.state_dict().values()))
    image = torch.rand(3, 56, 56, generator=torch.Generator().manual_seed(0))
    assert reward.qwen_grade(real, image, "a cat") == reward.qwen_grade(critics, image, "a cat")
    images = torch.rand(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    small = dataclasses.replace(real, hps_pixels=critics.hps_pixels, process_res=56)
    assert torch.equal(reward.hpsv3_score(small, images, ["a", "b"]), reward.hpsv3_score(critics, images, ["a", "b"]))
    lf = reward.lift(small, torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2)))
    assert "colors" in lf.gaussians and lf.depth.shape == (3, 56, 56)  # no GS head: depth unprojection
    with pytest.raises(ValueError, match="toy, small or large"):
        models.load_reward_models("huge")


# ---------------------------------------------------------------------------------------------------------------
# score(): every component, bad videos, failing critics


@pytest.mark.full
def test_score_components_and_bad_videos(critics):
    gen = torch.Generator().manual_seed(0)
    good = torch.rand(9, 3, 64, 64, generator=gen)
    nan = good.clone()
    nan[3, 0, 5, 5] = float("nan")
    videos = [good, torch.zeros(9, 3, 64, 64), torch.full((9, 3, 64, 64), 0.5), nan]
    path = orbit()
    t = time.time()
    r, why = reward.score(critics, torch.stack(videos[:2]), ["Camera orbit left. A cat."] * 2, [path, path])
    print(f"\ntiny score() of 2 videos: {time.time() - t:.1f} s")
    for k in ("S_meta", "S_recon", "S_traj", "R_3D", "R_gen", "total"):
        assert r[k].shape == (2,) and r[k].dtype == torch.float32 and torch.isfinite(r[k][0])
    assert r["bad"].tolist() == [False, True]
    assert why[0] == [] and 0 < r["R_3D"][0] <= 3
    assert torch.allclose(r["R_3D"][:1], (r["S_meta"] + r["S_recon"] + r["S_traj"])[:1])
    assert torch.allclose(r["total"][:1], (r["R_3D"] + r["R_gen"])[:1])
    # a video no critic can score is "bad": its terms and total are NaN (the trainer scores it below its group)
    K = reward.Kind
    assert why[1] == [reward.Failure(K.BAD_VIDEO, "video", "black")] and torch.isnan(r["total"][1])
    for v, kind, detail in ((videos[2], K.BAD_VIDEO, "constant"), (nan, K.NOT_FINITE, "NaN/Inf pixels"),
                            (good[:1], K.BAD_VIDEO, "one frame"), (good[:, :2], K.BAD_VIDEO, "shape (9, 2, 64, 64)")):
        out, reasons = reward.score(critics, [v], ["p"], [path])
        assert reasons == [[reward.Failure(kind, "video", detail)]] and out["bad"].item() and all(
            torch.isnan(out[k][0]) for k in ("R_3D", "R_gen", "total"))
    # no camera words: S_traj = 0 (defined) with its reason; a failing critic makes the video bad, its term NaN
    out, why = reward.score(critics, good[None], ["a cat"], [None], w_3d=2.0)
    assert out["S_traj"][0] == 0 and not out["bad"][0] and why[0] == [reward.Failure(K.NO_CAMERA_WORDS, "S_traj")]
    assert torch.allclose(out["total"], 2 * out["R_3D"] + out["R_gen"])
    # the weights of the terms (the toy world's): R_3D = w_meta S_meta + w_recon S_recon + S_traj, total with w_gen
    w, why = reward.score(critics, good[None], ["Camera orbit left. A cat."], [path], w_meta=0.0, w_recon=20.0,
                          w_gen=0.5)
    assert w["S_meta"][0] == 0 and torch.allclose(w["S_recon"], r["S_recon"][:1])  # a term weighted 0 is not run
    assert torch.allclose(w["R_3D"], 20 * r["S_recon"][:1] + r["S_traj"][:1])
    assert torch.allclose(w["total"], w["R_3D"] + 0.5 * r["R_gen"][:1])
    broken = dataclasses.replace(critics, qwen=None)
    out, why = reward.score(broken, good[None], ["a cat"], [None], w_3d=2.0)
    assert torch.isnan(out["S_meta"][0]) and out["S_recon"][0] > 0 and out["bad"][0]
    assert [(f.kind, f.what) for f in why[0]] == [(K.CRITIC_FAILED, "S_meta"), (K.NO_CAMERA_WORDS, "S_traj")]
    out, why = reward.score(dataclasses.replace(critics, da3=None, hps=None), good[None], ["a cat"], [path])
    assert out["bad"][0] and [(f.kind, f.what) for f in why[0]] == [(K.CRITIC_FAILED, "lift"),
                                                                     (K.CRITIC_FAILED, "HPSv3")]
    with pytest.raises(ValueError, match="one each"):
        reward.score(critics, good[None], ["a", "b"], [None])
    # dynamic phase: R_gen only, no 3D critic runs
    out, why = reward.score(dataclasses.replace(critics, da3=None), good[None], ["a cat"], [path], dynamic=True)
    assert why == [[]] and out["R_3D"][0] == 0 and out["total"][0] == out["R_gen"][0] != 0


@pytest.mark.full
def test_score_reuses_a_given_lift(critics, monkeypatch):
    """score(lifts=...) gives the same components as lifting inside, without running Depth Anything 3 again."""
    good = torch.rand(9, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    prompt, path = "Camera orbit left. A cat.", orbit()
    fresh, _ = reward.score(critics, good[None], [prompt], [path])
    lf = reward.lift(critics, good)
    monkeypatch.setattr(reward, "lift", lambda *a: pytest.fail("lift ran although one was given"))
    reused, _ = reward.score(critics, good[None], [prompt], [path], lifts=[lf])
    for k in ("S_meta", "S_recon", "S_traj", "R_gen", "total"):
        assert torch.allclose(fresh[k], reused[k]), k


def test_latent_reward():
    """Mean of latent channel 0, per video: (B, 16, T, h, w) -> (B,)."""
    latents = torch.randn(3, 16, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = [latents[b, 0].sum().item() / 32 for b in range(3)]
    assert torch.allclose(standins.latent_reward(latents), torch.tensor(expected, dtype=torch.float32))
    shifted = latents + torch.eye(16)[0].view(1, 16, 1, 1, 1)
    assert standins.latent_reward(shifted).sub(1).allclose(standins.latent_reward(latents))
