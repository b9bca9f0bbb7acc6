#!/usr/bin/env bash
# `make device-check`: check and time the project on one GPU node in one command, with no network.
#
# Stages, each under `timeout` (its cap or what is left of DEVICE_CHECK_BUDGET_S, the less); a stage
# that fails or runs out of time is recorded and the next one still runs:
#   setup   when Composer and the rest are not importable, install the wheelhouse (.whl/, filled by
#           `make wheelhouse`) into a temporary folder put on PYTHONPATH; the project comes from the tree
#   env     versions, the device, nvidia-smi
#   data    the embedded default corpus sharded (CPU, in the background while the GPU tests run)
#   tests   the `gpu`-marked tests
#   bench   benchmarks.bench_gpu for every attention backend that can train here, compiled and eager:
#           the training configuration (auto backend, compiled) first, and profiled (its top operators
#           by device time in the log and the result) and its optimizer implementations timed against
#           each other, the others after the Composer run, and last the training configuration at 96
#           rows per step instead of 32 (when time is left)
#   train   yamls/modernbert-base/pretrain.yaml for 50 batches of 32 x 1024 tokens, bf16, compiled when
#           the compiled benchmark ran (a step that compiles again fails it fast; eager training instead);
#           batches 31-33 profiled whole (the `profile` key; outside the final 10-batch window whose
#           throughput is reported): the device's idle share and host reads per batch, against the bench's
#           bare step
#   vs-hf   benchmarks.bench_hf_gpu: our step against transformers' ModernBERT at its best (sparse
#           prediction, sdpa, eager and compiled), the same weights and padded batches, alternating rounds
# Without CUDA the same stages run as a dry run (CI runs it): tiny preset, 128 tokens, fp32, a few steps,
# eager only (inductor takes minutes to compile even the tiny model on a 2-core CPU).
#
# OUT (default runs/device-check) gets: device-check.log (this time line), stages.log (every stage's
# output, in order: a device machine sends back at most 8 files, so the stages share one log), env.txt,
# metrics.jsonl (the Composer run's) and the result JSON, also written to benchmarks/results/ on a GPU:
# <device>-<date>.json. The CPU dry run's is device-check-cpu-<date>.json, in OUT only
# (benchmarks/results/cpu-<date>.json is `make bench`'s).
set -uo pipefail  # no -e: a failing stage is recorded, not fatal

cd "$(dirname "$0")/.."
REPO=$PWD
PY=${DEVICE_CHECK_PYTHON:-python3}
BUDGET_S=${DEVICE_CHECK_BUDGET_S:-470}
MIN_STAGE_S=20  # a stage is skipped rather than started with less time than this
OUT=${OUT:-runs/device-check}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/device-check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT  # shards, checkpoint and installed wheels: what matters is copied to OUT
mkdir -p "$WORK/logs" "$WORK/bench"
rm -f "$OUT/device-check.log" "$OUT/stages.log" "$OUT/env.txt" "$OUT/metrics.jsonl"
START=$SECONDS
# TORCH_LOGS: every recompilation and its reason goes to the log.
export WANDB_MODE=offline TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TORCH_LOGS=recompiles

say() { printf '[device-check %3ds] %s\n' "$((SECONDS - START))" "$*" | tee -a "$OUT/device-check.log"; }

report() {
    "$PY" -m benchmarks.device_check report "$WORK" "$OUT" --budget "$BUDGET_S" --elapsed "$((SECONDS - START))" "$@"
}

# stage NAME CAP_S COMMAND...: runs COMMAND, its output to WORK/logs/NAME.log and (unless NAME is data,
# which runs in the background) to OUT/stages.log as it comes; its outcome goes to WORK/stages.jsonl.
stage() {
    local name=$1 cap=$2 shared=$OUT/stages.log
    shift 2
    [[ $name == data ]] && shared=/dev/null
    local left=$((BUDGET_S - (SECONDS - START)))
    local limit=$((cap < left ? cap : left)) started=$SECONDS status rc
    if ((limit < MIN_STAGE_S)); then
        status=skipped rc=0
        say "$name: skipped, ${left}s of the ${BUDGET_S}s budget left"
    else
        say "$name: ${limit}s at most: $*"
        echo "==== $name: $*" >>"$shared"
        timeout -k 10 "$limit" "$@" 2>&1 | tee -a "$shared" >"$WORK/logs/$name.log"
        rc=${PIPESTATUS[0]}
        case $rc in
            0) status=ok ;;
            124 | 137) status=timeout ;;
            *) status=failed ;;
        esac
        say "$name: $status in $((SECONDS - started))s"
        [[ $status == ok ]] || tail -n 15 "$WORK/logs/$name.log" | sed 's/^/    /'
    fi
    printf '{"stage": "%s", "status": "%s", "seconds": %d, "exit_code": %d}\n' \
        "$name" "$status" "$((SECONDS - started))" "$rc" >>"$WORK/stages.jsonl"
    report
}

