"""`rnnkit seq2seq`: the scores, a short run that learns, predict, the time limit, and bad input (exit 2)."""
import json

import pytest
import torch

from helpers import run_cli
from rnnkit.cli import main
from rnnkit.data.seq2seq import build_vocab, make_splits
from rnnkit.tasks import TrainConfig
from rnnkit.tasks.seq2seq import Seq2SeqTaskConfig, load_model, run_seq2seq, score, translate
from rnnkit.tasks.text_metrics import sequence_scores


def test_sequence_scores_by_hand():
    # targets "ab" and "ac" (ids 1 2 / 1 3); predictions "ab" (exact) and "abd" (too long, wrong 2nd)
    pred = torch.tensor([[1, 2, 0], [1, 2, 4]])
    s = sequence_scores(pred, torch.tensor([2, 3]), torch.tensor([[1, 2], [1, 3]]), torch.tensor([2, 2]))
    assert s["exact_match"] == 0.5
    assert s["token_accuracy"] == pytest.approx(4 / 6)          # 3 of 3, then 1 of 3 (a, not b, no end)
    short = sequence_scores(torch.tensor([[1, 0]]), torch.tensor([1]), torch.tensor([[1, 3]]), torch.tensor([2]))
    assert short == {"exact_match": 0.0, "token_accuracy": pytest.approx(1 / 3)}


def test_short_dates_run_learns_and_reloads(tmp_path):
    cfg = Seq2SeqTaskConfig(task="dates", train_size=1500, val_size=100, test_size=200, hidden_size=48, embed_dim=16)
    train = TrainConfig(epochs=4, lr=1e-2, batch_size=50, clip_norm=1.0, out=str(tmp_path / "model"), progress=False)
    r = run_seq2seq(cfg, train)
    assert r.metrics["token_accuracy"] > 0.6                      # the 4-digit year and '-' alone are ~45%
    assert r.sizes == {"train": 1500, "val": 100, "test": 200}
    model, vocab, meta = load_model(tmp_path / "model")
    _, _, test = make_splits("dates", (1500, 100, 200), seed=0)
    assert score(model, vocab, test, meta["max_len"]) == pytest.approx(r.metrics)
    assert translate(model, vocab, [test[0][0]], meta["max_len"])[0] == r.examples[0]["prediction"]


def test_splits_are_disjoint_and_vocab_has_specials():
    tr, va, te = make_splits("reverse", (300, 50, 50), seed=0)
    assert not {s for s, _ in tr} & {s for s, _ in te} and not {s for s, _ in va} & {s for s, _ in te}
    assert build_vocab(tr).tokens[:4] == ("<pad>", "<unk>", "<bos>", "<eos>")


def run(capsys, *argv):
    return run_cli(capsys, "seq2seq", *argv)


def test_cli_train_predict_and_time_limit(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "train", "--train-size", "200", "--val-size", "20", "--test-size", "30",
                          "--hidden-size", "16", "--epochs", "50", "--patience", "1000", "--time-limit", "1",
                          "--no-progress",
                          "--out", str(out))
    assert code == 0 and "stopped at the time limit" in stdout and "exact match" in stdout
    doc = json.loads((out / "metrics.json").read_text())
    assert {"exact_match", "token_accuracy", "val"} <= set(doc) and doc["model"]["stopped_by_time_limit"]
    assert doc["model"]["epochs_run"] < 50
    code, stdout, _ = run(capsys, "predict", "--model", str(out), "abcde", "jihgf")
    lines = stdout.strip().splitlines()
    assert code == 0 and [ln.split("\t")[0] for ln in lines] == ["abcde", "jihgf"]
    code, _, err = run(capsys, "predict", "--model", str(out / "model"), "abcxyz")
    assert code == 2 and "'xyz'" in err and "never saw" in err


def test_cli_bad_input_exits_2(tmp_path, capsys):
    code, _, err = run(capsys, "predict", "--model", str(tmp_path), "abc")
    assert code == 2 and "no checkpoint" in err
    code, _, err = run(capsys, "train", "--train-size", "5", "--epochs", "1", "--no-progress", "--time-limit", "1",
                       "--test-size", "1", "--val-size", "1", "--batch-size", "2", "--out", str(tmp_path / "x"))
    assert code == 0                                               # tiny but valid
    code, _, err = run(capsys, "predict", "--model", str(tmp_path / "x"), "   ")
    assert code == 2 and "non-empty" in err
    with pytest.raises(SystemExit) as e:
        main(["seq2seq", "train", "--task", "sorting"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_help_shows_the_tasks_own_early_stopping_defaults(capsys):
    """seq2seq overrides the common --monitor/--patience defaults; its --help must say so."""
    with pytest.raises(SystemExit) as done:
        main(["seq2seq", "train", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default val_exact_match)" in text and "default 5; --patience none: off" in text
    assert "(default val_loss)" not in text
