"""Forecast accuracy: MAE, RMSE, MAPE, sMAPE (both in percent) and MASE.

    MAE   = mean |y - f|
    RMSE  = sqrt(mean (y - f)^2)
    MAPE  = 100 * mean |y - f| / |y|                      (undefined where y = 0: NaN)
    sMAPE = 100 * mean 2 |y - f| / (|y| + |f|)            (0 where both are 0)
    MASE  = MAE / mean_t |x_t - x_{t-m}| over the training part x (the in-sample seasonal naive MAE;
            m = 1: the naive MAE). Below 1: better than the seasonal naive forecast was in-sample.
"""
from __future__ import annotations

import numpy as np

NAMES = ("mae", "rmse", "mape", "smape", "mase")


def mae(y, f) -> float:
    return float(np.mean(np.abs(_a(y) - _a(f))))


def rmse(y, f) -> float:
    return float(np.sqrt(np.mean((_a(y) - _a(f)) ** 2)))


def mape(y, f) -> float:
    y, f = _a(y), _a(f)
    if (y == 0).any():
        return float("nan")
    return float(100 * np.mean(np.abs(y - f) / np.abs(y)))


def smape(y, f) -> float:
    y, f = _a(y), _a(f)
    den = np.abs(y) + np.abs(f)
    ratio = np.divide(2 * np.abs(y - f), den, out=np.zeros_like(den), where=den > 0)
    return float(100 * np.mean(ratio))


def mase(y, f, insample, season: int = 1) -> float:
    x = _a(insample)
    m = season if len(x) > season else 1
    scale = np.mean(np.abs(x[m:] - x[:-m])) if len(x) > m else float("nan")
    return float(mae(y, f) / scale) if scale > 0 else float("nan")


def forecast_metrics(y, f, insample, season: int = 1) -> dict[str, float]:
    """All five metrics of forecast f against truth y; MASE scaled on `insample` with period `season`."""
    return {"mae": mae(y, f), "rmse": rmse(y, f), "mape": mape(y, f), "smape": smape(y, f),
            "mase": mase(y, f, insample, season)}


def _a(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)
