"""Forecasting: windows, transforms fitted on the training part only, metrics, baselines, the pipeline."""
import math

import numpy as np
import pytest
import torch

from rnnkit.data import Series, SeriesTransform, airline, make_windows, target_starts
from rnnkit.data.scaling import Scaler
from rnnkit.metrics import forecast_metrics, mape
from rnnkit.models import Forecaster, ForecasterConfig
from rnnkit.tasks import baselines
from rnnkit.tasks.forecast import ForecastConfig, load_model, predict, run_forecast
from rnnkit.train import TrainConfig


def test_airline_is_box_jenkins_series_g():
    s = airline()
    assert len(s) == 144 and s.values.sum() == 40363 and s.values[0] == 112 and s.values[-1] == 432
    assert s.freq == "MS" and s.season == 12 and s.label(0) == "1949-01" and s.label(143) == "1960-12"


def test_windows_shapes_and_alignment():
    X, Y = make_windows(np.arange(10.0), lookback=3, horizon=2)
    assert X.shape == (6, 3) and Y.shape == (6, 2)
    assert X[0].tolist() == [0, 1, 2] and Y[0].tolist() == [3, 4]
    assert X[-1].tolist() == [5, 6, 7] and Y[-1].tolist() == [8, 9]
    assert target_starts(10, 3, 2).tolist() == [3, 4, 5, 6, 7, 8]


def test_scaler_standard_and_minmax():
    s = Scaler.fit(np.array([1.0, 3.0]), "standard")
    assert (s.loc, s.scale) == (2.0, 1.0)
    m = Scaler.fit(np.array([2.0, 4.0, 6.0]), "minmax")
    assert m.transform(np.array([2.0, 6.0])).tolist() == [0.0, 1.0]
    assert m.inverse(np.array([0.5])).tolist() == [4.0]


def test_transform_fitted_on_train_only_and_inverts_exactly():
    rng = np.random.default_rng(0)
    x = np.exp(np.cumsum(rng.normal(0.01, 0.1, 80))) * 100            # positive, trending
    o = 60
    t = SeriesTransform.fit(x[:o], log=True, lags=(12, 1))
    d = np.diff(np.log(x[:o])[12:] - np.log(x[:o])[:-12])             # by hand, train part only
    assert t.scaler.loc == pytest.approx(d.mean()) and t.scaler.scale == pytest.approx(d.std())
    z = t.forward(x)                                                   # (80 - 13,)
    assert len(z) == 80 - t.offset
    back = t.inverse(z[o - t.offset:], history=x[:o])                  # z of x[o:] -> x[o:]
    np.testing.assert_allclose(back, x[o:], rtol=1e-10)


def test_metrics_on_a_hand_computed_example():
    y, f, insample = [1.0, 2.0, 4.0], [2.0, 2.0, 2.0], [1.0, 3.0, 2.0, 5.0]
    m = forecast_metrics(y, f, insample, season=1)
    assert m["mae"] == pytest.approx(1.0)
    assert m["rmse"] == pytest.approx(math.sqrt(5 / 3))
    assert m["mape"] == pytest.approx(50.0)                            # (1/1 + 0 + 2/4) / 3
    assert m["smape"] == pytest.approx(100 * (2 / 3 + 0 + 4 / 6) / 3)
    assert m["mase"] == pytest.approx(1.0 / 2.0)                       # naive in-sample MAE (2+1+3)/3
    assert forecast_metrics(y, f, insample, season=2)["mase"] == pytest.approx(1.0 / 1.5)
    assert math.isnan(mape([0.0, 1.0], [1.0, 1.0]))


def test_baselines_values_and_seasonal_naive_airline_mape():
    h = np.arange(1.0, 9.0)
    assert baselines.naive(h, 3).tolist() == [8, 8, 8]
    assert baselines.seasonal_naive(h, 6, season=4).tolist() == [5, 6, 7, 8, 5, 6]
    x = airline().values
    fc = baselines.seasonal_naive(x[:132], 12, 12)
    assert round(mape(x[132:], fc), 2) == 9.99


@pytest.mark.skipif(not baselines.sarima_available(), reason="statsmodels not installed")
def test_airline_sarima_on_1960():
    x = airline().values
    assert mape(x[132:], baselines.sarima(x[:132], 12, 12)) == pytest.approx(2.90, abs=0.05)


def test_recursive_rollout_feeds_predictions_back():
    torch.manual_seed(0)
    model = Forecaster(ForecasterConfig("gru", hidden_size=8, outputs=1)).eval()
    x = torch.randn(2, 5, 1)                                           # (B, L, 1)
    out = model.rollout(x, 3)                                          # (B, 3)
    assert out.shape == (2, 3)
    first = model(x)                                                   # (B, 1)
    second = model(torch.cat([x[:, 1:], first[:, :, None]], 1))
    assert torch.allclose(out[:, :1], first) and torch.allclose(out[:, 1:2], second)


def short(series: Series, n: int, values=None) -> Series:
    v = series.values[:n] if values is None else values
    return Series(v, series.name, series.times[:n], series.freq, series.season, "test")


def quick(**kw):
    return TrainConfig(epochs=2, lr=1e-2, progress=False, **kw)


def test_nothing_after_the_origin_reaches_the_model():
    s = airline()
    other = s.values.copy()
    other[132:] *= 5                                                   # a very different test year
    cfg = ForecastConfig(lookback=12, hidden_size=8, sarima=False)
    a = run_forecast(s, cfg, quick())
    b = run_forecast(short(s, 144, other), cfg, quick())
    assert a.transform == b.transform
    np.testing.assert_array_equal(a.folds[0].forecasts["model"], b.folds[0].forecasts["model"])


def test_backtest_folds_and_saved_model_reloads(tmp_path):
    s = airline()
    cfg = ForecastConfig(lookback=12, hidden_size=8, backtest=3, strategy="recursive", cell="gru", sarima=False)
    r = run_forecast(s, cfg, quick(out=str(tmp_path)))
    assert [f.origin for f in r.folds] == [108, 120, 132]
    assert r.metrics["seasonal_naive"]["mape"] == pytest.approx(
        np.mean([mape(s.values[o:o + 12], s.values[o - 12:o]) for o in (108, 120, 132)]))
    model, transform, saved_cfg = load_model(tmp_path)
    assert saved_cfg == cfg
    np.testing.assert_allclose(predict(model, transform, s.values[:132], saved_cfg),
                               r.folds[-1].forecasts["model"], rtol=1e-6)


def test_series_type_hints_resolve_though_pandas_is_imported_lazily():
    import typing

    import pandas as pd

    from rnnkit.data import registry, series
    assert typing.get_type_hints(series.Series)["times"] == pd.DatetimeIndex | None
    assert typing.get_type_hints(registry.read_reviews)["return"] is pd.DataFrame
    assert series.pd.DatetimeIndex is pd.DatetimeIndex and "pandas" in repr(series.pd)
