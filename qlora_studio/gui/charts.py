"""Live training charts that stay fast and small however long a run streams.

Two measures keep the window responsive (see bench/gui_latency.py for the figures):

* **Bounded memory.** Each curve's points live in a :class:`DecimatingSeries` of fixed capacity:
  the newest quarter exactly, older history as evenly spaced means that get coarser as the run
  grows. Memory is constant and a chart a few hundred pixels wide loses nothing it could show.
* **Coalesced, staggered redraws.** Events only append to the series; a timer pushes the dirty
  curves to pyqtgraph, one chart per tick (the loss chart 5 times a second, the others 2.5), so 20
  (or 2000) events per second cost the same drawing and no single redraw stalls the window.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QGraphicsItem, QGridLayout, QWidget

DEFAULT_CAPACITY = 4096
#: One chart is redrawn per tick, the loss chart every other tick: a redraw of all three at once
#: (axis text included) takes longer than the 50 ms the event loop may stall on a slow CPU.
TICK_MS = 100
ROTATION = ("loss", "lr", "loss", "speed")
FROM_ZERO = ("lr", "speed")
SMOOTHING = 0.9  # the exponential moving average's weight on history, as in TensorBoard


class DecimatingSeries:
    """Append-only (x, y) points in fixed memory: exact recent points, evenly thinned history.

    The newest quarter of ``capacity`` points is kept exactly, in a ring. Older points move into a
    history of evenly spaced means: each history point stands for ``stride`` consecutive points;
    when the history is full, neighbours are merged in pairs (weighted by how many points each
    stands for, so every mean stays exact) and the stride doubles.
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        if capacity < 8:
            raise ValueError("capacity must be at least 8")
        self.capacity = capacity
        self._recent_cap = capacity // 4
        self._hist_cap = (capacity - self._recent_cap) // 2 * 2
        self._rx = np.empty(self._recent_cap)
        self._ry = np.empty(self._recent_cap)
        self._r0 = 0  # index of the oldest recent point
        self._rn = 0
        self._hx = np.empty(self._hist_cap)
        self._hy = np.empty(self._hist_cap)
        self._hw = np.empty(self._hist_cap)  # how many points each history point stands for
        self._hn = 0
        self.stride = 1
        self._acc = [0.0, 0.0, 0]  # sum of x, sum of y, count: points on their way into history
        self.appended = 0  # every point ever appended

    def __len__(self) -> int:
        return self._hn + (1 if self._acc[2] else 0) + self._rn

    def append(self, x: float, y: float) -> None:
        if self._rn == self._recent_cap:
            self._to_history(self._rx[self._r0], self._ry[self._r0])
            self._r0 = (self._r0 + 1) % self._recent_cap
            self._rn -= 1
        i = (self._r0 + self._rn) % self._recent_cap
        self._rx[i] = x
        self._ry[i] = y
        self._rn += 1
        self.appended += 1

    def _to_history(self, x: float, y: float) -> None:
        acc = self._acc
        acc[0] += x
        acc[1] += y
        acc[2] += 1
        if acc[2] < self.stride:
            return
        if self._hn == self._hist_cap:
            self._merge_pairs()
        n = acc[2]
        self._hx[self._hn] = acc[0] / n
        self._hy[self._hn] = acc[1] / n
        self._hw[self._hn] = n
        self._hn += 1
        self._acc = [0.0, 0.0, 0]

    def _merge_pairs(self) -> None:
        n = self._hn // 2
        w = self._hw[: 2 * n].reshape(-1, 2)
        total = w.sum(axis=1)
        for values in (self._hx, self._hy):
            pairs = values[: 2 * n].reshape(-1, 2)
            values[:n] = (pairs * w).sum(axis=1) / total
        self._hw[:n] = total
        self._hn = n
        self.stride *= 2

    def data(self) -> tuple[np.ndarray, np.ndarray]:
        """The points in order, as new arrays (pyqtgraph keeps the arrays it is given)."""
        order = (self._r0 + np.arange(self._rn)) % self._recent_cap
        parts_x = [self._hx[: self._hn]]
        parts_y = [self._hy[: self._hn]]
        if self._acc[2]:
            parts_x.append(np.array([self._acc[0] / self._acc[2]]))
            parts_y.append(np.array([self._acc[1] / self._acc[2]]))
        parts_x.append(self._rx[order])
        parts_y.append(self._ry[order])
        return np.concatenate(parts_x), np.concatenate(parts_y)

    def weights(self) -> np.ndarray:
        """How many appended points each point of :meth:`data` stands for (they sum to ``appended``)."""
        parts = [self._hw[: self._hn]]
        if self._acc[2]:
            parts.append(np.array([float(self._acc[2])]))
        parts.append(np.ones(self._rn))
        return np.concatenate(parts)

    def last(self) -> tuple[float, float] | None:
        if not self._rn:
            return None
        i = (self._r0 + self._rn - 1) % self._recent_cap
        return float(self._rx[i]), float(self._ry[i])

    def clear(self) -> None:
        self._r0 = self._rn = self._hn = 0
        self.stride = 1
        self._acc = [0.0, 0.0, 0]
        self.appended = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self._rx, self._ry, self._hx, self._hy, self._hw))


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


