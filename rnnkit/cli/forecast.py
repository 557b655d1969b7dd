"""`rnnkit forecast`: train a recurrent forecaster, back-test it on held-out steps, compare to baselines."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..tasks import TrainingError, TrainingInterrupted
from ..tasks.forecast import LOG, STRATEGIES, ForecastConfig, load_series, run_forecast, write_outputs
from .common import add_common_flags, add_train_flags, nonnegative_int, positive_int, train_config

EXAMPLES = """\
examples:
  rnnkit forecast
      the bundled airline passengers (monthly, 1949-1960): log, seasonal differencing, an LSTM
      reading 24 months and emitting the next 12 at once; the last 12 months held out
  rnnkit forecast --data sales.csv --column units --time-column date --lookback 24 --horizon 6 \\
                  --cell gru --backtest 4 --out runs/sales
      your own CSV: 4 rolling-origin folds of 6 steps each, GRU, results in runs/sales

writes to --out: metrics.json (mae, rmse, mape %, smape %, mase for the model; the same for naive,
seasonal_naive and sarima), forecast.csv, forecast.png, model/ (checkpoint + metrics.csv; load it with
rnnkit.tasks.forecast.load_model). Ctrl-C saves a checkpoint; --resume continues it.
"""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "forecast", help="forecast a time series (bundled: airline passengers)", epilog=EXAMPLES,
        description="Train an RNN/LSTM/GRU forecaster on overlapping windows, back-test it on the last "
                    "steps of the series and compare it with naive, seasonal-naive and SARIMA forecasts.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="F.csv", help="CSV file with a header row (default: bundled airline passengers)")
    d.add_argument("--column", metavar="C", help="the value column (default: the only numeric one)")
    d.add_argument("--time-column", metavar="D", help="a date column: checked for gaps, sets the season")
    f = p.add_argument_group("forecast")
    f.add_argument("--lookback", type=positive_int, default=24, metavar="L", help="steps the model reads (default 24)")
    f.add_argument("--horizon", type=positive_int, default=12, metavar="H",
                   help="steps forecast, and held out per fold (default 12)")
    f.add_argument("--strategy", choices=STRATEGIES, default="direct",
                   help="direct: the head emits H values; recursive: 1 step fed back H times (default direct)")
    f.add_argument("--cell", choices=("rnn", "lstm", "gru"), default="lstm", help="recurrent cell (default lstm)")
    f.add_argument("--dropout", type=float, default=0.0, help="dropout between stacked layers (default 0)")
    f.add_argument("--log", choices=LOG, default="auto", help="log transform; auto: when all values > 0 (default)")
    f.add_argument("--diff", action=argparse.BooleanOptionalAction, default=False, help="first differences")
    f.add_argument("--seasonal-diff", action=argparse.BooleanOptionalAction, default=True,
                   help="differences at the seasonal lag (default on; skipped when there is no season)")
    f.add_argument("--season", type=positive_int, default=None, metavar="M",
                   help="seasonal period (default: from the dates, 12 for monthly; else 1)")
    f.add_argument("--scale", choices=("standard", "minmax", "none"), default="standard",
                   help="scaling fitted on the training part (default standard)")
    f.add_argument("--backtest", type=positive_int, default=1, metavar="N", help="rolling-origin folds (default 1)")
    f.add_argument("--val-size", type=nonnegative_int, default=0, metavar="V",
                   help="last V training steps kept for validation / early stopping (default 0)")
    f.add_argument("--sarima", action=argparse.BooleanOptionalAction, default=True,
                   help="SARIMA(0,1,1)(0,1,1)m baseline when statsmodels is installed (default on)")
    add_common_flags(p, epochs=200, hidden_size=32, out="runs/forecast")
    add_train_flags(p, lr=1e-2, batch_size=32)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    series = load_series(args.data, args.column, args.time_column)
    cfg = ForecastConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ForecastConfig)})
    train = train_config(args, out=str(Path(args.out) / "model"))
    try:
        result = run_forecast(series, cfg, train, resume=args.resume)
    except TrainingInterrupted as e:
        print(f"rnnkit forecast: {e}", file=sys.stderr)
        return 130
    except TrainingError as e:
        print(f"rnnkit forecast: error: {e}", file=sys.stderr)
        return 1
    write_outputs(result, args.out)
    print(table(result))
    print(summary(result, args.out))
    return 0


def table(result) -> str:
    """The metrics, mean over folds, one row per method."""
    head = f"{'method':<18}{'MAE':>9}{'RMSE':>9}{'MAPE %':>9}{'sMAPE %':>9}{'MASE':>8}"
    rows = [head, "-" * len(head)]
    for method, m in result.metrics.items():
        name = f"{result.config.cell} ({result.config.strategy})" if method == "model" else method
        rows.append(f"{name:<18}{m['mae']:>9.2f}{m['rmse']:>9.2f}{m['mape']:>9.2f}{m['smape']:>9.2f}{m['mase']:>8.3f}")
    return "\n".join(rows)


def summary(result, out) -> str:
    m, s, cfg = result.metrics, result.series, result.config
    held = f"{len(result.folds)} fold(s) x {cfg.horizon} steps held out (from {s.label(result.folds[0].origin)})"
    base = f"seasonal naive {m['seasonal_naive']['mape']:.2f}%"
    if "sarima" in m:
        base += f", SARIMA {m['sarima']['mape']:.2f}%"
    return (f"forecast: {cfg.cell.upper()} {cfg.strategy} on {s.name!r} ({len(s)} values, season {result.season}), "
            f"{held}: MAPE {m['model']['mape']:.2f}% ({base}); {result.fit.epochs_run} epochs, "
            f"{result.seconds:.1f}s -> {out}")
