"""`rnnkit forecast` through rnnkit.cli.main: bad input exits 2 with a message, a tiny run writes everything."""
import csv
import json

import pytest

from rnnkit.cli import main
from rnnkit.data import airline


def write_csv(path, rows, header=("date", "value")):
    path.write_text("\n".join([",".join(header), *(",".join(map(str, r)) for r in rows)]) + "\n")
    return str(path)


def monthly(n=60, start=2000):
    return [(f"{start + i // 12}-{i % 12 + 1:02d}-01", 100 + i + 10 * (i % 12 == 6)) for i in range(n)]


def fails(capsys, *argv, match):
    code = main(["forecast", "--epochs", "1", "--no-progress", "--no-sarima", *argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and match in err, err
    return err


def test_unreadable_files(tmp_path, capsys):
    fails(capsys, "--data", str(tmp_path / "missing.csv"), match="no such file")
    fails(capsys, "--data", str(tmp_path), match="cannot read")
    (tmp_path / "empty.csv").write_text("")
    fails(capsys, "--data", str(tmp_path / "empty.csv"), match="cannot read")
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00\x81\x9f" * 50)
    fails(capsys, "--data", str(tmp_path / "bin.csv"), match="cannot read")


def test_missing_column(tmp_path, capsys):
    f = write_csv(tmp_path / "a.csv", monthly())
    fails(capsys, "--data", f, "--column", "sales", match="column 'sales' is not in")
    fails(capsys, "--data", f, "--column", "value", "--time-column", "when", match="time column 'when'")


def test_nan_and_empty_cells(tmp_path, capsys):
    rows = monthly()
    rows[5], rows[9] = (rows[5][0], "NaN"), (rows[9][0], "")
    err = fails(capsys, "--data", write_csv(tmp_path / "a.csv", rows), "--column", "value", match="missing")
    assert "line 7" in err and "line 11" in err


def test_non_numeric_cells(tmp_path, capsys):
    rows = monthly()
    rows[3] = (rows[3][0], "12,5")
    rows[4] = (rows[4][0], "abc")
    f = tmp_path / "a.csv"
    f.write_text("date,value\n" + "\n".join(f'{d},"{v}"' for d, v in rows) + "\n")
    err = fails(capsys, "--data", str(f), "--column", "value", match="non-numeric")
    assert "line 5 ('12,5')" in err and "line 6 ('abc')" in err


def test_irregular_unsorted_and_bad_dates(tmp_path, capsys):
    gap = monthly()
    del gap[20]
    fails(capsys, "--data", write_csv(tmp_path / "g.csv", gap), "--time-column", "date", match="gap")
    dup = monthly()
    dup[10] = (dup[9][0], dup[10][1])
    fails(capsys, "--data", write_csv(tmp_path / "d.csv", dup), "--time-column", "date", match="repeats")
    bad = monthly()
    bad[2] = ("someday", bad[2][1])
    fails(capsys, "--data", write_csv(tmp_path / "b.csv", bad), "--time-column", "date", match="not dates")


def test_too_short_series_and_bad_transform(tmp_path, capsys):
    f = write_csv(tmp_path / "a.csv", monthly(30))
    fails(capsys, "--data", f, "--time-column", "date", match="too short")
    neg = write_csv(tmp_path / "n.csv", [(d, v - 150) for d, v in monthly(80)])
    fails(capsys, "--data", neg, "--time-column", "date", "--log", "yes", match="log transform needs values > 0")
    fails(capsys, "--column", "passengers", match="need --data")


def test_help_shows_a_worked_example(capsys):
    with pytest.raises(SystemExit) as e:
        main(["forecast", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--data sales.csv" in out and "--backtest" in out


def test_tiny_end_to_end_run_writes_all_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["forecast", "--epochs", "2", "--hidden-size", "8", "--no-progress", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "seasonal_naive" in stdout and "forecast: LSTM direct" in stdout
    m = json.loads((out / "metrics.json").read_text())
    for method in (m, m["naive"], m["seasonal_naive"]):
        assert set(method) >= {"mae", "rmse", "mape", "smape", "mase"}
    assert round(m["seasonal_naive"]["mape"], 2) == 9.99
    rows = list(csv.DictReader(open(out / "forecast.csv")))
    assert len(rows) == 12 and rows[0]["time"] == "1960-01" and float(rows[0]["actual"]) == airline().values[132]
    assert (out / "forecast.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "model" / "checkpoint.json").exists() and (out / "model" / "metrics.csv").exists()


def test_user_csv_resume_equals_uninterrupted(tmp_path, capsys):
    f = write_csv(tmp_path / "a.csv", monthly(72))
    common = ["--data", f, "--time-column", "date", "--lookback", "12", "--horizon", "6", "--hidden-size", "8",
              "--no-sarima", "--no-progress", "--cell", "gru", "--strategy", "recursive"]
    assert main(["forecast", *common, "--epochs", "4", "--out", str(tmp_path / "full")]) == 0
    assert main(["forecast", *common, "--epochs", "2", "--out", str(tmp_path / "cut")]) == 0
    assert main(["forecast", *common, "--epochs", "4", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    capsys.readouterr()
    full = json.loads((tmp_path / "full" / "metrics.json").read_text())
    cut = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert full["mape"] == cut["mape"] and full["model"]["epochs_run"] == cut["model"]["epochs_run"] == 4


def test_nonfinite_loss_exits_nonzero_with_a_message(tmp_path, capsys):
    code = main(["forecast", "--epochs", "5", "--lr", "1e30", "--optimizer", "sgd", "--no-sarima",
                 "--no-progress", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "training stopped" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["forecast"], ["textgen", "sample", "--model", "m", "--prompt", "a"],
                                  ["gradflow"], ["memory"]])
def test_a_seed_torch_cannot_take_is_refused_by_name(argv, tmp_path, capsys, monkeypatch):
    """A seed past torch's range stopped with torch's 'Overflow when unpacking long long' (and gradflow and
    memory add offsets to it): seeds are refused outside [0, 2**32), numpy's range."""
    monkeypatch.chdir(tmp_path)
    try:
        code = main([*argv, "--seed", str(2**32)])
    except SystemExit as e:                                    # argparse's own exit
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and "--seed" in err and "[0, 2**32)" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["forecast", "--no-sarima", "--epochs", "1"],
                                  ["gradflow", "--length", "10", "--hidden-size", "4", "--num-seeds", "1"]])
def test_out_that_is_a_file_exits_2(argv, tmp_path, capsys):
    """--out naming an existing file gave NotADirectoryError / FileExistsError tracebacks (exit 1)."""
    f = tmp_path / "afile"
    f.write_text("hi")
    code = main([*argv, "--out", str(f)])
    err = capsys.readouterr().err
    assert code == 2 and "not an existing file" in err and "Traceback" not in err and f.read_text() == "hi"
