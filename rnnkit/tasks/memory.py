"""Long-range memory benchmarks: train a recurrent layer + linear head and score it on a held-out set.
Cells: the tanh/relu RNN, LSTM and GRU (rnnkit's layers, torch.nn's API), and minGRU / minLSTM
(`rnnkit.minimal`: gates that see only x_t, trained by a parallel scan over time).

    adding   many-to-one regression, MSE; baseline: always answer 1 (MSE 1/6 ≈ 0.167)
    copy     many-to-many classification, cross-entropy per step; baseline 10 ln 8 / (T + 20)
    order    many-to-one, 4 classes, accuracy; baseline: chance 25 %
    digits   many-to-one, 10 classes, accuracy; --length 8 rows of 8 pixels, --length 64 pixels
    mnist1d  many-to-one, 10 classes, accuracy (T = 40); baseline: chance 10 %
Synthetic tasks draw a fresh batch every step and test on 1000 sequences from another seed;
digits and MNIST-1D sample batches from their fixed training split and test on their test split.
The training loop is deliberately small: Adam (or SGD), optional clipping by global norm, a
progress bar, and a stop as soon as the loss is NaN or has blown up (divergence is a result here).
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import layers as rk
from ..cells import ElmanCell, GRUCell, LSTMCell
from ..data import synthetic
from ..errors import UserError, at_least, check_all, finite_positive
from ..minimal import MinGRUCell, MinLSTMCell
from ..models.cells import CELLS, RECURRENT
from ..numerics import flushing_denormals

TASKS = ("adding", "copy", "order", "digits", "mnist1d")
DEFAULT_LENGTH = {"adding": 100, "copy": 50, "order": 100, "digits": 8, "mnist1d": 40}
MIN_LENGTH = synthetic.MIN_LENGTH
GATES = {"rnn": ElmanCell.num_gates, "lstm": LSTMCell.num_gates, "gru": GRUCell.num_gates,   # blocks of H
         "mingru": MinGRUCell.num_gates, "minlstm": MinLSTMCell.num_gates}         # in U (V for min)


@dataclass(frozen=True)
class MemoryConfig:
    """One training run. CLI flags map one to one onto these fields."""
    task: str = "adding"
    length: int = 100
    cell: str = "lstm"
    hidden_size: int = 128
    num_layers: int = 1
    nonlinearity: str = "tanh"          # Elman RNN only: tanh | relu
    steps: int = 2000
    batch_size: int = 50
    lr: float = 1e-3
    optimizer: str = "adam"             # adam | sgd
    clip_norm: float | None = None      # clip the global gradient norm to this
    recurrent_init: str = "default"     # default (torch.nn's) | identity (Le et al.'s IRNN) | orthogonal
    recurrent_scale: float = 1.0        # U is multiplied by this after its init
    seed: int = 0
    test_size: int = 1000               # synthetic tasks only
    diverge_factor: float = 1e4         # stop when the loss exceeds this x the first loss
    backend: str = "auto"               # rnn/lstm/gru: auto (torch's kernel when plain) | engine (rnnkit's)

    def __post_init__(self):
        checks = [
            (self.task in TASKS, f"--task must be one of {', '.join(TASKS)}, got {self.task!r}"),
            (self.cell in CELLS, f"--cell must be among {', '.join(CELLS)}, got {self.cell!r}"),
            (self.nonlinearity in ("tanh", "relu"), f"--nonlinearity must be tanh or relu, got {self.nonlinearity!r}"),
            (self.optimizer in ("adam", "sgd"), f"--optimizer must be adam or sgd, got {self.optimizer!r}"),
            (self.backend in rk.AUTO_CHOICES, f"--backend must be auto or engine, got {self.backend!r}"),
            (self.recurrent_init in ("default", "identity", "orthogonal"),
             f"--recurrent-init must be default, identity or orthogonal, got {self.recurrent_init!r}"),
            (self.cell == "rnn" or self.nonlinearity == "tanh",
             f"--nonlinearity {self.nonlinearity} applies to the Elman RNN (--cell rnn) only; the {self.cell} has none"),
            (self.cell in RECURRENT or (self.recurrent_init, self.recurrent_scale, self.backend) == ("default", 1, "auto"),
             (f"--recurrent-init, --recurrent-scale and --backend apply to cells with a recurrent weight U "
              f"({', '.join(RECURRENT)}); the {self.cell} has none (it always runs rnnkit's scan): leave them out")),
            (self.length >= MIN_LENGTH.get(self.task, 1),
             f"--task {self.task} needs --length >= {MIN_LENGTH.get(self.task, 1)}, got {self.length}"),
            *(at_least(flag, value, 1) for flag, value in (
                ("--hidden-size", self.hidden_size), ("--num-layers", self.num_layers), ("--steps", self.steps),
                ("--batch-size", self.batch_size), ("--test-size", self.test_size))),
            (finite_positive(self.lr, self.recurrent_scale),
             f"--lr and --recurrent-scale must be finite numbers > 0, got {self.lr} and {self.recurrent_scale}"),
            (self.clip_norm is None or finite_positive(self.clip_norm),
             f"--clip-norm must be a finite number > 0 (leave it out for no clipping), got {self.clip_norm}"),
            (self.task != "digits" or self.length in (8, 64),
             f"--task digits reads 8x8 images by rows (--length 8) or by pixels (--length 64), got {self.length}"),
            (self.task != "mnist1d" or self.length == 40, f"--task mnist1d has length 40, got {self.length}"),
        ]
        check_all(checks)
        check_fits(size_terms(self))


@dataclass(frozen=True)
class TaskSpec:
    input_size: int
    output_size: int
    kind: str               # regress (last step) | classify (last step) | classify_all (every step)
    metric: str             # mse | accuracy | cross_entropy
    baseline: float
    baseline_name: str
    higher_is_better: bool


def task_spec(task: str, length: int) -> TaskSpec:
    if task == "adding":
        return TaskSpec(2, 1, "regress", "mse", 1 / 6, "always answer 1", False)
    if task == "copy":
        return TaskSpec(10, 10, "classify_all", "cross_entropy", synthetic.copy_baseline(length),
                        "memoryless: 10 ln 8 / (T+20)", False)
    if task == "order":
        return TaskSpec(8, 4, "classify", "accuracy", 0.25, "chance", True)
    if task == "digits":
        return TaskSpec(8 if length == 8 else 1, 10, "classify", "accuracy", 0.1, "chance", True)
    return TaskSpec(1, 10, "classify", "accuracy", 0.1, "chance", True)


def for_cell(base: MemoryConfig, cell: str, **changes) -> MemoryConfig:
    """`base` for one cell of a list: its nonlinearity kept for the Elman RNN only (gated cells have none),
    its U init and backend for the cells with a U (the min cells have neither)."""
    keep = {} if cell in RECURRENT else {"recurrent_init": "default", "recurrent_scale": 1.0, "backend": "auto"}
    return replace(base, cell=cell, nonlinearity=base.nonlinearity if cell == "rnn" else "tanh", **keep | changes)


# -- will a run fit in memory? ------------------------------------------------------------------------------

def size_flags(cfg: MemoryConfig) -> dict[str, int]:
    """The flags that scale a run's memory, with their values."""
    flags = {"--length": cfg.length, "--batch-size": cfg.batch_size, "--hidden-size": cfg.hidden_size}
    return flags | ({"--num-layers": cfg.num_layers} if cfg.num_layers > 1 else {})


