"""`rnnkit textgen`: loss units, the carried-state validation, a run that learns, sampling, bad input (exit 2)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli

from rnnkit.models.language import LanguageModel, LanguageModelConfig
from rnnkit.tasks import TrainConfig
from rnnkit.tasks.text_metrics import bits, lm_scores, perplexity
from rnnkit.tasks.textgen import (
    TextgenConfig,
    generate,
    load_model,
    prepare,
    run_textgen,
    validation_loss,
)

VERSE = "the cat sat on the mat.\nthe dog sat on the log.\n" * 60


def test_loss_units():
    assert bits(math.log(2)) == pytest.approx(1.0) and perplexity(math.log(5)) == pytest.approx(5.0)
    assert lm_scores(1.5) == {"loss": 1.5, "perplexity": pytest.approx(4.4817, abs=1e-4),
                              "bits_per_token": pytest.approx(2.1640, abs=1e-4)}


def test_validation_carries_state_through_the_whole_stream():
    """Windows with the state carried score every token exactly as one pass over the stream does."""
    model = LanguageModel(LanguageModelConfig(7, embed_dim=4, hidden_size=8, num_layers=2)).eval()
    ids = torch.randint(2, 7, (300,))
    with torch.no_grad():
        logits, _ = model(ids[None, :-1])
    whole = float(F.cross_entropy(logits[0], ids[1:]))
    assert validation_loss(model, ids, 100) == pytest.approx(whole, rel=1e-5)   # 1 row, windows of 128


def test_split_holds_out_the_tail_and_builds_vocab_on_the_head():
    vocab, train, val = prepare("aaaabbbbcc" * 10 + "xyz", TextgenConfig())     # 103 chars: last 10 held out
    assert len(train) == 93 and len(val) == 10
    assert "x" not in vocab and int(val[-1]) == vocab.unk_id                   # unseen in training -> <unk>


def test_short_run_learns_a_repetitive_text(tmp_path):
    cfg = TextgenConfig(hidden_size=32, num_layers=1, embed_dim=16)
    train = TrainConfig(epochs=6, lr=1e-2, batch_size=8, tbptt=16, clip_norm=5.0, out=str(tmp_path / "m"),
                        progress=False)
    r = run_textgen(VERSE, cfg, train)
    assert r.metrics["loss"] < 1.0                                            # uniform over 17 chars: 2.8
    assert r.metrics["bits_per_character"] == pytest.approx(r.metrics["loss"] / math.log(2))
    model, vocab, meta = load_model(tmp_path / "m")
    assert validation_loss(model, prepare(VERSE, cfg)[2], 16) == pytest.approx(r.metrics["loss"], rel=1e-5)
    text = generate(model, vocab, meta, "the ", 30, temperature=0)
    assert text.startswith("the ") and len(text) == 34


def run(capsys, *argv):
    return run_cli(capsys, "textgen", *argv)


def test_cli_word_level_train_and_sample(tmp_path, capsys):
    f = tmp_path / "verse.txt"
    f.write_text(VERSE)
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "train", "--data", str(f), "--level", "word", "--min-freq", "1", "--epochs", "2",
                          "--hidden-size", "16", "--num-layers", "1", "--batch-size", "4", "--bptt", "8",
                          "--no-progress", "--out", str(out))
    assert code == 0 and "nats/word" in stdout
    doc = json.loads((out / "metrics.json").read_text())
    assert doc["token"] == "word" and "bits_per_character" not in doc and doc["units"]["loss"] == "nats per word"
    code, stdout, _ = run(capsys, "sample", "--model", str(out), "--prompt", "the zebra", "--length", "5",
                          "--top-k", "3")
    assert code == 0 and stdout.startswith("the zebra ")                      # unseen word read as <unk>


def test_cli_time_limit_and_char_prompt_errors(tmp_path, capsys):
    f = tmp_path / "verse.txt"
    f.write_text(VERSE * 20)
    out = tmp_path / "run"
    code, stdout, _ = run(capsys, "train", "--data", str(f), "--epochs", "100", "--hidden-size", "16",
                          "--num-layers", "1", "--batch-size", "4", "--time-limit", "1", "--anneal",
                          "--no-progress", "--out", str(out))
    assert code == 0 and "stopped at the time limit" in stdout
    assert json.loads((out / "metrics.json").read_text())["model"]["epochs_run"] < 100
    code, _, err = run(capsys, "sample", "--model", str(out), "--prompt", "the QUEEN")
    assert code == 2 and "'Q'" in err
    code, _, err = run(capsys, "sample", "--model", str(out), "--prompt", "the", "--temperature", "-1")
    assert code == 2 and "temperature" in err


def test_cli_bad_data_exits_2(tmp_path, capsys):
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "missing.txt"))
    assert code == 2 and "not found" in err
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81" * 20)
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "bin.txt"))
    assert code == 2 and "not UTF-8" in err
    (tmp_path / "short.txt").write_text("to be or not to be\n")
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "short.txt"), "--no-progress")
    assert code == 2 and "lower --batch-size" in err
    code, _, err = run(capsys, "train", "--data", str(tmp_path / "short.txt"), "--dataset", "shakespeare")
    assert code == 2 and "not both" in err
    code, _, err = run(capsys, "sample", "--model", str(tmp_path), "--prompt", "x")
    assert code == 2 and "no checkpoint" in err
    code, _, err = run(capsys, "train", "--anneal")
    assert code == 2 and "--time-limit" in err


def test_text_without_newlines_and_a_min_freq_nothing_reaches(tmp_path, capsys):
    """A char model's sample prompt (the first line + a newline) used a newline the training part lacked:
    the run trained to the end, then failed with no metrics.json. A --min-freq no word reaches trained a
    model of <unk> alone, then failed."""
    f = tmp_path / "one_line.txt"
    f.write_text(" ".join(["the cat sat on the mat."] * 80))
    out = tmp_path / "run"
    small = ["--hidden-size", "8", "--num-layers", "1", "--batch-size", "4", "--bptt", "8", "--no-progress"]
    code, stdout, _ = run(capsys, "train", "--data", str(f), "--epochs", "1", *small, "--out", str(out))
    assert code == 0 and (out / "metrics.json").exists()
    assert json.loads((out / "metrics.json").read_text())["sample"].startswith("the cat sat")
    code, _, err = run(capsys, "train", "--data", str(f), "--level", "word", "--min-freq", "1000", "--epochs", "1",
                       *small, "--out", str(tmp_path / "w"))
    assert code == 2 and "no word of the training text occurs --min-freq 1000 times" in err
    assert not (tmp_path / "w" / "model").exists()                           # refused before training
