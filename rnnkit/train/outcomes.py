"""What a fit ends with: its result (`FitResult`, `History`) or the exceptions that stop it."""
from __future__ import annotations

import signal
from dataclasses import dataclass, field


class TrainingError(RuntimeError):
    """Training cannot go on (the CLI prints the message and exits with status 1)."""


class NonFiniteLossError(TrainingError):
    """The loss or the gradient norm became NaN or Inf."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (`signum`): a checkpoint was written; the message says where and how to resume.
    `pressed`: a signal came (False when the stop was the task's own time limit, `TimeUp`)."""

    def __init__(self, message: str, signum: int = signal.SIGINT, pressed: bool = True):
        super().__init__(message)
        self.signum, self.pressed = signal.Signals(signum), pressed

    @property
    def how(self) -> str:
        return stopped_by(self.signum)


def stopped_by(signum: int) -> str:
    """How a message says a run was stopped by this signal."""
    return "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"


@dataclass
class History:
    epochs: list[dict] = field(default_factory=list)   # one row per epoch, as in metrics.csv
    loss: list[float] = field(default_factory=list)    # per step
    grad_norm: list[float] = field(default_factory=list)  # per step, global L2 norm before clipping


@dataclass(frozen=True)
class FitResult:
    history: History
    epochs_run: int
    best_epoch: int | None      # 1-based epoch with the best monitored value (None: nothing monitored)
    best: float | None
    stopped_early: bool
