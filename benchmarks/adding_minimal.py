"""Can minGRU / minLSTM solve the adding problem at T = 200?  (issue 5, target: test MSE < 0.01)

    .venv/bin/python benchmarks/adding_minimal.py --out /tmp/adding.md     # about 10 minutes
    .venv/bin/python benchmarks/adding_minimal.py --steps 50 --seeds 0      # smoke test

Data: rnnkit.data.synthetic.adding (values U[0, 1], one marker in each half, target = the sum of the
two marked values; always answering the mean gives MSE = 1/6 = 0.167). Fresh training batches each
step from one generator; a fixed test set of 2000 sequences from another.
Model: one MinGRU / MinLSTM layer (batch_first, scan="blocked") and a linear head on the last output.
Adam, lr 1e-2, divided by 10 for the last fifth of the steps; batch 64; MSE loss.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
from script_args import (
    check_writable,
    int_at_least,
    ints_at_least,
    names_from,
    positive_float,
    positive_int,
    write_report,
)
from torch import nn

from rnnkit.data.synthetic import adding
from rnnkit.minimal import MinGRU, MinLSTM

CELLS = {"MinGRU": MinGRU, "MinLSTM": MinLSTM}
BASELINE = 1 / 6


class Model(nn.Module):
    def __init__(self, cell: str, hidden: int):
        super().__init__()
        self.rnn = CELLS[cell](2, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x):                                      # x (B, T, 2) -> (B, 1)
        return self.head(self.rnn(x)[0][:, -1])


def run(cell: str, seed: int, T: int, steps: int, hidden: int, batch: int, lr: float) -> dict:
    torch.manual_seed(seed)
    model = Model(cell, hidden)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [int(steps * 0.8)], 0.1)
    x_test, y_test = adding(2000, T, gen=10_000 + seed)
    gen = torch.Generator().manual_seed(seed)
    curve, start = [], time.perf_counter()
    for i in range(1, steps + 1):
        x, y = adding(batch, T, gen=gen)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if i % max(1, steps // 10) == 0 or i == steps:
            curve.append((i, test_mse(model, x_test, y_test)))
    seconds = time.perf_counter() - start
    solved = next((i for i, mse in curve if mse < 0.01), None)
    return {"cell": cell, "seed": seed, "test_mse": curve[-1][1], "seconds": seconds,
            "first_check_below_0.01": solved, "curve": curve}


@torch.no_grad()
def test_mse(model, x, y) -> float:
    return float(nn.functional.mse_loss(model(x), y))


def table(results: list[dict], T: int, steps: int) -> str:
    rows = [f"| cell | seed | test MSE after {steps} steps | below 0.01 from step | training time (s) |",
            "|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['cell']} | {r['seed']} | {r['test_mse']:.4f} | {r['first_check_below_0.01'] or '-'} "
                    f"| {r['seconds']:.0f} |")
    return f"Adding problem, T = {T} (baseline MSE {BASELINE:.3f}).\n\n" + "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--length", type=int_at_least(2), default=200, help="sequence length T (default 200)")
    ap.add_argument("--steps", type=positive_int, default=1500, help="Adam steps per run (default 1500)")
    ap.add_argument("--seeds", type=ints_at_least(0), default=(0, 1, 2), help="comma-separated (default 0,1,2)")
    ap.add_argument("--cells", type=names_from(CELLS), default=tuple(CELLS), help="default MinGRU,MinLSTM")
    ap.add_argument("--hidden", type=positive_int, default=64)
    ap.add_argument("--batch", type=positive_int, default=64)
    ap.add_argument("--lr", type=positive_float, default=1e-2)
    ap.add_argument("--out", help="write the markdown table here")
    ap.add_argument("--json", help="write the results (with test-MSE curves) here")
    args = ap.parse_args(argv)
    check_writable(ap, args.out, args.json)
    torch.set_num_threads(1)
    results = []
    for cell in args.cells:
        for seed in args.seeds:
            r = run(cell, seed, args.length, args.steps, args.hidden, args.batch, args.lr)
            results.append(r)
            print(f"{cell} seed {seed}: test MSE {r['test_mse']:.4f} in {r['seconds']:.0f} s "
                  f"(curve {[(i, round(m, 4)) for i, m in r['curve']]})", flush=True)
    write_report(table(results, args.length, args.steps) + "\n", args.out, args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
