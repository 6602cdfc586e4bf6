"""
The few things every script needs: the CPU torchvision fix, one-line errors for flags and inputs, torchrun set-up.
Imports no project file (torch only); every other script imports it first.

Import this module before transformers, diffusers or lpips (each script does so on its first lines).
"""
import argparse
import contextlib
import difflib
import importlib.util
import json
import math
import os
import sys
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
    lines = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
    if not lines:
        fail(f"{flag}={path} has no lines; write one prompt per line")
    return lines


def _probe(folder):
    """None if a file can really be written in `folder` (created if needed), else why not (os.access says yes to
    root everywhere, /proc included, so only a real write tells)."""
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        return "create", e.strerror or str(e)
    probe = os.path.join(folder, f".write_test_{uuid.uuid4().hex}")
    try:
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        return "write", e.strerror or str(e)
    return None


def check_writable_dir(folder, flag):
    """Create `folder` if needed and prove it takes a file."""
    folder = folder or "."
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


def setup_dist():
    """torchrun's environment -> (rank, local_rank, world_size, device). A plain `python x.py` is rank 0 of 1.

    nccl on CUDA, gloo on CPU. On CPU each rank gets an even share of the cores (two ranks on two cores would
    otherwise each spawn two threads and fight).
    """
    if "RANK" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return 0, 0, 1, device
    rank, local_rank, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        torch.distributed.init_process_group("gloo")
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


def stop_together(message):
    """Collective: if any rank has an error message, every rank stops with the first one (none is left waiting in a
    collective). Returns when no rank has one."""
    messages = [message]
    if torch.distributed.is_initialized():
        messages = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(messages, message)
    for m in messages:
        if m:
            raise SystemExit(m if m.startswith("error") else "error: " + m)


def is_main():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)
