#!/usr/bin/env bash
# The fp32 GEMM backends side by side on this machine, on the linear layers' products of one
# training step of the benchmark model (6 layers, d=384, 8 x 256 tokens; bench/blas_compare.cpp,
# each product timed on its own, and bench/gemm_step.cpp, the 18 products once each in a step's
# order, best of 4):
# pipenag's own GEMM, oneDNN's dnnl_sgemm and OpenBLAS (OpenMP build), alternating, each with
# the environment as it is (OPENBLAS_CORETYPE included). Also whether each one's results are
# bit-identical with 1 and 2 threads.
#
#   bench/blas_compare.sh [--rounds N]
set -euo pipefail
cd "$(dirname "$0")/.."
ARGS="$*"
ROUNDS=3
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) ROUNDS=$2; shift 2 ;;
    *) echo "blas_compare.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
need=()
for p in libopenblas-dev libopenblas0-openmp libdnnl-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}" >&2
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}"
fi
[ -f build/libpipenag_core.a ] || scripts/setup
out=build/bench
mkdir -p "$out"
flags=(-std=c++20 -O2 -march=native -fopenmp -w)
OB=/usr/lib/x86_64-linux-gnu/openblas-openmp
g++ "${flags[@]}" -DBACKEND_PIPENAG -Isrc bench/blas_compare.cpp build/libpipenag_core.a -ldnnl -o "$out/blas_pipenag"
g++ "${flags[@]}" -DBACKEND_DNNL bench/blas_compare.cpp -ldnnl -o "$out/blas_onednn"
g++ "${flags[@]}" -DBACKEND_OPENBLAS -isystem /usr/include/x86_64-linux-gnu/openblas-pthread \
  bench/blas_compare.cpp "$OB/libopenblas.so.0" -Wl,-rpath,"$OB" -ldl -o "$out/blas_openblas"
g++ "${flags[@]}" -DBACKEND_PIPENAG -Isrc bench/gemm_step.cpp build/libpipenag_core.a -ldnnl -o "$out/step_pipenag"
g++ "${flags[@]}" -DBACKEND_DNNL bench/gemm_step.cpp -ldnnl -o "$out/step_onednn"
g++ "${flags[@]}" -DBACKEND_OPENBLAS -isystem /usr/include/x86_64-linux-gnu/openblas-pthread \
  bench/gemm_step.cpp "$OB/libopenblas.so.0" -Wl,-rpath,"$OB" -o "$out/step_openblas"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
for r in $(seq 1 "$ROUNDS"); do
  for b in pipenag onednn openblas; do
    echo "round $r: $b" >&2
    "$out/blas_$b" --threads 1,2 --rounds 1 --no-attn | grep '^CSV' >>"$log"
    echo "STEP,$b,$("$out/step_$b" 2 4 | awk '{print $1}')" >>"$log"
  done
done
for b in pipenag onednn openblas; do
  echo "DET,$b,$("$out/blas_$b" --determinism | grep -c DIFFERS || true)" >>"$log"
done
python3 - "$log" "$ARGS" "${OPENBLAS_CORETYPE:-unset}" "${ONEDNN_MAX_CPU_ISA:-unset}" <<'PY'
import statistics, sys
t = {}
det = {}
for line in open(sys.argv[1]):
    f = line.strip().split(",")
    if f[0] == "DET":
        det[f[1]] = int(f[2]); continue
    if f[0] == "STEP":
        t.setdefault((f[1], 2, "inorder"), []).append(float(f[2]) / 1e3); continue
    _, backend, kind, threads, name = f[:5]
    secs = float(f[8])
    t.setdefault((backend, int(threads), name), []).append(secs)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
print(f"machine: {cpu}, {sum(1 for l in open('/proc/cpuinfo') if l.startswith('processor'))} cores; "
      f"OPENBLAS_CORETYPE={sys.argv[3]}, ONEDNN_MAX_CPU_ISA={sys.argv[4]}")
print("command: bench/blas_compare.sh " + sys.argv[2])
print()
flops65 = 6 * 3 * 2 * 2048 * 384 * 384 * (3 + 1 + 4 + 4) + 3 * 2 * 2048 * 384 * 65
print("| backend | 1 thread, vocab 65 (ms) | 2 threads, vocab 65 (ms) | GFLOP/s (2 threads) | 2 threads, in step order (ms) | 2 threads, vocab 50304 (ms) | 1 vs 2 threads |")
print("|---|---:|---:|---:|---:|---:|:---|")
for b in ["pipenag", "onednn", "openblas"]:
    m = lambda th, n: statistics.median(t[(b, th, n)]) * 1e3
    d = det.get(b, -1)
    print(f"| {b} | {m(1,'step65'):.0f} | {m(2,'step65'):.0f} | {flops65 / m(2,'step65') / 1e6:.0f} | "
          f"{m(2,'inorder'):.0f} | {m(2,'step50304'):.0f} | {'bit-identical' if d == 0 else f'{d} of 18 products differ'} |")
PY
