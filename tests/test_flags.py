"""
Flags as the user sees them: --help shows each flag's default as the command line will use it (the --size preset's,
once), and where a run's settings come from: --resume takes the checkpoint's saved config as its defaults, refuses a
change to what is optimised unless --allow_config_change, and says what changed before the config dump; --config
starts a run from a JSON file. train.py runs in this process up to the point where it would load the models.

    python -m pytest -q tests/test_flags.py        # about 20 s on 2 CPU cores
"""
import json
import os
import re
import runpy
import signal
import sys

import pytest
import torch
from safetensors.torch import save_file

import common
import evaluate
import models
import sample
import standins

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Loaded(Exception):
    """train.py reached the model loading: everything before it passed."""


def train_until_models(monkeypatch, capsys, argv):
    """train.py with argv in this process, stopped where it loads the models -> (exit message or None, stdout):
    None when it got there (every check passed), else the SystemExit's message."""
    for module, name in ((models, "load_wan"), (standins, "tiny_wan"), (standins, "random_wan")):
        monkeypatch.setattr(module, name, lambda *a, **k: (_ for _ in ()).throw(Loaded()))
    monkeypatch.setattr(sys, "argv", ["train.py"] + argv)
    monkeypatch.chdir(ROOT)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # train.py catches both
    try:
        runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
    except Loaded:
        return None, capsys.readouterr().out
    except SystemExit as e:
        return str(e.code), capsys.readouterr().out
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    pytest.fail("train.py ran to the end without loading a model")


def dumped_config(out):
    """The config train.py prints (an indented JSON object on its own lines)."""
    start = out.index("{\n")
    return json.loads(out[start:out.index("\n}\n", start) + 2])


# -----------------------------------------------------------------------------
# --help

def help_lines(monkeypatch, capsys, script, argv):
    """A script's --help -> ({flag: its help line}, unwrapped in a wide terminal; the presets it parsed with)."""
    monkeypatch.setenv("COLUMNS", "2000")
    monkeypatch.chdir(ROOT)
    seen, parse_flags = {}, common.parse_flags
    monkeypatch.setattr(common, "parse_flags", lambda p, argv, presets=None: (
        seen.setdefault("presets", presets), parse_flags(p, argv, presets))[1])
    with pytest.raises(SystemExit) as e:
        if script == "train.py":
            monkeypatch.setattr(sys, "argv", ["train.py"] + argv + ["--help"])
            runpy.run_path(os.path.join(ROOT, "train.py"), run_name="__main__")
        elif script == "sample.py":
            sample.main(argv + ["--help"])
        else:
            evaluate.parse_args(argv + ["--help"])
    assert e.value.code == 0
    lines, flag = {}, None
    for line in capsys.readouterr().out.splitlines():
        if m := re.match(r"\s+(--\w+)", line):
            flag = m.group(1)[2:]
            lines[flag] = line
        elif flag and line.startswith("    "):  # the help of a long flag starts on the next line
            lines[flag] += " " + line.strip()
        else:
            flag = None
    return lines, seen["presets"]


def shown_default(line):
    m = re.search(r"\(default: (.*)\)$", line)
    return None if m is None else m.group(1)


@pytest.mark.parametrize("size", [None, "tiny", "small", "large"])
@pytest.mark.parametrize("script", ["train.py", "sample.py", "evaluate.py"])
def test_help_shows_the_presets_defaults_once(monkeypatch, capsys, script, size):
    """Every flag of the --size preset shows that preset's value (tiny without --size); no flag shows two defaults
    or '(default: None)'."""
    argv = [f"--size={size}"] if size else []
    lines, presets = help_lines(monkeypatch, capsys, script, argv)
    preset = presets[size or "tiny"]
    for key in ("frames", "height", "width", "text_len"):
        assert preset[key] == models.SIZES[size or "tiny"][key]
    if script == "train.py" and size in ("small", "large"):  # the flags the issue found printing None
        assert [shown_default(lines[k]) for k in ("lr", "group_size", "max_steps")] == ["0.0001", "8", "3000"]
    checked = 0
    for flag, value in preset.items():
        if flag not in lines:
            continue  # a preset entry that is no flag of this script (e.g. evaluate.py's dino_px)
        if value is None:
            assert shown_default(lines[flag]) is None, lines[flag]
        else:
            assert shown_default(lines[flag]) == str(value), (lines[flag], value)
            checked += 1
    assert checked >= {"train.py": 15, "sample.py": 5, "evaluate.py": 6}[script], checked
    for flag, line in lines.items():
        assert line.count("default") <= 1 and "(default: None)" not in line, line


