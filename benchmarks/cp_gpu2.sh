#!/usr/bin/env bash
# Issue #20 on a 2-GPU machine (nvidia-h200-x2: NVLink, torchrun, NCCL with NVLS off): the
# context-parallel scaling benchmark (benchmarks/cp_scaling.py) and the training comparison
# (examples/train_lm.py, one GPU against --context-parallel 2), in commands of MINUTES minutes:
#
#   PARTS="bands" MINUTES=9.5 bash benchmarks/cp_gpu2.sh            # command 1: window, Longformer at 256K-1M
#   PARTS="sparse train" MINUTES=9.5 bash benchmarks/cp_gpu2.sh     # command 2: BigBird, causal at 256K; training
#
# (PARTS="bands sparse train", the default, runs all three in one command when time allows; each
# part only starts what fits in what is left, see below.) What comes back, under $OUT:
#   cp_scaling_<part>.json   benchmarks/cp_scaling.py --matrix <part>, rewritten after every row
#                            (a command cut off keeps the rows it finished; --budget-s stops
#                            starting rows RESERVE_S + ROW_S seconds before the command's end)
#   cp_train.json            the training comparison, rewritten after every run:
#                            short: the same model, SHORT_LEN x SHORT_BATCH tokens, one GPU and
#                              --context-parallel 2: both loss curves and their largest difference
#                              (equal to bf16 noise expected: every step is the same computation);
#                            long: a sequence length one GPU cannot hold (batch LONG_BATCH), from the
#                              short run's peak memory per token (LONG_LEN overrides): trained with
#                              --context-parallel 2 (its loss curve and per-rank peak memory), and
#                              tried on one GPU for 2 steps (expected: out of memory; its exit and
#                              message are recorded). When the 2-GPU run runs out of memory too, the
#                              length is cut by a quarter and both are tried again (twice at most).
#   cp_gpu2_log.txt          everything printed.
# Copy the JSON files to benchmarks/results/ (cp_scaling_bands.json, cp_scaling_sparse.json,
# cp_train.json) once they are complete.
#
# Environment: PARTS (bands, sparse, issue = bands + sparse in one run, train), MINUTES (this
# command's budget, default 9.5), OUT, WORK (scratch: training histories before they are merged),
# NPROC (2), EXTRA (more flags for cp_scaling.py, e.g. "--repeats 3"), MECHANISMS (the training
# model's layers, default the example's Longformer window 32 + 4 global tokens, causal),
# SHORT_LEN (16384), SHORT_BATCH (8), SHORT_STEPS (60), LONG_LEN (default: from the memory
# estimate), LONG_BATCH (1), LONG_STEPS (20), RESERVE_S (seconds kept for the training part when
# it follows a scaling part, default 210), ROW_S (the longest scaling row, default 60). Repeats per
# timing: 5 for bands (cheap rows), 3 otherwise (causal at 256K: ~1 s a forward+backward on one
# GPU); EXTRA="--repeats N" overrides. These budgets are estimates: nothing here has run on GPUs.
# CPU dry run of the script: DEVICE=cpu (gloo, tiny shapes; the training part then only checks
# that the commands run).
set -uo pipefail
cd "$(dirname "$0")/.."
began=$(date +%s)
PARTS=${PARTS:-bands sparse train}
MINUTES=${MINUTES:-9.5}
NPROC=${NPROC:-2}
DEVICE=${DEVICE:-cuda}
WORK=${WORK:-/tmp/sparse_attn_cp_gpu2}
OUT=${OUT:-$WORK/out}
RESERVE_S=${RESERVE_S:-210}
ROW_S=${ROW_S:-60}
MECHANISMS=${MECHANISMS:-longformer:window=32,global_tokens=4,causal=true}
SHORT_LEN=${SHORT_LEN:-16384}
SHORT_BATCH=${SHORT_BATCH:-8}
SHORT_STEPS=${SHORT_STEPS:-60}
LONG_BATCH=${LONG_BATCH:-1}
LONG_STEPS=${LONG_STEPS:-20}
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
mkdir -p "$OUT" "$WORK"
log="$OUT/cp_gpu2_log.txt"
say() { echo "[$(($(date +%s) - began)) s] $*" | tee -a "$log" >&2; }
left_s() { python3 -c "print(int($MINUTES * 60 - ($(date +%s) - $began)))"; }
read -r -a extra <<<"${EXTRA:-}"
say "PARTS=$PARTS MINUTES=$MINUTES NPROC=$NPROC DEVICE=$DEVICE; $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n 1)"

