"""Timing helpers for the benchmarks: machine facts, matmul peak, where the host runs the two CPUs,
interleaved timing with a repetition budget, peak memory. What the scripts share on their command lines is
in `script_args.py`.

Everything here but the cores' round trip (an op of rnnkit's kernel) is independent of rnnkit;
`bench_layers.py` puts it together.
"""
from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

REPO = Path(__file__).resolve().parent.parent


# -- the machine ---------------------------------------------------------------------------------------

def cpu_count() -> int:
    """Cores this process may run on (the affinity mask, not the whole host)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                                   # not Linux
        return os.cpu_count() or 1


def cpuinfo(*keys: str) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo named in `keys` (those found; nothing off Linux)."""
    found: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in keys and key.strip() not in found:
                found[key.strip()] = value.strip()
    except OSError:
        pass
    return found


def cpu_model() -> str:
    """The CPU's name, with its family and model numbers where the name alone leaves the generation open
    (a 2-core AMD EPYC reads "AMD EPYC" on Zen 3, 4 and 5 alike)."""
    info = cpuinfo("model name", "cpu family", "model")
    name = info.get("model name") or platform.processor() or "unknown"
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']}, model {info['model']})"
    return name


def git_revision() -> str:
    """Short commit of the repository, with '+dirty' if rnnkit/ has uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    try:
        rev = git("rev-parse", "--short", "HEAD")
        return rev + ("+dirty" if git("status", "--porcelain", "--", "rnnkit") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_facts() -> dict:
    return {
        "cpu": cpu_model(),
        "cores": cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "rnnkit_commit": git_revision(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def matmul_peak_gflops(n: int = 2048, reps: int = 5, warmup_s: float = 0.5) -> float:
    """GFLOP/s of an n x n float32 matrix product (2 n^3 FLOPs): median of `reps`, after at least
    `warmup_s` seconds of the same product; the better of torch.mm (torch's BLAS, MKL on x86 wheels) and
    oneDNN's product (torch.ops.mkldnn._linear_pointwise, which rnnkit's kernel also takes where it is
    faster): on a 2-core AMD EPYC (Zen 4) MKL's ran at 180 GFLOP/s and oneDNN's at 420, so MKL's alone
    is no hardware limit there.

    A single warm-up call was not enough either: on that EPYC the first product of a fresh process
    read 106.6 GFLOP/s where the same product ran at 170 a minute later (clocks and the thread pool
    coming up, a neighbour's load). `bench_layers.py` measures before and after its grid and keeps the
    better of the two.
    """
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    products = [lambda: torch.mm(a, b, out=out)]
    linear = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if linear is not None and torch.backends.mkldnn.is_available():
        bt = b.t().contiguous()
        products.append(lambda: linear(a, bt, None, "none", [], ""))
    best = 0.0
    for product in products:
        deadline = time.perf_counter() + warmup_s
        product()
        while time.perf_counter() < deadline:
            product()
        best = max(best, 2 * n ** 3 / statistics.median([time_once(product) for _ in range(reps)]) / 1e9)
    return best


def core_round_trip_ns() -> float | None:
    """Nanoseconds for a cache line to pass from one CPU to the other and back: threads pinned to the first two
    CPUs of the process (rnnkit's kernel, `rnnkit/_fused/cores.cpp`); None without the kernel or two CPUs.
    A 2-vCPU virtual machine cannot see where its host runs the two vCPUs. On the Zen 5 box this read ~80 ns
    at times and ~390-430 ns at others, in spells of seconds to minutes (the vCPUs far apart), when whatever moves
    data between the two threads slows down: the layer_norm training step more than the plain one (RNN
    B=32 T=100 H=64: 1.15x the plain engine near, 1.32x far, extras_cores.py; docs/benchmarks.md, "the box's slow
    mode")."""
    from rnnkit import _fused
    if not _fused.available():
        return None
    try:
        ns = float(_fused.build().core_round_trip_ns())
    except (AttributeError, RuntimeError):             # a checkout from before the op (extras_ab --base)
        return None
    return ns if ns > 0 else None


# A round trip under this many ns before and after a timing: the two threads ran on CPUs near each other (the Zen
# 5 box: ~80 ns near, ~390-430 ns in its slow mode).
NEAR_NS = 200


def placement(*trips: float | None) -> str:
    """Where the two CPUs were while something was timed, from the round trips taken around it: "near" (all
    under NEAR_NS), "far", or "not measured" (a reading missing, or none at all)."""
    if not trips or any(t is None for t in trips):
        return "not measured"
    return "near" if max(trips) < NEAR_NS else "far"


@contextlib.contextmanager
def round_trips_around():
    """The cores' round trip before and after the block: a list, [before] inside it, [before, after] after."""
    trips = [core_round_trip_ns()]
    yield trips
    trips.append(core_round_trip_ns())


def steady_allocator(mmap_mib: int = 32, trim_mib: int = 1024) -> str:
    """Fix glibc malloc's two thresholds for the rest of the process, and say what was set.

    By default glibc moves them as the process runs: a freed mmap'd block raises the threshold under
    which blocks come from the heap (up to 32 MiB), and the heap's free top goes back to the OS past a
    trim threshold. So whether a contender's fresh (T, B, H) buffers come from reused heap memory or
    from new pages, each paying a page fault and the kernel's zeroing per 4 KiB, depended on what ran
    before it in the process: the same call of torch's own kernel measured 66 ms or 75 ms at inference
    RNN B=64 T=200 H=512 depending on its place in the run. Fixed, blocks up to 32 MiB come from the
    heap and freed memory stays in the process, for every contender alike (rnnkit's fused kernel keeps
    its own buffer pool, so this helps torch.nn more than the engine).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "the platform's default (no glibc mallopt)"
    m_trim_threshold, m_mmap_threshold = -1, -3                  # malloc.h
    if not (mallopt(m_mmap_threshold, mmap_mib << 20) and mallopt(m_trim_threshold, trim_mib << 20)):
        return "glibc's default (mallopt refused the thresholds)"
    return f"glibc, fixed: blocks up to {mmap_mib} MiB from the heap, trim past {trim_mib} MiB (mallopt)"


# -- timing ----------------------------------------------------------------------------------------------

def time_once(fn: Callable[[], object], number: int = 1) -> float:
    """Seconds per call of `fn`, from `number` calls in a row."""
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def plan_reps(probe_s: float, budget_s: float, lo: int, hi: int) -> tuple[int, int]:
    """(repetitions, calls per repetition) so that a contender whose call takes `probe_s` gets about
    `budget_s` of measured time: repetitions clamped to [lo, hi]; a fast call is repeated within each
    repetition (as timeit's `number`) so that the budget is still spent and one hiccup weighs less."""
    reps = max(lo, min(hi, math.ceil(budget_s / max(probe_s, 1e-9))))
    number = max(1, round(budget_s / (reps * max(probe_s, 1e-9))))
    return reps, number


def interleaved(fns: dict[str, Callable[[], object]], reps: int, number: int = 1) -> dict[str, list[float]]:
    """Time each function `reps` times (each time: seconds per call over `number` calls), round-robin
    over the contenders so that a slow spell of the machine hits all of them alike. The starting
    contender rotates each round, and every other round runs the order backwards, so that no contender
    always follows the same one: with the rotation alone torch.nn's GRU always ran just before rnnkit's
    native GRU (the same torch kernel), which read 0.94-0.96x of it at B=64 T=100 H=512 on the Zen 5
    EPYC in two full runs, and 1.02x (314 against 320 ms) timed alternately."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(reps):
        order = [names[(r + i) % len(names)] for i in range(len(names))]
        for name in (order[::-1] if r % 2 else order):
            times[name].append(time_once(fns[name], number))
    return times


def summarize(times: list[float]) -> dict:
    """Median and inter-quartile range (seconds) of repeated timings."""
    if len(times) >= 2:
        q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    else:
        q1 = q3 = times[0]
    return {"median": statistics.median(times), "q1": q1, "q3": q3, "reps": len(times)}


@dataclass(frozen=True)
class Budget:
    seconds: float              # measured time to aim for, per contender and grid point
    min_reps: int
    max_reps: int
    fixed_reps: int | None      # --reps: this many, no adaptation


def warm_up(steps: dict, budget: Budget) -> tuple[float, dict]:
    """One round of calls; a second if the first was short next to the budget (a first call pays
    one-time costs, so it would under-size the repetitions). Returns the slowest contender's time in
    the last round, and each contender's last return value."""
    for _ in range(2):
        probe, values = 0.0, {}
        for name, fn in steps.items():
            start = time.perf_counter()
            values[name] = fn()
            probe = max(probe, time.perf_counter() - start)
        if probe >= budget.seconds:
            break
    return probe, values


def measure(steps: dict, budget: Budget) -> tuple[dict, dict]:
    """Warm-up, then interleaved repetitions sized by the warm-up's times.
    Returns per-contender statistics and the warm-up's return values."""
    probe, values = warm_up(steps, budget)
    if budget.fixed_reps:
        reps, number = budget.fixed_reps, 1
    else:
        reps, number = plan_reps(probe, budget.seconds, budget.min_reps, budget.max_reps)
    gc.collect()
    gc.disable()                                  # as timeit does: no collector pauses inside a timing
    try:
        times = interleaved(steps, reps, number)
    finally:
        gc.enable()
    stats = {name: {**summarize(ts), "number": number, "times": ts} for name, ts in times.items()}
    return stats, values


# -- memory ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _silenced_stderr():
    """Silence file descriptor 2 (the profiler's C++ side prints start/stop lines and warnings there)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


def peak_alloc_bytes(fn: Callable[[], object]) -> int:
    """Peak of the bytes torch's CPU allocator holds during `fn()`, above what it held before.

    Read from the profiler's allocation records (every tensor allocation and free, in time order);
    tracemalloc cannot see torch's allocations. Frees of blocks allocated before the call are not
    recorded, so call it with the step's inputs ready and the old gradients already released.
    """
    with _silenced_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for e in events:
        held += e.nbytes()
        peak = max(peak, held)
    return peak