def test_help_texts_say_what_the_code_does(monkeypatch, capsys):
    lines, _ = help_lines(monkeypatch, capsys, "train.py", [])
    assert "channel 0" in lines["reward"]  # standins.latent_reward: the mean of the final latents' channel 0
    assert shown_default(lines["sample_steps"]) == str(models.SIZES["tiny"]["sample_steps"])
    assert shown_default(lines["log_media_every"]) == shown_default(lines["eval_every"])
    for script in ("train.py", "sample.py", "evaluate.py"):
        line = help_lines(monkeypatch, capsys, script, ["--size=large"])[0]["warp_strength"]
        assert f"large {models.SIZES['large']['stepwise_strength']}" in line  # what sample.warp_strength applies


# -----------------------------------------------------------------------------
# --resume: the checkpoint's config is the default

@pytest.fixture
def tiny_config(monkeypatch, capsys, tmp_path):
    """The full config a fresh tiny run saves (printed before its models load)."""
    error, out = train_until_models(monkeypatch, capsys, ["--size=tiny", f"--out_dir={tmp_path / 'fresh'}"])
    assert error is None, error
    return dumped_config(out)


def fake_run(folder, config, step=1):
    """A run folder whose checkpoint passes checkpoint.problem: state.json with `config`, two small weight files,
    an empty optimizer state, rank 0's RNG state."""
    ckpt, config = folder / f"ckpt_{step:06d}", {**config, "out_dir": str(folder)}
    ckpt.mkdir(parents=True)
    for name in ("trainable.safetensors", "ema.safetensors"):
        save_file({"w": torch.zeros(2)}, ckpt / name)
    torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state(), "cuda": []}, ckpt / "rng_rank0.pt")
    (ckpt / "state.json").write_text(json.dumps({"step": step, "ema_updates": 0, "world": 1, "config": config}))
    (folder / "latest").write_text(ckpt.name)
    return folder


# The settings of the run being continued: a user resuming it with --resume alone must get these back.
RUN = {"warp_mode": "stepwise", "warp_strength": 0.5, "noise_level": 0.5, "gen_scale": 0.2, "lr": 0.02,
       "sde_noise": "wan", "max_steps": 7, "eval_every": 0}


def test_resume_takes_the_checkpoints_config(monkeypatch, capsys, tmp_path, tiny_config):
    run = fake_run(tmp_path / "run", {**tiny_config, **RUN, "wandb": False})  # "wandb": a removed flag, ignored
    error, out = train_until_models(monkeypatch, capsys, ["--resume", f"--out_dir={run}"])
    assert error is None, error
    config = dumped_config(out)
    assert {k: config[k] for k in RUN} == RUN
    assert "resume: " not in out  # nothing changed


def test_a_moved_run_folder_is_resumed_where_it_is(monkeypatch, capsys, tmp_path, tiny_config):
    fake_run(tmp_path / "old", {**tiny_config, **RUN}).rename(tmp_path / "new")
    error, out = train_until_models(monkeypatch, capsys, ["--resume", f"--out_dir={tmp_path / 'new'}"])
    assert error is None, error
    assert dumped_config(out)["out_dir"] == str(tmp_path / "new")
    assert [line for line in out.splitlines() if line.startswith("resume: ")] == [
        f"resume: --out_dir changes from {tmp_path / 'old'} to {tmp_path / 'new'}"]


def test_resume_refuses_a_change_to_what_is_optimised(monkeypatch, capsys, tmp_path, tiny_config):
    run = fake_run(tmp_path / "run", {**tiny_config, **RUN})
    for flag, message in (("--noise_level=0.7", "--noise_level=0.7 (checkpoint: 0.5)"),
                          ("--warp_mode=init", "--warp_mode=init (checkpoint: stepwise)"),
                          ("--gen_scale=0.1", "--gen_scale=0.1 (checkpoint: 0.2)"),
                          ("--dynamic_every=0", "--dynamic_every=0 (checkpoint: 100)")):
        error, _ = train_until_models(monkeypatch, capsys, ["--resume", flag, f"--out_dir={run}"])
        assert error.startswith("error: --resume: ") and message in error and "--allow_config_change" in error, error


def test_resume_with_allow_config_change_lists_the_changes_before_the_config(monkeypatch, capsys, tmp_path,
                                                                             tiny_config):
    run = fake_run(tmp_path / "run", {**tiny_config, **RUN})
    error, out = train_until_models(monkeypatch, capsys, ["--resume", "--allow_config_change", "--noise_level=0.7",
                                                          "--lr=0.5", f"--out_dir={run}"])
    assert error is None, error
    changes = [line for line in out.splitlines() if line.startswith("resume: ")]
    assert changes == ["resume: --noise_level changes from 0.5 to 0.7", "resume: --lr changes from 0.02 to 0.5"]
    assert out.index(changes[-1]) < out.index("{\n")  # before the config dump
    config = dumped_config(out)
    assert config["noise_level"] == 0.7 and config["warp_mode"] == "stepwise"
    assert "resume" not in config and "allow_config_change" not in config  # how it started, not what it is


