"""Forecasting: series -> transform -> windows -> recurrent forecaster -> trainer -> back-test -> report.

    series = load_series()                                   # the bundled airline passengers
    result = run_forecast(series, ForecastConfig(), TrainConfig(epochs=300, out="out/model"))
    write_outputs(result, "out")                             # metrics.json, forecast.csv, forecast.png

Rolling-origin back-test with N folds: fold k trains on x[:o_k] and forecasts x[o_k : o_k+H], with
o_k = n - (N-k) H, so the last fold holds out the final H steps. Everything fitted (scaler, model) sees
only its fold's training part; with `val_size` V the last V training steps are carved off again for
early stopping. Metrics are averaged over folds; baselines get exactly the same folds.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import Series, SeriesTransform, airline, load_csv, make_windows, target_starts
from ..data.scaling import SCALES
from ..errors import UserError, check_at_least_one, check_choice, check_dropout
from ..metrics import forecast_metrics
from ..models import Forecaster, ForecasterConfig
from ..train import (FitResult, TensorBatches, TrainConfig, Trainer, TrainingInterrupted, atomic_write, load_weights_into,
                     read_manifest, seed_everything)
from . import baselines
from .forecast_plot import plot_forecast
from .text_metrics import write_json

STRATEGIES = ("direct", "recursive")
LOG = ("auto", "yes", "no")


@dataclass(frozen=True)
class ForecastConfig:
    """What to forecast and how. CLI flags map one to one onto the fields."""
    lookback: int = 48          # L: steps the model reads
    horizon: int = 12           # H: steps it forecasts (and the size of each held-out fold)
    strategy: str = "direct"    # direct: the head emits H values; recursive: one step, fed back H times
    cell: str = "lstm"
    hidden_size: int = 32
    num_layers: int = 1
    dropout: float = 0.0
    log: str = "auto"           # log transform: auto = when every value is > 0
    diff: bool = True           # first differences
    seasonal_diff: bool = False # differences at lag `season` (needs a season)
    season: int | None = None   # seasonal period m; None: from the dates (12 for monthly), else 1
    scale: str = "standard"     # standard | minmax | none, fitted on the training part
    backtest: int = 1           # rolling-origin folds
    val_size: int = 0           # last training steps held out for early stopping (0: none)
    sarima: bool = True         # the SARIMA baseline, when statsmodels is installed

    def __post_init__(self):
        check_at_least_one(self, "lookback", "horizon", "backtest", "hidden_size", "num_layers")
        check_choice("strategy", self.strategy, STRATEGIES)
        check_choice("scale", self.scale, SCALES)
        check_choice("log", self.log, LOG)
        check_dropout(self.dropout)
        if self.val_size < 0 or (self.season is not None and self.season < 1):
            raise UserError("val_size must be >= 0 and season >= 1")


@dataclass(frozen=True)
class Fold:
    origin: int                             # index of the first forecast step
    truth: np.ndarray                       # (H,)
    forecasts: dict[str, np.ndarray]        # method -> (H,): "model", "naive", "seasonal_naive", "sarima"
    metrics: dict[str, dict[str, float]]    # method -> mae, rmse, mape, smape, mase


@dataclass(frozen=True)
class ForecastResult:
    series: Series
    config: ForecastConfig
    train: TrainConfig
    season: int
    folds: list[Fold]
    metrics: dict[str, dict[str, float]]    # method -> metric, mean over folds
    fit: FitResult                          # training history of the last fold
    model: Forecaster                       # the last fold's model
    transform: SeriesTransform
    seconds: float


def load_series(data: str | None = None, column: str | None = None, time_column: str | None = None) -> Series:
    """The user's CSV, or the bundled airline passengers when `data` is None."""
    if data is None:
        if column is not None or time_column is not None:
            raise UserError("--column and --time-column need --data (a CSV file)")
        return airline()
    return load_csv(data, column, time_column)


