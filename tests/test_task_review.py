"""Mends from a hostile review of `rnnkit classify` and `rnnkit seq2seq` (each test failed before):
early stopping on an accuracy kept the worst epoch, a small dates training set crashed its own test
scoring, SIGTERM lost the run, the summary line claimed early stops that did not happen, `--out ""`
wrote into the current directory, mixed-up model folders gave tracebacks, repeated texts sat on both
sides of the train/test split, and predictions outside what a model learned went unflagged."""
import csv
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from helpers import cli_sigterm_in

from rnnkit.cli import main
from rnnkit.cli.common import epochs_summary
from rnnkit.data.classify import stratified_split, text_key
from rnnkit.data.seq2seq import build_vocab, make_splits, task_alphabet
from rnnkit.errors import UserError
from rnnkit.tasks.seq2seq import output_caveats
from rnnkit.train import FitResult, History, TrainConfig, Trainer, TrainingInterrupted
from rnnkit.train.report import deferred_sigint

ROOT = Path(__file__).resolve().parents[1]


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# -- early stopping reads min or max from the metric ---------------------------------------------------

@pytest.mark.parametrize("monitor,mode", [("val_loss", "min"), ("val_accuracy", "max"), ("val_macro_f1", "max"),
                                         ("val_exact_match", "max"), ("val_perplexity", "min"),
                                         ("train_loss", "min"), ("val_mape", "min")])
def test_mode_follows_the_monitored_metric(monitor, mode):
    assert TrainConfig(monitor=monitor).resolved_mode == mode
    assert TrainConfig(monitor=monitor, mode="min").resolved_mode == "min"  # said explicitly: kept


def test_unknown_metric_needs_a_mode():
    with pytest.raises(UserError, match=r"'val_acuracy' is not a metric name.*mode='min' or mode='max'"):
        TrainConfig(monitor="val_acuracy")
    assert TrainConfig(monitor="val_mine", mode="max").resolved_mode == "max"


def test_classify_monitoring_accuracy_keeps_the_best_epoch(tmp_path, capsys):
    out = tmp_path / "acc"
    code, _, _ = run(capsys, "classify", "train", "--epochs", "6", "--patience", "6", "--monitor", "val_accuracy",
                          "--hidden-size", "16", "--embed-dim", "16", "--no-progress", "--out", str(out))
    assert code == 0
    rows = list(csv.DictReader((out / "model" / "metrics.csv").open()))
    acc = [float(r["val_accuracy"]) for r in rows]
    doc = json.loads((out / "metrics.json").read_text())
    best = doc["model"]["best_epoch"]
    assert acc[best - 1] == max(acc) and doc["train"]["mode"] == "max"     # was the first epoch, mode "min"


# -- seq2seq: a small training set --------------------------------------------------------------------

def test_small_dates_training_set_scores_its_test_pairs(tmp_path, capsys):
    train, _, test = make_splits("dates", (200, 50, 50))
    seen = {c for s, t in train for c in s + t}
    assert {c for s, t in test for c in s + t} - seen                     # the test pairs do hold new letters
    vocab = build_vocab(train, task_alphabet("dates"))
    assert set(task_alphabet("dates")) <= set(vocab.tokens)
    assert build_vocab(train).tokens == vocab.tokens[:len(build_vocab(train))]   # seen ones keep their ids
    code, stdout, err = run(capsys, "seq2seq", "train", "--task", "dates", "--epochs", "1", "--train-size", "200",
                            "--val-size", "50", "--test-size", "50", "--hidden-size", "16", "--no-progress",
                            "--out", str(tmp_path / "d"))
    assert code == 0, err                                                  # exit 2 "never saw in training" before
    assert "test exact match" in stdout


def test_task_alphabet_covers_what_the_generators_write():
    for task in ("reverse", "dates"):
        pairs = make_splits(task, (3000,), seed=7)[0]
        assert {c for s, t in pairs for c in s + t} <= set(task_alphabet(task))


# -- SIGTERM is a Ctrl-C: checkpoint, then exit 143 ---------------------------------------------------

def test_sigterm_is_deferred_like_ctrl_c():
    with deferred_sigint() as presses:
        os.kill(os.getpid(), signal.SIGTERM)
        assert presses.is_set() and presses.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or callable(signal.getsignal(signal.SIGTERM))


