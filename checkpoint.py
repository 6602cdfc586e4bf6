"""
A training run's folder: who owns it, its checkpoints (written, read, validated), and which of them can be trusted.
Imports common (collectives, one-line errors); torch, safetensors, and diffusers and peft to export the LoRA.

train.py writes and resumes from these; evaluate.py reads them. Layout of out_dir:
    .lock                 held (flock) by the run that writes here; holds its pid
    latest                name of the newest complete checkpoint
    ckpt_000123/          one complete checkpoint: state.json (step, config, tracker run, git commit, versions),
                          trainable.safetensors, ema.safetensors, optimizer.pt, rng_rank<r>.pt, lora/ (EMA LoRA in
                          the diffusers/peft format, with sampling.json) or dcp/ (FSDP)
    metrics.jsonl, eval/  the run's log and eval videos
    media/, wandb/, tensorboard/   rollout media and the tracker's files (tracking.py)
A checkpoint is written to ckpt_N.tmp and renamed when complete, so a crash mid-write never harms the last one.
"""
import errno
import fcntl
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import time
import uuid

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

import common

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
        if name in ("latest", "metrics.jsonl", "eval", "media", "wandb", "tensorboard") \
                or CKPT.fullmatch(name.removesuffix(".tmp")):
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
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS, EINVAL: a filesystem mounted without flock (Lustre, NFS)
            self.file.close()
            raise SystemExit(f"error: --out_dir={out_dir} is on a filesystem without file locking (flock: "
                             f"{e.strerror or errno.errorcode.get(e.errno, e)}); mount it with locking (Lustre: "
                             "-o flock) or put --out_dir on another filesystem") from None
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


def read_latest(out_dir):
    """The checkpoint folder out_dir's `latest` file names, or None when there is no such file."""
    if not os.path.isfile(os.path.join(out_dir, "latest")):
        return None
    with open(os.path.join(out_dir, "latest")) as f:
        return os.path.join(out_dir, f.read().strip())


def find_resumable(out_dir):
    """(folder, state) of the newest checkpoint that passes `problem`, starting from `latest`; a corrupt one is
    skipped with a warning. Stops with one line if none is sound."""
    named = read_latest(out_dir)
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


def claim(out_dir, config, *, resume, overwrite, fixed):
    """Collective, before any model loads: take out_dir for this run. Rank 0 creates it and takes its lock; a resumed
    run finds its checkpoint, whose config must agree with `config` on the `fixed` keys (the others may change, and
    each change is said); a fresh run never mixes into an old one (`overwrite` moves the old one aside). Then every
    rank proves it sees the same folder (a token file rank 0 wrote). Any failure stops every rank with one line.
    Returns (lock, folder, state): the lock (rank 0; keep it for the life of the run, else None), and the checkpoint
    to resume from with its state.json, or None, None."""
    error, folder, state, token, lock = "", None, None, None, None
    if _rank() == 0:
        try:
            common.check_writable_dir(out_dir, "--out_dir")
            lock = RunLock(out_dir)
            if resume:
                folder, state = find_resumable(out_dir)
                changed = [k for k in fixed if state["config"].get(k) != config.get(k)]
                if changed:
                    common.fail("--resume with settings the checkpoint cannot take: " + ", ".join(
                        f"--{k}={config.get(k)} (checkpoint: {state['config'].get(k)})" for k in changed)
                                + "; drop them or start a fresh run in another --out_dir")
            elif holds_a_run(out_dir):
                if not overwrite:
                    common.fail(f"{out_dir} already holds a run; pass --resume to continue it, --overwrite to move it "
                                "aside and start fresh, or pick another --out_dir")
                common.print0(f"moved the previous run to {move_aside(out_dir)}")
            with open(os.path.join(out_dir, ".run_token"), "w") as f:
                f.write(token := uuid.uuid4().hex)
        except SystemExit as e:
            error = str(e.code)
            if lock is not None:
                lock.release()
    common.stop_together(error)
    shared = [token, folder, state]
    if dist.is_initialized():
        dist.broadcast_object_list(shared, src=0)
    token, folder, state = shared
    try:
        with open(os.path.join(out_dir, ".run_token")) as f:
            error = "" if f.read() == token else "a different token"
    except OSError:
        error = "no token"
    common.stop_together(error and f"rank {_rank()} sees {error} in --out_dir={out_dir}: every rank must write to the "
                                   "same folder; put --out_dir on a filesystem all nodes share")
    for k in (k for k in (state or {}).get("config", {}) if k in config and k not in fixed  # a removed flag: ignored
              and state["config"][k] != config[k]):
        common.print0(f"resume: --{k} changes from {state['config'][k]} to {config[k]}")
    return lock, folder, state


# -----------------------------------------------------------------------------
# Writing and reading a checkpoint (train.py). Every rank calls these together: they hold barriers, and under FSDP
# every rank writes and reads its own shards; otherwise rank 0 writes the weights and each rank its RNG state.

