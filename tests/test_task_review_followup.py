"""Mends from a second review, of the first round's own change (tests/test_task_review.py): each failed
before. The resolved early-stopping mode survived dataclasses.replace, old checkpoints could not be
resumed, a signal in a fit's last epoch was dropped (a back-test went on to its next fold), a signal
during the time limit's checkpoint was read as the time limit, resuming into another run's weights gave
a traceback, train_loss could not be monitored, seq2seq had no val_loss, "20210305" passed as a date."""
import csv
import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from helpers import cli_sigterm_in

from rnnkit.cli import main
from rnnkit.errors import UserError
from rnnkit.tasks.seq2seq import output_caveats
from rnnkit.tasks.text_metrics import Deadline, fit_within
from rnnkit.train import TensorBatches, TrainConfig, Trainer, TrainingInterrupted

ROOT = Path(__file__).resolve().parents[1]
SMALL_S2S = ["--task", "reverse", "--train-size", "120", "--val-size", "30", "--test-size", "30", "--hidden-size", "8",
             "--embed-dim", "8", "--schedule", "none", "--no-progress"]


def test_replace_reads_the_new_monitors_mode():
    cfg = dataclasses.replace(TrainConfig(patience=3), monitor="val_accuracy")
    assert cfg.resolved_mode == "max" and cfg.to_json()["mode"] == "max"
    assert TrainConfig(monitor="val_accuracy", mode="min").resolved_mode == "min"


def _linear_run(tmp_path, loss, **cfg):
    torch.manual_seed(0)
    x, y = torch.randn(32, 3), torch.randn(32, 1)
    trainer = Trainer(torch.nn.Linear(3, 1), TrainConfig(batch_size=8, progress=False, **cfg), loss)
    return trainer, TensorBatches(x, y, batch_size=8)


def _mse(m, batch):
    return torch.nn.functional.mse_loss(m(batch[0]), batch[1])


def test_train_loss_can_be_monitored_without_evaluation(tmp_path):
    trainer, data = _linear_run(tmp_path, _mse, epochs=4, patience=2, monitor="train_loss")
    fit = trainer.fit(data)
    assert fit.best_epoch is not None and fit.best == min(r["train_loss"] for r in fit.history.epochs)


def test_a_signal_in_the_last_epoch_is_not_dropped(tmp_path):
    calls = []

    def loss(m, batch):
        calls.append(1)
        if len(calls) == 8:                                  # epoch 2 of 2, its last step
            os.kill(os.getpid(), signal.SIGTERM)
        return _mse(m, batch)

    trainer, data = _linear_run(tmp_path, loss, epochs=2, out=str(tmp_path / "m"))
    with pytest.raises(TrainingInterrupted, match=r"terminated \(SIGTERM\) in the last epoch; the run finished and "
                                                  r"is saved") as e:
        trainer.fit(data)
    assert e.value.signum == signal.SIGTERM and len(calls) == 8              # the epoch was finished
    again, _ = _linear_run(tmp_path, _mse, epochs=2, out=str(tmp_path / "m"))
    assert again.fit(data, resume=True).epochs_run == 2                      # resumes as finished


def test_a_signal_during_the_time_limit_stop_is_a_stop(tmp_path):
    class Stopped:
        best_weights = None

        def __init__(self, pressed):
            self.pressed = pressed

        def fit(self, source, resume=False):
            raise TrainingInterrupted("x", signal.SIGTERM, pressed=self.pressed)

    deadline = Deadline(0)
    deadline.hit = True
    with pytest.raises(TrainingInterrupted):
        fit_within(Stopped(True), None, deadline)                             # a SIGTERM came as well: stop
    Stopped.epoch, Stopped.best_epoch, Stopped.best, Stopped.history = 1, None, None, None
    assert fit_within(Stopped(False), None, deadline)[1] is True              # the time limit alone