def test_trainer_saves_a_checkpoint_on_sigterm(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    x, y = torch.randn(40, 3), torch.randn(40, 1)
    calls = []

    def loss(m, batch):
        xb, yb = batch
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return torch.nn.functional.mse_loss(m(xb), yb)

    from rnnkit.train import TensorBatches
    trainer = Trainer(model, TrainConfig(epochs=2, batch_size=8, out=str(tmp_path / "m"), progress=False), loss)
    with pytest.raises(TrainingInterrupted) as e:
        trainer.fit(TensorBatches(x, y, batch_size=8))
    assert e.value.signum == signal.SIGTERM and "terminated (SIGTERM)" in str(e.value)
    assert (tmp_path / "m" / "checkpoint.json").exists()


def test_cli_exits_143_after_sigterm_and_resumes(tmp_path):
    out = tmp_path / "t"
    done = cli_sigterm_in("_run_epoch", "self.epoch == 1", ["classify", "train", "--epochs", "3", "--hidden-size",
                                                             "8", "--embed-dim", "8", "--no-progress", "--out", str(out)])
    assert done.returncode == 143, done.stderr[-2000:]
    assert "terminated (SIGTERM)" in done.stderr and (out / "model" / "checkpoint.json").exists()
    code = main(["classify", "train", "--epochs", "3", "--hidden-size", "8", "--embed-dim", "8", "--no-progress",
                 "--out", str(out), "--resume"])
    assert code == 0 and len(list(csv.DictReader((out / "model" / "metrics.csv").open()))) == 3


# -- the summary line says whose weights the model holds -------------------------------------------------

def _fit(epochs, best, early):
    return FitResult(History(), epochs, best, 0.5, early)


def test_epochs_summary():
    assert epochs_summary(_fit(15, 14, False), None) == "15 epochs"               # no patience: last epoch's model
    assert epochs_summary(_fit(15, 14, False), 3) == "15 epochs (best weights from epoch 14)"
    assert epochs_summary(_fit(9, 6, True), 3) == "stopped early after 9 epochs (best weights from epoch 6)"
    assert epochs_summary(_fit(1, 1, False), 3, stopped_by_time=True) == "1 epoch, stopped at the time limit"


def test_classify_without_patience_claims_no_early_stop(tmp_path, capsys):
    code, stdout, _ = run(capsys, "classify", "train", "--epochs", "3", "--patience", "none", "--hidden-size", "8",
                          "--embed-dim", "8", "--no-progress", "--out", str(tmp_path / "p"))
    assert code == 0 and "early stop" not in stdout and "best epoch" not in stdout and "; 3 epochs," in stdout


# -- bad folders -------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", ["classify", "seq2seq", "forecast", "textgen"])
def test_empty_out_is_refused(task, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = [task] + ([] if task == "forecast" else ["train"]) + ["--out", " "]
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "argument --out: is empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_weights_of_another_run_are_a_clean_error(tmp_path, capsys):
    for name, hidden in (("a", "8"), ("b", "4")):
        assert main(["classify", "train", "--epochs", "1", "--hidden-size", hidden, "--embed-dim", "8",
                     "--no-progress", "--out", str(tmp_path / name)]) == 0
    capsys.readouterr()
    (weights,) = (tmp_path / "a" / "model").glob("model-*.safetensors")
    (other,) = (tmp_path / "b" / "model").glob("model-*.safetensors")
    weights.write_bytes(other.read_bytes())
    code, _, err = run(capsys, "classify", "predict", "--model", str(tmp_path / "a"), "good")
    assert code == 2 and "do not fit the model its checkpoint.json describes" in err and "Traceback" not in err


# -- repeated texts stay on one side of the split ---------------------------------------------------

def test_repeated_texts_are_not_split_across_train_and_test():
    texts = [f"review {i % 30}" for i in range(60)] + [f"other {i}" for i in range(60)]   # 30 texts twice
    labels = [("pos", "neg")[i % 2] for i in range(120)]
    keys = [text_key(t) for t in texts]
    plain_train, plain_test = stratified_split(labels, 0.25, seed=0)
    assert {keys[i] for i in plain_train} & {keys[i] for i in plain_test}        # the leak this guards against
    train, test = stratified_split(labels, 0.25, seed=0, groups=keys)
    assert not {keys[i] for i in train} & {keys[i] for i in test}
    assert sorted(train + test) == list(range(120))
    assert set(test) < set(plain_test)                   # the test side: the plain one less its repeats
    same = ["same text"] * 10 + [f"t{i}" for i in range(10)]
    with pytest.raises(UserError, match=r"class\(es\) \['a'\]: every text held out.*also appears among the training"):
        stratified_split(["a"] * 10 + ["b"] * 10, 0.3, seed=0, groups=same)
    unique = [f"t{i}" for i in range(120)]                                       # no repeats: the split as before
    assert stratified_split(labels, 0.25, seed=0, groups=unique) == (plain_train, plain_test)
    assert text_key("  Great   FILM ") == text_key("great film")


# -- predictions outside what the model learned are flagged -------------------------------------------

def test_output_caveats():
    meta = {"task_config": {"task": "dates"}, "max_source_len": 20}
    assert output_caveats(meta, "March 5, 2021", "2021-03-05") == []
    (bad,) = output_caveats(meta, "2021/3/5", "2021-13-05")
    assert "not a valid date" in bad
    long = output_caveats({"task_config": {"task": "reverse"}, "max_source_len": 20}, "a" * 50, "a" * 20)
    assert len(long) == 1 and "50 characters, more than any training source (20)" in long[0]
    assert output_caveats({"task_config": {"task": "reverse"}}, "a" * 50, "a") == []   # older model: unknown
