#!/usr/bin/env bash
# Train the long recipes side by side on one GPU within a fixed slot of minutes:
#
#   scripts/train_gpu.sh MINUTES RUNS HEIMED_TRAIN HEIMED_VALIDATION DRIVE_TRAIN OFFICIAL_WEIGHTS
#
# Four jobs share the GPU for MINUTES:
#   * configs/dncnn-finetune-green-long.yaml and configs/dncnn-finetune-long.yaml
#     (the official CDnCNN-B fine-tuned, 1:3:2 and 1:1:1),
#   * configs/srresnet.yaml (x4, batch 64),
#   * the vessel-loss search (search-loss over dncnn-finetune-green-long.yaml,
#     trials of SEARCH_STEPS steps, default 250), starting no trial after 85% of the
#     slot, with the finished trials in RUNS/search/trials.jsonl.
# benchmarks/bench_train.py first measures each network's GPU rate (bfloat16,
# channels-last); the runs' step counts fill 90% of the slot at a third of it, and
# time_limit_minutes stops a run that falls behind, its model written. HEIMED_TRAIN,
# HEIMED_VALIDATION and DRIVE_TRAIN are folders of photographs; the validation
# folder's photographs are held out of training.
set -euo pipefail
minutes=$1 runs=$2 heimed=$3 heimed_validation=$4 drive=$5 official=$6
search_steps=${SEARCH_STEPS:-250}
python=${PYTHON:-python3}
mkdir -p "$runs"
device=$($python -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
$python benchmarks/bench_train.py --device "$device" --batch "${BENCH_BATCH:-64}" --steps "${BENCH_STEPS:-10}" \
    --json "$runs/bench.json" | tee "$runs/bench.txt"

read -r dncnn_steps sr_steps < <($python - "$runs/bench.json" "$minutes" <<'EOF'
import json, sys
rates, seconds = json.load(open(sys.argv[1])), 0.9 * 60 * float(sys.argv[2])
rate = lambda name: rates[name]["channels-last + bfloat16"] / 3  # a third of the GPU each
print(max(1, int(seconds * rate("DnCNN-20 (CDnCNN-B fine-tune)") / 128)),
      max(1, int(seconds * rate("SRResNet x4") / 64)))
EOF
)
echo "slot $minutes min: DnCNN runs $dncnn_steps steps of 128, SRResNet $sr_steps steps of 64"

data=(--set "data.train=[$heimed, $heimed_validation, $drive]"
      --set "validation.holdout=$(ls "$heimed_validation" | wc -l)" --set "validation.among=[$heimed_validation]")
every() { echo $(( $1 / $2 > 0 ? $1 / $2 : 1 )); }
dncnn=("${data[@]}" --set "model.init_weights=$official" --set "steps=$dncnn_steps"
       --set "validate_every=$(every "$dncnn_steps" 4)" --set "checkpoint_every=$(every "$dncnn_steps" 4)"
       --set "log_every=$(every "$dncnn_steps" 100)" --set "time_limit_minutes=$minutes")
$python -m fundus_restore train configs/dncnn-finetune-green-long.yaml "${dncnn[@]}" \
    --set "output=$runs/dncnn-retina-green" >"$runs/green.log" 2>&1 &
$python -m fundus_restore train configs/dncnn-finetune-long.yaml "${dncnn[@]}" \
    --set "output=$runs/dncnn-retina" >"$runs/plain.log" 2>&1 &
$python -m fundus_restore train configs/srresnet.yaml "${data[@]}" --set batch_size=64 --set "steps=$sr_steps" \
    --set data.patches_per_image=4096 --set data.workers=5 \
    --set "validate_every=$(every "$sr_steps" 4)" --set "checkpoint_every=$(every "$sr_steps" 4)" \
    --set "log_every=$(every "$sr_steps" 100)" --set "time_limit_minutes=$minutes" \
    --set "output=$runs/srresnet-x4" >"$runs/srresnet.log" 2>&1 &
# The search starts no trial after 85% of the slot; a trial still running a minute past
# the slot is stopped (SIGINT), the finished ones stay logged.
timeout --signal=INT "$(awk "BEGIN { print int(60 * ($minutes + 1)) }")" \
    $python -m fundus_restore search-loss configs/dncnn-finetune-green-long.yaml --out "$runs/search" --trials 40 \
    --timeout-minutes "$(awk "BEGIN { print 0.85 * $minutes }")" \
    "${data[@]}" --set "model.init_weights=$official" --set "steps=$search_steps" --set data.workers=2 \
    --set "validate_every=$search_steps" --set "checkpoint_every=$search_steps" \
    --set "log_every=$(every "$search_steps" 10)" --set "schedule.warmup=$(every "$search_steps" 5)" >"$runs/search.log" 2>&1 &
wait
