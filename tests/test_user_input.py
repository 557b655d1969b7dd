"""The user's own files and numbers, as a hostile user brings them: other separators and decimal commas,
day-first dates, latin-1 and byte-order marks, inf and nan as settings, seasons and splits that do not fit.
Each case was wrong before (a traceback, a silent run, a misleading message or a BOM token)."""
import math

import numpy as np
import pytest

from rnnkit.cli import main
from rnnkit.data.series import load_csv
from rnnkit.data.text import read_text
from rnnkit.errors import UserError
from rnnkit.tasks.gradflow import GradflowConfig
from rnnkit.tasks.memory import MemoryConfig
from rnnkit.train import TrainConfig

VALUES = [100 + i + 10 * (i % 12 == 6) + 0.25 for i in range(60)]


def exits_2(capsys, argv, *needles):
    try:
        code = main(argv)
    except SystemExit as e:                                   # argparse's own exit
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err and all(n in err for n in needles), err
    return err


# -- numbers as settings ----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["forecast", "--lr", "inf"], ["forecast", "--weight-decay", "inf"], ["forecast", "--clip-norm", "inf"],
    ["forecast", "--clip-value", "nan"], ["forecast", "--dropout", "nan"], ["forecast", "--gamma", "inf"],
    ["memory", "--recurrent-scale", "inf"], ["memory", "--lr", "inf"], ["memory", "--clip-norm", "nan"],
    ["gradflow", "--lr", "inf"], ["gradflow", "--clip-norm", "inf"],
    ["classify", "train", "--test-fraction", "nan"], ["textgen", "train", "--time-limit", "inf"],
    ["textgen", "sample", "--model", "m", "--temperature", "inf"], ["seq2seq", "train", "--time-limit", "inf"],
])
def test_inf_and_nan_settings_are_refused_by_name(argv, tmp_path, capsys, monkeypatch):
    """--lr inf and --weight-decay inf trained to a NaN (exit 1); --clip-norm / --recurrent-scale inf ran and
    wrote bare `Infinity` into metrics.json."""
    monkeypatch.chdir(tmp_path)
    err = exits_2(capsys, argv, argv[-2])
    assert "finite" in err
    assert not any(tmp_path.iterdir())                                    # refused before writing anything


@pytest.mark.parametrize("make", [
    lambda: TrainConfig(lr=math.inf), lambda: TrainConfig(weight_decay=math.inf), lambda: TrainConfig(clip_norm=math.nan),
    lambda: TrainConfig(lr=True), lambda: MemoryConfig(recurrent_scale=math.inf), lambda: MemoryConfig(clip_norm=math.inf),
    lambda: GradflowConfig(lr=math.inf), lambda: GradflowConfig(clip_norm=math.nan),
])
def test_library_configs_refuse_non_finite_numbers(make):
    with pytest.raises(UserError, match="finite"):
        make()


def test_forecast_config_refuses_a_nan_dropout_when_made():
    from rnnkit.tasks.forecast import ForecastConfig
    with pytest.raises(UserError, match="dropout must be in"):
        ForecastConfig(dropout=math.nan)


# -- CSV files from other locales -------------------------------------------------------------------------

def test_semicolon_csv_with_decimal_commas_reads_as_the_comma_file(tmp_path):
    dates = [f"{2000 + i // 12}-{i % 12 + 1:02d}-01" for i in range(60)]
    (tmp_path / "a.csv").write_text("date,value\n" + "".join(f"{d},{v}\n" for d, v in zip(dates, VALUES)))
    (tmp_path / "b.csv").write_text("date;value\n" + "".join(f"{d};{str(v).replace('.', ',')}\n"
                                                              for d, v in zip(dates, VALUES)))
    (tmp_path / "t.csv").write_text("date\tvalue\n" + "".join(f"{d}\t{v}\n" for d, v in zip(dates, VALUES)))
    a = load_csv(tmp_path / "a.csv", time_column="date")
    for other in ("b.csv", "t.csv"):
        b = load_csv(tmp_path / other, time_column="date")               # the value column found by itself
        assert b.name == "value" and b.freq == "MS" and b.season == 12
        np.testing.assert_array_equal(b.values, a.values)
        assert (b.times == a.times).all()


def test_decimal_commas_stay_an_error_in_a_comma_separated_file(tmp_path):
    (tmp_path / "a.csv").write_text('value\n1.5\n"2,5"\n3.5\n')
    with pytest.raises(UserError, match=r"non-numeric values at line 3 \('2,5'\)"):
        load_csv(tmp_path / "a.csv", "value")


