#!/usr/bin/env bash
# LRA-size ListOps (benchmarks/listops.py --preset gpu: the schedule of the rows already in
# benchmarks/results/listops_gpu.json) for the encoders in NAMES, one at a time, inside one device
# command of MINUTES minutes, resuming from the checkpoints carried in gpu_state/:
#
#   NAMES="dense" MINUTES=8.5 bash benchmarks/listops_gpu.sh
#
# gpu_state/ (repo root, untracked and deliberately not git-ignored, so that it travels with the
# working tree) holds what goes from one machine to the next:
#   gpu_state/<name>.pt.part-<i>   a checkpoint (model, AdamW, step, random states, history) cut in
#                                  parts of 15 MiB (what may come back from $OUT: 16 MiB a file)
#   gpu_state/listops_gpu.json     the merged results so far (when absent: benchmarks/results/'s)
# Each command writes the updated ones under $OUT/gpu_state/ (and a log; $OUT/listops_gpu.png
# when there is room: files_left_out otherwise; the plot can be redrawn from the JSON):
# copy them into gpu_state/ for the next command, and listops_gpu.json / .png into
# benchmarks/results/ once every encoder is there. A run that finished is in the JSON and is
# not trained again. A checkpoint is ~38 MB for these 3.2M-parameter encoders (weights and
# AdamW's two moments in float32): keep only the parts of the encoder being trained in gpu_state/
# (the working tree that travels is limited to 64 MiB, and what comes back from $OUT to 8 files
# of 16 MiB: at most two encoders' checkpoints per command, e.g. PARALLEL=1 NAMES="dense sliding_window").
#
# The data are generated, not downloaded (eval/tasks/listops.py: LRA's generator, seeded), once
# per machine and kept in $WORK/data (a later command on the same warm machine reuses them, and
# its checkpoints in $WORK too). The 96K training trees take ~2-3 minutes of one core; with the
# stream marks in benchmarks/data/ every core draws a stretch of the stream (the same trees,
# checked against the sequential stream's digest), a few seconds on 16 cores.
#
# Two settings side by side (tuning: runs with other flags replace a JSON's runs, so each setting
# needs its own STATE, WORK and OUT; LEAN=1 keeps the log and plot out of $OUT so that both
# settings' checkpoint parts and JSONs fit in the 8 files that come back):
#   for lr in 1e-4 3e-4; do LEAN=1 NAMES=dense EXTRA="--lr $lr" STATE=gpu_state/lr$lr WORK=/tmp/lo_$lr \
#       OUT=$OUT/lr$lr RESULTS=/dev/null/none MINUTES=9 bash benchmarks/listops_gpu.sh & done; wait
#
# Environment: NAMES (encoders of listops_mechanisms: dense sliding_window longformer bigbird
# linear performer lsh), PARALLEL (1: one process per encoder of NAMES, all at once, each logging
# to $WORK/listops_gpu_log_<name>.txt; default 0: one after another), MINUTES (the command's budget), STATE (gpu_state), WORK, OUT, STEPS
# (override the preset's 5000, for a short trial), EXTRA (more flags for listops.py), PRESET (gpu; cpu for a dry run of this script
# on a CPU, with STATE and WORK elsewhere), LEAN (1: the log and the plot stay in $WORK) and RESULTS (the results file to start from when
# $STATE has none: benchmarks/results/listops_$PRESET.json).
set -uo pipefail
cd "$(dirname "$0")/.."
began=$(date +%s)
NAMES=${NAMES:-dense}
MINUTES=${MINUTES:-8.5}
PRESET=${PRESET:-gpu}
PARALLEL=${PARALLEL:-0}
RESULTS=${RESULTS:-benchmarks/results/listops_$PRESET.json}
STATE=${STATE:-gpu_state}
WORK=${WORK:-/tmp/sparse_attn_listops}
OUT=${OUT:-$WORK/out}
PART_SIZE=15M
RESERVE_S=40  # after training: cutting checkpoints into parts, copying to $OUT
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
mkdir -p "$WORK/checkpoints" "$WORK/data" "$OUT/gpu_state" "$STATE"
LEAN=${LEAN:-0}
log="$OUT/listops_gpu_log.txt"
[ "$LEAN" = 1 ] && log="$WORK/listops_gpu_log.txt"  # LEAN: only checkpoint parts and the JSON in $OUT
say() { echo "[$(($(date +%s) - began)) s] $*" | tee -a "$log" >&2; }

