"""Reading a user's CSV file: one reader for the forecasting series and the labelled texts.

    frame = read_csv(path, flag="--data")    # all cells as str; frame.attrs["sep"]: the separator used

What it takes care of, so each task's loader only checks its own columns: a missing path or a directory,
a file that is not UTF-8 (the iconv command to convert it), a UTF-8 byte-order mark (dropped), a file that
is not CSV or is compressed, a header with no rows, rows wider than the header, and the separator
(`_separator`: spreadsheets in many locales write CSV with `;`, and decimal commas, which `decimal_commas`
turns into points for a file so separated).
"""
from __future__ import annotations

import csv
import itertools
import re
import warnings
from pathlib import Path

from ..errors import UserError, not_utf8
from .lazy import LazyModule

pd = LazyModule("pandas")                          # imported on first use (start-up cost: lazy.py)

SEPARATORS = (",", ";", "\t", "|")
_DECIMAL_COMMA = re.compile(r"^[+-]?\d+,\d+$")
_SNIFF_LINES = 20                                   # lines read to choose the separator
# Files pandas opens itself (it infers the compression from the name), and files that are not CSV text.
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"(\xb5/\xfd")          # gzip, bzip2, xz, zstd
_NOT_TEXT = {b"PK\x03\x04": "a zip archive or a spreadsheet (.xlsx, .ods): export the sheet as CSV",
             b"\xd0\xcf\x11\xe0": "an old Excel file (.xls): export the sheet as CSV",
             b"\xff\xfe": "UTF-16 text: save it as UTF-8", b"\xfe\xff": "UTF-16 text: save it as UTF-8"}


def read_csv(path, flag: str = "--data") -> pd.DataFrame:
    """The file's cells as strings, blank lines skipped, spaces after a separator dropped."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"cannot read {p}: it is a directory; give a CSV file to {flag}")
    if not p.is_file():
        raise UserError(f"{p} not found: no such file; check the path given to {flag}")
    sep, skip = _separator(_head(p))
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", pd.errors.ParserWarning)
            frame = pd.read_csv(p, sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True,
                                encoding="utf-8-sig", skiprows=skip, index_col=False)
    except UnicodeDecodeError as e:
        raise not_utf8(p, e) from None
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read {p} as CSV ({first}); give a text CSV file with a header row") from None
    if frame.empty:
        raise UserError(f"{p} has a header but no data rows")
    if any(issubclass(w.category, pd.errors.ParserWarning) for w in caught):
        raise _wider_rows(p, sep, skip)
    frame.attrs["sep"] = sep
    return frame


def _head(p: Path) -> list[str]:
    """The first non-blank lines, or [] for a compressed file (pandas opens it; the separator is ',')."""
    with p.open("rb") as f:
        magic = f.read(4)
    if magic.startswith(_COMPRESSED):
        return []
    for sig, what in _NOT_TEXT.items():
        if magic.startswith(sig):
            raise UserError(f"cannot read {p} as CSV: it is {what}")
    lines = []
    try:
        with p.open(encoding="utf-8-sig", newline="") as f:
            for line in f:
                if line.strip():
                    lines.append(line.rstrip("\r\n"))
                if len(lines) > _SNIFF_LINES:
                    break
    except UnicodeDecodeError as e:
        raise not_utf8(p, e) from None
    except OSError as e:
        raise UserError(f"cannot read {p} ({e.strerror or e})") from None
    return lines


def _separator(lines: list[str]) -> tuple[str, int]:
    """(separator, lines to skip). Excel's `sep=;` first line names it. Otherwise a separator found the
    same number of times (at least once) on the header and every sniffed line: a non-comma one first, as a
    file separated by `;` may hold commas in every line (decimal commas, a name like "Sales (Tsd., EUR)")
    where a comma-separated one rarely holds a `;` on every line; failing that, the one the header uses
    most (',' on a tie or when none is there)."""
    if not lines:
        return ",", 0
    m = re.fullmatch(r'"?sep=(.)"?,*', lines[0].strip())
    if m:
        return m.group(1), 1
    counts = [{s: re.sub(r'"[^"]*"', "", line).count(s) for s in SEPARATORS} for line in lines]
    steady = [s for s in SEPARATORS if counts[0][s] > 0 and all(c[s] == counts[0][s] for c in counts)]
    if steady:
        return ([s for s in steady if s != ","] or steady)[0], 0
    return max(SEPARATORS, key=lambda s: counts[0][s]), 0   # first (",") wins a tie, and a header without any


def _wider_rows(p: Path, sep: str, skip: int) -> UserError:
    """The error for data lines with more fields than the header, which pandas would cut short silently
    (a one-column file's decimal comma '3,25' read as '3'), naming the first such line."""
    where = ""
    try:
        with p.open(encoding="utf-8-sig", newline="") as f:
            rows = csv.reader(itertools.islice(f, skip, None), delimiter=sep, skipinitialspace=True)
            width = len(next(rows, []))
            for row in rows:
                if len(row) > width:
                    where = f" (line {rows.line_num + skip}: {sep.join(row)!r})"
                    break
    except (OSError, UnicodeDecodeError):                # compressed: pandas read it, csv cannot
        pass
    return UserError(f"{p} has rows with more fields than its header{where}; numbers must not hold the "
                     f"separator {sep!r} (write 3.25, or separate the columns with ';' to use decimal commas), "
                     "and a text that holds it must be quoted")


def decimal_commas(cells: pd.Series, sep: str, strict: bool = True) -> pd.Series:
    """Cells such as '3,25' read as '3.25' when the file is not comma-separated (where a comma can only
    be a decimal comma); other cells, and every cell of a comma-separated file, unchanged. In a column
    with decimal commas a cell such as '1.234' is ambiguous (a thousands separator?) and refused, unless
    not `strict` (a guess at which column holds numbers)."""
    if sep == ",":
        return cells
    comma = cells.str.match(_DECIMAL_COMMA)
    if comma.any() and strict:
        dots = cells.str.contains(".", regex=False)
        if dots.any():
            i = int(dots.to_numpy().argmax())
            raise UserError(f"the column uses decimal commas ({cells[comma].iloc[0]!r}) but line {i + 2} has "
                            f"{cells.iloc[i]!r}: a thousands separator? write numbers without one")
    return cells.where(~comma, cells.str.replace(",", ".", regex=False))
