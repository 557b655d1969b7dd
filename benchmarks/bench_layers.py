"""rnnkit against torch.nn, side by side in one process: training step and inference, per cell.

    .venv/bin/python benchmarks/bench_layers.py --out docs/benchmarks.md      # what `make bench` runs
    .venv/bin/python benchmarks/bench_layers.py --quick --out /tmp/bench.md   # smoke test, seconds

Contenders at every grid point (same weights, copied from the torch.nn layer with load_state_dict):
    torch   torch.nn.{RNN,LSTM,GRU}                the reference
    native  rnnkit layer, backend="native"         torch's fused kernel behind rnnkit's layer
    engine  rnnkit layer, backend="engine"         rnnkit's own scan and hand-written BPTT
    trace   the engine inside `rnnkit.trace(layer)`  records every h_t and ||dL/dh_t||
At every grid point, the extras' cost over the plain engine (training step): the engine
against itself with zoneout=0.1 and with layer_norm=True, between two measures of the cores' round trip
(common.round_trips_around: where the host ran the two vCPUs while they were timed). At one point (GRU,
B=64, T=100, H=256 by default) torch.profiler's split of one training step, torch.nn against the engine
(profile_step.py).
Timings are interleaved (round-robin over the contenders each repetition, after a warm-up round) and
reported as medians; the markdown report is rendered by the functions at the bottom of this file.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import time
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import torch
from common import (
    Budget,
    cpu_count,
    machine_facts,
    matmul_peak_gflops,
    measure,
    peak_alloc_bytes,
    round_trips_around,
    steady_allocator,
)
from profile_step import profile_steps
from script_args import (
    check_writable,
    names_from,
    positive_float,
    positive_int,
    positive_ints,
    write_text,
)
from torch import nn
from tqdm import tqdm

import rnnkit as rk
from rnnkit._fused import route

# cell -> (rnnkit class, torch.nn class, gate blocks G, constructor kwargs)
CELLS = {
    "rnn": (rk.RNN, nn.RNN, 1, {"nonlinearity": "tanh"}),
    "lstm": (rk.LSTM, nn.LSTM, 4, {}),
    "gru": (rk.GRU, nn.GRU, 3, {}),
}
MODES = ("train", "infer")


@dataclass(frozen=True)
class Grid:
    batch: tuple[int, ...]
    seq: tuple[int, ...]
    hidden: tuple[int, ...]


FULL_GRID = Grid(batch=(32, 64), seq=(100, 200), hidden=(64, 128, 256, 512))
QUICK_GRID = Grid(batch=(8,), seq=(20,), hidden=(32, 128))
EXTRAS = {"zoneout": {"zoneout": 0.1}, "layer_norm": {"layer_norm": True}}   # name -> constructor kwargs
PROFILE_POINT = ("gru", 64, 100, 256)                                        # cell, B, T, H


# -- one grid point ------------------------------------------------------------------------------------

def forward_flops(cell: str, B: int, T: int, H: int) -> int:
    """Matmul FLOPs of one forward pass with I = H: 2 T B (I + H) G H (input and recurrent products)."""
    G = CELLS[cell][2]
    return 2 * T * B * (H + H) * G * H


def build_layers(cell: str, H: int) -> dict[str, nn.Module]:
    """The four contenders, all with the torch.nn layer's weights."""
    rk_cls, nn_cls, _, kw = CELLS[cell]
    ref = nn_cls(H, H, **kw)
    layers = {"torch": ref}
    for name, backend in (("native", "native"), ("engine", "engine"), ("trace", "engine")):
        layer = rk_cls(H, H, backend=backend, **kw)
        layer.load_state_dict(ref.state_dict())
        layers[name] = layer
    return layers


def _traced(layer: nn.Module, on: bool):
    return rk.trace(layer) if on else contextlib.nullcontext()


def train_step(layer: nn.Module, x: torch.Tensor, traced: bool):
    """zero_grad, forward, backward of a loss over all outputs (fills the weight gradients)."""
    def step():
        layer.zero_grad(set_to_none=True)
        with _traced(layer, traced):
            out, _ = layer(x)
            out.sum().backward()
    return step


def infer_step(layer: nn.Module, x: torch.Tensor, traced: bool):
    def step():
        with torch.inference_mode(), _traced(layer, traced):
            return layer(x)[0]
    return step


def steps_for(mode: str, layers: dict, x: torch.Tensor) -> dict:
    make = train_step if mode == "train" else infer_step
    return {name: make(layer, x, name == "trace") for name, layer in layers.items()}


