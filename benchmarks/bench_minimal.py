"""minGRU / minLSTM training step against torch.nn.LSTM on long sequences, side by side in one process.

    .venv/bin/python benchmarks/bench_minimal.py --out /tmp/minimal.md     # about 5 minutes
    .venv/bin/python benchmarks/bench_minimal.py --quick                   # T = 512, seconds

A training step = zero_grad, forward over (T, B, I), loss = sum of all outputs, backward (weight
gradients filled). Contenders, all single-layer with hidden size H:
    torch.nn.LSTM       oneDNN's fused LSTM: the baseline
    MinGRU, MinLSTM     scan="blocked" (rnnkit.parallel.blocked_scan, the CPU path)
    MinGRU log          scan="log": Heinsen's log-space scan, autograd backward (the paper's form)
Timings are interleaved round-robin (common.interleaved) after a warm-up, reported as medians and
minima; the log scan, ten times slower, gets its own fewer repetitions. Peak memory of one step is
read from torch's allocator (common.peak_alloc_bytes).
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time

import torch
from common import (
    cpu_count,
    interleaved,
    machine_facts,
    peak_alloc_bytes,
    steady_allocator,
)
from script_args import check_writable, positive_int, write_report
from torch import nn

from rnnkit.minimal import MinGRU, MinLSTM


def train_step(layer: nn.Module, x: torch.Tensor):
    def step():
        layer.zero_grad(set_to_none=True)
        out, _ = layer(x)
        out.sum().backward()
    return step


def build(I: int, H: int) -> dict:
    torch.manual_seed(0)
    return {"torch.nn.LSTM": nn.LSTM(I, H), "MinGRU": MinGRU(I, H, scan="blocked"),
            "MinLSTM": MinLSTM(I, H, scan="blocked")}


def timed(steps: dict, reps: int) -> dict:
    for fn in steps.values():
        fn()
    times = interleaved(steps, reps)
    return {k: {"median": statistics.median(v), "min": min(v), "reps": len(v)} for k, v in times.items()}


def bench_point(T: int, B: int, I: int, H: int, reps: int, log_reps: int, memory: bool) -> dict:
    x = torch.randn(T, B, I)
    layers = build(I, H)
    steps = {name: train_step(layer, x) for name, layer in layers.items()}
    times = timed(steps, reps)
    if log_reps:
        log = MinGRU(I, H, scan="log")
        log.load_state_dict(layers["MinGRU"].state_dict())
        times.update(timed({"MinGRU log": train_step(log, x)}, log_reps))
    peaks = {name: peak_alloc_bytes(fn) for name, fn in steps.items()} if memory else None
    cpu = cpu_profile(steps) if memory else None
    return {"T": T, "B": B, "I": I, "H": H, "times": times, "peak_bytes": peaks, "cpu": cpu}


def cpu_profile(steps: dict) -> dict:
    """One step each: wall and CPU seconds (user + system, of this process) and minor page faults
    (first touches of fresh memory): the machine is shared, so wall > CPU; faults cost system time."""
    out = {}
    for name, fn in steps.items():
        r0, c0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        fn()
        r1, c1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        out[name] = {"wall": w1 - w0, "cpu": c1 - c0, "sys": r1.ru_stime - r0.ru_stime,
                     "faults": r1.ru_minflt - r0.ru_minflt}
    return out


def precision(T: int, I: int, H: int) -> dict:
    """Max |h - h_float64| of each scan in float32, on one random layer and input (B = 4)."""
    torch.manual_seed(1)
    x, out = torch.randn(T, 4, I), {}
    for cls in (MinGRU, MinLSTM):
        ref = cls(I, H).double()
        want = ref(x.double())[0]
        for scan in ("blocked", "log"):
            layer = cls(I, H, scan=scan)
            layer.load_state_dict(ref.state_dict())
            with torch.no_grad():
                out[f"{cls.__name__} {scan}"] = float((layer(x)[0].double() - want).abs().max())
    return out


def table(points: list[dict]) -> str:
    rows = ["| T | B | I | H | contender | step (ms), median | min | speed-up vs LSTM (median) | peak MB |",
            "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        ref = p["times"]["torch.nn.LSTM"]["median"]
        for name, t in p["times"].items():
            mem = p["peak_bytes"].get(name) if p["peak_bytes"] else None
            speed = "" if name == "torch.nn.LSTM" else f"**{ref / t['median']:.1f}x**"
            peak = "" if mem is None else f"{mem / 2**20:.0f}"
            rows.append(f"| {p['T']} | {p['B']} | {p['I']} | {p['H']} | {name} | {t['median'] * 1e3:.0f} | "
                        f"{t['min'] * 1e3:.0f} | {speed} | {peak} |")
    return "\n".join(rows)


def cpu_table(points: list[dict]) -> str:
    rows = ["| T | B | I | contender | wall (ms) | CPU (ms) | of which system (ms) | minor page faults |",
            "|---|---|---|---|---|---|---|---|"]
    for p in points:
        for name, c in (p["cpu"] or {}).items():
            rows.append(f"| {p['T']} | {p['B']} | {p['I']} | {name} | {c['wall'] * 1e3:.0f} | {c['cpu'] * 1e3:.0f} | "
                        f"{c['sys'] * 1e3:.0f} | {c['faults']} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="T = 512, few repetitions")
    ap.add_argument("--reps", type=positive_int, default=5, help="interleaved repetitions (default 5)")
    ap.add_argument("--out", help="write the markdown table here")
    ap.add_argument("--json", help="write the raw numbers here")
    ap.add_argument("--threads", type=positive_int, default=cpu_count(), help="torch.set_num_threads (default: the cores)")
    args = ap.parse_args(argv)
    check_writable(ap, args.out, args.json)
    torch.set_num_threads(args.threads)
    allocator = steady_allocator()
    T, H = (512, 256) if args.quick else (4096, 256)
    reps = 2 if args.quick else args.reps
    grid = [(8, H, 2, True), (8, 16, 2, True), (1, 16, 0, False), (32, 16, 0, False)]   # (B, I, log reps, memory)
    points = []
    for B, I, log_reps, memory in grid:
        points.append(bench_point(T, B, I, H, reps, log_reps, memory))
        print(table(points[-1:]), flush=True)
    errors = precision(T, 16, H)
    facts = machine_facts() | {"allocator": allocator}
    text = (f"Training step (forward + backward + weight gradients), one layer, float32, {args.threads} "
            "thread(s); "
            f"{reps} interleaved repetitions (the log scan: 2). Machine: {facts['cpu']}, "
            f"load average {facts['load_average']}; allocator: {allocator}.\n\n{table(points)}\n\n"
            f"One step each, CPU time and page faults:\n\n{cpu_table(points)}\n\n"
            f"float32 error at T = {T} (max |h - h_float64|, B = 4, I = 16, H = {H}): "
            + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()) + "\n")
    write_report(text, args.out, args.json, {"facts": facts, "points": points, "float32_error": errors})
    return 0


if __name__ == "__main__":
    sys.exit(main())
