"""Live training charts that stay fast and small however long a run streams.

Two measures keep the window responsive (see bench/gui_latency.py for the figures):

* **Bounded memory.** Each curve's points live in a :class:`DecimatingSeries` of fixed capacity.
  When it is full, the older three quarters are averaged in pairs; the newest quarter stays at full
  resolution. Memory is constant, recent detail is exact and old history gets coarser, which is
  all a chart a few hundred pixels wide can show anyway.
* **Coalesced redraws.** Events only append to the series; a timer pushes the dirty curves to
  pyqtgraph a few times per second, so 20 (or 2000) events per second cost the same drawing.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QGridLayout, QWidget

DEFAULT_CAPACITY = 4096
REDRAW_MS = 200
SMOOTHING = 0.9  # the exponential moving average's weight on history, as in TensorBoard


class DecimatingSeries:
    """Append-only (x, y) points in fixed memory; old points are merged in pairs when full."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if capacity < 8:
            raise ValueError("capacity must be at least 8")
        self.capacity = capacity
        self._x = np.empty(capacity, dtype=np.float64)
        self._y = np.empty(capacity, dtype=np.float64)
        self._n = 0
        self.appended = 0  # every point ever appended, merged or not

    def __len__(self) -> int:
        return self._n

    def append(self, x: float, y: float) -> None:
        if self._n == self.capacity:
            self._compact()
        self._x[self._n] = x
        self._y[self._n] = y
        self._n += 1
        self.appended += 1

    def _compact(self) -> None:
        keep = self.capacity // 4  # the newest points, kept exact
        old = (self._n - keep) // 2 * 2  # an even count of older points, merged in pairs
        tail_start = old
        merged = old // 2
        self._x[:merged] = self._x[:old].reshape(-1, 2).mean(axis=1)
        self._y[:merged] = self._y[:old].reshape(-1, 2).mean(axis=1)
        rest = self._n - tail_start
        self._x[merged : merged + rest] = self._x[tail_start : self._n]
        self._y[merged : merged + rest] = self._y[tail_start : self._n]
        self._n = merged + rest

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the points (pyqtgraph keeps the arrays it is given)."""
        return self._x[: self._n].copy(), self._y[: self._n].copy()

    def last(self) -> tuple[float, float] | None:
        if not self._n:
            return None
        return float(self._x[self._n - 1]), float(self._y[self._n - 1])

    def clear(self) -> None:
        self._n = 0
        self.appended = 0

    @property
    def nbytes(self) -> int:
        return self._x.nbytes + self._y.nbytes


class Ema:
    """Debiased exponential moving average, for the smoothed loss."""

    def __init__(self, weight: float = SMOOTHING):
        self.weight = weight
        self._value = 0.0
        self._count = 0

    def update(self, value: float) -> float:
        self._count += 1
        self._value = self.weight * self._value + (1 - self.weight) * value
        return self._value / (1 - self.weight**self._count)

    def reset(self) -> None:
        self._value = 0.0
        self._count = 0


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


class _Curve:
    """One pyqtgraph curve fed from a DecimatingSeries."""

    def __init__(self, item: pg.PlotDataItem, capacity: int):
        self.item = item
        self.series = DecimatingSeries(capacity)
        self.dirty = False

    def append(self, x: float, y: float) -> None:
        self.series.append(x, y)
        self.dirty = True

    def flush(self) -> None:
        if self.dirty:
            self.item.setData(*self.series.data())
            self.dirty = False

    def clear(self) -> None:
        self.series.clear()
        self.item.setData([], [])
        self.dirty = False


def make_plot(object_name: str, title: str, left: str) -> pg.PlotWidget:
    plot = pg.PlotWidget(title=title)
    plot.setObjectName(object_name)
    plot.setBackground("w")
    item = plot.getPlotItem()
    item.showGrid(x=True, y=True, alpha=0.25)
    item.setLabel("bottom", "step")
    item.setLabel("left", left)
    item.setClipToView(True)
    item.setDownsampling(auto=True, mode="peak")
    plot.setMinimumHeight(120)
    return plot


class TrainingCharts(QWidget):
    """Loss (raw, smoothed, eval), learning rate and tokens/s against the step, fed by events.

    ``on_event`` accepts every event type and ignores what it does not chart. Points are drawn by a
    timer, at most every ``REDRAW_MS`` ms; :meth:`flush` draws at once.
    """

    def __init__(self, parent: QWidget | None = None, *, capacity: int = DEFAULT_CAPACITY, loss_object_name: str = "lossPlot"):
        super().__init__(parent)
        self.loss_plot = make_plot(loss_object_name, "Loss", "loss")
        self.loss_plot.addLegend(offset=(-10, 10))
        self.lr_plot = make_plot("lrPlot", "Learning rate", "lr")
        self.speed_plot = make_plot("tokensPlot", "Throughput", "tokens/s")

        raw = self.loss_plot.plot(pen=pg.mkPen((120, 160, 220), width=1), name="training loss")
        smooth = self.loss_plot.plot(pen=pg.mkPen((20, 70, 160), width=2.5), name="smoothed")
        evals = self.loss_plot.plot(
            pen=pg.mkPen((200, 90, 20), width=2), symbol="o", symbolSize=7,
            symbolBrush=(200, 90, 20), name="evaluation loss",
        )
        lr = self.lr_plot.plot(pen=pg.mkPen((40, 140, 80), width=2))
        speed = self.speed_plot.plot(pen=pg.mkPen((130, 60, 160), width=2))
        raw.setObjectName("lossRaw")
        smooth.setObjectName("lossSmoothed")
        evals.setObjectName("lossEval")
        self.curves = {
            "loss": _Curve(raw, capacity),
            "smoothed": _Curve(smooth, capacity),
            "eval": _Curve(evals, capacity),
            "lr": _Curve(lr, capacity),
            "tokens_per_s": _Curve(speed, capacity),
        }
        self._ema = Ema()

        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.addWidget(self.loss_plot, 0, 0, 1, 2)
        grid.addWidget(self.lr_plot, 1, 0)
        grid.addWidget(self.speed_plot, 1, 1)
        grid.setRowStretch(0, 3)
        grid.setRowStretch(1, 2)

        self._timer = QTimer(self)
        self._timer.setInterval(REDRAW_MS)
        self._timer.timeout.connect(self.flush)
        self._timer.start()

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "step":
            step = _finite(event.get("step"))
            if step is None:
                return
            loss = _finite(event.get("loss"))
            if loss is not None:
                self.curves["loss"].append(step, loss)
                self.curves["smoothed"].append(step, self._ema.update(loss))
            for key in ("lr", "tokens_per_s"):
                value = _finite(event.get(key))
                if value is not None:
                    self.curves[key].append(step, value)
        elif kind == "eval":
            step, loss = _finite(event.get("step")), _finite(event.get("loss"))
            if step is not None and loss is not None:
                self.curves["eval"].append(step, loss)

    def flush(self) -> None:
        for curve in self.curves.values():
            curve.flush()

    def clear(self) -> None:
        for curve in self.curves.values():
            curve.clear()
        self._ema.reset()

    def load_events(self, events: Any) -> None:
        """Replace the charts with a finished run's events."""
        self.clear()
        for event in events:
            self.on_event(event)
        self.flush()

    def point_count(self, name: str = "loss") -> int:
        """Points currently held for a curve (after decimation)."""
        return len(self.curves[name].series)

    @property
    def nbytes(self) -> int:
        return sum(c.series.nbytes for c in self.curves.values())
