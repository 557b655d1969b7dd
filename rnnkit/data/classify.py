"""Labelled texts for many-to-one classification: CSV loading, a stratified split, padded batches.

    data = read_labelled_csv("reviews.csv", CsvColumns("review", "sentiment"))   # or bundled_reviews()
    train, test = stratified_split(data.labels, test_fraction=0.2, seed=0)        # index lists
    vocab = Vocabulary.build(word_tokens(t, lower=True) for t in data.texts)      # rnnkit.data.text
    tokens, lengths = pad_batch([vocab.encode(word_tokens(t, True)) for t in texts], vocab.pad_id)

Validation happens here, once: a missing file or column, blank texts or labels (an error naming the
rows, unless `drop_empty`), a single class, or a class too small to appear on both sides of the
split each raise a `UserError` that says how to fix it.
"""
from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError
from .csvfile import read_csv


@dataclass(frozen=True)
class CsvColumns:
    text_column: str = "text"
    label_column: str = "label"
    drop_empty: bool = False          # drop rows with a blank text or label instead of refusing them


@dataclass(frozen=True)
class LabelledTexts:
    texts: tuple[str, ...]
    labels: tuple[str, ...]

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(sorted(set(self.labels)))

    def counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.labels).items()))

    def subset(self, index: Sequence[int]) -> LabelledTexts:
        return LabelledTexts(tuple(self.texts[i] for i in index), tuple(self.labels[i] for i in index))


def read_labelled_csv(path: str | Path, columns: CsvColumns = CsvColumns(), min_per_class: int = 2) -> LabelledTexts:
    """Texts and labels (labels as strings) from a CSV with a header row."""
    p = Path(path)
    if columns.text_column == columns.label_column:
        raise UserError(f"the text and the label column are both {columns.text_column!r}; name the column "
                        "holding the texts with --text-column and the one holding the labels with --label-column")
    df = read_csv(p, "--data")
    missing = [c for c in (columns.text_column, columns.label_column) if c not in df.columns]
    if missing:
        flags = {columns.text_column: "--text-column", columns.label_column: "--label-column"}
        raise UserError(f"{p} has no column {', '.join(repr(c) for c in missing)}; its columns are "
                        f"{list(df.columns)}. Name the right ones with "
                        f"{' and '.join(flags[c] for c in missing)}")
    texts = df[columns.text_column].str.strip()
    labels = df[columns.label_column].str.strip()
    blank = (texts == "") | (labels == "")
    if blank.any() and not columns.drop_empty:
        rows = [int(i) + 2 for i in blank[blank].index[:10]]       # +2: header line, 1-based lines
        raise UserError(f"{p}: {int(blank.sum())} row(s) have an empty text or label (lines "
                        f"{rows}{' ...' if blank.sum() > 10 else ''}); fill or delete them, or drop them "
                        f"with drop_empty (--drop-empty)")
    data = LabelledTexts(tuple(texts[~blank]), tuple(labels[~blank]))
    check_labelled(data, str(p), min_per_class)
    return data


def check_labelled(data: LabelledTexts, source: str = "the data", min_per_class: int = 2) -> None:
    """At least two classes, and at least `min_per_class` examples of each."""
    counts = data.counts()
    if not counts:
        raise UserError(f"{source} has no labelled rows")
    if len(counts) < 2:
        raise UserError(f"{source} has one class only ({next(iter(counts))!r}, {len(data.labels)} rows); "
                        f"a classifier needs examples of at least two classes")
    small = {c: n for c, n in counts.items() if n < min_per_class}
    if small:
        raise UserError(f"{source}: class(es) with fewer than {min_per_class} examples, too few to both "
                        f"train and test: {small}; add examples or merge or remove those classes")


def bundled_reviews() -> LabelledTexts:
    """1,500 Rotten Tomatoes snippets (867 fresh, 633 rotten), a stratified sample (seed 0) of the
    registry's `rotten_tomatoes` set, in rnnkit/datasets/reviews_sample.csv."""
    with resources.as_file(resources.files("rnnkit").joinpath("datasets/reviews_sample.csv")) as p:
        return read_labelled_csv(p)


