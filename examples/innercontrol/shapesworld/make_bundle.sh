#!/usr/bin/env bash
# Rebuild every ShapesWorld model the package ships (src/diffusers_innercontrol/toy/assets/shapesworld) and the fidelity
# table, with the project's own scripts, in one command:
#
#   bash examples/innercontrol/shapesworld/make_bundle.sh WORK_DIR [JOBS]
#
#   0. toy-sd            pretrain_toy_sd.py (skipped when WORK_DIR/toy-sd or TOY_SD=DIR exists): a 4-channel toy SD in
#                        three runs (toy-sd-4ch), an 8-channel VAE (vae8), then the UNet and text encoder on its latents,
#                        started from the 4-channel ones (toy-sd-8ch), then 6000 more UNet steps (toy-sd-longer),
#                        then its decoder fine-tuned on the UNet's one-step x0 of noised latents (toy-sd)
#   1. reward-<task>     train_toy_evaluators.py --model_kind reward   (the models the reward loss uses)
#      eval-<task>       train_toy_evaluators.py --model_kind eval     (wider, another seed: the evaluators)
#      controlnet-<task> train_innercontrol.py --alpha 0 --beta 0      (the diffusion loss alone), in segments of
#                        STEPS_<TASK> steps on toy-sd-8ch at CN_LR, each a cosine schedule with seed 0, 1, 2 ...;
#                        depth and segmentation start from the UNet, HED and LineArt from depth's ControlNet after
#                        these segments, in a second wave; then TUNE_STEPS_<TASK> segments on the final toy SD at
#                        TUNE_LR, seeds TUNE_SEED, TUNE_SEED + 1 ...
#      probe-<task>      train_probe.py                                (stage 1 on the toy UNet's decoder features)
#   2. fidelity/         fidelity_scale.py: floor, VAE round trip, no-ControlNet ceiling, ControlNet, closure (guidance
#                        7.5, as the paper samples SD1.5); fidelity-guidance3/: the same at the toy SD's guidance 3
#   3. the models are copied to the package's assets (ASSETS_DIR overrides where)
#
# Every stage keeps what is already in WORK_DIR (weights present), so the script resumes after an interruption.
# JOBS (default 2) trainings run at once, each single-threaded: on a 2-core CPU that is faster than one job with
# 2 threads. The wall time of every job is appended to WORK_DIR/timings.tsv.
# Environment: STEPS_HED, STEPS_LINEART, STEPS_DEPTH, STEPS_SEGMENTATION (the segments, e.g. "2000 1500 3500"; empty:
# none), TUNE_STEPS_<TASK> likewise, CN_LR, TUNE_LR, TUNE_SEED, PROBE_STEPS, EVAL_STEPS, NUM_SCENES, FIDELITY_SCENES;
# CN_INIT=DIR continues the ControlNets from DIR/controlnet-<task> (else they start from the UNet); TOY_SD=DIR uses
# that toy SD for everything (BASE_SD=DIR: for the STEPS_<TASK> segments). To retune a bundle's ControlNets on a
# new toy SD: CN_INIT=<bundle> STEPS_HED= STEPS_LINEART= STEPS_DEPTH= STEPS_SEGMENTATION= TOY_SD=<toy SD>.
set -euo pipefail
WORK=${1:?usage: make_bundle.sh WORK_DIR [JOBS]}
JOBS=${2:-2}
# the shipped ControlNets' segments (docs/shapesworld.md): on toy-sd-8ch, depth 2000 steps, segmentation 5500, HED
# and LineArt 2000 each after depth's 2000; then on the final toy SD 1500 steps at the higher rate (LineArt 1500 + 3000;
# segmentation none: 1500 did not raise its mIoU)
STEPS_HED=${STEPS_HED-2000}
STEPS_LINEART=${STEPS_LINEART-2000}
STEPS_DEPTH=${STEPS_DEPTH-2000}
STEPS_SEGMENTATION=${STEPS_SEGMENTATION-2000 3500}
TUNE_STEPS_HED=${TUNE_STEPS_HED-1500}
TUNE_STEPS_LINEART=${TUNE_STEPS_LINEART-1500 3000}
TUNE_STEPS_DEPTH=${TUNE_STEPS_DEPTH-1500}
TUNE_STEPS_SEGMENTATION=${TUNE_STEPS_SEGMENTATION-}
CN_LR=${CN_LR:-5e-4}
TUNE_LR=${TUNE_LR:-1.5e-3}
TUNE_SEED=${TUNE_SEED:-2}
PROBE_STEPS=${PROBE_STEPS:-600}
EVAL_STEPS=${EVAL_STEPS:-1000}
NUM_SCENES=${NUM_SCENES:-8000}
FIDELITY_SCENES=${FIDELITY_SCENES:-256}
HERE=$(cd "$(dirname "$0")" && pwd)
EX=$(cd "$HERE/.." && pwd)
ASSETS=${ASSETS_DIR:-$(python -c "from diffusers_innercontrol.toy.quickstart import ASSETS_DIR; print(ASSETS_DIR)")}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
mkdir -p "$WORK/logs"
WORK=$(cd "$WORK" && pwd)
LAUNCH="python -m accelerate.commands.launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no"

