"""Invertible series transforms, fitted on the training part only: log, (seasonal) differencing, scaling.

    t = SeriesTransform.fit(x_train, log=True, lags=(12,), scale="standard")
    z = t.forward(x)                        # (N - t.offset,)  z[i] belongs to x[i + t.offset]
    x_hat = t.inverse(z_hat, history=x[:o]) # forecasts for x[o], x[o+1], ... back in the units of x

Differencing with lag k replaces y_t by y_t - y_{t-k} (k=1: the trend step; k=m: the change since the same
season last year). Inverting walks forward: y_t = d_t + y_{t-k}, with y_{t-k} observed (history) or
already reconstructed. The scaler's statistics come from the training part alone, so nothing about the
held-out part leaks into the inputs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import UserError

SCALES = ("standard", "minmax", "none")


@dataclass(frozen=True)
class Scaler:
    kind: str           # standard: (x - mean) / std; minmax: to [0, 1]; none: identity
    loc: float
    scale: float

    @classmethod
    def fit(cls, x: np.ndarray, kind: str = "standard") -> Scaler:
        if kind not in SCALES:
            raise UserError(f"scale must be one of {', '.join(SCALES)}; got {kind!r}")
        x = np.asarray(x, dtype=np.float64)
        if kind == "none" or len(x) == 0:
            return cls(kind, 0.0, 1.0)
        loc, scale = (x.mean(), x.std()) if kind == "standard" else (x.min(), x.max() - x.min())
        return cls(kind, float(loc), float(scale) if scale > 0 else 1.0)   # a constant part: just shift

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.loc) / self.scale

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return np.asarray(z, dtype=np.float64) * self.scale + self.loc


@dataclass(frozen=True)
class SeriesTransform:
    log: bool
    lags: tuple[int, ...]       # differencing lags applied in this order, e.g. (12,) or (12, 1)
    scaler: Scaler

    @classmethod
    def fit(cls, x_train: np.ndarray, log: bool, lags: tuple[int, ...] = (), scale: str = "standard") -> SeriesTransform:
        """Fit on the training part only."""
        x_train = np.asarray(x_train, dtype=np.float64)
        if log and (x_train <= 0).any():
            raise UserError(f"the log transform needs values > 0, but the series has {x_train.min():g}; "
                            "turn it off (--log no)")
        if any(k < 1 for k in lags):
            raise UserError(f"differencing lags must be >= 1, got {lags}")
        if len(x_train) <= sum(lags):
            raise UserError(f"{len(x_train)} training values are too few to difference with lags {lags}")
        unscaled = cls(log, tuple(lags), Scaler("none", 0.0, 1.0))._difference(x_train)
        return cls(log, tuple(lags), Scaler.fit(unscaled, scale))

    @property
    def offset(self) -> int:
        """Steps lost at the start of the series to differencing."""
        return sum(self.lags)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """(N,) -> (N - offset,)."""
        x = np.asarray(x, dtype=np.float64)
        if self.log and (x <= 0).any():
            raise UserError(f"the log transform needs values > 0, but the series has {x.min():g}; turn it off (--log no)")
        return self.scaler.transform(self._difference(x))

    def _difference(self, x: np.ndarray) -> np.ndarray:
        y = np.log(x) if self.log else x
        for k in self.lags:
            y = y[k:] - y[:-k]
        return y

    def inverse(self, z: np.ndarray, history: np.ndarray) -> np.ndarray:
        """Forecast z (H,) of the steps right after `history` (the observed x before them) -> x units."""
        d = self.scaler.inverse(z)                                   # (H,)
        levels = self._levels(np.asarray(history, dtype=np.float64))
        for k, level in zip(reversed(self.lags), reversed(levels)):
            ext = list(level)                                        # the series before this differencing
            for v in d:
                ext.append(v + ext[-k])                              # y_t = d_t + y_{t-k}
            d = np.asarray(ext[len(level):])
        return np.exp(d) if self.log else d

    def _levels(self, history: np.ndarray) -> list[np.ndarray]:
        """The history at each stage before each differencing, in the order the lags apply."""
        y = np.log(history) if self.log else history
        levels = []
        for k in self.lags:
            levels.append(y)
            y = y[k:] - y[:-k]
        return levels

    def to_json(self) -> dict:
        return {"log": self.log, "lags": list(self.lags), "scaler": asdict(self.scaler)}

    @classmethod
    def from_json(cls, d: dict) -> SeriesTransform:
        return cls(bool(d["log"]), tuple(d["lags"]), Scaler(**d["scaler"]))
