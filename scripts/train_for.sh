#!/usr/bin/env bash
# Train one config in a fixed slot of minutes, its learning-rate schedule ending with the slot:
#
#   scripts/train_for.sh CONFIG MINUTES OUTPUT [--set KEY=VALUE ...]
#
# Why: a borrowed GPU comes for a few minutes, and a cosine schedule cut short by
# time_limit_minutes ends at a high learning rate. So a probe run of the same config
# (PROBE_SECONDS, default 40, into OUTPUT/probe) first measures the real rate, data
# loading included, and how long the run takes to start and to finish (calibration,
# validation, writing); the run proper (OUTPUT/run) then gets the steps that fill what
# is left of the slot, and time_limit_minutes stops it at the slot's end if it falls behind.
set -euo pipefail
config=$1 minutes=$2 output=$3
shift 3
python=${PYTHON:-python3}
slot_start=$(date +%s.%N)
mkdir -p "$output"

probe_start=$(date +%s.%N)
$python -m fundus_restore train "$config" "$@" --set "output=$output/probe" --set steps=100000000 \
    --set log_every=5 --set validate_every=100000000 --set checkpoint_every=100000000 \
    --set "time_limit_minutes=$(awk "BEGIN { print ${PROBE_SECONDS:-40} / 60 }")" >"$output/probe.log" 2>&1
probe_end=$(date +%s.%N)

read -r steps limit < <($python - "$output/probe/scalars.csv" "$minutes" "$slot_start" "$probe_start" "$probe_end" <<'EOF'
import csv, math, sys, time
scalars, minutes, slot_start, probe_start, probe_end = sys.argv[1], *map(float, sys.argv[2:])
rows = [(float(r["wall_time"]), int(r["step"])) for r in csv.DictReader(open(scalars)) if r["tag"] == "train/loss"]
if len(rows) < 4:
    sys.exit(f"{scalars}: the probe logged {len(rows)} training steps, too few to measure a rate")
(t0, s0), (t1, s1) = rows[len(rows) // 2], rows[-1]  # the second half: the loader is warm
rate = (s1 - s0) / (t1 - t0)
starting, finishing = rows[0][0] - probe_start, probe_end - rows[-1][0]
left = 60 * minutes - (time.time() - slot_start)
steps = math.floor(0.95 * rate * (left - starting - finishing))
if steps < 1:
    sys.exit(f"no time left to train: {left:.0f} s left, {starting + finishing:.0f} s to start and finish")
print(f"probe: {rate:.2f} steps/s, {starting:.0f} s to start, {finishing:.0f} s to finish; "
      f"{left:.0f} s left in the slot: {steps} steps", file=sys.stderr)
print(steps, (left - finishing) / 60)
EOF
)
every() { echo $(($1 / $2 > 0 ? $1 / $2 : 1)); }
$python -m fundus_restore train "$config" "$@" --set "output=$output/run" --set "steps=$steps" \
    --set "log_every=$(every "$steps" 200)" --set "validate_every=$(every "$steps" 5)" \
    --set "checkpoint_every=$(every "$steps" 5)" --set "time_limit_minutes=$limit" >"$output/run.log" 2>&1
echo "trained $steps steps in a slot of $minutes minutes: $output/run/model.safetensors"
