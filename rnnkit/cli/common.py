"""Flags every training command shares, their mapping onto TrainConfig, and a progress-bar helper.

    add_common_flags(p, epochs=300, hidden_size=32, out="runs/forecast")   # --seed --device --epochs ...
    add_train_flags(p, lr=1e-2, batch_size=32)                              # --lr --optimizer ... --resume
    cfg = train_config(args, out="runs/forecast/model")                     # a TrainConfig
    task = config_from(args, ForecastConfig)                                # a task's config from its flags
    sub = add_task(subparsers, "classify", help=..., description=...)       # a command with actions
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import UserError
from ..models.cells import CELLS, RECURRENT
from ..tasks import BACKENDS, MODES, SCHEDULES, TrainConfig


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def folder_name(text: str) -> str:
    """A --out value: not empty (an empty one wrote into the current directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; give an output folder, e.g. --out runs/mine")
    return text


def positive_int_or_none(text: str) -> int | None:
    """A positive int, or None for 'none' / 'off'."""
    return None if text.strip().lower() in ("none", "off") else positive_int(text)


SEEDS = (0, 2**32)                     # [low, high): numpy's range; within torch's with room for the
                                       # offsets tasks add (gradflow seed + 20000 + i, memory seed + 10000)


def seed_int(text: str) -> int:
    value = int(text)
    if not SEEDS[0] <= value < SEEDS[1]:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32), got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def finite_float(text: str) -> float:
    """A number; inf and nan refused (they train NaNs or write bare Infinity into JSON)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def nonnegative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_common_flags(parser: argparse.ArgumentParser, *, epochs: int, hidden_size: int, out: str,
                     num_layers: int = 1, clip_norm: float | None = None) -> None:
    """--seed --device --epochs --hidden-size --num-layers --clip-norm --out (DESIGN §4)."""
    g = parser.add_argument_group("common")
    g.add_argument("--seed", type=seed_int, default=0, help="random seed (default 0)")
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    g.add_argument("--epochs", type=positive_int, default=epochs, help=f"training epochs (default {epochs})")
    g.add_argument("--hidden-size", type=positive_int, default=hidden_size,
                   help=f"hidden units per layer (default {hidden_size})")
    g.add_argument("--num-layers", type=positive_int, default=num_layers,
                   help=f"stacked recurrent layers (default {num_layers})")
    g.add_argument("--clip-norm", type=positive_float, default=clip_norm,
                   help="clip the gradient to this global L2 norm" + (f" (default {clip_norm})" if clip_norm else ""))
    g.add_argument("--out", type=folder_name, default=out, metavar="DIR", help=f"output directory (default {out})")


def add_train_flags(parser: argparse.ArgumentParser, *, lr: float, batch_size: int,
                    schedule: str = "none", threads: int | None = None) -> None:
    """The rest of TrainConfig, one flag per field, plus --resume."""
    g = parser.add_argument_group("training")
    g.add_argument("--lr", type=positive_float, default=lr, help=f"learning rate (default {lr})")
    g.add_argument("--optimizer", default="adam", help="any torch.optim name: adam, adamw, sgd, rmsprop, ...")
    g.add_argument("--weight-decay", type=nonnegative_float, default=0.0, help="weight decay (default 0)")
    g.add_argument("--batch-size", type=positive_int, default=batch_size, help=f"batch size (default {batch_size})")
    g.add_argument("--clip-value", type=positive_float, default=None, help="clamp each gradient entry to [-v, v]")
    g.add_argument("--schedule", choices=SCHEDULES, default=schedule, help=f"learning-rate schedule (default {schedule})")
    g.add_argument("--step-size", type=positive_int, default=10, help="epochs per step of the step/plateau schedule")
    g.add_argument("--gamma", type=positive_float, default=0.5, help="factor of the step/plateau schedule")
    g.add_argument("--patience", type=positive_int_or_none, default=None,
                   help="early stopping: epochs without improvement of --monitor before stopping (needs "
                        "validation; default %(default)s; --patience none: off)")
    # %(default)s: a task's set_defaults (seq2seq watches val_exact_match) shows in its own --help
    g.add_argument("--monitor", default="val_loss", help="metric early stopping watches (default %(default)s)")
    g.add_argument("--mode", choices=MODES, default=None,
                   help="whether a lower (min) or higher (max) --monitor is better (default: from its name: "
                        "min for losses and errors, max for accuracy, F1 and exact match)")
    g.add_argument("--checkpoint-every", type=nonnegative_int, default=10,
                   help="write a checkpoint every N epochs; 0: only at the end (default 10)")
    g.add_argument("--threads", type=positive_int, default=threads,
                   help="torch CPU threads" + (f" (default {threads})" if threads else " (default: torch's choice)"))
    g.add_argument("--backend", choices=BACKENDS, default=None,
                   help="what the recurrent layers run: auto (torch's fused kernel for plain layers, rnnkit's "
                        "engine when an extra needs it) or engine (rnnkit's engine throughout: on CPU its "
                        "training step is faster, docs/benchmarks.md) (default auto)")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    g.add_argument("--resume", action="store_true", help="continue the interrupted run in --out")


# Every parser keeps the line breaks of its description and epilog (the worked examples).
RawTextParser = functools.partial(argparse.ArgumentParser, formatter_class=argparse.RawDescriptionHelpFormatter)


def add_task(subparsers, name: str, *, help: str, description: str):
    """`rnnkit <name> <action>`: the command's parser; returns its sub-parsers for the actions."""
    p = subparsers.add_parser(name, help=help, description=description)
    return p.add_subparsers(dest="action", metavar="<action>", required=True, parser_class=RawTextParser)


