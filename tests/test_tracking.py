"""
What a run shows besides metrics.jsonl (tracking.py, train.py): the rollout media under out_dir/media/step_N/ (videos
with their reward components, the novel view S_meta graded, the estimated vs requested camera path), TensorBoard's
event files and wandb's offline run holding scalars, videos and images, the same tracker run continued by --resume,
and the progress bars (rank 0 only; denoising bars only where sampling is slow). The TensorBoard and wandb tests skip
where those packages are not installed (README, Install: the optional line).

    python -m pytest -q tests/test_tracking.py        # about 2 minutes on 2 CPU cores
"""
import glob
import json
import math
import os
import runpy
import shutil
import subprocess
import sys

import pytest
import torch

import models
import reward
import sample
import standins
import tracking
from trainrun import records, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Camera orbit left. A stone lighthouse on a cliff above a dark sea."


# -----------------------------------------------------------------------------
# What the rollout media hold

def test_pick_shows_the_best_and_the_worst_videos():
    rewards = torch.tensor([0.5, math.nan, 0.9, 0.1, 0.7, 0.3])
    assert tracking.pick(rewards) == [2, 4, 3, 1]  # best two, then the worst two (a bad video counts as worst)
    assert tracking.pick(rewards[:3]) == [2, 0, 1]  # a small group: all of it


@pytest.fixture(scope="module")
def critics():
    return standins.tiny_reward_models()


