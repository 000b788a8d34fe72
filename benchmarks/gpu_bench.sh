#!/usr/bin/env bash
# One prepared GPU run of the stage-2 step benchmark (issue 6): the sd15 preset (SD1.5 architecture, random
# weights) at 512 px, bf16, batch 8, every mode, 3 warm-up + 10 timed iterations; then the same with gradient
# checkpointing, then the released-preset probe (attention features, 64 px head); then, if transformers is
# there, the sampling benchmark. Each run has its own time limit and a failure (e.g. out of memory) does not
# stop the next one; a mode that runs out of memory is dropped and reported, the others go on. At most
# 7 minutes (the time limits add up to 420 s), about 5 minutes on one H100. The operator profile of the
# alignment step (profile_step.py) runs after the first benchmark.
#
# Usage (from the repository root, on the GPU machine; diffusers and this package installed with
# `pip install --target /tmp/site .whl/*.whl` beforehand):
#     OUT=/some/dir bash benchmarks/gpu_bench.sh
# Results: $OUT/gpu_*.json, $OUT/gpu_*.md (the markdown tables), $OUT/gpu_*.log, $OUT/gpu_summary.md.
# RUN="sdxl" (or "sd15 sdxl"; default "sd15") runs the SDXL part instead (or as well): the sdxl preset (SDXL
# architecture, random weights) at 1024 px, bf16, batch 2, ControlNet, ControlNet++ (masked) and InnerControl, with
# and without gradient checkpointing (at most 4 minutes).
set -u
OUT="${OUT:-./gpu_bench_out}"
mkdir -p "$OUT"
if [ -d /tmp/site ]; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY="${PYTHON:-$(command -v python3 || command -v python)}"
cd "$(dirname "$0")/.."

START=$(date +%s)
{
    echo "# GPU benchmark $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    "$PY" - <<'EOF'
import torch
print("gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")
print("torch:", torch.__version__, "cuda:", torch.version.cuda)
try:
    import diffusers
    print("diffusers:", diffusers.__version__)
except ImportError as e:
    print("diffusers missing:", e)
try:
    import diffusers_innercontrol.training
    print("diffusers_innercontrol:", diffusers_innercontrol.__file__)
except ImportError as e:  # the package imports transformers (its pipeline) at the top level
    print("CANNOT IMPORT diffusers_innercontrol:", repr(e))
EOF
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
} 2>&1 | tee "$OUT/gpu_env.txt"

COMMON=(--preset sd15 --resolution 512 --batch_size 8 --precision bf16 --device cuda --warmup 3 --iters 10)

run() {  # name, time limit in seconds, arguments...
    local name="$1" limit="$2"
    shift 2
    echo "== $name ($(( $(date +%s) - START )) s elapsed)"
    timeout "$limit" "$PY" benchmarks/bench_train_step.py "${COMMON[@]}" "$@" \
        --json "$OUT/gpu_$name.json" --markdown "$OUT/gpu_$name.md" > "$OUT/gpu_$name.log" 2>&1
    local rc=$?
    grep -v -E "^\s+(warm-up|iter)" "$OUT/gpu_$name.log" | tail -n 25
    echo "== $name: exit $rc"
}

elapsed() { echo $(( $(date +%s) - START )); }

RUN="${RUN:-sd15}"
if [[ " $RUN " == *" sd15 "* ]]; then
run sd15_bf16_b8 120
# where the alignment's extra time goes on the GPU: CUDA kernel time per operator, alignment only minus ControlNet
if [ "$(elapsed)" -lt 150 ]; then
    echo "== profile ($(elapsed) s elapsed)"
    timeout 60 "$PY" benchmarks/profile_step.py --preset sd15 --resolution 512 --batch_size 8 --precision bf16 \
        --device cuda --warmup 1 --iters 2 --markdown "$OUT/gpu_profile_sd15.md" --json "$OUT/gpu_profile_sd15.json" \
        > "$OUT/gpu_profile_sd15.log" 2>&1
    echo "== profile: exit $?"
fi
run sd15_bf16_b8_ckpt 110 --gradient_checkpointing
# the single backward through the whole step (before 2026-12-04): what the early branch backward saves on the GPU
if [ "$(elapsed)" -lt 200 ]; then
    run sd15_bf16_b8_combined 80 --combined_backward
fi
# the released launchers' probe (attention features, 64 px head): the cheap probe configuration
if [ "$(elapsed)" -lt 240 ]; then
    run sd15_bf16_b8_released 80 --task_preset released
fi

if "$PY" -c "import transformers" 2>/dev/null && [ "$(elapsed)" -lt 290 ]; then
    echo "== sampling ($(elapsed) s elapsed)"
    timeout 50 "$PY" benchmarks/bench_sampling.py --preset sd15 --precision bf16 --device cuda --warmup 1 --iters 3 \
        --json "$OUT/gpu_sampling_sd15.json" --markdown "$OUT/gpu_sampling_sd15.md" > "$OUT/gpu_sampling_sd15.log" 2>&1
    echo "== sampling: exit $?"
    tail -n 10 "$OUT/gpu_sampling_sd15.log"
fi
fi  # sd15

if [[ " $RUN " == *" sdxl "* ]]; then
    SDXL=(--preset sdxl --resolution 1024 --batch_size 2 --modes controlnet,controlnet++_masked,innercontrol)
    run sdxl_bf16_b2 120 "${SDXL[@]}"
    run sdxl_bf16_b2_ckpt 120 "${SDXL[@]}" --gradient_checkpointing
fi

{
    cat "$OUT/gpu_env.txt"
    for f in "$OUT"/gpu_sd15_*.md "$OUT"/gpu_sdxl_*.md "$OUT"/gpu_sampling_sd15.md; do
        [ -f "$f" ] || continue
        echo
        echo "## $(basename "$f" .md)"
        grep -E "^# " "${f%.md}.log" | head -n 3
        cat "$f"
        grep -E "^(target|reward-window)" "${f%.md}.log"
    done
    if [ -f "$OUT/gpu_profile_sd15.md" ]; then
        echo
        echo "## gpu_profile_sd15"
        cat "$OUT/gpu_profile_sd15.md"
    fi
    echo
    echo "total $(( $(date +%s) - START )) s"
} > "$OUT/gpu_summary.md"
cat "$OUT/gpu_summary.md"
