"""The toy world (toyworld.py, toytrain.py): the renderer against the geometry it draws, camera words against the
noise warp, captions, corruptions and their labels, the held-out prompt split, a miniature build, the committed
weights, and the RL loop with the judge as its reward (tools/judge_as_reward.py).

    python -m pytest -q tests/test_toyworld.py
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import models
import noise_warp
import reward
import standins
import toyworld as tw
import toytrain as tt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ball_on_axis(r=0.5):
    """A scene of one ball whose centre lies on the base camera's optical axis."""
    t = (tw.CAM_HEIGHT - r) / tw.CAM_HEIGHT  # the axis from (0, -h, 0) to (0, 0, Z) passes y = -r here
    scale = "large" if abs(tw.SCALES["large"] - r) < 1e-9 else "small"
    return tw.Scene([tw.Thing("ball", "red", scale, 0.0, tw.TARGET_Z * t, 0.0)])


def test_every_pixel_unprojects_onto_the_surface_it_shows():
    """Depth, K and c2w agree with the geometry: each pixel's depth, unprojected, lands on the floor (y = 0), on the
    ball's sphere, or on the sky dome, within float tolerance; and all three are seen."""
    scene = ball_on_axis(tw.SCALES["large"])
    c2w = tw.camera_poses("orbit_left", 3)
    K = tw.intrinsics(24, 24)
    rgb, depth = tw.render(tw.frame_params(scene, 3), c2w, K, 24, 24, supersample=1)
    v, u = torch.meshgrid(torch.arange(24.0) + 0.5, torch.arange(24.0) + 0.5, indexing="ij")
    rays = torch.stack([(u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], torch.ones_like(u)], -1).double()
    pts = torch.einsum("fij,hwj->fhwi", c2w[:, :3, :3], rays) * depth.double()[..., None] + c2w[:, None, None, :3, 3]
    thing = scene.things[0]
    centre = torch.tensor([thing.x, -tw.SCALES["large"], thing.z], dtype=torch.float64)
    on_floor = pts[..., 1].abs() < 1e-4 * depth
    on_ball = ((pts - centre).norm(dim=-1) - tw.SCALES["large"]).abs() < 1e-4 * depth
    on_sky = ((pts - tw.BASE[:3, 3]).norm(dim=-1) - tw.SKY_RADIUS).abs() < 1e-3 * depth
    assert bool((on_floor | on_ball | on_sky).all())
    assert on_floor.any() and on_ball.any() and on_sky.any()
    assert float(rgb.min()) >= 0 and float(rgb.max()) <= 1


def test_the_centre_pixel_sees_the_ball_at_its_distance():
    """The optical axis hits the ball at |c - o| - r: the centre pixel's z-depth (odd size: its ray is the axis)."""
    scene = ball_on_axis(tw.SCALES["small"])
    thing = scene.things[0]
    _, depth = tw.render(tw.frame_params(scene, 1), tw.BASE[None], tw.intrinsics(33, 33), 33, 33, supersample=1)
    centre = torch.tensor([thing.x, -tw.SCALES["small"], thing.z], dtype=torch.float64)
    expected = (centre - tw.BASE[:3, 3]).norm() - tw.SCALES["small"]
    assert float(depth[0, 16, 16]) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("motion", noise_warp.MOTIONS)
def test_camera_words_move_the_image_as_they_move_the_noise(motion):
    """Points of the plane the noise warp moves (fronto-parallel at SCENE_DEPTH in the first camera, the warp's 1000
    units) move, from frame 0 to frame 1 of a toy video, by exactly the flow the noise warp computes for the same
    words at the same pixels (focal 1.2 x width). One step: the warp caps a field at 0.25 x width."""
    frames, W = 9, 32
    c2w, K = tw.camera_poses(motion, frames), tw.intrinsics(W, W)
    flow = noise_warp.plane_flow(*noise_warp.camera_path([motion], frames)[:2], W, W).double()  # (2, H, W)
    j, i = torch.meshgrid(torch.arange(0, W, 5.0), torch.arange(0, W, 5.0), indexing="xy")
    D, f = tw.SCENE_DEPTH, float(K[0, 0])
    X = torch.stack([(j - W / 2) * D / f, (i - W / 2) * D / f, torch.full_like(j, D)], -1).double()  # camera 0
    world = X @ c2w[0, :3, :3].T + c2w[0, :3, 3]
    w2c = torch.linalg.inv(c2w[1])
    cam = world @ w2c[:3, :3].T + w2c[:3, 3]
    moved = torch.stack([f * cam[..., 0] / cam[..., 2] + K[0, 2] - j, f * cam[..., 1] / cam[..., 2] + K[1, 2] - i])
    expected = flow[:, i.long(), j.long()]
    assert torch.allclose(moved, expected, atol=1e-3), (motion, (moved - expected).abs().max())
    if motion != "fixed":
        assert expected.abs().max() > 0.1  # the words do move the image


