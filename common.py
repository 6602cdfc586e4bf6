"""
The few things every script needs: the CPU torchvision fix, one-line errors for flags and inputs, files written whole
and never through a link (and a log reader that survives a cut line), SIGTERM/SIGINT, torchrun set-up.
Imports no project file (torch only); every other script imports it first.

Import this module before transformers, diffusers or lpips (each script does so on its first lines).
"""
import argparse
import contextlib
import datetime
import difflib
import importlib.util
import json
import math
import os
import signal
import sys
import time
import uuid

import torch


def fix_torchvision():
    """Make `import torchvision` work where its compiled ops cannot load.

    On a CPU box, pip's torchvision 0.28.0 is a CUDA build whose _C.so needs libtorch_cuda; torchvision then
    fake-registers `torchvision::nms` on an operator that does not exist and the import raises, which breaks
    transformers, diffusers and lpips with it (torchvision/_meta_registrations.py). We define the two missing op
    schemas so the pure-python parts import. Where _C.so loads (a GPU box) this does nothing.
    """
    if "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    pkg = list(spec.submodule_search_locations)[0]
    libs = [f for f in os.listdir(pkg) if f.startswith("_C.") and f.endswith((".so", ".pyd"))]
    if libs:
        try:
            torch.ops.load_library(os.path.join(pkg, libs[0]))
            return  # the real ops are there
        except OSError:
            pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    fix_torchvision.lib = lib  # the Library must stay alive for the schemas to stay defined


fix_torchvision()


# -----------------------------------------------------------------------------
# User mistakes: one line on stderr, exit code 1, before any model loads

def fail(message):
    """Stop with `error: message` (one line, no traceback). Every user mistake ends here."""
    raise SystemExit(f"error: {message}")


