"""The rolling store: bounded memory over any session length, peaks kept, window adjustable."""

from __future__ import annotations

import math

import pytest

from qlora_studio.monitor.store import RollingSeries


def test_keeps_every_sample_while_the_window_is_not_full():
    series = RollingSeries(["used"], window_s=10.0, max_points=40)  # 0.25 s buckets
    for i in range(20):
        series.add(i * 0.25, {"used": i})
    assert len(series) == 20
    assert series.column("used") == [float(i) for i in range(20)]


def test_a_long_session_stays_bounded_and_drops_what_left_the_window():
    series = RollingSeries(["used", "power"], window_s=60.0, max_points=100)
    for i in range(100_000):  # almost 7 hours at 4 Hz
        series.add(i * 0.25, {"used": i % 97, "power": 300})
    assert len(series) <= series.max_points + 1
    times = series.times()
    assert times[-1] == pytest.approx(99_999 * 0.25)
    assert times[0] >= times[-1] - 60.0
    assert times == sorted(times)


def test_decimation_keeps_the_peak():
    series = RollingSeries(["used"], window_s=100.0, max_points=10)  # 10 s buckets
    for i in range(400):
        t = i * 0.25
        series.add(t, {"used": 5000 if i == 123 else 1000})
    assert series.maximum("used") == 5000
    assert series.column("used").count(5000) == 1
    assert len(series) <= 11


def test_missing_values_are_gaps_and_do_not_erase_known_ones():
    series = RollingSeries(["used", "worker"], window_s=10.0, max_points=10)  # 1 s buckets
    series.add(0.0, {"used": 1, "worker": None})
    series.add(0.5, {"used": 2})  # same bucket
    series.add(1.0, {"used": 3, "worker": 7})
    worker = series.column("worker")
    assert math.isnan(worker[0]) and worker[1] == 7
    assert series.column("used") == [2.0, 3.0]
    assert series.latest("worker") == 7


def test_shrinking_the_window_prunes_and_growing_it_merges():
    series = RollingSeries(["used"], window_s=100.0, max_points=100)  # 1 s buckets
    for i in range(100):
        series.add(float(i), {"used": i})
    assert len(series) == 100
    series.window_s = 10.0
    assert series.times()[0] >= 89.0
    assert len(series) <= 101
    series.window_s = 1000.0  # 10 s buckets: what is left merges into at most 2 buckets
    assert len(series) <= 2
    assert series.maximum("used") == 99


def test_a_clock_stepping_back_does_not_insert_out_of_order():
    series = RollingSeries(["used"], window_s=10.0, max_points=10)
    series.add(5.0, {"used": 1})
    series.add(3.0, {"used": 9})
    assert series.times() == [5.0]
    assert series.column("used") == [9.0]
