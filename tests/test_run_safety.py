"""A run never loses or corrupts its own work: out_dir ownership and its lock, checkpoint rotation and validation,
resume checks, non-finite rewards and weights, strict-JSON metrics. Each test failed on the code before its fix.

    python -m pytest -q tests/test_run_safety.py
"""
import json
import os
import runpy
import sys
import time

import pytest
from safetensors.torch import load_file, save_file

import checkpoint
import models
import standins
from trainrun import run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--size=tiny", "--reward=latent", "--eval_every=0"]


def strict_records(out_dir):
    """metrics.jsonl as strict JSON: NaN/Infinity are not JSON and must not appear."""
    def no_constants(name):
        raise ValueError(f"non-JSON constant {name} in metrics.jsonl")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line, parse_constant=no_constants) for line in f]


def in_process(monkeypatch, args):
    """train.py in this process with the model loader forbidden: what it refuses, it refuses before loading."""
    for module, name in ((models, "load_wan"), (standins, "tiny_wan")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("model loaded despite a refusal"))
    monkeypatch.setattr(sys, "argv", ["train.py"] + args)
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    return str(e.value.code)


# -----------------------------------------------------------------------------
# Rotation touches only our own checkpoints

def test_rotation_keeps_user_folders_and_the_newest(tmp_path):
    for name in ("ckpt_best", "ckpt_final", "ckpt_paper", "ckpt_.bak", "ckpt_000001.tmp"):
        (tmp_path / name).mkdir()
    for step in (1, 2, 3, 10, 11):
        (tmp_path / checkpoint.folder_name(step)).mkdir()
        (tmp_path / checkpoint.folder_name(step) / "state.json").write_text("{}")
    checkpoint.rotate(tmp_path, 3, tmp_path / "ckpt_000011")
    assert sorted(os.listdir(tmp_path)) == sorted(["ckpt_.bak", "ckpt_000001.tmp", "ckpt_best", "ckpt_final",
                                                   "ckpt_paper", "ckpt_000003", "ckpt_000010", "ckpt_000011"])
    checkpoint.rotate(tmp_path, 1, tmp_path / "ckpt_000010")  # never the one just written, even if not the newest
    assert (tmp_path / "ckpt_000010").exists() and (tmp_path / "ckpt_best").exists()


@pytest.mark.parametrize("flag, message", [("--keep_last=-1", "--keep_last=-1 must be a positive number"),
                                           ("--save_every=0", "--save_every=0 must be a positive number")])
def test_rotation_settings_are_validated(tmp_path, monkeypatch, flag, message):
    assert message in in_process(monkeypatch, FAST + [flag, f"--out_dir={tmp_path / 'o'}"])


# -----------------------------------------------------------------------------
# out_dir is owned by one run