def output_mismatch(outputs: dict) -> float:
    """Largest |out - torch.nn out| over the rnnkit contenders: proof they computed the same thing."""
    ref = outputs["torch"]
    return max(float((out - ref).abs().max()) for name, out in outputs.items() if name != "torch")


def training_memory(layers: dict, x: torch.Tensor) -> dict[str, int]:
    """Peak bytes allocated during one training step, per contender (old gradients released first)."""
    peaks = {}
    for name, layer in layers.items():
        layer.zero_grad(set_to_none=True)
        gc.collect()
        peaks[name] = peak_alloc_bytes(train_step(layer, x, name == "trace"))
    return peaks


def extras_layers(cell: str, engine: nn.Module) -> dict[str, nn.Module]:
    """The plain engine and one layer per extra, with the engine's weights (layer_norm adds its own
    parameters at their identity initialisation)."""
    rk_cls, _, _, kw = CELLS[cell]
    layers = {"engine": engine}
    for name, extra in EXTRAS.items():
        layer = rk_cls(engine.input_size, engine.hidden_size, backend="engine", **kw, **extra)
        layer.load_state_dict(engine.state_dict(), strict=False)
        layers[name] = layer.train()
    return layers


def extra_steps(cell: str, B: int, T: int, H: int, extra: str) -> dict[str, dict]:
    """At one point (I = H), the plain engine's and one extra's calls on the same weights and input:
    {"forward": {"engine": f, extra: f}, "train": {...}}. forward is a training-mode call (what the backward
    needs is kept); train is train_step. Draws the weights, then x, from torch's generator."""
    rk_cls, _, _, kw = CELLS[cell]
    layers = extras_layers(cell, rk_cls(H, H, backend="engine", **kw).train())
    x = torch.randn(T, B, H)

    def forward(layer):
        return lambda: layer(x)

    def train(layer):
        return train_step(layer, x, False)
    return {mode: {name: make(layers[name]) for name in ("engine", extra)}
            for mode, make in (("forward", forward), ("train", train))}


def bench_point(cell: str, B: int, T: int, H: int, budget: Budget, memory: bool, seed: int) -> dict:
    torch.manual_seed(seed)
    layers = build_layers(cell, H)
    x = torch.randn(T, B, H)                                          # (T, B, I), I = H
    point = {"cell": cell, "B": B, "T": T, "H": H, "flops_forward": forward_flops(cell, B, T, H)}
    point["train"], _ = measure(steps_for("train", layers, x), budget)
    point["infer"], outputs = measure(steps_for("infer", layers, x), budget)
    point["max_abs_diff"] = output_mismatch(outputs)
    point["peak_bytes"] = training_memory(layers, x) if memory else None
    with round_trips_around() as trips:           # where the host has put the two vCPUs (common.py)
        point["extras"], _ = measure(steps_for("train", extras_layers(cell, layers["engine"]), x), budget)
    point["core_round_trip_ns"] = trips
    return point


def profile_point(cell: str, B: int, T: int, H: int, seed: int) -> dict:
    """torch.profiler's split of one training step, torch.nn and the engine, at one point."""
    torch.manual_seed(seed)
    layers = build_layers(cell, H)
    x = torch.randn(T, B, H)
    steps = steps_for("train", {"torch.nn": layers["torch"], "engine": layers["engine"]}, x)
    return {"cell": cell, "B": B, "T": T, "H": H,
            "profiles": {name: profile_steps(step) for name, step in steps.items()}}


# -- the report ----------------------------------------------------------------------------------------

from report import kept_sections, recorded_runs, render  # noqa: E402