def test_captions_name_the_scene_and_parse_back_to_their_motion():
    gen = torch.Generator().manual_seed(0)
    for motion in noise_warp.MOTIONS:
        scene = tw.sample_scene(gen, 3)
        text = tw.caption(scene, motion)
        assert noise_warp.parse_camera(text) == [motion]
        assert text.startswith("Camera ") and text.endswith(f"on a {tw.FLOOR}.")
        for t in scene.things:
            assert f"{t.scale} {t.colour} {t.shape}" in text
        assert set(text.replace(".", " ").replace(",", " ").split()) <= set(tw.WORDS)
    tok = models.word_tokenizer(tw.WORDS)
    ids = tok(text).input_ids
    assert tok.unk_token_id not in ids and len(ids) == len(text.replace(".", " .").replace(",", " ,").split()) + 1


@pytest.mark.parametrize("corruption", [None, *tw.CORRUPTIONS])
def test_each_corruption_changes_what_its_label_says_and_nothing_else(corruption):
    gen = torch.Generator().manual_seed(3)
    scene = tw.sample_scene(gen, 3)
    c2w, K = tw.camera_poses("orbit_left", 9), tw.intrinsics(32, 32)
    p = tw.frame_params(scene, 9, corruption, gen, c2w, K)
    moved = {key: bool((p[key] - p[key][:1]).abs().max() > 1e-6) for key in ("centre", "half", "colour", "floor_shift")}
    expected = {None: set(), "drift": {"centre"}, "grow": {"centre", "half"}, "recolour": {"colour"},
                "swim": {"floor_shift"}}[p["corruption"]]
    assert {k for k, v in moved.items() if v} == expected
    assert p["corruption"] == corruption or p["corruption"] == "swim"
    if p["corruption"] in ("drift", "grow", "recolour"):  # the changed object stays in view
        i = int(((p["centre"] - p["centre"][:1]).abs().sum((0, 2)) + (p["colour"] - p["colour"][:1]).abs().sum((0, 2))
                 ).argmax())
        assert tw.in_view(p["centre"], c2w, K, 32)[:, i].float().mean() >= 7 / 9


def test_the_mix_gives_each_label_its_share():
    gen = torch.Generator().manual_seed(0)
    specs = [tw.draw_spec(gen) for _ in range(4000)]
    corrupt = sum(c is not None for _, _, c in specs) / len(specs)
    wrong = sum(m != cam for m, cam, _ in specs) / len(specs)
    assert corrupt == pytest.approx(tw.MIX["corrupt"], abs=0.03)
    assert wrong == pytest.approx(tw.MIX["wrong_camera"], abs=0.03)
    assert {c for _, _, c in specs} == {None, *tw.CORRUPTIONS}


def test_test_prompts_hold_combinations_no_rl_prompt_has():
    train, test = tw.make_prompts(300, 60)
    held = tw.held_out_combinations()

    def triples(text):
        motion = noise_warp.parse_camera(text)[0]
        names = text.split(". ", 1)[1].removesuffix(f" on a {tw.FLOOR}.").replace(" and ", ", ").split(", ")
        return {(motion, *name.split()[2:4]) for name in names}  # "a large red box" -> (motion, red, box)
    assert all(not (triples(t) & held) for t in train)
    assert all(triples(t) & held for t in test)
    assert not set(train) & set(test)
    for pool in (train, test):  # every motion equally often
        counts = [sum(noise_warp.parse_camera(t) == [m] for t in pool) for m in noise_warp.MOTIONS]
        assert max(counts) - min(counts) <= 1


def test_committed_prompt_files_are_what_the_build_writes():
    train, test = tw.make_prompts(*tw.BUILD["full"]["prompts"])
    for name, lines in (("toy_train.txt", train), ("toy_test.txt", test)):
        with open(os.path.join(ROOT, "prompts", name)) as f:
            assert f.read().splitlines() == lines, name


