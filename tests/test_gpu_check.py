"""tools/gpu_check.sh and tools/gpu_check_summary.py: what a time-limited GPU machine sends back (at most 8 files,
16 MiB each, 64 MiB in all, at most 2 folders deep, plain names) holds every part's exit code and figures, also for
a part killed with its call; the cheap parts as a CPU dry run over two calls.

    python -m pytest -q tests/test_gpu_check.py          (about 40 s on 2 CPU cores)
"""
import io
import json
import os
import re
import subprocess
import sys
import tarfile

import pytest

from tools import gpu_check_summary
from trainrun import ROOT


def assert_within_the_limits(out):
    """The device's rules for what comes back: <= 8 files, each <= 16 MiB, <= 64 MiB together, no deeper than
    OUTDIR/a/b/file, plain names (letters, digits, '.', '_', '-'). We keep every file at the top: no folders."""
    entries = list(out.iterdir())
    assert all(e.is_file() and not e.is_symlink() for e in entries), entries
    assert 0 < len(entries) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", e.name) for e in entries), entries
    sizes = [e.stat().st_size for e in entries]
    assert max(sizes) <= 16 << 20 and sum(sizes) <= 64 << 20, sizes
    return sorted(e.name for e in entries)


def test_a_work_folder_of_any_size_packs_into_three_files(tmp_path):
    """Three parts: one ok, bench failing in its train stage (its JSON keeps the earlier stage and the error), the RL
    step killed with its call (a start, no end); a 6 MiB log and a 20 MiB checkpoint."""
    work, out = tmp_path / "out.work", tmp_path / "out"
    (work / "logs").mkdir(parents=True)
    out.mkdir()
    (work / "parts.tsv").write_text("start\tenvironment\t60\nend\tenvironment\t0\t12\n"
                                    "start\tbench\t150\nend\tbench\t1\t140\n"
                                    "start\trl_step\t270\n")
    (work / "environment.json").write_text(json.dumps({"torch": "2.13.0", "device": "NVIDIA H200"}))
    (work / "logs" / "environment.txt").write_text("{}\n")
    (work / "logs" / "bench.txt").write_text("x" * (6 << 20) + "\ntrain failed: OutOfMemoryError\n")
    (work / "bench.json").write_text(json.dumps({"device": "cuda", "size": "small", "rows": [
        {"stage": "transformer step (CFG)", "seconds": 1.5, "tflops": 380.0, "util": 0.48, "peak_gib": 12.0},
        {"stage": "train", "error": "OutOfMemoryError: CUDA out of memory"}]}))
    (work / "run" / "ckpt_000000").mkdir(parents=True)
    with open(work / "run" / "ckpt_000000" / "weights.safetensors", "wb") as f:
        f.write(os.urandom(20 << 20))
    gpu_check_summary.main(str(work), str(out), "gpu")

    assert assert_within_the_limits(out) == ["bench.json", "logs.tar.gz", "summary.json"]
    parts = {p["part"]: p for p in json.loads((out / "summary.json").read_text())["parts"]}
    assert list(parts) == ["environment", "bench", "rl_step"]
    assert parts["environment"]["status"] == "ok" and parts["environment"]["figures"]["device"] == "NVIDIA H200"
    assert parts["bench"]["status"] == "failed" and parts["bench"]["last_lines"][-1] == "train failed: OutOfMemoryError"
    assert parts["bench"]["figures"]["transformer step (CFG)"]["tflops"] == 380.0
    assert parts["bench"]["figures"]["train"]["error"].startswith("OutOfMemoryError")
    assert parts["rl_step"]["rc"] is None and parts["rl_step"]["status"].startswith("no exit recorded")
    assert [r["part"] for r in json.loads((out / "bench.json").read_text())["rows"]] == ["bench", "bench"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
        log = tar.extractfile("logs/bench.txt").read()
    assert "logs/bench.txt" in names and "parts.tsv" in names and not any("ckpt" in n for n in names)
    assert len(log) == 4 << 20 and log.endswith(b"OutOfMemoryError\n")  # the last 4 MiB of the log

    # a part run again replaces its entry (the killed RL step, now finished) and moves to the end of the order
    with open(work / "parts.tsv", "a") as f:
        f.write("start\tenvironment\t60\nend\tenvironment\t0\t11\nstart\trl_step\t270\nend\trl_step\t0\t200\n")
    (work / "run" / "metrics.jsonl").write_text(json.dumps({"step": 0, "reward": 1.5, "t_rollout": 60.0}) + "\n")
    gpu_check_summary.main(str(work), str(out), "gpu")
    parts = json.loads((out / "summary.json").read_text())["parts"]
    assert [(p["part"], p["seconds"]) for p in parts] == [("bench", 140), ("environment", 11), ("rl_step", 200)]
    assert parts[-1]["figures"] == {"reward": 1.5, "t_rollout": 60.0}
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "run/metrics.jsonl" in tar.getnames()


def gpu_check(out, *parts):
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    return subprocess.run(["bash", os.path.join(ROOT, "tools", "gpu_check.sh"), str(out), *parts], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.full
def test_cpu_dry_run_of_the_quick_parts_over_two_calls(tmp_path):
    """Two calls into one OUTDIR: the second adds to the first's summary; OUTDIR stays within the limits; the parts
    run in gpu_check.sh's order whatever the order named; an unknown part is one line."""
    out = tmp_path / "check"
    first = gpu_check(out, "renderer", "environment")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert first.stdout.index("== environment") < first.stdout.index("== renderer")
    second = gpu_check(out, "build")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert assert_within_the_limits(out) == ["logs.tar.gz", "summary.json"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "cpu-dry-run"
    assert [(p["part"], p["status"]) for p in summary["parts"]] == [("environment", "ok"), ("renderer", "ok"),
                                                                     ("build", "ok")]
    assert "degree-2 SH" in summary["parts"][1]["figures"]
    with tarfile.open(out / "logs.tar.gz") as tar:
        env = json.load(io.BytesIO(tar.extractfile("environment.json").read()))
    assert env["torch"].startswith("2.")

    bad = gpu_check(out, "benchh")
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [
        "error: unknown part 'benchh' (valid: environment build cuda_tests renderer rl_step bench bench_reward "
        "warp_full)"]
