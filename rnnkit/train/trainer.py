"""The training loop: any nn.Module, any torch optimizer, any task.

    trainer = Trainer(model, TrainConfig(epochs=50, clip_norm=1.0, out="run"), loss_fn, evaluate)
    result = trainer.fit(TensorBatches(X, Y, batch_size=32))         # or fit((X, Y)), or a 1-D stream
    result = trainer.fit(source, resume=True)                        # continue from run/checkpoint.json

`loss_fn(model, batch) -> loss` (a scalar tensor); for a stateful source (truncated BPTT over a
stream) `loss_fn(model, window, state) -> (loss, state)`, where `state` is the recurrent state the
previous window ended with, detached (None at the start of each epoch). `evaluate(model) -> dict` of
floats runs after each epoch in eval mode without gradients; early stopping and the plateau schedule
watch its `monitor` key (or train_loss).

Each step: forward, a non-finite loss stops the run (`NonFiniteLossError`; the last checkpoint on disk
is the last good one), backward, the global gradient norm before clipping goes into the history,
clipping (by value, then by norm), the optimizer step. Each epoch: evaluation, a metrics.csv row, the
schedule, early stopping, a checkpoint every `checkpoint_every` epochs. Ctrl-C or SIGTERM finishes the
current step, writes a checkpoint and raises `TrainingInterrupted` (a second one stops at once and saves
nothing; one during the last epoch lets the run finish and save, then raises): in the main thread, fit
owns both signals while it runs (the program's own handlers are put back after, not called);
`fit(..., resume=True)` continues from it, mid-epoch included, and ends bitwise-identical to a run that
was never stopped (in a process whose kernel takes the same product route: _fused/route.py). With early stopping on (`patience`), a checkpoint's model file holds the
best epoch's weights so far (what `load_weights` and the tasks' predict commands read); the last
step's weights travel in its state, for resume.
"""
from __future__ import annotations

