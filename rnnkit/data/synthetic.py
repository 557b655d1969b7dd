"""Long-range memory benchmarks, generated here: adding, copy, temporal order, sequential digits.

Every generator takes a `torch.Generator` (or seed) and returns float inputs `x` (B, T, I) and
targets `y`, batch first. Letters: B batch, T time, I input size.

    adding(n, T)          x (n, T, 2): a value in U[0,1] and a 0/1 marker; exactly two markers, one
                          in the first half and one in the second (Le, Jaitly & Hinton 2015).
                          y (n, 1) = the sum of the two marked values. Always answering 1 gives
                          MSE = Var(u1 + u2) = 1/6 ≈ 0.167.
    copy_memory(n, T)     x (n, T+20, 10) one-hot: 10 symbols from {1..8}, T-1 blanks (0), the
                          delimiter (9), 10 blanks. y (n, T+20) ints: blanks, then the 10 symbols
                          in the last 10 steps. Memoryless baseline CE = 10 ln 8 / (T + 20).
    temporal_order(n, T)  Hochreiter & Schmidhuber 1997, experiment 6a: one-hot over
                          {E, B, a, b, c, d, X, Y}; E first, B last, distractors a-d elsewhere, and
                          two relevant symbols X/Y at t1 in [0.1T, 0.2T], t2 in [0.5T, 0.6T].
                          y (n,) in 0..3 = XX, XY, YX, YY. Chance: 25 %.
    digits(layout)        scikit-learn's 8x8 digits (1797 images), pixels / 16, read row by row
                          (T = 8, I = 8) or pixel by pixel (T = 64, I = 1); fixed stratified split.
    mnist1d()             MNIST-1D (T = 40, I = 1) made locally by its own generator with its
                          default arguments (4000 train, 1000 test). Nothing is downloaded.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import UserError

COPY_SYMBOLS, COPY_LEN = 8, 10           # symbols 1..8 to remember, 10 of them
BLANK, DELIMITER = 0, 9
ORDER_ALPHABET = "EBabcdXY"


@dataclass(frozen=True)
class Split:
    """A fixed train/test split of a classification data set."""
    x_train: Tensor          # (N, T, I)
    y_train: Tensor          # (N,)
    x_test: Tensor           # (M, T, I)
    y_test: Tensor           # (M,)
    num_classes: int


def _gen(seed_or_gen) -> torch.Generator:
    if isinstance(seed_or_gen, torch.Generator):
        return seed_or_gen
    return torch.Generator().manual_seed(int(seed_or_gen))


MIN_LENGTH = {"adding": 2, "copy": 1, "order": 20}          # the shortest sequence each generator makes


def _check(n: int, T: int, task: str) -> None:
    minimum = MIN_LENGTH[task]
    if n < 1:
        raise UserError(f"{task}: number of sequences must be >= 1, got {n}")
    if T < minimum:
        raise UserError(f"{task}: length must be >= {minimum}, got {T}; pass a larger --length")


def adding(n: int, T: int, gen=0) -> tuple[Tensor, Tensor]:
    """The adding problem. Returns x (n, T, 2), y (n, 1)."""
    _check(n, T, "adding")
    g = _gen(gen)
    values = torch.rand(n, T, generator=g)                                   # (n, T)
    half = T // 2
    first = torch.randint(0, half, (n,), generator=g)
    second = torch.randint(half, T, (n,), generator=g)
    marks = torch.zeros(n, T)
    rows = torch.arange(n)
    marks[rows, first] = 1.0
    marks[rows, second] = 1.0
    y = (values * marks).sum(1, keepdim=True)                                # (n, 1)
    return torch.stack((values, marks), 2), y


def copy_memory(n: int, T: int, gen=0) -> tuple[Tensor, Tensor]:
    """Copy memory with a blank of length T. Returns x (n, T+20, 10) one-hot, y (n, T+20) long."""
    _check(n, T, "copy")
    g = _gen(gen)
    total = T + 2 * COPY_LEN
    symbols = torch.randint(1, COPY_SYMBOLS + 1, (n, COPY_LEN), generator=g)
    seq = torch.full((n, total), BLANK, dtype=torch.long)
    seq[:, :COPY_LEN] = symbols
    seq[:, T + COPY_LEN - 1] = DELIMITER
    y = torch.full((n, total), BLANK, dtype=torch.long)
    y[:, -COPY_LEN:] = symbols
    x = torch.nn.functional.one_hot(seq, COPY_SYMBOLS + 2).float()          # (n, T+20, 10)
    return x, y


def copy_baseline(T: int) -> float:
    """Cross-entropy per step of the best memoryless strategy: blanks right, the 10 symbols guessed."""
    return COPY_LEN * float(np.log(COPY_SYMBOLS)) / (T + 2 * COPY_LEN)


def temporal_order(n: int, T: int, gen=0) -> tuple[Tensor, Tensor]:
    """Hochreiter's temporal order problem (2 relevant symbols, 4 classes). x (n, T, 8), y (n,)."""
    _check(n, T, "order")
    g = _gen(gen)
    seq = torch.randint(2, 6, (n, T), generator=g)                           # distractors a..d
    seq[:, 0], seq[:, -1] = 0, 1                                             # E ... B
    t1 = torch.randint(T // 10, T // 5 + 1, (n,), generator=g)
    t2 = torch.randint(T // 2, (6 * T) // 10 + 1, (n,), generator=g)
    s1 = torch.randint(0, 2, (n,), generator=g)                              # 0 = X, 1 = Y
    s2 = torch.randint(0, 2, (n,), generator=g)
    rows = torch.arange(n)
    seq[rows, t1] = 6 + s1
    seq[rows, t2] = 6 + s2
    x = torch.nn.functional.one_hot(seq, len(ORDER_ALPHABET)).float()       # (n, T, 8)
    return x, 2 * s1 + s2


def digits(layout: str = "rows", test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's 8x8 digits as sequences: layout "rows" (T=8, I=8) or "pixels" (T=64, I=1)."""
    if layout not in ("rows", "pixels"):
        raise UserError(f"digits: layout must be 'rows' or 'pixels', got {layout!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    data = load_digits()
    images = data.images.astype(np.float32) / 16.0                           # (N, 8, 8) in [0, 1]
    x = images if layout == "rows" else images.reshape(len(images), 64, 1)
    xtr, xte, ytr, yte = train_test_split(x, data.target, test_size=test_fraction,
                                          random_state=seed, stratify=data.target)
    return Split(torch.from_numpy(xtr), torch.from_numpy(ytr).long(),
                 torch.from_numpy(xte), torch.from_numpy(yte).long(), 10)


def mnist1d() -> Split:
    """MNIST-1D with its generator's default arguments (seed 42): 4000 train, 1000 test, T = 40."""
    from mnist1d.data import get_dataset_args, make_dataset
    np_state, py_state = np.random.get_state(), random.getstate()   # make_dataset reseeds both
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    as_x = lambda a: torch.from_numpy(np.asarray(a, np.float32)).unsqueeze(2)  # noqa: E731  (N, 40, 1)
    return Split(as_x(d["x"]), torch.from_numpy(d["y"]).long(),
                 as_x(d["x_test"]), torch.from_numpy(d["y_test"]).long(), 10)
