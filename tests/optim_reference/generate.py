#!/usr/bin/python3
"""Reference trajectories for tests/optim_test.cpp from PyTorch's own optimizers.

Run with Debian's Python, which has torch 1.13:
    /usr/bin/python3 tests/optim_reference/generate.py
It writes tests/optim_reference/torch_vectors.json next to itself (commit that file).

Every case: float32 parameters w0, one gradient per step, a warm-up-then-decay learning-rate
sequence, an optional gradient scale (as the C++ grad_scale argument: the gradient is multiplied by
it in float32), and after every step the parameters and the optimizer's state tensors.

Weight decay is decoupled in every pipenag optimizer (w *= 1 - lr*wd before the update).
torch.optim.AdamW does that itself; torch 1.13's NAdam and SGD only have coupled (L2) weight decay,
so for them decoupled decay is emulated by p.mul_(1 - lr*wd) before opt.step() with weight_decay=0.

NAdam runs with foreach=True: in torch 1.13 the single-tensor path computes
mu_product_next = mu_product * mu * mu_next with mu_product already multiplied by mu (mu_t counted
twice; fixed in later releases), while the multi-tensor path uses prod_{i<=t} mu_i * mu_{t+1} as in the
paper. The multi-tensor path's denominator is sqrt(v)/sqrt(1 - beta2^t) + eps.

The bits depend on torch's CPU kernels: with AVX2 kernels, x.add_(y, alpha=a) and addcmul round
once (fused multiply-add). The JSON records that (torch_fuses_multiply_add); where it holds,
optim_test requires pipenag's sgd, nag and nadamw to reproduce every bit, and otherwise (and for
adamw, whose arithmetic is pipenag's class AdamW's) agreement to 1e-6.
"""
import json
import math
import os

import torch

STEPS = 20
N = 5  # parameters per case


def lr_sequence(base):
    # Linear warm-up over 6 steps, then cosine decay to 0.1*base: varies lr every step.
    out = []
    for t in range(STEPS):
        if t < 6:
            out.append(base * (t + 1) / 6)
        else:
            p = (t - 6) / (STEPS - 6)
            out.append(base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))))
    return out


def make_data(seed):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(N, generator=g, dtype=torch.float32)
    grads = []
    for t in range(STEPS):
        gt = torch.randn(N, generator=g, dtype=torch.float32) * (1.0 + 0.5 * math.sin(t))
        gt[1] *= 1e-3          # a small-gradient coordinate, where eps matters more
        if t % 7 == 3:
            gt[2] = 0.0        # occasional zero gradient
        gt[3] += 0.5           # a consistent drift, so that momentum builds up
        grads.append(gt)
    return w0, grads


def run_case(name, optimizer, settings, seed, base_lr, grad_scale=1.0):
    w0, grads = make_data(seed)
    lrs = lr_sequence(base_lr)
    p = torch.nn.Parameter(w0.clone())
    beta1, beta2 = settings["beta1"], settings.get("beta2", 0.999)
    eps, wd = settings.get("eps", 1e-8), settings["weight_decay"]
    if optimizer == "adamw":
        opt = torch.optim.AdamW([p], lr=lrs[0], betas=(beta1, beta2), eps=eps, weight_decay=wd)
        decoupled_by_hand = False
        state_names = ["exp_avg", "exp_avg_sq"]
    elif optimizer == "nadamw":
        opt = torch.optim.NAdam([p], lr=lrs[0], betas=(beta1, beta2), eps=eps, weight_decay=0.0,
                                momentum_decay=settings["momentum_decay"], foreach=True)
        decoupled_by_hand = True
        state_names = ["exp_avg", "exp_avg_sq"]
    elif optimizer in ("sgd", "nag"):
        opt = torch.optim.SGD([p], lr=lrs[0], momentum=beta1, dampening=0.0, weight_decay=0.0,
                              nesterov=(optimizer == "nag"))
        decoupled_by_hand = True
        state_names = ["momentum_buffer"]
    else:
        raise ValueError(optimizer)

    expected = []
    with torch.no_grad():
        for t in range(STEPS):
            lr = lrs[t]
            for group in opt.param_groups:
                group["lr"] = lr
            p.grad = grads[t] * grad_scale if grad_scale != 1.0 else grads[t].clone()
            if decoupled_by_hand:
                p.mul_(1 - lr * wd)  # decoupled weight decay (torch's own is coupled)
            opt.step()
            st = opt.state[p]
            rec = {"w": p.detach().tolist()}
            for s in state_names:
                rec[s] = st[s].tolist()
            if optimizer == "nadamw":
                rec["mu_product"] = float(st["mu_product"])
            expected.append(rec)

    return {
        "name": name,
        "optimizer": optimizer,
        "settings": settings,
        "grad_scale": grad_scale,
        "w0": w0.tolist(),
        "grads": [g.tolist() for g in grads],
        "lrs": lrs,
        "expected": expected,
    }


def torch_fuses_multiply_add():
    """Whether torch's CPU kernels round x.add_(y, alpha=a) once (fma), as its AVX2 kernels do.
    The C++ optimizers reproduce those bits only where this holds (see optim_test.cpp)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g, dtype=torch.float32)
    y = torch.randn(4096, generator=g, dtype=torch.float32)
    a = 0.1
    got = x.clone().add_(y, alpha=a)
    # float32 fma via float64: the product of two floats is exact in a double.
    fused = (x.double() + y.double() * torch.tensor(a, dtype=torch.float32).double()).float()
    return bool(torch.equal(got, fused))


def cpu_capability():
    for line in torch.__config__.show().splitlines():
        if "CPU capability usage" in line:
            return line.split(":", 1)[1].strip()
    return "unknown"


def main():
    torch.set_num_threads(1)
    cases = [
        run_case("adamw_wd", "adamw",
                 {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1}, 1, 1e-2),
        run_case("adamw_nowd_scaled", "adamw",
                 {"beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.0}, 2, 3e-2, 0.7),
        run_case("nadamw_wd", "nadamw",
                 {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.1,
                  "momentum_decay": 0.004}, 3, 1e-2),
        run_case("nadamw_nowd", "nadamw",
                 {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
                  "momentum_decay": 0.004}, 4, 1e-2),
        # The paper's setting (beta1 0.99), with a fast momentum ramp so that mu_t moves a lot.
        run_case("nadamw_paper_fast_psi", "nadamw",
                 {"beta1": 0.99, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.01,
                  "momentum_decay": 4.0}, 5, 3e-2, 0.7),
        run_case("sgd_wd", "sgd", {"beta1": 0.9, "weight_decay": 0.1}, 6, 5e-2),
        run_case("nag_wd", "nag", {"beta1": 0.9, "weight_decay": 0.1}, 7, 5e-2),
    ]
    # Debian's python3-torch 1.13.1 reports __version__ "1.13.0a0".
    out = {"torch_version": torch.__version__, "torch_cpu_capability": cpu_capability(),
           "torch_fuses_multiply_add": torch_fuses_multiply_add(), "steps": STEPS, "cases": cases}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_vectors.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=None, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {path} (torch {torch.__version__}, {out['torch_cpu_capability']}, "
          f"fused multiply-add {out['torch_fuses_multiply_add']}, {len(cases)} cases)")


if __name__ == "__main__":
    main()
