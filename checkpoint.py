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
A checkpoint is written to ckpt_N.tmp and renamed when complete, so a crash mid-write never harms the last one. No
file here is ever written through a symbolic link: `latest` and `.run_token` are replaced by rename
(common.write_atomic), `.lock` and metrics.jsonl are opened with O_NOFOLLOW, and a link named like a checkpoint is
not one of ours.
"""
import errno
import fcntl
import importlib.metadata
import io
import json
import os
import pickle
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
    """Complete checkpoints train.py wrote in out_dir, oldest first: [(step, path)]. Any other name is the user's, and
    so is a symbolic link, whatever its name (train.py writes folders)."""
    found = []
    for name in os.listdir(out_dir) if os.path.isdir(out_dir) else []:
        m = CKPT.fullmatch(name)
        path = os.path.join(out_dir, name)
        if m and not os.path.islink(path) and os.path.isfile(os.path.join(path, "state.json")):
            found.append((int(m.group(1)), path))
    return sorted(found)


def unfinished(out_dir):
    """Checkpoint folders train.py began and never completed (ckpt_N.tmp: a crash or a full disk mid-write)."""
    names = os.listdir(out_dir) if os.path.isdir(out_dir) else []
    return [os.path.join(out_dir, n) for n in names if n.endswith(".tmp") and CKPT.fullmatch(n.removesuffix(".tmp"))]


def holds_a_run(out_dir):
    """True if out_dir already has a run's files (a fresh run must not mix its steps and checkpoints into them)."""
    files = any(os.path.lexists(os.path.join(out_dir, name)) for name in ("latest", "metrics.jsonl"))
    return os.path.isdir(out_dir) and (files or bool(our_checkpoints(out_dir)) or bool(unfinished(out_dir)))


def remove_path(path):
    """Delete a file, a symbolic link (never what it points to) or a folder tree; nothing if there is none."""
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


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
    process dies, however it dies, so a stale .lock file from a killed run never blocks the next one. A symbolic
    link at .lock is refused, never followed (the pid would overwrite whatever it points to). `what` and `flag`
    name the owner and the flag in the refusal (train.py's --out_dir; evaluate.py's --out)."""

    def __init__(self, out_dir, what="training run", flag="--out_dir"):
        self.path = os.path.join(out_dir, ".lock")
        try:
            self.file = os.fdopen(os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644),
                                  "r+")
        except OSError as e:
            raise SystemExit(f"error: {self.path} is a symbolic link; remove it (the lock must be a file of the "
                             f"folder itself)" if os.path.islink(self.path) else
                             f"error: cannot open the lock {self.path} ({e.strerror}); pick another {flag}")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise SystemExit(f"error: {out_dir} is in use by another {what} (pid {holder}); wait for it to "
                             f"finish or pick another {flag}")
        except OSError as e:  # ENOLCK, EOPNOTSUPP, ENOSYS, EINVAL: a filesystem mounted without flock (Lustre, NFS)
            self.file.close()
            raise SystemExit(f"error: {flag}={out_dir} is on a filesystem without file locking (flock: "
                             f"{e.strerror or errno.errorcode.get(e.errno, e)}); mount it with locking (Lustre: "
                             f"-o flock) or put {flag} on another filesystem") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self):
        """Unlock now (a run that refuses to start must not keep the folder locked until the interpreter exits)."""
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def lock_folder(folder, what, flag):
    """Collective: rank 0 takes `folder`'s RunLock (kept by the caller for the life of the run; None on the other
    ranks); if it is taken, every rank stops with rank 0's one line."""
    lock, error = None, ""
    if _rank() == 0:
        try:
            lock = RunLock(folder, what, flag)
        except SystemExit as e:
            error = str(e.code)
    common.stop_together(error)
    return lock


def rotate(out_dir, keep_last, current):
    """Delete our oldest checkpoints so that `keep_last` remain; never `current` (the one just written), never a
    name train.py did not write."""
    ours = [path for _, path in our_checkpoints(out_dir)]
    for path in ours[:max(0, len(ours) - keep_last)]:
        if os.path.abspath(path) != os.path.abspath(current):
            shutil.rmtree(path)


def write_latest(out_dir, folder):
    common.write_atomic(os.path.join(out_dir, "latest"), os.path.basename(folder))


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


