"""
Tests of noise_warp.py: camera words, camera paths, plane flow, noise transport, read-out and injection.

Run: `python -m pytest tests/test_noise_warp.py -q` from the repo root (about 15 s on 2 CPU cores).
Expected values are analytic (trigonometry, the numbers of microsoft/World-R1's camera_trajectory_utils.py) or come from
an independent reference (scipy); no test compares a function with itself.
"""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import torch

import noise_warp as nw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHRASES = {"push_in": "push in", "pull_out": "pull out", "move_left": "move left", "move_right": "move right",
           "orbit_left": "orbit left", "orbit_right": "orbit right", "pan_left": "pan left",
           "pan_right": "pan right", "fixed": "fixed"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small grids gain nothing from 2 threads, and when other processes share the 2 cores an idle-waiting
    second thread makes every op wait for a time slice (measured: 20-40x slower). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def assert_normal(x, tol=0.02):
    """Per-element N(0, 1): mean and std within tol, and a Kolmogorov-Smirnov test that does not reject."""
    v = x.double().flatten().numpy()
    assert v.size >= 1e5
    assert abs(v.mean()) < tol and abs(v.std() - 1) < tol, (v.mean(), v.std())
    assert scipy.stats.kstest(v, "norm").pvalue > 0.01


def translation_path(step, frames):
    """Camera moving left by `step` units per frame: the plane flow is step f / 1000 px to the right."""
    path = torch.eye(4, dtype=torch.float64).repeat(frames, 1, 1)
    path[:, 0, 3] = -step * torch.arange(frames, dtype=torch.float64)
    return path


# ----------------------------------------------------------------------------------------------------------
# words -> motions

def test_parse_each_phrase():
    assert nw.MOTIONS == tuple(PHRASES)
    for motion, phrase in PHRASES.items():
        assert nw.parse_camera(f"Camera {phrase}. A red barn at dusk.") == [motion]


def test_parse_composites_in_textual_order_with_repeats():
    assert nw.parse_camera("Camera orbit left, then push in.") == ["orbit_left", "push_in"]
    assert nw.parse_camera("Pan right and move left, transitioning into a pull out") == [
        "pan_right", "move_left", "pull_out"]
    assert nw.parse_camera("push in, then push in, then fixed") == ["push_in", "push_in", "fixed"]


def test_parse_no_match_boundaries_and_case():
    assert nw.parse_camera("A cat sleeps on a sofa; zoom in, dolly, tilt, static shot.") == []
    assert nw.parse_camera("an unfixed camera, pushin, pan lefts, orbit  left") == []  # letter boundaries, one space
    assert nw.parse_camera("a fixed-wing plane, 3push in4") == ["fixed", "push_in"]  # non-letters are boundaries
    assert nw.parse_camera("CAMERA Pan Left, then PuSh In") == ["pan_left", "push_in"]


def test_parse_long_prompt():
    filler = "a quiet forest with tall pines and soft light " * 230  # ~10,000 characters
    prompt = filler[:3100] + " orbit right " + filler[:4000] + " pull out, " + filler[:2900] + " fixed."
    assert len(prompt) >= 10_000
    assert nw.parse_camera(prompt) == ["orbit_right", "pull_out", "fixed"]


# ----------------------------------------------------------------------------------------------------------
# motions -> poses

def yaw_pose(deg, position=(0.0, 0.0, 0.0)):
    th = math.radians(deg)
    return torch.tensor([[math.cos(th), 0, math.sin(th), position[0]], [0, 1, 0, position[1]],
                         [-math.sin(th), 0, math.cos(th), position[2]], [0, 0, 0, 1]], dtype=torch.float64)


def expected_end(motion):
    """End pose of one motion from the release's totals; orbit is our true orbit about (0, 0, 600)."""
    a = math.radians(24)
    return {"push_in": yaw_pose(0, (0, 0, 600)), "pull_out": yaw_pose(0, (0, 0, -600)),
            "move_left": yaw_pose(0, (-220, 0, 0)), "move_right": yaw_pose(0, (220, 0, 0)),
            "pan_left": yaw_pose(-14), "pan_right": yaw_pose(14),
            "orbit_left": yaw_pose(-24, (600 * math.sin(a), 0, 600 * (1 - math.cos(a)))),
            "orbit_right": yaw_pose(24, (-600 * math.sin(a), 0, 600 * (1 - math.cos(a)))),
            "fixed": yaw_pose(0)}[motion]


@pytest.mark.parametrize("frames", [81, 9])
def test_single_motion_end_poses(frames):
    for motion in nw.MOTIONS:
        path = nw.camera_path([motion], frames)
        assert path.shape == (frames, 4, 4) and path.dtype == torch.float64
        assert torch.equal(path[0], torch.eye(4, dtype=torch.float64))
        torch.testing.assert_close(path[-1], expected_end(motion), atol=1e-9, rtol=0)
    # the named directions: pan_left's optical axis turns toward -x; orbit_left ends at (+244.04, 0, +51.87)
    assert nw.camera_path(["pan_left"], frames)[-1, 0, 2] < 0
    torch.testing.assert_close(nw.camera_path(["orbit_left"], frames)[-1, :3, 3],
                               torch.tensor([244.0420, 0.0, 51.8727], dtype=torch.float64), atol=1e-4, rtol=0)
    assert torch.equal(nw.camera_path(["fixed"], frames), torch.eye(4, dtype=torch.float64).repeat(frames, 1, 1))
    assert torch.equal(nw.camera_path([], frames), torch.eye(4, dtype=torch.float64).repeat(frames, 1, 1))


def test_orbit_is_true_orbit():
    path = nw.camera_path(["orbit_right"], 81)
    pivot = torch.tensor([0, 0, 600.0], dtype=torch.float64)
    dist = (path[:, :3, 3] - pivot).norm(dim=-1)
    torch.testing.assert_close(dist, torch.full_like(dist, 600.0), atol=1e-9, rtol=0)  # on the circle
    to_pivot = (pivot - path[:, :3, 3]) / 600
    torch.testing.assert_close(path[:, :3, 2], to_pivot, atol=1e-9, rtol=0)  # looking at the pivot
    steps = torch.linalg.inv(path[:-1]) @ path[1:]
    torch.testing.assert_close(steps, steps[:1].expand_as(steps), atol=1e-9, rtol=0)  # the same step every frame
    length, rotation = nw.path_stats(path)
    assert abs(length - 80 * 2 * 600 * math.sin(math.radians(0.15))) < 1e-6 and abs(length - 251.327) < 1e-2
    assert abs(rotation - 24) < 1e-6


def test_composite_segments_start_at_previous_end():
    # n = 2 at 81 frames: 41 frames each, 82 poses; resampling keeps 0..40 and drops index 41 (release 1.5)
    path = nw.camera_path(["pan_left", "push_in"], 81)
    pan_end = yaw_pose(-14)
    torch.testing.assert_close(path[40], pan_end, atol=1e-12, rtol=0)
    torch.testing.assert_close(path[41], pan_end @ yaw_pose(0, (0, 0, 600 / 40)), atol=1e-9, rtol=0)
    torch.testing.assert_close(path[-1], pan_end @ yaw_pose(0, (0, 0, 600)), atol=1e-9, rtol=0)
    # pushes along the panned axis: ends at 600 (-sin 14, 0, cos 14)
    th = math.radians(14)
    torch.testing.assert_close(path[-1, :3, 3], torch.tensor([-600 * math.sin(th), 0, 600 * math.cos(th)],
                                                              dtype=torch.float64), atol=1e-9, rtol=0)
    # n = 3: 27 frames each, no resampling; each segment's first frame repeats the previous end
    motions = ["move_left", "pull_out", "orbit_left"]
    path = nw.camera_path(motions, 81)
    assert torch.equal(path[26], path[27]) and torch.equal(path[53], path[54])
    ends = [expected_end(m) for m in motions]
    torch.testing.assert_close(path[26], ends[0], atol=1e-9, rtol=0)
    torch.testing.assert_close(path[53], ends[0] @ ends[1], atol=1e-9, rtol=0)
    torch.testing.assert_close(path[80], ends[0] @ ends[1] @ ends[2], atol=1e-9, rtol=0)
    # n = 4: 21 frames each (84 poses) resampled to 81, still ending at the composed end
    motions = ["push_in", "pan_right", "move_right", "orbit_right"]
    end = torch.eye(4, dtype=torch.float64)
    for m in motions:
        end = end @ expected_end(m)
    torch.testing.assert_close(nw.camera_path(motions, 81)[-1], end, atol=1e-9, rtol=0)


def test_rotations_orthonormal():
    eye = torch.eye(3, dtype=torch.float64)
    for motions in [[m] for m in nw.MOTIONS] + [["orbit_left", "push_in", "pan_right", "orbit_right", "pull_out"]]:
        R = nw.camera_path(motions, 81)[:, :3, :3]
        assert (R.transpose(-1, -2) @ R - eye).norm(dim=(-2, -1)).max() < 1e-9
        assert (torch.linalg.det(R) - 1).abs().max() < 1e-9


def test_path_errors_and_resampling():
    with pytest.raises(ValueError, match="valid"):
        nw.camera_path(["zoom_in"], 9)
    short = nw.camera_path(["push_in"], 5)
    longer = nw.resample_path(short, 8)  # shorter than asked: the last pose repeats
    assert torch.equal(longer[:5], short) and torch.equal(longer[5:], short[-1:].expand(3, 4, 4))


# ----------------------------------------------------------------------------------------------------------
# poses -> flow (the release's warp grid: 960 x 1664, f = 1.2 * 1664 = 1996.8, plane depth 1000)

F_W = 1.2 * 1664


def first_flow(motion):
    path = nw.camera_path([motion], 81)
    return nw.plane_flow(path[0], path[1], 960, 1664)


def test_flow_pan_left_centre():
    flow = first_flow("pan_left")
    assert flow.shape == (2, 960, 1664)
    expected = F_W * math.tan(math.radians(14 / 80))
    assert abs(expected - 6.0989) < 1e-4
    assert abs(flow[0, 480, 832].item() - expected) < 1e-3 and flow[1, 480, 832].item() == 0


def test_flow_move_left_uniform():
    flow = first_flow("move_left")
    expected = F_W * 2.75 / 1000  # 5.4912
    assert (flow[0] - expected).abs().max() < 1e-3 and flow[1].abs().max() < 1e-3


def test_flow_push_in():
    flow = first_flow("push_in")
    assert flow[:, 480, 832].abs().max() == 0
    k = 7.5 / (1000 - 7.5)  # the plane comes 7.5 units closer: u' = u d / (d - 7.5)
    torch.testing.assert_close(flow[:, 0, 0], torch.tensor([-832 * k, -480 * k]), atol=1e-3, rtol=0)


def test_flow_orbit_centre_and_constant():
    path = nw.camera_path(["orbit_left"], 81)
    # centre ray hits (0, 0, 1000); seen after rotating 0.3 deg about the pivot (0, 0, 600)
    th = math.radians(0.3)
    expected = F_W * 400 * math.sin(th) / (600 + 400 * math.cos(th))
    first, last = nw.plane_flow(path[0], path[1], 960, 1664), nw.plane_flow(path[79], path[80], 960, 1664)
    assert abs(first[0, 480, 832].item() - expected) < 1e-3
    assert (first - last).abs().max() < 1e-3


def test_flow_identical_poses_is_zero():
    """Exactly 0 where Rb^T Ra rounds to I (the first pose); within 1e-9 px wherever the BLAS leaves 1e-16 off it."""
    path = nw.camera_path(["orbit_left", "push_in", "pan_right"], 81)
    assert torch.equal(nw.plane_flow(path[0], path[0].clone(), 96, 128), torch.zeros(2, 96, 128))
    for k in [17, 40, 80]:
        assert nw.plane_flow(path[k], path[k].clone(), 96, 128).abs().max() < 1e-9


# ----------------------------------------------------------------------------------------------------------
# transport

def state(H, W, C=16, seed=0):
    return torch.randn(H * W, C, generator=gen(seed)), torch.ones(H * W)


def test_zero_flow_is_identity():
    noise, weight = state(32, 48)
    x = noise
    for k in range(1, 6):
        x, weight = nw.transport(x, weight, torch.zeros(2, 32, 48), gen(k), phase=(k * nw.GOLDEN) % 1.0)
    assert torch.equal(x, noise)
    latents = nw.warped_noise(["fixed"], (16, 3, 8, 8), gen(), warp_scale=4, degradation=0)
    assert torch.equal(latents[:, 1], latents[:, 0]) and torch.equal(latents[:, 2], latents[:, 0])


def test_collision_and_duplication_formulas():
    """Column c moves one pixel right: it collides with c+1 and leaves a hole that copies column c-1."""
    H, W, c = 1024, 8, 4
    noise, weight = state(H, W)
    flow = torch.zeros(2, H, W)
    flow[0, :, c] = 1
    out, _ = nw.transport(noise, weight, flow, gen(1))
    x, y = noise.view(H, W, -1), out.view(H, W, -1)
    keep = [j for j in range(W) if j not in (c - 1, c, c + 1)]
    assert torch.equal(y[:, keep], x[:, keep])
    # collision: sum(x w) / sqrt(sum w^2) with equal weights; duplicate group of 2: the copies sum to sqrt(2) x
    torch.testing.assert_close(y[:, c + 1], (x[:, c] + x[:, c + 1]) / math.sqrt(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[:, c - 1] + y[:, c], math.sqrt(2) * x[:, c - 1], atol=1e-5, rtol=0)
    # copies x/sqrt(2) +- (z1 - z2)/2: unit variance, uncorrelated with each other, correlation 1/sqrt(2) with x
    a, b, src = y[:, c - 1].flatten(), y[:, c].flatten(), x[:, c - 1].flatten()
    corr = torch.corrcoef(torch.stack([a, b, src]))
    assert abs(a.std() - 1) < 0.03 and abs(b.std() - 1) < 0.03
    assert abs(corr[0, 1]) < 0.03 and abs(corr[0, 2] - 2 ** -0.5) < 0.03 and abs(corr[1, 2] - 2 ** -0.5) < 0.03


def test_uniform_integer_flow_shifts():
    H, W = 64, 96
    noise, weight = state(H, W)
    flow = torch.tensor([3.0, -2.0])[:, None, None].expand(2, H, W)
    prev = noise.view(H, W, -1)
    for k in range(1, 4):
        out, weight = nw.transport(prev.reshape(H * W, -1), weight, flow, gen(k), phase=(k * nw.GOLDEN) % 1.0)
        out = out.view(H, W, -1)
        in_view = out[:H - 2, 3:]  # rows moved up by 2, columns right by 3
        match = torch.isclose(in_view, prev[2:, :W - 3], atol=1e-6, rtol=0).all(-1).float().mean()
        assert match > 0.9, match.item()
        entered = out[H - 2:].flatten()  # fresh noise, independent of what left
        assert abs(torch.corrcoef(torch.stack([entered, prev[:2].flatten()]))[0, 1]) < 0.1
        prev = out


def test_slow_flow_moves():
    """0.3 px per frame for 40 frames moves the noise 12 px (within 2); rounding each frame (release) freezes it."""
    W, frames = 64, 41
    path = translation_path(0.3 * 1000 / (1.2 * W), frames)

    def shift(dither):
        out = nw.warp_path(path, 4, 32, W, gen(), warp_scale=1, every=frames - 1, dither=dither)  # raw grid
        first, last = out[:, 0], out[:, 1]
        return [s for s in range(W // 2) if torch.equal(last[:, :, s + 2:], first[:, :, 2:W - s])]

    assert shift(False) == [0]
    assert len(shift(True)) == 1 and abs(shift(True)[0] - 12) <= 2


@pytest.mark.parametrize("prompt", ["pan left", "push in", "orbit left", "move left, pull out, then pan left"])
def test_output_is_normal(prompt):
    # raw transported noise (warp_scale 1 is no binning): the last frame of 16 x 128 x 128 values
    unbinned = nw.warped_noise(prompt, (16, 5, 128, 128), gen(), warp_scale=1, degradation=0)
    assert_normal(unbinned[:, -1])
    # binned read-out: fails without re-Gaussianisation (copies in one bin add their variances coherently)
    binned = nw.warped_noise(prompt, (16, 5, 80, 80), gen(1), warp_scale=2, degradation=0)
    assert_normal(binned[:, -1])
    assert_normal(nw.warped_noise(prompt, (16, 5, 80, 80), gen(2), warp_scale=2)[:, -1])  # with degradation


def test_seeds_and_determinism():
    shape = (16, 3, 32, 32)
    a, b = [nw.warped_noise("orbit left", shape, gen(seed), warp_scale=4) for seed in (0, 1)]
    assert torch.equal(a, nw.warped_noise("orbit left", shape, gen(0), warp_scale=4))
    assert abs(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]) < 0.03  # 49k values: 3 sigma ~ 0.014


def test_no_motion_is_plain_noise():
    shape = (16, 3, 8, 8)
    assert torch.equal(nw.warped_noise("A cat on a sofa.", shape, gen(7)), torch.randn(shape, generator=gen(7)))
    assert torch.equal(nw.warped_noise([], shape, gen(7)), torch.randn(shape, generator=gen(7)))


# ----------------------------------------------------------------------------------------------------------
# read-out

def test_bin_noise():
    x = torch.randn(4, 6, 3, generator=gen())
    ref = torch.stack([torch.stack([x[2 * i:2 * i + 2, 2 * j:2 * j + 2].sum((0, 1)) / 2 for j in range(3)])
                       for i in range(2)])
    torch.testing.assert_close(nw.bin_noise(x, 2), ref)
    assert torch.equal(nw.bin_noise(torch.ones(32, 48), 16), torch.full((2, 3), 16.0))  # 256 ones / sqrt(256)
    assert_normal(nw.bin_noise(torch.randn(512, 512, 8, generator=gen()), 4))


def test_latent_shape_and_frame_sampling():
    # 9 frames of 64 x 64 video -> latent (16, (9 - 1) / 4 + 1, 64 / 8, 64 / 8)
    assert nw.warped_noise("pan right", (16, 3, 8, 8), gen(), warp_scale=16).shape == (16, 3, 8, 8)
    assert nw.warped_noise(nw.camera_path(["push_in"], 81), (16, 3, 8, 8), gen(), warp_scale=4).shape == (16, 3, 8, 8)
    # 8 warp px per video frame at warp_scale 8 = one latent cell per frame: latent t = video frame 4t
    path = translation_path(8 * 1000 / (1.2 * 16 * 8), 9)
    lat = nw.warped_noise(path, (16, 3, 8, 16), gen(), warp_scale=8, degradation=0)
    assert lat.dtype == torch.float32
    assert torch.equal(lat[:, 1, :, 4:], lat[:, 0, :, :12]) and torch.equal(lat[:, 2, :, 8:], lat[:, 0, :, :8])


def test_degradation_coefficients():
    x = torch.randn(16, 3, 8, 8, generator=gen(3))
    xi = torch.randn(x.shape, generator=gen(4))
    torch.testing.assert_close(nw.degrade(x, gen(4), 0.35), 0.47410 * xi + 0.88047 * x, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# injection helpers

def test_stepwise_weights():
    expected = [0.22727, 0.19805, 0.16883, 0.13961, 0.11039, 0.08117, 0.05195, 0.02273]
    w = nw.stepwise_weights(8)
    torch.testing.assert_close(w, torch.tensor(expected), atol=1e-5, rtol=0)
    assert abs(w.sum().item() - 1) < 1e-6


def test_lowpass_delta():
    warped, base = torch.randn(2, 4, 3, 12, 10, generator=gen(0)), torch.randn(2, 4, 3, 12, 10, generator=gen(1))
    out = nw.lowpass_delta(warped, base)
    ref = scipy.ndimage.uniform_filter((warped - base).double().numpy(), size=(1, 1, 1, 9, 9), mode="constant")
    ref = ref / (ref.reshape(2, -1).std(1, ddof=1)[:, None, None, None, None] + 1e-6)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-5)
    assert out.shape == warped.shape
    torch.testing.assert_close(nw.lowpass_delta(warped[0], base[0]), out[0])  # no batch dim: one sample


def test_inject_stepwise():
    x = 3 + 2 * torch.randn(2, 16, 3, 8, 8, generator=gen(0))
    delta = torch.randn(16, 3, 8, 8, generator=gen(1))
    y = nw.inject_stepwise(x, delta, weight=0.2, strength=0.4)
    dims = (1, 2, 3, 4)
    torch.testing.assert_close(y.mean(dims), x.mean(dims), atol=1e-4, rtol=0)
    torch.testing.assert_close(y.std(dims), x.std(dims), atol=1e-4, rtol=0)
    # the added component is strength * weight * std: after re-standardising, corr(y - x, delta) is high
    assert torch.corrcoef(torch.stack([(y - x)[0].flatten(), delta.flatten()]))[0, 1] > 0.9
    torch.testing.assert_close(nw.inject_stepwise(x, delta, weight=0.0, strength=0.4), x, atol=1e-4, rtol=0)


def test_blend():
    base, warped = torch.randn(100_000, generator=gen(0)), torch.randn(100_000, generator=gen(1))
    assert torch.equal(nw.blend(base, warped, 1.0), warped) and torch.equal(nw.blend(base, warped, 1.5), warped)
    torch.testing.assert_close(nw.blend(base, warped, 0.35), 0.47410 * warped + 0.88047 * base, atol=1e-4, rtol=0)
    assert_normal(nw.blend(base, warped, 0.35))


# ----------------------------------------------------------------------------------------------------------
# visualiser and devices

@pytest.mark.full
def test_cli_smoke(tmp_path):
    out = tmp_path / "warp.mp4"
    cmd = [sys.executable, "noise_warp.py", "--prompt", "Camera orbit left, then push in.", "--out", str(out),
           "--frames", "9", "--height", "64", "--width", "64", "--warp_scale", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see one_thread
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    assert "orbit_left" in run.stdout and "path length" in run.stdout and "std" in run.stdout
    assert out.stat().st_size > 0 and (tmp_path / "warp_path.png").stat().st_size > 0
    bad = subprocess.run(cmd[:-8] + ["--frames", "10"], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --frames=10 must be 4k+1 (e.g. 9, 81)"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_runs():
    g = torch.Generator("cuda").manual_seed(0)
    x = nw.warped_noise("Camera orbit left, then push in.", (16, 5, 64, 64), g, warp_scale=4, degradation=0)
    assert x.device.type == "cuda" and x.shape == (16, 5, 64, 64)
    assert_normal(x[:, -1].cpu(), tol=0.03)
