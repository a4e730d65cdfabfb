"""The Runs page: every run in the runs folder, its charts, a comparison of loss curves, resume, delete.

Run folders are the source of truth (``runs.py`` reads them without torch); reading many
``events.jsonl`` files can take a moment, so the list is read on a background thread.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QAbstractItemView,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMessageBox,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ... import events as ev
from ... import runs
from ..charts import TrainingCharts
from ..jobs import LatestOnlyRunner
from .training_page import format_duration

COLUMNS = ("Status", "Run", "Model", "Dataset", "Steps", "Final loss", "Duration", "Started at")
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]
STATUS_TEXT = {
    "running": "running", "finished": "finished", "stopped": "stopped", "failed": "failed",
    "interrupted": "interrupted", "created": "created",
}


def _short(path: str) -> str:
    """The last part of a path or hub id, for a narrow table column."""
    return Path(path).name or path if path else ""


class RunChartsWindow(QWidget):
    """A finished (or running) run's charts in their own window, read from its events.jsonl."""

    def __init__(self, run_dir: Path, parent: QWidget | None = None):
        super().__init__(parent, Qt.WindowType.Window)
        self.setWindowTitle(f"{run_dir.name} — QLoRA Studio")
        self.setObjectName("runChartsWindow")
        self.charts = TrainingCharts(loss_object_name="runLossPlot")
        layout = QVBoxLayout(self)
        layout.addWidget(QLabel(str(run_dir)))
        layout.addWidget(self.charts)
        self.resize(900, 600)
        self.charts.load_events(ev.read(run_dir / runs.EVENTS))


