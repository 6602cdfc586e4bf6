"""Nothing is lost under signals, full disks, damaged run folders and hostile files: one test per case of the second
reliability pass (the number in each test's name), each of which failed on the code before its fix. A full disk is
simulated with RLIMIT_FSIZE (every write past N bytes fails with EFBIG, in this process and in ffmpeg alike) or a
patched os.write; signals are sent by the run to itself at a chosen point, so every test is deterministic.

    python -m pytest -q tests/test_reliability.py            # about 3 minutes on 2 idle CPU cores
"""
import errno
import fcntl
import json
import os
import pickle
import re
import runpy
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import common
import evaluate
import models
import sample
import standins
from trainrun import records, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Camera pan left. A red house by a river.", "Camera push in. A cup on a table.",
           "Camera orbit left. A stone tower.", "Camera fixed. A dog on a mat."]
TIMING = ("t_rollout", "t_reward", "t_train")


@pytest.fixture(scope="module")
def p4(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p4.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def T(p4):
    """The smallest train.py run that exercises the whole loop: 2 denoising steps, one SDE step, 2 videos, latent reward."""
    return ["--size=tiny", "--reward=latent", "--eval_every=0", "--dynamic_every=0", f"--train_prompts={p4}",
            "--rollout_steps=2", "--sde_window=1", "--group_size=2", "--prompts_per_rank=1"]


@pytest.fixture(scope="module")
def run2(T, tmp_path_factory):
    """A finished 2-step run: ckpt_000000, ckpt_000001, latest, metrics.jsonl. Tests work on copies (`copy_of`)."""
    out = tmp_path_factory.mktemp("run2") / "run"
    run(T + ["--max_steps=2", "--save_every=1"], out)
    return out


def copy_of(run_dir, tmp_path, name="run"):
    out = tmp_path / name
    shutil.copytree(run_dir, out, symlinks=True)
    return out


def in_process(monkeypatch, script, argv):
    """A script in this process with the model loader forbidden: what it refuses, it refuses before loading.
    Returns the SystemExit message. The signal handlers a script installs are put back afterwards."""
    for module, name in ((models, "load_wan"), (standins, "tiny_wan")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("model loaded despite a refusal"))
    monkeypatch.setattr(sys, "argv", [script] + argv)
    monkeypatch.chdir(ROOT)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(SystemExit) as e:
            runpy.run_path(os.path.join(ROOT, script), run_name="__main__")
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    return str(e.value.code)


def steps(out_dir):
    return [r["step"] for _, r in common.jsonl_lines(os.path.join(out_dir, "metrics.jsonl")) if r]


def last_line(text):
    return text.strip().splitlines()[-1] if text.strip() else ""


def python(code, timeout=300):
    """Python `code` in a fresh process from the repo root, as a user's run would be."""
    env = dict(os.environ, OMP_NUM_THREADS="2", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", f"import sys\nsys.path.insert(0, {ROOT!r})\n{code}"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def script(name, argv, wrapper=""):
    """`python name argv` as a user runs it, after `wrapper` (Python code) ran in the same process."""
    return python(f"{wrapper}\nimport runpy\nsys.argv = [{name!r}] + {argv!r}\n"
                  f"runpy.run_path({name!r}, run_name='__main__')\n")


def full_disk(limit):
    """Wrapper code: from here on, no file of this process (or of ffmpeg, its child) can grow past `limit` bytes."""
    return ("import resource\n"
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n")


def no_traceback(proc):
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]


# -----------------------------------------------------------------------------
# Data lost or corrupted

def test_01_an_empty_out_dir_is_refused_instead_of_the_current_folder(monkeypatch, T):
    before = set(os.listdir(ROOT))
    msg = in_process(monkeypatch, "train.py", T + ["--out_dir="])
    assert msg == "error: --out_dir is empty; name a folder (e.g. --out_dir=out)"
    assert set(os.listdir(ROOT)) == before  # no .lock, .run_token or checkpoint in the current folder


@pytest.mark.full
def test_02_links_planted_in_the_run_folder_are_never_followed(run2, T, tmp_path):
    out = copy_of(run2, tmp_path)
    victims = {}
    for name in (".run_token", "latest.tmp", "metrics.jsonl.tmp"):
        victims[name] = tmp_path / f"victim_{name.strip('.')}"
        victims[name].write_text("precious")
        (out / name).unlink(missing_ok=True)
        (out / name).symlink_to(victims[name])
    run(T + ["--max_steps=3", "--resume"], out)
    assert all(v.read_text() == "precious" for v in victims.values())
    for name in (".run_token", "latest", "metrics.jsonl"):
        assert not (out / name).is_symlink() and (out / name).is_file(), name
    assert (out / "latest").read_text() == "ckpt_000002" and steps(out) == [0, 1, 2]


@pytest.mark.parametrize("name, message", [(".lock", ".lock is a symbolic link; remove it"),
                                           ("metrics.jsonl", "metrics.jsonl is a symbolic link; remove it")])
def test_02_a_link_as_the_lock_or_the_log_is_refused_before_loading(monkeypatch, T, tmp_path, name, message):
    out, victim = tmp_path / "run", tmp_path / "victim"
    out.mkdir()
    victim.write_text("precious")
    (out / name).symlink_to(victim)
    assert message in in_process(monkeypatch, "train.py", T + [f"--out_dir={out}"])
    assert victim.read_text() == "precious"


@pytest.mark.full
def test_03_a_cut_last_line_and_a_note_in_metrics_do_not_stop_resume(run2, T, tmp_path):
    out = copy_of(run2, tmp_path)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text(lines[0] + "\n# lr looked high here\n" + lines[1] + '\n{"step": 2, "loss": 0.')
    proc = run(T + ["--max_steps=3", "--resume"], out)
    assert "are not JSON records and are skipped (line 2: '# lr looked high here')" in proc.stderr
    text = (out / "metrics.jsonl").read_text()
    assert text.splitlines()[1] == "# lr looked high here" and steps(out) == [0, 1, 2]  # the note stays, the cut goes
    assert text.endswith("\n") and '"loss": 0.\n' not in text


@pytest.mark.full
def test_03_a_full_disk_in_the_metrics_append_leaves_whole_lines_and_one_error(T, tmp_path):
    """A metrics line is ~500 bytes: step 0's fits under the limit, step 1's is cut by it (checkpoints: only at the
    end)."""
    out = tmp_path / "run"
    proc = run(T + ["--max_steps=3", "--save_every=100"], out, check=False, wrapper=full_disk(700))
    no_traceback(proc)
    assert proc.returncode != 0
    assert last_line(proc.stderr) == (f"error: cannot append step 1 to metrics.jsonl (File too large); {out} holds "
                                      "no checkpoint yet")
    assert (out / "metrics.jsonl").read_text().endswith("}\n") and steps(out) == [0]


def test_03_a_failed_append_is_cut_back_off(tmp_path, monkeypatch):
    """os.write stores half the line, then the disk is full: the file is as it was, and the error propagates."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n')
    real = os.write

    def half_then_full(fd, data):
        real(fd, data[:len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError, match="No space left"):
        common.append_line(str(path), '{"step": 1, "loss": 0.5}')
    monkeypatch.undo()
    assert path.read_text() == '{"step": 0}\n'


def test_03_evaluate_curves_skip_a_cut_line(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 0, "reward": 1.0}\n# a note\n{"step": 1, "reward": 1.5}\n'
                                           '{"step": 2, "rew')
    assert evaluate.plot_curves(str(tmp_path / "curves.png"), str(run_dir)) == ["reward"]
    assert "2 line(s) are not JSON records and are skipped (line 2: '# a note')" in capsys.readouterr().err


@pytest.fixture
def no_models(monkeypatch):
    for module, name in ((models, "load_wan"), (standins, "tiny_wan")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("model loaded despite a refusal"))


def test_04_a_second_evaluation_on_the_same_out_is_refused(no_models, tmp_path, p4):
    out = tmp_path / "eval"
    out.mkdir()
    with open(out / ".lock", "a+") as held:  # another evaluate.py, as the kernel sees it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        with pytest.raises(SystemExit) as e:
            evaluate.main(["--prompts", p4, "--out", str(out), "--sample_steps", "2"])
    assert str(e.value.code) == (f"error: {out} is in use by another evaluation (pid 4242); wait for it to finish or "
                                 "pick another --out")


# evaluate.py with every network but the tiny Wan replaced by stubs (fixed metric values), for the tests of what it
# writes; the sampling, the table and the files are the real code.
FAST_EVALUATE = ("import evaluate, models, splat\n"
                 "models.load_reward_models = lambda *a, **k: None\n"
                 "models.load_dino = models.load_raft = lambda *a, **k: None\n"
                 "splat.check_renderer_on_every_rank = lambda *a, **k: None\n"
                 "evaluate.evaluate_video = lambda *a, **k: ({key: float('nan') if key.startswith(('Consistent', 'Cam'))\n"
                 "                                            else 0.5 for key in evaluate.KEYS}, '')\n")  # no judge here


@pytest.mark.full
def test_05_evaluate_on_a_full_disk_prints_the_table_and_leaves_no_cut_file(tmp_path, p4):
    out = tmp_path / "eval"
    argv = ["--prompts", p4, "--limit", "2", "--sample_steps", "2", "--out", str(out)]
    proc = python(FAST_EVALUATE + "import common\nreal = common.setup_dist\n"  # the disk fills once the checks passed
                  "def setup_dist(*a):\n" + "".join("    " + line + "\n" for line in full_disk(1000).splitlines()) +
                  f"    return real(*a)\ncommon.setup_dist = setup_dist\nevaluate.main({argv!r})\n")
    no_traceback(proc)
    assert proc.returncode != 0 and "| base | 0.50 | 0.500 |" in proc.stdout  # the table came first
    assert last_line(proc.stderr) == (f"error: cannot write the results in --out={out} (File too large); the table "
                                      "above is the result")
    for name in os.listdir(out):  # whatever was written is whole; no temporary file is left
        assert not name.endswith(".tmp"), name
        if name == "results.json":
            json.loads((out / name).read_text())


@pytest.mark.full
def test_06_a_state_that_disagrees_with_its_folder_name_is_not_resumed(run2, tmp_path, capsys):
    out = copy_of(run2, tmp_path)
    shutil.copy(out / "ckpt_000000" / "state.json", out / "ckpt_000001" / "state.json")  # "step": 0 in ckpt_000001
    folder, state = checkpoint.find_resumable(str(out))
    assert os.path.basename(folder) == "ckpt_000000" and state["step"] == 0
    assert "state.json says step 0 but the folder is named for step 1" in capsys.readouterr().out


# -----------------------------------------------------------------------------
# Silent wrong results

@pytest.mark.full
def test_07_sample_on_a_full_disk_fails_instead_of_writing_a_cut_video(tmp_path):
    out = tmp_path / "x.mp4"
    proc = script("sample.py", ["--prompt", PROMPTS[0], "--sample_steps", "2", "--out", str(out)], full_disk(4096))
    no_traceback(proc)
    assert proc.returncode != 0 and "wrote" not in proc.stdout
    assert last_line(proc.stderr) == f"error: cannot write {out} (ffmpeg wrote 0 of its 9 frames; is the disk full?)"
    assert os.listdir(tmp_path) == []  # neither x.mp4 nor its temporary


@pytest.mark.full
def test_07_train_eval_video_on_a_full_disk_stops_with_one_line(T, tmp_path):
    out = tmp_path / "run"
    proc = run(T + ["--max_steps=1", "--save_every=100", "--eval_every=1", "--eval_prompts=1", "--sample_steps=2"], out,
               check=False, wrapper=full_disk(4096))
    no_traceback(proc)
    assert proc.returncode != 0
    assert last_line(proc.stderr) == (f"error: cannot write the eval video {out}/eval/step_000000/0000.mp4 (ffmpeg "
                                      f"wrote 0 of its 9 frames; is the disk full?); {out} holds no checkpoint yet")
    assert os.listdir(out / "eval" / "step_000000") == []


@pytest.mark.full
def test_08_latest_naming_a_folder_outside_the_run_is_not_followed(run2, tmp_path, capsys):
    out, other = copy_of(run2, tmp_path), copy_of(run2, tmp_path, "other")
    (out / "latest").write_text("../other/ckpt_000001")
    with pytest.raises(SystemExit, match="its 'latest' file names no checkpoint folder of this run"):
        evaluate.parse_args(["--ckpt", str(out)])
    (out / "latest").unlink()
    (out / "latest").symlink_to(other / "latest")  # a link is not read either
    with pytest.raises(SystemExit, match="its 'latest' file names no checkpoint folder of this run"):
        evaluate.parse_args(["--ckpt", str(out)])
    folder, _ = checkpoint.find_resumable(str(out))  # train.py: the newest of its own, with a warning
    assert folder == os.path.join(str(out), "ckpt_000001")
    assert "latest names no checkpoint folder of this run; ignored" in capsys.readouterr().out


def test_09_fewer_frames_than_the_metrics_need_are_refused(monkeypatch, T, tmp_path, p4):
    world = [a for a in T if a != "--reward=latent"]
    assert in_process(monkeypatch, "train.py", world + ["--frames=1", f"--out_dir={tmp_path}"]) == \
        "error: --frames=1: the world reward needs at least 5 frames"
    with pytest.raises(SystemExit, match="--frames=1: the metrics need at least 5 frames"):
        evaluate.parse_args(["--frames", "1", "--prompts", p4])


ALL_BAD = ("import reward, splat, standins, torch\n"
           "standins.tiny_reward_models = lambda *a, **k: None\n"
           "splat.check_renderer_on_every_rank = lambda *a, **k: None\n"
           "def score(critics, videos, *a, **k):\n"
           "    nan = torch.full((len(videos),), float('nan'))\n"
           "    parts = dict(total=nan, S_meta=nan, S_recon=nan, S_traj=nan, R_3D=nan, R_gen=nan)\n"
           "    black = [reward.Failure(reward.Kind.BAD_VIDEO, 'video', 'black')]\n"
           "    return dict(parts, bad=torch.ones(len(videos), dtype=torch.bool)), [black] * len(videos)\n"
           "reward.score = score\n")
# One video of every group non-finite: its pixels (the VAE's output), or a critic's score of it
NAN_VIDEO = ("import sample\n"
             "real = sample.decode\n"
             "def decode(*a, **k):\n"
             "    video = real(*a, **k)\n"
             "    video[-1, 0, 0, 0, 0] = float('nan')\n"
             "    return video\n"
             "sample.decode = decode\n")
NAN_CRITIC = ("import reward\n"
              "real, calls = reward.s_recon, []\n"
              "def s_recon(*a, **k):\n"
              "    calls.append(1)\n"
              "    return float('nan') if len(calls) % 2 == 0 else real(*a, **k)\n"
              "reward.s_recon = s_recon\n")


@pytest.mark.full
@pytest.mark.parametrize("wrapper, reason", [(ALL_BAD, "video bad_video"), (NAN_VIDEO, "video not_finite"),
                                             (NAN_CRITIC, "S_recon not_finite")],
                         ids=["no_scorable_video", "nan_video", "nan_critic_score"])
def test_09_steps_without_a_scorable_video_or_with_a_nan_count_toward_max_bad_steps(T, tmp_path, wrapper, reason):
    """A step whose videos are all bad, or with one non-finite video (its pixels, or a critic's score of it: both
    reward.Kind.NOT_FINITE, counted alike), counts toward --max_bad_steps; the bad video scores below its group."""
    world = [a for a in T if a != "--reward=latent"]
    out = tmp_path / "run"
    proc = run(world + ["--max_steps=3", "--max_bad_steps=2", "--save_every=100"], out, check=False, wrapper=wrapper)
    no_traceback(proc)
    assert proc.returncode != 0
    assert "error: 2 steps in a row with non-finite gradients or rewards or no scorable video; stopping" in \
        last_line(proc.stderr)
    assert steps(out) == [0]  # the second bad step stops the run before it is logged
    first = records(out)[0]
    assert first["reasons"][reason] == first["bad_videos"] == (2 if wrapper is ALL_BAD else 1)


def claim_again(out, **changes):
    """checkpoint.claim as train.py --resume calls it, with the checkpoint's own config and `changes`."""
    config = dict(checkpoint.read_state(out / "ckpt_000001")["config"], resume=True, max_steps=10, **changes)
    lock, folder, state = checkpoint.claim(str(out), config, resume=True, overwrite=False, fixed=("size",))
    lock.release()
    return folder, state


@pytest.mark.full
def test_10_a_change_of_rank_count_on_resume_is_reported(run2, tmp_path, capsys):
    out = copy_of(run2, tmp_path)
    state = json.loads((out / "ckpt_000001" / "state.json").read_text())
    (out / "ckpt_000001" / "state.json").write_text(json.dumps(dict(state, world=2)))
    shutil.copy(out / "ckpt_000001" / "rng_rank0.pt", out / "ckpt_000001" / "rng_rank1.pt")
    claim_again(out)
    assert ("warning: resuming on 1 rank(s), the checkpoint was written by 2: 2 videos per step instead of 4, and "
            "each step draws other prompts and noise than the run would have drawn on 2") in capsys.readouterr().out


def test_11_a_form_feed_or_line_separator_stays_inside_its_prompt(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("Camera pan left.\fA cup.\nA dog\u2028on a mat.\r\nA cat\x1cin a box.\n", encoding="utf-8")
    assert common.read_lines(str(path), "--prompts") == ["Camera pan left.\fA cup.", "A dog\u2028on a mat.",
                                                         "A cat\x1cin a box."]


# -----------------------------------------------------------------------------
# Tracebacks where an error line belongs

@pytest.mark.full
def test_12_a_corrupt_rng_state_falls_back_to_the_previous_checkpoint(run2, tmp_path, capsys):
    out = copy_of(run2, tmp_path)
    data = (out / "ckpt_000001" / "rng_rank0.pt").read_bytes()
    (out / "ckpt_000001" / "rng_rank0.pt").write_bytes(data[:len(data) // 2])
    folder, _ = checkpoint.find_resumable(str(out))
    assert os.path.basename(folder) == "ckpt_000000"
    assert "rng_rank0.pt is unreadable" in capsys.readouterr().out


def fsdp_checkpoint(folder, step):
    """A checkpoint in train.py's FSDP layout (dcp/ written by torch.distributed.checkpoint, here from one process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    weights = {n: p.detach() for n, p in model.named_parameters()}
    os.makedirs(folder)
    dcp.save({"model": weights, "ema": {n: w.clone() for n, w in weights.items()},
              "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=os.path.join(folder, "dcp"))
    torch.save({"torch": torch.get_rng_state(), "cuda": []}, os.path.join(folder, "rng_rank0.pt"))
    with open(os.path.join(folder, "state.json"), "w") as f:
        json.dump(dict(step=step, ema_updates=step, world=1, config={"fsdp": True}), f)


class Planted:
    def __reduce__(self):
        return os.system, ("touch planted_by_metadata",)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_12_a_corrupt_or_hostile_fsdp_checkpoint_falls_back(tmp_path, capsys, monkeypatch):
    for step in (0, 1):
        fsdp_checkpoint(str(tmp_path / checkpoint.folder_name(step)), step)
    assert checkpoint.problem(tmp_path / "ckpt_000001") == ""
    shard = tmp_path / "ckpt_000001" / "dcp" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64  # garbled in the middle, same length
    shard.write_bytes(bytes(data))
    folder, _ = checkpoint.find_resumable(str(tmp_path))
    assert os.path.basename(folder) == "ckpt_000000"
    assert "dcp/__0_0.distcp is unreadable" in capsys.readouterr().out

    monkeypatch.chdir(tmp_path)  # a pickle that would run a command when torch.distributed.checkpoint loads it
    (tmp_path / "ckpt_000000" / "dcp" / ".metadata").write_bytes(pickle.dumps(Planted()))
    assert checkpoint.problem(tmp_path / "ckpt_000000").startswith("dcp/.metadata is unreadable (UnpicklingError")
    assert not (tmp_path / "planted_by_metadata").exists()


@pytest.mark.full
def test_13_a_full_disk_while_checkpointing_stops_with_one_line_and_no_tmp(T, tmp_path):
    """The tiny LoRA's weight files are ~33 KB: over the limit; the metrics line is not."""
    out = tmp_path / "run"
    proc = run(T + ["--max_steps=2", "--save_every=1"], out, check=False, wrapper=full_disk(4096))
    no_traceback(proc)
    assert proc.returncode != 0
    assert last_line(proc.stderr).startswith("error: cannot write checkpoint ckpt_000000 (SafetensorError: ")
    assert last_line(proc.stderr).endswith(f"File too large (os error 27)); {out}/ckpt_000000.tmp was removed and "
                                           f"{out} holds no checkpoint yet")
    assert sorted(os.listdir(out)) == [".lock", ".run_token", "metrics.jsonl"]


@pytest.mark.full
def test_13_an_unfinished_checkpoint_is_removed_on_resume(run2, tmp_path, capsys):
    out = copy_of(run2, tmp_path)
    (out / "ckpt_000007.tmp").mkdir()  # step 7 will not be saved again when the run resumes at step 2
    (out / "ckpt_000007.tmp" / "trainable.safetensors").write_bytes(b"half")
    folder, _ = claim_again(out)
    assert os.path.basename(folder) == "ckpt_000001" and not (out / "ckpt_000007.tmp").exists()
    assert f"removed the unfinished checkpoint {out}/ckpt_000007.tmp" in capsys.readouterr().out


@pytest.mark.full
def test_14_a_checkpoint_folder_that_is_a_link_is_left_alone(run2, tmp_path):
    out = copy_of(run2, tmp_path)
    shutil.move(out / "ckpt_000000", tmp_path / "kept_elsewhere")
    (out / "ckpt_000000").symlink_to(tmp_path / "kept_elsewhere")
    (out / "ckpt_000002").mkdir()
    (out / "ckpt_000002" / "state.json").write_text("{}")
    assert [s for s, _ in checkpoint.our_checkpoints(str(out))] == [1, 2]
    checkpoint.rotate(str(out), 1, str(out / "ckpt_000002"))
    assert sorted(os.listdir(out)) == [".lock", ".run_token", "ckpt_000000", "ckpt_000002", "latest", "metrics.jsonl"]
    assert (out / "ckpt_000000").is_symlink() and (tmp_path / "kept_elsewhere" / "state.json").is_file()


def test_15_fsdp_without_torchrun_is_refused_before_loading(monkeypatch, T, tmp_path):
    monkeypatch.delenv("RANK", raising=False)
    assert "--fsdp shards the model over torchrun's processes: start train.py with torchrun" in \
        in_process(monkeypatch, "train.py", T + ["--fsdp", f"--out_dir={tmp_path}"])


@pytest.mark.full
@pytest.mark.parametrize("change", [dict(step="1"), dict(ema_updates=None), dict(world=0), dict(config=[1])])
def test_15_a_state_json_with_wrong_types_is_skipped(run2, tmp_path, capsys, change):
    out = copy_of(run2, tmp_path)
    state = json.loads((out / "ckpt_000001" / "state.json").read_text())
    (out / "ckpt_000001" / "state.json").write_text(json.dumps(dict(state, **change)))
    folder, state = checkpoint.find_resumable(str(out))
    assert os.path.basename(folder) == "ckpt_000000" and state["step"] == 0
    assert f"state.json has a missing or wrong-typed {next(iter(change))}" in capsys.readouterr().out


def test_15_absurd_warp_scale_and_text_len_are_refused_before_loading(monkeypatch, T, tmp_path, p4):
    assert "--warp_scale=100000 needs about" in in_process(monkeypatch, "sample.py", [
        "--prompt", PROMPTS[0], "--warp_scale", "100000", "--out", str(tmp_path / "x.mp4")])
    message = "--text_len=100000 is more than 512 tokens, the text length Wan2.1 was trained with"
    assert message in in_process(monkeypatch, "train.py", T + ["--text_len=100000", f"--out_dir={tmp_path}"])
    assert message in in_process(monkeypatch, "sample.py", ["--prompt", "x", "--text_len", "100000"])
    with pytest.raises(SystemExit, match=message):
        evaluate.parse_args(["--text_len", "100000", "--prompts", p4])


# -----------------------------------------------------------------------------
# Signals (16; Ctrl-C of 15): the run sends them to itself at a chosen point of a chosen step

def send_at(function, call, signals, pause=0.0):
    """Wrapper code: on the `call`-th call of module.function (e.g. "sample.rollout"), send each of `signals` to
    this process (with `pause` seconds between them), then go on."""
    module, name = function.split(".")
    return (f"import os, signal, time, {module}\n"
            f"real, calls = {module}.{name}, []\n"
            "def patched(*a, **k):\n"
            "    calls.append(1)\n"
            f"    if len(calls) == {call}:\n"
            f"        for i, s in enumerate({signals!r}):\n"
            f"            time.sleep({pause} if i else 0)\n"
            "            os.kill(os.getpid(), getattr(signal, s))\n"
            "    return real(*a, **k)\n"
            f"{module}.{name} = patched\n")


@pytest.mark.slow
def test_16_sigterm_mid_step_saves_the_last_finished_step_and_resume_is_bitwise(T, tmp_path):
    """SIGTERM during step 2's rollouts: the step is abandoned before it changes anything, step 1 (not due:
    --save_every=100) is saved, one line names it; --resume then gives exactly the uninterrupted run."""
    args = T + ["--max_steps=4", "--save_every=100"]
    run(args, tmp_path / "full")
    out = tmp_path / "stopped"
    proc = run(args, out, check=False, wrapper=send_at("sample.rollout", 3, ["SIGTERM"]))
    no_traceback(proc)
    assert proc.returncode == 1 and steps(out) == [0, 1]
    assert "SIGTERM received: the run saves and stops at its next safe point" in proc.stderr
    assert last_line(proc.stderr) == (f"error: SIGTERM: stopped after step 1; the last intact checkpoint is "
                                      f"{out}/ckpt_000001 (continue with --resume)")
    run(args + ["--resume"], out)
    full, resumed = (common.jsonl_lines(d / "metrics.jsonl") for d in (tmp_path / "full", out))
    assert [{k: v for k, v in r.items() if k not in TIMING} for _, r in resumed] == \
        [{k: v for k, v in r.items() if k not in TIMING} for _, r in full]
    a, b = (load_file(d / "ckpt_000003" / "ema.safetensors") for d in (tmp_path / "full", out))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.full
def test_16_ctrl_c_finishes_the_step_and_no_save_on_signal_saves_nothing(T, tmp_path):
    """SIGINT (Ctrl-C) during step 1's first update: step 1 finishes and is logged; --no-save_on_signal writes no
    checkpoint that was not due; one line, no KeyboardInterrupt traceback."""
    out = tmp_path / "run"
    proc = run(T + ["--max_steps=4", "--save_every=100", "--no-save_on_signal"], out, check=False,
               wrapper=send_at("grpo.policy_loss", 3, ["SIGINT"]))  # 2 updates of one micro-batch per step
    no_traceback(proc)
    assert proc.returncode == 1 and steps(out) == [0, 1]
    assert last_line(proc.stderr) == f"error: SIGINT: stopped after step 1; {out} holds no checkpoint yet"
    assert not [n for n in os.listdir(out) if n.startswith("ckpt_")]


@pytest.mark.full
def test_16_a_second_signal_stops_at_once(T, tmp_path):
    out = tmp_path / "run"
    proc = run(T + ["--max_steps=4", "--save_every=1"], out, check=False,
               wrapper=send_at("sample.rollout", 2, ["SIGTERM", "SIGTERM"], pause=1.2))
    assert proc.returncode == 128 + 15
    assert last_line(proc.stderr) == (f"error: a second signal (SIGTERM): stopped at once; the last intact checkpoint "
                                      f"is {out}/ckpt_000000 (continue with --resume)")
    assert steps(out) == [0] and not (out / "ckpt_000001").exists()


@pytest.mark.parametrize("name, argv, what", [
    ("sample.py", ["--prompt", PROMPTS[0]], "stopped; every video reported written is complete"),
    ("evaluate.py", ["--limit", "1"], "stopped before the evaluation finished")])
def test_16_sample_and_evaluate_stop_on_a_signal_with_one_line(tmp_path, name, argv, what):
    proc = script(name, argv + ["--out", str(tmp_path / ("x.mp4" if name == "sample.py" else "eval"))],
                  send_at("standins.tiny_wan", 1, ["SIGTERM"]))
    no_traceback(proc)
    assert proc.returncode == 1 and last_line(proc.stderr) == f"error: SIGTERM: {what}"


# -----------------------------------------------------------------------------
# Unclear or missing

def test_17_a_run_killed_in_its_first_checkpoint_is_replaced_with_overwrite(monkeypatch, T, tmp_path):
    out = tmp_path / "run"
    (out / "ckpt_000000.tmp").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 0}\n')
    fresh = in_process(monkeypatch, "train.py", T + [f"--out_dir={out}"])
    assert fresh == (f"error: {out} already holds a run that stopped before its first checkpoint; --overwrite to move "
                     "it aside and start fresh, or pick another --out_dir")
    resumed = in_process(monkeypatch, "train.py", T + [f"--out_dir={out}", "--resume"])
    assert resumed == (f"error: --resume but {out} holds no complete checkpoint: its run stopped before writing its "
                       "first one; pass --overwrite instead of --resume to move it aside and start fresh")


def test_17_a_folder_for_a_file_and_a_file_for_a_folder_are_named_so(monkeypatch, T, tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert in_process(monkeypatch, "train.py", T + [f"--train_prompts={tmp_path}", f"--out_dir={tmp_path}/o"]) == \
        f"error: --train_prompts={tmp_path} is a folder; pass a text file with one prompt per line"
    assert in_process(monkeypatch, "train.py", T + [f"--out_dir={a_file}"]) == \
        f"error: cannot create the folder --out_dir={a_file} (a file of that name exists); pick a writable place"
    with pytest.raises(SystemExit, match="--ckpt=.*a_file is a file; pass a checkpoint folder"):
        evaluate.parse_args(["--ckpt", str(a_file)])


@pytest.mark.full
def test_17_a_refusal_under_torchrun_is_printed_once(run2, T, tmp_path):
    out = copy_of(run2, tmp_path)
    proc = run(T + ["--max_steps=2"], out, nproc=2, check=False)  # a fresh run into a folder that holds one
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count(f"error: {out} already holds a run; pass --resume") == 1


@pytest.mark.full
def test_17_resume_with_no_step_left_is_refused_before_loading(monkeypatch, run2, T, tmp_path):
    out = copy_of(run2, tmp_path)
    assert in_process(monkeypatch, "train.py", T + ["--max_steps=2", "--resume", f"--out_dir={out}"]) == \
        (f"error: --resume: {out}/ckpt_000001 is step 1, and --max_steps=2 leaves no step to run; raise --max_steps")


@pytest.mark.full
def test_17_resume_does_not_report_its_own_flag_as_a_change(run2, tmp_path, capsys):
    claim_again(copy_of(run2, tmp_path))
    assert "--resume changes" not in capsys.readouterr().out


def test_17_a_mistyped_out_dir_with_resume_creates_nothing(monkeypatch, T, tmp_path):
    assert "--resume but --out_dir=" in in_process(monkeypatch, "train.py", T + [f"--out_dir={tmp_path}/typo",
                                                                                 "--resume"])
    assert os.listdir(tmp_path) == []


def test_17_write_probes_leave_nothing_behind_on_a_full_disk(tmp_path):
    code = (f"import sys; sys.path.insert(0, {ROOT!r})\n" + full_disk(1) +
            f"import common\ncommon.check_writable_dir({str(tmp_path)!r}, '--out')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and f"cannot write to --out={tmp_path} (File too large)" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_18_a_byte_order_mark_is_not_a_prompt(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbf\n")
    with pytest.raises(SystemExit, match="has no lines"):
        common.read_lines(str(path), "--prompts")
    path.write_bytes(b"\xef\xbb\xbfCamera pan left. A cup.\n")
    assert common.read_lines(str(path), "--prompts") == ["Camera pan left. A cup."]


def test_18_per_prompt_csv_never_holds_a_formula(tmp_path):
    rows = [dict(index=0, model="base", prompt='=HYPERLINK("http://x","y")', NV_PSNR=-1.5),
            dict(index=1, model="base", prompt="@SUM(A1)", NV_PSNR=2.0),
            dict(index=2, model="base", prompt="Camera pan left. A cup.", NV_PSNR=float("nan"))]
    evaluate.write_csv(str(tmp_path / "p.csv"), rows)
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[1] == "0,base,\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\",-1.5"
    assert lines[2] == "1,base,'@SUM(A1),2.0" and lines[3] == "2,base,Camera pan left. A cup.,nan"


def when_something_goes_wrong():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return text.split("## When something goes wrong")[1].split("\n## ")[0]


def test_18_readme_says_what_unknown_camera_words_do(capsys):
    """They are warned about (training prompts may hold them), not refused; README said they stopped every script."""
    mistakes = " ".join(when_something_goes_wrong().split("**Plain mistakes**")[1].split("\n- ")[0].split())
    assert "camera words" not in mistakes.split("stop every script")[0]
    assert "Camera words the parser does not know steer nothing: sample.py, train.py and evaluate.py name them in a " \
           "start-up warning" in mistakes
    for line in sample.camera_warnings(["Camera zoom in. A cup."]):
        sample.warn(line)
    assert capsys.readouterr().err.startswith("warning: 1 of 1 prompt(s) use camera words the parser does not know")


def test_readme_names_only_flags_that_exist(monkeypatch, capsys):
    """Every --flag that README's "When something goes wrong" names is a flag of train.py, sample.py or
    evaluate.py."""
    flags = set(re.findall(r"--[a-z_-]+", when_something_goes_wrong())) - {"--shutdown-timeout"}  # torchrun's own
    assert in_process(monkeypatch, "train.py", ["--help"]) == "0"
    assert in_process(monkeypatch, "sample.py", ["--help"]) == "0"
    known = set(re.findall(r"--[a-z_-]+", capsys.readouterr().out + evaluate.build_parser().format_help()))
    assert flags and flags <= known, flags - known
