#!/usr/bin/env bash
# (For LRA ListOps, benchmarks/listops_gpu.sh supersedes this script: one encoder at a time, resuming
# from checkpoints carried between machines in gpu_state/.)
# The evaluations' GPU presets on one GPU machine, as parallel processes sharing the GPU (none
# of these small models fills an H100 alone): LRA ListOps, one process per encoder, and the
# passkey and MQAR models (benchmarks/recall.py), one process per task.
#
#   bash benchmarks/gpu_evals.sh                      # WORK=/tmp/sparse_attn_gpu_evals LIMIT=560
#   bash benchmarks/gpu_evals.sh                      # again: each process goes on where it stopped
#
# Every process stops after LIMIT seconds (one device command may run 10 minutes). Run it again
# on the same machine to go on: ListOps resumes from its last evaluation's checkpoint in WORK,
# recall skips the schedules it has finished. Results are written to WORK (listops_gpu.json,
# passkey_gpu.json, mqar_gpu.json and their .png), and copied to $OUT when that is set, with
# the last lines of every log.
#
# Environment: WORK (checkpoints, data, logs, results), LIMIT (seconds), LISTOPS (encoders to
# train; empty: none), RECALL (passkey and/or mqar; empty: none), DATA_XZ (see below), OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/tmp/sparse_attn_gpu_evals}
LIMIT=${LIMIT:-560}
LISTOPS=${LISTOPS-dense sliding_window longformer bigbird linear performer lsh}
RECALL=${RECALL-passkey mqar}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
mkdir -p "$WORK/logs"
began=$(date +%s)
left() { echo $((LIMIT - ($(date +%s) - began))); }

for task in $RECALL; do
    timeout "$(left)" python3 benchmarks/recall.py --preset gpu --task "$task" --device cuda --resume \
        --out "$WORK" >>"$WORK/logs/$task.log" 2>&1 &
done
# The 96K training trees take minutes to generate: once, before the encoders start. Splits
# generated elsewhere may come along xz-compressed in $DATA_XZ (same file names, .pt.xz; made
# with `listops.py --data-only` and `xz`) and are unpacked instead.
if [ -n "$LISTOPS" ] && [ -n "${DATA_XZ:-}" ]; then
    mkdir -p "$WORK/data"
    for f in "$DATA_XZ"/*.pt.xz; do
        target="$WORK/data/$(basename "${f%.xz}")"
        if [ ! -f "$target" ]; then
            python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" \
                "$f" "$target.tmp" && mv "$target.tmp" "$target"
        fi
    done
fi
if [ -n "$LISTOPS" ]; then
    timeout "$(left)" python3 benchmarks/listops.py --preset gpu --data-only --data-cache "$WORK/data" \
        >>"$WORK/logs/listops_data.log" 2>&1
fi
for name in $LISTOPS; do
    timeout "$(left)" python3 benchmarks/listops.py --preset gpu --only "$name" --checkpoint "$WORK/checkpoints" \
        --resume --data-cache "$WORK/data" --out "$WORK/listops_gpu.json" >>"$WORK/logs/listops_$name.log" 2>&1 &
done
sleep 60 && nvidia-smi >"$WORK/logs/nvidia-smi.log" 2>&1 &
wait
echo "stopped after $(($(date +%s) - began)) s" >&2

if [ -n "${OUT:-}" ]; then
    cp "$WORK"/*.json "$WORK"/*.png "$OUT"/ 2>/dev/null
    for log in "$WORK"/logs/*.log; do  # tqdm redraws with \r: keep the last state of each line
        echo "== $(basename "$log")"
        tr '\r' '\n' <"$log" | grep -v '^\s*$' | tail -n 12
    done >"$OUT/logs.txt"
fi
