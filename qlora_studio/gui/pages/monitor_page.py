"""The GPU monitor page: where the GPU's memory goes while a run trains.

Two feeds meet here:

* the NVML sampler (:class:`~qlora_studio.monitor.nvml.NvmlSampler`), running in its own thread at
  4 Hz and bridged to the GUI thread by a Qt signal: memory used on the card, the worker's share,
  utilisation, temperature, power, PCIe traffic, processes;
* the worker's events, handed to :meth:`MonitorPage.on_event` by the supervisor: torch's
  allocated and reserved memory each ``step``, the ``paging`` events of the paged optimizer.

The VRAM timeline shows both on one wall-clock axis, with the card's capacity and the estimator's
predicted peak as horizontal lines and each paging event as a marker whose tooltip tells the step,
the bytes in and out and the faults. Everything is kept over a rolling window (10 minutes by
default) with decimation, so the page's memory stays flat over a long session.

No torch here: the monitor package imports none at module level.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from functools import partial
from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import QObject, Qt, QTimer, Signal
from PySide6.QtGui import QBrush, QColor, QFont
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QSizePolicy,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ...monitor.nvml import GpuSample, MonitorStatus, NvmlSampler
from ...monitor.runview import PagingSummary, describe_paging, fmt_bytes
from ...monitor.store import DEFAULT_WINDOW_S, RollingSeries

GIB = float(1 << 30)
WINDOWS = ((60.0, "1 min"), (300.0, "5 min"), (600.0, "10 min"), (1800.0, "30 min"), (3600.0, "1 hour"), (4 * 3600.0, "4 hours"))
MAX_TABLE_ROWS = 500
MAX_MARKERS = 2000
MAX_STEP_TIMES = 4096  # step end times kept to place late paging events

_COLORS = {
    "used": "#4c72b0",
    "worker": "#dd8452",
    "reserved": "#55a868",
    "allocated": "#c44e52",
    "capacity": "#8c8c8c",
    "estimate": "#8172b3",
    "paging": "#e6b800",
}
_CURVES = (
    ("used", "used on the card (NVML)"),
    ("worker", "training worker (NVML)"),
    ("reserved", "torch reserved"),
    ("allocated", "torch allocated"),
)


class _SamplerBridge(QObject):
    """Carries the sampler thread's callbacks into the GUI thread (queued signal delivery)."""

    samples = Signal(object)
    status = Signal(object)


def _detach(sampler: NvmlSampler, bridge: _SamplerBridge, owned: bool) -> None:
    """Disconnect a page from its sampler; stop the sampler if the page made it."""
    for listeners, fn in ((sampler.on_samples, bridge.samples.emit), (sampler.on_status, bridge.status.emit)):
        if fn in listeners:
            listeners.remove(fn)
    if owned:
        sampler.stop()


class _Sparkline(QWidget):
    """A small titled line chart for one figure (utilisation, temperature, power)."""

    def __init__(self, title: str, unit: str, color: str, object_name: str):
        super().__init__()
        self.title = title
        self.unit = unit
        self.label = QLabel(f"{title}: –")
        self.plot = pg.PlotWidget(axisItems={"bottom": pg.DateAxisItem(orientation="bottom")})
        self.plot.setObjectName(object_name)
        self.plot.setFixedHeight(70)
        self.plot.setMouseEnabled(x=False, y=False)
        self.plot.hideButtons()
        self.plot.getPlotItem().hideAxis("bottom")
        self.plot.getPlotItem().getAxis("left").setWidth(36)
        self.curve = self.plot.plot(pen=pg.mkPen(color, width=1.5), connect="finite")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.label)
        layout.addWidget(self.plot)

    def show_series(self, times: list[float], values: list[float], latest: float | None, x_range: tuple[float, float]) -> None:
        self.curve.setData(times, values)
        self.plot.setXRange(*x_range, padding=0)
        self.label.setText(f"{self.title}: {'–' if latest is None else f'{latest:.0f} {self.unit}'}")