@pytest.mark.full
def test_score_keeps_the_render_s_meta_graded_and_the_estimated_cameras(critics):
    videos = torch.rand(2, 9, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    videos[1] = 0  # black: bad, nothing looked at
    path = torch.eye(4, dtype=torch.float64).repeat(9, 1, 1)
    seen = []
    scores, reasons = reward.score(critics, videos, [PROMPT] * 2, [path, path], seen=seen)
    plain, _ = reward.score(critics, videos, [PROMPT] * 2, [path, path])
    for k in ("S_meta", "S_recon", "S_traj", "total"):  # keeping them changes no score
        assert torch.equal(torch.nan_to_num(plain[k]), torch.nan_to_num(scores[k])), k
    kept = seen[0]
    assert kept["meta_view"].shape == (3, 56, 56) and kept["c2w"].shape == (9, 4, 4) and kept["scene_depth"] > 0
    assert reward.qwen_grade(critics, kept["meta_view"], PROMPT) == pytest.approx(scores["S_meta"][0].item(), abs=1e-6)
    assert seen[1] == {} and reasons[1] == [reward.Failure(reward.Kind.BAD_VIDEO, "video", "black")]


def test_rollout_media_files_and_rewards_json(tmp_path):
    videos = torch.rand(3, 9, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    rewards = torch.tensor([1.0, math.nan, 2.0])
    parts = {"S_meta": torch.tensor([0.1, math.nan, 0.3]), "R_gen": torch.tensor([0.01, math.nan, 0.02])}
    c2w = torch.eye(4).repeat(9, 1, 1)
    c2w[:, 0, 3] = torch.linspace(0, 1, 9)
    seen = [{"meta_view": torch.rand(3, 28, 28), "c2w": c2w, "scene_depth": 2.0}, {}, {}]
    files = tracking.rollout_media(str(tmp_path), videos, PROMPT, rewards, parts, [[], [reward.Failure(reward.Kind.BAD_VIDEO, "video", "black")], []],
                                   seen,
                                   c2w.double() * 500, 1000.0, sample.save_video)
    assert [(k, os.path.basename(p)) for k, p, _ in files] == [
        ("rollout/video", "rollout_2.mp4"), ("rollout/video", "rollout_0.mp4"),
        ("rollout/meta_view", "rollout_0_meta_view.png"), ("rollout/camera_path", "rollout_0_camera.png"),
        ("rollout/video", "rollout_1.mp4")]
    assert all(os.path.getsize(p) > 0 for _, p, _ in files)
    table = json.loads((tmp_path / "rewards.json").read_text())
    assert table["prompt"] == PROMPT and [v["index"] for v in table["videos"]] == [2, 0, 1]
    assert table["videos"][2] == {"index": 1, "reason": "video bad_video (black)", "reward": None, "S_meta": None, "R_gen": None}


# -----------------------------------------------------------------------------
# Trackers

def test_a_tracker_package_that_is_missing_or_a_tracker_that_cannot_start_is_one_line(tmp_path, monkeypatch,
                                                                                      capsys):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboard")
                        else find_spec(name, *a))
    for module, name in ((models, "load_wan"), (standins, "tiny_wan")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("model loaded despite a bad config"))
    monkeypatch.setattr(sys, "argv", ["train.py", "--report_to=tensorboard", f"--out_dir={tmp_path / 'o'}"])
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    assert str(e.value.code).startswith("error: --report_to=tensorboard needs the tensorboard package: pip install")

    def no_login(*a, **k):
        raise RuntimeError("api_key not configured (no-tty)\ncall wandb.login()")
    monkeypatch.setattr(tracking, "WandbTracker", no_login)
    with pytest.raises(SystemExit) as e:
        tracking.start("wandb", str(tmp_path), {}, project="p")
    assert "could not start (RuntimeError: api_key not configured (no-tty))" in str(e.value.code)
    assert "WANDB_MODE=offline" in str(e.value.code) and "\n" not in str(e.value.code)


# The world reward (the media need its lift), media every step, one group of 2 per rank to keep it short
WORLD = ["--size=tiny", "--prompts_per_rank=1", "--group_size=2", "--eval_prompts=2", "--log_media_every=1"]


def torchrun(args, out_dir, logs):
    """train.py on 2 gloo ranks with each rank's stdout and stderr in its own file under `logs` (torchrun's
    --redirects), to tell what rank 1 printed -> {rank: stderr text}."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", f"--log-dir={logs}",
           "--redirects=3", "train.py"] + args + [f"--out_dir={out_dir}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=900)
    err = {int(os.path.basename(os.path.dirname(f))): open(f).read()
           for f in glob.glob(os.path.join(logs, "**", "stderr.log"), recursive=True)}
    assert proc.returncode == 0, proc.stderr[-3000:] + str(err)[-3000:]
    return err


@pytest.mark.full
def test_tensorboard_two_ranks_media_eval_videos_and_a_resume_without_doubled_steps(tmp_path):
    """2 ranks, 3 steps, media every step, an eval of 2 prompts (one per rank) at step 2; then the run is put back
    to its step-1 checkpoint (as after a crash) and resumed: step 2 is redone and logged once."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    err = torchrun(WORLD + ["--max_steps=3", "--eval_every=3", "--save_every=2", "--report_to=tensorboard"], out,
                   tmp_path / "logs")
    assert "reward " in err[0] and "3/3" in err[0]  # the step bar, with the reward in its postfix
    assert "%|" not in err[1], err[1][-2000:]  # no bar on rank 1
    state = json.loads((out / "ckpt_000002" / "state.json").read_text())
    assert state["tracker"] == {"kind": "tensorboard", "id": "tensorboard"}
    for step in (0, 1, 2):  # rank 0's first group, as files
        table = json.loads((out / "media" / f"step_{step:06d}" / "rewards.json").read_text())
        assert len(table["videos"]) == 2 and all(v["S_meta"] is not None for v in table["videos"])
        for i in range(2):
            for suffix in (".mp4", "_meta_view.png", "_camera.png"):
                assert (out / "media" / f"step_{step:06d}" / f"rollout_{i}{suffix}").is_file()

    shutil.rmtree(out / "ckpt_000002")  # back to step 1, as if the run had died during step 2
    (out / "latest").write_text("ckpt_000001")
    run(WORLD + ["--resume", "--max_steps=3"], out)
    assert len(glob.glob(str(out / "tensorboard" / "events.out.tfevents.*"))) == 2  # rank 0 only, two starts
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("reward")] == [0, 1, 2]  # step 2 once: the first run's was purged
    assert [e.step for e in acc.Scalars("eval_reward")] == [2]
    images = acc.Tags()["images"]
    for tag in ("rollout/video/0", "rollout/video/1", "rollout/meta_view/1", "rollout/camera_path/1",
                "eval/video/0", "eval/video/1"):  # eval/video/1: rank 1's eval video, logged by rank 0
        assert tag in images, (tag, images)
    gif = acc.Images("rollout/video/0")[-1]
    assert gif.encoded_image_string[:6] == b"GIF89a" and (gif.height, gif.width) == (64, 64)
    assert [e.step for e in acc.Images("rollout/meta_view/0")] == [0, 1, 2]


