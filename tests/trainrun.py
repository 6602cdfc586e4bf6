"""Run train.py as a user does, for the tests: `python train.py ...`, `torchrun ... train.py ...`, or through a
Python `wrapper` that patches something first (on every rank under torchrun); and read back its metrics.jsonl."""
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, out_dir, nproc=1, check=True, wrapper=None, background=False):
    """train.py with `args` and --out_dir (under torchrun when nproc > 1). Returns the CompletedProcess (or the
    running Popen with background=True); check=True asserts it exited 0."""
    env = dict(os.environ, OMP_NUM_THREADS="1" if nproc > 1 else os.environ.get("OMP_NUM_THREADS", "2"))
    argv = args + [f"--out_dir={out_dir}"]
    if wrapper:
        code = f"import sys\nsys.path.insert(0, {ROOT!r})\n" + wrapper + f"\nimport runpy\nsys.argv = ['train.py'] + " \
               f"{argv!r}\nrunpy.run_path('train.py', run_name='__main__')\n"
        cmd = [sys.executable, "-c", code]
        if nproc > 1:  # torchrun starts a file
            with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
                f.write(code)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", f.name]
    elif nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py"]
        cmd += argv
    else:
        cmd = [sys.executable, "train.py"] + argv
    if background:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]
