"""The Export page's place in the window: what a run has produced that can be exported.

Merging an adapter into its base model and converting to GGUF arrive with the export issue; until
then this page lists a run's final adapter and its checkpoints (with sizes) and opens their folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QComboBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ... import runs

NOTE = (
    "A run's LoRA adapter (adapter/) is a standard PEFT adapter: load it on top of the same base "
    "model with PEFT. Merging it into the base model and GGUF conversion arrive with the export feature."
)


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _size_text(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class ExportPage(QWidget):
    def __init__(self, runs_dir: Path, parent: QWidget | None = None):
        super().__init__(parent)
        self.runs_dir = Path(runs_dir)
        self.run_combo = QComboBox()
        self.run_combo.setObjectName("exportRun")
        self.tree = QTreeWidget()
        self.tree.setObjectName("exportArtifacts")
        self.tree.setHeaderLabels(["Artifact", "Step", "Size", "Folder"])
        self.open_button = QPushButton("Show &folder")
        self.open_button.setObjectName("exportShowFolder")
        note = QLabel(NOTE)
        note.setWordWrap(True)
        note.setObjectName("exportNote")

        row = QHBoxLayout()
        caption = QLabel("&Run:")
        caption.setBuddy(self.run_combo)
        row.addWidget(caption)
        row.addWidget(self.run_combo, 1)
        row.addWidget(self.open_button)
        layout = QVBoxLayout(self)
        layout.addLayout(row)
        layout.addWidget(self.tree, 1)
        layout.addWidget(note)

        self.run_combo.currentIndexChanged.connect(self._show_run)
        self.open_button.clicked.connect(self._open_folder)
        self.tree.itemActivated.connect(lambda item, _col: self._open(Path(item.text(3))))

    def set_runs_dir(self, path: Path) -> None:
        self.runs_dir = Path(path)

    def showEvent(self, event: Any) -> None:  # noqa: N802 - Qt's name
        super().showEvent(event)
        self.refresh()

    def refresh(self, select: Path | None = None) -> None:
        current = select or self.current_run()
        self.run_combo.blockSignals(True)
        self.run_combo.clear()
        root = self.runs_dir
        folders = sorted((p for p in root.iterdir() if (p / runs.EVENTS).exists()), key=lambda p: p.stat().st_mtime,
                         reverse=True) if root.is_dir() else []
        for folder in folders:
            self.run_combo.addItem(folder.name, str(folder))
        if current is not None:
            index = self.run_combo.findData(str(current))
            if index >= 0:
                self.run_combo.setCurrentIndex(index)
        self.run_combo.blockSignals(False)
        self._show_run()

    def current_run(self) -> Path | None:
        data = self.run_combo.currentData()
        return Path(data) if data else None

    def _show_run(self) -> None:
        self.tree.clear()
        run = self.current_run()
        self.open_button.setEnabled(run is not None)
        if run is None:
            return
        adapter = run / runs.ADAPTER
        if adapter.is_dir():
            self._add("Final adapter", "", adapter)
        for step, path in reversed(runs.list_checkpoints(run)):
            self._add("Checkpoint", str(step), path)
        if not self.tree.topLevelItemCount():
            item = QTreeWidgetItem(["Nothing to export yet: no adapter or checkpoint in this run.", "", "", ""])
            item.setFlags(Qt.ItemFlag.NoItemFlags)
            self.tree.addTopLevelItem(item)
        for col in range(3):
            self.tree.resizeColumnToContents(col)

    def _add(self, kind: str, step: str, path: Path) -> None:
        self.tree.addTopLevelItem(QTreeWidgetItem([kind, step, _size_text(folder_size(path)), str(path)]))

    def artifacts(self) -> list[tuple[str, str]]:
        return [(self.tree.topLevelItem(i).text(0), self.tree.topLevelItem(i).text(3))
                for i in range(self.tree.topLevelItemCount())]

    def _open_folder(self) -> None:
        run = self.current_run()
        if run is not None:
            self._open(run)

    def _open(self, path: Path) -> None:
        if path.exists():
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(path)))
