"""Scores for the text tasks: language-model loss units, classification and sequence-to-sequence accuracy.

    perplexity      = exp(mean cross-entropy in nats per token)
    bits per token  = mean cross-entropy / ln 2      (per character for a character model)
    accuracy        = share of predictions equal to the truth
    macro F1        = unweighted mean over classes of F1_c = 2 P_c R_c / (P_c + R_c) (a class neither
                      true nor predicted anywhere is left out; a class never predicted scores 0)
    exact match     = share of output sequences equal to the target, token for token
    token accuracy  = share of target positions (up to and including <eos>) predicted right
"""
from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError
from ..train import FitResult, Trainer, TrainingInterrupted, atomic_write, read_manifest


def perplexity(nats: float) -> float:
    """exp(loss); inf where the loss is too large to exponentiate."""
    return math.exp(nats) if nats < 700 else float("inf")


def bits(nats: float) -> float:
    return nats / math.log(2)


def lm_scores(nats: float) -> dict[str, float]:
    return {"loss": nats, "perplexity": perplexity(nats), "bits_per_token": bits(nats)}


def accuracy(pred: Sequence[int] | Tensor, truth: Sequence[int] | Tensor) -> float:
    pred, truth = torch.as_tensor(pred), torch.as_tensor(truth)
    if len(truth) == 0:
        return float("nan")
    return float((pred == truth).double().mean())


def confusion(pred, truth, num_classes: int) -> Tensor:
    """(C, C) counts: row = true class, column = predicted class."""
    pred, truth = torch.as_tensor(pred, dtype=torch.long), torch.as_tensor(truth, dtype=torch.long)
    return torch.bincount(truth * num_classes + pred, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def per_class_f1(pred, truth, num_classes: int) -> list[float | None]:
    """F1 of each class; None for a class that occurs neither in the truth nor in the predictions."""
    m = confusion(pred, truth, num_classes).double()
    tp, predicted, actual = m.diag(), m.sum(0), m.sum(1)
    out: list[float | None] = []
    for c in range(num_classes):
        denom = float(predicted[c] + actual[c])
        out.append(None if denom == 0 else float(2 * tp[c] / denom))   # 2PR/(P+R) = 2TP/(pred+actual)
    return out


def macro_f1(pred, truth, num_classes: int) -> float:
    """Unweighted mean of the per-class F1 over the classes present in the truth or the predictions."""
    f1 = [f for f in per_class_f1(pred, truth, num_classes) if f is not None]
    return sum(f1) / len(f1) if f1 else float("nan")


def classification_scores(pred, truth, num_classes: int) -> dict[str, float]:
    return {"accuracy": accuracy(pred, truth), "macro_f1": macro_f1(pred, truth, num_classes)}


def sequence_scores(pred: Tensor, pred_lengths: Tensor, target: Tensor, target_lengths: Tensor) -> dict[str, float]:
    """Exact match and token accuracy of decoded sequences against targets.

    pred (B, P) ids with pred_lengths (B,) tokens before <eos>; target (B, T) ids with target_lengths
    (B,) tokens (no <eos>). A position t <= n (n = target length; position n is the end) is right when
    the prediction has the target's token there, or ends exactly there at t = n. Exact match: all
    n + 1 positions right."""
    B = target.shape[0]
    n_max = int(target_lengths.max()) + 1
    P = pred.shape[1]
    width = max(n_max, P)
    t = torch.arange(width)                                                   # (W,)
    tgt = torch.full((B, width), -1, dtype=torch.long)
    tgt[:, :target.shape[1]] = torch.where(t[:target.shape[1]] < target_lengths[:, None], target, -1)
    prd = torch.full((B, width), -2, dtype=torch.long)
    prd[:, :P] = torch.where(t[:P] < pred_lengths[:, None], pred, -2)
    end_t, end_p = t == target_lengths[:, None], t == pred_lengths[:, None]    # (B, W) the <eos> position
    right = torch.where(end_t, end_p, (prd == tgt) & ~end_p)                   # (B, W)
    scored = t <= target_lengths[:, None]                                      # (B, W) n + 1 positions
    exact = (right | ~scored).all(1)
    return {"exact_match": float(exact.double().mean()),
            "token_accuracy": float((right & scored).sum() / scored.sum())}


# -- run bookkeeping shared by the text tasks -------------------------------------------------------
# (The trainer has no wall-clock limit; until it gets one, the text tasks stop it this way.)

class TimeUp(KeyboardInterrupt):
    """Raised between steps when a run's time limit is reached; the trainer treats it as Ctrl-C:
    it writes a checkpoint of the last step (resumable with --resume) and raises TrainingInterrupted."""


class Deadline:
    """`check()` raises TimeUp once `seconds` have passed since construction (never when None); `steps`
    counts the steps a wrapped loss ran in this session (a resumed run's history holds earlier ones too)."""

    def __init__(self, seconds: float | None):
        self.seconds, self.start, self.hit, self.steps = seconds, time.perf_counter(), False, 0

    def check(self) -> None:
        if self.seconds is not None and time.perf_counter() - self.start >= self.seconds:
            self.hit = True
            raise TimeUp

    def wrap(self, loss_fn):
        """`loss_fn` with a deadline check before each step."""
        def timed(*args):
            self.check()
            self.steps += 1
            return loss_fn(*args)
        return timed


def fit_within(trainer: Trainer, source, deadline: Deadline, resume: bool = False) -> tuple[FitResult, bool]:
    """`trainer.fit(source)`, stopped cleanly at the deadline (the checkpoint resumes from the last step).
    With early stopping on, the model is then the best epoch's, as at the end of a run, so the scores
    that follow are of the weights a predict command loads. Returns (result, stopped_by_time)."""
    try:
        return trainer.fit(source, resume=resume), False
    except TrainingInterrupted as e:
        if not deadline.hit or e.pressed:                 # a Ctrl-C or SIGTERM as well: stop
            raise
    if trainer.best_weights is not None:
        trainer.model.load_state_dict(trainer.best_weights)
    return FitResult(trainer.history, trainer.epoch, trainer.best_epoch, trainer.best, False), True


def write_json(path, doc: dict) -> None:
    """`doc` as indented JSON, atomically; NaN and Inf (undefined metrics, e.g. MAPE with zeros) become null."""
    atomic_write(Path(path), json.dumps(_json_safe(doc), indent=2).encode())


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def model_dir(directory) -> Path:
    """DIR itself when it holds a checkpoint, else DIR/model (the run's --out directory was given)."""
    d = Path(directory)
    if not (d / "checkpoint.json").exists() and (d / "model" / "checkpoint.json").exists():
        return d / "model"
    return d


def read_meta(directory, task: str) -> dict:
    """The `meta` a `rnnkit <task> train` run stored with its model, checked to be for `task`."""
    meta = read_manifest(model_dir(directory)).get("meta", {})
    if meta.get("task") != task:
        raise UserError(f"{directory} holds no {task} model (it was written by task {meta.get('task')!r}); "
                        f"give the model/ directory a `rnnkit {task} train` run wrote")
    return meta