scaling() {  # scaling PART: cp_scaling.py --matrix PART within what is left
    local reserve=0
    [[ " $PARTS " == *" train "* ]] && reserve=$RESERVE_S
    local left; left=$(left_s)
    local budget=$((left - reserve - ROW_S))
    if [ "$budget" -le 0 ]; then say "scaling $1: no time left (${left} s, ${reserve} s kept for training)"; return; fi
    local opts=(--repeats 3)
    [ "$1" = bands ] && opts=(--repeats 5)
    [ "$DEVICE" = cpu ] && opts=(--device cpu --heads 2 --kv-heads 1 --dim 16 --window 64 --globals 8
                                  --bigbird-block 32 --repeats 1 --warmup 0
                                  --rows window:512:auto causal:512:ring causal:512:plain_ring)
    say "scaling $1: budget ${budget} s (hard stop at $((left - reserve)) s)"
    timeout --signal=TERM --kill-after=20 $((left - reserve)) \
        torchrun --nproc-per-node "$NPROC" benchmarks/cp_scaling.py --matrix "$1" --budget-s "$budget" \
        --out "$OUT/cp_scaling_$1.json" ${opts[@]+"${opts[@]}"} ${extra[@]+"${extra[@]}"} 2>&1 | tr '\r' '\n' |
        grep -v '^ *$' | tee -a "$log"
    say "scaling $1: exit ${PIPESTATUS[0]}"
}

# ---------------------------------------------------------------------------- training
read -r -a mechanisms <<<"$MECHANISMS"
TRAIN_ARGS=(--device "$DEVICE" --plot "" --sample 0 --checkpoint "" --mechanisms "${mechanisms[@]}")
show() { tr '\r' '\n' <"$WORK/$1.log" | grep -v '^ *$' | tail -n 4 | tee -a "$log"; }
run_one_gpu() {  # run_one_gpu NAME SEQ BATCH STEPS [LIMIT_S]: examples/train_lm.py on GPU 0
    local name=$1 seq=$2 batch=$3 steps=$4 limit=${5:-$(left_s)}
    say "train $name: one GPU, seq $seq x batch $batch, $steps steps"
    CUDA_VISIBLE_DEVICES=0 timeout "$limit" python3 examples/train_lm.py "${TRAIN_ARGS[@]}" --seq-len "$seq" \
        --batch-size "$batch" --steps "$steps" --history "$WORK/$name.history.json" \
        --summary "$WORK/$name.summary.json" >"$WORK/$name.log" 2>&1
    local rc=$?
    echo "$rc" >"$WORK/$name.rc"
    show "$name"
    say "train $name: exit $rc"
}
run_cp2() {  # run_cp2 NAME SEQ BATCH STEPS: torchrun ... --context-parallel NPROC
    local name=$1 seq=$2 batch=$3 steps=$4
    say "train $name: --context-parallel $NPROC, seq $seq x batch $batch, $steps steps"
    timeout "$(left_s)" torchrun --nproc-per-node "$NPROC" examples/train_lm.py "${TRAIN_ARGS[@]}" \
        --context-parallel "$NPROC" --seq-len "$seq" --batch-size "$batch" --steps "$steps" \
        --history "$WORK/$name.history.json" --summary "$WORK/$name.summary.json" >"$WORK/$name.log" 2>&1
    local rc=$?
    echo "$rc" >"$WORK/$name.rc"
    show "$name"
    say "train $name: exit $rc"
}
oom() { grep -q -E "OutOfMemoryError|CUDA out of memory" "$WORK/$1.log" 2>/dev/null; }
collect() {  # cp_train.json from what $WORK holds so far
    python3 benchmarks/cp_gpu2_collect.py --work "$WORK" --out "$OUT/cp_train.json" --mechanisms "$MECHANISMS" \
        --nproc "$NPROC" 2>&1 | tee -a "$log"
}
train() {
    rm -f "$WORK"/*.history.json "$WORK"/*.summary.json "$WORK"/*.rc "$WORK"/*.log "$WORK"/long_plan.txt
    if [ "$DEVICE" = cpu ]; then SHORT_LEN=256 SHORT_BATCH=2 SHORT_STEPS=2 LONG_STEPS=2; fi
    run_one_gpu short_1gpu "$SHORT_LEN" "$SHORT_BATCH" "$SHORT_STEPS"
    run_cp2 short_cp2 "$SHORT_LEN" "$SHORT_BATCH" "$SHORT_STEPS"
    collect
    local seq=${LONG_LEN:-}
    if [ -z "$seq" ]; then
        if [ "$DEVICE" = cpu ]; then seq=512; else
            seq=$(python3 benchmarks/cp_gpu2_collect.py --work "$WORK" --estimate-long --long-batch "$LONG_BATCH" \
                --nproc "$NPROC" 2>>"$log")
        fi
    fi
    if [ -z "$seq" ]; then say "train long: no length (the short one-GPU run left no peak memory)"; return; fi
    for attempt in 1 2 3; do
        echo "$seq" >"$WORK/long_plan.txt"
        run_cp2 long_cp2 "$seq" "$LONG_BATCH" "$LONG_STEPS"
        if oom long_cp2 && [ "$attempt" -lt 3 ]; then
            seq=$(python3 -c "print(max(4096, int($seq * 0.75) // 4096 * 4096))")
            say "train long: $NPROC GPUs ran out of memory too; trying seq $seq"
            continue
        fi
        break
    done
    run_one_gpu long_1gpu "$seq" "$LONG_BATCH" 2 "$(python3 -c "print(max(30, min(240, $(left_s) - 10)))")"
    collect
}

for part in $PARTS; do
    case $part in
        bands|sparse|issue) scaling "$part" ;;
        train) train ;;
        *) say "unknown part $part (bands, sparse, issue, train)" ;;
    esac
done
say "done; under $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
