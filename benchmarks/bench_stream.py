"""Streaming latency: one time step of rk.Stream against torch.nn on a length-1 sequence, state carried.

    .venv/bin/python benchmarks/bench_stream.py --out /tmp/stream.md      # about 2 minutes
    .venv/bin/python benchmarks/bench_stream.py --quick                    # seconds

Contenders per cell (RNN tanh, LSTM, GRU) and hidden size H (input size I = H, batch 1, float32):
    torch   torch.nn.{RNN,LSTM,GRU}(x (1, 1, I), state) under torch.inference_mode: the baseline
    stream  rk.Stream(layer)(x_t (1, I)): the fused kernels, same weights
    step    rk.stream.step(layer, x_t, state): the functional path (the layer's own cell, plain torch)
Each timing is the mean over `number` consecutive calls; `reps` of them are interleaved round-robin
(common.interleaved) and reported as median and minimum. A second table breaks the LSTM stream call
into its parts (where the time goes).
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch
from common import interleaved, machine_facts, steady_allocator
from script_args import check_writable, positive_int, positive_ints, write_report
from torch import nn

import rnnkit as rk
from rnnkit.stream import Stream, step

CELLS = {"lstm": (nn.LSTM, rk.LSTM), "gru": (nn.GRU, rk.GRU), "rnn": (nn.RNN, rk.RNN)}


def contenders(cell: str, H: int) -> dict:
    ref_cls, rk_cls = CELLS[cell]
    ref = ref_cls(H, H).eval()
    layer = rk_cls(H, H).eval()
    layer.load_state_dict(ref.state_dict())
    x, x_t = torch.randn(1, 1, H), torch.randn(1, H)
    box = {"torch": None, "step": None}
    stream = Stream(layer)

    def torch_call():
        with torch.inference_mode():
            _, box["torch"] = ref(x, box["torch"])

    def step_call():
        with torch.inference_mode():
            _, box["step"] = step(layer, x_t, box["step"])

    return {"torch": torch_call, "stream": lambda: stream(x_t), "step": step_call}


def measure(fns: dict, reps: int, number: int) -> dict:
    for fn in fns.values():                                   # warm-up: allocations, weight caches
        for _ in range(number):
            fn()
    times = interleaved(fns, reps, number)
    return {k: {"median": statistics.median(v), "min": min(v)} for k, v in times.items()}


def breakdown(H: int, reps: int, number: int) -> dict:
    """The LSTM stream call and its parts, each timed alone (interleaved)."""
    layer = rk.LSTM(H, H).eval()
    stream = Stream(layer)
    x_t = torch.randn(1, H)
    stream(x_t)                                                # builds the kernels
    kernel, im = stream._kernels[0], torch.inference_mode()
    ps = list(layer._parameters.values())

    def only_kernel():
        with im:
            kernel()

    def only_addmm():
        with im:
            torch.addmm(kernel.b, kernel.window, kernel.W, out=kernel.P)

    def fixed():                                               # everything but the kernel
        with im:
            [(p._version, p.data_ptr()) for p in ps]
            stream._x.copy_(x_t)
        stream._h[-1].clone()

    fns = {"whole call": lambda: stream(x_t), "kernel (7 ops)": only_kernel, "addmm alone": only_addmm,
           "fixed part": fixed}
    return measure(fns, reps, number)


def table(results: list[dict]) -> str:
    rows = ["| cell | H | torch.nn length-1 (us) | Stream (us) | speed-up median | speed-up min | step() (us) |",
            "|---|---|---|---|---|---|---|"]
    for r in results:
        t, s, f = r["times"]["torch"], r["times"]["stream"], r["times"]["step"]
        rows.append(f"| {r['cell']} | {r['H']} | {t['median'] * 1e6:.1f} | {s['median'] * 1e6:.1f} | "
                    f"**{t['median'] / s['median']:.1f}x** | {t['min'] / s['min']:.1f}x | {f['median'] * 1e6:.1f} |")
    return "\n".join(rows)


def breakdown_table(parts: dict) -> str:
    rows = ["| LSTM H | part | median (us) | min (us) |", "|---|---|---|---|"]
    for H, times in parts.items():
        for name, t in times.items():
            rows.append(f"| {H} | {name} | {t['median'] * 1e6:.1f} | {t['min'] * 1e6:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=positive_ints, default=(32, 64, 128, 256), help="comma-separated hidden sizes")
    ap.add_argument("--reps", type=positive_int, default=60, help="interleaved repetitions per contender")
    ap.add_argument("--number", type=positive_int, default=50, help="calls per timing")
    ap.add_argument("--quick", action="store_true", help="few repetitions, H = 32 and 256")
    ap.add_argument("--out", help="write the markdown tables here")
    ap.add_argument("--json", help="write the raw numbers here")
    args = ap.parse_args(argv)
    check_writable(ap, args.out, args.json)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    allocator = steady_allocator()
    hidden = (32, 256) if args.quick else args.hidden
    reps, number = (5, 20) if args.quick else (args.reps, args.number)
    results = []
    for cell in CELLS:
        for H in hidden:
            results.append({"cell": cell, "H": H, "times": measure(contenders(cell, H), reps, number)})
            print(table(results[-1:]).splitlines()[-1], flush=True)
    parts = {H: breakdown(H, reps, number) for H in (hidden[0], hidden[-1])}
    facts = machine_facts() | {"allocator": allocator}
    text = (f"Per-step latency, batch 1, float32, I = H, one thread; {reps} interleaved timings of "
            f"{number} calls each. Machine: {facts['cpu']}, load average {facts['load_average']}; "
            f"allocator: {allocator}.\n\n"
            f"{table(results)}\n\nWhere the time of one LSTM stream call goes:\n\n{breakdown_table(parts)}\n")
    write_report(text, args.out, args.json, {"facts": facts, "results": results, "breakdown": parts})
    return 0


if __name__ == "__main__":
    sys.exit(main())