say "budget ${BUDGET_S}s, $("$PY" --version 2>&1) ($PY), OUT=$OUT"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# find_spec, not import: importing Composer alone takes seconds.
if "$PY" -c "import importlib.util as u, sys; sys.exit(any(not u.find_spec(m) for m in sys.argv[1:]))" \
    composer streaming omegaconf optimi zstandard; then
    say "setup: Composer, streaming and the rest import already; the wheelhouse is not needed"
else
    stage setup 120 "$PY" -m benchmarks.device_check install-wheels "$REPO/.whl" "$WORK/site"
    export PYTHONPATH="$PYTHONPATH:$WORK/site"
fi
stage env 90 "$PY" -m benchmarks.device_check env "$WORK" "$OUT"
if [[ ! -f $WORK/env.sh ]]; then
    say "env failed: nothing else can run"
    report --print
    exit 1
fi
source "$WORK/env.sh"

if [[ $DEVICE_KIND == cuda ]]; then
    BENCH=(--device cuda --preset base --seq-len 1024 --rows 32 --warmup 3 --steps 10)
    CORPUS=(--max-bytes 12000000)  # ~3M tokens: 50 batches of 32 x 1024 fit in one pass
    TRAIN=(max_duration=50ba global_train_batch_size=32 device_train_microbatch_size=32 precision=amp_bf16
        data.num_workers=4 log_interval=10ba speed_window=10 scheduler.t_warmup=10ba
        model.overrides.vocab_size=50368  # base's vocabulary, not the corpus tokenizer's 8k: base's FLOPs
        profile.start_batch=31 profile.batches=3)  # before the last row's 10-batch throughput window
    # Ours compiled and eager vs transformers' sdpa eager and compiled (flex_attention: slower, and its
    # compilation alone outlasts the stage), fixed and variable row lengths, same weights and batches.
    VERSUS=(--preset base --seq-len 1024 --rows 32 --rounds 10 --warmup 3)
    COMPILED_BENCH=true BIG_ROWS=96
    CAP_DATA=180 CAP_TESTS=90 CAP_EAGER=60 CAP_COMPILED=150 CAP_TRAIN=180 CAP_VERSUS=200 CAP_OPTIMIZERS=150
    OPTIMIZER_ROUNDS=4  # 5 variants x (2 warmup + 4 rounds x 3 steps) at ~0.1 s: about 7 s
else
    BENCH=(--device cpu --preset tiny --seq-len 128 --rows 4 --warmup 1 --steps 3)
    CORPUS=(--max-bytes 500000 --vocab-size 1024)
    TRAIN=(max_duration=4ba global_train_batch_size=8 device_train_microbatch_size=8 precision=fp32
        model.preset=tiny data.max_seq_len=128 data.num_workers=1 log_interval=1ba speed_window=2
        scheduler.t_warmup=1ba profile.start_batch=3 profile.batches=2)
    VERSUS=(--device cpu --preset tiny --seq-len 128 --rows 4 --rounds 2 --warmup 1 --eager-only)
    COMPILED_BENCH=false BIG_ROWS=8
    CAP_DATA=120 CAP_TESTS=120 CAP_EAGER=90 CAP_TRAIN=180 CAP_VERSUS=120 CAP_OPTIMIZERS=120
    OPTIMIZER_ROUNDS=1
fi

