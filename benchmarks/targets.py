"""The issue targets bench_layers.py's report judges a run by: the numbers read off a grid point (ratios to
torch.nn, the trace's overhead, peak memory, the extras' cost), each range over the grid against its bound.
report.py renders them."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from common import NEAR_NS, placement

MODES = ("train", "infer")


def median(point: dict, mode: str, name: str) -> float:
    return point[mode][name]["median"]


def ratio_of(name: str):
    """torch.nn time / rnnkit time for one contender: > 1 means rnnkit is faster."""
    return lambda point, mode: median(point, mode, "torch") / median(point, mode, name)


def trace_overhead(point: dict, mode: str) -> float:
    return median(point, mode, "trace") / median(point, mode, "engine") - 1


def memory_ratio(point: dict, mode: str) -> float:
    return point["peak_bytes"]["engine"] / point["peak_bytes"]["torch"]


def extra_cost(name: str):
    """Time of the engine with an extra / time of the plain engine (training step)."""
    return lambda point, mode: point["extras"][name]["median"] / point["extras"]["engine"]["median"]


def round_trips(point: dict) -> list[float] | None:
    """The cores' round trip (ns) measured before and after the point's extras, or None (older runs, or no
    kernel or second CPU to measure it with)."""
    ns = point.get("core_round_trip_ns")
    return None if not ns or any(v is None for v in ns) else ns


def cores_near(point: dict) -> bool:
    """The point's extras were timed with the two CPUs near each other (common.placement)."""
    return placement(*(point.get("core_round_trip_ns") or ())) == "near"


def where(point: dict) -> str:
    return f"{point['cell']} B={point['B']} T={point['T']} H={point['H']}"


@dataclass(frozen=True)
class Measure:
    """A number read off a grid point for a mode, how to print it, and which way is better."""
    value: Callable[[dict, str], float]
    fmt: Callable[[float], str]
    higher_is_better: bool = True


NATIVE = Measure(ratio_of("native"), "{:.2f}".format)
ENGINE = Measure(ratio_of("engine"), "{:.2f}".format)
OVERHEAD = Measure(trace_overhead, lambda o: f"{o * 100:+.0f}%", higher_is_better=False)
MEMORY = Measure(memory_ratio, lambda r: f"{r:.2f}×", higher_is_better=False)


@dataclass(frozen=True)
class Check:
    issue: int
    what: str
    mode: str
    value: str
    target: str
    verdict: str


def bound_check(issue: int, what: str, mode: str, points: list[dict], m: Measure, bound=None) -> Check:
    """The range of a measure over `points`, its worst point named, judged against `bound`
    (a minimum when higher is better, else a maximum; None: reported only)."""
    sign = "≥ " if m.higher_is_better else "≤ "
    target = "none (report only)" if bound is None else sign + m.fmt(bound)
    if not points:
        return Check(issue, what, mode, "not in this grid", target, "n/a")
    rated = sorted(((m.value(p, mode), p) for p in points), key=lambda vp: vp[0])
    worst, worst_point = rated[0] if m.higher_is_better else rated[-1]
    value = f"{m.fmt(rated[0][0])} … {m.fmt(rated[-1][0])} (worst: {where(worst_point)})"
    if bound is None:
        verdict = "—"
    else:
        verdict = "PASS" if (worst >= bound if m.higher_is_better else worst <= bound) else "FAIL"
    return Check(issue, what, mode, value, target, verdict)


def checks(points: list[dict]) -> list[Check]:
    """The targets of issue 2 (core) and issue 5 (speed), computed from the measurements."""
    def sel(cell, h=lambda H: True):
        return [p for p in points if p["cell"] == cell and h(p["H"])]
    h128, h256, h64 = (lambda H: H >= 128), (lambda H: H >= 256), (lambda H: H == 64)
    found = []
    for mode in MODES:
        found += [bound_check(2, "native / torch.nn, all points", mode, points, NATIVE, 0.97),
                  bound_check(2, "engine GRU, H ≥ 128", mode, sel("gru", h128), ENGINE, 1.0),
                  bound_check(2, "engine RNN (tanh), H ≥ 128", mode, sel("rnn", h128), ENGINE, 1.0),
                  bound_check(2, "engine LSTM, all points", mode, sel("lstm"), ENGINE),
                  bound_check(2, "trace overhead, all points", mode, points, OVERHEAD)]
    mode = "train"
    found += [bound_check(5, "engine GRU, H ≥ 128", mode, sel("gru", h128), ENGINE, 1.5),
              bound_check(5, "engine RNN (tanh), H ≥ 128", mode, sel("rnn", h128), ENGINE, 1.5),
              bound_check(5, "engine LSTM, H ≥ 256", mode, sel("lstm", h256), ENGINE, 1 / 1.2),
              bound_check(5, "engine LSTM, H = 64", mode, sel("lstm", h64), ENGINE, 0.5),
              bound_check(5, "trace overhead, all points", mode, points, OVERHEAD, 0.10)]
    if points and points[0]["peak_bytes"] is not None:
        found.append(bound_check(5, "engine / torch.nn peak memory", mode, points, MEMORY, 1.0))
    timed = [p for p in points if round_trips(p) is not None]
    for name in ("zoneout", "layer_norm"):
        m = Measure(extra_cost(name), lambda r: f"{r:.2f}×", higher_is_better=False)
        found.append(bound_check(5, f"{name} / plain engine", mode, points, m, 1.3))
        if timed:                                     # the same, where the two CPUs were near (round_trips)
            what, near = f"{name} / plain engine, cores near (round trip < {NEAR_NS} ns)", [p for p in timed
                                                                                           if cores_near(p)]
            found.append(bound_check(5, what, mode, near, m) if near else
                         Check(5, what, mode, "no point timed with the cores near", "none (report only)", "—"))
    return found


def summary_table(found: list[Check]) -> list[str]:
    rows = ["| issue | measure | mode | value: min … max | target | verdict |", "|---|---|---|---|---|---|"]
    rows += [f"| {c.issue} | {c.what} | {c.mode} | {c.value} | {c.target} | **{c.verdict}** |" for c in found]
    return rows
