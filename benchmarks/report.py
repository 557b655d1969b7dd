"""The markdown report of bench_layers.py: the summary of the issue targets (targets.py), timing tables,
method."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from common import NEAR_NS
from profile_step import profile_table, top_ops_lines
from targets import (
    MODES,
    Check,
    checks,
    extra_cost,
    median,
    memory_ratio,
    ratio_of,
    round_trips,
    summary_table,
    trace_overhead,
)

# Everything from this line on in docs/benchmarks.md is written by hand (results of the other benchmark
# scripts, with their commands) and kept as it is when `make bench` regenerates the part above it.
KEEP_MARKER = "<!-- sections below: written by hand from the other benchmark scripts; make bench keeps them -->"

NAMES = {"rnn": "RNN (tanh)", "lstm": "LSTM", "gru": "GRU"}
MODE_TITLES = {"train": "Training step (forward + BPTT + weight gradients)",
               "infer": "Inference (forward under torch.inference_mode)"}


TRAIN_FLOPS_PER_FORWARD = 2.5


def engine_gflops(point: dict, mode: str) -> float:
    """Matmul GFLOP/s of the engine. The training step's products, with I = H: the forward's x V^T and
    h U^T, then dh U, dU and dV, and no dx (the benchmark's input does not require grad): five products of
    the same size, 2.5x the forward's two."""
    flops = point["flops_forward"] * (TRAIN_FLOPS_PER_FORWARD if mode == "train" else 1)
    return flops / median(point, mode, "engine") / 1e9


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def timing_table(points: list[dict], mode: str, peak: float) -> list[str]:
    rows = ["| B | T | H | torch.nn ms | native ms | native ratio | engine ms | engine ratio "
            "| engine GFLOP/s | % of peak | engine+trace ms | trace overhead |",
            "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for p in points:
        g = engine_gflops(p, mode)
        rows.append(f"| {p['B']} | {p['T']} | {p['H']} | {_ms(median(p, mode, 'torch'))} "
                    f"| {_ms(median(p, mode, 'native'))} | {ratio_of('native')(p, mode):.2f} "
                    f"| {_ms(median(p, mode, 'engine'))} | {ratio_of('engine')(p, mode):.2f} "
                    f"| {g:.1f} | {100 * g / peak:.0f}% | {_ms(median(p, mode, 'trace'))} "
                    f"| {trace_overhead(p, mode) * 100:+.0f}% |")
    return rows


def memory_table(points: list[dict]) -> list[str]:
    rows = ["| B | T | H | torch.nn MB | native MB | engine MB | engine / torch.nn | engine+trace MB |",
            "|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for p in points:
        mb = {name: b / 2 ** 20 for name, b in p["peak_bytes"].items()}
        rows.append(f"| {p['B']} | {p['T']} | {p['H']} | {mb['torch']:.1f} | {mb['native']:.1f} "
                    f"| {mb['engine']:.1f} | {memory_ratio(p, 'train'):.2f}× | {mb['trace']:.1f} |")
    return rows


def recorded_round_trips(points: list[dict]) -> bool:
    """Whether the run recorded the cores' round trip around its points' extras (runs before it did not)."""
    return any("core_round_trip_ns" in p for p in points)


def extras_table(points: list[dict]) -> list[str]:
    trips = recorded_round_trips(points)
    rows = [("| B | T | H | engine ms | + zoneout 0.1 ms | zoneout cost | + layer_norm ms | layer_norm cost |"
             + (" cores' round trip ns, before / after |" if trips else "")),
            "|--:|--:|--:|--:|--:|--:|--:|--:|" + ("--:|" if trips else "")]
    for p in points:
        e = {n: s["median"] for n, s in p["extras"].items()}
        ns = round_trips(p)
        rows.append(f"| {p['B']} | {p['T']} | {p['H']} | {_ms(e['engine'])} | {_ms(e['zoneout'])} "
                    f"| {extra_cost('zoneout')(p, 'train'):.2f}× | {_ms(e['layer_norm'])} "
                    f"| {extra_cost('layer_norm')(p, 'train'):.2f}× |"
                    + ("" if not trips else f" {'—' if ns is None else f'{ns[0]:.0f} / {ns[1]:.0f}'} |"))
    return rows


def extras_section(run: dict) -> list[str]:
    points = run["points"]
    lines = ["## Extras: their cost over the plain engine (training step)", "",
             "The engine timed against itself, interleaved as above, at every grid point: with "
             "`zoneout=0.1` (training mode: fresh 0/1 masks every call, drawn by the fused kernel's "
             "counter-based generator on CPU) and with `layer_norm=True` (layer normalisation of V x_t and "
             "of U h_{t−1} at every step, forward and backward, inside the fused kernel). Cost = time with "
             "the extra / time of the plain engine."
             + (" The last column: the cores' round trip measured just before and just after the point's extras "
                "(see How it is measured)." if recorded_round_trips(points) else ""), ""]
    for cell in run["cells"]:
        lines += [f"### {NAMES[cell]}", "", *extras_table([p for p in points if p["cell"] == cell]), ""]
    return lines


def profile_section(run: dict) -> list[str]:
    prof = run.get("profile")
    if not prof:
        return []
    where_ = f"{NAMES[prof['cell']]}, B={prof['B']}, T={prof['T']}, H={prof['H']}"
    return ["## Where the time goes: one training step under torch.profiler", "",
            f"{where_}; self CPU time per operator, mean of 3 steps after a warm-up, summed by kind of "
            "work (`benchmarks/profile_step.py`). The profiler's own overhead inflates small operators, "
            "so the totals sit above the timings in the tables; the shares are the reading.", "",
            *profile_table(prof["profiles"]), "",
            "Largest operators (self time per step):", "", *top_ops_lines(prof["profiles"]), ""]


def kept_sections(path: Path) -> str:
    """The hand-written tail of an existing report (from KEEP_MARKER on), or just the marker."""
    try:
        text = path.read_text()
    except OSError:
        text = ""
    at = text.find(KEEP_MARKER)
    return "\n" + (text[at:] if at >= 0 else KEEP_MARKER + "\n")


def machine_section(run: dict) -> list[str]:
    m = run["machine"]
    return ["## Machine", "",
            "| | |", "|---|---|",
            f"| CPU | {m['cpu']} |",
            f"| cores / torch threads | {m['cores']} / {m['threads']} (`torch.set_num_threads`) |",
            f"| matmul peak | **{m['peak_gflops']:.1f} GFLOP/s** (float32 {m['peak_matmul_n']}×"
            f"{m['peak_matmul_n']} matmul, the faster of torch.mm and oneDNN's, median of "
            f"{m['peak_matmul_reps']}{peak_runs(m)}) |",
            f"| torch / Python | {m['torch']} / {m['python']} |",
            (f"| rnnkit kernel's product route | {m.get('gemm_route') or 'not recorded'} "
             "(`rnnkit/_fused/route.py`: oneDNN's products where measured faster than MKL's) |"),
            f"| platform | {m['platform']} |",
            f"| rnnkit commit | {m['rnnkit_commit']} |",
            f"| date | {m['date']} |",
            f"| memory allocator | {m.get('allocator', 'glibc default (not recorded)')} |",
            f"| load average at start | {' / '.join(str(x) for x in m['load_average'])} (1 / 5 / 15 min) |",
            f"| cores' round trip | {machine_round_trips(m)} |",
            f"| wall time of this run | {m['wall_seconds'] / 60:.1f} min |", ""]


def machine_round_trips(machine: dict) -> str:
    runs = machine.get("core_round_trip_ns_runs")
    if not runs or any(v is None for v in runs):
        return "not measured"
    return f"{runs[0]:.0f} ns before the grid, {runs[-1]:.0f} ns after it (per point: the extras tables)"


def peak_runs(machine: dict) -> str:
    """How the peak was chosen, for runs that measured it before and after the grid (older JSON: one)."""
    runs = machine.get("peak_gflops_runs")
    if not runs:
        return ""
    return f"; the better of before the grid {runs[0]:.1f} and after it {runs[-1]:.1f}"


def above_peak(points: list[dict], peak: float) -> list[str]:
    """A warning line when an engine row claims more than the measured peak: then the machine's speed
    moved during the run (or the peak was measured cold), and the shares cannot be read as such."""
    over = [(p, mode) for p in points for mode in MODES if engine_gflops(p, mode) > peak]
    if not over:
        return []
    p, mode = max(over, key=lambda pm: engine_gflops(*pm))
    return [(f"- **Warning:** {len(over)} engine row(s) run above the measured matmul peak (highest "
             f"{engine_gflops(p, mode):.1f} GFLOP/s, {p['cell']} B={p['B']} T={p['T']} H={p['H']} {mode}): "
             "the machine's speed moved during the run, so read the shares of peak with care.")]


def noise(points: list[dict]) -> tuple[float, float]:
    """Median and largest relative inter-quartile range over all measurements."""
    spreads = sorted((s["q3"] - s["q1"]) / s["median"]
                     for p in points for mode in MODES for s in p[mode].values())
    return spreads[len(spreads) // 2], spreads[-1]


def round_trip_note(points: list[dict]) -> list[str]:
    if not recorded_round_trips(points):
        return []
    return [("- **Cores' round trip** (Machine, and per point in the extras tables): nanoseconds for a cache "
             "line to pass from one CPU to the other and back, between threads pinned to the first two CPUs "
             "(`rnnkit/_fused/cores.cpp`), median of 5 rounds of 20,000. A virtual machine cannot see where its "
             "host runs its CPUs: on the Zen 5 box it read ~80 ns at times and ~390–430 ns at others (spells of "
             "seconds to minutes), when whatever moves data between the two threads slows down, the extras more "
             "than the plain engine. The summary gives the extras' cost also over the points timed with the "
             f"cores near (under {NEAR_NS} ns before and after), reported only: the target is judged on every "
             "point.")]


def memory_note(points: list[dict]) -> str:
    if points[0]["peak_bytes"] is None:
        return "- **Peak memory**: not measured in this run (`--no-memory`)."
    return ("- **Peak memory** (last section) = the most bytes torch's CPU allocator holds during one "
            "training step above what it held before it, read from `torch.profiler`'s allocation records "
            "(`tracemalloc` cannot see torch's allocations); not the process RSS. Inference memory is not "
            "measured.")


def method_section(run: dict) -> list[str]:
    b, points = run["budget"], run["points"]
    stats = [s for p in points for mode in MODES for s in p[mode].values()]
    reps, calls = [s["reps"] for s in stats], [s["number"] for s in stats]
    typical, worst = noise(points)
    rep_rule = (f"a fixed {b['fixed_reps']} repetitions of one call" if b["fixed_reps"] else
                f"an adaptive number of repetitions, so that each contender gets about {b['seconds']} s of "
                f"measured time per grid point: ceil({b['seconds']} s / slowest last warm-up call) "
                "repetitions, "
                f"at least {b['min_reps']} and at most {b['max_reps']}; where even {b['max_reps']} "
                "repetitions of one call fall short of that, each repetition times several calls in a row "
                "and records their mean (as timeit's `number`). The budget is sized for the full grid to "
                "finish within about 15 minutes on 2 cores (this run's wall time is in the table above)")
    return ["## How it is measured and how to read it", "",
            "- **Ratio = torch.nn time / rnnkit time.** Above 1, rnnkit is faster; below 1, slower "
            "(0.80 means rnnkit takes 1.25× as long). **Trace overhead** = engine+trace time / engine "
            "time − 1.",
            "- Contenders, all in one process with identical weights (`load_state_dict` from the torch.nn "
            "layer): `torch.nn` (reference); rnnkit **native** (`backend=\"native\"`: torch's fused kernel "
            "behind rnnkit's layer); rnnkit **engine** (`backend=\"engine\"`: rnnkit's scan and hand-written "
            "BPTT); **engine+trace** (the engine inside `rnnkit.trace(layer)`, recording every h_t and "
            "‖∂L/∂h_t‖).",
            "- **Training step** = `zero_grad(set_to_none=True)`, forward, `out.sum().backward()` (BPTT and "
            "the weight gradients; the input does not require a gradient); no optimizer step. "
            "**Inference** = forward under `torch.inference_mode()`.",
            "- Layer: 1 layer, input size I = H, float32, CPU, sequence-first input (T, B, I) drawn from "
            "N(0, 1), zero initial state, torch.nn's default initialisation (seeded).",
            f"- Timing: a warm-up round over the contenders (two when the first is short next to the budget, "
            f"since a first call pays one-time costs), then {rep_rule}. The repetitions are interleaved "
            "(round-robin over the four contenders, the starting contender rotating each round and every "
            "other round in reverse order; Python's "
            "garbage collector paused) so a slow spell of the machine hits all of them alike. Tables show "
            f"**medians** (repetitions used: {min(reps)}–{max(reps)}, calls per repetition: "
            f"{min(calls)}–{max(calls)}); quartiles and every single time are in "
            "the JSON. Spread: the inter-quartile range is typically "
            f"{100 * typical:.1f}% of the median (largest {100 * worst:.1f}%). glibc's malloc thresholds are "
            "fixed for the run (`common.steady_allocator`, see Machine): left to move with what ran before, "
            "they decided whether a contender's fresh buffers came from reused memory or from new pages, "
            "and torch's own kernel measured up to 13% slower at one place of a run than at another.",
            "- **GFLOP/s** counts matrix-product FLOPs only: forward 2·T·B·(I+H)·G·H with G = 1, 4, 3 "
            "gate blocks for RNN, LSTM, GRU; the training step counts 2.5× that: "
            "the backward's dh·U, dU and dV, no dx (the input does not require grad). "
            "**% of peak** divides by the matmul peak above.",
            *above_peak(points, run["machine"]["peak_gflops"]),
            *round_trip_note(points),
            memory_note(points),
            f"- Every rnnkit output was checked against torch.nn's before timing: largest |difference| over "
            f"the grid {max(p['max_abs_diff'] for p in points):.1e}.",
            "- Reproduce: `make bench` (runs `.venv/bin/python benchmarks/bench_layers.py --out "
            "docs/benchmarks.md`); `--json` also writes the raw numbers; `--help` lists the options "
            "(`--cells`, `--reps`, `--quick`, …). Run it on an otherwise idle machine.", ""]


def recorded_runs(out: Path, own: Path | None = None) -> list[tuple[str, dict]]:
    """Runs kept from other machines: the JSON files beside the report named <stem>-<label>.json
    (docs/benchmarks-intel-xeon.json, ...), oldest first, without `own` (the file this run writes)."""
    found = []
    for path in sorted(out.parent.glob(f"{out.stem}-*.json")):
        if own is not None and path.resolve() == own.resolve():
            continue
        try:
            run = json.loads(path.read_text())
            found.append((path.stem[len(out.stem) + 1:], run, run["machine"]["date"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"report: {path} skipped, not a run's JSON ({e})", file=sys.stderr)
    return [(label, run) for label, run, _ in sorted(found, key=lambda f: f[2])]


def brief(c: Check) -> str:
    """A summary cell in a few words: the range and the verdict, and the worst point where it fails."""
    if c.verdict == "n/a":
        return "not in the grid"
    span, _, worst = c.value.partition(" (worst: ")
    return f"{span} **{c.verdict}**" + (f" ({worst}" if c.verdict == "FAIL" else "")


def machines_section(run: dict, others: list[tuple[str, dict]], stem: str = "benchmarks") -> list[str]:
    """Issue 5's verdicts of this run beside those of the runs recorded on other machines, so that a target
    missed on one machine stays in sight whichever machine ran `make bench` last."""
    if not others:
        return []
    cols = [("this run", run), *others]
    verdicts = [{c.what: c for c in checks(r["points"]) if c.issue == 5} for _, r in cols]
    facts = [("CPU", lambda m: m["cpu"]), ("rnnkit commit", lambda m: f"`{m['rnnkit_commit']}`"),
             ("date", lambda m: m["date"][:10]), ("matmul peak, GFLOP/s", lambda m: f"{m['peak_gflops']:.0f}")]
    rows = ["| | " + " | ".join(f"**{label}**" for label, _ in cols) + " |", "|---|" + "---|" * len(cols)]
    rows += [f"| {name} | " + " | ".join(fact(r["machine"]) for _, r in cols) + " |" for name, fact in facts]
    for c in (c for c in checks(run["points"]) if c.issue == 5):
        cells = ("—" if c.what not in v else brief(v[c.what]) for v in verdicts)
        target = "report only" if c.target.startswith("none") else c.target
        rows.append(f"| {c.what} ({target}) | " + " | ".join(cells) + " |")
    files = ", ".join(f"`{stem}-{label}.json`" for label, _ in others)
    return ["## Issue 5 on every recorded machine", "",
            (f"This run beside the runs kept from the other machines the project has measured on (their raw "
             f"numbers beside this file: {files}; `--from-json` renders any of them in full). Training step, "
             "issue 5's targets; each run at its own commit."), "",
            *rows, ""]


def render(run: dict, others: list[tuple[str, dict]] = (), stem: str = "benchmarks",
           source: str | None = None) -> tuple[str, str]:
    """The markdown document, and its summary table (printed on stdout at the end of a run); `others`:
    runs recorded on other machines (recorded_runs; their files `<stem>-<label>.json`), whose verdicts
    follow the summary; `source`: the JSON file it is rendered from (--from-json), if not a fresh run."""
    points, peak, m = run["points"], run["machine"]["peak_gflops"], run["machine"]
    summary = summary_table(checks(points))
    made = ("Generated by `make bench` (`benchmarks/bench_layers.py`)" if source is None else
            f"Rendered from `{source}` (`benchmarks/bench_layers.py --from-json`): the run of {m['date'][:10]} "
            f"on {m['cpu']}, rnnkit commit `{m['rnnkit_commit']}`")
    lines = ["# Benchmarks: rnnkit against torch.nn", "",
             made + "; do not edit by hand."
             + (" **Quick smoke-test grid: not the real benchmark.**" if run["quick"] else ""), "",
             "## Summary", "",
             "Computed from the tables below. Ratios are torch.nn time / rnnkit time (> 1: rnnkit faster). "
             "Issue 2 is the core issue's acceptance; issue 5 holds the speed issue's targets.", "",
             *summary, "", *machines_section(run, list(others), stem), *machine_section(run), *method_section(run)]
    for mode in MODES:
        lines += [f"## {MODE_TITLES[mode]}", ""]
        for cell in run["cells"]:
            lines += [f"### {NAMES[cell]}", "", *timing_table([p for p in points if p["cell"] == cell],
                                                              mode, peak), ""]
    if points and points[0]["peak_bytes"] is not None:
        lines += ["## Peak memory of a training step", ""]
        for cell in run["cells"]:
            lines += [f"### {NAMES[cell]}", "", *memory_table([p for p in points if p["cell"] == cell]), ""]
    lines += [*extras_section(run), *profile_section(run)]
    return "\n".join(lines), "\n".join(summary)


# -- the run ---------------------------------------------------------------------------------------------