bench() {  # bench BACKEND eager|compiled [ROWS]
    local flags=() cap=$CAP_EAGER MIN_STAGE_S=$MIN_STAGE_S mode=$2
    # A compiled benchmark needs 50-70 s for base on an H200: with less left it is skipped, not cut short.
    [[ $2 == compiled ]] && flags=(--compile) cap=$CAP_COMPILED MIN_STAGE_S=80
    if [[ -n ${3:-} ]]; then  # another micro-batch: its rows after BENCH's
        flags+=(--rows "$3") mode=$2-r$3
    elif [[ $1 == "$AUTO_BACKEND" && ($2 == compiled || $COMPILED_BENCH == false) ]]; then
        # The training configuration is profiled too: where its step's time goes, operator by operator,
        # and its optimizer implementations compared (optimizer.impl: optimi's Triton kernels against ours).
        flags+=(--profile 3 --compare-optimizers "$OPTIMIZER_ROUNDS")
    fi
    stage "bench-$1-$mode" "$cap" "$PY" -m benchmarks.bench_gpu "${BENCH[@]}" --backend "$1" "${flags[@]}" \
        --output "$WORK/bench/$1-$mode.json"
}

stage data "$CAP_DATA" "$PY" -m data_prep.default_corpus --output "$WORK/data" "${CORPUS[@]}" &
DATA_PID=$!
mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py)
stage tests "$CAP_TESTS" "$PY" -m pytest -q -p no:cacheprovider -m gpu --junitxml="$WORK/tests.xml" "${GPU_TESTS[@]}"
# The training configuration first: its compiled kernels are cached for the Composer run.
$COMPILED_BENCH && bench "$AUTO_BACKEND" compiled
COMPILE=false
if [[ -f $WORK/bench/$AUTO_BACKEND-compiled.json ]]; then
    COMPILE=true
elif $COMPILED_BENCH; then
    say "train: eager, since bench-$AUTO_BACKEND-compiled did not run through"
fi
wait "$DATA_PID"
cat "$WORK/logs/data.log" >>"$OUT/stages.log"
stage train "$CAP_TRAIN" "$PY" -m modernbert_train.train yamls/modernbert-base/pretrain.yaml \
    run_name=device-check "save_folder=$WORK/train" save_interval=1000ba autoresume=false \
    "data.train=[{local: $WORK/data/train}]" "data.eval=[]" data.batch_size_warmup.start=0 \
    progress_bar=false loggers.wandb=null "model.compile=$COMPILE" \
    "${TRAIN[@]}"
[[ -f $WORK/train/metrics.jsonl ]] && cp "$WORK/train/metrics.jsonl" "$OUT/metrics.jsonl"
# The comparison stops starting configurations in time to save what it measured within the stage's limit.
LEFT=$((BUDGET_S - (SECONDS - START)))
VERSUS_BUDGET=$(((CAP_VERSUS < LEFT ? CAP_VERSUS : LEFT) - 15))
stage vs-hf "$CAP_VERSUS" "$PY" -m benchmarks.bench_hf_gpu "${VERSUS[@]}" --budget-s "$VERSUS_BUDGET" \
    --output "$WORK/vs-hf.json"
# optimizer.compile: the training configuration's step once more (its kernels cached by the first bench),
# then the optimizers compared again, foreach compiled among them (compiling it takes this stage's time).
OPTIMIZER_FLAGS=()
[[ $COMPILED_BENCH == true && -f $WORK/bench/$AUTO_BACKEND-compiled.json ]] && OPTIMIZER_FLAGS=(--compile)
MIN_STAGE_S=60 stage optimizers "$CAP_OPTIMIZERS" "$PY" -m benchmarks.bench_gpu "${BENCH[@]}" \
    --backend "$AUTO_BACKEND" "${OPTIMIZER_FLAGS[@]}" --compare-optimizers "$OPTIMIZER_ROUNDS" \
    --with-compiled-optimizer --output "$WORK/optimizers.json"
for backend in $BACKENDS; do
    bench "$backend" eager
done
for backend in $BACKENDS; do
    $COMPILED_BENCH && [[ $backend != "$AUTO_BACKEND" ]] && bench "$backend" compiled
done
# The training configuration at a larger micro-batch (ModernBERT's own runs used 96 x 1024 per GPU): how
# much of the gap to the MFU target the micro-batch alone closes. Last: skipped when the budget is spent.
if $COMPILED_BENCH; then bench "$AUTO_BACKEND" compiled "$BIG_ROWS"; else bench "$AUTO_BACKEND" eager "$BIG_ROWS"; fi

say "done"
report --print | tee -a "$OUT/device-check.log"
grep -q '"status": "\(failed\|timeout\)"' "$WORK/stages.jsonl" && exit 1
exit 0