def run_forecast(series: Series, cfg: ForecastConfig, train: TrainConfig, resume: bool = False) -> ForecastResult:
    """Back-test `cfg` on `series`; the last fold's model is checkpointed in `train.out` (if set)."""
    t0 = time.perf_counter()
    if (train.patience is not None or train.schedule == "plateau") and cfg.val_size == 0:
        raise UserError("early stopping (--patience) and --schedule plateau watch the validation loss: "
                        "hold out the last training steps for it with --val-size V (e.g. the horizon)")
    season = cfg.season or series.season
    lags = _lags(cfg, season)
    x = series.values
    origins = _check_length(len(x), cfg, lags)
    _check_season(season, origins[0], cfg)
    folds, last = [], None
    for k, origin in enumerate(origins):
        final = k == len(origins) - 1
        fold_train = train if final else dataclasses.replace(train, out=None)
        try:
            model, transform, fit = fit_fold(x[:origin], cfg, fold_train, lags, resume and final)
        except TrainingInterrupted as e:
            if final:
                raise
            raise TrainingInterrupted(f"{e.how} in back-test fold {k + 1} of {len(origins)}; only the last "
                                      "fold's training is checkpointed, so nothing was saved: run the command "
                                      "again", e.signum) from e
        truth = x[origin:origin + cfg.horizon]
        folds.append(_evaluate_fold(x[:origin], truth, origin, predict(model, transform, x[:origin], cfg), cfg, season))
        last = (model, transform, fit)
    metrics = {m: {k: float(np.mean([f.metrics[m][k] for f in folds])) for k in folds[0].metrics[m]}
               for m in folds[0].metrics}
    return ForecastResult(series, cfg, train, season, folds, metrics, last[2], last[0], last[1],
                          time.perf_counter() - t0)


def _lags(cfg: ForecastConfig, season: int) -> tuple[int, ...]:
    if cfg.seasonal_diff and season <= 1 and cfg.season is None:
        return (1,) if cfg.diff else ()                     # no season known: nothing to difference at
    if cfg.seasonal_diff and season <= 1:
        raise UserError("seasonal differencing needs a season > 1; give --season m or --no-seasonal-diff")
    return ((season,) if cfg.seasonal_diff else ()) + ((1,) if cfg.diff else ())


def _check_length(n: int, cfg: ForecastConfig, lags: tuple[int, ...]) -> list[int]:
    """Fold origins, after checking the shortest training part still yields a training window."""
    outputs = cfg.horizon if cfg.strategy == "direct" else 1
    origins = [n - (cfg.backtest - k) * cfg.horizon for k in range(cfg.backtest)]
    need = cfg.backtest * cfg.horizon + sum(lags) + cfg.val_size + cfg.lookback + outputs
    if n < need:
        raise UserError(
            f"the series has {n} values, too short for lookback {cfg.lookback} + horizon {cfg.horizon} with "
            f"{cfg.backtest} back-test fold(s), differencing lags {list(lags)} and validation size {cfg.val_size}: "
            f"that needs at least {need}; lower --lookback, --horizon, --backtest or --val-size")
    return origins


def _check_season(season: int, shortest: int, cfg: ForecastConfig) -> None:
    """The seasonal-naive forecast and MASE's scale look one season back from the training part's end."""
    if season < shortest:
        return
    given = "--season" if cfg.season else "the season the dates imply"
    raise UserError(f"{given} is {season} steps, but the first fold's training part has only {shortest} values: "
                    f"the seasonal-naive baseline and MASE need more than one season of it; give a smaller "
                    f"--season (1: none), a shorter --horizon, fewer --backtest folds or a longer series")


def _log(cfg: ForecastConfig, x: np.ndarray) -> bool:
    return cfg.log == "yes" or (cfg.log == "auto" and bool((x > 0).all()))


def fit_fold(history: np.ndarray, cfg: ForecastConfig, train: TrainConfig, lags: tuple[int, ...],
             resume: bool = False) -> tuple[Forecaster, SeriesTransform, FitResult]:
    """Fit the transform and train a forecaster on `history` (the fold's training part)."""
    fit_part = history[:len(history) - cfg.val_size]
    transform = SeriesTransform.fit(fit_part, _log(cfg, history), lags, cfg.scale)
    z = transform.forward(history)                          # (o - offset,)
    outputs = cfg.horizon if cfg.strategy == "direct" else 1
    X, Y = make_windows(z, cfg.lookback, outputs)           # (n, L), (n, outputs)
    last_target = target_starts(len(z), cfg.lookback, outputs) + outputs - 1
    is_val = last_target >= len(z) - cfg.val_size if cfg.val_size else np.zeros(len(X), bool)
    X, Y = torch.tensor(X, dtype=torch.float32)[..., None], torch.tensor(Y, dtype=torch.float32)  # (n, L, 1)
    val = (X[is_val], Y[is_val]) if is_val.any() else None
    seed_everything(train.seed)
    model = Forecaster(ForecasterConfig(cfg.cell, 1, cfg.hidden_size, cfg.num_layers, cfg.dropout, outputs))
    meta = {"task": "forecast", "forecaster": dataclasses.asdict(model.config), "transform": transform.to_json(),
            "forecast": dataclasses.asdict(cfg), "trained_on": len(history)}
    trainer = Trainer(model, train, _mse, _val_loss(val, train) if val else None, meta)
    fit = trainer.fit(TensorBatches(X[~is_val], Y[~is_val], batch_size=train.batch_size), resume=resume)
    return trainer.model.cpu().eval(), transform, fit