def stratified_split(labels: Sequence[str], test_fraction: float, seed: int = 0, after: str = "",
                     groups: Sequence | None = None) -> tuple[list[int], list[int]]:
    """(train, test) indices, each class split in the same proportion: round(n_c * test_fraction)
    examples of a class of n_c go to test, at least one, and at least one stays in train. `after`:
    for the message when a class is too small, what took examples away before (an earlier split).
    `groups`: a key per row; a key with rows on both sides (a text that appears twice) has its test
    rows moved to train, so nothing tested was trained on, and the test side stays a subset of the
    split without groups (the published splits keep their test sets, less the repeats)."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test fraction must be in (0, 1), got {test_fraction}")
    by_class: dict[str, list[int]] = defaultdict(list)
    for i, y in enumerate(labels):
        by_class[y].append(i)
    rng, train, test = random.Random(seed), [], []
    for y in sorted(by_class):
        idx = by_class[y]
        if len(idx) < 2:
            raise UserError(f"class {y!r} has a single example{after}; it cannot be on both sides of the split"
                            + ("; each class needs at least 3 examples (test, validation, training): add examples "
                               "or lower the earlier split's fraction" if after else ""))
        rng.shuffle(idx)
        k = min(max(1, round(len(idx) * test_fraction)), len(idx) - 1)
        test += idx[:k]
        train += idx[k:]
    if groups is not None:
        trained = {groups[i] for i in train}
        moved = [i for i in test if groups[i] in trained]
        test = [i for i in test if groups[i] not in trained]
        train += moved
        emptied = sorted(set(labels) - {labels[i] for i in test})
        if emptied:
            raise UserError(f"class(es) {emptied}: every text held out{after} also appears among the training "
                            "texts, so nothing of them is left to test on; remove the repeated texts or add others")
    return sorted(train), sorted(test)


def text_key(text: str) -> str:
    """What makes two texts the same for splitting: case and runs of white space ignored."""
    return " ".join(text.casefold().split())


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, max_len: int | None = None) -> tuple[Tensor, Tensor]:
    """Right-padded (B, T) long tokens and (B,) lengths; sequences longer than `max_len` keep their
    first `max_len` tokens."""
    if not seqs:
        raise UserError("cannot pad an empty batch")
    seqs = [list(s[:max_len]) if max_len else list(s) for s in seqs]
    empty = [i for i, s in enumerate(seqs) if not s]
    if empty:
        raise UserError(f"sequence(s) {empty[:10]} of the batch have no tokens; a recurrent layer needs "
                        f"at least one step (give a non-empty text)")
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)              # (B,)
    tokens = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)  # (B, T)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    return tokens, lengths


class PaddedBatches:
    """Mini-batches of (tokens (B, T), lengths (B,), labels (B,)) over encoded sequences.

    `epoch(n)` gives pass n's batches, the same for the same (seed, n), so a resumed run sees the
    order it would have seen; iterating the object walks passes 0, 1, 2, ... With `shuffle`, the order
    is drawn from (seed, n); with `bucket`, each run of 50 batches is sorted by length first, so a
    batch pads to similar lengths (faster; the results do not depend on padding).
    """

    def __init__(self, seqs: Sequence[Sequence[int]], labels: Sequence[int], batch_size: int, pad_id: int,
                 shuffle: bool = False, seed: int = 0, bucket: bool = False, max_len: int | None = None):
        if len(seqs) != len(labels):
            raise UserError(f"{len(seqs)} sequences but {len(labels)} labels")
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self.seqs, self.labels = list(seqs), torch.as_tensor(labels, dtype=torch.long)
        self.batch_size, self.pad_id, self.max_len = batch_size, pad_id, max_len
        self.shuffle, self.seed, self.bucket, self.passes = shuffle, seed, bucket, 0

    def __len__(self) -> int:
        return -(-len(self.seqs) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        self.passes += 1
        return self.epoch(self.passes - 1)

    def epoch(self, n: int) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        rng, order = random.Random(f"{self.seed}/{n}"), list(range(len(self.seqs)))
        if self.shuffle:
            rng.shuffle(order)
        if self.bucket:
            chunk = 50 * self.batch_size
            order = [i for c in range(0, len(order), chunk)
                     for i in sorted(order[c: c + chunk], key=lambda i: len(self.seqs[i]))]
        batches = [order[i: i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.shuffle and self.bucket:
            rng.shuffle(batches)
        for idx in batches:
            tokens, lengths = pad_batch([self.seqs[i] for i in idx], self.pad_id, self.max_len)
            yield tokens, lengths, self.labels[idx]                       # (B, T), (B,), (B,)
