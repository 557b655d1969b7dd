"""Univariate time series: the user's CSV file, or the bundled airline-passenger series.

Everything wrong with a file is found here, once, and reported as a `UserError` that names the file,
the column, the lines and the fix: an unreadable file, a missing column, empty or NaN cells,
non-numeric cells, dates that do not parse, repeat, go backwards or skip periods.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from importlib import resources

import numpy as np

from ..errors import UserError
from .csvfile import decimal_commas, read_csv
from .lazy import LazyModule

pd = LazyModule("pandas")                          # imported on first use (start-up cost: lazy.py)

# Seasonal period for a pandas frequency's base code (the letters of "MS", "QS-OCT", "W-SUN", "h").
_SEASON = {"M": 12, "MS": 12, "ME": 12, "Q": 4, "QS": 4, "QE": 4, "W": 52, "D": 7, "B": 5, "H": 24, "h": 24}
_MISSING = {"", "na", "nan", "n/a", "null", "none", "-"}
_SHOW = 5                                           # offending lines quoted in a message


@dataclass(frozen=True)
class Series:
    values: np.ndarray                  # (N,) float64
    name: str                           # the value column
    times: pd.DatetimeIndex | None      # (N,) dates when a time column was given
    freq: str | None                    # pandas frequency of the dates ("MS": month start)
    season: int                         # seasonal period m implied by freq (12 for monthly); 1 if unknown
    source: str                         # where it came from, for reports

    def __len__(self) -> int:
        return len(self.values)

    def label(self, i: int) -> str:
        """A readable name for step i: its date when there are dates, else its index."""
        if self.times is None:
            return str(i)
        return self.times[i].strftime("%Y-%m" if self.season == 12 else "%Y-%m-%d %H:%M").removesuffix(" 00:00")


def airline() -> Series:
    """Monthly international airline passengers (thousands), 1949-01 to 1960-12: Box & Jenkins series G."""
    path = resources.files("rnnkit.datasets") / "airline.csv"
    with resources.as_file(path) as p:
        s = load_csv(p, "passengers", "month")
    return Series(s.values, s.name, s.times, s.freq, s.season, "bundled airline passengers (Box & Jenkins)")


def load_csv(path, column: str | None = None, time_column: str | None = None) -> Series:
    """Read one numeric column (and optionally a date column) of a CSV file, validated."""
    frame = read_csv(path, "--data")
    column = _pick_column(frame, column, time_column, path)
    values = _numbers(frame[column], column, path, frame.attrs["sep"])
    times, freq = (None, None) if time_column is None else _dates(frame[time_column], time_column, path)
    season = _season(freq)
    return Series(values, column, times, freq, season, str(path))


def _pick_column(frame: pd.DataFrame, column, time_column, path) -> str:
    names = ", ".join(map(repr, frame.columns))
    if time_column is not None and time_column not in frame.columns:
        raise UserError(f"time column {time_column!r} is not in {path}; its columns are {names}")
    if column is not None:
        if column not in frame.columns:
            raise UserError(f"column {column!r} is not in {path}; its columns are {names}; choose one with --column")
        return column
    numeric = [c for c in frame.columns if c != time_column and pd.to_numeric(
               decimal_commas(frame[c].str.strip(), frame.attrs["sep"], strict=False), errors="coerce").notna().mean() > 0.5]
    if len(numeric) != 1:
        raise UserError(f"{path} has columns {names}: say which holds the values with --column")
    return numeric[0]


def _numbers(cells: pd.Series, column: str, path, sep: str) -> np.ndarray:
    text = decimal_commas(cells.str.strip(), sep)
    missing = text.str.lower().isin(_MISSING)
    values = pd.to_numeric(text.where(~missing), errors="coerce")
    bad = values.isna() & ~missing
    if bad.any():
        raise UserError(f"column {column!r} of {path} has non-numeric values at {_where(text, bad)}; "
                        "fix or remove those rows (numbers have no thousands separator, and a dot as the decimal point; "
                        "a comma only in a file separated by ';')")
    if missing.any():
        raise UserError(f"column {column!r} of {path} has {int(missing.sum())} missing (empty or NaN) values at "
                        f"{_where(text, missing)}; fill them in (e.g. interpolate) or drop those rows")
    out = values.to_numpy(dtype=np.float64)
    if not np.isfinite(out).all():
        raise UserError(f"column {column!r} of {path} has infinite values at {_where(text, ~np.isfinite(out))}")
    return out


def _where(text: pd.Series, mask) -> str:
    """'line 4 ('abc'), line 9 ('')' for the first few rows in mask; line = file line (header is 1)."""
    rows = np.flatnonzero(np.asarray(mask))
    parts = [f"line {r + 2} ({text.iloc[r]!r})" for r in rows[:_SHOW]]
    return ", ".join(parts) + (f" and {len(rows) - _SHOW} more" if len(rows) > _SHOW else "")


def _dates(cells: pd.Series, column: str, path) -> tuple[pd.DatetimeIndex, str | None]:
    text = cells.str.strip()
    readings = _readings(text, f"time column {column!r} of {path}")
    times = readings[0][1]
    if times.isna().any():
        raise UserError(f"time column {column!r} of {path} has values that are not dates at "
                        f"{_where(text, times.isna())}; use a format such as 1949-01 or 1949-01-31")
    forward = [(name, t) for name, t in readings if (np.diff(t.asi8) > 0).all()]
    if not forward:
        step = np.diff(times.asi8)
        i = int(np.flatnonzero(step <= 0)[0])
        kind = "repeats" if step[i] == 0 else "goes backwards"
        read = (f" (read {' and also '.join(name for name, _ in readings)}: neither goes forward)"
                if len(readings) > 1 else "")
        if (text.str.extract(_NUMERIC_DATE)[3].str.len() == 2).any():
            read += (f"; two-digit years are a guess ({text.iloc[i + 1]!r} was read as year {times[i + 1].year}, "
                     f"{text.iloc[i]!r} as {times[i].year}): write four-digit years")
        raise UserError(f"time column {column!r} of {path} {kind} at line {i + 3} ({text.iloc[i + 1]!r} after "
                        f"{text.iloc[i]!r}){read}; sort the rows by date and remove duplicates")
    regular = [(name, t) for name, t in forward if len(t) < 3 or _infer_freq(t) is not None]
    times = (regular or forward)[0][1]
    return times, _regular_freq(times, text, column, path)


def _readings(text: pd.Series, where: str) -> list[tuple[str, pd.DatetimeIndex]]:
    """How the dates can be read: [("as dates", times)], or for numeric dates such as 03/04/2020 both
    orders, the local convention's first (day first with dots, month first otherwise), each kept only
    where every row parses that way. Read row by row, such dates would mix the two orders. 01.2020
    (month and year, as German exports write months) is a month."""
    month_year = text.str.extract(_MONTH_YEAR)
    if month_year.notna().all(axis=None) and month_year[0].nunique() == 1:
        fmt = f"%m{month_year[0].iloc[0]}%Y"
        return [("month and year", _as_dates(text, format=fmt))]
    match = text.str.extract(_NUMERIC_DATE)
    numeric = match[0].notna()
    if numeric.any() and not numeric.all():
        i, j = int(np.flatnonzero(numeric.to_numpy())[0]), int(np.flatnonzero(~numeric.to_numpy())[0])
        raise UserError(f"{where} mixes date formats: line {i + 2} has {text.iloc[i]!r}, line {j + 2} {text.iloc[j]!r}; "
                        "write every date the same way (best: 2020-01-31)")
    if not numeric.any():
        return [("as dates", _as_dates(text))]
    first, second = match[0].astype(int).to_numpy(), match[2].astype(int).to_numpy()
    orders = [("day first", True), ("month first", False)]
    if (match[1] != ".").any():
        orders.reverse()
    clock = next((f for f, pat in _CLOCKS if match[4].fillna("").str.fullmatch(pat).all()), None)
    plain = clock is not None and match[1].nunique() == 1 and match[3].str.len().nunique() == 1
    readings = []
    for name, dayfirst in orders:
        if plain:                                   # one exact format: ~40x faster than parsing row by row
            sep, year = match[1].iloc[0], "%Y" if len(match[3].iloc[0]) == 4 else "%y"
            fmt = (f"%d{sep}%m{sep}{year}" if dayfirst else f"%m{sep}%d{sep}{year}") + clock
            times = _as_dates(text, format=fmt)
        else:
            times = _as_dates(text, dayfirst=dayfirst)
        day, month = (first, second) if dayfirst else (second, first)
        if not times.isna().any() and (times.day == day).all() and (times.month == month).all():
            readings.append((name, times))
    return readings or [("as dates", _as_dates(text))]


def _as_dates(text: pd.Series, format: str = "mixed", dayfirst: bool = False) -> pd.DatetimeIndex:
    """The cells as dates, NaT where one does not parse (`format="mixed"`: each cell on its own)."""
    return pd.DatetimeIndex(pd.to_datetime(text, errors="coerce", format=format, dayfirst=dayfirst))


_NUMERIC_DATE = r"^(\d{1,2})([./-])(\d{1,2})\2(\d{2}|\d{4})([ T].*)?$"    # 31/01/2020, 01.31.20 13:00
_CLOCKS = (("", ""), (" %H:%M", r" \d{1,2}:\d{2}"), (" %H:%M:%S", r" \d{1,2}:\d{2}:\d{2}"))   # exact formats
_MONTH_YEAR = r"^(?:0?[1-9]|1[0-2])([./-])\d{4}$"                      # 01.2020, 1/2020


def _regular_freq(times: pd.DatetimeIndex, text: pd.Series, column: str, path) -> str | None:
    if len(times) < 3:
        return None
    freq = _infer_freq(times)
    if freq is not None:
        return freq
    head = _infer_freq(times[: min(len(times), 6)])
    if head is None:
        raise UserError(f"the dates in {column!r} of {path} are irregular (no constant step between rows); "
                        "resample the series to a regular step (monthly, daily, ...) first")
    expected = pd.date_range(times[0], periods=len(times), freq=head)
    i = int(np.flatnonzero(times != expected)[0])
    raise UserError(f"the dates in {column!r} of {path} have a gap or an extra row: {text.iloc[i]!r} at line "
                    f"{i + 2} follows {text.iloc[i - 1]!r}, but the series steps by {head!r} (next expected "
                    f"{expected[i].date()}); fill the missing periods (e.g. interpolate) or remove the extra rows")


def _infer_freq(times: pd.DatetimeIndex) -> str | None:
    with warnings.catch_warnings():                 # pandas 3 warns it will return an offset object
        warnings.simplefilter("ignore")
        freq = pd.infer_freq(times)
    return getattr(freq, "freqstr", freq)


def _season(freq: str | None) -> int:
    if freq is None:
        return 1
    if re.match(r"^\d", freq):                        # "2MS", "15min": a multiple has no standard season
        return 1
    return _SEASON.get(freq.split("-")[0], 1)
