#!/usr/bin/env bash
# The first GPU run, in parts that each fit one 10-minute command:   tools/gpu_check.sh OUTDIR [PART...]
#
# On a machine with one CUDA GPU, nvcc matching torch's CUDA, and the packages of requirements.txt (torch 2.11 or
# newer). Every model has random weights: nothing is downloaded. The parts named run in this order (all of them
# when none is named); a part over its limit is stopped and the next one runs.
#
#   part          limit  what
#   environment     60s  versions, the GPU, nvcc
#   build          none  gsplat's CUDA kernels (~30 files, torch's JIT) with every core, for this GPU's architecture
#                        only (TORCH_CUDA_ARCH_LIST); never under a limit of its own: gsplat deletes a build folder
#                        that holds no finished library, so a build stopped half-way starts over. Seconds once built.
#   cuda_tests     120s  the CUDA-only tests: gsplat against the torch rasterizer on degree-2 SH, the warp on CUDA
#   renderer        60s  splat.check_renderer, every run's start-up check (> 40 dB against the torch path)
#   rl_step        270s  one RL step of train.py: Wan2.1-1.3B shapes at 832x480x81 in bf16, a group of 2, every
#                        reward model, a checkpoint
#   bench          150s  bench.py: encode, CFG step, VAE decode, warp, rollout (a group of 2, scaled to 8), train
#                        micro-step with gradient checkpointing; seconds, TFLOP/s, peak GiB
#   bench_reward    90s  bench.py: reward.score of one 81-frame video (DA3-giant, Qwen3-VL-4B, HPSv3, LPIPS, gsplat)
#   warp_full       60s  the full camera-noise warp, 81 frames at 832x480
#
# Two calls of at most 10 minutes each, the first on a machine just started (the build is most of it):
#   tools/gpu_check.sh gpu_check_out environment build cuda_tests renderer warp_full    # ~5 min
#   tools/gpu_check.sh gpu_check_out build rl_step bench bench_reward                  # ~7 min
# (the second call's build only loads the first call's, in seconds, and keeps its compile time in build.json; on a
# fresh machine it compiles again.)
#
# OUTDIR holds at most 4 files, rewritten before and after every part: summary.json (each part's exit code, seconds
# and key figures; a part with no exit recorded was killed with its call), bench.json (every bench row),
# logs.tar.gz (every part's log and JSON, the RL step's metrics.jsonl) and current_part.log (the running part's
# output, so a call killed at its limit still returns it). Logs and the RL step's run folder (its checkpoint is
# ~0.5 GB) stay in OUTDIR.work/ beside it, so a later call adds to the same summary.
# Without a GPU it is a dry run of the same commands on the real shapes cut to one block, at 9x64x112, with 5x the
# limits.
set -uo pipefail
OUT=${1:?usage: tools/gpu_check.sh OUTDIR [PART...]}
shift
ALL=(environment build cuda_tests renderer rl_step bench bench_reward warp_full)
for p in "$@"; do
    [[ " ${ALL[*]} " == *" $p "* ]] || { echo "error: unknown part '$p' (valid: ${ALL[*]})" >&2; exit 1; }
done
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
WORK="$OUT.work"
mkdir -p "$WORK/logs" || exit 1
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    MODE=gpu
    export MAX_JOBS=$(nproc)  # gsplat's JIT build: ninja with every core (gsplat's own default is 10)
    export TORCH_CUDA_ARCH_LIST=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
    CUT=()  # the real shapes
    STEPS=()
    SCALE=1
else
    MODE=cpu-dry-run
    CUT=(--depth=1 --frames=9 --height=64 --width=112 --lift_res=84 --text_len=64)
    STEPS=(--rollout_steps=4)
    SCALE=5  # a dry run proves the commands, not their time: a shared 2-core CPU is far slower than the GPU
fi
REAL=(--size=small --random_weights --dtype=bf16 "${CUT[@]}")
printf '%s\n' "Camera orbit left. A stone lighthouse on a cliff above a dark sea." \
    "Camera push in. A narrow alley of red lanterns at dusk." > "$WORK/prompts.txt"  # two prompts: encoded in seconds
