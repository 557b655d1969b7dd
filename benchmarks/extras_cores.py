"""An extra's cost over the plain engine, split by where the host ran the two CPUs while it was timed.

A virtual machine cannot see where its host runs its vCPUs. Before and after each round this measures the
cores' round trip (common.core_round_trip_ns: a cache line passed between threads pinned to the first two
CPUs), and tabulates the rounds apart: near (both under common.NEAR_NS), far (either at or above it), and not
measured (no kernel op or no second CPU). Each round times the plain engine and the extra interleaved, forward
alone and the training step, in three ways: two threads with the kernel's lanes (scan.h: each thread runs the
whole time loop on its rows; the default), two threads without lanes (each step's work split), and one
thread.

    .venv/bin/python benchmarks/extras_cores.py --seconds 300                       # RNN B=32 T=100 H=64
    .venv/bin/python benchmarks/extras_cores.py --point lstm:64:100:64 --extra zoneout

On the Zen 5 box (docs/benchmarks.md, "the box's slow mode") the round trip read ~80 ns at times and ~390-430 ns
at others, and the layer_norm training step, 1.15x the plain engine near, read 1.32x far, where its two
threads ran no faster than one (RNN B=32 T=100 H=64, --seconds 300).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from bench_layers import EXTRAS, extra_steps
from common import NEAR_NS, placement, round_trips_around
from extras_ab import points
from script_args import int_at_least, names_from, point_fits, positive_float

WAYS = ("lanes", "no lanes", "1 thread")
CORES = ("near", "far", "not measured")                   # common.placement's answers


def set_way(ops, way: str, threads: int, lanes: int) -> None:
    """lanes: the kernel's setting for the "lanes" way (the caller's, or the kernel's default 16 if it was off)."""
    torch.set_num_threads(1 if way == "1 thread" else threads)
    ops.set_min_lane_rows(0 if way == "no lanes" else lanes)


def measure(point, extra: str, seconds: float, calls: int) -> tuple[dict, list[tuple]]:
    """{(cores, way, mode, layer): [ms per call, one per round]} and each round's round trips (ns, before and
    after; None where not measured)."""
    from rnnkit import _fused
    if not _fused.available():
        sys.exit("extras_cores: the fused kernel did not build or load; see rnnkit._fused.build(verbose=True)")
    ops, threads = _fused.build(), torch.get_num_threads()
    torch.manual_seed(0)
    steps = extra_steps(*point, extra)
    fns = {(mode, k): fn for mode in ("train", "forward") for k, fn in steps[mode].items()}
    times, trips = {}, []
    start = time.perf_counter()
    old_lanes = ops.set_min_lane_rows(16)
    lanes = old_lanes if old_lanes > 0 else 16
    try:
        while not trips or time.perf_counter() - start < seconds:
            rnd = {}
            with round_trips_around() as trip:
                for way in WAYS:
                    set_way(ops, way, threads, lanes)
                    for (mode, layer), fn in fns.items():
                        fn()                                               # settled in this way
                        t = time.perf_counter()
                        for _ in range(calls):
                            fn()
                        rnd[(way, mode, layer)] = (time.perf_counter() - t) / calls * 1e3
                torch.set_num_threads(threads)                 # the round trip as the process runs otherwise
            trips.append(trip)
            for key, ms in rnd.items():
                times.setdefault((placement(*trip), *key), []).append(ms)
    finally:
        torch.set_num_threads(threads)
        ops.set_min_lane_rows(old_lanes)
    return times, trips


def table(times: dict, extra: str) -> str:
    """Per cores (near, far) and way, medians over rounds of the plain and the extra's ms, and the cost."""
    lines = [f"| cores | threads | mode | rounds | plain ms | {extra} ms | cost |", "|---|---|---|--:|--:|--:|--:|"]
    for where in CORES:
        for way in WAYS:
            for mode in ("forward", "train"):
                plain, other = times.get((where, way, mode, "engine")), times.get((where, way, mode, extra))
                if not plain:
                    continue
                p, e = statistics.median(plain), statistics.median(other)
                lines.append(f"| {where} | {way} | {mode} | {len(plain)} | {p:.3f} | {e:.3f} | {e / p:.3f}x |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--point", type=points, default=points("rnn:32:100:64"),
                   help="cell:B:T:H (I = H; default rnn:32:100:64)")
    p.add_argument("--extra", type=names_from(EXTRAS), default=("layer_norm",), help="layer_norm or zoneout")
    p.add_argument("--seconds", type=positive_float, default=120.0, help="how long to go on (default 120)")
    p.add_argument("--calls", type=int_at_least(1), default=30, help="calls timed per layer and way a round")
    args = p.parse_args(argv)
    if len(args.point) != 1 or len(args.extra) != 1:
        p.error("--point and --extra take one each")
    args.point, args.extra = args.point[0], args.extra[0]
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    with point_fits("extras_cores", args.point):
        times, trips = measure(args.point, args.extra, args.seconds, args.calls)
    known = [t for pair in trips for t in pair if t is not None]
    far = sum(placement(*pair) == "far" for pair in trips)
    cell, B, T, H = args.point
    print(f"{cell} B={B} T={T} H={H}, {args.extra}; {len(trips)} rounds, cores' round trip "
          + (f"{min(known):.0f}-{max(known):.0f} ns, {far} round(s) far (>= {NEAR_NS} ns before or after)"
             if known else "not measured")
          + "\n")
    print(table(times, args.extra))


if __name__ == "__main__":
    main()
