#!/usr/bin/env python3
"""The PyTorch peer of pipenag's model, for side-by-side training-throughput benchmarks.

A nanoGPT-style decoder: token embedding (V,C) + learned position embedding (T,C); n_layer
pre-LayerNorm blocks x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)); causal multi-head attention
with a bias-free qkv Linear(C,3C) and a biased output Linear(C,C); MLP Linear(C,4C) -> ReLU ->
Linear(4C,C); final LayerNorm; untied lm_head Linear(C,V,bias=True). Init N(0,0.02) weights,
zero biases. Loss F.cross_entropy over (B*T,V). AdamW(lr 3e-4, betas (0.9,0.999), eps 1e-8,
weight_decay 0.01), grad-norm clipping at 1.0. Random tokens from a seeded generator.

The benchmark uses that default model; GPT and build_model(cfg) also take activation="gelu" (exact
erf GELU, nn.GELU()) and tie_embeddings=True, and the parameter names are pipenag's checkpoint
names (docs/FORMATS.md), so bench/torch_checkpoint_check.py imports this file to load a checkpoint.

One timed step = zero_grad + forward + backward + clip_grad_norm_ + optimizer.step.

Run it the way a user would give PyTorch its best setup (see docs/BLAS.md):
  LD_LIBRARY_PATH=/usr/lib/x86_64-linux-gnu/openblas-openmp OMP_NUM_THREADS=2 \
      /usr/bin/python3 bench/pytorch_gpt.py --vocab 65 --threads 2 --json
(/usr/bin/python3 is Debian's, which has python3-torch 1.13.1; Debian's torch calls the BLAS that
libblas.so.3 resolves to, the pthread OpenBLAS by default.)
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


def loaded_blas():
    """Shared libraries mapped into this process that look like a BLAS (from /proc/self/maps)."""
    libs = set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1] if len(line.split()) >= 6 else ""
                name = os.path.basename(path)
                if any(s in name for s in ("blas", "blis", "mkl", "dnnl", "gomp", "iomp")):
                    libs.add(path)
    except OSError:
        pass
    return sorted(libs)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, block_size, attn_impl):
        super().__init__()
        assert n_embd % n_head == 0
        self.n_head = n_head
        self.n_embd = n_embd
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=True)
        self.attn_impl = attn_impl
        tril = torch.tril(torch.ones(block_size, block_size, dtype=torch.bool))
        self.register_buffer("mask", tril.view(1, 1, block_size, block_size), persistent=False)
        additive = torch.zeros(block_size, block_size).masked_fill(~tril, float("-inf"))
        self.register_buffer("additive_mask", additive, persistent=False)

    def forward(self, x):
        B, T, C = x.size()
        nh, hs = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, nh, hs).transpose(1, 2)
        v = v.view(B, T, nh, hs).transpose(1, 2)
        scale = 1.0 / math.sqrt(hs)
        if self.attn_impl == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.attn_impl == "sdpa_private":  # torch 1.13's private prototype
            y = F._scaled_dot_product_attention(q, k, v, None, 0.0, False, True)[0]
        elif self.attn_impl == "baddbmm":
            # scale and causal mask fused into one batched GEMM: att = mask + scale * q @ k^T
            qf = q.reshape(B * nh, T, hs)
            kf = k.reshape(B * nh, T, hs)
            att = torch.baddbmm(self.additive_mask[:T, :T].expand(B * nh, T, T), qf, kf.transpose(1, 2),
                                beta=1.0, alpha=scale)
            att = F.softmax(att, dim=-1)
            y = torch.bmm(att, v.reshape(B * nh, T, hs)).view(B, nh, T, hs)
        else:  # "manual": nanoGPT's masked softmax
            att = (q @ k.transpose(-2, -1)) * scale
            att = att.masked_fill(~self.mask[:, :, :T, :T], float("-inf"))
            att = F.softmax(att, dim=-1)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd, activation="relu"):
        super().__init__()
        if activation not in ("relu", "gelu"):
            raise ValueError(f"activation must be relu or gelu, not {activation!r}")
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=True)
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=True)
        self.act = nn.ReLU() if activation == "relu" else nn.GELU()  # exact erf GELU, as pipenag's

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, block_size, attn_impl, activation="relu"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block_size, attn_impl)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd, activation)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class TiedHead(nn.Module):
    """The output layer with tie_embeddings: only its bias is its own (lm_head.bias); the weight is
    transformer.wte.weight, passed in by GPT.forward."""

    def __init__(self, vocab):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, x, weight):
        return F.linear(x, weight, self.bias)


class GPT(nn.Module):
    """Parameter names are pipenag's checkpoint names (docs/FORMATS.md): transformer.wte,
    transformer.wpe, transformer.h.<i>.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj},
    transformer.ln_f, lm_head (only lm_head.bias with tie_embeddings)."""

    def __init__(self, vocab, block_size, n_layer, n_head, n_embd, attn_impl, activation="relu",
                 tie_embeddings=False):
        super().__init__()
        self.block_size = block_size
        self.tie_embeddings = tie_embeddings
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            h=nn.ModuleList([Block(n_embd, n_head, block_size, attn_impl, activation)
                             for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd),
        ))
        self.lm_head = TiedHead(vocab) if tie_embeddings else nn.Linear(n_embd, vocab, bias=True)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        """Mean cross-entropy over (B*T) when targets are given, else the logits (B, T, V)."""
        B, T = idx.size()
        tr = self.transformer
        pos = torch.arange(T, dtype=torch.long, device=idx.device)
        x = tr.wte(idx) + tr.wpe(pos)
        for block in tr.h:
            x = block(x)
        x = tr.ln_f(x)
        logits = self.lm_head(x, tr.wte.weight) if self.tie_embeddings else self.lm_head(x)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def build_model(cfg, attn_impl="manual"):
    """The GPT of a pipenag configuration: cfg is the "config" object of a checkpoint's
    state.json, or just its "model" section (n_layer, n_embd, n_head, block_size, vocab_size,
    activation, tie_embeddings)."""
    m = cfg.get("model", cfg)
    return GPT(int(m["vocab_size"]), int(m["block_size"]), int(m["n_layer"]), int(m["n_head"]),
               int(m["n_embd"]), attn_impl, activation=m.get("activation", "relu"),
               tie_embeddings=bool(m.get("tie_embeddings", False)))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-layer", type=int, default=6)
    p.add_argument("--n-embd", type=int, default=384)
    p.add_argument("--n-head", type=int, default=6)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--vocab", type=int, default=65)
    p.add_argument("--steps", type=int, default=10, help="measured steps")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured steps before them")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--attn", default="auto", choices=["auto", "manual", "baddbmm", "sdpa", "sdpa_private"],
                   help="attention core; auto = sdpa if this torch has F.scaled_dot_product_attention, "
                        "else baddbmm (the fastest measured on torch 1.13, docs/BLAS.md)")
    p.add_argument("--no-mkldnn", action="store_true", help="torch.backends.mkldnn.enabled = False")
    p.add_argument("--autocast-bf16", action="store_true",
                   help="experiment only (not the fp32 peer): forward under torch.autocast('cpu', bfloat16)")
    p.add_argument("--json", action="store_true", help="one JSON line per measured step + a summary line")
    args = p.parse_args()

    attn = args.attn
    if attn == "auto":
        attn = "sdpa" if hasattr(F, "scaled_dot_product_attention") else "baddbmm"
    if attn == "sdpa" and not hasattr(F, "scaled_dot_product_attention"):
        sys.exit(f"torch {torch.__version__} has no F.scaled_dot_product_attention")
    if attn == "sdpa_private" and not hasattr(F, "_scaled_dot_product_attention"):
        sys.exit(f"torch {torch.__version__} has no F._scaled_dot_product_attention")

    torch.set_num_threads(args.threads)
    if args.no_mkldnn:
        torch.backends.mkldnn.enabled = False
    torch.manual_seed(args.seed)
    model = GPT(args.vocab, args.block_size, args.n_layer, args.n_head, args.n_embd, attn)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    gen = torch.Generator().manual_seed(args.seed)
    B, T = args.batch_size, args.block_size
    total = args.warmup + args.steps
    batches = [(torch.randint(0, args.vocab, (B, T), generator=gen),
                torch.randint(0, args.vocab, (B, T), generator=gen)) for _ in range(min(total, 4))]

    times, losses = [], []
    for i in range(total):
        x, y = batches[i % len(batches)]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if args.autocast_bf16:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(x, y)
        else:
            loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(loss.item())  # after the timed region (the step itself has synchronised)
        if i < args.warmup:
            continue
        times.append(dt)
        if args.json:
            print(json.dumps({"step": i - args.warmup, "seconds": dt, "tokens_per_s": B * T / dt}), flush=True)
        else:
            print(f"step {i - args.warmup:3d}  {dt * 1e3:8.1f} ms  {B * T / dt:9.1f} tok/s  loss {losses[-1]:.4f}")

    tps = [B * T / t for t in times]
    summary = {
        "impl": "pytorch",
        "vocab": args.vocab,
        "tokens_per_s_mean": statistics.mean(tps),
        "tokens_per_s_median": statistics.median(tps),
        "torch": torch.__version__,
        "threads": args.threads,
        "attn": attn,
        "step_seconds_median": statistics.median(times),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "mkldnn": torch.backends.mkldnn.enabled,
        "autocast_bf16": args.autocast_bf16,
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability()
        if hasattr(torch.backends, "cpu") and hasattr(torch.backends.cpu, "get_cpu_capability") else None,
        "blas": loaded_blas(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "ld_library_path": os.environ.get("LD_LIBRARY_PATH"),
    }
    if args.json:
        print(json.dumps(summary), flush=True)
    else:
        for k, v in summary.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
