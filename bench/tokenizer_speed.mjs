// The JavaScript side of bench/tokenizer_speed.sh: encodes every document of a corpus folder
// (the *.txt files, sorted by name, one encode call per document) with the npm `tiktoken`
// package (WASM build of OpenAI's tokenizer, get_encoding("gpt2")) and, for comparison, the
// pure-JavaScript `gpt-tokenizer` (r50k_base = GPT-2). One line per tokenizer:
//   RESULT <name> <bytes> <tokens> <fnv1a-32 of all ids> <best seconds> <MB/s>
// (MB = 10^6 bytes of UTF-8 text; best of --reps timed passes after one warm-up pass).
//
//   node bench/tokenizer_speed.mjs <npm dir> <corpus dir> [reps] [only]
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";

const [npmDir, corpusDir, repsArg, only] = process.argv.slice(2);
if (!npmDir || !corpusDir) {
  console.error("usage: node tokenizer_speed.mjs <npm dir> <corpus dir> [reps] [only]");
  process.exit(2);
}
const reps = Number(repsArg || 3);
const require = createRequire(path.join(path.resolve(npmDir), "package.json"));

const files = fs.readdirSync(corpusDir).filter((f) => f.endsWith(".txt")).sort();
const docs = files.map((f) => fs.readFileSync(path.join(corpusDir, f), "utf8"));
const bytes = docs.reduce((n, d) => n + Buffer.byteLength(d, "utf8"), 0);

function fnv(ids, h) {
  for (let i = 0; i < ids.length; i++) {
    const v = ids[i];
    for (let k = 0; k < 32; k += 8) {
      h ^= (v >>> k) & 0xff;
      h = Math.imul(h, 16777619) >>> 0;
    }
  }
  return h;
}

function bench(name, encode) {
  let tokens = 0;
  let h = 2166136261;
  for (const d of docs) {  // warm-up pass, also the checksum
    const ids = encode(d);
    tokens += ids.length;
    h = fnv(ids, h);
  }
  let best = Infinity;
  for (let r = 0; r < reps; r++) {
    const t0 = process.hrtime.bigint();
    let n = 0;
    for (const d of docs) n += encode(d).length;
    const s = Number(process.hrtime.bigint() - t0) / 1e9;
    if (n !== tokens) throw new Error(`${name}: token count changed between passes`);
    best = Math.min(best, s);
  }
  console.log(`RESULT ${name} ${bytes} ${tokens} ${h.toString(16).padStart(8, "0")} ` +
              `${best.toFixed(4)} ${(bytes / best / 1e6).toFixed(2)}`);
}

if (!only || only === "tiktoken") {
  const { get_encoding } = require("tiktoken");
  const enc = get_encoding("gpt2");
  bench("tiktoken", (d) => enc.encode_ordinary(d));
  enc.free();
}
if (!only || only === "gpt-tokenizer") {
  const { encode } = require("gpt-tokenizer/cjs/encoding/r50k_base");
  bench("gpt-tokenizer", (d) => encode(d, { disallowedSpecial: new Set() }));
}
