#!/usr/bin/env bash
# The portable build (PIPENAG_PORTABLE=ON: x86-64-v2 baseline, AVX2/AVX-512 chosen at run time)
# against the native one (-march=native), the two alternating on the same machine: one fp32
# training step (`pipenag bench`, 6 layers, d=384, context 256, batch 8, 2 threads), tokens/s.
#
#   bench/portable_bench.sh [--rounds N] [--steps N] [--vocab 65,50304]
set -euo pipefail
cd "$(dirname "$0")/.."
ARGS="$*"
ROUNDS=4 STEPS=5 VOCABS=65,50304
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --vocab) VOCABS=$2; shift 2 ;;
    *) echo "portable_bench.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[ -x build/pipenag ] || scripts/setup
if [ ! -x build-portable/pipenag ] || [ -n "$(find src apps CMakeLists.txt -newer build-portable/pipenag -print -quit)" ]; then
  echo "building build-portable (PIPENAG_PORTABLE=ON)" >&2
  cmake -S . -B build-portable -DCMAKE_BUILD_TYPE=Release -DPIPENAG_PORTABLE=ON -DBUILD_TESTING=OFF >/dev/null
  cmake --build build-portable --target pipenag -j"$(nproc)" >/dev/null
fi
log=$(mktemp)
trap 'rm -f "$log"' EXIT
for r in $(seq 1 "$ROUNDS"); do
  for b in build build-portable; do
    echo "round $r: $b" >&2
    "$b/pipenag" bench --json --vocab "$VOCABS" --steps "$STEPS" --warmup 2 | sed "s|^|$b |" >>"$log"
  done
done
python3 - "$log" "$ARGS" <<'PY'
import json, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    who, js = line.split(" ", 1)
    j = json.loads(js)
    rows.setdefault((j["vocab"], who), []).append(j["tokens_per_s"])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"machine: {cpu}, {sum(1 for l in open('/proc/cpuinfo') if l.startswith('processor'))} cores")
print("command: bench/portable_bench.sh " + sys.argv[2])
print()
print("| vocab | native tok/s (median) | portable tok/s (median) | portable / native |")
print("|------:|----------------------:|------------------------:|------------------:|")
for v in sorted({k[0] for k in rows}):
    n = statistics.median(rows[(v, "build")]); p = statistics.median(rows[(v, "build-portable")])
    print(f"| {v} | {n:.0f} | {p:.0f} | {p/n:.2f}x |")
PY
