"""
The few things every script needs: the CPU torchvision fix, torchrun set-up, and rank-0 printing.

Import this module before transformers, diffusers or lpips (each script does so on its first lines).
"""
import contextlib
import importlib.util
import os
import sys

import torch


def fix_torchvision():
    """Make `import torchvision` work where its compiled ops cannot load.

    On a CPU box, pip's torchvision 0.28.0 is a CUDA build whose _C.so needs libtorch_cuda; torchvision then
    fake-registers `torchvision::nms` on an operator that does not exist and the import raises, which breaks
    transformers, diffusers and lpips with it (shared/docs/environment.md, Q1). We define the two missing op
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


def cleanup_dist():
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def is_main():
    return not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0


def print0(*args, **kwargs):
    if is_main():
        print(*args, **kwargs, flush=True)
