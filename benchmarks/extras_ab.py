"""The extras' cost over the plain engine at a few grid points, A/B against another checkout.

An extra's cost (time with `layer_norm=True` or `zoneout=0.1` / time of the plain engine) moves by a few
percent when the kernel changes, less than the box's drift between runs, so a change is measured in
alternating processes: each round runs the other checkout, then this one, each timing the plain and the
extra layer interleaved in one process (medians of `--reps` calls), forward alone and the training step.

    .venv/bin/python benchmarks/extras_ab.py                                  # this checkout only
    git worktree add /tmp/base HEAD~1                                          # or any clone
    .venv/bin/python benchmarks/extras_ab.py --base /tmp/base --rounds 5       # A/B

The other checkout's kernel is compiled into its own directory (RNNKIT_EXT_DIR), once. Each process runs
from a scratch directory, so that `rnnkit` is imported from the checkout named and nowhere else.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_layers import EXTRAS, extra_steps
from common import NEAR_NS, interleaved, placement, round_trips_around
from script_args import int_at_least, names_from, point_fits

HERE = Path(__file__).resolve()
CHECKOUT = HERE.parents[1]
DEFAULT_POINTS = "rnn:64:200:64,lstm:64:200:64,lstm:64:200:128"


def points(text: str) -> tuple[tuple[str, int, int, int], ...]:
    """cell:B:T:H,... (I = H)."""
    out = []
    for item in text.split(","):
        parts = item.strip().split(":")
        if len(parts) != 4 or parts[0] not in ("rnn", "lstm", "gru") or not all(p.isdigit() and int(p) > 0
                                                                               for p in parts[1:]):
            raise argparse.ArgumentTypeError(f"{item!r}: expected cell:B:T:H with cell rnn, lstm or gru and "
                                             "positive sizes, e.g. lstm:64:200:64")
        out.append((parts[0], *map(int, parts[1:])))
    return tuple(out)


def measure_here(extra: str, pts, reps: int) -> dict:
    """One process: for each point and mode, the plain and the extra layer's median ms."""
    import torch

    import rnnkit as rk
    torch.manual_seed(0)
    from rnnkit import _fused
    if not _fused.available():       # the pure-torch fallback would time something else entirely
        sys.exit(f"the fused kernel of {rk.__file__} did not build or load; see rnnkit._fused.build(verbose=True)")
    res = {"rnnkit": rk.__file__, "points": {}}
    with round_trips_around() as res["core_round_trip_ns"]:   # where the host ran the two CPUs meanwhile
        for cell, B, T, H in pts:
            with point_fits("extras_ab", (cell, B, T, H)):
                for mode, fns in extra_steps(cell, B, T, H, extra).items():     # the same weights, one x
                    steps = {"plain": fns["engine"], "extra": fns[extra]}
                    interleaved(steps, 3)                                       # warm-up
                    times = interleaved(steps, reps)
                    res["points"][f"{cell} B={B} T={T} H={H} {mode}"] = {
                        k: statistics.median(v) * 1e3 for k, v in times.items()}
    return res


def round_trip_lines(runs: dict[str, list[dict]]) -> str:
    """Per checkout, each process's round trips (ns, before / after its timings)."""
    def fmt(t):
        return "?" if t is None else f"{t:.0f}"
    return "\n".join(f"{name}: " + ", ".join("/".join(fmt(t) for t in r.get("core_round_trip_ns", [None]))
                                            for r in rs) for name, rs in runs.items())


