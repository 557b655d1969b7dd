"""Where the time of one training step goes: torch.profiler's operator table for torch.nn and for the
engine at one grid point, grouped into a few kinds of work. Used by bench_layers.py (`make bench`).

Groups (by operator name): the fused scan (rnnkit's C++ time loop, forward and backward, which holds
the per-step recurrent products and the gate math), matrix products outside it (the input product
x V^T for all steps, dV, dU, and for torch.nn every per-step product), elementwise and reductions
(gates, their derivatives, bias sums), and the rest (copies, allocation, autograd bookkeeping).
"""
from __future__ import annotations

import torch
from torch.profiler import ProfilerActivity, profile

GROUPS = (
    ("fused scan (C++ time loop)", ("rnnkit_fused",)),
    ("matrix products", ("mm", "addmm", "matmul", "linear", "bmm", "baddbmm", "mkldnn_rnn", "_mkldnn")),
    ("elementwise and reductions", ("sigmoid", "tanh", "mul", "add", "sub", "sum", "threshold", "relu",
                                    "rsub", "neg", "div", "_backward", "layer_norm", "bernoulli")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for title, keys in GROUPS:
        if any(k in low for k in keys):
            return title
    return "copies, allocation, autograd"


def profile_steps(step, calls: int = 3) -> dict:
    """Self CPU time per operator over `calls` calls of `step` (after one warm-up call), in seconds
    per call, and the same summed by group."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    ops = {}
    for e in prof.key_averages():
        if e.self_cpu_time_total > 0:
            ops[e.key] = ops.get(e.key, 0.0) + e.self_cpu_time_total / 1e6 / calls
    groups: dict[str, float] = {}
    for name, sec in ops.items():
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + sec
    top = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:6])
    return {"groups": groups, "top_ops": top, "total": sum(ops.values())}


def profile_table(profiles: dict[str, dict]) -> list[str]:
    """One row per group, one column per contender: ms per step and share of its profiled time."""
    names = list(profiles)
    titles = [t for t, _ in GROUPS] + ["copies, allocation, autograd"]
    rows = ["| work | " + " | ".join(f"{n} ms (share)" for n in names) + " |",
            "|---|" + "--:|" * len(names)]
    for t in titles:
        cells = []
        for n in names:
            sec, total = profiles[n]["groups"].get(t, 0.0), profiles[n]["total"]
            cells.append(f"{sec * 1e3:.1f} ({100 * sec / total:.0f}%)" if sec else "—")
        rows.append(f"| {t} | " + " | ".join(cells) + " |")
    rows.append("| **total (profiled self time)** | "
                + " | ".join(f"**{profiles[n]['total'] * 1e3:.1f}**" for n in names) + " |")
    return rows


def top_ops_lines(profiles: dict[str, dict]) -> list[str]:
    out = []
    for n, prof in profiles.items():
        ops = ", ".join(f"`{k}` {v * 1e3:.1f} ms" for k, v in prof["top_ops"].items())
        out.append(f"- {n}: {ops}")
    return out