timed() {  # timed NAME COMMAND...: run, log to WORK/logs/NAME.log, append "NAME<TAB>seconds" to WORK/timings.tsv
  local name=$1; shift
  local start; start=$(date +%s)
  "$@" > "$WORK/logs/$name.log" 2>&1 || { echo "FAILED: $name (log: $WORK/logs/$name.log)"; return 255; }
  printf '%s\t%s\n' "$name" "$(( $(date +%s) - start ))" >> "$WORK/timings.tsv"
}
export -f timed
export WORK

# ---------------------------------------------------------------- 0. the toy SD
if [ -z "${TOY_SD:-}" ] && [ -f "$WORK/toy-sd/README.md" ] && [ ! -d "$WORK/toy-sd-longer" ]; then
  # a work folder of the recipe before 2026-12-06's decoder fine-tune: its toy-sd is today's toy-sd-longer
  echo "make_bundle.sh: $WORK/toy-sd has no decoder fine-tune yet: move it to $WORK/toy-sd-longer and run again." >&2
  exit 2
fi
if [ -n "${TOY_SD:-}" ]; then BASE_SD=${BASE_SD:-$TOY_SD}; fi
TOY_SD=${TOY_SD:-$WORK/toy-sd}
BASE_SD=${BASE_SD:-$WORK/toy-sd-8ch}
if [ ! -f "$TOY_SD/README.md" ]; then  # the model card is written last
  P="$LAUNCH $HERE/pretrain_toy_sd.py"
  [ -f "$WORK/toy-sd-a/README.md" ] || timed toy-sd-a $P --output_dir "$WORK/toy-sd-a" --num_train_samples 4000 \
    --train_batch_size 12 --vae_steps 600 --unet_steps 3000 --use_ema --beta_schedule scaled_linear --snr_gamma 0
  [ -f "$WORK/toy-sd-b/README.md" ] || timed toy-sd-b $P --output_dir "$WORK/toy-sd-b" --init_from "$WORK/toy-sd-a" \
    --num_train_samples 6000 --train_batch_size 16 --vae_steps 0 --unet_steps 4500 --use_ema --beta_schedule scaled_linear --snr_gamma 0
  [ -f "$WORK/toy-sd-4ch/README.md" ] || timed toy-sd-4ch $P --output_dir "$WORK/toy-sd-4ch" --init_from "$WORK/toy-sd-b" \
    --num_train_samples 8000 --render_workers 1 --train_batch_size 16 --vae_steps 400 --unet_steps 4000 --use_ema \
    --validation_steps 1000 --offset_noise 0.15
  # 8 latent channels at the same 16 x 16: the VAE alone, then the UNet on its latents, warm-started from the 4-channel
  # UNet (conv_in re-initialised, conv_out zeroed)
  [ -f "$WORK/vae8/README.md" ] || timed vae8 $P --output_dir "$WORK/vae8" --latent_channels 8 --vae_steps 1500 \
    --unet_steps 0 --num_train_samples 8000 --render_workers 1 --train_batch_size 16
  [ -f "$BASE_SD/README.md" ] || timed toy-sd-8ch $P --output_dir "$BASE_SD" --init_from "$WORK/vae8" \
    --unet_init_from "$WORK/toy-sd-4ch" --vae_steps 0 --unet_steps 4000 --use_ema --beta_schedule scaled_linear \
    --snr_gamma 0 --offset_noise 0.15 --num_train_samples 8000 --render_workers 1 --train_batch_size 16 --validation_steps 1000
  # the UNet and text encoder 6000 more steps, the autoencoder kept: the edge ControlNets close 6-9 points more of
  # their gap on it (docs/shapesworld.md)
  [ -f "$WORK/toy-sd-longer/README.md" ] || timed toy-sd-longer $P --output_dir "$WORK/toy-sd-longer" \
    --init_from "$BASE_SD" --vae_steps 0 --unet_steps 6000 --use_ema \
    --beta_schedule scaled_linear --snr_gamma 0 --offset_noise 0.15 --num_train_samples 8000 --render_workers 1 \
    --train_batch_size 16 --learning_rate 2.5e-4 --seed 3 --validation_steps 3000
  # the decoder alone, on latents like those the UNet hands it when sampling (its one-step x0 from encoder latents
  # noised to t < 500): LineArt and segmentation were capped by the autoencoder's round trip (docs/shapesworld.md);
  # the encoder, the latent space and so the UNet, ControlNets and probes stay valid
  timed toy-sd $P --output_dir "$TOY_SD" --init_from "$WORK/toy-sd-longer" --vae_train decoder \
    --decoder_latents denoised --decoder_max_timestep 500 --vae_steps 2000 --unet_steps 0 --vae_lr_scheduler cosine \
    --beta_schedule scaled_linear --seed 4 --train_batch_size 16