def weight_floats(cell: str, hidden_size: int, input_size: int) -> int:
    """Floats in one layer's weights: U (G*H, H) and V (G*H, I); the min cells have V only."""
    U = hidden_size if cell in RECURRENT else 0
    return GATES[cell] * hidden_size * (U + input_size)


def size_terms(cfg: MemoryConfig) -> list[tuple[float, dict[str, int]]]:
    """Floats one training run certainly holds at once (a lower bound), by what scales them."""
    spec = task_spec(cfg.task, cfg.length)
    T = cfg.length + (2 * synthetic.COPY_LEN if cfg.task == "copy" else 0)
    GH, L = GATES[cfg.cell] * cfg.hidden_size, cfg.num_layers
    flags = size_flags(cfg)
    # kept for BPTT: the gates of every step (rnn, lstm, gru); the min cells' scan recomputes its gates in the
    # backward and keeps h of every layer only, beside which the gradient reaching the top layer's h arrives
    bptt = L * GH if cfg.cell in RECURRENT else (L + 1) * cfg.hidden_size
    terms = [(L * weight_floats(cfg.cell, cfg.hidden_size, spec.input_size),                   # the weights U, V
              {f: v for f, v in flags.items() if f in ("--hidden-size", "--num-layers")}),
             (cfg.batch_size * T * bptt, flags)]
    if cfg.task in MIN_LENGTH:                                                                # a synthetic test set
        terms.append((cfg.test_size * T * spec.input_size, {"--test-size": cfg.test_size, "--length": cfg.length}))
    return terms


