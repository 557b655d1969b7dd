"""`rnnkit forecast`: train a recurrent forecaster, back-test it on held-out steps, compare to baselines."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..tasks.forecast import LOG, SCALES, STRATEGIES, ForecastConfig, load_series, run_forecast, write_outputs
from ..models.cells import CELLS
from .common import (add_common_flags, add_train_flags, config_from, epochs_summary, finite_float, nonnegative_int, positive_int,
                     train_config)

EXAMPLES = """\
examples:
  rnnkit forecast
      the bundled airline passengers (monthly, 1949-1960): log, first differences, an LSTM
      reading 48 months and emitting the next 12 at once; the last 12 months held out
  rnnkit forecast --data sales.csv --column units --time-column date --lookback 24 --horizon 6 \\
                  --cell gru --backtest 4 --out runs/sales
      your own CSV: 4 rolling-origin folds of 6 steps each, GRU, results in runs/sales

writes to --out: metrics.json (mae, rmse, mape %, smape %, mase for the model; the same for naive,
seasonal_naive and sarima), forecast.csv, forecast.png, model/ (checkpoint + metrics.csv; load it with
rnnkit.tasks.forecast.load_model). Ctrl-C saves a checkpoint (with --backtest N, in the last fold's
training); --resume continues it.
"""


D = ForecastConfig()                    # the defaults live in one place: the config


def _onoff(flag: bool) -> str:
    return "on" if flag else "off"


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "forecast", help="forecast a time series (bundled: airline passengers)", epilog=EXAMPLES,
        description="Train an RNN/LSTM/GRU forecaster on overlapping windows, back-test it on the last "
                    "steps of the series and compare it with naive, seasonal-naive and SARIMA forecasts.")
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="F.csv", help="CSV file with a header row (default: bundled airline passengers)")
    d.add_argument("--column", metavar="C", help="the value column (default: the only numeric one)")
    d.add_argument("--time-column", metavar="D", help="a date column: checked for gaps, sets the season")
    f = p.add_argument_group("forecast")
    f.add_argument("--lookback", type=positive_int, default=D.lookback, metavar="L",
                   help=f"steps the model reads (default {D.lookback})")
    f.add_argument("--horizon", type=positive_int, default=D.horizon, metavar="H",
                   help=f"steps forecast, and held out per fold (default {D.horizon})")
    f.add_argument("--strategy", choices=STRATEGIES, default=D.strategy,
                   help=f"direct: the head emits H values; recursive: 1 step fed back H times (default {D.strategy})")
    f.add_argument("--cell", choices=tuple(CELLS), default=D.cell, help=f"recurrent cell (default {D.cell})")
    f.add_argument("--dropout", type=finite_float, default=D.dropout, help="dropout between stacked layers (default 0)")
    f.add_argument("--log", choices=LOG, default=D.log, help=f"log transform; auto: when all values > 0 (default {D.log})")
    f.add_argument("--diff", action=argparse.BooleanOptionalAction, default=D.diff,
                   help=f"first differences (default {_onoff(D.diff)})")
    f.add_argument("--seasonal-diff", action=argparse.BooleanOptionalAction, default=D.seasonal_diff,
                   help=f"differences at the seasonal lag, skipped when there is no season (default {_onoff(D.seasonal_diff)})")
    f.add_argument("--season", type=positive_int, default=None, metavar="M",
                   help="seasonal period (default: from the dates, 12 for monthly; else 1)")
    f.add_argument("--scale", choices=SCALES, default=D.scale,
                   help=f"scaling fitted on the training part (default {D.scale})")
    f.add_argument("--backtest", type=positive_int, default=D.backtest, metavar="N", help="rolling-origin folds (default 1)")
    f.add_argument("--val-size", type=nonnegative_int, default=D.val_size, metavar="V",
                   help="last V training steps kept for validation / early stopping (default 0)")
    f.add_argument("--sarima", action=argparse.BooleanOptionalAction, default=D.sarima,
                   help="SARIMA(0,1,1)(0,1,1)m baseline when statsmodels is installed (default on)")
    add_common_flags(p, epochs=200, hidden_size=D.hidden_size, num_layers=D.num_layers, out="runs/forecast")
    add_train_flags(p, lr=1e-2, batch_size=32, threads=1)     # a tiny model: one thread is fastest
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    series = load_series(args.data, args.column, args.time_column)
    cfg = config_from(args, ForecastConfig)
    train = train_config(args, out=str(Path(args.out) / "model"))
    result = run_forecast(series, cfg, train, resume=args.resume)
    write_outputs(result, args.out)
    print(table(result))
    print(summary(result, args.out, train.patience))
    return 0


def table(result) -> str:
    """The metrics, mean over folds, one row per method."""
    head = f"{'method':<18}{'MAE':>9}{'RMSE':>9}{'MAPE %':>9}{'sMAPE %':>9}{'MASE':>8}"
    rows = [head, "-" * len(head)]
    for method, m in result.metrics.items():
        name = f"{result.config.cell} ({result.config.strategy})" if method == "model" else method
        rows.append(f"{name:<18}{m['mae']:>9.2f}{m['rmse']:>9.2f}{m['mape']:>9.2f}{m['smape']:>9.2f}{m['mase']:>8.3f}")
    return "\n".join(rows)


def summary(result, out, patience: int | None) -> str:
    m, s, cfg = result.metrics, result.series, result.config
    held = f"{len(result.folds)} fold(s) x {cfg.horizon} steps held out (from {s.label(result.folds[0].origin)})"
    base = f"seasonal naive {m['seasonal_naive']['mape']:.2f}%"
    if "sarima" in m:
        base += f", SARIMA {m['sarima']['mape']:.2f}%"
    return (f"forecast: {cfg.cell.upper()} {cfg.strategy} on {s.name!r} ({len(s)} values, season {result.season}), "
            f"{held}: MAPE {m['model']['mape']:.2f}% ({base}); {epochs_summary(result.fit, patience)}, "
            f"{result.seconds:.1f}s -> {out}")
