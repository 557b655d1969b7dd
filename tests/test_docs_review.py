"""What the documentation promises, held to it (a helper ran every README and --help example literally):
textgen's speed after --resume, --anneal with --resume, --patience none, the clip study's table."""
from __future__ import annotations

import json

import pytest
from helpers import run_cli

from rnnkit.cli import common

VERSE = "the quick brown fox jumps over the lazy dog and the dog sleeps in the sun all day long\n" * 300


def _train(capsys, tmp_path, *extra):
    f = tmp_path / "verse.txt"
    f.write_text(VERSE)
    return run_cli(capsys, "textgen", "train", "--data", str(f), "--hidden-size", "8", "--num-layers", "1",
                   "--batch-size", "4", "--bptt", "8", "--no-progress", "--out", str(tmp_path / "run"), *extra)


def test_textgen_resume_reports_this_sessions_speed(tmp_path, capsys):
    code, _, _ = _train(capsys, tmp_path, "--epochs", "1")
    assert code == 0
    first = json.loads((tmp_path / "run" / "metrics.json").read_text())["model"]
    code, stdout, _ = _train(capsys, tmp_path, "--epochs", "2", "--resume")
    assert code == 0
    second = json.loads((tmp_path / "run" / "metrics.json").read_text())["model"]
    assert second["steps"] == 2 * first["steps"] and second["steps_this_session"] == first["steps"]
    assert second["steps_per_second"] == pytest.approx(first["steps"] / second["train_seconds"], rel=0.15)
    assert f"{second['steps']} steps ({first['steps']} in this session)" in stdout


def test_textgen_anneal_cannot_be_resumed(tmp_path, capsys):
    code, _, _ = _train(capsys, tmp_path, "--epochs", "50", "--time-limit", "1", "--anneal")
    assert code == 0
    code, _, err = _train(capsys, tmp_path, "--epochs", "50", "--time-limit", "1", "--anneal", "--resume")
    assert code == 2 and "cannot be resumed exactly" in err


@pytest.mark.parametrize("text, value", [("none", None), ("Off", None), ("4", 4)])
def test_patience_none_turns_early_stopping_off(text, value):
    assert common.positive_int_or_none(text) == value


def test_classify_help_patience_none_parses(capsys):
    from rnnkit.cli import build_parser
    args = build_parser().parse_args(["classify", "train", "--patience", "none"])
    assert args.patience is None


def test_clip_study_table_names_each_run(tmp_path, capsys):
    code, stdout, _ = run_cli(capsys, "memory", "--clip-study", "--clip-norm", "1", "--steps", "5",
                              "--out", str(tmp_path), "--no-progress")
    assert code == 0
    rows = [line for line in stdout.splitlines() if line.startswith(("no clipping", "clip-norm 1"))]
    assert len(rows) == 2 and stdout.splitlines()[0].startswith("run ")