class RunsPage(QWidget):
    resume_requested = Signal(object)  # Path of the run folder
    run_deleted = Signal(object)
    run_selected = Signal(object)  # Path: one run was chosen (the Playground and Export pages follow)
    listed = Signal()  # a (background) listing has refreshed ``summaries``

    def __init__(self, runs_dir: Path, parent: QWidget | None = None):
        super().__init__(parent)
        self.runs_dir = Path(runs_dir)
        self.summaries: list[runs.RunSummary] = []
        self.active_run: Path | None = None  # the run this window supervises now
        self._lister = LatestOnlyRunner(self)
        self._chart_windows: list[RunChartsWindow] = []
        self._chosen: Path | None = None  # the one selected run last announced by run_selected

        self.folder_label = QLabel()
        self.folder_label.setObjectName("runsFolder")
        self.folder_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setObjectName("runsTable")
        self.table.setHorizontalHeaderLabels(list(COLUMNS))
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().hide()
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)

        self.refresh_button = QPushButton("Refre&sh")
        self.charts_button = QPushButton("Open &charts")
        self.charts_button.setObjectName("openChartsButton")
        self.resume_button = QPushButton("Resu&me")
        self.resume_button.setObjectName("runsResumeButton")
        self.stop_button = QPushButton("Sto&p")
        self.stop_button.setObjectName("runsStopButton")
        self.stop_button.setToolTip("Ask a run that trains without this window to stop after its current step "
                                    "(the Training page follows the newest such run, and stops it there).")
        self.folder_button = QPushButton("Show f&older")
        self.delete_button = QPushButton("&Delete…")
        self.delete_button.setObjectName("deleteRunButton")
        buttons = QHBoxLayout()
        for button in (self.refresh_button, self.charts_button, self.resume_button, self.stop_button,
                       self.folder_button, self.delete_button):
            buttons.addWidget(button)
        buttons.addStretch(1)

        self.overlay = pg.PlotWidget(title="Training loss of the selected runs")
        self.overlay.setObjectName("runsOverlay")
        self.overlay.setBackground("w")
        self.overlay.getPlotItem().showGrid(x=True, y=True, alpha=0.25)
        self.overlay.getPlotItem().setLabel("bottom", "step")
        self.overlay.getPlotItem().setLabel("left", "loss")
        self.overlay.getPlotItem().setDownsampling(auto=True, mode="mean")
        self.overlay.getPlotItem().setClipToView(True)
        self.legend = self.overlay.addLegend(offset=(-10, 10))
        self.overlay_hint = QLabel("Select one or more runs (Ctrl or Shift + click) to compare their loss curves.")

        top = QWidget()
        top_layout = QVBoxLayout(top)
        top_layout.setContentsMargins(0, 0, 0, 0)
        top_layout.addWidget(self.folder_label)
        top_layout.addWidget(self.table)
        top_layout.addLayout(buttons)
        bottom = QWidget()
        bottom_layout = QVBoxLayout(bottom)
        bottom_layout.setContentsMargins(0, 0, 0, 0)
        bottom_layout.addWidget(self.overlay_hint)
        bottom_layout.addWidget(self.overlay)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(top)
        split.addWidget(bottom)
        layout = QVBoxLayout(self)
        layout.addWidget(split)

        self.refresh_button.clicked.connect(self.refresh)
        self.charts_button.clicked.connect(self.open_charts)
        self.resume_button.clicked.connect(self._resume)
        self.stop_button.clicked.connect(self._stop_detached)
        self.folder_button.clicked.connect(self._show_folder)
        self.delete_button.clicked.connect(self.delete_selected)
        self.table.itemSelectionChanged.connect(self._selection_changed)
        self.table.doubleClicked.connect(lambda _: self.open_charts())
        self.set_runs_dir(self.runs_dir)
        self._selection_changed()

    # ------------------------------------------------------------------ listing

    def set_runs_dir(self, path: Path) -> None:
        self.runs_dir = Path(path)
        self.folder_label.setText(f"Runs folder: {self.runs_dir}")

    def showEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        super().showEvent(event)
        self.refresh()

    def refresh(self) -> None:
        self._lister.submit(runs.list_runs, self.runs_dir, on_success=self._listed, on_failure=self._list_failed)

    def _list_failed(self, exc: BaseException) -> None:
        """The folder could not be read (permissions, a disk gone): said beside it, the list kept as it was."""
        self.folder_label.setText(f"Runs folder: {self.runs_dir} — could not be read ({exc})")
        self.listed.emit()

    def _listed(self, summaries: list[runs.RunSummary]) -> None:
        self.folder_label.setText(f"Runs folder: {self.runs_dir}")
        selected = {s.path for s in self.selected()}
        self.summaries = summaries
        self.table.blockSignals(True)
        self.table.setRowCount(len(summaries))
        for row, s in enumerate(summaries):
            steps = f"{s.step} / {s.max_steps}" if s.max_steps else str(s.step)
            values = (
                STATUS_TEXT.get(s.status, s.status),
                s.path.name,
                _short(s.model),
                _short(s.dataset),
                steps,
                "" if s.final_loss is None else f"{s.final_loss:.4f}",
                "" if s.duration_s is None else format_duration(s.duration_s),
                "" if s.started_at is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.started_at)),
            )
            for col, text in enumerate(values):
                item = QTableWidgetItem(text)
                if col == 0 and s.message:
                    item.setToolTip(s.message)
                if col in (2, 3):
                    item.setToolTip(s.model if col == 2 else s.dataset)
                self.table.setItem(row, col, item)
            if s.path in selected:
                self.table.selectRow(row)
        self.table.blockSignals(False)
        self._selection_changed()
        self.listed.emit()

    # ------------------------------------------------------------------ selection

    def selected(self) -> list[runs.RunSummary]:
        rows = sorted({index.row() for index in self.table.selectionModel().selectedRows()})
        return [self.summaries[r] for r in rows if r < len(self.summaries)]

    def select_run(self, path: Path) -> None:
        for row, s in enumerate(self.summaries):
            if s.path == path:
                self.table.selectRow(row)
                return

    def _selection_changed(self) -> None:
        chosen = self.selected()
        one = chosen[0] if len(chosen) == 1 else None
        if one is not None and one.path != self._chosen:
            self.run_selected.emit(one.path)
        self._chosen = one.path if one is not None else None
        self.charts_button.setEnabled(one is not None)
        self.folder_button.setEnabled(one is not None)
        self.resume_button.setEnabled(one is not None and one.resumable and self.active_run is None)
        self.stop_button.setEnabled(one is not None and one.status == "running" and one.path != self.active_run)
        self.delete_button.setEnabled(bool(chosen) and all(s.status != "running" for s in chosen))
        self._draw_overlay(chosen)

    def _draw_overlay(self, chosen: list[runs.RunSummary]) -> None:
        plot = self.overlay.getPlotItem()
        plot.clear()
        self.legend.clear()
        for i, s in enumerate(chosen):
            if not s.losses:
                continue
            steps, losses = zip(*s.losses, strict=True)
            plot.plot(list(steps), list(losses), pen=pg.mkPen(PALETTE[i % len(PALETTE)], width=2), name=s.path.name)
        self.overlay_hint.setVisible(not chosen)

    def overlay_curve_count(self) -> int:
        return len(self.overlay.getPlotItem().listDataItems())

    # ------------------------------------------------------------------ actions

    def open_charts(self) -> RunChartsWindow | None:
        chosen = self.selected()
        if len(chosen) != 1:
            return None
        window = RunChartsWindow(chosen[0].path, self)
        self._chart_windows = [w for w in self._chart_windows if w.isVisible()] + [window]
        window.show()
        return window

    def _resume(self) -> None:
        chosen = self.selected()
        if len(chosen) == 1 and chosen[0].resumable:
            self.resume_requested.emit(chosen[0].path)

    def _stop_detached(self) -> None:
        chosen = self.selected()
        if len(chosen) == 1 and chosen[0].status == "running":
            (chosen[0].path / runs.STOP).touch()
            self.refresh()

    def _show_folder(self) -> None:
        chosen = self.selected()
        if len(chosen) == 1:
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(chosen[0].path)))

    def confirm(self, title: str, text: str) -> bool:
        """Ask a yes/no question (tests replace this to answer without a dialog)."""
        answer = QMessageBox.question(self, title, text, QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def delete_selected(self) -> list[Path]:
        chosen = [s for s in self.selected() if s.status != "running" and s.path != self.active_run]
        if not chosen:
            return []
        names = "\n".join(f"  {s.path.name} ({s.status})" for s in chosen)
        question = (f"Delete {len(chosen)} run folder(s) with their checkpoints and adapters?\n\n{names}\n\n"
                    "This cannot be undone.")
        if not self.confirm("Delete runs", question):
            return []
        deleted = []
        for s in chosen:
            shutil.rmtree(s.path, ignore_errors=True)
            if not s.path.exists():
                deleted.append(s.path)
                self.run_deleted.emit(s.path)
        self.refresh()
        return deleted

    def set_active_run(self, path: Path | None) -> None:
        self.active_run = path
        self._selection_changed()

    def shutdown(self) -> None:
        for window in self._chart_windows:
            window.close()
        self._lister.shutdown()
