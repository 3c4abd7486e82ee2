#!/usr/bin/env python3
"""Check that a pipenag checkpoint loads into PyTorch and is the same model there.

  /usr/bin/python3 bench/torch_checkpoint_check.py --checkpoint out/default/checkpoint \\
      [--pipenag build/pipenag] [--prompt "The "] [--tokens 40] [--text FILE]

(/usr/bin/python3 is Debian's, with python3-torch; the `safetensors` package is not needed.)

1. Reads <checkpoint>/model.safetensors with the standard library (8-byte little-endian header
   length N, N bytes of JSON header, then the data) and <checkpoint>/state.json ("config").
2. Builds the model of bench/pytorch_gpt.py from config.model (build_model) and loads the tensors
   with load_state_dict(strict=True): the names must be exactly pipenag's (docs/FORMATS.md),
   nothing missing, nothing extra, every shape equal.
3. Greedy generation in PyTorch, float32, the way src/train/sample.cpp does it: the prompt's bytes
   are the first tokens (an empty prompt is "\\n"), the context is the last block_size tokens,
   the next token is the argmax of the last position's logits.
4. Runs `<pipenag> sample --checkpoint DIR --prompt P --tokens N --temperature 0` and compares
   the two token sequences (pipenag prints tokens >= 256 as '?', so PyTorch's are mapped the same).
5. Prints PyTorch's mean cross-entropy (nats) on a fixed window: the first block_size+1 bytes of
   --text, else of the checkpoint's data.input (the file, or the first .txt of the folder by name),
   else of a built-in sentence.

Exit status 0 only when the generated sequences are identical; 1 when they differ (the first
differing position is printed, with PyTorch's top-2 logit margin there); 2 on a usage or load error.
"""
import argparse
import json
import math
import os
import struct
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import torch  # noqa: E402

from pytorch_gpt import build_model  # noqa: E402

DTYPES = {"F32": torch.float32, "F64": torch.float64, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool}

FALLBACK_TEXT = (b"Fellow-Citizens of the Senate and House of Representatives: the state of the union is "
                 b"sound, and the people of the several States look to the Congress for peace, trade "
                 b"and the public good. ") * 64


def fail(msg):
    print(f"torch_checkpoint_check: {msg}", file=sys.stderr)
    sys.exit(2)