def config_from(args: argparse.Namespace, cls):
    """A config dataclass from the parsed flags of the same names (the ones present)."""
    return cls(**_fields_present(args, cls))


def _fields_present(args: argparse.Namespace, cls) -> dict:
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def train_config(args: argparse.Namespace, **fixed) -> TrainConfig:
    """A TrainConfig from the parsed flags (the ones present), `fixed` overriding."""
    values = _fields_present(args, TrainConfig)
    if values.get("progress") is None:
        values["progress"] = sys.stderr.isatty()
    return TrainConfig(**{**values, **fixed})


def epochs_summary(fit, patience: int | None, stopped_by_time: bool = False, steps: int | None = None) -> str:
    """How a run's training ended and whose weights the model holds, for a command's summary line:
    with early stopping on (`patience`), the best epoch's weights are restored whether or not the run
    stopped early; with it off, the model is the last epoch's."""
    text = f"{fit.epochs_run} epoch{'s' if fit.epochs_run != 1 else ''}"
    if fit.stopped_early:
        text = f"stopped early after {text}"
    if steps is not None:
        text += f", {steps} steps"
    if stopped_by_time:
        text += ", stopped at the time limit"
    if patience is not None and fit.best_epoch is not None and fit.best_epoch != fit.epochs_run:
        text += f" (best weights from epoch {fit.best_epoch})"
    return text


def progress_bar(iterable=None, *, total: int | None = None, desc: str = "", enabled: bool | None = None):
    """A tqdm bar on stderr with items/s; off when stderr is not a terminal unless enabled=True."""
    enabled = sys.stderr.isatty() if enabled is None else enabled
    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=False)


# -- list and folder flags of `rnnkit memory` and `rnnkit gradflow` ------------------------------------

def comma_list(text: str, flag: str, example: str, convert=str) -> list:
    """A comma-separated flag value: blanks around entries ignored, empty or repeated entries refused."""
    try:
        values = [convert(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} takes comma-separated integers, e.g. {flag} {example}; got {text!r}") from None
    if not values:
        raise UserError(f"{flag} is empty; pass e.g. {flag} {example}")
    repeated = list(dict.fromkeys(v for v in values if values.count(v) > 1))
    if repeated:
        raise UserError(f"{flag} lists {', '.join(map(str, repeated))} more than once; give each value once")
    return values


def parse_cells(text: str, known) -> tuple[str, ...]:
    """--cell of `rnnkit memory` and `rnnkit gradflow`: a comma list of cells among `known`."""
    cells = tuple(comma_list(text, "--cell", ",".join(list(known)[:3])))
    bad = [c for c in cells if c not in known]
    if bad:
        raise UserError(f"--cell: unknown cell(s) {', '.join(bad)}; choose among {', '.join(known)}")
    return cells


def check_backend_has_cells(backend: str | None, cells: str | None) -> None:
    """--backend engine picks what rnnkit's RNN/LSTM/GRU run; a command whose --cell lists only minimal cells
    (no U; they always run rnnkit's scan) has nothing it could change: refused rather than ignored."""
    names = [c.strip() for c in str(cells or "").split(",") if c.strip()]
    if backend not in BACKENDS or backend == "auto":       # None, auto, or a bad name (the task's own message)
        return
    if names and all(c in CELLS and c not in RECURRENT for c in names):
        raise UserError(f"--backend applies to cells with a recurrent weight U ({', '.join(RECURRENT)}); "
                        f"--cell {','.join(names)} has none (it always runs rnnkit's scan): leave --backend out")


def output_folder(text: str) -> Path:
    """--out of `rnnkit memory` and `rnnkit gradflow`, created: a folder this user can write."""
    if not text.strip():
        raise UserError("--out is empty; give an output folder, e.g. --out runs/mine")
    try:
        out = Path(text)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {text}: cannot create this folder ({e.strerror}); give a folder this user can "
                        "write, not an existing file") from None
    return out