@pytest.mark.full
def test_a_fresh_run_refuses_a_folder_that_holds_a_run_and_overwrite_moves_it_aside(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    (out / "ckpt_000000").mkdir()
    (out / "ckpt_000000" / "state.json").write_text("{}")
    (out / "ckpt_best").mkdir()
    msg = in_process(monkeypatch, FAST + [f"--out_dir={out}"])
    assert "already holds a run; pass --resume" in msg
    run(FAST + ["--max_steps=1", "--overwrite"], out)
    aside = [d for d in os.listdir(out) if d.startswith("replaced_")]
    assert len(aside) == 1 and sorted(os.listdir(out / aside[0])) == ["ckpt_000000", "metrics.jsonl"]
    assert [r["step"] for r in strict_records(out)] == [0] and (out / "ckpt_best").exists()


@pytest.mark.full
def test_a_second_run_on_the_same_folder_is_refused_while_the_first_finishes_untouched(tmp_path):
    out = tmp_path / "run"
    first = run(FAST + ["--max_steps=4"], out, background=True)
    for _ in range(600):  # wait until the first run holds the lock
        if (out / ".lock").exists() and (out / ".lock").read_text().strip() == str(first.pid):
            break
        time.sleep(0.1)
    second = run(FAST + ["--max_steps=4", "--resume"], out, check=False)
    assert second.returncode != 0 and f"in use by another training run (pid {first.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    _, err = first.communicate(timeout=900)
    assert first.returncode == 0, err[-2000:]
    assert [r["step"] for r in strict_records(out)] == [0, 1, 2, 3]


# -----------------------------------------------------------------------------
# Resume checks, before any model loads

@pytest.fixture(scope="module")
def one_step_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    run(FAST + ["--max_steps=2", "--save_every=1"], out)
    return out


@pytest.mark.full
def test_resume_refuses_incompatible_settings_before_loading(one_step_run, monkeypatch):
    msg = in_process(monkeypatch, FAST + ["--resume", "--lora_rank=4", "--group_size=2",
                                          f"--out_dir={one_step_run}"])
    assert "--lora_rank=4 (checkpoint: 8)" in msg and "--group_size=2 (checkpoint: 4)" in msg


@pytest.mark.full
def test_resume_applies_a_new_learning_rate(one_step_run, tmp_path):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(one_step_run, out)
    proc = run(FAST + ["--max_steps=3", "--resume", "--lr=0.5"], out)
    assert "resume: --lr changes from 0.01 to 0.5" in proc.stdout
    recs = strict_records(out)
    assert [r["step"] for r in recs] == [0, 1, 2] and recs[2]["lr"] == 0.5 and recs[0]["lr"] == 0.01


def corrupt(path, how):
    if how == "nan":
        t = load_file(path)
        t[next(iter(t))][..., 0] = float("nan")
        save_file(t, path)
    else:  # truncated
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])


@pytest.mark.full
@pytest.mark.parametrize("how, file", [("nan", "trainable.safetensors"), ("truncated", "ema.safetensors"),
                                       ("truncated", "optimizer.pt")])
def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous_one(one_step_run, tmp_path, how, file):
    import shutil
    out = tmp_path / "copy"
    shutil.copytree(one_step_run, out)
    if file.endswith(".pt"):
        corrupt(out / "ckpt_000001" / file, "truncated")
    else:
        corrupt(out / "ckpt_000001" / file, how)
    assert checkpoint.problem(out / "ckpt_000001")
    folder, state = checkpoint.find_resumable(str(out))
    assert os.path.basename(folder) == "ckpt_000000" and state["step"] == 0
    corrupt(out / "ckpt_000000" / "trainable.safetensors", "nan")
    with pytest.raises(SystemExit, match="no checkpoint in .* can be resumed from"):
        checkpoint.find_resumable(str(out))


# -----------------------------------------------------------------------------
# Non-finite values are loud and never persisted

NAN_REWARD = ("import standins\n"
              "real = standins.latent_reward\n"
              "def toy(latents):\n"
              "    r = real(latents)\n"
              "    r[1] = float('nan')\n"
              "    return r\n"
              "standins.latent_reward = toy\n")
NAN_WEIGHTS = ("import torch\n"
               "real = torch.optim.AdamW.step\n"
               "def step(self, *a, **k):\n"
               "    out = real(self, *a, **k)\n"
               "    for group in self.param_groups:\n"
               "        for p in group['params']:\n"
               "            p.data.fill_(float('nan'))\n"
               "    return out\n"
               "torch.optim.AdamW.step = step\n")


@pytest.mark.full
def test_a_nan_reward_does_not_zero_its_group_and_metrics_stay_strict_json(tmp_path):
    out = tmp_path / "run"
    proc = run(FAST + ["--max_steps=2", "--save_every=100"], out, wrapper=NAN_REWARD)
    assert "latent reward not_finite" in proc.stdout
    recs = strict_records(out)
    assert all(r["adv_abs"] > 0 and r["bad_videos"] == 2 for r in recs)  # one per group, its group still trains
    assert all(r["reasons"] == {"latent reward not_finite": 2} for r in recs)


@pytest.mark.full
def test_non_finite_weights_are_never_saved(tmp_path):
    out = tmp_path / "run"
    proc = run(FAST + ["--max_steps=2", "--save_every=1"], out, check=False, wrapper=NAN_WEIGHTS)
    assert proc.returncode != 0 and "non-finite values at step 0; not saved" in proc.stderr
    assert not (out / "latest").exists() and not list(out.glob("ckpt_0*"))
