"""`rnnkit memory`: long-range memory benchmarks, and the clipping study."""
from __future__ import annotations

import json
import sys
from dataclasses import fields, replace
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..tasks import memory
from .common import SEEDS, comma_list, finite_float, output_folder, parse_cells

EPILOG = """examples:
  rnnkit memory --task adding --length 50,100 --cell rnn,lstm,gru --steps 2000 --seed 0,1,2
  rnnkit memory --task digits --length 8 --cell gru --steps 1500
  rnnkit memory --task adding --length 200 --cell mingru,minlstm --lr 1e-2 --batch-size 64
  rnnkit memory --clip-study --clip-norm 1        # IRNN (relu, U = I), SGD: without and with clipping
writes OUT/results.json (every run: config, test metric, baseline, loss and gradient-norm curves) and
OUT/curves.png (those curves, every run);
--clip-study writes OUT/clip_study.json and OUT/clip_study.png instead.
"""

# The exploding configuration of the clip study (flags given on the command line override it):
# a relu RNN with U = I (Le et al.'s IRNN) trained by SGD on the adding problem.
CLIP_PRESET = dict(task="adding", length=30, cell="rnn", nonlinearity="relu", recurrent_init="identity",
                   optimizer="sgd", lr=0.01, hidden_size=64, steps=3000)