def _state_problem(folder, state):
    """"" or why state.json cannot be trusted: the keys and types train.py writes, and the step its folder is named
    for (a state.json copied into another step's folder would resume the wrong run there)."""
    if not isinstance(state, dict):
        return "state.json is not a JSON object"
    def count(v, low):  # an int (not a bool) >= low
        return isinstance(v, int) and not isinstance(v, bool) and v >= low
    wrong = [k for k, low in (("step", 0), ("ema_updates", 0), ("world", 1)) if not count(state.get(k), low)]
    wrong += [] if isinstance(state.get("config"), dict) else ["config"]
    if wrong:
        return f"state.json has a missing or wrong-typed {', '.join(wrong)}"
    m = CKPT.fullmatch(os.path.basename(os.path.normpath(folder)))
    if m and int(m.group(1)) != state["step"]:
        return f"state.json says step {state['step']} but the folder is named for step {int(m.group(1))}"
    return ""


def _rng_problem(folder, world):
    """"" or why the RNG states of the `world` ranks that wrote the checkpoint cannot be restored."""
    size = torch.get_rng_state().numel()
    for r in range(world):
        path = os.path.join(folder, f"rng_rank{r}.pt")
        if not os.path.isfile(path):
            return f"rng_rank{r}.pt missing"
        try:
            rng = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:  # truncated or garbled: any of several error types
            return f"rng_rank{r}.pt is unreadable ({type(e).__name__})"
        if not (isinstance(rng, dict) and torch.is_tensor(rng.get("torch")) and rng["torch"].dtype == torch.uint8
                and rng["torch"].numel() == size and isinstance(rng.get("cuda"), list)):
            return f"rng_rank{r}.pt holds no RNG state"
    return ""


