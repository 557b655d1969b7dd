"""Sequence-to-sequence data: two generated tasks, a character vocabulary and teacher-forcing batches.

Tasks (both seeded, deterministic for a seed):
    reverse   "cadbe" -> "ebdac": strings of length 5-20 over a 10-letter alphabet "abcdefghij"
    dates     a date written one of the ways below -> ISO 8601 "YYYY-MM-DD", years 1900-2099

Date formats, for 5 March 2021 (a Friday). Only unambiguous forms: the month is spelled out, or the
year comes first (year-month-day). All-numeric day/month orders such as 05/03/2021 or 5.3.2021 are
left out on purpose - they mean 5 March in Europe and 3 May in the US - and so are two-digit years.
    March 5, 2021            Mar 5, 2021              March 5th, 2021          march 5 2021
    5 March 2021             5 Mar 2021               05-Mar-2021              5th March 2021
    the 5th of March, 2021   Friday, 5th of March 2021   Friday 5 March 2021   Fri, 5 Mar 2021
    MAR 05 2021              2021.03.05               2021/03/05               2021-3-5
    20210305

Batches for teacher forcing (`Seq2SeqBatch`): the decoder reads `tgt_in` = <bos> y_1 .. y_n and is
trained to emit `tgt_out` = y_1 .. y_n <eos>, the target shifted by one step.
"""
from __future__ import annotations

import datetime as dt
import functools
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch import Tensor

from ..errors import UserError
from .classify import pad_batch
from .text import SEQ2SEQ_SPECIALS, Vocabulary

Pair = tuple[str, str]
REVERSE_ALPHABET = "abcdefghij"