def test_a_mirrored_video_is_the_mirrored_motion():
    """The judge's augmentation: a left-right flip of an orbit-left render is an orbit-right render of the mirrored
    scene (the light comes from the other side, so compare the geometry: depth)."""
    scene = tw.sample_scene(torch.Generator().manual_seed(1), 2)
    mirrored = tw.Scene([tw.Thing(t.shape, t.colour, t.scale, -t.x, t.z, -t.yaw) for t in scene.things])
    for motion in ("orbit_left", "pan_right", "move_left", "push_in"):
        a = tw.make_video(scene, motion)
        b = tw.make_video(mirrored, tt.MIRROR.get(motion, motion))
        flipped, camera = tt.mirror(a["depth"][None, :, None], torch.tensor([tw.MOTIONS.index(motion)]))
        assert tw.MOTIONS[int(camera)] == tt.MIRROR.get(motion, motion)
        assert torch.allclose(flipped[0, :, 0], b["depth"], rtol=1e-4, atol=1e-3)


def test_jitter_moves_the_frame_not_the_scene():
    """The judge's other augmentation keeps both labels: every frame of a video is cut from the same shifted window
    of the frame with its edges repeated, so nothing changes over time that did not."""
    video = torch.rand(6, 9, 3, 12, 12, dtype=torch.float64)
    out = tt.jitter(video, torch.Generator().manual_seed(0), pixels=2)
    padded = F.pad(video.flatten(1, 2), (2, 2, 2, 2), mode="replicate").view(6, 9, 3, 16, 16)
    shifts = []
    for v, o in zip(padded, out):
        hits = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(v[..., dy:dy + 12, dx:dx + 12], o)]
        assert len(hits) == 1  # one window for all nine frames
        shifts.append(hits[0])
    assert len(set(shifts)) > 1  # it does shift, and not all videos alike
    assert torch.equal(tt.jitter(video, torch.Generator(), pixels=0), video)


def test_the_judge_learns_the_same_in_bf16_as_in_float32(tmp_path):
    """train_judge's bf16 autocast (the default where the CPU has bf16 units) changes rounding, not what is learnt:
    from one initialisation, on the same batches, each step's loss agrees with float32's to 0.1% (a loss rounded to
    bf16 would not)."""
    data = tw.make_dataset(16, seed=7)
    losses = {}
    for bf16 in (False, True):
        path = tmp_path / f"judge_{bf16}.pt"
        tt.train_judge(tw.build_judge(0), data["video"], data["corruption"] == 0, data["camera"], str(path), 4, 8,
                       bf16=bf16)
        losses[bf16] = torch.as_tensor(torch.load(path, weights_only=True)["losses"])
    assert len(losses[True]) == 4 and torch.allclose(losses[True], losses[False], rtol=1e-3)


@pytest.mark.parametrize("seed", range(6))
def test_an_edited_scene_differs_in_one_thing(seed):
    """edit_scene changes one attribute of one object, or drops one object of several; the caption then differs."""
    gen = torch.Generator().manual_seed(seed)
    scene = tw.sample_scene(gen, n=1 + seed % 3)
    edited = tt.edit_scene(scene, gen)
    assert tw.caption(edited, "pan_left") != tw.caption(scene, "pan_left")
    if len(edited.things) == len(scene.things):
        changed = [(a, b) for a, b in zip(scene.things, edited.things) if a != b]
        assert len(changed) == 1
        a, b = changed[0]
        assert sum(getattr(a, k) != getattr(b, k) for k in ("shape", "colour", "scale", "x", "z", "yaw")) == 1
    else:
        assert len(edited.things) == len(scene.things) - 1 and all(t in scene.things for t in edited.things)