def load_safetensors(path):
    """{name: tensor} and the __metadata__ dict of a safetensors file, with the standard library."""
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8:
        fail(f"{path}: shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", raw[:8])
    if 8 + n > len(raw):
        fail(f"{path}: header length {n} runs past the end of the file ({len(raw)} bytes)")
    header = json.loads(raw[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {}) or {}
    data = memoryview(bytearray(raw[8 + n:]))  # writable copy: torch.frombuffer warns on read-only
    tensors = {}
    for name, info in header.items():
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            fail(f"{path}: tensor {name}: unsupported dtype {info['dtype']}")
        b, e = info["data_offsets"]
        shape = list(info["shape"])
        count = math.prod(shape)
        itemsize = torch.tensor([], dtype=dtype).element_size()
        if not (0 <= b <= e <= len(data)) or e - b != count * itemsize:
            fail(f"{path}: tensor {name}: data_offsets {b},{e} do not fit shape {shape} {info['dtype']}")
        t = torch.frombuffer(data[b:e], dtype=dtype) if count else torch.empty(0, dtype=dtype)
        tensors[name] = t.view(shape).clone()
    return tensors, meta


@torch.no_grad()
def greedy(model, prompt_tokens, n, block_size):
    """Token list (prompt + n generated) and the smallest top-1/top-2 logit gap seen."""
    seq = list(prompt_tokens) or [ord("\n")]
    min_margin = float("inf")
    for _ in range(n):
        ctx = torch.tensor([seq[-block_size:]], dtype=torch.long)
        logits = model(ctx)[0, -1]
        top = torch.topk(logits, 2).values
        min_margin = min(min_margin, (top[0] - top[1]).item())
        seq.append(int(torch.argmax(logits).item()))  # first maximum, as std::max_element
    return seq, min_margin


@torch.no_grad()
def margin_at(model, seq, pos, block_size):
    """PyTorch's top-2 tokens and logits for predicting seq[pos]."""
    ctx = torch.tensor([seq[max(0, pos - block_size):pos]], dtype=torch.long)
    v, i = torch.topk(model(ctx)[0, -1], 2)
    return [(int(i[k]), float(v[k])) for k in range(2)]


def window_source(args, cfg):
    if args.text:
        return args.text
    inp = cfg.get("data", {}).get("input", "")
    for cand in ([inp, os.path.join(ROOT, inp)] if inp else []):
        if os.path.isfile(cand):
            return cand
        if os.path.isdir(cand):
            txts = sorted(f for f in os.listdir(cand) if f.endswith(".txt")
                          and os.path.isfile(os.path.join(cand, f)))
            if txts:
                return os.path.join(cand, txts[0])
    return None


def show(tokens):
    return bytes(t if t < 256 else ord("?") for t in tokens).decode("utf-8", "replace")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True, help="pipenag checkpoint folder")
    p.add_argument("--pipenag", default=os.path.join(ROOT, "build", "pipenag"),
                   help="the pipenag binary (default: build/pipenag of this repository)")
    p.add_argument("--prompt", default="The ", help="text to continue (default 'The ')")
    p.add_argument("--tokens", type=int, default=40, help="tokens to generate (default 40)")
    p.add_argument("--text", help="text file whose first block_size+1 bytes give the loss window")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args()
    if args.tokens < 0:
        fail("--tokens must be >= 0")
    torch.set_num_threads(args.threads)

    ck = args.checkpoint
    try:
        with open(os.path.join(ck, "state.json")) as f:
            state = json.load(f)
    except (OSError, ValueError) as e:
        fail(f"{ck}/state.json: {e}")
    cfg = state["config"]
    m = cfg["model"]
    tensors, meta = load_safetensors(os.path.join(ck, "model.safetensors"))
    model = build_model(cfg, attn_impl="manual").float().eval()
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        fail(f"load_state_dict(strict=True) failed: {e}")
    nparams = sum(t.numel() for t in tensors.values())
    print(f"checkpoint: {ck} (step {state.get('step')}, metadata {meta})")
    print(f"model: n_layer {m['n_layer']}, n_embd {m['n_embd']}, n_head {m['n_head']}, block_size "
          f"{m['block_size']}, vocab {m['vocab_size']}, {m['activation']}, tie_embeddings "
          f"{str(m['tie_embeddings']).lower()}; {len(tensors)} tensors, {nparams} parameters")
    print(f"load_state_dict(strict=True): ok, torch {torch.__version__}")

    T = int(m["block_size"])
    V = int(m["vocab_size"])
    if V < 256:
        fail("model vocabulary is smaller than 256 bytes: pipenag sample needs byte tokens")

    # Loss on a fixed window.
    src = window_source(args, cfg)
    if src:
        with open(src, "rb") as f:
            window = f.read(T + 1)
    else:
        src, window = "built-in text", FALLBACK_TEXT[:T + 1]
    if len(window) < 2:
        fail(f"{src}: fewer than 2 bytes for the loss window")
    w = torch.tensor(list(window), dtype=torch.long)
    with torch.no_grad():
        loss = model(w[:-1].unsqueeze(0), w[1:].unsqueeze(0)).item()
    print(f"pytorch cross-entropy: {loss:.6f} nats (ppl {math.exp(loss):.3f}) on the first "
          f"{len(window) - 1} targets of {src}; uniform would be {math.log(V):.6f}")

    # Greedy generation, both sides.
    prompt_bytes = os.fsencode(args.prompt)
    ours, min_margin = greedy(model, prompt_bytes, args.tokens, T)
    cmd = [args.pipenag, "sample", "--checkpoint", ck, "--prompt", args.prompt,
           "--tokens", str(args.tokens), "--temperature", "0"]
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    except OSError as e:
        fail(f"cannot run {args.pipenag}: {e}")
    if r.returncode != 0:
        fail(f"pipenag sample exited {r.returncode}: {r.stderr.decode('utf-8', 'replace').strip()}")
    out = r.stdout[:-1] if r.stdout.endswith(b"\n") else r.stdout  # printf("%s\n")
    theirs = list(out)
    ours_b = [t if t < 256 else ord("?") for t in ours]
    n_prompt = len(prompt_bytes) or 1
    print(f"pytorch: {show(ours)!r}")
    print(f"pipenag: {show(theirs)!r}")
    print(f"generated {len(ours) - n_prompt} tokens after a {n_prompt}-token prompt; smallest top-2 "
          f"logit gap in PyTorch's generation: {min_margin:.3g}")
    if ours_b == theirs:
        print("identical: the greedy token sequences of PyTorch and pipenag match")
        return 0
    pos = next((i for i, (a, b) in enumerate(zip(ours_b, theirs)) if a != b), min(len(ours_b), len(theirs)))
    a = ours_b[pos] if pos < len(ours_b) else None
    b = theirs[pos] if pos < len(theirs) else None
    print(f"DIFFERENT: first difference at position {pos} (generated token {pos - n_prompt}): "
          f"pytorch {a}, pipenag {b}; lengths {len(ours_b)} and {len(theirs)}")
    if n_prompt <= pos <= len(ours) and pos < len(theirs):
        print(f"  pytorch's top-2 there given pipenag's prefix: {margin_at(model, theirs, pos, T)}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
