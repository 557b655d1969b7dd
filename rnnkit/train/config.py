"""`TrainConfig`: everything the training loop needs to know, one frozen dataclass.

Validated once, here, at construction: a bad value raises `UserError` naming the field and the fix.
"""
from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import UserError, check_positive
from ..layers import AUTO_CHOICES

SCHEDULES = ("none", "cosine", "step", "plateau")
MODES = ("min", "max")
# Whether a lower or a higher value of a metric is better, by its name without the val_/train_ prefix:
# what `mode=None` (the default) reads. A name in neither set needs mode given.
HIGHER_IS_BETTER = frozenset({"accuracy", "macro_f1", "f1", "exact_match", "token_accuracy", "precision",
                              "recall", "auc", "r2"})
LOWER_IS_BETTER = frozenset({"loss", "mse", "rmse", "mae", "mape", "smape", "mase", "perplexity",
                             "bits_per_token", "bits_per_character", "error", "error_rate"})
BACKENDS = AUTO_CHOICES                            # TrainConfig.backend: "auto" or "engine" (or None)
# Fields that may differ between a run and its resumption without breaking exact resume.
RESUMABLE_CHANGES = frozenset({"epochs", "progress", "out", "device", "checkpoint_every"})


@dataclass(frozen=True)
class TrainConfig:
    """How to train. Fields map one to one onto the CLI's flags.

    optimizer: a torch.optim class name, any case ("adam", "AdamW", "sgd"), or a factory
        `f(params, lr, weight_decay) -> torch.optim.Optimizer` for anything else.
    clip_norm / clip_value: rescale the gradient to this global L2 norm / clamp each entry to
        [-v, v]; value first, then norm, when both are set. The pre-clip global norm is logged each step.
    schedule: learning rate per epoch: "none", "cosine" (to 0 over `epochs`), "step" (times `gamma`
        every `step_size` epochs) or "plateau" (times `gamma` after `step_size` epochs without
        improvement of `monitor`).
    patience: early stopping: stop after this many epochs without improvement of `monitor` (a key
        of the evaluation's metrics) and restore the best weights. None: off.
    mode: "min" or "max": whether a lower or a higher `monitor` is better. None (the default): from the
        metric's name (min for losses and errors, max for accuracy, F1, exact match; see
        HIGHER_IS_BETTER); a name it does not know must say which.
    tbptt: k for truncated BPTT over a long stream (a 1-D tensor given to `fit`): windows of k steps,
        state carried across windows and detached at each boundary.
    checkpoint_every: save a checkpoint every this many epochs (and always at the end); 0: only at the end.
    threads: torch's CPU threads for the run (torch.set_num_threads, process-wide); None: leave as is.
        Small models train many times faster on one thread than on threads competing for busy cores,
        and the thread count can change the last bits of a result (reduction order), so exact resume
        refuses a different count.
    backend: what the model's backend="auto" recurrent layers run during `fit` ("auto": torch's fused
        kernel for plain configurations; "engine": rnnkit's engine, faster on CPU for training,
        docs/benchmarks.md); None: whatever `rnnkit.set_default_backend` chose. For this fit, in its
        thread; like threads it can change the last bits of a result, so exact resume refuses a change.
    """
    epochs: int = 10
    lr: float = 1e-3
    optimizer: str | Callable = "adam"
    weight_decay: float = 0.0
    batch_size: int = 32
    clip_norm: float | None = None
    clip_value: float | None = None
    schedule: str = "none"
    step_size: int = 10
    gamma: float = 0.5
    patience: int | None = None
    monitor: str = "val_loss"
    mode: str | None = None
    seed: int = 0
    device: str = "cpu"
    out: str | None = None
    checkpoint_every: int = 1
    progress: bool = True
    tbptt: int | None = None
    threads: int | None = None
    backend: str | None = None

    def __post_init__(self):
        _positive(self, "epochs", "batch_size", "step_size")
        _positive(self, "lr", "gamma")
        for name in ("clip_norm", "clip_value", "patience", "tbptt", "threads"):
            if getattr(self, name) is not None:
                _positive(self, name)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise UserError(f"weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if self.checkpoint_every < 0:
            raise UserError(f"checkpoint_every must be >= 0 (0: only at the end), got {self.checkpoint_every}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise UserError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.mode is None:
            monitor_mode(self.monitor)                             # an unknown name fails here, not later
        elif self.mode not in MODES:
            raise UserError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if isinstance(self.optimizer, str):
            optimizer_class(self.optimizer)                        # fails early on an unknown name
        elif not callable(self.optimizer):
            raise UserError(f"optimizer must be a torch.optim name or a factory, got {self.optimizer!r}")
        resolve_device(self.device)

    @property
    def resolved_mode(self) -> str:
        """`mode`, or when None the one `monitor`'s name implies (resolved on use, so that
        dataclasses.replace(cfg, monitor=...) reads the new metric's)."""
        return self.mode if self.mode is not None else monitor_mode(self.monitor)

    def to_json(self) -> dict:
        """The fields as JSON values (a factory optimizer is recorded by its name; mode as resolved, what
        ran)."""
        d = dataclasses.asdict(self)
        d["mode"] = self.resolved_mode
        if not isinstance(self.optimizer, str):
            d["optimizer"] = getattr(self.optimizer, "__qualname__", repr(self.optimizer))
        return d


def monitor_mode(monitor: str) -> str:
    """"min" or "max" for a metric by its name (val_accuracy: max, val_loss: min), or a UserError."""
    name = monitor.removeprefix("val_").removeprefix("train_")
    if name in HIGHER_IS_BETTER:
        return "max"
    if name in LOWER_IS_BETTER or name.endswith("_loss"):
        return "min"
    raise UserError(f"monitor {monitor!r} is not a metric name rnnkit knows, so it cannot tell whether a lower "
                    "or a higher value is better: check the spelling against the metrics the run evaluates "
                    "(val_loss, val_accuracy, val_exact_match, ...: the val_ columns of its metrics.csv) or "
                    "train_loss; for a metric of your own, say which is better: mode='min' or mode='max' "
                    "(CLI: --mode min or --mode max)")


def _positive(cfg: TrainConfig, *names: str) -> None:
    for name in names:
        check_positive(name, getattr(cfg, name), _UNSET.get(name, ""))


_UNSET = {"clip_norm": "no clipping", "clip_value": "no clipping", "patience": "no early stopping"}


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """torch.optim's optimizers the trainer can drive: built with (params, lr, weight_decay), stepped without
    a closure, on dense gradients of any shape (so not LBFGS, Rprop, SparseAdam, Muon: 2-D weights only)."""
    table = {n.lower(): c for n, c in vars(torch.optim).items()
             if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer
             and "weight_decay" in inspect.signature(c.__init__).parameters and c.__name__ not in ("SparseAdam", "Muon")}
    try:
        return table[name.lower()]
    except KeyError:
        raise UserError(f"unknown optimizer {name!r}; choose one of {', '.join(sorted(table))}") from None


def build_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if isinstance(cfg.optimizer, str):
        return optimizer_class(cfg.optimizer)(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return cfg.optimizer(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer):
    """The per-epoch learning-rate schedule, or None."""
    sched = torch.optim.lr_scheduler
    if cfg.schedule == "cosine":
        return sched.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.schedule == "step":
        return sched.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.schedule == "plateau":
        return sched.ReduceLROnPlateau(optimizer, mode=cfg.resolved_mode, factor=cfg.gamma, patience=cfg.step_size)
    return None


def resolve_device(name: str) -> torch.device:
    """"auto" picks cuda when present; an unavailable or unknown device is a UserError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for but CUDA is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise UserError(f"device {name!r} cannot train a model; use cpu, cuda, cuda:N, mps or auto")
    backend = getattr(torch.backends, "mps", None) if device.type == "mps" else getattr(torch, "xpu", None)
    if device.type in ("mps", "xpu") and not (backend is not None and backend.is_available()):
        raise UserError(f"device {name!r} is not available in this torch build or machine; use --device cpu")
    return device
