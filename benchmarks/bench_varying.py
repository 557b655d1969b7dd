"""Training on batches whose size and length change every step (bucketed data): process memory and time.

    .venv/bin/python benchmarks/bench_varying.py                  # about 1 minute; prints a markdown table
    .venv/bin/python benchmarks/bench_varying.py --steps 100      # quicker

Each contender runs in its own process (RSS is per process): an LSTM (I = H), `--steps` training steps on
random B in [16, 64] and T in [50, 150] (the same sequence for every contender), after one warm-up step at
the largest size. Reported: the growth of the resident set size (RSS) over the steps, sampled each quarter,
the bytes rnnkit's buffer pool holds at the end, and the wall time of the steps. torch.nn is the baseline;
the engine's products go to oneDNN, which compiles a kernel per product shape (see rnnkit/_fused/blas.h).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

CONTENDERS = ("torch", "engine")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_one(kind: str, steps: int, H: int, seed: int) -> dict:
    import torch

    import rnnkit as rk
    from rnnkit import _fused
    torch.manual_seed(seed)
    rng = random.Random(seed)
    layer = torch.nn.LSTM(H, H) if kind == "torch" else rk.LSTM(H, H, backend="engine")
    sizes = [(rng.randint(16, 64), rng.randint(50, 150)) for _ in range(steps)]

    def step(B: int, T: int) -> None:
        y, _ = layer(torch.randn(T, B, H))
        y.square().mean().backward()

    step(64, 150)
    start, marks = rss_mb(), []
    t0 = time.perf_counter()
    for i, (B, T) in enumerate(sizes, 1):
        step(B, T)
        if i % max(1, steps // 4) == 0:
            marks.append(round(rss_mb() - start))
    seconds = time.perf_counter() - t0
    held = int(torch.ops.rnnkit_fused.pool_held_bytes()) if kind == "engine" and _fused.available() else 0
    route = torch.ops.rnnkit_fused.gemm_route() if kind == "engine" and _fused.available() else ""
    return {"kind": kind, "growth_mb": marks, "pool_mb": held / 2**20, "seconds": seconds, "route": route}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--one", choices=CONTENDERS, help=argparse.SUPPRESS)     # the child process
    args = ap.parse_args(argv)
    if args.steps < 4 or args.hidden < 1:
        ap.error("--steps must be at least 4 and --hidden at least 1")
    if args.one:
        print(json.dumps(run_one(args.one, args.steps, args.hidden, args.seed)))
        return 0
    rows = []
    for kind in CONTENDERS:
        cmd = [sys.executable, __file__, "--one", kind, "--steps", str(args.steps), "--hidden", str(args.hidden),
               "--seed", str(args.seed)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    q = args.steps // 4
    print(f"LSTM H={args.hidden}, {args.steps} training steps on random B in [16, 64], T in [50, 150]\n")
    print(f"| contender | RSS growth after {q}, {2 * q}, {3 * q}, {4 * q} steps (MB) | pool held (MB) | seconds |")
    print("|---|---|--:|--:|")
    for r in rows:
        name = "torch.nn" if r["kind"] == "torch" else f"engine (route {r['route']})"
        print(f"| {name} | {', '.join(map(str, r['growth_mb']))} | {r['pool_mb']:.0f} | {r['seconds']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
