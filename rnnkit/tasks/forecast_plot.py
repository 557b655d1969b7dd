"""forecast.png: the series, each back-test fold's forecast and the baselines, the held-out parts shaded."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..diagnostics.plots import subplots

STYLE = {"model": dict(color="tab:red", lw=1.8, alpha=0.9),
         "seasonal_naive": dict(color="tab:gray", ls="--", lw=1.2),
         "naive": dict(color="tab:olive", ls=":", lw=1.2),
         "sarima": dict(color="tab:blue", ls="-.", lw=1.2)}


def plot_forecast(result, path) -> Path:
    """Draw a ForecastResult into `path` (PNG)."""
    series, folds = result.series, result.folds
    t = series.times if series.times is not None else np.arange(len(series))
    fig, ax = subplots(figsize=(10, 4.5), dpi=110)
    ax.plot(t, series.values, color="black", lw=1.2, label="actual", zorder=4)
    for k, fold in enumerate(folds):
        span = t[fold.origin:fold.origin + len(fold.truth)]
        ax.axvspan(span[0], span[-1], color="tab:orange", alpha=0.08, lw=0)
        ax.plot(span, fold.truth, color="black", marker="o", ms=2.5, lw=0, zorder=4)
        for method, fc in fold.forecasts.items():
            label = _label(result, method) if k == 0 else None
            ax.plot(span, fc, label=label, **STYLE.get(method, {}))
    mape = result.metrics["model"]["mape"]
    ax.set_title(f"{series.name}: {result.config.cell.upper()} {result.config.strategy}, "
                 f"{len(folds)} fold(s) of {result.config.horizon} held out; model MAPE {mape:.2f}%")
    ax.set_xlabel("time" if series.times is not None else "step")
    ax.set_ylabel(series.name)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def _label(result, method: str) -> str:
    if method == "model":
        return f"{result.config.cell} ({result.config.strategy})"
    return method.replace("_", " ")