class _MetadataUnpickler(pickle.Unpickler):
    """dcp/.metadata is a pickle (torch.distributed.checkpoint writes it so, and loads it with pickle.load). We read it
    with only the classes it holds allowed, so a planted file cannot run code: it is refused before dcp sees it."""
    ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
               ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("collections", "OrderedDict")}

    def find_class(self, module, name):
        if not (module == "torch.distributed.checkpoint.metadata" and isinstance(
                getattr(torch.distributed.checkpoint.metadata, name, None), type)
                or (module, name) in self.ALLOWED
                or module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")
        return super().find_class(module, name)


def _dcp_problem(dcp_dir):
    """"" or why an FSDP checkpoint (torch.distributed.checkpoint) cannot be trusted: its metadata (read with
    `_MetadataUnpickler`) and every item it lists, read back from its shard file with torch.load(weights_only=True)
    and checked finite. This reads the whole checkpoint once, as the check of a non-FSDP one does."""
    import torch.distributed.checkpoint.metadata  # noqa: F401  (the classes _MetadataUnpickler allows)
    try:
        with open(os.path.join(dcp_dir, ".metadata"), "rb") as f:
            items = _MetadataUnpickler(f).load().storage_data
    except Exception as e:  # missing, truncated, or holding what a checkpoint does not
        return f"dcp/.metadata is unreadable ({type(e).__name__}: {str(e)[:80]})"
    by_file = {}
    for index, info in items.items():
        by_file.setdefault(info.relative_path, []).append((index.fqn, info))
    for name, entries in sorted(by_file.items()):
        if not re.fullmatch(r"__\d+_\d+\.distcp", name):
            return f"dcp/.metadata names a shard {name!r} that torch.distributed.checkpoint does not write"
        try:
            with open(os.path.join(dcp_dir, name), "rb") as f:
                for fqn, info in entries:
                    if getattr(info, "transform_descriptors", None):
                        return f"dcp/{name}: {fqn} is stored transformed (compressed), which train.py never writes"
                    f.seek(info.offset)
                    blob = f.read(info.length)
                    if len(blob) != info.length:
                        return f"dcp/{name} is truncated (at {fqn})"
                    value = torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
                    if not _tensors_finite(value):
                        return f"dcp/{name}: {fqn} has non-finite values"
        except Exception as e:  # a missing file, or an item torch.load refuses
            return f"dcp/{name} is unreadable ({type(e).__name__}: {str(e)[:80]})"
    return ""


def problem(folder):
    """"" if the checkpoint can be resumed from, else the reason: state.json with the right types and the step of
    its folder's name; every rank's RNG state; every other file present, readable and finite (FSDP: every shard
    item, `_dcp_problem`); the trained weights and their EMA with the same names and shapes."""
    try:
        state = read_state(folder)
    except (OSError, ValueError) as e:
        return f"state.json unreadable ({type(e).__name__})"
    why = _state_problem(folder, state) or _rng_problem(folder, state["world"])
    if why:
        return why
    if os.path.isdir(os.path.join(folder, "dcp")):
        return _dcp_problem(os.path.join(folder, "dcp"))
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
    """The checkpoint folder out_dir's `latest` file names, or None: when there is no such file, and when it names
    anything but a checkpoint folder (ckpt_NNNNNN, not a link) directly inside out_dir: a path elsewhere, '..',
    another run's folder. `latest` itself is read only if it is a plain file (never through a link)."""
    try:
        with os.fdopen(os.open(os.path.join(out_dir, "latest"), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)) as f:
            name = f.read(64).strip()
    except (OSError, UnicodeDecodeError):
        return None
    folder = os.path.join(out_dir, name)
    return folder if CKPT.fullmatch(name) and os.path.isdir(folder) and not os.path.islink(folder) else None


def last_words(out_dir):
    """Where a stopped run stands, for its last line: its last intact checkpoint, or none yet."""
    latest = read_latest(out_dir)
    return (f"the last intact checkpoint is {latest} (continue with --resume)" if latest else
            f"{out_dir} holds no checkpoint yet")


def find_resumable(out_dir):
    """(folder, state) of the newest checkpoint that passes `problem`, starting from `latest`; a corrupt one is
    skipped with a warning. Stops with one line if none is sound."""
    named = read_latest(out_dir)
    candidates = [path for _, path in reversed(our_checkpoints(out_dir))]
    if named in candidates:  # latest first, then the older ones
        candidates.remove(named)
        candidates.insert(0, named)
    elif os.path.lexists(os.path.join(out_dir, "latest")):
        print(f"warning: {os.path.join(out_dir, 'latest')} names no checkpoint folder of this run; ignored",
              flush=True)
    if not candidates and holds_a_run(out_dir):
        raise SystemExit(f"error: --resume but {out_dir} holds no complete checkpoint: its run stopped before writing "
                         "its first one; pass --overwrite instead of --resume to move it aside and start fresh")
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
            if resume and not os.path.isdir(out_dir):  # a mistyped path: create nothing
                common.fail(f"--resume but --out_dir={out_dir} does not exist (no complete checkpoint to continue "
                            "from); check the path, or drop --resume to start a fresh run there")
            common.check_writable_dir(out_dir, "--out_dir")
            if os.path.islink(os.path.join(out_dir, "metrics.jsonl")):
                common.fail(f"{os.path.join(out_dir, 'metrics.jsonl')} is a symbolic link; remove it (a run appends "
                            "to its own log, never through a link)")
            lock = RunLock(out_dir)
            if resume:
                folder, state = find_resumable(out_dir)
                changed = [k for k in fixed if state["config"].get(k) != config.get(k)]
                if changed:
                    common.fail("--resume with settings the checkpoint cannot take: " + ", ".join(
                        f"--{k}={config.get(k)} (checkpoint: {state['config'].get(k)})" for k in changed)
                                + "; drop them or start a fresh run in another --out_dir")
                if config.get("max_steps") is not None and state["step"] + 1 >= config["max_steps"]:
                    common.fail(f"--resume: {folder} is step {state['step']}, and --max_steps={config['max_steps']} "
                                "leaves no step to run; raise --max_steps")
                for path in unfinished(out_dir):  # a checkpoint whose write was cut off: never resumed from
                    remove_path(path)
                    common.print0(f"removed the unfinished checkpoint {path}")
            elif holds_a_run(out_dir):
                if not overwrite:
                    resumable = "pass --resume to continue it, " if our_checkpoints(out_dir) else ""
                    common.fail(f"{out_dir} already holds a run"
                                + ("; " if resumable else " that stopped before its first checkpoint; ") + resumable
                                + "--overwrite to move it aside and start fresh, or pick another --out_dir")
                common.print0(f"moved the previous run to {move_aside(out_dir)}")
            common.write_atomic(os.path.join(out_dir, ".run_token"), token := uuid.uuid4().hex)
        except (SystemExit, OSError) as e:  # OSError: the folder took the probe, then refused a file (a full disk)
            error = str(e.code) if isinstance(e, SystemExit) else f"cannot write in --out_dir={out_dir} " \
                                                                  f"({common.why(e)})"
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
              and k not in ("resume", "overwrite") and state["config"][k] != config[k]):
        common.print0(f"resume: --{k} changes from {state['config'][k]} to {config[k]}")
    world = dist.get_world_size() if dist.is_initialized() else 1
    if state and state["world"] != world:
        per_step = lambda w, c: w * c.get("prompts_per_rank", 1) * c.get("group_size", 1)  # noqa: E731
        common.print0(f"warning: resuming on {world} rank(s), the checkpoint was written by {state['world']}: "
                      f"{per_step(world, config)} videos per step instead of "
                      f"{per_step(state['world'], state['config'])}, and each step draws other prompts and noise than "
                      f"the run would have drawn on {state['world']}")
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
    Non-finite weights or EMA stop the run instead: a NaN checkpoint must never become `latest`. A write that fails
    on any rank (a full disk) removes ckpt_N.tmp and stops every rank with one line naming the last intact
    checkpoint; every collective runs outside the writes, so a rank that fails never leaves the others waiting."""
    if not all_finite(list(trainable.values()) + list(ema.values()), device):
        common.stop(f"the trained weights or their EMA hold non-finite values at step {step}; not saved. "
                    f"The last checkpoint in {out_dir} is intact: lower --lr and --resume")
    master = _rank() == 0
    final = os.path.join(out_dir, folder_name(step))
    tmp = final + ".tmp"
    weights = {n: prm.detach() for n, prm in trainable.items()}
    optim_state = get_optimizer_state_dict(policy, optimizer)
    # the EMA gathered here, outside the writes: FSDP needs every rank for it
    full_ema = {n: _full(t).cpu() for n, t in ema.items()} if lora is not None else None

    def stop_if_failed(error):
        """Collective: if any rank failed, remove the unfinished folder and stop every rank."""
        if error := common.first_error(error):
            if master:
                remove_path(tmp)
            common.stop(f"cannot write checkpoint {folder_name(step)} ({error}); {tmp} was removed and "
                        f"{last_words(out_dir)}")

    error = ""
    try:
        if master:
            remove_path(tmp)
            os.makedirs(tmp)
    except OSError as e:
        error = common.why(e)
    stop_if_failed(error)
    try:
        if fsdp:  # every rank writes its shards (dcp.save is collective and raises on every rank if one fails)
            import torch.distributed.checkpoint as dcp
            dcp.save({"model": weights, "ema": ema, "optim": optim_state}, checkpoint_id=os.path.join(tmp, "dcp"))
        elif master:
            save_file({n: w.contiguous() for n, w in weights.items()}, os.path.join(tmp, "trainable.safetensors"))
            save_file(ema, os.path.join(tmp, "ema.safetensors"))
            torch.save(optim_state, os.path.join(tmp, "optimizer.pt"))
        torch.save({"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda"
                    else []}, os.path.join(tmp, f"rng_rank{_rank()}.pt"))
        if lora is not None:
            export_lora(os.path.join(tmp, "lora"), policy, full_ema, lora)
        if master:
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump(dict(step=step, **state), f, indent=1)
    except Exception as e:  # OSError, safetensors' SafetensorError, torch's RuntimeError: whatever the disk did
        error = common.why(e)
    stop_if_failed(error)
    try:
        if master:
            remove_path(final)
            os.replace(tmp, final)
            write_latest(out_dir, final)
            rotate(out_dir, keep_last, final)
    except OSError as e:
        error = common.why(e)
    stop_if_failed(error)


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
        common.write_atomic(os.path.join(folder, "sampling.json"), json.dumps(sampling, indent=1))


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
    """Keep metrics.jsonl's lines up to `step`: a resumed run redoes the later steps and logs them again. A line that
    is not a record (a note written by hand) stays; a last line cut short (a crash or a full disk in mid-append)
    goes, or the next record would be glued to it. The file is replaced atomically."""
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        lines = common.jsonl_lines(metrics)
        with open(metrics, "rb") as f:
            cut = not f.read().endswith(b"\n")
        if cut and lines and lines[-1][1] is None:
            lines.pop()
        keep = [text for text, r in lines if r is None or not isinstance(r.get("step"), int) or r["step"] <= step]
        common.write_atomic(metrics, "".join(text + "\n" for text in keep))


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
