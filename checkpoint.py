"""
A training run's folder: who owns it, its checkpoints, and which of them can be trusted.

train.py writes and resumes from these; evaluate.py reads them. Layout of out_dir:
    .lock                 held (flock) by the run that writes here; holds its pid
    latest                name of the newest complete checkpoint
    ckpt_000123/          one complete checkpoint: state.json (step, config), trainable.safetensors, ema.safetensors,
                          optimizer.pt, rng_rank<r>.pt, lora/ (EMA LoRA in the diffusers/peft format) or dcp/ (FSDP)
    metrics.jsonl, eval/  the run's log and eval videos
A checkpoint is written to ckpt_N.tmp and renamed when complete, so a crash mid-write never harms the last one.
"""
import fcntl
import json
import os
import re
import shutil
import time

import torch
from safetensors import safe_open

CKPT = re.compile(r"ckpt_(\d{6,})")  # exactly the names train.py writes (ckpt_%06d); nothing else is ours


def folder_name(step):
    return f"ckpt_{step:06d}"


def our_checkpoints(out_dir):
    """Complete checkpoints train.py wrote in out_dir, oldest first: [(step, path)]. Any other name is the user's."""
    found = []
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        m = CKPT.fullmatch(name)
        if m and os.path.isfile(os.path.join(out_dir, name, "state.json")):
            found.append((int(m.group(1)), os.path.join(out_dir, name)))
    return sorted(found)


def holds_a_run(out_dir):
    """True if out_dir already has a run's files (a fresh run must not mix its steps and checkpoints into them)."""
    files = any(os.path.exists(os.path.join(out_dir, name)) for name in ("latest", "metrics.jsonl"))
    return os.path.isdir(out_dir) and (files or bool(our_checkpoints(out_dir)))


def move_aside(out_dir):
    """--overwrite: move the old run's files into out_dir/replaced_<time>/ (never deleted). Returns that folder."""
    aside = os.path.join(out_dir, "replaced_" + time.strftime("%Y%m%d-%H%M%S"))
    os.makedirs(aside)
    for name in os.listdir(out_dir):
        if name in ("latest", "metrics.jsonl", "eval") or CKPT.fullmatch(name.removesuffix(".tmp")):
            shutil.move(os.path.join(out_dir, name), os.path.join(aside, name))
    return aside


class RunLock:
    """An exclusive advisory lock on out_dir/.lock for the life of the process. The kernel drops it when the
    process dies, however it dies, so a stale .lock file from a killed run never blocks the next one."""

    def __init__(self, out_dir):
        self.path = os.path.join(out_dir, ".lock")
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise SystemExit(f"error: {out_dir} is in use by another training run (pid {holder}); wait for it to "
                             "finish or pick another --out_dir")
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self):
        """Unlock now (a run that refuses to start must not keep the folder locked until the interpreter exits)."""
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def rotate(out_dir, keep_last, current):
    """Delete our oldest checkpoints so that `keep_last` remain; never `current` (the one just written), never a
    name train.py did not write."""
    ours = [path for _, path in our_checkpoints(out_dir)]
    for path in ours[:max(0, len(ours) - keep_last)]:
        if os.path.abspath(path) != os.path.abspath(current):
            shutil.rmtree(path)


def write_latest(out_dir, folder):
    tmp = os.path.join(out_dir, "latest.tmp")
    with open(tmp, "w") as f:
        f.write(os.path.basename(folder))
    os.replace(tmp, os.path.join(out_dir, "latest"))


def read_state(folder):
    with open(os.path.join(folder, "state.json")) as f:
        return json.load(f)


def _tensors_finite(tree):
    """All tensors in a nested dict/list are finite."""
    if torch.is_tensor(tree):
        return not tree.is_floating_point() or bool(torch.isfinite(tree).all())
    if isinstance(tree, dict):
        return all(_tensors_finite(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(_tensors_finite(v) for v in tree)
    return True


def _safetensors_problem(path):
    """"" or why the file cannot be trusted: unreadable header, no tensors, or a non-finite value."""
    try:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
            if not keys:
                return f"{os.path.basename(path)} holds no tensors"
            for k in keys:
                t = f.get_tensor(k)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    return f"{os.path.basename(path)}: {k} has non-finite values"
            return ""
    except Exception as e:  # a truncated or garbled file: safetensors raises its own error types
        return f"{os.path.basename(path)} is unreadable ({type(e).__name__}: {str(e)[:80]})"


def problem(folder):
    """"" if the checkpoint can be resumed from, else the reason: every file present, readable and finite; the
    trained weights and their EMA with the same names and shapes. FSDP checkpoints (dcp/) are checked for their
    metadata only; torch.distributed.checkpoint validates the shards as it loads them."""
    try:
        state = read_state(folder)
        state["step"], state["config"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"state.json unreadable ({type(e).__name__})"
    if os.path.isdir(os.path.join(folder, "dcp")):
        return "" if os.path.isfile(os.path.join(folder, "dcp", ".metadata")) else "dcp/.metadata missing"
    for name in ("trainable.safetensors", "ema.safetensors", "optimizer.pt"):
        if not os.path.isfile(os.path.join(folder, name)):
            return f"{name} missing"
    for name in ("trainable.safetensors", "ema.safetensors"):
        why = _safetensors_problem(os.path.join(folder, name))
        if why:
            return why
    with safe_open(os.path.join(folder, "trainable.safetensors"), "pt") as a, \
            safe_open(os.path.join(folder, "ema.safetensors"), "pt") as b:
        if set(a.keys()) != set(b.keys()) or any(a.get_slice(k).get_shape() != b.get_slice(k).get_shape()
                                                 for k in a.keys()):
            return "trainable and EMA weights differ in names or shapes"
    try:
        optim = torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True, map_location="cpu")
    except Exception as e:  # truncated pickle or zip: any of several error types
        return f"optimizer.pt is unreadable ({type(e).__name__})"
    if not _tensors_finite(optim):
        return "optimizer.pt has non-finite values"
    return ""


def find_resumable(out_dir):
    """(folder, state) of the newest checkpoint that passes `problem`, starting from `latest`; a corrupt one is
    skipped with a warning. Stops with one line if none is sound."""
    named = None
    if os.path.isfile(os.path.join(out_dir, "latest")):
        with open(os.path.join(out_dir, "latest")) as f:
            named = os.path.join(out_dir, f.read().strip())
    candidates = [path for _, path in reversed(our_checkpoints(out_dir))]
    if named in candidates:  # latest first, then the older ones
        candidates.remove(named)
        candidates.insert(0, named)
    if not candidates:
        raise SystemExit(f"error: --resume but {out_dir} has no complete checkpoint; drop --resume to start fresh "
                         "or point --out_dir at a run")
    for folder in candidates:
        why = problem(folder)
        if not why:
            return folder, read_state(folder)
        print(f"warning: checkpoint {folder} cannot be resumed from ({why}); trying the previous one", flush=True)
    raise SystemExit(f"error: no checkpoint in {out_dir} can be resumed from (see the warnings above); "
                     "start a fresh run in another --out_dir")
