"""Reading a user's CSV file: one reader for the forecasting series and the labelled texts.

    frame = read_csv(path, flag="--data")    # all cells as str; frame.attrs["sep"]: the separator used

What it takes care of, so each task's loader only checks its own columns: a missing path or a directory,
a file that is not UTF-8 (the iconv command to convert it), a UTF-8 byte-order mark (dropped), a file
that is not CSV, a header with no rows, and the separator: a header line with more semicolons (or tabs)
than commas is read with that separator, as spreadsheets in many locales write CSV with `;` (and decimal
commas, which `decimal_commas` turns into points for a file so separated).
"""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import UserError, not_utf8
from .lazy import LazyModule

pd = LazyModule("pandas")                          # imported on first use (start-up cost: lazy.py)

SEPARATORS = (",", ";", "\t", "|")
_DECIMAL_COMMA = re.compile(r"^[+-]?\d+,\d+$")


def read_csv(path, flag: str = "--data") -> pd.DataFrame:
    """The file's cells as strings, blank lines skipped, spaces after a separator dropped."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"cannot read {p}: it is a directory; give a CSV file to {flag}")
    if not p.is_file():
        raise UserError(f"{p} not found: no such file; check the path given to {flag}")
    sep = _separator(p)
    try:
        frame = pd.read_csv(p, sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True,
                            encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise not_utf8(p, e) from None
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {p} as CSV ({first}); give a text CSV file with a header row") from None
    if frame.empty:
        raise UserError(f"{p} has a header but no data rows")
    frame.attrs["sep"] = sep
    return frame


def _separator(p: Path) -> str:
    """The separator the header line uses most among SEPARATORS (',' on a tie or when none is there)."""
    try:
        with p.open(encoding="utf-8-sig") as f:
            header = next((line for line in f if line.strip()), "")
    except UnicodeDecodeError as e:
        raise not_utf8(p, e) from None
    except OSError as e:
        raise UserError(f"cannot read {p} ({e.strerror or e})") from None
    header = re.sub(r'"[^"]*"', "", header)           # separators inside a quoted name do not count
    counts = {s: header.count(s) for s in SEPARATORS}
    best = max(SEPARATORS, key=lambda s: counts[s])      # first (",") wins a tie
    return best if counts[best] > counts[","] else ","


def decimal_commas(cells: pd.Series, sep: str) -> pd.Series:
    """Cells such as '3,25' read as '3.25' when the file is not comma-separated (where a comma can only
    be a decimal comma); other cells, and every cell of a comma-separated file, unchanged."""
    if sep == ",":
        return cells
    comma = cells.str.match(_DECIMAL_COMMA)
    return cells.where(~comma, cells.str.replace(",", ".", regex=False))
