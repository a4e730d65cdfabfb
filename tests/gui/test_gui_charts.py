"""Chart memory stays bounded however many points stream in; recent points stay exact."""

from __future__ import annotations

import math

import numpy as np
import pytest

from qlora_studio.gui import jobs
from qlora_studio.gui.charts import DecimatingSeries, Ema, TrainingCharts


def test_series_keeps_fixed_memory_and_exact_recent_points():
    series = DecimatingSeries(capacity=64)
    nbytes = series.nbytes
    n = 10_000
    for i in range(n):
        series.append(i, float(i))
    x, y = series.data()
    assert len(series) == len(x) <= 64 and series.nbytes == nbytes and series.appended == n
    assert np.all(np.diff(x) > 0)  # still in order
    assert list(x[-16:]) == list(range(n - 16, n))  # the newest quarter is exact
    assert x[0] < series.stride  # the start of the run is still there
    np.testing.assert_allclose(x, y)  # means of the same points: y = x stays true
    gaps = np.diff(x[:-17])
    assert gaps.max() <= 1.01 * series.stride  # history is evenly spaced, at most one stride apart


def test_history_points_are_exact_means():
    series = DecimatingSeries(capacity=16)
    rng = np.random.default_rng(0)
    values = rng.normal(size=1000)
    for i, v in enumerate(values):
        series.append(i, v)
    x, y = series.data()
    w = series.weights()
    assert series.stride > 1 and len(w) == len(y)
    assert w.sum() == 1000
    assert (w * y).sum() == pytest.approx(values.sum())  # no point lost or counted twice
    assert (w * x).sum() == pytest.approx(sum(range(1000)))


def test_ema_is_debiased():
    ema = Ema(0.9)
    assert ema.update(5.0) == pytest.approx(5.0)
    assert ema.update(5.0) == pytest.approx(5.0)


def test_charts_take_events_and_ignore_bad_values(qtbot):
    charts = TrainingCharts(capacity=32)
    qtbot.addWidget(charts)
    for step in range(1, 101):
        charts.on_event({"type": "step", "step": step, "loss": 10.0 / step, "lr": 1e-3, "tokens_per_s": 500.0})
    charts.on_event({"type": "step", "step": 101, "loss": math.nan, "lr": None})
    charts.on_event({"type": "eval", "step": 100, "loss": 0.5, "perplexity": 1.6})
    charts.on_event({"type": "paging", "step": 100})
    charts.flush()
    assert charts.point_count("loss") <= 32 and charts.curves["loss"].series.appended == 100
    assert charts.point_count("eval") == 1
    x, y = charts.loss_plot.getPlotItem().listDataItems()[0].getData()
    assert x[-1] == 100 and y[-1] == pytest.approx(0.1)
    charts.clear()
    assert charts.point_count("loss") == 0


def test_leftover_guard_sees_a_running_job(qtbot):
    import threading

    release = threading.Event()
    job = jobs.FunctionJob(release.wait, 10)
    job.start()
    assert job in jobs.running_jobs()
    release.set()
    job.wait(5000)
    assert job not in jobs.running_jobs()