NICE = (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10)


def _nice_ceil(value: float) -> float:
    """The smallest round number (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6 or 8 × 10^k) above ``value``."""
    if value <= 0:
        return 1.0
    base = 10 ** math.floor(math.log10(value))
    return next(f * base for f in NICE if f * base > value)


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
    for name in ("left", "bottom"):
        # Axis text is the costliest part of a redraw; an axis whose range did not change is
        # drawn from a cached pixmap instead (pyqtgraph invalidates it when the range changes).
        item.getAxis(name).setCacheMode(QGraphicsItem.CacheMode.DeviceCoordinateCache)
    plot.setMinimumHeight(120)
    return plot


class TrainingCharts(QWidget):
    """Loss (raw, smoothed, eval), learning rate and tokens/s against the step, fed by events.

    ``on_event`` accepts every event type and ignores what it does not chart. Points are drawn by a
    timer (see :data:`ROTATION`); :meth:`flush` draws everything at once.
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

        self._groups = {"loss": ("loss", "smoothed", "eval"), "lr": ("lr",), "speed": ("tokens_per_s",)}
        self._plots = {"loss": self.loss_plot, "lr": self.lr_plot, "speed": self.speed_plot}
        self._x_end = dict.fromkeys(self._groups, 0.0)
        self._y_top = dict.fromkeys(self._groups, 0.0)
        self._tick = 0
        self._timer = QTimer(self)
        self._timer.setInterval(TICK_MS)
        self._timer.timeout.connect(self._flush_next)
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
        for group in self._groups:
            self._flush_group(group)

    def _flush_next(self) -> None:
        group = ROTATION[self._tick % len(ROTATION)]
        self._tick += 1
        self._flush_group(group)

    def _flush_group(self, group: str) -> None:
        curves = [self.curves[name] for name in self._groups[group]]
        if not any(curve.dirty for curve in curves):
            return
        for curve in curves:
            curve.flush()
        # The step axis grows in steps (to the next round number) rather than with every point,
        # so its cached text stays valid between growths.
        ends = [last[0] for last in (c.series.last() for c in curves) if last is not None]
        if ends and max(ends) >= self._x_end[group]:
            starts = [c.series.data()[0][0] for c in curves if len(c.series)]
            self._x_end[group] = _nice_ceil(max(ends) * 1.05)
            self._plots[group].setXRange(min(starts), self._x_end[group], padding=0)
        if group in FROM_ZERO:
            # Learning rate and throughput are read against zero (a constant learning rate would
            # otherwise sit in the middle of an arbitrary range).
            top = max((float(c.series.data()[1].max()) for c in curves if len(c.series)), default=0.0)
            if top > 0 and top * 1.05 > self._y_top[group]:
                self._y_top[group] = _nice_ceil(top * 1.1)
                self._plots[group].setYRange(0, self._y_top[group], padding=0)

    def clear(self) -> None:
        for curve in self.curves.values():
            curve.clear()
        self._ema.reset()
        self._x_end = dict.fromkeys(self._groups, 0.0)
        self._y_top = dict.fromkeys(self._groups, 0.0)

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