def test_latin1_files_get_the_conversion_command(tmp_path, capsys):
    f = tmp_path / "ventes.csv"
    f.write_bytes("mois,quantité\n".encode("latin-1") + b"".join(f"2000-{m:02d},{m}\n".encode() for m in range(1, 13)))
    exits_2(capsys, ["forecast", "--data", str(f), "--no-sarima"], "not UTF-8", "iconv -f latin1 -t utf-8 ventes.csv")
    g = tmp_path / "avis.csv"
    g.write_bytes("text,label\ntrès bon,pos\nmauvais,neg\n".encode("latin-1"))
    exits_2(capsys, ["classify", "train", "--data", str(g)], "not UTF-8", "iconv")


def test_a_byte_order_mark_is_not_text(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes("\ufeffto be or not to be\n".encode("utf-8"))
    assert read_text(f) == "to be or not to be\n"
    g = tmp_path / "bom.csv"
    g.write_bytes("\ufeffdate;value\n2000-01;1,5\n2000-02;2,5\n2000-03;3\n".encode("utf-8"))
    s = load_csv(g, "value", "date")
    assert s.values.tolist() == [1.5, 2.5, 3.0] and s.freq == "MS"


# -- dates written day first ------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["%d/%m/%Y", "%d.%m.%Y", "%m/%d/%Y", "%d-%m-%Y", "%d/%m/%Y %H:%M"])
def test_numeric_dates_in_either_order(fmt, tmp_path):
    """Day-first dates were read row by row, month first where they could be: 01/02/2000 became January 2
    and 13/02/2000 February 13, and the error then said the rows were out of order."""
    import pandas as pd
    for freq, n in (("MS", 30), ("D", 40), ("ME", 30)):
        times = pd.date_range("2000-01-01", periods=n, freq=freq)
        f = tmp_path / f"{freq}.csv"
        f.write_text("date,value\n" + "".join(f"{t.strftime(fmt)},{i}\n" for i, t in enumerate(times)))
        s = load_csv(f, "value", "date")
        assert (s.times == times).all() and s.freq == freq, (fmt, freq, list(s.times[:3]))


def test_dates_neither_order_reads_forward_say_so(tmp_path):
    f = tmp_path / "a.csv"
    f.write_text("date,value\n" + "".join(f"{d},{i}\n" for i, d in enumerate(
        ["03/01/2000", "02/01/2000", "01/01/2000", "04/01/2000"])))
    with pytest.raises(UserError, match="goes backwards.*read month first and also day first: neither goes forward"):
        load_csv(f, "value", "date")


# -- seasons and splits that do not fit -------------------------------------------------------------------

def test_a_season_longer_than_the_training_part_is_refused(tmp_path, capsys):
    """--season past the training part made the seasonal-naive baseline index past the history (traceback)
    or score a meaningless MASE."""
    f = tmp_path / "a.csv"
    f.write_text("value\n" + "".join(f"{v}\n" for v in VALUES))
    exits_2(capsys, ["forecast", "--data", str(f), "--season", "100", "--lookback", "6", "--horizon", "3",
                     "--no-sarima", "--epochs", "1", "--out", str(tmp_path / "r")],
            "--season is 100 steps", "has only 57 values")
    dates = [f"{2000 + i // 12}-{i % 12 + 1:02d}-01" for i in range(20)]
    g = tmp_path / "short.csv"
    g.write_text("date,value\n" + "".join(f"{d},{v}\n" for d, v in zip(dates, VALUES)))
    exits_2(capsys, ["forecast", "--data", str(g), "--time-column", "date", "--lookback", "3", "--horizon", "12",
                     "--strategy", "recursive", "--no-sarima", "--epochs", "1", "--out", str(tmp_path / "s")],
            "the season the dates imply is 12 steps", "only 8 values")


def classify_csv(tmp_path):
    f = tmp_path / "reviews.csv"
    f.write_text("text,label\n" + "".join(f"{w} film number {i},{'pos' if i % 2 else 'neg'}\n"
                                         for i, w in enumerate(["good", "bad", "fine", "awful"] * 5)))
    return str(f)


def test_classify_text_column_equal_to_label_column(tmp_path, capsys):
    exits_2(capsys, ["classify", "train", "--data", classify_csv(tmp_path), "--text-column", "label",
                     "--label-column", "label"], "both 'label'")


def test_classify_min_freq_no_word_reaches(tmp_path, capsys):
    exits_2(capsys, ["classify", "train", "--data", classify_csv(tmp_path), "--min-freq", "1000", "--epochs", "1",
                     "--out", str(tmp_path / "r"), "--no-progress"],
            "no word of the training texts occurs --min-freq 1000 times")
    assert not (tmp_path / "r").exists()


def test_classify_split_message_names_the_earlier_split(tmp_path, capsys):
    """With --test-fraction 0.99 a class of 10 keeps 1 example for training, and the validation split said
    the class 'has a single example' (it has 10)."""
    exits_2(capsys, ["classify", "train", "--data", classify_csv(tmp_path), "--test-fraction", "0.99",
                     "--epochs", "1", "--out", str(tmp_path / "r"), "--no-progress"],
            "left for training and validation after --test-fraction 0.99")


# -- second review: what the first round of these fixes got wrong or left ------------------------------

def _load(tmp_path, name, content, *args):
    f = tmp_path / name
    (f.write_bytes if isinstance(content, bytes) else f.write_text)(content)
    return load_csv(f, *args)


def test_a_row_wider_than_the_header_is_refused_not_shifted(tmp_path):
    """A one-column file of decimal commas: pandas took '-3' as the row's index and read 25 (silently)."""
    with pytest.raises(UserError, match=r"more fields than its header \(line 2: '-3,25'\)"):
        _load(tmp_path, "a.csv", "Wert\n-3,25\n4,5\n")


def test_separator_seen_on_every_line_wins_over_a_comma_in_a_name(tmp_path):
    s = _load(tmp_path, "a.csv", "Datum;Umsatz (Tsd., EUR)\n" + "".join(f"01.{m:02d}.2015;{100 + m},50\n"
                                                                        for m in range(1, 13)), None, "Datum")
    assert s.name == "Umsatz (Tsd., EUR)" and s.values.tolist() == [100.5 + m for m in range(1, 13)]
    assert s.freq == "MS"
    s = _load(tmp_path, "b.csv", "sep=;\nd;Wert\n2020-01;1,5\n2020-02;2,5\n2020-03;3\n", "Wert", "d")
    assert s.values.tolist() == [1.5, 2.5, 3.0]                             # Excel's sep= line


def test_thousands_separators_beside_decimal_commas_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"decimal commas \('999,5'\) but line 3 has '1.234'"):
        _load(tmp_path, "a.csv", "d;v\n01.01.2020;999,5\n01.02.2020;1.234\n01.03.2020;1.500\n", "v", "d")