def test_blur_is_torchvisions_gaussian_blur():
    """The preference model's blurred negatives: a per-frame sigma, the same as torchvision's Gaussian blur (kernel
    19, reflected border) frame by frame."""
    from torchvision.transforms.functional import gaussian_blur
    x = torch.rand(3, 3, 32, 32)
    sigma = torch.tensor([0.8, 2.0, 5.0])
    want = torch.stack([gaussian_blur(x[i:i + 1], [19, 19], [float(s)] * 2)[0] for i, s in enumerate(sigma)])
    torch.testing.assert_close(tt.blur(x, sigma), want, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def small_preference():
    vae = models.build_toy(tw.WORDS).vae.eval()
    return tt.build_hpsv3(seed=1)[0].eval(), tt.build_hpsv3()[1], tt.preference_data(vae, 6, seed=7)


def test_preference_loss_is_log2_for_a_pair_of_equals(small_preference):
    """Bradley-Terry on identical pairs: P(pos > neg) = 1/2, so the loss is log 2 whatever the network."""
    hps, proc, data = small_preference
    frames = tw.to_unit(data["video"][:, 3])
    loss = tt.preference_loss(hps, proc, frames, frames.clone(), data["caption"], 112 * 112)
    assert abs(loss.item() - math.log(2)) < 1e-5


def test_calibration_puts_preferred_at_ten_and_dispreferred_at_zero(small_preference):
    """After calibrate_preference the same held-out pairs score 10 (preferred) and 0 (dispreferred) on average, a
    second calibration is the identity, and the ranking is the one the first measured (reversed where the network
    ranked the dispreferred frames higher on average, as an untrained one may)."""
    import copy
    import reward
    hps, proc, data = small_preference
    hps = copy.deepcopy(hps)
    report = tt.calibrate_preference(hps, proc, data, 112 * 112)
    again = tt.calibrate_preference(copy.deepcopy(hps), proc, data, 112 * 112)  # on the calibrated network
    flipped = report["hps_calibration"]["scale"] < 0  # an untrained network may rank the dispreferred higher
    for kind in tt.NEGATIVES:
        acc = report[f"hps_pair_acc_{kind}"]
        assert again[f"hps_pair_acc_{kind}"] == pytest.approx(1 - acc if flipped else acc)
    assert abs(again["hps_calibration"]["scale"] - 1) < 1e-3
    n, gen = len(data["video"]), torch.Generator().manual_seed(0)
    with torch.no_grad():
        mu = lambda x: hps(**reward.hpsv3_inputs(proc, x, data["caption"], 112 * 112))[:, 0]  # noqa: E731
        pos = mu(tw.to_unit(data["video"][:, 4]))
        neg = torch.cat([mu(tt.negatives(data, torch.arange(n), torch.full((n,), 4), torch.full((n,), k), gen))
                         for k in range(len(tt.NEGATIVES))])
    assert abs(float(pos.mean()) - 10) < 1e-3 and abs(float(neg.mean())) < 1e-3


ENCODE_IN_TWO = """
import torch, models, toyworld as tw, toytrain as tt
torch.set_num_threads(2)  # the parent has run on two OpenMP threads before it forks (what hung: fork_pool)
torch.nn.functional.conv3d(torch.randn(4, 16, 9, 32, 32), torch.randn(16, 16, 3, 3, 3), padding=1)
gen = torch.Generator().manual_seed(0)
videos, held = (torch.randint(256, (n, 9, 3, 32, 32), generator=gen, dtype=torch.uint8) for n in (40, 8))
vae = models.build_toy(tw.WORDS).vae
enc = tt.encode_all(vae, dict(video=videos), dict(video=held), jobs=2, chunk=32)
torch.set_num_threads(1)
latents, recon = tt.encode_videos(vae, videos)
assert torch.equal(enc["latents"], latents) and torch.equal(enc["recon"], recon)
assert torch.equal(enc["heldout_recon"], tt.encode_videos(vae, held)[1])
"""


def test_encoding_in_two_processes_gives_the_numbers_of_one():
    """encode_all's chunks in two forked processes against encode_videos over all the videos at once, bit for bit,
    forked from a process that ran on two threads (in a process of its own, so that a hang fails by its timeout)."""
    proc = subprocess.run([sys.executable, "-c", ENCODE_IN_TWO], cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]


def stage_run(monkeypatch, stage, path, kill_at=None):
    """One build stage, from a freshly built toy Wan, on 8 videos; with kill_at, the process's AdamW steps stop
    with an error before their kill_at-th step (the stage saved every 3 steps). -> its state dict, or None if
    killed."""
    wan = models.build_toy(tw.WORDS, seed=0)
    data = tw.make_dataset(8, 0)
    latents = tt.encode_videos(wan.vae, data["video"])[0]
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def counted(*args, **kwargs):
        calls.append(1)
        if len(calls) == kill_at:
            raise KeyboardInterrupt("killed")
        return clip(*args, **kwargs)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", counted)
    try:
        if stage == "vae":
            tt.train_vae(wan.vae, data, path, images=(4, 4), clips=(4, 2), seed=3)
            return wan.vae.state_dict()
        tt.train_t2v(wan, latents, data["caption"], path, 8, 4, text_len=models.SIZES["toy"]["text_len"], seed=3)
        return {**wan.transformer.state_dict(), **wan.text_encoder.state_dict()}
    except KeyboardInterrupt:
        return None


@pytest.mark.parametrize("stage", ["vae", "t2v"])
def test_a_stage_killed_mid_run_resumes_to_the_weights_of_an_unbroken_run(tmp_path, monkeypatch, stage):
    """Every draw of a stage (its batches, the flow's noise, the VAE's posterior samples, the text encoder's dropout)
    is a function of the step, not of what the process drew before: a stage killed after a save and run again
    ends with the same weights, bit for bit, as one that ran through (from another global generator state)."""
    monkeypatch.setattr(tt, "SAVE_EVERY", 3)
    torch.manual_seed(1)
    whole = stage_run(monkeypatch, stage, str(tmp_path / "whole.pt"))
    torch.manual_seed(2)
    assert stage_run(monkeypatch, stage, str(tmp_path / "broken.pt"), kill_at=6) is None
    assert torch.load(tmp_path / "broken.pt", weights_only=True)["step"] == 3
    torch.manual_seed(3)
    resumed = stage_run(monkeypatch, stage, str(tmp_path / "broken.pt"))
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole), [k for k in whole if not torch.equal(whole[k],
                                                                                                       resumed[k])]