FLAGS = [  # (flag, field, type, help)
    ("--task", "task", str, f"one of {', '.join(memory.TASKS)} (default adding)"),
    ("--hidden-size", "hidden_size", int, "hidden units H (default 128)"),
    ("--num-layers", "num_layers", int, "stacked layers (default 1)"),
    ("--nonlinearity", "nonlinearity", str, "Elman RNN activation: tanh | relu (default tanh)"),
    ("--steps", "steps", int, "training steps, one batch each (default 2000)"),
    ("--batch-size", "batch_size", int, "sequences per step (default 50)"),
    ("--lr", "lr", finite_float, "learning rate (default 1e-3)"),
    ("--optimizer", "optimizer", str, "adam | sgd (SGD with momentum 0.9; default adam)"),
    ("--clip-norm", "clip_norm", finite_float, "clip the global gradient norm to this (default: no clipping)"),
    ("--recurrent-init", "recurrent_init", str, "U init: default (torch.nn) | identity (IRNN) | orthogonal"),
    ("--recurrent-scale", "recurrent_scale", finite_float, "multiply U by this after its init (default 1)"),
    ("--test-size", "test_size", int, "held-out sequences for synthetic tasks (default 1000)"),
    ("--backend", "backend", str, "auto (torch's fused kernel for the plain layer) | engine (rnnkit's engine: "
                                  "on CPU its training step is faster, docs/benchmarks.md) (default auto)"),
]


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("memory", help="long-range memory benchmarks (adding, copy, order, digits, mnist1d)",
                              description=__doc__, epilog=EPILOG)
    p.add_argument("--length", default=None, help="sequence length(s) T, comma-separated (default per task)")
    p.add_argument("--cell", default=None, help=f"cells, comma-separated among {','.join(memory.CELLS)} (default lstm; "
                                                "mingru, minlstm: Feng et al.'s minimal cells, a parallel scan)")
    p.add_argument("--seed", default="0", help="seed(s), comma-separated; results are averaged over them")
    for flag, dest, typ, text in FLAGS:
        p.add_argument(flag, dest=dest, type=typ, default=None, help=text)
    p.add_argument("--clip-study", action="store_true",
                   help="train one exploding configuration without and with --clip-norm (default 1)")
    p.add_argument("--out", default="runs/memory", help="output folder (default runs/memory)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def _cells(args) -> tuple[str, ...]:
    return parse_cells(args.cell or ("rnn" if args.clip_study else "lstm"), memory.CELLS)


def base_config(args) -> memory.MemoryConfig:
    """MemoryConfig from the flags given (the clip preset under them in --clip-study mode), for the rnn
    among --cell (else the first cell with a recurrent weight U, else the first cell): the other cells get
    theirs from memory.for_cell."""
    cells = _cells(args)
    given = {f.name: getattr(args, f.name) for f in fields(memory.MemoryConfig)
             if f.name not in ("length", "cell", "seed") and getattr(args, f.name, None) is not None}
    preset = dict(CLIP_PRESET, clip_norm=1.0) if args.clip_study else {}
    task = given.get("task", preset.get("task", "adding"))
    if task != preset.get("task", task):
        del preset["length"]                                       # T = 30 is for the preset's task
    if "rnn" not in cells:
        if "nonlinearity" in given:
            raise UserError(f"--nonlinearity applies to the Elman RNN (--cell rnn) only; --cell {','.join(cells)} "
                            "has none: leave --nonlinearity out")
        preset.pop("nonlinearity", None)
    with_u = [c for c in cells if c in memory.RECURRENT]
    if not with_u:                                                  # the min cells: no U to initialise
        preset.pop("recurrent_init", None)
    cell = "rnn" if "rnn" in cells else (with_u or cells)[0]
    cfg = {"length": memory.DEFAULT_LENGTH.get(task, 100), **preset, **given, "cell": cell}
    return memory.MemoryConfig(**cfg)


def run(args) -> int:
    base = base_config(args)
    cells = _cells(args)
    lengths = comma_list(args.length, "--length", "50,100", int) if args.length else [base.length]
    seeds = comma_list(args.seed, "--seed", "0,1,2", int)
    if not all(SEEDS[0] <= s < SEEDS[1] for s in seeds):
        raise UserError(f"--seed values must lie in [0, 2**32), got {args.seed!r}")
    if args.clip_study and max(len(cells), len(lengths), len(seeds)) > 1:
        lists = [f"{flag} {text}" for flag, text, n in (("--cell", args.cell, len(cells)),
                                                       ("--length", args.length, len(lengths)),
                                                       ("--seed", args.seed, len(seeds))) if n > 1]
        raise UserError(f"--clip-study trains one configuration: give one value each; got {', '.join(lists)}")
    for L in lengths:
        for c in cells:
            memory.for_cell(base, c, length=L)                    # validate every run (and its size) before the first
    out = output_folder(args.out)
    if args.clip_study:
        cfg = memory.for_cell(base, cells[0], length=lengths[0], seed=seeds[0])
        return run_clip_study(cfg, out, not args.no_progress)
    results = []

    def save(r):
        results.append(r)
        print(_row(r), flush=True)
        (out / "results.json").write_text(json.dumps({"runs": [x.to_dict() for x in results],
                                                      "summary": summarise(results)}, indent=1))
    print(_header(), flush=True)
    for seed in seeds:
        memory.run_grid(replace(base, seed=seed), cells, lengths, not args.no_progress, save)
    if len(seeds) > 1:
        print(f"\nmean over seeds {','.join(map(str, seeds))}:")
        for s in summarise(results):
            mean = "diverged" if s["mean"] is None else f"{s['mean']:.4f}"
            per = ", ".join("diverged" if v is None else f"{v:.4f}" for v in s["per_seed"])
            print(f"  {s['task']:<8} T={s['length']:<5} {s['cell']:<7} {s['metric']} {mean} "
                  f"(per seed {per}; baseline {s['baseline']:.4f})")
    curves = {f"{r.config.cell} T={r.config.length} seed {r.config.seed}": r.to_dict() for r in results}
    title = f"{base.task}: training loss and gradient norm, {len(results)} run(s)"
    from ..diagnostics import plots
    plots.training_curves(curves, out / "curves.png", title)
    print(f"wrote {out / 'results.json'} ({len(results)} runs), {out / 'curves.png'}")
    return 0


def _header() -> str:
    return f"{'task':<8} {'T':>5} {'cell':<7} {'seed':>4} {'metric':<14} {'test':>9} {'baseline':>9} {'steps':>6} {'time s':>7}"


def _row(r: memory.RunResult) -> str:
    c = r.config
    score = "diverged" if r.diverged else f"{r.test[r.metric]:.4f}"
    return (f"{c.task:<8} {c.length:>5} {c.cell:<7} {c.seed:>4} {r.metric:<14} {score:>9} "
            f"{r.baseline:>9.4f} {r.steps_done:>6} {r.seconds:>7.1f}")


def summarise(results: list[memory.RunResult]) -> list[dict]:
    """Mean over seeds for each (task, length, cell)."""
    groups: dict[tuple, list] = {}
    for r in results:
        groups.setdefault((r.config.task, r.config.length, r.config.cell), []).append(r)
    return [{"task": t, "length": L, "cell": c, "metric": rs[0].metric, "baseline": rs[0].baseline,
             "per_seed": [r.to_dict(False)["score"] for r in rs], "mean": _mean_or_none(rs),
             "diverged": sum(r.diverged for r in rs), "seconds": round(sum(r.seconds for r in rs), 1)}
            for (t, L, c), rs in groups.items()]


def _mean_or_none(rs: list[memory.RunResult]):
    """Mean score over seeds; None when any run diverged (no score to average)."""
    scores = [r.test[r.metric] for r in rs]
    return None if any(r.diverged for r in rs) else float(np.mean(scores))


def run_clip_study(cfg: memory.MemoryConfig, out: Path, progress: bool) -> int:
    from ..diagnostics import plots
    runs = memory.clip_study(cfg, cfg.clip_norm, progress)
    width = max(len(label) for label in runs)
    print(f"{'run':<{width}} {_header()}")
    for label, r in runs.items():
        print(f"{label:<{width}} {_row(r)}" + ("   (diverged: loss NaN or blown up)" if r.diverged else ""))
    data = {label: r.to_dict() for label, r in runs.items()}
    (out / "clip_study.json").write_text(json.dumps(data, indent=1))
    cell = f"{cfg.cell} {cfg.nonlinearity}" if cfg.cell == "rnn" else cfg.cell
    init = f", U init {cfg.recurrent_init} x{cfg.recurrent_scale:g}" if cfg.cell in memory.RECURRENT else ""
    title = f"{cfg.task} T={cfg.length}, {cell} H={cfg.hidden_size}{init}, {cfg.optimizer} lr {cfg.lr:g}"
    plots.training_curves(data, out / "clip_study.png", title)
    print(f"wrote {out / 'clip_study.json'}, {out / 'clip_study.png'}", file=sys.stderr)
    return 0
