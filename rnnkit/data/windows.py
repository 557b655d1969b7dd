"""Overlapping windows over a series: lookback L steps in, horizon H steps out.

    X, Y = make_windows(z, lookback=L, horizon=H)      # X (n, L), Y (n, H), n = N - L - H + 1
Window i reads z[i : i+L] and predicts z[i+L : i+L+H]; consecutive windows overlap by all but one step.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import UserError


def make_windows(z: np.ndarray, lookback: int, horizon: int) -> tuple[np.ndarray, np.ndarray]:
    """All windows of a 1-D series; returns copies X (n, L) and Y (n, H)."""
    z = np.asarray(z)
    if lookback < 1 or horizon < 1:
        raise UserError(f"lookback and horizon must be >= 1, got {lookback} and {horizon}")
    if len(z) < lookback + horizon:
        raise UserError(f"a series of {len(z)} steps has no window of lookback {lookback} + horizon {horizon}")
    w = sliding_window_view(z, lookback + horizon)       # (n, L+H), a view
    return w[:, :lookback].copy(), w[:, lookback:].copy()


def target_starts(n_series: int, lookback: int, horizon: int) -> np.ndarray:
    """Index into the series of each window's first target step: (n,) = L, L+1, ..."""
    return np.arange(lookback, n_series - horizon + 1)