@pytest.mark.full
def test_a_miniature_build_trains_every_stage_and_writes_loadable_networks(tmp_path):
    """python toyworld.py --quick: every stage's loss falls, and what it writes loads through models.py."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "toyworld.py", "--quick", f"--work={tmp_path / 'work'}", f"--out={out}",
                           f"--prompts={tmp_path / 'prompts'}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((out / "build.json").read_text())
    for stage, (first, last) in report["loss_first_last"].items():
        assert last < first, (stage, first, last)
    wan = models.load_wan(str(out / "wan"), "cpu")
    assert wan.vae.config.latents_std != models.build_toy(tw.WORDS).vae.config.latents_std  # set from the data
    da3, gs_cfg = models.load_da3(str(out / "da3"))
    assert gs_cfg is None and isinstance(tw.load_judge(str(out)), tw.Judge)
    hps, _ = models.load_hpsv3(str(out / "hps"), str(out / "hps_backbone"), dtype=torch.float32)
    assert isinstance(hps, models.HPSv3Reward)
    assert set(report) >= {f"hps_pair_acc_{k}" for k in tt.NEGATIVES}
    assert (tmp_path / "prompts" / "toy_test.txt").read_text().count("\n") == tw.BUILD["quick"]["prompts"][1]
    # one stage again (--only_judge, its stage checkpoint removed): the same judge, bit for bit, and the same report
    first = (out / "judge.safetensors").read_bytes()
    (tmp_path / "work" / "judge.pt").unlink()
    proc = subprocess.run([sys.executable, "toyworld.py", "--quick", "--only_judge", f"--work={tmp_path / 'work'}",
                           f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    again = json.loads((out / "build.json").read_text())
    assert (out / "judge.safetensors").read_bytes() == first
    assert {k: v for k, v in again.items() if k not in ("seconds", "total_seconds")} == {
        k: v for k, v in report.items() if k not in ("seconds", "total_seconds")}


def committed_build():
    with open(os.path.join(models.TOY, "build.json")) as f:
        return json.load(f)


def test_committed_weights_load_and_stay_small():
    """A fresh clone runs --size=toy at once: the committed networks load through the size table, in all <= 25 MB."""
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(models.TOY) for f in files)
    assert total <= 25e6, total
    wan = models.load_wan(models.SIZES["toy"]["model"], "cpu")
    assert wan.transformer.config.num_layers == 4 and {"▁" + w for w in tw.WORDS} <= set(wan.tokenizer.get_vocab())
    critics = models.load_reward_models("toy")
    assert critics.qwen is None and critics.gs_cfg is None and critics.hps_pixels == 112 * 112
    assert committed_build()["build"] == json.loads(json.dumps(tw.BUILD["full"]))  # what `python toyworld.py` builds


def test_the_committed_judge_knows_fresh_ground_truth():
    """The judge, on ground-truth videos it has never seen (a seed no build uses), decoded by the committed VAE as
    evaluate.py's videos are: both heads well above chance (9 motions: 11%; consistent: 50%). build.json holds the
    accuracy on the 1,000 held-out videos; this checks 54 fresh ones against a looser bound."""
    data = tw.make_dataset(54, seed=12345)
    vae = models.load_wan(models.SIZES["toy"]["model"], "cpu").vae
    _, recon = tt.encode_videos(vae, data["video"])
    p, seen = tw.judge_videos(tw.load_judge(), tw.to_unit(recon))
    assert ((p > 0.5) == (data["corruption"] == 0)).float().mean() >= 0.75
    assert (seen == data["camera"]).float().mean() >= 0.8


def test_the_committed_preference_model_ranks_fresh_pairs():
    """The toy HPSv3, on pairs from scenes no build uses, decoded by the committed VAE: each scene's own frame scores
    above its edited scene's (the caption misread) and its blurred and smeared self in most pairs, and above the
    other kinds on average. build.json holds the accuracies on 300 held-out scenes; this checks 24 fresh ones."""
    critics = models.load_reward_models("toy")
    vae = models.load_wan(models.SIZES["toy"]["model"], "cpu").vae
    data = tt.preference_data(vae, 24, seed=12345)
    report = tt.calibrate_preference(critics.hps, critics.hps_proc, data, critics.hps_pixels)
    for kind in tt.NEGATIVES:
        assert report[f"hps_pair_acc_{kind}"] >= (0.6 if kind == "edited" else 0.8), (kind, report)


@pytest.mark.slow
def test_s_recon_prefers_a_consistent_video_to_its_corrupted_self():
    """What lets the toy reward see consistency: for the same scene and camera, S_recon (the committed critics, on
    videos decoded by the committed VAE) is higher for the consistent video than for each corrupted version in most
    pairs (on 60 scenes: 87-92% per corruption), though by little: about 0.01, where R_gen varies by 0.18 within a
    group of the base model's samples (BENCHMARKS.md, "What the toy reward sees")."""
    critics = models.load_reward_models("toy")
    vae = models.load_wan(models.SIZES["toy"]["model"], "cpu").vae
    gen, wins = torch.Generator().manual_seed(123), []
    for s in range(8):
        scene, motion = tw.sample_scene(gen), tw.MOTIONS[s % len(tw.MOTIONS)]
        videos = [tw.make_video(scene, motion, corruption=c, gen=torch.Generator().manual_seed(s))
                  for c in (None, *tw.CORRUPTIONS)]
        _, recon = tt.encode_videos(vae, torch.stack([(v["video"] * 255).round().to(torch.uint8) for v in videos]))
        lifts = [reward.lift(critics, v) for v in tw.to_unit(recon)]
        s_recon = [reward.s_recon(critics, lf) for lf in lifts]
        wins += [s_recon[0] > x for x in s_recon[1:]]
    assert sum(wins) / len(wins) >= 0.75, wins


