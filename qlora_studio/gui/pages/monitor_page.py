"""The GPU monitor page: VRAM timeline, paging events and the card's vital signs.

First version: the worker's allocator figures and paging events on a timeline and in a table.
The NVML sampler feed follows.
"""

from __future__ import annotations

import time
from typing import Any

import pyqtgraph as pg
from PySide6.QtWidgets import QLabel, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget

MIB = 1024 * 1024


class MonitorPage(QWidget):
    """Shows where GPU memory goes while a run trains."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._t0 = time.time()
        self._worker_pid: int | None = None
        self._estimated_peak: int | None = None
        self._paging: list[dict[str, Any]] = []
        self._alloc: list[tuple[float, float]] = []
        self._reserved: list[tuple[float, float]] = []

        self.timeline = pg.PlotWidget()
        self.timeline.setObjectName("monitorTimeline")
        self.timeline.setLabel("left", "MiB")
        self.timeline.setLabel("bottom", "seconds")
        self._alloc_curve = self.timeline.plot(name="allocated")
        self._reserved_curve = self.timeline.plot(name="reserved")

        self.paging_status = QLabel("Paging: none")
        self.paging_status.setObjectName("pagingStatus")
        self.paging_table = QTableWidget(0, 4)
        self.paging_table.setObjectName("pagingTable")
        self.paging_table.setHorizontalHeaderLabels(["step", "phase", "in / out (MiB)", "faults"])

        layout = QVBoxLayout(self)
        layout.addWidget(self.timeline, 3)
        layout.addWidget(self.paging_status)
        layout.addWidget(self.paging_table, 1)

    def set_worker_pid(self, pid: int | None) -> None:
        self._worker_pid = pid

    def set_estimated_peak(self, peak: int | None) -> None:
        self._estimated_peak = peak

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        t = float(event.get("time", time.time())) - self._t0
        if kind == "step":
            self._alloc.append((t, event.get("mem_allocated", 0) / MIB))
            self._reserved.append((t, event.get("mem_reserved", 0) / MIB))
            self._alloc_curve.setData(*zip(*self._alloc))
            self._reserved_curve.setData(*zip(*self._reserved))
        elif kind == "paging":
            self._paging.append(event)
            row = self.paging_table.rowCount()
            self.paging_table.insertRow(row)
            moved = f"{event.get('bytes_htod', 0) / MIB:.1f} / {event.get('bytes_dtoh', 0) / MIB:.1f}"
            for col, text in enumerate((event.get("step"), event.get("phase"), moved, event.get("faults"))):
                self.paging_table.setItem(row, col, QTableWidgetItem(str(text)))
            total = sum(e.get("bytes_htod", 0) + e.get("bytes_dtoh", 0) for e in self._paging)
            self.paging_status.setText(f"{len(self._paging)} events, {total / MIB:.0f} MiB moved")