import math
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .._fused import route as fused_route
from ..errors import UserError
from ..layers import auto_backend, backend_scope
from .batches import TensorBatches, to_device
from .checkpoint import MANIFEST, load_checkpoint, load_state_into, read_manifest, save_checkpoint
from .config import TrainConfig, build_optimizer, build_scheduler, resolve_device
from .outcomes import FitResult, History, NonFiniteLossError, TrainingError, TrainingInterrupted, stopped_by
from .report import InterruptedTwice, MetricsCSV, TensorBoard, deferred_sigint, progress_bar, write_metrics_csv
from .resume import check_continuable, check_epochs_left, check_resumable, rng_states, set_rng_states
from .tbptt import StreamBatches, detach_state


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's random."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class Trainer:
    def __init__(self, model: nn.Module, config: TrainConfig, loss_fn, evaluate=None, meta: dict | None = None):
        self.cfg, self.loss_fn, self.evaluate, self.meta = config, loss_fn, evaluate, dict(meta or {})
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        self.optimizer = build_optimizer(config, [p for p in model.parameters() if p.requires_grad])
        self.scheduler = build_scheduler(config, self.optimizer)
        self.generator = torch.Generator().manual_seed(config.seed)   # shuffling only
        self.history = History()
        self.epoch = self.step = self.batch = 0           # epochs done, steps done, batches done this epoch
        self.finished = self.stopped_early = False
        self.epoch_shuffle = self.generator.get_state()   # generator state at the start of this epoch
        self.acc = _new_acc()                             # this epoch's running sums
        self.carried = None                               # recurrent state carried between TBPTT windows
        self.best = self.best_epoch = self.best_weights = None
        self.bad_epochs = 0
        if (config.patience is not None or config.schedule == "plateau") and evaluate is None \
                and config.monitor != "train_loss":
            raise UserError("early stopping (patience) and the plateau schedule need an evaluate function "
                            f"giving {config.monitor!r}; pass evaluate= or drop them")

    # -- the loop -----------------------------------------------------------------------------------
    def fit(self, train, resume: bool = False) -> FitResult:
        with backend_scope(self.cfg.backend):             # this thread, this fit; None: as set outside
            return self._fit(train, resume)

    def _fit(self, train, resume: bool) -> FitResult:
        source = self._source(train)
        if self.cfg.threads is not None:
            torch.set_num_threads(self.cfg.threads)
        if self.cfg.out is not None:
            Path(self.cfg.out).mkdir(parents=True, exist_ok=True)
        self._checkpoint_epoch = None                     # epochs in this run's checkpoint on disk, if any
        if resume:
            self._restore()
            self._checkpoint_epoch = self.epoch
            check_epochs_left(self.cfg.out, self.epoch, self.batch, self.cfg.epochs)
        else:
            self._check_replaceable()
            seed_everything(self.cfg.seed)
        if self.finished and not self.stopped_early and self.epoch < self.cfg.epochs:
            check_continuable(self.cfg.out, self.epoch, self.cfg.epochs, self.best_epoch, self.best_weights)
            self.finished = False                         # resuming a finished run with more epochs
        if self.finished:
            return self._result()
        n_batches = len(source) if hasattr(source, "__len__") else len(source.batches(_replay(self)))
        bar = progress_bar(self.cfg.epochs * n_batches, self.epoch * n_batches + self.batch, self.cfg.progress)
        board, table = TensorBoard(self.cfg.out), MetricsCSV(self.cfg.out)
        try:
            with deferred_sigint() as interrupted:
                try:
                    while self.epoch < self.cfg.epochs and not (self.finished or self.stopped_early):
                        self._run_epoch(source, bar, interrupted)
                        self._end_epoch(board, table)
                        if interrupted.is_set() and self.epoch < self.cfg.epochs and not self.stopped_early:
                            raise KeyboardInterrupt       # (after the last epoch: the run is done, finish it)
                except KeyboardInterrupt as e:
                    with interrupted.held():              # more presses wait for the checkpoint
                        stop = self._interrupted(not isinstance(e, InterruptedTwice), interrupted.signum)
                    stop.pressed = interrupted.is_set()   # (not set: the task's time limit, TimeUp)
                    raise stop from e
                except TrainingError:
                    self._metrics_as_checkpoint()
                    raise
                with interrupted.held():
                    result = self._finish()
                if interrupted.is_set():                  # a press in the last epoch: the run is complete and
                    raise self._interrupted_at_end(interrupted.signum)   # saved, but whoever called must stop
                return result
        finally:
            bar.close()
            board.close()

    def _source(self, train):
        if hasattr(train, "batches"):
            return train
        if isinstance(train, Tensor) and self.cfg.tbptt:
            return StreamBatches(train, self.cfg.batch_size, self.cfg.tbptt)
        if isinstance(train, (tuple, list)):
            return TensorBatches(*train, batch_size=self.cfg.batch_size)
        raise UserError("fit() takes a batch source (TensorBatches, StreamBatches), a tuple of tensors, "
                        "or a 1-D stream tensor with TrainConfig.tbptt set")

    def _run_epoch(self, source, bar, interrupted) -> None:
        if self.batch == 0:
            self.epoch_shuffle, self.acc, self.carried = self.generator.get_state(), _new_acc(), None
        self.generator.set_state(self.epoch_shuffle)      # replay this epoch's order (same on resume)
        batches = source.batches(self.generator)
        self.model.train()
        for i in range(self.batch, len(batches)):
            loss = self._train_step(batches[i], source.stateful)
            self.batch = i + 1
            bar.update(1)
            bar.set_postfix(epoch=self.epoch + 1, loss=f"{loss:.4g}", refresh=False)
            if interrupted.is_set() and self.batch < len(batches):   # at the last: after the epoch's end
                raise KeyboardInterrupt

    def _train_step(self, batch, stateful: bool) -> float:
        batch = to_device(batch, self.device)
        self.optimizer.zero_grad(set_to_none=True)
        if stateful:
            loss, state = self.loss_fn(self.model, batch, self.carried)
        else:
            loss, state = self.loss_fn(self.model, batch), None
        value = float(loss.detach())
        if not math.isfinite(value):
            self._fail(f"the loss became {value}")
        loss.backward()
        norm = self._clip()
        if not math.isfinite(norm):
            self._fail(f"the gradient norm became {norm}")
        self.optimizer.step()
        self.carried = detach_state(state)                 # window boundary: gradient stops here
        self.step += 1
        self.history.loss.append(value)
        self.history.grad_norm.append(norm)
        self.acc["loss"] += value
        self.acc["n"] += 1
        self.acc["norm_sum"] += norm
        self.acc["norm_max"] = max(self.acc["norm_max"], norm)
        self.acc["clipped"] += int(self.cfg.clip_norm is not None and norm > self.cfg.clip_norm)
        return value

    def _clip(self) -> float:
        """Clip in place; return the global L2 norm of the gradient before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return 0.0
        if self.cfg.clip_norm is not None and self.cfg.clip_value is None:
            return float(nn.utils.clip_grad_norm_(params, self.cfg.clip_norm))
        norm = float(nn.utils.get_total_norm([p.grad for p in params]))
        if self.cfg.clip_value is not None:
            nn.utils.clip_grad_value_(params, self.cfg.clip_value)
        if self.cfg.clip_norm is not None:
            nn.utils.clip_grad_norm_(params, self.cfg.clip_norm)
        return norm

    def _fail(self, what: str) -> None:
        where = f"at epoch {self.epoch + 1}, step {self.step + 1}"
        if self._checkpoint_epoch is None:
            kept, again = "no checkpoint of this run had been written yet", "train again"
        else:
            kept = f"the last good checkpoint (epoch {self._checkpoint_epoch}) is kept in {self.cfg.out}"
            again = f"train again in a new --out directory (or remove {self.cfg.out})"
        raise NonFiniteLossError(f"training stopped: {what} {where}; {kept}. Lower the learning rate "
                                 f"(--lr) or clip the gradient (--clip-norm), then {again}.")

    # -- end of epoch -------------------------------------------------------------------------------
    def _end_epoch(self, board: TensorBoard, table: MetricsCSV) -> None:
        t0 = self.acc["t0"]
        metrics = self._run_evaluate()
        n = max(self.acc["n"], 1)
        row = {"epoch": self.epoch + 1, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
               "train_loss": self.acc["loss"] / n, "grad_norm_mean": self.acc["norm_sum"] / n,
               "grad_norm_max": self.acc["norm_max"], "clipped_frac": self.acc["clipped"] / n, **metrics,
               "seconds": round(time.perf_counter() - t0, 3)}
        self.history.epochs.append(row)
        watched = {"train_loss": row["train_loss"], **metrics}     # what monitor may name
        self._schedule(watched)
        self._early_stop(watched)
        self.epoch, self.batch = self.epoch + 1, 0
        board.log(row)
        table.write(self.history.epochs)
        if self.cfg.out is not None:
            every = self.cfg.checkpoint_every
            if every and self.epoch % every == 0 and self.epoch < self.cfg.epochs and not self.stopped_early:
                self.save()

    def _run_evaluate(self) -> dict:
        if self.evaluate is None:
            return {}
        self.model.eval()
        with torch.no_grad():
            metrics = {k: float(v) for k, v in self.evaluate(self.model).items()}
        self.model.train()
        return metrics

    def _monitored(self, metrics: dict):
        if self.cfg.monitor in metrics:
            return metrics[self.cfg.monitor]
        if self.cfg.patience is not None or self.cfg.schedule == "plateau":
            raise UserError(f"the run monitors {self.cfg.monitor!r} but the evaluation gives only "
                            f"{sorted(metrics)}; set monitor (--monitor) to one of them")
        return None

    def _schedule(self, metrics: dict) -> None:
        if self.scheduler is None:
            return
        if self.cfg.schedule == "plateau":
            self.scheduler.step(self._monitored(metrics))
        else:
            self.scheduler.step()

    def _early_stop(self, metrics: dict) -> None:
        value = self._monitored(metrics)
        if value is None:
            return
        better = self.best is None or (value < self.best if self.cfg.resolved_mode == "min" else value > self.best)
        if better:
            self.best, self.best_epoch, self.bad_epochs = value, self.epoch + 1, 0
            if self.cfg.patience is not None:
                self.best_weights = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        else:
            self.bad_epochs += 1
            if self.cfg.patience is not None and self.bad_epochs >= self.cfg.patience:
                self.stopped_early = True

    def _finish(self) -> FitResult:
        if self.best_weights is not None and not self.finished:
            self.model.load_state_dict(self.best_weights)  # early stopping: back to the best epoch
        self.finished = True
        if self.cfg.out is not None:
            self.save()
        return self._result()

    def _result(self) -> FitResult:
        return FitResult(self.history, self.epoch, self.best_epoch, self.best, self.stopped_early)

    def _interrupted_at_end(self, signum: int) -> TrainingInterrupted:
        how = stopped_by(signum)
        if self.cfg.out is None:
            return TrainingInterrupted(f"{how} in the last epoch; the run finished, and this run has no output "
                                       "directory, so nothing was saved", signum)
        return TrainingInterrupted(f"{how} in the last epoch; the run finished and is saved in {self.cfg.out}: run "
                                   "the same command with --resume to score it and write its outputs", signum)

    def _interrupted(self, save: bool, signum: int = signal.SIGINT) -> TrainingInterrupted:
        how = stopped_by(signum)
        where = (f"after epoch {self.epoch}" if self.batch == 0 else f"in epoch {self.epoch + 1}") + f", step {self.step}"
        if self.cfg.out is None:
            return TrainingInterrupted(f"{how} {where}; this run has no output directory, so nothing was saved",
                                       signum)
        if not save:                                      # a second Ctrl-C: the state may be half-updated
            self._metrics_as_checkpoint()
            kept = (f"its last checkpoint (epoch {self._checkpoint_epoch}) in {self.cfg.out} is kept: run the same "
                    "command with --resume to continue from there" if self._checkpoint_epoch is not None
                    else "nothing of it was saved")
            return TrainingInterrupted(f"{how} twice, {where}: stopped at once without saving; {kept}", signum)
        self.save()
        return TrainingInterrupted(f"{how} {where}; checkpoint saved in {self.cfg.out}: run the same "
                                   "command with --resume to continue", signum)

    # -- checkpoints --------------------------------------------------------------------------------
    def save(self) -> None:
        """Write a checkpoint of the whole training state into `cfg.out`."""
        manifest = {"epoch": self.epoch, "step": self.step, "finished": self.finished,
                    "best_epoch": self.best_epoch, "best": self.best,
                    "train_config": self._config_json(), "meta": self.meta,
                    "gemm_route": fused_route.current()}     # None: the fused kernel did not run
        weights, state = self.model.state_dict(), self._state()
        if self.best_weights is not None and not self.finished:   # early stopping: the model file is the
            weights, state["resume_weights"] = self.best_weights, weights   # best epoch's; resume takes the last step's
        save_checkpoint(self.cfg.out, weights, state, manifest)
        write_metrics_csv(self.cfg.out, self.history.epochs)   # the checkpoint's rows, whatever was there
        self._checkpoint_epoch = self.epoch               # = its metrics rows: one per completed epoch

    def _metrics_as_checkpoint(self) -> None:
        """A stop that saves nothing: metrics.csv back to the rows of the checkpoint on disk (this run's
        last, or the one it was about to replace), not the epochs appended since."""
        if self.cfg.out is None:
            return
        if self._checkpoint_epoch is not None:
            rows = self.history.epochs[:self._checkpoint_epoch]
        else:
            try:
                rows = load_checkpoint(self.cfg.out).state["history"]["epochs"]
            except UserError:                             # none there, or unreadable: no rows
                rows = []
        write_metrics_csv(self.cfg.out, rows)

    def _check_replaceable(self) -> None:
        """A new run in a directory holding a checkpoint replaces it when it saves: refused now (not after
        the training) when that one cannot be read, or is an unfinished run --resume would continue."""
        if self.cfg.out is None or not (Path(self.cfg.out) / MANIFEST).exists():
            return
        try:
            old = read_manifest(self.cfg.out)
        except UserError as e:
            raise UserError(f"{e}; a new run in {self.cfg.out} would replace it: remove it or choose "
                            "another --out directory") from None
        if not old.get("finished", True):
            raise UserError(f"{self.cfg.out} holds an unfinished run (stopped at epoch {old.get('epoch')}, step "
                            f"{old.get('step')}): continue it with --resume, or remove the directory or choose "
                            "another --out to start anew")

    def _state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                "rng": {**rng_states(self.generator), "epoch_shuffle": self.epoch_shuffle}, "carried": self.carried,
                "counters": {"epoch": self.epoch, "step": self.step, "batch": self.batch,
                             "finished": self.finished, "stopped_early": self.stopped_early,
                             "acc": {k: v for k, v in self.acc.items() if k != "t0"}},
                "early": {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                          "weights": self.best_weights},
                "history": {"epochs": self.history.epochs,
                            "loss": torch.tensor(self.history.loss, dtype=torch.float64),
                            "grad_norm": torch.tensor(self.history.grad_norm, dtype=torch.float64)}}

    def _restore(self) -> None:
        if self.cfg.out is None:
            raise UserError("resume needs the output directory of the run to continue (--out)")
        ckpt = load_checkpoint(self.cfg.out)
        check_resumable(self.cfg.out, ckpt.manifest, self._config_json(), self.meta)
        fused_route.check_resumed(ckpt.manifest.get("gemm_route"), self.cfg.out)
        s = ckpt.state
        load_state_into(self.model, ckpt.weights if s.get("resume_weights") is None else s["resume_weights"],
                        self.cfg.out, "this model")
        self.optimizer.load_state_dict(s["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(s["scheduler"])
        set_rng_states(s["rng"], self.generator)
        self.epoch_shuffle = s["rng"]["epoch_shuffle"]
        self.carried = to_device(s["carried"], self.device)
        c = s["counters"]
        self.epoch, self.step, self.batch = c["epoch"], c["step"], c["batch"]
        self.finished, self.stopped_early = c["finished"], c["stopped_early"]
        self.acc = {**_new_acc(), **c["acc"]}
        e = s["early"]
        self.best, self.best_epoch, self.bad_epochs, self.best_weights = (
            e["best"], e["best_epoch"], e["bad_epochs"], e["weights"])
        h = s["history"]
        self.history = History(list(h["epochs"]), h["loss"].tolist(), h["grad_norm"].tolist())

    def _config_json(self) -> dict:
        """The config as a checkpoint records it, with the backend that ran (None resolved)."""
        return {**self.cfg.to_json(), "backend": auto_backend()}

def _new_acc() -> dict:
    return {"loss": 0.0, "n": 0, "norm_sum": 0.0, "norm_max": 0.0, "clipped": 0, "t0": time.perf_counter()}


def _replay(trainer: Trainer) -> torch.Generator:
    """A throwaway generator in this epoch's start state (to count batches without consuming randomness)."""
    g = torch.Generator()
    g.set_state(trainer.epoch_shuffle if trainer.batch else trainer.generator.get_state())
    return g