@pytest.mark.slow
def test_a_toy_run_trains_and_the_judge_scores_it(tmp_path):
    """python train.py --size=toy for 2 steps, then evaluate.py --size=toy on 2 held-out prompts: the judge's
    columns are in the table, and the toy preset's reward has no S_meta and grades R_gen with the toy HPSv3."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "train.py", "--size=toy", "--max_steps=2", "--group_size=4",
                           "--prompts_per_rank=1", "--eval_every=0", f"--out_dir={out}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["S_meta"] for r in rows if "S_meta" in r] == [0.0, 0.0]
    assert all(r["R_gen"] != 0 and math.isfinite(r["R_gen"]) for r in rows if "R_gen" in r)
    proc = subprocess.run([sys.executable, "evaluate.py", "--size=toy", f"--ckpt={out}", "--limit=2",
                           f"--out={tmp_path / 'eval'}"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert "Consistent" in json.dumps(results) and "CamFollow" in (tmp_path / "eval" / "results.md").read_text()
    # tools/judge_as_reward.py's `score`: evaluate.py's judge columns, from the same videos without the 3D metrics
    from tools.judge_as_reward import judge_columns
    got = judge_columns(["--size=toy", f"--ckpt={out}", "--limit=2", f"--out={tmp_path / 'unused'}"])
    for row in results["models"]:
        means = row["means"]
        assert got[row["name"]] == tuple(round(means[k], 1) for k in ("Consistent", "ConsistentP", "CamFollow"))


def test_the_judge_as_reward_scores_the_latents_as_the_judge_scores_their_decodes():
    """tools/judge_as_reward.py's reward, on the normalised latents of fresh ground-truth videos (what the base model
    makes): the judge's P(consistent) of the same videos as encode_videos decodes them, to the rounding of uint8
    (it must undo the latent normalisation as sample.decode does), and higher for the consistent videos."""
    from tools.judge_as_reward import judge_reward
    data = tw.make_dataset(24, seed=12345)
    vae = models.load_wan(models.SIZES["toy"]["model"], "cpu").vae
    judge = tw.load_judge()
    z, recon = tt.encode_videos(vae, data["video"])
    mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1, 1)
    got = judge_reward(vae, judge)((z - mean) / std)
    want = tw.judge_videos(judge, tw.to_unit(recon))[0]
    assert got.shape == (24,) and got.dtype == torch.float32
    assert (got - want).abs().max() < 0.05, (got - want).abs().max()
    consistent = data["corruption"] == 0
    assert got[consistent].mean() > got[~consistent].mean() + 0.3


@pytest.mark.parametrize("flag", ["--reward=world", "--size=tiny"])
def test_the_judge_as_reward_refuses_what_it_sets_itself(flag):
    from tools.judge_as_reward import main
    with pytest.raises(SystemExit, match=f"error: {flag.split('=')[0]} is set by this tool"):
        main(["--max_steps=1", flag])


def test_the_judge_as_reward_takes_a_base_model_only_on_the_committed_vae(tmp_path):
    """--model: another base model is welcome (the committed one passes the check), but not one whose VAE differs by
    a single weight (the judge learnt the committed VAE's decodes), nor a folder that is not there."""
    from tools.judge_as_reward import committed_vae, main, same_vae
    same_vae(models.SIZES["toy"]["model"], committed_vae())
    wan = models.load_wan(models.SIZES["toy"]["model"], "cpu")
    with torch.no_grad():
        next(wan.vae.parameters()).view(-1)[0] += 1e-3
    standins.save_pretrained(wan, tmp_path / "other")
    for folder, message in [(tmp_path / "other", "is not the committed toy VAE"), (tmp_path / "none", "no such")]:
        for form in ([f"--model={folder}"], ["--model", str(folder)]):
            with pytest.raises(SystemExit, match=message):
                main(["--max_steps=1", *form])


@pytest.mark.full
def test_the_judge_as_reward_trains_on_the_judges_verdicts(tmp_path):
    """Two steps of tools/judge_as_reward.py beside train.py's own --size=toy --reward=latent with the same flags:
    step 0 samples the same rollouts from the same base model, so its reward differs only if the tool's reward is
    the one train.py called; the judge's P(consistent) lies in [0, 1] at every step."""
    flags = ["--max_steps=2", "--group_size=4", "--prompts_per_rank=1", "--eval_every=0"]
    rewards = {}
    for name, command in [("tool", ["tools/judge_as_reward.py"]), ("plain", ["train.py", "--size=toy",
                                                                            "--reward=latent"])]:
        out = tmp_path / name
        proc = subprocess.run([sys.executable, *command, *flags, f"--out_dir={out}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        rewards[name] = [r["reward"] for r in rows if "reward" in r]
    assert len(rewards["tool"]) == 2 and all(0 <= r <= 1 for r in rewards["tool"]), rewards
    assert abs(rewards["tool"][0] - rewards["plain"][0]) > 1e-4, rewards


@pytest.mark.slow
def test_the_rl_loop_learns_what_the_judge_accepts_when_the_judge_is_its_reward(tmp_path):
    """The RL loop on the toy world, with a reward that knows the answer (tools/judge_as_reward.py; no reward of
    train.py sees the judge): 120 steps with an SDE window of 4 from the committed base model raise the judge's mean
    P(consistent) on the 60 held-out captions over the base model's, which a --zero_advantages control equals to the
    last digit (its LoRA gets no gradient; BENCHMARKS.md). Measured: +5.8, +6.2, +5.5 points on seeds 0, 1, 2
    (Consistent +8.3, +6.7, +8.3); the bound is under half the smallest. About 6 minutes on 2 cores."""
    from tools.judge_as_reward import judge_columns
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "tools/judge_as_reward.py", "--seed=0", "--sde_window=4",
                           "--max_steps=120", "--eval_every=0", f"--out_dir={out}"], cwd=ROOT, capture_output=True,
                          text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    columns = judge_columns(["--size=toy", f"--ckpt={out}", "--seed=0", "--limit=60", f"--out={tmp_path / 'eval'}"])
    (base_consistent, base_p, _), (consistent, p, _) = columns["base"], columns["ckpt_000119"]
    assert p - base_p >= 2.5 and consistent > base_consistent, columns


def test_the_reward_check_reports_what_the_judge_says_of_each_groups_best():
    """tools/toy_reward_check.py's best-of-group column, on two hand-made groups: the best by S_recon is the first
    video of group 1 (judge P 0.9, follows) and the second of group 2 (P 0.2, does not), so the judge accepts 50% of
    them, mean P 0.55, 50% follow; the best by the judge itself is P 0.9 and P 0.7."""
    from tools.toy_reward_check import group_report
    row = lambda recon, p, follows: dict(S_recon=recon, S_traj=0.0, R_gen=0.0, total=recon, judge_p=p,  # noqa: E731
                                         follows=follows)
    groups = [[row(0.9, 0.9, True), row(0.5, 0.1, False)], [row(0.1, 0.7, True), row(0.8, 0.2, False)]]
    lines = {line.split(" |")[0]: line for line in group_report(groups)}
    assert lines["| S_recon"].endswith("| 50.0% / 0.550 / 50.0% |")
    assert lines["| judge_p (the judge itself)"].endswith("| 100.0% / 0.800 / 100.0% |")


@pytest.mark.parametrize("balance", ["50", "x,1", "1,-1", "50,1,2"])
def test_the_reward_check_refuses_a_balance_that_is_not_two_weights(balance):
    from tools.toy_reward_check import main
    with pytest.raises(SystemExit, match=f"--balance {balance}: W_RECON,W_GEN"):
        main(["--scenes=0", "--groups=0", "--balance", "20,1", balance])


def test_the_meta_view_grader_learns_what_tells_its_labels_apart():
    """tools/toy_reward_check.py's meta-view grader on views whose label is plain to see (consistent: a bright top
    half, corrupted: a bright bottom half, which mirroring keeps; each corruption an eighth of the views): after 150
    steps every held-out view is read right, so its report accepts all consistent views and no corrupted one."""
    from tools.toy_reward_check import train_meta_grader
    gen = torch.Generator().manual_seed(0)
    corruption = torch.tensor([0, 1, 0, 2, 0, 3, 0, 4] * 10)  # half consistent, each corruption an eighth
    views = (torch.rand(80, 3, 16, 16, generator=gen) * 60).to(torch.uint8)
    for i, c in enumerate(corruption.tolist()):
        rows = slice(0, 8) if c == 0 else slice(8, 16)
        views[i, :, rows] += 180
    _, report = train_meta_grader(views, corruption, steps=150, batch=16, held_out=40)
    assert report["accuracy"] == 1.0, report
    assert report["accepted"]["none"] == 1.0 and all(v == 0.0 for k, v in report["accepted"].items() if k != "none")
    assert set(report["accepted"]) == {"none", *tw.CORRUPTIONS}


@pytest.mark.full
def test_the_reward_check_scores_held_out_views_without_changing_the_reward():
    """--novel_view lifts each video once and hands the lift to reward.score: every reward term is what score gives
    when it lifts the video itself, and S_nv = 1 - NV_LPIPS of evaluate.novel_view_metrics on a lift of its own.
    --meta_grader does the same, and its S_meta is the grader's P(consistent) of the meta view of that video's lift.
    Two ground-truth videos of one scene, decoded by the committed VAE: the consistent one and its drifting self."""
    from tools.toy_reward_check import TERMS, MetaGrader, rebalance, scored
    import evaluate
    wan = models.load_wan(models.SIZES["toy"]["model"], "cpu")
    critics, judge = models.load_reward_models("toy"), tw.load_judge()
    scene = tw.sample_scene(torch.Generator().manual_seed(5))
    videos = [tw.make_video(scene, "orbit_left", corruption=c, gen=torch.Generator().manual_seed(5))
              for c in (None, "drift")]
    _, recon = tt.encode_videos(wan.vae, torch.stack([(v["video"] * 255).round().to(torch.uint8) for v in videos]))
    videos, captions = tw.to_unit(recon), [v["caption"] for v in videos]
    plain = scored(critics, judge, videos, captions, [["orbit_left"]] * 2)
    with_nv = scored(critics, judge, videos, captions, [["orbit_left"]] * 2, novel_view=True)
    for a, b, video in zip(plain, with_nv, videos):
        assert {t: a[t] for t in TERMS} == {t: b[t] for t in TERMS} and "S_nv" not in a
        nv = evaluate.novel_view_metrics(critics, video, reward.lift(critics, video))
        assert b["S_nv"] == pytest.approx(1 - nv["NV_LPIPS"], abs=1e-6) and b["NV_PSNR"] == pytest.approx(nv["NV_PSNR"])
    grader = MetaGrader()  # untrained: what is checked is which view it grades, and that nothing else changes
    with_meta = scored(critics, judge, videos, captions, [["orbit_left"]] * 2, grader=grader)
    for a, b, video in zip(plain, with_meta, videos):
        view = reward.to_uint8(reward.meta_view(reward.lift(critics, video)))
        assert {t: a[t] for t in TERMS} == {t: b[t] for t in TERMS}
        assert b["S_meta"] == pytest.approx(float(grader.p_consistent(view[None])[0]), abs=1e-6)
        assert b["total+S_meta"] == pytest.approx(b["total"] + b["S_meta"])
    # --balance: the total at other weights, recombined from the toy weights' terms, is reward.score's own total there
    balances = [(50.0, 1.0), (20.0, 0.0)]
    rebalance(plain, balances)
    paths = [noise_warp.requested_path(["orbit_left"], videos.shape[1])] * 2
    for w_recon, w_gen in balances:
        scores, _ = reward.score(critics, videos, captions, paths,
                                 **{**reward.defaults("toy"), "w_recon": w_recon, "w_gen": w_gen})
        got = [row[f"total at w_recon={w_recon:g}, w_gen={w_gen:g}"] for row in plain]
        assert got == pytest.approx(scores["total"].tolist(), abs=1e-5), (w_recon, w_gen)