def run_grid(cells, grid: Grid, budget: Budget, memory: bool, seed: int) -> list[dict]:
    todo = list(product(cells, grid.batch, grid.seq, grid.hidden))
    points = []
    with tqdm(todo, desc="bench", unit="point", file=sys.stderr, dynamic_ncols=True) as bar:
        for cell, B, T, H in bar:
            bar.set_postfix_str(f"{cell} B={B} T={T} H={H}")
            points.append(bench_point(cell, B, T, H, budget, memory, seed))
    return points


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/benchmarks.md"), help="markdown report (default: docs/benchmarks.md)")
    p.add_argument("--json", nargs="?", const="", default=None, metavar="PATH",
                   help="also write the raw numbers as JSON (no PATH: beside --out, suffix .json)")
    p.add_argument("--quick", action="store_true", help="tiny grid and few repetitions: a smoke test")
    p.add_argument("--cells", type=names_from(CELLS), default=tuple(CELLS), help="comma-separated subset of rnn,lstm,gru (default: all)")
    p.add_argument("--batch", type=positive_ints, help="batch sizes B (default: 32,64; quick: 8)")
    p.add_argument("--seq", type=positive_ints, help="sequence lengths T (default: 100,200; quick: 20)")
    p.add_argument("--hidden", type=positive_ints, help="hidden sizes H = I (default: 64,128,256,512; quick: 32,128)")
    p.add_argument("--reps", type=positive_int, help="fixed repetitions per contender (default: adaptive)")
    p.add_argument("--budget", type=positive_float, help="seconds of measured time per contender and point "
                                                "(default 1.0; quick 0.05)")
    p.add_argument("--min-reps", type=positive_int, help="default 7; quick 2")
    p.add_argument("--max-reps", type=positive_int, help="default 25; quick 3")
    p.add_argument("--threads", type=positive_int, default=cpu_count(), help="torch.set_num_threads (default: the cores)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--seed", type=int, default=0, help="weights and inputs (default: 0)")
    p.add_argument("--from-json", type=Path, metavar="PATH",
                   help="measure nothing: render --out again from a run's JSON (after a change to report.py)")
    args = p.parse_args(argv)
    args.run = None
    if args.from_json is not None:
        try:
            args.run = json.loads(args.from_json.read_text())
        except (OSError, ValueError) as e:
            p.error(f"--from-json: cannot read a run from {args.from_json}: {e}")
        if not isinstance(args.run, dict) or "points" not in args.run:
            p.error(f"--from-json: {args.from_json} is not a run's JSON (no 'points'); write one with --json")
    if args.json == "":
        args.json = str(args.out.with_suffix(".json"))
    check_writable(p, args.out, args.json)
    return args


def settings(args) -> tuple[Grid, Budget, int]:
    """Grid, repetition budget and matmul size for the peak, from the flags (quick or full)."""
    base = QUICK_GRID if args.quick else FULL_GRID
    grid = Grid(args.batch or base.batch, args.seq or base.seq, args.hidden or base.hidden)
    lo, hi, sec = (2, 3, 0.05) if args.quick else (7, 25, 1.0)
    budget = Budget(args.budget or sec, args.min_reps or lo, max(args.max_reps or hi, args.min_reps or lo),
                    args.reps)
    return grid, budget, (512 if args.quick else 2048)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.run is not None:
        doc, summary = render(args.run, recorded_runs(args.out, args.from_json), args.out.stem, str(args.from_json))
        write_text(args.out, doc + kept_sections(args.out))
        print(summary)
        return 0
    torch.set_num_threads(args.threads)
    grid, budget, peak_n = settings(args)
    facts = machine_facts()
    facts["allocator"] = steady_allocator()
    facts["peak_matmul_n"], facts["peak_matmul_reps"] = peak_n, 5
    before = matmul_peak_gflops(peak_n, reps=facts["peak_matmul_reps"])
    print(f"{facts['cpu']}, {facts['threads']} threads, matmul peak {before:.1f} GFLOP/s", file=sys.stderr)
    start = time.perf_counter()
    with round_trips_around() as facts["core_round_trip_ns_runs"]:
        points = run_grid(args.cells, grid, budget, not args.no_memory, args.seed)
    prof = profile_point(*PROFILE_POINT, args.seed) if PROFILE_POINT[0] in args.cells else None
    facts["wall_seconds"] = time.perf_counter() - start
    facts["gemm_route"] = route.current()
    facts["peak_gflops_runs"] = [before, matmul_peak_gflops(peak_n, reps=facts["peak_matmul_reps"])]
    facts["peak_gflops"] = max(facts["peak_gflops_runs"])
    run = {"machine": facts, "grid": asdict(grid), "budget": asdict(budget), "quick": args.quick,
           "cells": list(args.cells), "points": points, "profile": prof}
    doc, summary = render(run, recorded_runs(args.out, None if args.json is None else Path(args.json)),
                          args.out.stem)
    write_text(args.out, doc + kept_sections(args.out))
    if args.json is not None:
        write_text(args.json, json.dumps(run, indent=1))
        print(f"wrote {args.json}", file=sys.stderr)
    print(summary)
    print(f"wrote {args.out} ({len(points)} points in {facts['wall_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
