"""Forecast baselines a model has to beat: naive, seasonal naive, and the airline SARIMA.

All take the observed history x[:o] and return forecasts for x[o : o+H].
"""
from __future__ import annotations

import contextlib
import warnings

import numpy as np


def naive(history: np.ndarray, horizon: int) -> np.ndarray:
    """Every future step equals the last observed value."""
    return np.full(horizon, float(history[-1]))


def seasonal_naive(history: np.ndarray, horizon: int, season: int) -> np.ndarray:
    """Each future step equals the value one season earlier: f_{o+h} = x_{o+h-m*ceil((h+1)/m)}."""
    m = max(1, season)
    last = np.asarray(history[-m:], dtype=np.float64)          # the last full season, in order
    return last[np.arange(horizon) % m]


def _one_blas_thread():
    """SARIMA's many tiny matrix products are slower, not faster, with BLAS threads fighting over cores."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1)


def sarima_available() -> bool:
    try:
        import statsmodels  # noqa: F401
    except ImportError:
        return False
    return True


def sarima(history: np.ndarray, horizon: int, season: int) -> np.ndarray | None:
    """The "airline model" SARIMA(0,1,1)(0,1,1)_m on log values (plain values when any is <= 0);
    ARIMA(0,1,1) when there is no season. None when statsmodels is not installed, the history is too
    short (under three seasons) or the fit fails."""
    if not sarima_available():
        return None
    from statsmodels.tsa.statespace.sarimax import SARIMAX
    x = np.asarray(history, dtype=np.float64)
    seasonal = season > 1
    if seasonal and len(x) < 3 * season or len(x) < 8:
        return None
    log = bool((x > 0).all())
    y = np.log(x) if log else x
    with warnings.catch_warnings(), _one_blas_thread():
        warnings.simplefilter("ignore")
        try:
            model = SARIMAX(y, order=(0, 1, 1), seasonal_order=(0, 1, 1, season) if seasonal else (0, 0, 0, 0))
            fc = model.fit(disp=False).forecast(horizon)
        except (ValueError, np.linalg.LinAlgError):
            return None
    fc = np.asarray(fc, dtype=np.float64)
    return np.exp(fc) if log else fc