def run_process(checkout: Path, ext_dir: str | None, args) -> dict:
    env = dict(os.environ, PYTHONPATH=str(checkout))
    if ext_dir is not None:
        env["RNNKIT_EXT_DIR"] = ext_dir
    cmd = [sys.executable, str(HERE), "--child", "--extra", args.extra, "--points", args.points_text,
           "--reps", str(args.reps)]
    with tempfile.TemporaryDirectory() as scratch:
        done = subprocess.run(cmd, env=env, cwd=scratch, capture_output=True, text=True, check=False)
    lines = done.stderr.strip().splitlines()
    if done.returncode == 2 and lines:          # the child's own message (point_fits): no traceback to show
        print(lines[-1], file=sys.stderr)
        sys.exit(2)
    if done.returncode != 0:
        sys.exit(f"extras_ab: the run in {checkout} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(runs: dict[str, list[dict]]) -> str:
    """Per point and mode, per checkout: medians over rounds of plain ms, extra ms, and the cost's median
    (min-max) over rounds."""
    names = list(runs)
    keys = list(runs[names[0]][0]["points"])
    head = "| point | " + " | ".join(f"{n}: plain ms | {n}: extra ms | {n}: cost" for n in names) + " |"
    lines = [head, "|---|" + "--:|--:|--:|" * len(names)]
    for key in keys:
        cells = []
        for name in names:
            rows = [r["points"][key] for r in runs[name]]
            cost = [r["extra"] / r["plain"] for r in rows]
            cells += [f"{statistics.median(r['plain'] for r in rows):.2f}",
                      f"{statistics.median(r['extra'] for r in rows):.2f}",
                      f"{statistics.median(cost):.3f}x ({min(cost):.3f}-{max(cost):.3f})"]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", type=Path, help="another rnnkit checkout, run in alternation with this one")
    p.add_argument("--extra", type=names_from(EXTRAS), default=("layer_norm",),
                   help="layer_norm or zoneout (default layer_norm)")
    p.add_argument("--points", type=points, default=points(DEFAULT_POINTS),
                   help=f"cell:B:T:H,... (default {DEFAULT_POINTS})")
    p.add_argument("--rounds", type=int_at_least(1), default=5, help="processes per checkout (default 5)")
    p.add_argument("--reps", type=int_at_least(3), default=21, help="interleaved calls per process (default 21)")
    p.add_argument("--near", action="store_true",
                   help=f"tabulate only the processes whose cores' round trip stayed under {NEAR_NS} ns "
                        "(common.core_round_trip_ns: the host ran the two CPUs near each other)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if len(args.extra) != 1:
        p.error("--extra takes one of layer_norm, zoneout")
    args.extra = args.extra[0]
    args.points_text = ",".join(f"{c}:{B}:{T}:{H}" for c, B, T, H in args.points)
    if args.base is not None and not (args.base / "rnnkit" / "__init__.py").is_file():
        p.error(f"--base {args.base}: not an rnnkit checkout (no rnnkit/__init__.py there)")
    return args


def near_runs(runs: dict[str, list[dict]]) -> dict[str, list[dict]]:
    """--near: each checkout's processes whose cores stayed near (common.placement of the round trips a run
    records before and after its timings, as a grid point does). Exits 2 where that cannot be told (a kernel
    from before core_round_trip_ns, or fewer than two CPUs) and 1 where no process of a checkout ran near."""
    where = {name: [placement(*(r.get("core_round_trip_ns") or ())) for r in rs] for name, rs in runs.items()}
    unknown = [name for name, ws in where.items() if "not measured" in ws]
    if unknown:
        print(f"extras_ab: --near: the cores' round trip was not measured in {unknown} (a kernel from before "
              "rnnkit_fused::core_round_trip_ns, or fewer than two CPUs): run without --near", file=sys.stderr)
        sys.exit(2)
    kept = {name: [r for r, w in zip(rs, where[name]) if w == "near"] for name, rs in runs.items()}
    if not all(kept.values()):
        sys.exit(f"extras_ab: no process of {[n for n, rs in kept.items() if not rs]} ran with its cores near "
                 f"(round trip < {NEAR_NS} ns); run again, or without --near")
    return kept


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure_here(args.extra, args.points, args.reps)))
        return
    runs: dict[str, list[dict]] = {}
    base_ext = None
    if args.base is not None:
        tag = hashlib.sha1(str(args.base.resolve()).encode()).hexdigest()[:10]
        base_ext = str(Path(tempfile.gettempdir()) / f"rnnkit-ab-ext-{tag}")
        runs["base"] = []
    runs["this"] = []
    for k in range(args.rounds):
        print(f"round {k + 1}/{args.rounds}", file=sys.stderr, flush=True)
        if args.base is not None:
            runs["base"].append(run_process(args.base.resolve(), base_ext, args))
        runs["this"].append(run_process(CHECKOUT, None, args))
    for name, rs in runs.items():
        print(f"{name}: rnnkit from {rs[0]['rnnkit']}")
    print(f"\ncores' round trip, ns, per process (before/after):\n{round_trip_lines(runs)}")
    if args.near:
        runs = near_runs(runs)
    counts = " / ".join(str(len(rs)) for rs in runs.values())
    print(f"\n{args.extra}, cost = time with it / plain engine; {counts} processes, "
          f"{args.reps} interleaved calls a process" + (f", cores near (< {NEAR_NS} ns)" if args.near else "") + "\n")
    print(table(runs))


if __name__ == "__main__":
    main()