def test_resume_changes_a_learning_rate_without_asking(monkeypatch, capsys, tmp_path, tiny_config):
    run = fake_run(tmp_path / "run", {**tiny_config, **RUN})
    error, out = train_until_models(monkeypatch, capsys, ["--resume", "--lr=0.5", "--max_steps=9",
                                                          f"--out_dir={run}"])
    assert error is None, error
    assert "resume: --lr changes from 0.02 to 0.5" in out and "resume: --max_steps changes from 7 to 9" in out


def test_resume_takes_the_process_settings_and_a_flag_changes_them_without_asking(monkeypatch, capsys, tmp_path,
                                                                                   tiny_config):
    """--deterministic and --dist_timeout change how a run computes, not what it optimises: a resumed run takes them
    from its checkpoint, and a flag changes them without --allow_config_change (--no-deterministic turns one off)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)  # common.setup_dist sets it; put back afterwards
    switched = []
    monkeypatch.setattr(torch, "use_deterministic_algorithms", switched.append)
    a, b = (fake_run(tmp_path / name, {**tiny_config, **RUN, "deterministic": True, "dist_timeout": 90.0})
            for name in ("a", "b"))  # two copies: a run that got to its models keeps its folder's lock
    error, out = train_until_models(monkeypatch, capsys, ["--resume", f"--out_dir={a}"])
    assert error is None, error
    assert (dumped_config(out)["deterministic"], dumped_config(out)["dist_timeout"], switched) == (True, 90.0, [True])
    error, out = train_until_models(monkeypatch, capsys, ["--resume", "--no-deterministic", "--dist_timeout=120",
                                                          f"--out_dir={b}"])
    assert error is None, error
    assert "resume: --deterministic changes from True to False" in out and switched == [True]
    assert "resume: --dist_timeout changes from 90.0 to 120.0" in out


# -----------------------------------------------------------------------------
# --config FILE

def test_config_file_starts_a_run_and_flags_override_it(monkeypatch, capsys, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"size": "tiny", "lr": 0.3, "group_size": 3, "fsdp": False, "warp_mode": "stepwise",
                               "resume": True}))  # "resume" in a file: how that run started, ignored
    error, out = train_until_models(monkeypatch, capsys, [f"--config={cfg}", "--group_size=5",
                                                          f"--out_dir={tmp_path / 'a'}"])
    assert error is None, error
    config = dumped_config(out)
    assert (config["lr"], config["group_size"], config["warp_mode"]) == (0.3, 5, "stepwise")
    assert config["warp_strength"] == models.SIZES["tiny"]["stepwise_strength"]  # derived as for typed flags


def test_config_file_may_be_a_checkpoints_state_json(monkeypatch, capsys, tmp_path, tiny_config):
    run = fake_run(tmp_path / "run", {**tiny_config, **RUN, "wandb": False})
    state = run / "ckpt_000001" / "state.json"
    error, out = train_until_models(monkeypatch, capsys, [f"--config={state}", f"--out_dir={tmp_path / 'b'}"])
    assert error is None, error
    config = dumped_config(out)
    assert {k: config[k] for k in RUN} == RUN and config["out_dir"] == str(tmp_path / "b")


@pytest.mark.parametrize("content, message", [
    ({"grup_size": 4}, "'grup_size' is not a flag; did you mean group_size"),
    ({"group_size": 2.5}, "argument --group_size: invalid int value: '2.5'"),
    ({"warp_mode": "sideways"}, "argument --warp_mode: invalid choice: 'sideways'"),
    ({"fsdp": "yes"}, 'fsdp="yes" is not a valid value for --fsdp'),
    ([1, 2], "must hold a JSON object of flag values"),
    ("{not json", "is not valid JSON"),
])
def test_a_bad_config_file_stops_with_one_line(monkeypatch, capsys, tmp_path, content, message):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(content if isinstance(content, str) else json.dumps(content))
    error, _ = train_until_models(monkeypatch, capsys, [f"--config={cfg}", f"--out_dir={tmp_path / 'c'}"])
    assert error.startswith(f"error: --config={cfg}") and message in error and "\n" not in error, error


def test_config_and_resume_together_are_refused(monkeypatch, capsys, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text("{}")
    error, _ = train_until_models(monkeypatch, capsys, [f"--config={cfg}", "--resume", f"--out_dir={tmp_path}"])
    assert "pick one" in error
