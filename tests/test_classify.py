"""`rnnkit classify`: scores, the bag-of-words baseline, padding invariance, a short run, bad input (exit 2)."""
import json

import pytest
import torch

from helpers import run_cli
from rnnkit.data.text import Vocabulary
from rnnkit.models.classifier import ClassifierConfig, SequenceClassifier
from rnnkit.tasks.classify import bag_of_words, bow_logistic, predict
from rnnkit.tasks.text_metrics import accuracy, classification_scores, macro_f1, per_class_f1


def test_accuracy_and_macro_f1_by_hand():
    pred, truth = [0, 1, 1, 0, 2], [0, 1, 0, 0, 1]
    assert accuracy(pred, truth) == 0.6
    # class 0: tp 2, predicted 2, true 3 -> 0.8; class 1: tp 1, predicted 2, true 2 -> 0.5; class 2: 0
    assert per_class_f1(pred, truth, 4) == [0.8, 0.5, 0.0, None]
    assert macro_f1(pred, truth, 4) == pytest.approx((0.8 + 0.5 + 0.0) / 3)
    assert classification_scores([1, 1], [1, 1], 2) == {"accuracy": 1.0, "macro_f1": 1.0}


def test_bag_of_words_features_and_logistic_baseline():
    tokens = torch.tensor([[2, 3, 2, 0], [4, 0, 0, 0]])                   # 0 = <pad>
    X = bag_of_words(tokens, torch.tensor([3, 1]), 5).to_dense()
    assert X.tolist() == [[0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    # word 2 means class 0, word 3 class 1, word 4 is noise: the baseline must separate them
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (60,), generator=g)
    toks = torch.stack([labels + 2, torch.full_like(labels, 4)], 1)         # (60, 2)
    split = (toks, torch.full((60,), 2), labels)
    pred, l2 = bow_logistic(split, split, split, 2)
    assert torch.equal(pred, labels) and l2 in (1e-4, 1e-3, 1e-2)


def test_padding_does_not_change_predictions():
    vocab = Vocabulary.build([["good", "bad", "film", "a", "long", "very"]])
    model = SequenceClassifier(ClassifierConfig(len(vocab), 2, embed_dim=8, hidden_size=8, pooling="last",
                                                bidirectional=True)).eval()
    meta = {"classes": ["fresh", "rotten"], "lower": True, "max_len": 50}
    alone = predict(model, vocab, meta, ["a good film"])[0][1]
    padded = predict(model, vocab, meta, ["a good film", "a very very long bad film " * 5])[0][1]
    assert alone == pytest.approx(padded, abs=1e-6)


def run(capsys, *argv):
    return run_cli(capsys, "classify", *argv)


def test_cli_train_on_bundled_sample_and_predict(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "train", "--epochs", "1", "--hidden-size", "8", "--embed-dim", "8",
                          "--no-progress", "--out", str(out))
    assert code == 0 and "bag-of-words" in stdout
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["sizes"]["test"] == 300 and doc["classes"] == ["fresh", "rotten"]
    assert doc["majority"]["accuracy"] == pytest.approx(173 / 300)       # 867 fresh of 1500: 173 of the test 300
    assert 0.5 < doc["bow_logistic"]["accuracy"] < 1 and 0 <= doc["macro_f1"] <= 1
    code, stdout, _ = run(capsys, "predict", "--model", str(out), "a gorgeous, witty film", "zzzz qqqq")
    rows = [ln.split("\t") for ln in stdout.strip().splitlines()]
    assert code == 0 and len(rows) == 2 and all(r[0] in ("fresh", "rotten") for r in rows)
    probs = [float(p.split("=")[1]) for p in rows[0][1].split()]
    assert sum(probs) == pytest.approx(1, abs=2e-3)
    code, _, err = run(capsys, "predict", "--model", str(out), "")
    assert code == 2 and "no words" in err


def test_cli_bad_data_exits_2(tmp_path, capsys):
    f = tmp_path / "a.csv"
    f.write_text("review,stars\ngood,5\nbad,1\nfine,5\nawful,1\n")
    code, _, err = run(capsys, "train", "--data", str(f), "--epochs", "1")
    assert code == 2 and "no column 'text', 'label'" in err and "--text-column" in err
    f.write_text("text,label\ngood,pos\nbad,pos\nfine,pos\n")
    code, _, err = run(capsys, "train", "--data", str(f), "--epochs", "1")
    assert code == 2 and "one class only" in err
    f.write_text("text,label\ngood,pos\n,neg\nfine,pos\nbad,neg\n")
    code, _, err = run(capsys, "train", "--data", str(f), "--epochs", "1")
    assert code == 2 and "empty text or label" in err and "--drop-empty" in err
    code, _, err = run(capsys, "train", "--data", str(f), "--dataset", "rotten_tomatoes")
    assert code == 2 and "not both" in err
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "none.csv"))
    assert code == 2 and "not found" in err
    code, _, err = run(capsys, "train", "--text-column", "x")
    assert code == 2 and "need --data" in err
    code, _, err = run(capsys, "train", "--test-fraction", "1.5")
    assert code == 2 and "test_fraction" in err