def _mse(model, batch):
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


def _val_loss(val, train: TrainConfig):
    def evaluate(model):
        device = next(model.parameters()).device
        return {"val_loss": float(_mse(model, (val[0].to(device), val[1].to(device))))}
    return evaluate


def predict(model: Forecaster, transform: SeriesTransform, history: np.ndarray, cfg: ForecastConfig) -> np.ndarray:
    """Forecast the `cfg.horizon` steps after `history`, in the series' own units."""
    z = transform.forward(history)[-cfg.lookback:]
    x = torch.tensor(z, dtype=torch.float32)[None, :, None]     # (1, L, 1)
    with torch.no_grad():
        z_hat = model(x)[0] if cfg.strategy == "direct" else model.rollout(x, cfg.horizon)[0]   # (H,)
    return transform.inverse(z_hat.double().numpy(), history)


def _evaluate_fold(history, truth, origin, model_fc, cfg: ForecastConfig, season: int) -> Fold:
    H = cfg.horizon
    forecasts = {"model": model_fc, "naive": baselines.naive(history, H),
                 "seasonal_naive": baselines.seasonal_naive(history, H, season)}
    if cfg.sarima:
        fc = baselines.sarima(history, H, season)
        if fc is not None:
            forecasts["sarima"] = fc
    metrics = {m: forecast_metrics(truth, f, history, season) for m, f in forecasts.items()}
    return Fold(origin, truth, forecasts, metrics)


def load_model(directory) -> tuple[Forecaster, SeriesTransform, ForecastConfig]:
    """The forecaster a `rnnkit forecast` run saved in `DIR/model`, ready for `predict`."""
    meta = read_manifest(directory)["meta"]
    if meta.get("task") != "forecast":
        raise UserError(f"{directory} holds no forecasting model (task {meta.get('task')!r})")
    model = Forecaster(ForecasterConfig(**meta["forecaster"]))
    load_weights_into(model, directory)
    return model.eval(), SeriesTransform.from_json(meta["transform"]), ForecastConfig(**meta["forecast"])


def write_outputs(result: ForecastResult, out) -> dict[str, Path]:
    """metrics.json, forecast.csv and forecast.png into `out` (the model is already in out/model)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"metrics": out / "metrics.json", "forecast": out / "forecast.csv", "plot": out / "forecast.png"}
    write_json(paths["metrics"], metrics_document(result))
    atomic_write(paths["forecast"], _forecast_csv(result).encode())
    plot_forecast(result, paths["plot"])
    return paths


def metrics_document(result: ForecastResult) -> dict:
    """The model's metrics at the top level (DESIGN §4), each baseline's under its name, then details."""
    cfg, s = result.config, result.series
    doc = {**result.metrics["model"], **{m: v for m, v in result.metrics.items() if m != "model"}}
    doc["model"] = {"cell": cfg.cell, "strategy": cfg.strategy, "epochs_run": result.fit.epochs_run,
                    "best_epoch": result.fit.best_epoch}
    doc["units"] = {"mape": "percent", "smape": "percent", "mase": "relative to in-sample seasonal naive MAE"}
    doc["series"] = {"name": s.name, "source": s.source, "length": len(s), "season": result.season}
    doc["folds"] = [{"origin": s.label(f.origin), "metrics": f.metrics} for f in result.folds]
    doc["config"] = dataclasses.asdict(cfg)
    doc["train"] = result.train.to_json()
    doc["transform"] = result.transform.to_json()
    doc["seconds"] = round(result.seconds, 2)
    return doc



def _forecast_csv(result: ForecastResult) -> str:
    methods = list(result.folds[0].forecasts)
    lines = [",".join(["time", "fold", "step", "actual", *methods])]
    for k, fold in enumerate(result.folds):
        for h, y in enumerate(fold.truth):
            row = [result.series.label(fold.origin + h), str(k + 1), str(h + 1), f"{y:.6g}",
                   *(f"{fold.forecasts[m][h]:.6g}" for m in methods)]
            lines.append(",".join(row))
    return "\n".join(lines) + "\n"