def test_compressed_csv_loads_and_non_csv_files_are_named(tmp_path):
    import gzip
    from importlib import resources
    raw = resources.files("rnnkit").joinpath("datasets/airline.csv").read_bytes()
    s = _load(tmp_path, "air.csv.gz", gzip.compress(raw), "passengers", "month")   # worked before; broke
    assert len(s) == 144 and s.season == 12
    with pytest.raises(UserError, match="spreadsheet.*export the sheet as CSV"):
        _load(tmp_path, "a.xlsx", b"PK\x03\x04" + bytes(100))
    with pytest.raises(UserError, match="UTF-16 text: save it as UTF-8"):
        _load(tmp_path, "u.csv", "a,b\n1,2\n".encode("utf-16"))


def test_two_digit_years_month_year_dates_and_mixed_formats(tmp_path):
    import pandas as pd
    months = pd.date_range("1975-01-01", periods=48, freq="MS")
    s = _load(tmp_path, "a.csv", "d;v\n" + "".join(f"{t.strftime('%d.%m.%y')};{i}\n" for i, t in enumerate(months)),
              "v", "d")
    assert (s.times == months).all() and s.freq == "MS"
    s = _load(tmp_path, "b.csv", "d;v\n" + "".join(f"{m:02d}.2020;{m}\n" for m in range(1, 13)), "v", "d")
    assert (s.times == pd.date_range("2020-01-01", periods=12, freq="MS")).all() and s.season == 12
    with pytest.raises(UserError, match=r"mixes date formats: line 4 has '01/02/2020', line 2 '2020-01-30'"):
        _load(tmp_path, "c.csv", "d,v\n2020-01-30,1\n2020-01-31,2\n01/02/2020,3\n", "v", "d")


def test_classify_split_message_with_two_examples_a_class(tmp_path, capsys):
    f = tmp_path / "a.csv"
    f.write_text("text,label\nhello there,a\ngood day,a\nbye now,b\nsee you,b\n")
    exits_2(capsys, ["classify", "train", "--data", str(f), "--test-fraction", "0.01", "--epochs", "1",
                     "--out", str(tmp_path / "r"), "--no-progress"], "each class needs at least 3 examples")
