#!/usr/bin/env bash
# The first GPU run, in one command: tools/gpu_check.sh OUTDIR
#
# On a machine with one CUDA GPU and the packages of requirements.txt installed (torch 2.11 or newer), in under
# 8 minutes: the CUDA-only tests, gsplat against the torch rasterizer, one bf16 RL step of the small configuration
# (Wan2.1-1.3B architecture, random weights, 832x480x81, a group of 2, every reward model in-process), bench.py's
# per-stage table with peak memory, and the full camera-noise warp. Everything lands in OUTDIR as text and JSON;
# OUTDIR/summary.json lists each part's exit code and seconds. Nothing is downloaded: every model has random weights.
# Without a GPU it is a dry run of the same commands on the real shapes cut to one block, at 17x128x224.
set -uo pipefail
OUT=${1:?usage: tools/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    MODE=gpu
    REAL=(--size=small --random_weights --dtype=bf16)
    BENCH=(--size=small --random_weights --repeats=1)
else
    MODE=cpu-dry-run
    REAL=(--size=small --random_weights --dtype=bf16 --depth=1 --frames=9 --height=64 --width=112 --lift_res=84
          --steps=4 --text_len=64)
    BENCH=(--stages=passes)
fi
printf '%s\n' "Camera orbit left. A stone lighthouse on a cliff above a dark sea." \
    "Camera push in. A narrow alley of red lanterns at dusk." > "$OUT/prompts.txt"  # two prompts: encoded in seconds
echo "gpu_check: $MODE, writing to $OUT"
SUMMARY="$OUT/summary.tsv"
: > "$SUMMARY"

part() {  # part NAME SECONDS CMD...: run one part under a time limit, keep its output, record rc and seconds
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" "$@" > "$OUT/$name.txt" 2>&1
    local rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$SUMMARY"
    tail -n 3 "$OUT/$name.txt"
    echo "   -> rc $rc in $((SECONDS - t0)) s"
}

part environment 60 python -c "
import json, platform, torch
import common, diffusers, transformers
info = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
            diffusers=diffusers.__version__, transformers=transformers.__version__,
            device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor(),
            gpu_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None)
print(json.dumps(info, indent=1)); json.dump(info, open('$OUT/environment.json', 'w'), indent=1)"
part cuda_tests 150 python -m pytest -q -rs tests/test_reward.py::test_gsplat_matches_torch_rasterizer \
    tests/test_noise_warp.py::test_cuda_runs tests/test_real_config.py::test_renderer_check_passes_on_cpu
part renderer 150 python -c "
import common, torch, reward
device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
print(reward.check_renderer(device))"
part rl_step 300 python train.py "${REAL[@]}" --group_size=2 --prompts_per_rank=1 --max_steps=1 --eval_every=0 \
    --dynamic_every=0 --train_prompts="$OUT/prompts.txt" --save_every=1 --out_dir="$OUT/run" --overwrite
part bench 240 python bench.py "${BENCH[@]}" --json "$OUT/bench.json"
part warp_full 60 python bench.py --stages=warp_full --json "$OUT/warp.json"

python - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
parts = [dict(zip(("part", "rc", "seconds"), line.split("\t"))) for line in open(os.path.join(out, "summary.tsv"))]
for p in parts:
    p["rc"], p["seconds"] = int(p["rc"]), int(p["seconds"])
metrics = os.path.join(out, "run", "metrics.jsonl")
step = json.loads(open(metrics).readline()) if os.path.exists(metrics) else None
json.dump(dict(parts=parts, rl_step=step), open(os.path.join(out, "summary.json"), "w"), indent=1)
print(json.dumps(parts))
PY
