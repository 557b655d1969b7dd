"""What the benchmark scripts share on their command lines: argument types that refuse a bad value with
argparse's one-line error and exit status 2, output paths checked before a long run, reports written
atomically, and a point too large for this machine's memory ending the script with a line naming it and
exit status 2 (rnnkit.tasks.memory's wording), not a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

from rnnkit.errors import UserError
from rnnkit.tasks.memory import out_of_memory_as_user_error
from rnnkit.train.checkpoint import atomic_write


@contextlib.contextmanager
def point_fits(prog: str, point: tuple[str, int, int, int]):
    """A grid point (cell, B, T, H) too large for this machine's memory ends the script with a message naming
    it and exit status 2, not a traceback: "prog: rnn:32:1000000:64: ran out of memory; lower T 1000000, B 32
    or H 64" (rnnkit.tasks.memory's wording)."""
    cell, B, T, H = point
    try:
        with out_of_memory_as_user_error({"T": T, "B": B, "H": H}):
            yield
    except UserError as e:
        print(f"{prog}: {cell}:{B}:{T}:{H}: {e}", file=sys.stderr)
        sys.exit(2)


def write_report(text: str, out: str | None, json_path: str | None, doc: dict) -> None:
    """Print the report, and write it (markdown) and its raw numbers (JSON) where asked."""
    print("\n" + text)
    if out:
        write_text(out, text)
    if json_path:
        write_text(json_path, json.dumps(doc, indent=1))


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically (rnnkit's atomic_write: a temporary file beside it, then a rename),
    so an interrupted run leaves the old file whole, docs/benchmarks.md's hand-written sections included."""
    atomic_write(Path(path), text.encode())


def check_writable(parser: argparse.ArgumentParser, *paths: str | Path | None) -> None:
    """Refuse, before anything is measured, an output path whose folder cannot be made or written."""
    for path in filter(None, paths):
        folder = Path(path).parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            parser.error(f"cannot create the folder of {path}: {e.strerror}")
        if Path(path).is_dir():
            parser.error(f"cannot write {path}: it is a folder")
        if not os.access(folder, os.W_OK):
            parser.error(f"cannot write {path}: {folder} is not writable")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value
    return parse


def ints_at_least(minimum: int) -> Callable[[str], tuple[int, ...]]:
    """argparse type: comma-separated integers, each >= minimum."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = tuple(int(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
        if min(values) < minimum:
            raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {text!r}")
        return values
    return parse


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def names_from(choices: Iterable[str]) -> Callable[[str], tuple[str, ...]]:
    """argparse type: comma-separated names out of `choices` (any case), returned as `choices` spell them."""
    spelled = {c.lower(): c for c in choices}

    def parse(text: str) -> tuple[str, ...]:
        names = tuple(n.strip() for n in text.split(","))
        unknown = [n for n in names if n.lower() not in spelled]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown name(s) {unknown}; choose from {', '.join(spelled.values())}")
        return tuple(spelled[n.lower()] for n in names)
    return parse


positive_int = int_at_least(1)
positive_ints = ints_at_least(1)
