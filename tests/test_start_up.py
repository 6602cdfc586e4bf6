"""Cluster start-up and determinism: the process group's timeout (--dist_timeout), the order in which ranks build
gsplat (one builder per extensions folder), and --deterministic, on gloo ranks on the CPU.

Two nodes are simulated by two processes that are each their node's local rank 0 (RANK 0 and 1, LOCAL_RANK 0),
the layout where every node's first rank used to build gsplat at the same time.

    python -m pytest -q tests/test_start_up.py          (about 2 minutes on 2 CPU cores)
"""
import os
import socket
import subprocess
import sys

import pytest

import common
from tools.same_numbers import metrics_differences
from trainrun import ROOT, records, run

SLOW = 20  # seconds rank 0 spends in its renderer check, as a first-run gsplat build would (minutes, really)
SHORT = 0.15  # minutes (9 s): shorter than rank 0's build, longer than any skew between the ranks before it

# Patches splat.check_renderer on every rank: log its start and end to LOG, and make rank 0 slow.
SLOW_BUILD = """
import os, time, splat
real = splat.check_renderer
def check(*a, **k):
    rank = os.environ["RANK"]
    with open(LOG, "a") as f:
        f.write(f"start {rank}\\n")
    if rank == "0":
        time.sleep(SLOW)
    out = real(*a, **k)
    with open(LOG, "a") as f:
        f.write(f"end {rank}\\n")
    return out
splat.check_renderer = check
"""


def two_nodes(args, tmp_path):
    """train.py as rank 0 and rank 1 of a 2-process gloo group, each its node's local rank 0 -> ([(exit code,
    stderr)] per rank, the lines the renderer checks logged)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "renderer.log"
    code = (f"import sys\nsys.path.insert(0, {ROOT!r})\nLOG, SLOW = {str(log)!r}, {SLOW}\n" + SLOW_BUILD
            + f"import runpy\nsys.argv = ['train.py'] + {args!r}\nrunpy.run_path('train.py', run_name='__main__')\n")
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        _, err = p.communicate(timeout=600)
        results.append((p.returncode, err))
    return results, log.read_text().split("\n")[:-1] if log.exists() else []


TINY = ["--size=tiny", "--max_steps=1", "--eval_every=0", "--group_size=2", "--prompts_per_rank=1"]


@pytest.mark.full
def test_first_ranks_of_two_nodes_build_one_after_the_other_and_wait_past_nccls_default(tmp_path):
    """Rank 0 builds (here: sleeps) first while rank 1, the other node's first rank, waits at the barrier; only then
    does rank 1 check its renderer. With the default --dist_timeout (60 minutes) the wait is fine and the step
    runs; with a timeout shorter than rank 0's build, rank 1 gives up waiting and the run stops."""
    out = tmp_path / "run"
    results, log = two_nodes(TINY + [f"--out_dir={out}"], tmp_path)
    assert [rc for rc, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert log == ["start 0", "end 0", "start 1", "end 1"]  # never both at once
    assert records(out)[0]["step"] == 0

    (tmp_path / "renderer.log").unlink()
    results, log = two_nodes(TINY + [f"--out_dir={tmp_path / 'short'}", f"--dist_timeout={SHORT}"], tmp_path)
    assert results[1][0] != 0 and "timed out" in results[1][1].lower(), results[1][1][-3000:]
    assert log[:1] == ["start 0"] and "start 1" not in log
    assert not (tmp_path / "short" / "metrics.jsonl").exists()


def test_evaluate_hands_its_cluster_flags_to_setup_dist(monkeypatch):
    import evaluate
    seen = []

    def fake(*args):
        seen.append(args)
        raise SystemExit("stopped after setup_dist")
    monkeypatch.setattr(common, "setup_dist", fake)
    monkeypatch.chdir(ROOT)
    for argv in (["--size=tiny"], ["--size=tiny", "--dist_timeout=90", "--deterministic"]):
        with pytest.raises(SystemExit, match="stopped after setup_dist"):
            evaluate.main(argv)
    assert seen == [(60.0, False), (90.0, True)]


def test_a_bad_timeout_is_one_line():
    with pytest.raises(SystemExit, match="--dist_timeout=0 must be a positive number of minutes"):
        common.setup_dist(0)


@pytest.mark.full
def test_deterministic_run_on_the_cpu_equals_the_default_run(tmp_path):
    """--deterministic turns torch's deterministic mode on, with cuBLAS's workspace setting, and the run still works:
    on the CPU, where every kernel is deterministic already, its numbers are the default run's, bitwise."""
    report = ("import atexit, os, torch\n"
              "atexit.register(lambda: print('DETERMINISTIC', torch.are_deterministic_algorithms_enabled(),"
              " os.environ.get('CUBLAS_WORKSPACE_CONFIG'), flush=True))\n")
    plain = run(TINY, tmp_path / "plain", wrapper=report)
    strict = run(TINY + ["--deterministic"], tmp_path / "strict", wrapper=report)
    assert "DETERMINISTIC False" in plain.stdout
    assert "DETERMINISTIC True :4096:8" in strict.stdout
    assert metrics_differences(tmp_path / "plain", tmp_path / "strict") == []
