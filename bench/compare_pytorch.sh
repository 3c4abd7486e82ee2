#!/usr/bin/env bash
# pipenag against PyTorch on the same machine, the two programs alternating, same workload:
# 6 layers, d=384, 6 heads, context 256, batch 8, fp32, 2 threads, one full training step
# (forward, backward, clipping, AdamW), vocab 65 and 50304. Mean tokens/s over the measured steps
# after warm-up; pipenag also reports GFLOP/s and MFU against the peak FMA rate it measures.
#
#   bench/compare_pytorch.sh [--rounds N] [--steps N] [--warmup N] [--vocab 65,50304] [--dtype fp32,bf16]
#                            [--binary PATH]   (another pipenag build, e.g. an AVX2-only one)
#
# PyTorch gets its best setup here: Debian's python3-torch with OpenBLAS's OpenMP build
# (LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/openblas-openmp), 2 threads.
set -euo pipefail
cd "$(dirname "$0")/.."
ARGS="$*"
ROUNDS=2 STEPS=10 WARMUP=3 VOCABS=65,50304 DTYPES=fp32,bf16 THREADS=2 BIN=build/pipenag
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --warmup) WARMUP=$2; shift 2 ;;
    --vocab) VOCABS=$2; shift 2 ;;
    --dtype) DTYPES=$2; shift 2 ;;
    --threads) THREADS=$2; shift 2 ;;
    --binary) BIN=$2; shift 2 ;;
    *) echo "compare_pytorch.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

need=()
for p in python3-torch libopenblas0-openmp; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi
[ -x build/pipenag ] || scripts/setup
[ -x "$BIN" ] || { echo "compare_pytorch.sh: no pipenag binary at $BIN" >&2; exit 2; }

log=$(mktemp)
trap 'rm -f "$log"' EXIT
for r in $(seq 1 "$ROUNDS"); do
  for v in ${VOCABS//,/ }; do
    echo "round $r: pipenag vocab $v" >&2
    "$BIN" bench --json --vocab "$v" --dtype "$DTYPES" --steps "$STEPS" --warmup "$WARMUP" \
      --threads "$THREADS" | sed 's/^/pipenag /' >>"$log"
    echo "round $r: pytorch vocab $v" >&2
    LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/openblas-openmp OMP_NUM_THREADS=$THREADS \
      /usr/bin/python3 bench/pytorch_gpt.py --json --vocab "$v" --steps "$STEPS" --warmup "$WARMUP" \
      --threads "$THREADS" | grep '"impl"' | sed 's/^/pytorch /' >>"$log"
  done
done

/usr/bin/python3 - "$log" "$ARGS" <<'PY'
import json, statistics, sys, platform
rows = {}
torch_tps = {}
for line in open(sys.argv[1]):
    who, js = line.split(" ", 1)
    j = json.loads(js)
    if who == "pipenag":
        rows.setdefault((j["vocab"], j["dtype"]), []).append(j)
    else:
        torch_tps.setdefault(j["vocab"], []).append(j["tokens_per_s_mean"])
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"machine: {cpu}, {sum(1 for l in open('/proc/cpuinfo') if l.startswith('processor'))} cores")
import os
env = ", ".join(f"{k}={os.environ[k]}" for k in ("OPENBLAS_CORETYPE", "ONEDNN_MAX_CPU_ISA", "PIPENAG_ISA", "PIPENAG_BF16") if k in os.environ)
print("command: bench/compare_pytorch.sh " + sys.argv[2] + (f"   (environment: {env})" if env else ""))
print()
print("| vocab | dtype | pipenag products | pipenag tok/s | PyTorch fp32 tok/s | ratio | pipenag GFLOP/s | MFU | peak GFLOP/s |")
print("|------:|:-----:|:-----------------|--------------:|-------------------:|------:|----------------:|----:|-------------:|")
for (vocab, dtype), js in sorted(rows.items(), key=lambda kv: (kv[0][1] != "fp32", kv[0][0])):
    tps = statistics.mean(j["tokens_per_s"] for j in js)
    gf = statistics.mean(j["gflops"] for j in js)
    mfu = statistics.mean(j["mfu"] for j in js)
    peak = statistics.mean(j["peak_gflops"] for j in js)
    pt = statistics.mean(torch_tps[vocab]) if vocab in torch_tps else float("nan")
    kern = js[0].get("kernels", "?")
    print(f"| {vocab} | {dtype} | {kern} | {tps:.0f} | {pt:.0f} | {tps/pt:.2f}x | {gf:.1f} | {100*mfu:.1f}% | {peak:.0f} |")
PY