def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def _full(t):
    """A tensor whole on every rank: an FSDP shard (DTensor) is gathered, a plain tensor is itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def all_finite(tensors, device):
    """Collective: every rank's tensors are finite (FSDP shards differ per rank, so the ranks must agree)."""
    ok = torch.tensor([float(all(bool(torch.isfinite(_full(t)).all()) for t in tensors))], device=device)
    if dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def save(out_dir, step, state, policy, trainable, ema, optimizer, *, fsdp, lora, keep_last, device):
    """Write checkpoint `step` of out_dir: to ckpt_N.tmp, renamed when complete, then made `latest`, and the oldest
    rotated out. state: what state.json holds besides the step (ema_updates, world, config, ...). policy: the
    unwrapped transformer; trainable, ema: {name: tensor} (FSDP: shards); lora: None, or export the EMA LoRA
    (export_lora) with these sampling settings.
    Non-finite weights or EMA stop the run instead: a NaN checkpoint must never become `latest`."""
    if not all_finite(list(trainable.values()) + list(ema.values()), device):
        raise SystemExit(f"error: the trained weights or their EMA hold non-finite values at step {step}; not saved. "
                         f"The last checkpoint in {out_dir} is intact: lower --lr and --resume")
    master = _rank() == 0
    final = os.path.join(out_dir, folder_name(step))
    tmp = final + ".tmp"
    if master:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    common.barrier()
    weights = {n: prm.detach() for n, prm in trainable.items()}
    optim_state = get_optimizer_state_dict(policy, optimizer)
    if fsdp:  # every rank writes its shards
        import torch.distributed.checkpoint as dcp
        dcp.save({"model": weights, "ema": ema, "optim": optim_state}, checkpoint_id=os.path.join(tmp, "dcp"))
    elif master:
        save_file({n: w.contiguous() for n, w in weights.items()}, os.path.join(tmp, "trainable.safetensors"))
        save_file(ema, os.path.join(tmp, "ema.safetensors"))
        torch.save(optim_state, os.path.join(tmp, "optimizer.pt"))
    torch.save({"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda"
                else []}, os.path.join(tmp, f"rng_rank{_rank()}.pt"))
    if lora is not None:
        export_lora(os.path.join(tmp, "lora"), policy, ema, lora)
    if master:
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump(dict(step=step, **state), f, indent=1)
    common.barrier()
    if master:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        write_latest(out_dir, final)
        rotate(out_dir, keep_last, final)
    common.barrier()


def export_lora(folder, policy, ema, sampling):
    """The EMA LoRA in the diffusers/peft format (sample.py --lora, diffusers' load_lora_weights), its adapter
    metadata naming the base model, and sampling.json beside it: `sampling`, the settings sample.py and evaluate.py
    --lora use by default. Written by rank 0; every rank takes part (FSDP gathers the shards)."""
    from diffusers import WanPipeline
    from peft.utils import get_peft_model_state_dict

    full = {n: _full(t).cpu() for n, t in ema.items()}
    if _rank() == 0:
        WanPipeline.save_lora_weights(folder,
                                      transformer_lora_layers=get_peft_model_state_dict(policy, state_dict=full),
                                      transformer_lora_adapter_metadata=policy.peft_config["default"].to_dict())
        with open(os.path.join(folder, "sampling.json"), "w") as f:
            json.dump(sampling, f, indent=1)


def load(folder, policy, trainable, ema, optimizer, *, fsdp, device, optimizer_settings):
    """Restore a checkpoint in place: the trained weights, their EMA, the optimizer (its `optimizer_settings`, e.g.
    lr, replaced by this run's) and this rank's RNG state. Returns its state.json."""
    state = read_state(folder)
    if fsdp:
        import torch.distributed.checkpoint as dcp
        blob = {"model": {n: prm.detach() for n, prm in trainable.items()}, "ema": ema,
                "optim": get_optimizer_state_dict(policy, optimizer)}
        dcp.load(blob, checkpoint_id=os.path.join(folder, "dcp"))  # in place, into the shards
        optim_state = blob["optim"]
    else:
        weights = load_file(os.path.join(folder, "trainable.safetensors"))
        saved_ema = load_file(os.path.join(folder, "ema.safetensors"))
        if weights.keys() != trainable.keys():
            raise SystemExit(f"error: {folder} holds weights for another model ({len(weights)} tensors, this model "
                             f"trains {len(trainable)}); start a fresh run in another --out_dir")
        with torch.no_grad():
            for n, prm in trainable.items():
                prm.copy_(weights[n])
                ema[n].copy_(saved_ema[n])
        optim_state = torch.load(os.path.join(folder, "optimizer.pt"), weights_only=True, map_location=device)
    set_optimizer_state_dict(policy, optimizer, optim_state)
    for group in optimizer.param_groups:  # the flags of this run, not the checkpoint's
        group.update(optimizer_settings)
    rng_file = os.path.join(folder, f"rng_rank{_rank()}.pt")
    if os.path.exists(rng_file):  # absent when resuming on more ranks; all our draws derive from seed and step
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
    return state


def drop_metrics_after(out_dir, step):
    """Keep metrics.jsonl's lines up to `step`: a resumed run redoes the later steps and logs them again."""
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        with open(metrics) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(metrics + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(metrics + ".tmp", metrics)


def provenance():
    """What state.json records about the code that ran: its git commit ("unknown" outside a git checkout, with
    "+modified" when files differ from it) and the versions of the libraries the numbers depend on."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        git = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True, timeout=10,  # noqa: E731
                                        check=True).stdout.strip()
        commit = git("rev-parse", "HEAD") + ("+modified" if git("status", "--porcelain", "--untracked-files=no")
                                             else "")
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, or git too slow
        commit = "unknown"
    versions = {}
    for name in ("torch", "diffusers", "transformers", "peft", "gsplat"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return dict(git_commit=commit, versions=versions)
