"""The log-space scan in one piece (Heinsen's formula over the whole sequence, as rnnkit ran it before
d4aeea7) against rnnkit's chunked log scan (parallel.log_scan): MinGRU training step, T = 4096, B = 8,
I = 16, H = 256, float32, 5 interleaved repetitions (median, min), and the relative error of the output
and of the input-weight gradient against the float64 blocked scan.

    .venv/bin/python benchmarks/log_scan_accuracy.py      # about 20 seconds
"""
import statistics
import time

import torch

import rnnkit as rk
from rnnkit import minimal, parallel


def one_piece(log_a, log_b, h0=None):
    a_star = torch.cumsum(log_a, 0)
    h = torch.exp(a_star + torch.logcumsumexp(log_b - a_star, 0))
    return h if h0 is None else h + torch.exp(a_star) * h0


def rel(a, b) -> float:
    return ((a.double() - b).abs().max() / b.abs().max()).item()


def main() -> None:
    torch.manual_seed(0)
    m, x = rk.MinGRU(16, 256, scan="log"), torch.randn(4096, 8, 16)
    ref = rk.MinGRU(16, 256, scan="blocked").double()
    ref.load_state_dict(m.state_dict())
    want = ref(x.double())[0]
    want.pow(2).mean().backward()
    scans = {"one piece": one_piece, "chunks of 64": parallel.log_scan}
    times = {name: [] for name in scans}
    try:
        for rep in range(5):
            for name, scan in scans.items():
                minimal.log_scan = scan
                m.zero_grad()
                t0 = time.perf_counter()
                out = m(x)[0]
                out.pow(2).mean().backward()
                times[name].append(time.perf_counter() - t0)
                if rep == 0:
                    print(f"{name}: output error {rel(out, want):.2e}, weight-gradient error "
                          f"{rel(m.weight_ih_l0.grad, ref.weight_ih_l0.grad):.2e}")
    finally:
        minimal.log_scan = parallel.log_scan
    for name, t in times.items():
        print(f"{name}: median {statistics.median(t) * 1e3:.0f} ms, min {min(t) * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