class MonitorPage(QWidget):
    """The GPU monitor. Feed it every worker event with :meth:`on_event`.

    ``sampler`` and ``autostart`` exist for tests; by default the page makes its own NVML sampler
    and starts it at once, so the timeline has history by the time someone looks.
    """

    def __init__(self, parent: QWidget | None = None, *, sampler: NvmlSampler | None = None, autostart: bool = True):
        super().__init__(parent)
        self._owned = sampler is None
        self.sampler = sampler or NvmlSampler()
        self._window_s = self.sampler.window_s or DEFAULT_WINDOW_S
        self._gpu: int | None = None
        self._gpu_chosen_by_hand = False
        self._worker_pid: int | None = None
        self._worker_gpu_found = False
        self._estimated_peak: int | None = None
        self._paged_state: int | None = None
        self._alloc = RollingSeries(("allocated", "reserved", "peak"), self._window_s)
        self._markers: deque[tuple[float, float, str]] = deque(maxlen=MAX_MARKERS)
        # When each step ended (from `step` events), to place a paging event at its step: the worker
        # drains the counters every few seconds, so the event itself can come seconds later.
        self._step_ends: deque[tuple[int, float]] = deque(maxlen=MAX_STEP_TIMES)
        self.paging = PagingSummary()
        self._redraw_pending = False

        self._build()

        self._bridge = _SamplerBridge(self)
        self._bridge.samples.connect(self._on_samples)
        self._bridge.status.connect(self._on_status)
        self.sampler.on_samples.append(self._bridge.samples.emit)
        self.sampler.on_status.append(self._bridge.status.emit)
        self.destroyed.connect(partial(_detach, self.sampler, self._bridge, self._owned))
        self._on_status(self.sampler.status)
        if autostart:
            self.sampler.start()

    # ---- construction ---------------------------------------------------------------------

    def _build(self) -> None:
        self.gpu_status = QLabel()
        self.gpu_status.setObjectName("gpuStatus")
        self.gpu_selector = QComboBox()
        self.gpu_selector.setObjectName("gpuSelector")
        self.gpu_selector.setToolTip("The GPU to show")
        self.gpu_selector.setVisible(False)
        self.gpu_selector.currentIndexChanged.connect(self._on_gpu_selected)
        self.window_selector = QComboBox()
        self.window_selector.setObjectName("windowSelector")
        self.window_selector.setToolTip("How much history the charts keep")
        for seconds, label in WINDOWS:
            self.window_selector.addItem(label, seconds)
        self.window_selector.setCurrentIndex(min(range(len(WINDOWS)), key=lambda i: abs(WINDOWS[i][0] - self._window_s)))
        self.window_selector.currentIndexChanged.connect(self._on_window_selected)
        top = QHBoxLayout()
        top.addWidget(self.gpu_status, 1)
        top.addWidget(self.gpu_selector)
        top.addWidget(QLabel("Window:"))
        top.addWidget(self.window_selector)

        self.gpu_status.setWordWrap(True)
        self.summary = QLabel("–")
        self.summary.setObjectName("monitorSummary")
        self.summary.setWordWrap(True)
        self.summary.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.timeline = pg.PlotWidget(axisItems={"bottom": pg.DateAxisItem(orientation="bottom")})
        self.timeline.setObjectName("monitorTimeline")
        self.timeline.setLabel("left", "GPU memory", units="GiB")
        self.timeline.getPlotItem().getAxis("left").enableAutoSIPrefix(False)
        self.timeline.setMouseEnabled(x=False, y=True)
        self.timeline.showGrid(x=True, y=True, alpha=0.2)
        self.timeline.addLegend(offset=(10, 10))
        self.curves = {
            key: self.timeline.plot(name=name, pen=pg.mkPen(_COLORS[key], width=2), connect="finite")
            for key, name in _CURVES
        }
        self.capacity_line = pg.InfiniteLine(
            angle=0, movable=False, pen=pg.mkPen(_COLORS["capacity"], width=1.5),
            label="capacity", labelOpts={"position": 0.55, "color": _COLORS["capacity"]},
        )
        self.estimate_line = pg.InfiniteLine(
            angle=0, movable=False, pen=pg.mkPen(_COLORS["estimate"], width=1.5, style=Qt.PenStyle.DashLine),
            label="estimated peak", labelOpts={"position": 0.25, "color": _COLORS["estimate"]},
        )
        for line in (self.capacity_line, self.estimate_line):
            line.setVisible(False)
            self.timeline.addItem(line, ignoreBounds=True)
        # Invisible points at 0 and at the capacity, so that the automatic y range shows how full
        # the card is (a person can still zoom; the "A" button brings this view back).
        self._y_bounds = pg.PlotDataItem(pen=pg.mkPen(0, 0, 0, 0))  # transparent; pen=None would not count
        self.timeline.addItem(self._y_bounds)
        self.paging_markers = pg.ScatterPlotItem(
            size=11, symbol="t", pen=pg.mkPen("#7a6200"), brush=pg.mkBrush(_COLORS["paging"]),
            hoverable=True, hoverSize=15, tip=lambda x, y, data: data, name="paging event",
        )
        self.timeline.addItem(self.paging_markers)

        self.sparklines = {
            "util_gpu": _Sparkline("Utilisation", "%", "#4c72b0", "utilSparkline"),
            "temperature_c": _Sparkline("Temperature", "°C", "#c44e52", "temperatureSparkline"),
            "power_w": _Sparkline("Power", "W", "#55a868", "powerSparkline"),
        }
        sparks = QGridLayout()
        for column, spark in enumerate(self.sparklines.values()):
            sparks.addWidget(spark, 0, column)

        self.process_table = QTableWidget(0, 3)
        self.process_table.setObjectName("processTable")
        self.process_table.setHorizontalHeaderLabels(["PID", "Process", "GPU memory"])
        self.paging_status = QLabel("Paging: none")
        self.paging_status.setObjectName("pagingStatus")
        self.paging_table = QTableWidget(0, 6)
        self.paging_table.setObjectName("pagingTable")
        self.paging_table.setHorizontalHeaderLabels(["Time", "Step", "Phase", "In (to GPU)", "Out (to CPU)", "Faults"])
        for table in (self.process_table, self.paging_table):
            table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
            table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
            table.verticalHeader().setVisible(False)
            table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
            table.horizontalHeader().setStretchLastSection(True)
            table.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

        paging_box = QWidget()
        paging_layout = QVBoxLayout(paging_box)
        paging_layout.setContentsMargins(0, 0, 0, 0)
        paging_layout.addWidget(self.paging_status)
        paging_layout.addWidget(self.paging_table)
        process_box = QWidget()
        process_layout = QVBoxLayout(process_box)
        process_layout.setContentsMargins(0, 0, 0, 0)
        process_layout.addWidget(QLabel("Processes on this GPU"))
        process_layout.addWidget(self.process_table)
        tables = QSplitter(Qt.Orientation.Horizontal)
        tables.addWidget(paging_box)
        tables.addWidget(process_box)
        tables.setStretchFactor(0, 3)
        tables.setStretchFactor(1, 2)

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.summary)
        layout.addWidget(self.timeline, 4)
        layout.addLayout(sparks)
        layout.addWidget(tables, 2)

    # ---- the public interface ---------------------------------------------------------------

    def set_worker_pid(self, pid: int | None) -> None:
        """The training worker's process id while a run is going, None after."""
        if pid != self._worker_pid:
            self._worker_gpu_found = False
        self._worker_pid = pid
        self.sampler.worker_pid = pid
        self._schedule_redraw()

    def set_estimated_peak(self, peak: int | None) -> None:
        """The estimator's predicted peak in bytes, drawn dashed; None hides it."""
        self._estimated_peak = int(peak) if peak else None
        self._schedule_redraw()

    def on_event(self, event: dict[str, Any]) -> None:
        """Every event of the worker, as the supervisor receives it."""
        kind = event.get("type")
        t = float(event.get("time") or time.time())
        if kind == "run_started":
            self.reset()
        elif kind == "step":
            self._alloc.add(t, {
                "allocated": event.get("mem_allocated"),
                "reserved": event.get("mem_reserved"),
                "peak": event.get("mem_peak"),
            })
            if event.get("paged_state_bytes"):
                self._paged_state = int(event["paged_state_bytes"])
            step = event.get("step")
            if isinstance(step, int) and (not self._step_ends or step > self._step_ends[-1][0]):
                self._step_ends.append((step, t))
        elif kind == "paging":
            t = self._time_of_step(event.get("step"), t)
            self._add_paging_row(t, event)
            self._markers.append((t, self._marker_height(), describe_paging(event)))
        if self.paging.add(event) or kind in ("run_started", "step"):
            self._show_paging_status()
        if kind in ("run_started", "step", "paging"):
            self._schedule_redraw()

    def _time_of_step(self, step: Any, default: float) -> float:
        """When ``step`` ended, from the nearest `step` event at or after it (step events thin out on
        long runs); ``default`` when no such event has come yet."""
        if not isinstance(step, int) or not self._step_ends or step > self._step_ends[-1][0]:
            return default
        i = bisect.bisect_left(self._step_ends, step, key=lambda pair: pair[0])
        return self._step_ends[i][1]

    def reset(self) -> None:
        """Forget the previous run's allocator figures and paging events (the card's history stays)."""
        self._alloc.clear()
        self._markers.clear()
        self._step_ends.clear()
        self._paged_state = None
        self.paging = PagingSummary()
        self.paging_table.setRowCount(0)
        self._show_paging_status()
        self._schedule_redraw()

    def shutdown(self) -> None:
        """Stop sampling (the application is closing)."""
        _detach(self.sampler, self._bridge, self._owned)

    # ---- sampler feed (GUI thread) --------------------------------------------------------------

    def _on_status(self, status: MonitorStatus) -> None:
        self.gpu_status.setText(status.message)
        gpus = self.sampler.gpus if status.state == "ok" else []
        if status.state == "ok" and self.gpu_selector.count() != len(gpus):
            self.gpu_selector.blockSignals(True)
            self.gpu_selector.clear()
            for gpu in gpus:
                self.gpu_selector.addItem(f"{gpu.index}: {gpu.name}", gpu.index)
            self.gpu_selector.blockSignals(False)
            if self._gpu is None and gpus:
                self._gpu = gpus[0].index
            self.gpu_selector.setCurrentIndex(max(0, self.gpu_selector.findData(self._gpu)))
        self.gpu_selector.setVisible(self.gpu_selector.count() > 1)

    def _on_samples(self, samples: list[GpuSample]) -> None:
        if self._worker_pid is not None and not self._worker_gpu_found and not self._gpu_chosen_by_hand:
            for sample in samples:
                if sample.process(self._worker_pid) is not None:
                    self._worker_gpu_found = True
                    self._select_gpu(sample.index)
                    break
        self._schedule_redraw()

    def _on_gpu_selected(self, row: int) -> None:
        data = self.gpu_selector.itemData(row)
        if data is not None and data != self._gpu:
            self._gpu = int(data)
            self._gpu_chosen_by_hand = True
            self.refresh()

    def _select_gpu(self, index: int) -> None:
        self._gpu = index
        row = self.gpu_selector.findData(index)
        if row >= 0:
            self.gpu_selector.blockSignals(True)
            self.gpu_selector.setCurrentIndex(row)
            self.gpu_selector.blockSignals(False)

    def _on_window_selected(self, row: int) -> None:
        seconds = float(self.window_selector.itemData(row))
        self._window_s = seconds
        self.sampler.window_s = seconds
        self._alloc.window_s = seconds
        self.refresh()

    # ---- paging -------------------------------------------------------------------------

    def _add_paging_row(self, t: float, event: dict[str, Any]) -> None:
        table = self.paging_table
        if table.rowCount() >= MAX_TABLE_ROWS:
            table.removeRow(table.rowCount() - 1)
        table.insertRow(0)  # newest first
        cells = (
            time.strftime("%H:%M:%S", time.localtime(t)),
            str(event.get("step", "")),
            str(event.get("phase", "")),
            fmt_bytes(event.get("bytes_htod") or 0),
            fmt_bytes(event.get("bytes_dtoh") or 0),
            f"{int(event.get('faults') or 0):,}",
        )
        for column, text in enumerate(cells):
            item = QTableWidgetItem(text)
            if column >= 3:
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            table.setItem(0, column, item)

    def _show_paging_status(self) -> None:
        text = self.paging.status_line()
        if self._paged_state:
            text += f"   ·   paged optimizer state {fmt_bytes(self._paged_state)}"
        self.paging_status.setText(text)
        p = self.paging
        details = f"in {fmt_bytes(p.bytes_htod)}, out {fmt_bytes(p.bytes_dtoh)}, {p.faults:,} faults"
        self.paging_status.setToolTip(details if p.events else "")

    def _marker_height(self) -> float:
        """Where a paging marker goes: on torch's reserved curve as it is now, else the card's use (GiB)."""
        reserved = self._alloc.latest("reserved")
        if reserved is not None:
            return reserved / GIB
        if self._gpu is not None:
            sample = self.sampler.latest(self._gpu)
            if sample is not None:
                return sample.used / GIB
        return 0.0

    # ---- drawing --------------------------------------------------------------------------

    def _schedule_redraw(self) -> None:
        """Coalesce bursts of events and samples into at most ten redraws a second."""
        if not self._redraw_pending:
            self._redraw_pending = True
            QTimer.singleShot(100, self._redraw_if_visible)

    def _redraw_if_visible(self) -> None:
        self._redraw_pending = False
        if self.isVisible():
            self.refresh()

    def showEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        super().showEvent(event)
        self.refresh()

    def refresh(self) -> None:
        """Redraw everything from the stores."""
        times, cols = self.sampler.series(self._gpu) if self._gpu is not None else ([], {})
        alloc_times = self._alloc.times()
        latest = [times[-1]] if times else []
        if alloc_times:
            latest.append(alloc_times[-1])
        if self._markers:
            latest.append(self._markers[-1][0])
        now = max(latest) if latest else time.time()
        x_range = (now - self._window_s, now)

        gib = lambda values: [v / GIB for v in values]  # noqa: E731
        self.curves["used"].setData(times, gib(cols.get("used", [])))
        self.curves["worker"].setData(times, gib(cols.get("worker", [])))
        self.curves["reserved"].setData(alloc_times, gib(self._alloc.column("reserved")))
        self.curves["allocated"].setData(alloc_times, gib(self._alloc.column("allocated")))
        shown = [(t, y, tip) for t, y, tip in self._markers if t >= x_range[0]]
        self.paging_markers.setData(
            x=[m[0] for m in shown], y=[m[1] for m in shown], data=[m[2] for m in shown],
        )
        sample = self.sampler.latest(self._gpu) if self._gpu is not None else None
        if sample is not None:
            self.capacity_line.setValue(sample.usable / GIB)
        self.capacity_line.setVisible(sample is not None)
        top = max((sample.usable / GIB) if sample is not None else 0.0, (self._estimated_peak or 0) / GIB)
        self._y_bounds.setData([now, now], [0.0, top * 1.02] if top else [0.0, 0.0])
        if self._estimated_peak:
            self.estimate_line.setValue(self._estimated_peak / GIB)
        self.estimate_line.setVisible(bool(self._estimated_peak))
        self.timeline.setXRange(*x_range, padding=0)
        for key, spark in self.sparklines.items():
            values = cols.get(key, [])
            spark.show_series(times, values, getattr(sample, key) if sample else None, x_range)
        self._show_summary(sample)
        self._show_processes(sample)

    def _show_summary(self, sample: GpuSample | None) -> None:
        parts = []
        if sample is not None:
            parts.append(f"Card: {fmt_bytes(sample.used)} used of {fmt_bytes(sample.usable)}")
            worker = sample.process(self._worker_pid)
            if worker is not None:
                parts.append(f"worker {fmt_bytes(worker.used_bytes)}")
            if sample.pcie_tx_bps is not None and sample.pcie_rx_bps is not None:
                parts.append(f"PCIe out {fmt_bytes(sample.pcie_tx_bps)}/s, in {fmt_bytes(sample.pcie_rx_bps)}/s")
            if sample.util_mem is not None:
                parts.append(f"memory controller {sample.util_mem:.0f}%")
        allocated, reserved, peak = (self._alloc.latest(k) for k in ("allocated", "reserved", "peak"))
        if reserved is not None:
            parts.append(f"torch: allocated {fmt_bytes(allocated)}, reserved {fmt_bytes(reserved)}, peak {fmt_bytes(peak)}")
        if self._estimated_peak:
            parts.append(f"estimated peak {fmt_bytes(self._estimated_peak)}")
        self.summary.setText("   ·   ".join(parts) if parts else "–")

    def _show_processes(self, sample: GpuSample | None) -> None:
        procs = sample.processes if sample is not None else ()
        table = self.process_table
        table.setRowCount(len(procs))
        bold = QFont()
        bold.setBold(True)
        highlight = QBrush(QColor(_COLORS["worker"]).lighter(170))
        for row, proc in enumerate(procs):
            is_worker = proc.pid == self._worker_pid
            name = f"{proc.name}  (training worker)" if is_worker else proc.name
            for column, text in enumerate((str(proc.pid), name, fmt_bytes(proc.used_bytes))):
                item = QTableWidgetItem(text)
                if is_worker:
                    item.setFont(bold)
                    item.setBackground(highlight)
                if column == 2:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                table.setItem(row, column, item)