def did_you_mean(value, valid):
    """"; did you mean a, b?" with the valid names closest to `value`, or "" when none is close."""
    close = difflib.get_close_matches(value, valid, n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""


class HelpFormatter(argparse.HelpFormatter):
    """--help with each flag's default once, as this command line will use it: parse_flags sets the --size preset's
    defaults before argparse prints the help. A flag whose default is None (it depends on something else) and a
    switch (store_true) show none; the first says in its own help what it does when unset."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings \
                or isinstance(action, argparse._StoreConstAction):
            return text
        return text + (' (default: "")' if action.default == "" else " (default: %(default)s)")


def given_size(parser, argv):
    """The --size value on the command line, or None; read before the full parse, so that the preset's defaults are
    in place when argparse prints --help."""
    size = next(a for a in parser._actions if a.dest == "size")
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=parser.allow_abbrev)
    pre.error = lambda message: fail(message)
    pre.add_argument("--size", choices=size.choices, default=None)
    return pre.parse_known_args(argv)[0].size


def parse_flags(parser, argv, presets=None):
    """Parse argv with one-line errors: an unknown flag names the closest valid ones, a bad value says which flag.
    presets: {size: {flag: default}} keyed by --size; the preset of the --size given (else of the parser's default,
    else the first) becomes the defaults, and explicit flags win. The defaults are set before parsing, so --help
    prints the ones this command line gets."""
    parser.error = lambda message: fail(message)  # argparse would print the whole usage block first
    if presets is not None:
        size = given_size(parser, argv) or parser.get_default("size") or next(iter(presets))
        dests = {action.dest for action in parser._actions}
        parser.set_defaults(**{k: v for k, v in presets[size].items() if k in dests})
    args, unknown = parser.parse_known_args(argv)
    for flag in unknown:
        key = flag.split("=")[0]
        names = [name for action in parser._actions for name in action.option_strings]
        fail(f"unknown argument {flag}" + did_you_mean(key, names))
    return args


def config_argv(parser, values, source, ignore=()):
    """{flag: value} (a JSON config, a checkpoint's saved config) -> the command-line words that set them, e.g.
    ["--lr=0.0001", "--fsdp"], so that argparse checks them as it checks typed flags and flags typed after them
    win. None means unset (the default applies); a switch is given when true (a --x/--no-x one either way); keys in
    `ignore` are skipped. A key that is no flag, or a value the flag refuses, stops with one line naming `source`."""
    if not isinstance(values, dict):
        fail(f"{source} must hold a JSON object of flag values, e.g. {{\"lr\": 0.0001}}")
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    words = []
    for key, value in values.items():
        if key in ignore:
            continue
        if key not in actions:
            fail(f"{source}: {key!r} is not a flag" + did_you_mean(key, list(actions)))
        action = actions[key]
        switch = action.nargs == 0
        if switch and not isinstance(value, bool) and value is not None or not switch and isinstance(value, bool):
            fail(f"{source}: {key}={json.dumps(value)} is not a valid value for --{key}")
        if value is None or (switch and not value and isinstance(action, argparse._StoreConstAction)):
            continue
        words.append(f"--{key}" if switch and value else f"--no-{key}" if switch else f"--{key}={value}")
    error = parser.error
    parser.error = lambda message: fail(f"{source}: {message}")  # the file's words alone, so errors name the file
    try:
        parser.parse_known_args(words)
    finally:
        parser.error = error
    return words


def check_numbers(args, positive=(), nonnegative=(), finite=()):
    """Every named flag must be a finite number (> 0, >= 0, or any); None (unset) passes."""
    for names, test, what in ((positive, lambda v: v > 0, "a positive number"),
                              (nonnegative, lambda v: v >= 0, "a number >= 0"), (finite, lambda v: True, "a number")):
        for name in names:
            v = getattr(args, name)
            if v is not None and not (math.isfinite(v) and test(v)):
                fail(f"--{name}={v} must be {what}")


def check_choices(values, valid, flag, what="one of"):
    """Every value must be in `valid`; the first that is not stops with the closest valid names and the list."""
    for value in values:
        if value not in valid:
            fail(f"{flag}: unknown value {value!r}" + did_you_mean(value, valid)
                 + f" (valid: {what} {', '.join(valid)})")


def check_text(text, flag):
    """A command-line string must be valid UTF-8 (Python keeps undecodable argv bytes as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        fail(f"{flag} holds bytes that are not UTF-8; re-type it or save it as UTF-8")
    return text


def read_lines(path, flag):
    """Non-blank stripped lines of a UTF-8 text file; a missing, empty or undecodable file stops with its name
    and the line number of the first bad byte."""
    if os.path.isdir(path):
        fail(f"{flag}={path} is a folder; pass a text file with one prompt per line")
    if not os.path.isfile(path):
        fail(f"{flag}={path} does not exist; pass a text file with one prompt per line")
    with open(path, "rb") as f:
        data = f.read()
    for number, line in enumerate(data.split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            fail(f"{flag}={path} line {number} is not UTF-8 (byte {line[e.start]:#04x} at column {e.start + 1}); "
                 "save the file as UTF-8")
    # Only "\n" ends a line: str.splitlines would also split at a form feed, U+2028 and the like inside a prompt,
    # shifting every later prompt's index and seed. A byte-order mark is not text ("utf-8-sig" drops it).
    lines = [line.strip() for line in data.decode("utf-8-sig").split("\n") if line.strip()]
    if not lines:
        fail(f"{flag}={path} has no lines; write one prompt per line")
    return lines


def _probe(folder):
    """None if a file can really be written in `folder` (created if needed), else why not (os.access says yes to
    root everywhere, /proc included, so only a real write tells)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        return "create", "a file of that name exists"
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        return "create", e.strerror or str(e)
    probe = os.path.join(folder, f".write_test_{uuid.uuid4().hex}")
    try:
        with open(probe, "x") as f:
            f.write("ok")
    except OSError as e:
        return "write", e.strerror or str(e)
    finally:  # also when the write itself failed (a full disk): the probe must not stay behind
        with contextlib.suppress(OSError):
            os.remove(probe)
    return None


def check_writable_dir(folder, flag):
    """Create `folder` if needed and prove it takes a file. An empty name is refused, not read as "here"."""
    if not folder:
        fail(f"{flag} is empty; name a folder (e.g. {flag}=out)")
    problem = _probe(folder)
    if problem and problem[0] == "create":
        fail(f"cannot create the folder {flag}={folder} ({problem[1]}); pick a writable place")
    if problem:
        fail(f"cannot write to {flag}={folder} ({problem[1]}); pick a writable place")
    return folder


def check_writable_file(path, flag, suffixes=None):
    """An output file: the right extension, not an existing folder, its folder proven writable, and an existing
    file at `path` openable for writing (opened to append, so its content stays)."""
    if suffixes and not path.lower().endswith(tuple(suffixes)):
        fail(f"{flag}={path} must end in {' or '.join(suffixes)}")
    if os.path.isdir(path):
        fail(f"{flag}={path} is an existing folder; name a file")
    folder = os.path.dirname(path) or "."
    problem = _probe(folder)
    if problem is None and os.path.exists(path):
        try:
            open(path, "ab").close()
        except OSError as e:
            problem = "write", e.strerror or str(e)
    if problem:
        fail(f"cannot {problem[0]} {'the folder of ' if problem[0] == 'create' else ''}{flag}={path} "
             f"({problem[1]}); pick a writable place")
    return path


# -----------------------------------------------------------------------------
# Files: never written through a link, never left half-written

def write_atomic(path, data):
    """Replace the file `path` with `data` (str or bytes) in one step: written to a fresh hidden name beside it
    (created exclusively, so a link planted there is never followed), flushed to disk, then renamed over `path` (a
    rename replaces a link at `path` itself, never its target). If anything fails (a full disk), the temporary file
    is removed, `path` is as it was, and the OSError propagates."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def append_line(path, line):
    """Append `line` and a newline to a log file (metrics.jsonl) and flush it to disk. A link at `path` is refused
    (O_NOFOLLOW: ELOOP), not followed. A write that fails part-way (a full disk) is cut back off before the OSError
    propagates, so the file never ends in half a line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        size, data = os.fstat(fd).st_size, (line + "\n").encode("utf-8")
        try:
            done = 0
            while done < len(data):
                done += os.write(fd, data[done:])
            os.fsync(fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


def jsonl_lines(path):
    """[(text, record)] for each non-blank line of a JSON-lines file (metrics.jsonl); record is the line's JSON
    object, or None where the line is not one (cut short by a crash or a full disk, a note added by hand). Those
    are named in one warning line on stderr, never a crash."""
    with open(path, encoding="utf-8", errors="replace") as f:
        numbered = [(n, line.rstrip("\n")) for n, line in enumerate(f, 1) if line.strip()]
    out, bad = [], []
    for number, text in numbered:
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            record = None
            bad.append((number, text))
        out.append((text, record))
    if bad:
        number, text = bad[0]
        print(f"warning: {path}: {len(bad)} line(s) are not JSON records and are skipped (line {number}: "
              f"{text[:40]!r}{'...' if len(text) > 40 else ''})", file=sys.stderr, flush=True)
    return out


def why(e):
    """An exception as a short reason for an error line: the OS's words for an OSError, else its type and text."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


# -----------------------------------------------------------------------------
# Signals: SIGTERM (how schedulers preempt) and SIGINT (Ctrl-C)

_signal = {"name": "", "time": 0.0}


def catch_signals(last_words):
    """From now on SIGTERM and SIGINT only set a flag, which the training loop reads at its safe points
    (`signal_received`): it then saves what it can and stops with one line. A second signal, a second or more
    after the first, prints `last_words()` and exits at once with 128 + its number (a repeat within the second is
    the same stop: a terminal's Ctrl-C reaches torchrun and every rank, and torchrun passes it on to the ranks)."""
    def handler(signum, frame):
        name, now = signal.Signals(signum).name, time.monotonic()
        if not _signal["name"]:
            _signal.update(name=name, time=now)
            if is_main():
                os.write(2, f"{name} received: the run saves and stops at its next safe point (a second signal "
                               "stops it at once)\n".encode())
        elif now - _signal["time"] > 1.0:
            if is_main():
                os.write(2, f"error: a second signal ({name}): stopped at once; {last_words()}\n".encode())
            os._exit(128 + signum)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, handler)


def signal_received():
    """Collective: the name of the signal any rank has received ("" when none), the same on every rank."""
    return first_error(_signal["name"])


def exit_on_signal(what):
    """For the scripts that keep nothing across a stop (sample.py, evaluate.py): SIGTERM and SIGINT end the process
    with `error: <signal>: what`, printed once, instead of a KeyboardInterrupt traceback or a silent death."""
    def handler(signum, frame):
        stop(f"{signal.Signals(signum).name}: {what}")
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, handler)


# -----------------------------------------------------------------------------
# Devices, dtypes, processes

@contextlib.contextmanager
def build_in(device, dtype):
    """Create modules directly on `device` in `dtype`: a multi-billion-parameter model initialised in fp32 on the
    host first would take minutes and twice the memory."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(default)


def add_dist_flags(parser):
    """The two process-wide flags every multi-GPU script takes (train.py, evaluate.py); common.setup_dist uses them.
    They change how a run computes, not what it optimises: a resumed run takes them from its checkpoint like every
    setting, and may change them (--no-deterministic turns a saved --deterministic off)."""
    parser.add_argument("--dist_timeout", type=float, default=60,
                        help="minutes a rank waits in a collective before the run stops: on a first run other ranks "
                             "wait while gsplat builds and the weights download (NCCL's own watchdog: 10)")
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False,
                        help="CUDA: deterministic kernels only (torch.use_deterministic_algorithms, cuBLAS workspace "
                             ":4096:8), slower; the CPU is deterministic already (docs/DESIGN.md, Determinism)")


def setup_dist(timeout_minutes=60, deterministic=False):
    """torchrun's environment -> (rank, local_rank, world_size, device). A plain `python x.py` is rank 0 of 1.

    nccl on CUDA, gloo on CPU, both with `timeout_minutes` for every collective (NCCL's default watchdog, 10
    minutes, would kill ranks that wait at a barrier while one builds gsplat or downloads weights). On CPU each rank
    gets an even share of the cores (two ranks on two cores would otherwise each spawn two threads and fight).
    deterministic: torch picks deterministic kernels (flash-attention's deterministic backward, index_add_ without
    float atomics) and raises on an op that has none; cuBLAS needs its workspace setting before its first call.
    """
    if not (math.isfinite(timeout_minutes) and timeout_minutes > 0):
        fail(f"--dist_timeout={timeout_minutes} must be a positive number of minutes")
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    if "RANK" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return 0, 0, 1, device
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", device_id=device, timeout=timeout)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        torch.distributed.init_process_group("gloo", timeout=timeout)
    return rank, local_rank, world, device


def shard_fsdp(model, blocks):
    """FSDP2: shard each block, then the rest with the root; gradients reduced in fp32. No parameter casting: every
    weight is all-gathered in the dtype it is stored in (bf16, and the modules Wan keeps in fp32), so the sharded
    forward equals the unsharded one and the timestep reaches the time embedder unrounded. (A policy with
    param_dtype=bf16 casts the root's floating inputs, the timestep among them, and Wan's fp32 modules to bf16.)"""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mp = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    for block in blocks:
        fully_shard(block, mp_policy=mp)
    return fully_shard(model, mp_policy=mp)


def cleanup_dist():
    """Tear the process group down together: a rank that destroys it while another still has gloo work in flight
    can abort the other (terminate called without an active exception)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def barrier():
    """All ranks wait here (a no-op in a single process)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def first_error(message):
    """Collective: the first non-empty `message` over the ranks (rank order), or "" when no rank has one."""
    messages = [message]
    if torch.distributed.is_initialized():
        messages = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(messages, message)
    return next((m for m in messages if m), "")


def stop(message):
    """Stop this rank with `error: message`. Rank 0 prints it; the other ranks exit with code 1 in silence (under
    torchrun every rank's copy would reach the same terminal, glued together)."""
    raise SystemExit((message if message.startswith("error") else "error: " + message) if is_main() else 1)


def stop_together(message):
    """Collective: if any rank has an error message, every rank stops with the first one (none is left waiting in a
    collective), printed once. Returns when no rank has one."""
    if first := first_error(message):
        stop(first)


@contextlib.contextmanager
def swapped(params, values):
    """Copy `values` ({name: tensor}) into `params` ({name: parameter}) for the block (train.py: the EMA weights for
    eval and export), and the originals back after, even on an error."""
    backup = {n: p.detach().clone() for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(values[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(backup[n])


def all_mean(values, device):
    """Mean over ranks of a dict of floats (every rank holds the same keys); NaN where any rank has NaN. Collective."""
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return dict(zip(values, t.tolist()))


def is_main():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)