# 1. checkpoints: this machine's own (a warm machine's previous command), else the carried parts
for name in $NAMES; do
    if [ -f "$WORK/checkpoints/$name.pt" ]; then
        say "$name: checkpoint of this machine's previous command"
    elif compgen -G "$STATE/$name.pt.part-*" >/dev/null; then
        cat $(ls "$STATE/$name.pt.part-"* | sort -V) >"$WORK/checkpoints/$name.pt.tmp" &&
            mv "$WORK/checkpoints/$name.pt.tmp" "$WORK/checkpoints/$name.pt"
        say "$name: checkpoint joined from $(ls "$STATE/$name.pt.part-"* | wc -l) parts in $STATE/"
    else
        say "$name: no checkpoint, starting at step 0"
    fi
done
# 2. the results so far
results="$WORK/listops_gpu.json"
if [ ! -f "$results" ]; then
    if [ -f "$STATE/listops_gpu.json" ]; then cp "$STATE/listops_gpu.json" "$results"
    elif [ -f "$RESULTS" ]; then cp "$RESULTS" "$results"; fi
fi
# 3. the data (generated; kept for later commands on this machine)
python3 benchmarks/listops.py --preset $PRESET --data-only --data-cache "$WORK/data" 2>&1 | tee -a "$log"
say "data ready"
# 4. train, one encoder after another, inside what is left of the budget
left_s=$(python3 -c "print(max(0.0, $MINUTES * 60 - ($(date +%s) - $began) - $RESERVE_S))")
minutes=$(python3 -c "print(round($left_s / 60, 3))")
say "training $NAMES for at most $minutes min"
steps=()
[ -n "${STEPS:-}" ] && steps=(--steps "$STEPS")
# EXTRA: more flags for benchmarks/listops.py (e.g. "--lr 5e-4 --warmup 500" to tune on a short
# run; runs made with other settings replace the JSON's runs instead of joining them)
read -r -a extra <<<"${EXTRA:-}"
train() {  # train() NAME...: one process for these encoders, one after another
    timeout $((${left_s%.*} + 60)) python3 benchmarks/listops.py --preset $PRESET --only "$@" ${steps[@]+"${steps[@]}"} ${extra[@]+"${extra[@]}"} \
        --checkpoint "$WORK/checkpoints" --resume --checkpoint-minutes 2 --max-minutes "$minutes" \
        --data-cache "$WORK/data" --out "$results" 2>&1 | tr '\r' '\n'
}
if [ "$PARALLEL" = 1 ]; then
    # one process per encoder, all at once: a ListOps step (32 trees, 3.2M parameters) leaves the
    # GPU mostly idle and waits on one core's Python, so two processes train ~twice as fast as
    # one after the other. Results merge into one JSON under a file lock (benchmarks/common.py).
    for name in $NAMES; do
        train "$name" >"$WORK/listops_gpu_log_$name.txt" &
    done
    wait
    for name in $NAMES; do  # the per-encoder logs stay in $WORK: $OUT brings back 8 files at most
        echo "== $name" | tee -a "$log"; grep -v '^ *$' "$WORK/listops_gpu_log_$name.txt" | tail -n 8 | tee -a "$log"
    done
else
    train $NAMES | tee -a "$log"
fi
say "training stopped"
# 5. what the next machine needs, under $OUT
[ -f "$results" ] && cp "$results" "$OUT/gpu_state/listops_gpu.json"
finished() { [ -f "$results" ] && python3 -c "import json, sys; sys.exit(sys.argv[2] not in json.load(open(sys.argv[1]))['runs'])" "$results" "$1"; }
for name in $NAMES; do
    [ -f "$WORK/checkpoints/$name.pt" ] || continue
    if finished "$name"; then say "$name: finished, its checkpoint stays behind"; continue; fi
    split -b "$PART_SIZE" -d -a 1 "$WORK/checkpoints/$name.pt" "$OUT/gpu_state/$name.pt.part-"
    say "$name: checkpoint in $(ls "$OUT/gpu_state/$name.pt.part-"* | wc -l) parts"
done
# the plot when there is room for it (two checkpoints' parts, the JSON and the log make 8 files)
if [ "$LEAN" != 1 ] && [ -f "${results%.json}.png" ] && [ "$(find "$OUT" -type f | wc -l)" -lt 8 ]; then
    cp "${results%.json}.png" "$OUT/listops_gpu.png"
fi
[ -f "$results" ] && python3 - "$results" <<'EOF' 2>&1 | tee -a "$log"
import json, sys
runs = json.load(open(sys.argv[1]))["runs"]
for name, run in runs.items():
    print(f"{name}: test {100 * run['test_accuracy']:.2f}%, val {100 * run['val_accuracy']:.2f}%, "
          f"{run['train_seconds']:.0f} s training, {run['steps_per_s']:.2f} steps/s")
EOF
say "done"
