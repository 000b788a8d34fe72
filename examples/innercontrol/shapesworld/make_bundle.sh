#!/usr/bin/env bash
# Build the ShapesWorld models the package ships (src/diffusers_innercontrol/assets/shapesworld), from a toy SD
# trained by pretrain_toy_sd.py. Every model is trained by the project's own scripts:
#   reward-<task>      train_toy_evaluators.py --model_kind reward   (depth, segmentation; hed/lineart: a small DPT)
#   controlnet-<task>  train_innercontrol.py --alpha 0 --beta 0      (the diffusion loss alone, from the UNet)
#   probe-<task>       train_probe.py                                (stage 1 on the toy UNet's decoder features)
# The evaluation models of run_experiment.py (depth-eval) are trained too but not shipped.
#
#   bash examples/innercontrol/shapesworld/make_bundle.sh TOY_SD_DIR WORK_DIR [JOBS]
#
# CN_INIT=DIR continues the ControlNets from DIR/controlnet-<task> where it exists (else from the UNet).
# ASSETS_DIR overrides where the models are copied. JOBS (default 2) trainings run at once, each single-threaded: on a 2-core CPU that is faster than one
# job with 2 threads. Steps can be changed with CN_STEPS, PROBE_STEPS and NUM_SCENES in the environment.
set -euo pipefail
TOY_SD=${1:?usage: make_bundle.sh TOY_SD_DIR WORK_DIR [JOBS]}
WORK=${2:?usage: make_bundle.sh TOY_SD_DIR WORK_DIR [JOBS]}
JOBS=${3:-2}
CN_STEPS=${CN_STEPS:-1000}
PROBE_STEPS=${PROBE_STEPS:-600}
NUM_SCENES=${NUM_SCENES:-4000}
HERE=$(cd "$(dirname "$0")" && pwd)
EX=$(cd "$HERE/.." && pwd)
ASSETS=${ASSETS_DIR:-$(python -c "from diffusers_innercontrol.quickstart import ASSETS_DIR; print(ASSETS_DIR)")}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$WORK/logs"
DATA="$WORK/shapes64"
[ -f "$DATA/metadata.jsonl" ] || python -c "from diffusers_innercontrol.shapesworld import ShapesWorld; ShapesWorld(64, seed=0).save_imagefolder('$DATA', $NUM_SCENES)"

LAUNCH="python -m accelerate.commands.launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"
jobs_list=()
for task in hed lineart depth segmentation; do
  init=""
  [ -z "${CN_INIT:-}" ] || [ ! -d "$CN_INIT/controlnet-$task" ] || init="--controlnet_model_name_or_path $CN_INIT/controlnet-$task"
  jobs_list+=("$LAUNCH $EX/train_innercontrol.py --task $task $init --pretrained_model_name_or_path $TOY_SD --train_data_dir $DATA \
    --resolution 64 --alpha 0 --beta 0 --train_batch_size 16 --max_train_steps $CN_STEPS --learning_rate 1e-4 \
    --lr_warmup_steps 100 --seed 0 --checkpointing_steps 100000 --validation_steps 500 --report_to none \
    --output_dir $WORK/controlnet-$task > $WORK/logs/controlnet-$task.log 2>&1")
  jobs_list+=("$LAUNCH $EX/train_probe.py --task $task --pretrained_model_name_or_path $TOY_SD --train_data_dir $DATA \
    --resolution 64 --projection_dim 64 --norm_num_groups 16 --train_batch_size 16 --max_train_steps $PROBE_STEPS \
    --learning_rate 1e-3 --seed 0 --checkpointing_steps 100000 --validation_steps $PROBE_STEPS --validation_split 64 \
    --report_to none --output_dir $WORK/probe-$task > $WORK/logs/probe-$task.log 2>&1")
  jobs_list+=("python $HERE/train_toy_evaluators.py --task $task --model_kind reward --output_dir $WORK/reward-$task \
    > $WORK/logs/reward-$task.log 2>&1")
done
jobs_list+=("python $HERE/train_toy_evaluators.py --task depth --model_kind eval --output_dir $WORK/eval-depth > $WORK/logs/eval-depth.log 2>&1")

# a model already in WORK (weights present) is kept: the script can be rerun after an interruption
todo=()
for job in "${jobs_list[@]}"; do
  out=$(echo "$job" | grep -o -- "--output_dir [^ ]*" | cut -d' ' -f2)
  if ls "$out"/*.safetensors >/dev/null 2>&1; then echo "kept: $out"; else todo+=("$job"); fi
done
[ ${#todo[@]} -eq 0 ] || printf '%s\n' "${todo[@]}" | xargs -P "$JOBS" -I{} bash -c '{} || { echo "FAILED: {}"; exit 255; }'

mkdir -p "$ASSETS"
rm -rf "$ASSETS/toy-sd" && cp -r "$TOY_SD" "$ASSETS/toy-sd"
for task in hed lineart depth segmentation; do
  for kind in controlnet probe reward; do
    rm -rf "$ASSETS/$kind-$task" && mkdir -p "$ASSETS/$kind-$task"
    # the weights, configs and model cards; no checkpoints, logs or training state
    find "$WORK/$kind-$task" -maxdepth 1 -type f \( -name '*.safetensors' -o -name '*.json' -o -name 'README.md' -o -name '*.png' \) \
      -exec cp {} "$ASSETS/$kind-$task/" \;
  done
done
du -sh "$ASSETS"/*