def flag_text(flags: dict[str, int]) -> str:
    """'--length 1000, --batch-size 50 or --hidden-size 8', the largest value first."""
    items = [f"{f} {v}" for f, v in sorted(flags.items(), key=lambda fv: -fv[1])]
    return " or ".join([", ".join(items[:-1]), items[-1]] if len(items) > 1 else items)


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):                     # not a POSIX system: no check
        return None


def check_fits(terms: list[tuple[float, dict[str, int]]]) -> None:
    """Refuse up front a run whose float32 tensors alone exceed this machine's memory (rather than a
    failed allocation, or the OOM killer, later), naming the flags of the largest term."""
    need, ram = 4 * sum(n for n, _ in terms), _ram_bytes()
    if ram and need > ram:
        flags = max(terms, key=lambda t: t[0])[1]
        raise UserError(f"this run needs at least {need / 1e9:,.0f} GB of memory, more than this machine's "
                        f"{ram / 1e9:,.0f} GB; lower {flag_text(flags)}")


@contextmanager
def out_of_memory_as_user_error(flags: dict[str, int]):
    """A failed allocation (torch's CPU allocator, CUDA, Python) as a UserError naming the size flags."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not (isinstance(e, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(e)):
            raise
        raise UserError(f"ran out of memory; lower {flag_text(flags)}") from None


class SequenceModel(nn.Module):
    """A recurrent layer (rnnkit's) and a linear head W on h_t: the last step, or every step."""

    def __init__(self, cfg: MemoryConfig, spec: TaskSpec):
        super().__init__()
        kw = {"nonlinearity": cfg.nonlinearity} if cfg.cell == "rnn" else {}
        kw |= {"backend": cfg.backend} if cfg.cell in RECURRENT else {}
        self.rnn = CELLS[cfg.cell](spec.input_size, cfg.hidden_size, cfg.num_layers, batch_first=True, **kw)
        self.head = nn.Linear(cfg.hidden_size, spec.output_size)
        self.every_step = spec.kind == "classify_all"
        init_recurrent_(self.rnn, cfg.recurrent_init, cfg.recurrent_scale)

    def forward(self, x):                                      # x (B, T, I)
        out, _ = self.rnn(x)                                    # (B, T, H)
        return self.head(out if self.every_step else out[:, -1])   # (B, T, O) or (B, O)


def init_recurrent_(rnn: nn.RNNBase, how: str, scale: float) -> None:
    """Re-initialise every U block: identity (IRNN, with zero biases), orthogonal, or keep torch.nn's."""
    with torch.no_grad():
        for name, W in rnn.named_parameters():
            if name.startswith("weight_hh"):
                H = W.shape[1]
                for block in W.split(H, 0):
                    if how == "identity":
                        block.copy_(torch.eye(H))
                    elif how == "orthogonal":
                        nn.init.orthogonal_(block)
                W.mul_(scale)
            elif name.startswith("bias") and how == "identity":
                W.zero_()


class Source:
    """Training batches and the test set of one task."""

    def __init__(self, cfg: MemoryConfig):
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.split = None
        if cfg.task == "digits":
            self.split = synthetic.digits("rows" if cfg.length == 8 else "pixels")
        elif cfg.task == "mnist1d":
            self.split = synthetic.mnist1d()

    def _make(self, n, gen):
        fn = {"adding": synthetic.adding, "copy": synthetic.copy_memory, "order": synthetic.temporal_order}
        return fn[self.cfg.task](n, self.cfg.length, gen)

    def batch(self):
        if self.split is None:
            return self._make(self.cfg.batch_size, self.gen)
        idx = torch.randint(0, len(self.split.y_train), (self.cfg.batch_size,), generator=self.gen)
        return self.split.x_train[idx], self.split.y_train[idx]

    def test(self):
        if self.split is None:
            return self._make(self.cfg.test_size, 10_000 + self.cfg.seed)   # a seed never used for training
        return self.split.x_test, self.split.y_test


def loss_fn(pred, y, kind: str):
    if kind == "regress":
        return F.mse_loss(pred, y)
    if kind == "classify_all":
        return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), y.reshape(-1))
    return F.cross_entropy(pred, y)


@torch.no_grad()
def evaluate(model: SequenceModel, x, y, spec: TaskSpec, batch: int = 500) -> dict:
    """Test metric (and loss) over the whole held-out set."""
    model.eval()
    preds = torch.cat([model(x[i:i + batch]) for i in range(0, len(x), batch)])
    model.train()
    loss = float(loss_fn(preds, y, spec.kind))
    if spec.kind == "regress":
        return {"mse": loss, "loss": loss}
    correct = (preds.argmax(-1) == y).float()
    if spec.kind == "classify_all":
        return {"cross_entropy": loss, "loss": loss,
                "symbol_accuracy": float(correct[:, -synthetic.COPY_LEN:].mean())}
    return {"accuracy": float(correct.mean()), "loss": loss}