echo "gpu_check: $MODE, writing to $OUT (work folder $WORK)"
summarize() { python3 tools/gpu_check_summary.py "$WORK" "$OUT" "$MODE" < /dev/null; }
if [[ $# -gt 0 ]]; then SELECTED=("$@"); else SELECTED=("${ALL[@]}"); fi
selected() { [[ " ${SELECTED[*]} " == *" $1 "* ]]; }
FAILED=0

part() {  # part NAME LIMIT CMD...: run one part (LIMIT 0: no limit), its output in OUT/current_part.log, then logs/
    local name=$1 limit=$(($2 * SCALE)); shift 2
    selected "$name" || return 0
    local t0=$SECONDS rc
    printf 'start\t%s\t%s\n' "$name" "$limit" >> "$WORK/parts.tsv"
    summarize
    echo "== $name (limit ${limit}s; 0: none): $*" | tee "$OUT/current_part.log"
    if [[ $limit -gt 0 ]]; then
        timeout "$limit" "$@" >> "$OUT/current_part.log" 2>&1
    else
        "$@" >> "$OUT/current_part.log" 2>&1
    fi
    rc=$?
    mv "$OUT/current_part.log" "$WORK/logs/$name.txt"
    printf 'end\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$WORK/parts.tsv"
    summarize
    tail -n 3 "$WORK/logs/$name.txt"
    echo "   -> rc $rc in $((SECONDS - t0)) s"
    [[ $rc -eq 0 ]] || FAILED=1
}

part environment 60 python3 - "$WORK" <<'PY'
import json, os, platform, shutil, subprocess, sys, torch
import common, diffusers, gsplat, peft, transformers
cuda = torch.cuda.is_available()
nvcc = shutil.which("nvcc")
info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
            diffusers=diffusers.__version__, transformers=transformers.__version__, peft=peft.__version__,
            gsplat=gsplat.__version__, cpus=os.cpu_count(),
            device=torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine(),
            capability=".".join(map(str, torch.cuda.get_device_capability())) if cuda else None,
            gpu_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
            nvcc=subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
            if nvcc else None,
            TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST"), MAX_JOBS=os.environ.get("MAX_JOBS"),
            TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR"))
print(json.dumps(info, indent=1))
json.dump(info, open(os.path.join(sys.argv[1], "environment.json"), "w"), indent=1)
PY
part build 0 python3 - "$WORK" <<'PY'
import json, os, sys, time, torch
path = os.path.join(sys.argv[1], "build.json")
info = dict(arch=os.environ.get("TORCH_CUDA_ARCH_LIST"), jobs=os.environ.get("MAX_JOBS"))
if torch.cuda.is_available():
    from torch.utils.cpp_extension import _get_build_directory  # where gsplat's JIT puts its build
    folder = _get_build_directory("gsplat_cuda", verbose=False)
    cached = os.path.exists(os.path.join(folder, "gsplat_cuda.so"))
    t = time.time()
    from gsplat.cuda import _backend  # compiles on first import (or loads the finished build)
    info.update(folder=folder, cached=cached, seconds=time.time() - t, built=_backend._C is not None)
    earlier = json.load(open(path)) if cached and os.path.exists(path) else {}  # the call that compiled it
    info["compile_seconds"] = earlier.get("compile_seconds") if cached else info["seconds"]
else:  # a CPU has nothing to compile (importing gsplat's backend would start a build that cannot finish)
    import splat  # the CPU renderer: our own torch code, nothing to build
    info.update(seconds=0.0, built=False, note="no CUDA device: nothing to build (dry run)")
print(json.dumps(info, indent=1))
json.dump(info, open(path, "w"), indent=1)
sys.exit(0 if info["built"] or not torch.cuda.is_available() else "error: gsplat found no CUDA toolkit (nvcc)")
PY
part cuda_tests 120 python3 -m pytest -q -rs -p no:cacheprovider \
    tests/test_splat.py::test_gsplat_matches_torch_rasterizer \
    tests/test_splat.py::test_renderer_check_scene_has_view_dependent_colour \
    tests/test_splat.py::test_sh_colour_is_seen_from_each_camera_centre \
    tests/test_noise_warp.py::test_cuda_runs tests/test_real_config.py::test_renderer_check_passes_on_cpu
part renderer 60 python3 -c "
import common, torch, splat
print(splat.check_renderer(torch.device('cuda' if torch.cuda.is_available() else 'cpu')))"
selected rl_step && rm -rf "$WORK/run"  # a fresh run folder each time (a checkpoint is ~0.5 GB)
part rl_step 270 python3 train.py "${REAL[@]}" "${STEPS[@]}" --group_size=2 --prompts_per_rank=1 --max_steps=1 \
    --eval_every=0 --dynamic_every=0 --train_prompts="$WORK/prompts.txt" --save_every=1 --out_dir="$WORK/run"
part bench 150 python3 bench.py "${REAL[@]}" --stages=passes,encode,step,decode,warp,rollout,train --repeats=1 \
    --rollout_group=2 --json "$WORK/bench.json"
part bench_reward 90 python3 bench.py "${REAL[@]}" --stages=reward --repeats=1 --json "$WORK/bench_reward.json"
part warp_full 60 python3 bench.py --stages=warp_full --json "$WORK/warp.json"

summarize
exit $FAILED