def test_back_test_stops_at_a_sigterm_in_a_folds_last_epoch(tmp_path):
    out = tmp_path / "f"
    done = cli_sigterm_in("_end_epoch", "True", ["forecast", "--backtest", "3", "--epochs", "1", "--no-sarima",
                                                 "--no-progress", "--hidden-size", "8", "--out", str(out)])
    assert done.returncode == 143, done.stderr[-2000:]                        # was 0, all 3 folds trained
    assert "terminated (SIGTERM) in back-test fold 1 of 3" in done.stderr


def test_old_seq2seq_checkpoint_resumes(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["seq2seq", "train", *SMALL_S2S, "--epochs", "1", "--out", str(out)]) == 0
    manifest = out / "model" / "checkpoint.json"
    doc = json.loads(manifest.read_text())
    del doc["meta"]["max_source_len"]                                         # as written before it existed
    manifest.write_text(json.dumps(doc))
    assert main(["seq2seq", "train", *SMALL_S2S, "--epochs", "2", "--out", str(out), "--resume"]) == 0
    assert "; 2 epochs, 4 steps" in capsys.readouterr().out


def test_resume_refusing_a_changed_mode_says_how_to_continue(tmp_path, capsys):
    out = tmp_path / "c"
    argv = ["classify", "train", "--epochs", "2", "--hidden-size", "8", "--embed-dim", "8", "--no-progress",
            "--monitor", "val_accuracy", "--patience", "5", "--out", str(out)]
    assert main(argv[:3] + ["1"] + argv[4:]) == 0
    manifest = out / "model" / "checkpoint.json"
    doc = json.loads(manifest.read_text())
    doc["train_config"]["mode"] = "min"                                       # what such a run recorded before
    manifest.write_text(json.dumps(doc))
    capsys.readouterr()
    assert main([*argv, "--resume"]) == 2
    assert "pass --mode min" in capsys.readouterr().err
    assert main([*argv, "--resume", "--mode", "min"]) == 0


def test_resume_into_another_runs_weights_is_a_clean_error(tmp_path, capsys):
    for name, hidden in (("a", "8"), ("b", "4")):
        assert main(["classify", "train", "--epochs", "1", "--hidden-size", hidden, "--embed-dim", "8",
                     "--no-progress", "--patience", "none", "--out", str(tmp_path / name)]) == 0
    (weights,) = (tmp_path / "a" / "model").glob("model-*.safetensors")
    (other,) = (tmp_path / "b" / "model").glob("model-*.safetensors")
    weights.write_bytes(other.read_bytes())
    capsys.readouterr()
    code = main(["classify", "train", "--epochs", "2", "--hidden-size", "8", "--embed-dim", "8", "--no-progress",
                 "--patience", "none", "--out", str(tmp_path / "a"), "--resume"])
    assert code == 2 and "do not fit this model" in capsys.readouterr().err


def test_seq2seq_can_monitor_its_validation_loss(tmp_path, capsys):
    out = tmp_path / "v"
    assert main(["seq2seq", "train", *SMALL_S2S, "--epochs", "2", "--monitor", "val_loss", "--out", str(out)]) == 0
    rows = list(csv.DictReader((out / "model" / "metrics.csv").open()))
    assert all(float(r["val_loss"]) > 0 for r in rows)
    doc = json.loads((out / "metrics.json").read_text())
    losses = [float(r["val_loss"]) for r in rows]
    assert doc["train"]["mode"] == "min" and losses[doc["model"]["best_epoch"] - 1] == min(losses)


def test_compact_iso_is_not_a_valid_output():
    meta = {"task_config": {"task": "dates"}}
    assert output_caveats(meta, "March 5, 2021", "20210305") and output_caveats(meta, "x", "2021-W10-5")
    assert not output_caveats(meta, "March 5, 2021", "2021-03-05")


def test_unknown_monitor_message_points_at_the_evaluated_metrics():
    with pytest.raises(UserError, match=r"the metrics the run evaluates.*or train_loss.*--mode min or --mode max"):
        TrainConfig(monitor="grad_norm_max")
