#!/usr/bin/env bash
# Continue the bundled defaults side by side on one GPU within a slot of MINUTES:
#
#   scripts/train_gpu_continue.sh MINUTES RUNS HEIMED_TRAIN HEIMED_VALIDATION DRIVE_TRAIN
#
# Three runs, each in RUNS/NAME with its log in RUNS/NAME.log:
#   * denoise: resunet-retina-green-blind continued at full size (configs/resunet-green-blind.yaml);
#   * sizes:   the same on photos also shrunk x2 and x4 (configs/resunet-green-blind-sizes.yaml);
#   * deeper:  srresnet-x4-retina grown to 32 residual blocks (configs/srresnet-deeper.yaml).
# Step counts (DENOISE_STEPS, SR_STEPS) are sized for the rates three runs sharing an H200
# gave before (docs/results.md, "Training throughput"); time_limit_minutes stops a run that
# falls behind, its model written. HEIMED_VALIDATION is a folder whose photographs are held
# out of training and validated on; WORKERS loader processes per run (default 5).
# DENOISER and UPSCALER name the weights the runs start from (default: the bundled
# resunet-retina-green-blind and srresnet-x4-retina; the weights these runs started
# from are in git history, docs/results.md says where).
set -euo pipefail
minutes=$1 runs=$2 heimed=$3 heimed_validation=$4 drive=$5
python=${PYTHON:-python3}
workers=${WORKERS:-5}
denoise_steps=${DENOISE_STEPS:-5000} sr_steps=${SR_STEPS:-3000}
denoiser=${DENOISER:-resunet-retina-green-blind} upscaler=${UPSCALER:-srresnet-x4-retina}
mkdir -p "$runs"
every() { echo $(( $1 / $2 > 0 ? $1 / $2 : 1 )); }
train() {  # CONFIG NAME STEPS [--set ...]: one run in the background, on the data and the slot
    local config=$1 name=$2 steps=$3
    shift 3
    $python -m fundus_restore train "$config" "$@" \
        --set "data.train=[$heimed, $heimed_validation, $drive]" \
        --set "validation.holdout=$(ls "$heimed_validation" | wc -l)" --set "validation.among=[$heimed_validation]" \
        --set "steps=$steps" --set "validate_every=$(every "$steps" 4)" --set "checkpoint_every=$(every "$steps" 4)" \
        --set "log_every=$(every "$steps" 100)" --set "time_limit_minutes=$minutes" --set "data.workers=$workers" \
        --set "output=$runs/$name" >"$runs/$name.log" 2>&1 &
}
train configs/resunet-green-blind.yaml denoise "$denoise_steps" --set "model.init_weights=$denoiser" --set seed=22
train configs/resunet-green-blind-sizes.yaml sizes "$denoise_steps" --set "model.init_weights=$denoiser"
train configs/srresnet-deeper.yaml deeper "$sr_steps" --set "model.init_weights=$upscaler"
status=0
for job in $(jobs -p); do wait "$job" || status=1; done
exit $status
