"""The engine's fused CPU kernel (rnnkit/_fused) against the pure-torch engine and torch.nn: training step.

    .venv/bin/python benchmarks/bench_fused.py                       # B=32 T=100, H 64..512, 1 and 2 threads
    .venv/bin/python benchmarks/bench_fused.py --cells gru --hidden 256 --threads 2 --reps 21
    .venv/bin/python benchmarks/bench_fused.py --routes              # + the kernel with its products
                                                                     #   limited to plain BLAS / at::mm

Contenders at each point, one process, same weights (load_state_dict from the torch.nn layer):
    torch     torch.nn.{RNN,LSTM,GRU}
    pure      rnnkit layer, backend="engine", scan on the pure-torch engine (engine._Scan)
    fused     rnnkit layer, backend="engine", scan on the fused kernel
    trace     fused, inside rnnkit.trace(layer)
    zoneout   fused, zoneout=0.1 (training mode: fresh 0/1 masks each call, drawn by the layer; on CPU
              with rnnkit._fused.bernoulli)
    layernorm fused, layer_norm=True
The route is chosen by pointing rnnkit.layers' `scan` at one or the other, so this measures the kernel
whether or not engine.scan already dispatches to it. Training step = zero_grad, forward,
out.sum().backward(). One warm-up round, then repetitions interleaved round-robin (first contender
rotating), garbage collector paused; medians and minimums in ms. Ratios: torch/fused and pure/fused
(> 1: the fused kernel is faster), trace/fused, zoneout/fused and layernorm/fused (costs).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
from itertools import product
from pathlib import Path

import torch
import torch.nn.functional as F
from common import (
    interleaved,
    machine_facts,
    matmul_peak_gflops,
    peak_alloc_bytes,
    steady_allocator,
)
from script_args import (
    check_writable,
    names_from,
    positive_int,
    positive_ints,
    write_text,
)
from torch import nn

import rnnkit as rk
import rnnkit.layers
from rnnkit import _fused, engine

CELLS = {"rnn": (rk.RNN, nn.RNN, 1, {"nonlinearity": "tanh"}), "lstm": (rk.LSTM, nn.LSTM, 4, {}),
         "gru": (rk.GRU, nn.GRU, 3, {})}
EXTRAS = {"fused": {}, "trace": {}, "zoneout": {"zoneout": 0.1}, "layernorm": {"layer_norm": True}}


# -- routing rnnkit.layers' scan -----------------------------------------------------------------------
# A layer runs engine.project_scan (the input projection, then the scan); the benchmark swaps it for the
# pure-torch path or the fused kernel's node.

def pure_scan(opts, x, weight_ih, bias_ih, state0, w, b, params=()):
    return engine.pure_scan(opts, F.linear(x, weight_ih, bias_ih), state0, w, b, params)


def fused_scan(opts, x, weight_ih, bias_ih, state0, w, b, params=()):
    if not _fused.supports_projected(opts, x, weight_ih, bias_ih, state0, w, b, params):
        raise RuntimeError("the fused kernel refused a benchmark scan")
    return _fused.scan_projected(opts, x, weight_ih, bias_ih, state0, w, b, params)


@contextlib.contextmanager
def routed(scan_fn, gemm_route: str = "dnnl+ukernel"):
    saved = rnnkit.layers.project_scan
    rnnkit.layers.project_scan = scan_fn
    _fused.build().limit_gemm_route(gemm_route)
    try:
        yield
    finally:
        rnnkit.layers.project_scan = saved
        _fused.build().limit_gemm_route("dnnl+ukernel")


# -- one point -------------------------------------------------------------------------------------------

def contenders(cell: str, H: int, routes: bool) -> dict:
    """name -> (layer, scan function, gemm route, traced)."""
    rk_cls, nn_cls, _, kw = CELLS[cell]
    ref = nn_cls(H, H, **kw)

    def mine(**extra):
        layer = rk_cls(H, H, backend="engine", **kw, **extra)
        layer.load_state_dict(ref.state_dict(), strict=False)     # layer_norm adds its own parameters
        return layer

    plain = mine()
    out = {"torch": (ref, None, "dnnl+ukernel", False), "pure": (plain, pure_scan, "dnnl+ukernel", False)}
    for name, extra in EXTRAS.items():
        out[name] = (plain if not extra else mine(**extra), fused_scan, "dnnl+ukernel", name == "trace")
    if routes:
        out["fused-packed"] = (plain, fused_scan, "packed", False)
        out["fused-blas"] = (plain, fused_scan, "blas", False)
        out["fused-aten"] = (plain, fused_scan, "aten", False)
    return out


def train_step(layer, scan_fn, route, traced, x):
    def step():
        ctx = routed(scan_fn, route) if scan_fn is not None else contextlib.nullcontext()
        with ctx, (rk.trace(layer) if traced else contextlib.nullcontext()):
            layer.zero_grad(set_to_none=True)
            out, _ = layer(x)
            out.sum().backward()
    return step


def bench_point(cell, B, T, H, reps, routes, memory, seed) -> dict:
    torch.manual_seed(seed)
    x = torch.randn(T, B, H)
    steps = {name: train_step(*c, x) for name, c in contenders(cell, H, routes).items()}
    for fn in steps.values():                                        # warm-up (and first-call costs)
        fn()
    gc.collect()
    gc.disable()
    try:
        times = interleaved(steps, reps)
    finally:
        gc.enable()
    point = {"cell": cell, "B": B, "T": T, "H": H, "threads": torch.get_num_threads(),
             "median_ms": {n: statistics.median(t) * 1e3 for n, t in times.items()},
             "min_ms": {n: min(t) * 1e3 for n, t in times.items()}, "times": times}
    if memory:
        point["peak_mb"] = {n: peak_alloc_bytes(fn) / 2 ** 20 for n, fn in steps.items()}
    return point


# -- the report ------------------------------------------------------------------------------------------

def ratios(p: dict, stat: str) -> dict:
    t = p[stat]
    return {"torch/fused": t["torch"] / t["fused"], "pure/fused": t["pure"] / t["fused"],
            "trace/fused": t["trace"] / t["fused"], "zoneout/fused": t["zoneout"] / t["fused"],
            "layernorm/fused": t["layernorm"] / t["fused"]}


def table(points: list[dict], names: list[str]) -> list[str]:
    head = ["threads", "cell", "H"] + [f"{n} ms" for n in names] + list(ratios(points[0], "median_ms"))
    rows = ["| " + " | ".join(head) + " |", "|" + "--:|" * len(head)]
    for p in points:
        cells = [str(p["threads"]), p["cell"], str(p["H"])]
        cells += [f"{p['median_ms'][n]:.1f} / {p['min_ms'][n]:.1f}" for n in names]
        med, low = ratios(p, "median_ms"), ratios(p, "min_ms")
        cells += [f"{med[k]:.2f} / {low[k]:.2f}" for k in med]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def memory_table(points: list[dict], names: list[str]) -> list[str]:
    rows = ["| threads | cell | H | " + " | ".join(f"{n} MB" for n in names) + " |",
            "|" + "--:|" * (3 + len(names))]
    for p in points:
        rows.append(f"| {p['threads']} | {p['cell']} | {p['H']} | "
                    + " | ".join(f"{p['peak_mb'][n]:.1f}" for n in names) + " |")
    return rows


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cells", type=names_from(CELLS), default=("gru", "rnn", "lstm"))
    p.add_argument("--batch", type=positive_int, default=32)
    p.add_argument("--seq", type=positive_int, default=100)
    p.add_argument("--hidden", type=positive_ints, default=(64, 128, 256, 512))
    p.add_argument("--threads", type=positive_ints, default=(1, 2))
    p.add_argument("--reps", type=positive_int, default=9, help="interleaved repetitions per contender")
    p.add_argument("--routes", action="store_true", help="also time the kernel with plain BLAS / at::mm")
    p.add_argument("--memory", action="store_true", help="also the peak bytes of one training step")
    p.add_argument("--json", type=Path, help="write every time here")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    check_writable(p, args.json)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    facts = machine_facts() | {"allocator": steady_allocator()}
    print(f"{facts['cpu']}, load average {facts['load_average']}, torch {facts['torch']}, "
          f"allocator: {facts['allocator']}, "
          f"gemm route {_fused.build().gemm_route()}", file=sys.stderr)
    print(f"B={args.batch} T={args.seq}, training step, median / min of {args.reps} interleaved "
          "repetitions\n", flush=True)
    points = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        peak = matmul_peak_gflops(2048, reps=5)
        print(f"{threads} thread(s): float32 matmul peak {peak:.1f} GFLOP/s", file=sys.stderr)
        for cell, H in product(args.cells, args.hidden):
            start = time.perf_counter()
            points.append(bench_point(cell, args.batch, args.seq, H, args.reps, args.routes, args.memory,
                                      args.seed))
            points[-1]["peak_gflops"] = peak
            rows = table(points, list(points[0]["median_ms"]))          # each row as soon as it is measured
            print("\n".join(rows if len(points) == 1 else rows[-1:]), flush=True)
            print(f"  {cell} H={H}: {time.perf_counter() - start:.1f} s", file=sys.stderr)
    if args.memory:
        print("\nPeak bytes held by torch's allocator during one training step\n")
        print("\n".join(memory_table(points, list(points[0]["median_ms"]))))
    if args.json:
        write_text(args.json, json.dumps({"machine": facts, "args": vars(args) | {"json": str(args.json)},
                                          "points": points}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