@dataclass(frozen=True)
class RunResult:
    config: MemoryConfig
    metric: str
    test: dict                  # metric name -> value on the test set (NaN values when diverged)
    baseline: float
    baseline_name: str
    diverged: bool
    steps_done: int
    seconds: float
    loss: tuple[float, ...]     # training loss per step
    grad_norm: tuple[float, ...]  # global gradient norm per step, before clipping

    def to_dict(self, curves: bool = True) -> dict:
        test = {k: _finite_or_none(v) for k, v in self.test.items()}           # NaN is not JSON
        d = {"config": asdict(self.config), "metric": self.metric, "test": test,
             "score": test.get(self.metric), "baseline": self.baseline,
             "baseline_name": self.baseline_name, "diverged": self.diverged,
             "steps_done": self.steps_done, "seconds": round(self.seconds, 2)}
        if curves:
            d["loss"] = [_finite_or_none(v) for v in self.loss]
            d["grad_norm"] = [_finite_or_none(v) for v in self.grad_norm]
        return d


def _finite_or_none(v: float):
    return float(v) if math.isfinite(v) else None


def train(cfg: MemoryConfig, progress: bool = True, probe=None, probe_at=frozenset()) -> RunResult:
    """Train one model. probe(model, step) is called before each step in `probe_at` and after the last
    step, the one where training stopped (the gradient-flow study records its traces there)."""
    with flushing_denormals():         # a vanished gradient in denormal floats slows CPU BPTT ~10x
        return _train(cfg, progress, probe, probe_at)


def _train(cfg: MemoryConfig, progress: bool, probe, probe_at) -> RunResult:
    torch.manual_seed(cfg.seed)
    spec = task_spec(cfg.task, cfg.length)
    model, source = SequenceModel(cfg, spec), Source(cfg)
    params = list(model.parameters())
    opt = (torch.optim.Adam(params, cfg.lr) if cfg.optimizer == "adam"
           else torch.optim.SGD(params, cfg.lr, momentum=0.9))
    losses, norms, diverged, first = [], [], False, None
    start = time.perf_counter()
    bar = tqdm(range(cfg.steps), disable=not progress, leave=False, mininterval=1.0,
               desc=f"{cfg.task} T={cfg.length} {cfg.cell}")
    for step in bar:
        if probe is not None and step in probe_at:
            probe(model, step)
        x, y = source.batch()
        loss = loss_fn(model(x), y, spec.kind)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = float(nn.utils.clip_grad_norm_(params, cfg.clip_norm or math.inf))
        losses.append(loss.item())
        norms.append(norm)
        first = first if first is not None else max(losses[0], 1e-12)
        if not math.isfinite(losses[-1]) or not math.isfinite(norm) or losses[-1] > cfg.diverge_factor * first:
            diverged = True
            break
        opt.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.4g}", gnorm=f"{norm:.3g}")
    if probe is not None:
        probe(model, len(losses))
    test = ({spec.metric: math.nan, "loss": math.nan} if diverged
            else evaluate(model, *source.test(), spec))
    return RunResult(cfg, spec.metric, test, spec.baseline, spec.baseline_name, diverged, len(losses),
                     time.perf_counter() - start, tuple(losses), tuple(norms))


def run_grid(base: MemoryConfig, cells: list[str], lengths: list[int], progress: bool = True,
             on_result=None) -> list[RunResult]:
    """Every cell at every length, in that order; on_result(result) after each run."""
    results = []
    for length in lengths:
        for cell in cells:
            r = train_sized(for_cell(base, cell, length=length), progress)
            results.append(r)
            if on_result is not None:
                on_result(r)
    return results


def clip_study(base: MemoryConfig, clip_norm: float, progress: bool = True) -> dict[str, RunResult]:
    """The same configuration trained without and with clipping by global norm."""
    if clip_norm is None or clip_norm <= 0:
        raise UserError("the clip study needs --clip-norm > 0 (the threshold for the clipped run)")
    return {"no clipping": train_sized(replace(base, clip_norm=None), progress),
            f"clip-norm {clip_norm:g}": train_sized(replace(base, clip_norm=clip_norm), progress)}


def train_sized(cfg: MemoryConfig, progress: bool) -> RunResult:
    """train(), a failed allocation reported as the flags to lower (the runs `rnnkit memory` makes)."""
    with out_of_memory_as_user_error(size_flags(cfg)):
        return train(cfg, progress)