def reversal_pairs(n: int, seed: int = 0, min_len: int = 5, max_len: int = 20,
                   alphabet: str = REVERSE_ALPHABET) -> list[Pair]:
    """n (source, reversed source) pairs, lengths uniform in [min_len, max_len]."""
    if not 1 <= min_len <= max_len:
        raise UserError(f"need 1 <= min_len <= max_len, got {min_len} and {max_len}")
    if len(set(alphabet)) < 2:
        raise UserError(f"the alphabet needs at least two distinct characters, got {alphabet!r}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(min_len, max_len)))
        out.append((s, s[::-1]))
    return out


def _ordinal(d: int) -> str:
    return f"{d}{'th' if 10 <= d % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(d % 10, 'th')}"


# Month and weekday names come from a fixed table, not the locale (strftime's %B would vary).
_MONTHS = ("January February March April May June July August September October November December").split()
_DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()


def _parts(x: dt.date) -> dict:
    return dict(Y=x.year, m=x.month, d=x.day, B=_MONTHS[x.month - 1], b=_MONTHS[x.month - 1][:3],
                A=_DAYS[x.weekday()], a=_DAYS[x.weekday()][:3], o=_ordinal(x.day))


DATE_FORMATS: tuple[Callable[[dict], str], ...] = (
    lambda p: f"{p['B']} {p['d']}, {p['Y']}",
    lambda p: f"{p['b']} {p['d']}, {p['Y']}",
    lambda p: f"{p['B']} {p['o']}, {p['Y']}",
    lambda p: f"{p['B'].lower()} {p['d']} {p['Y']}",
    lambda p: f"{p['d']} {p['B']} {p['Y']}",
    lambda p: f"{p['d']} {p['b']} {p['Y']}",
    lambda p: f"{p['d']:02d}-{p['b']}-{p['Y']}",
    lambda p: f"{p['o']} {p['B']} {p['Y']}",
    lambda p: f"the {p['o']} of {p['B']}, {p['Y']}",
    lambda p: f"{p['A']}, {p['o']} of {p['B']} {p['Y']}",
    lambda p: f"{p['A']} {p['d']} {p['B']} {p['Y']}",
    lambda p: f"{p['a']}, {p['d']} {p['b']} {p['Y']}",
    lambda p: f"{p['b'].upper()} {p['d']:02d} {p['Y']}",
    lambda p: f"{p['Y']}.{p['m']:02d}.{p['d']:02d}",
    lambda p: f"{p['Y']}/{p['m']:02d}/{p['d']:02d}",
    lambda p: f"{p['Y']}-{p['m']}-{p['d']}",
    lambda p: f"{p['Y']}{p['m']:02d}{p['d']:02d}",
)


def format_date(x: dt.date, style: int) -> str:
    """The date written in style `style` (an index into DATE_FORMATS)."""
    return DATE_FORMATS[style](_parts(x))


def date_pairs(n: int, seed: int = 0, first: dt.date = dt.date(1900, 1, 1),
               last: dt.date = dt.date(2099, 12, 31)) -> list[Pair]:
    """n (human-written date, ISO date) pairs: a uniform day in [first, last], a uniform style."""
    if first > last:
        raise UserError(f"first date {first} is after last date {last}")
    rng, span = random.Random(seed), (last - first).days
    out = []
    for _ in range(n):
        x = first + dt.timedelta(days=rng.randint(0, span))
        out.append((format_date(x, rng.randrange(len(DATE_FORMATS))), x.isoformat()))
    return out


TASKS: dict[str, Callable[..., list[Pair]]] = {"reverse": reversal_pairs, "dates": date_pairs}


def make_splits(task: str, sizes: Sequence[int], seed: int = 0) -> list[list[Pair]]:
    """Disjoint splits (e.g. train, validation, test) of the sizes asked: no source string appears
    in two splits, so a test score is never a memorised training example."""
    if task not in TASKS:
        raise UserError(f"unknown seq2seq task {task!r}; choose one of {', '.join(TASKS)}")
    need, seen, pool = sum(sizes), set(), []
    for attempt in range(20):                 # draw more until enough distinct sources exist
        for src, tgt in TASKS[task](2 * need, seed=seed * 1000 + attempt):
            if src not in seen:
                seen.add(src)
                pool.append((src, tgt))
        if len(pool) >= need:
            break
    if len(pool) < need:
        raise UserError(f"task {task!r} has fewer than {need} distinct examples; ask for fewer")
    cuts = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    return [pool[a:b] for a, b in zip(cuts, cuts[1:])]


@functools.cache
def task_alphabet(task: str) -> str:
    """Every character a task's generator can write, on either side, sorted."""
    if task == "reverse":
        return REVERSE_ALPHABET
    if task == "dates":                       # a leap year: every month, weekday, day number and digit
        days = [dt.date(2000, 1, 1) + dt.timedelta(days=k) for k in range(366)]
        return "".join(sorted({c for x in days for style in range(len(DATE_FORMATS))
                               for c in format_date(x, style) + x.isoformat()}))
    raise UserError(f"unknown seq2seq task {task!r}; choose one of {', '.join(TASKS)}")


def build_vocab(pairs: Sequence[Pair], alphabet: str = "") -> Vocabulary:
    """One character vocabulary for both sides, with <pad>, <unk>, <bos>, <eos>: the pairs' characters,
    most frequent first, then any character of `alphabet` (the task's, `task_alphabet`) they lack: a
    small training set can miss a letter (no 'B' in 200 dates) that validation and test pairs have."""
    vocab = Vocabulary.build((s + t for s, t in pairs), specials=SEQ2SEQ_SPECIALS)
    missing = sorted(set(alphabet) - set(vocab.tokens))
    return Vocabulary(vocab.tokens + tuple(missing), vocab.specials) if missing else vocab


@dataclass(frozen=True)
class Seq2SeqBatch:
    src: Tensor              # (B, S) long, right-padded source
    src_lengths: Tensor      # (B,)
    tgt_in: Tensor           # (B, T) long: <bos> y_1 .. y_n, padded
    tgt_out: Tensor          # (B, T) long: y_1 .. y_n <eos>, padded with <pad> (ignore it in the loss)
    tgt_lengths: Tensor      # (B,) n + 1


def collate(pairs: Sequence[Pair], vocab: Vocabulary, unknown: str = "unk") -> Seq2SeqBatch:
    src, src_len = pad_batch([vocab.encode(s, unknown) for s, _ in pairs], vocab.pad_id)
    tgt = [vocab.encode(t, unknown) for _, t in pairs]
    tgt_in, tgt_len = pad_batch([[vocab.bos_id] + y for y in tgt], vocab.pad_id)
    tgt_out, _ = pad_batch([y + [vocab.eos_id] for y in tgt], vocab.pad_id)
    return Seq2SeqBatch(src, src_len, tgt_in, tgt_out, tgt_len)


def batches(pairs: Sequence[Pair], vocab: Vocabulary, batch_size: int, shuffle: bool = False,
            seed: int = 0) -> Iterator[Seq2SeqBatch]:
    """One pass over `pairs` in batches; with `shuffle`, in the order drawn from `seed`."""
    if batch_size < 1:
        raise UserError(f"batch size must be >= 1, got {batch_size}")
    order = list(range(len(pairs)))
    if shuffle:
        random.Random(seed).shuffle(order)
    for i in range(0, len(order), batch_size):
        yield collate([pairs[j] for j in order[i: i + batch_size]], vocab)