fi

# ---------------------------------------------------------------- 1. rewards, evaluators, ControlNets, probes
DATA="$WORK/shapes64"
[ -f "$DATA/metadata.jsonl" ] || python -c "from diffusers_innercontrol.toy.shapesworld import ShapesWorld; ShapesWorld(64, seed=0).save_imagefolder('$DATA', $NUM_SCENES)"
controlnet_segment() {  # controlnet_segment NAME INIT TOY_SD STEPS LR SEED: one cosine schedule, kept when done
  # (the task is the caller's `local TASK`, which bash scoping makes visible here)
  local out="$WORK/$1"
  ls "$out"/*.safetensors >/dev/null 2>&1 && return 0
  timed "$1" $LAUNCH "$EX/train_innercontrol.py" --task "$TASK" ${2:+--controlnet_model_name_or_path "$2"} \
    --pretrained_model_name_or_path "$3" --train_data_dir "$DATA" --resolution 64 --alpha 0 --beta 0 \
    --train_batch_size 16 --max_train_steps "$4" --learning_rate "$5" --lr_scheduler cosine \
    --lr_warmup_steps 100 --seed "$6" --checkpointing_steps 500 --validation_steps 1000 --report_to none \
    --output_dir "$out"
}
controlnet_chain() {  # controlnet_chain TASK SEGMENTS TUNE_SEGMENTS [INIT_DIR]: one run per segment (comma-separated,
  # "-" for none), each continuing the last: SEGMENTS on BASE_SD at CN_LR, then TUNE_SEGMENTS on TOY_SD at TUNE_LR
  local init=${4:-} seed=0 steps
  local TASK=$1
  for steps in ${2//,/ }; do
    [ "$steps" != - ] || continue
    controlnet_segment "controlnet-$TASK-s$seed" "$init" "$BASE_SD" "$steps" "$CN_LR" "$seed" || return 255
    init="$WORK/controlnet-$TASK-s$seed"
    seed=$((seed + 1))
  done
  # what the second wave starts from: this ControlNet before its tuning on the final toy SD
  [ -z "$init" ] || { rm -rf "$WORK/controlnet-$TASK-base" && cp -r "$init" "$WORK/controlnet-$TASK-base"; }
  seed=$TUNE_SEED
  for steps in ${3//,/ }; do
    [ "$steps" != - ] || continue
    controlnet_segment "controlnet-$TASK-tune-s$seed" "$init" "$TOY_SD" "$steps" "$TUNE_LR" "$seed" || return 255
    init="$WORK/controlnet-$TASK-tune-s$seed"
    seed=$((seed + 1))
  done
  rm -rf "$WORK/controlnet-$TASK" && cp -r "$init" "$WORK/controlnet-$TASK"
}
export -f controlnet_segment controlnet_chain
export LAUNCH EX TOY_SD BASE_SD DATA CN_LR TUNE_LR TUNE_SEED
controlnet_job() {  # controlnet_job TASK "SEGMENTS" "TUNE_SEGMENTS" [INIT_DIR]: the job line for run_jobs (xargs strips
  # quotes: commas, "-" for none)
  local segments=${2:--} tune=${3:--}
  echo "controlnet-$1 controlnet_chain $1 ${segments// /,} ${tune// /,} ${4:-}"
}
run_jobs() {  # run the named jobs whose folders hold no weights yet, JOBS at a time
  local todo=() job name
  for job in "$@"; do
    name=${job%% *}
    if ls "$WORK/$name"/*.safetensors >/dev/null 2>&1; then echo "kept: $WORK/$name"; else todo+=("$job"); fi
  done
  [ ${#todo[@]} -eq 0 ] || printf '%s\n' "${todo[@]}" | xargs -P "$JOBS" -I{} bash -c 'timed {}'
}
jobs_list=()
second_wave=()
for task in hed lineart depth segmentation; do
  probe_loss=""  # LineArt's probe learns its one-pixel lines with HED's class-balanced loss (the plain MSE reads nothing)
  [ "$task" != lineart ] || probe_loss="--alignment_loss sparse_mse"
  init=""
  [ -z "${CN_INIT:-}" ] || [ ! -d "$CN_INIT/controlnet-$task" ] || init="$CN_INIT/controlnet-$task"
  segments_var="STEPS_${task^^}"
  tune_var="TUNE_STEPS_${task^^}"
  if [[ "$task" =~ ^(hed|lineart)$ ]] && [ -z "$init" ]; then
    # the edge tasks start from depth's ControlNet, which already draws the shapes in place: after 2000 steps
    # they close more of their gap than after 7000 from the UNet (docs/shapesworld.md). A second wave.
    second_wave+=("$(controlnet_job "$task" "${!segments_var}" "${!tune_var}" "$WORK/controlnet-depth-base")")
  else
    jobs_list+=("$(controlnet_job "$task" "${!segments_var}" "${!tune_var}" "$init")")
  fi
  jobs_list+=("probe-$task $LAUNCH $EX/train_probe.py --task $task $probe_loss --pretrained_model_name_or_path $TOY_SD --train_data_dir $DATA \
    --resolution 64 --projection_dim 64 --norm_num_groups 16 --train_batch_size 16 --max_train_steps $PROBE_STEPS \
    --learning_rate 1e-3 --seed 0 --checkpointing_steps 100000 --validation_steps $PROBE_STEPS --validation_split 64 \
    --report_to none --output_dir $WORK/probe-$task")
  jobs_list+=("reward-$task python $HERE/train_toy_evaluators.py --task $task --model_kind reward --output_dir $WORK/reward-$task")
  jobs_list+=("eval-$task python $HERE/train_toy_evaluators.py --task $task --model_kind eval --steps $EVAL_STEPS \
    --output_dir $WORK/eval-$task")
done
run_jobs "${jobs_list[@]}"
[ ${#second_wave[@]} -eq 0 ] || run_jobs "${second_wave[@]}"

# ---------------------------------------------------------------- 2. the fidelity table
timed fidelity python "$HERE/fidelity_scale.py" --output_dir "$WORK/fidelity" --pretrained_model_name_or_path "$TOY_SD" \
  --controlnet "shipped=$WORK" --eval_dir "$WORK" --num_scenes "$FIDELITY_SCENES"
# and at the toy SD's own guidance (SD1.5's 7.5 over-saturates it), on the next held-out scenes
timed fidelity-guidance3 python "$HERE/fidelity_scale.py" --output_dir "$WORK/fidelity-guidance3" \
  --pretrained_model_name_or_path "$TOY_SD" --controlnet "shipped=$WORK" --eval_dir "$WORK" --num_scenes "$FIDELITY_SCENES" \
  --guidance_scale 3 --start_index $((100000 + FIDELITY_SCENES))

# ---------------------------------------------------------------- 3. into the package
mkdir -p "$ASSETS"
rm -rf "$ASSETS/toy-sd" && cp -r "$TOY_SD" "$ASSETS/toy-sd"
for task in hed lineart depth segmentation; do
  for kind in controlnet probe reward eval; do
    rm -rf "$ASSETS/$kind-$task" && mkdir -p "$ASSETS/$kind-$task"
    # the weights, configs and model cards; no checkpoints, logs or training state
    find "$WORK/$kind-$task" -maxdepth 1 -type f \( -name '*.safetensors' -o -name '*.json' -o -name 'README.md' -o -name '*.png' \) \
      -exec cp {} "$ASSETS/$kind-$task/" \;
    # the work folder's absolute paths stay behind (diffusers records the source folder as `_name_or_path`)
    sed -i '/"_name_or_path": "\//d' "$ASSETS/$kind-$task"/*.json
  done
done
du -sh "$ASSETS"/*
cat "$WORK/timings.tsv"