def wandb_history(path):
    """The history rows of an offline run's .wandb file: wandb's LevelDB-style log (32 KiB blocks of records, each
    with a 7-byte header: crc32, length, type full/first/middle/last) of protobuf Records, after a 7-byte file
    header -> [{key: value}] in logging order."""
    import struct

    from wandb.proto import wandb_internal_pb2
    data, pos, chunks, rows = open(path, "rb").read(), 7, b"", []
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7]) if room >= 7 else (0, 0, 0)
        if n == 0 and kind == 0:  # the rest of a block is padding
            pos += room
            continue
        chunks, pos = (b"" if kind in (1, 2) else chunks) + data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            record = wandb_internal_pb2.Record.FromString(chunks)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in record.history.item})
    return rows


@pytest.mark.full
def test_wandb_offline_run_holds_scalars_and_media_and_resume_continues_it(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    for k, v in dict(WANDB_MODE="offline", WANDB_SILENT="true", HOME=str(tmp_path / "home")).items():
        monkeypatch.setenv(k, v)  # no account, no network; wandb's own settings under a fresh home
    run(WORLD + ["--max_steps=1", "--eval_every=1", "--eval_prompts=1", "--report_to=wandb"], out)
    run(WORLD + ["--max_steps=2", "--eval_every=1", "--eval_prompts=1", "--resume"], out)
    run_id = json.loads((out / "ckpt_000001" / "state.json").read_text())["tracker"]["id"]
    assert json.loads((out / "ckpt_000000" / "state.json").read_text())["tracker"] == {"kind": "wandb", "id": run_id}
    runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    assert len(runs) == 2 and all(r.endswith("-" + run_id) for r in runs)  # the resumed run is the same run
    for folder, step, line in zip(runs, (0, 1), records(out)):
        rows = wandb_history(os.path.join(folder, f"run-{run_id}.wandb"))
        assert [row["_step"] for row in rows] == [step]  # media and scalars of a step land in one row
        row = rows[0]
        assert row["reward"] == line["reward"] and row["eval_reward"] == line["eval_reward"]
        assert row["rollout/video/_type"] == row["eval/video/_type"] == "videos"
        assert (row["rollout/video/count"], row["eval/video/count"]) == (2, 1)
        for key in ("rollout/meta_view", "rollout/camera_path"):
            assert row[f"{key}/_type"] == "images/separated" and row[f"{key}/count"] == 2
        media = glob.glob(os.path.join(folder, "files", "media", "**", "*.*"), recursive=True)
        assert sum(m.endswith(".mp4") for m in media) == 3 and sum(m.endswith(".png") for m in media) == 4, media
    assert not os.path.exists(os.path.join(ROOT, "wandb"))  # nothing in the working directory


# -----------------------------------------------------------------------------
# Progress bars

def test_denoise_bar_shows_only_once_sampling_is_slow(capsys):
    wan = standins.build_tiny(0)
    x = torch.randn(1, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = torch.zeros(1, 8, 32)
    sigmas = sample.flow_sigmas(3, 3.0)
    for delay, shown in ((0.0, True), (1e6, False)):
        sample.denoise(wan.transformer, x, cond, cond, sigmas, 5.0, progress=True, delay=delay)
        assert ("denoise" in capsys.readouterr().err) == shown, delay
    sample.denoise(wan.transformer, x, cond, cond, sigmas, 5.0, progress=False)
    assert capsys.readouterr().err == ""
