"""The Export page: a run's adapter as a PEFT adapter, a merged 16-bit model, or GGUF files.

The export runs in a worker process (``python -m qlora_studio.engine.export.cli ... --progress-json``)
whose JSON progress lines drive the progress bar, so the window never waits and Cancel can end it;
the exporter's atomic writes mean a cancelled export leaves no folder behind. This module imports
no torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QTreeWidget,
    QTreeWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ... import runs
from ...engine.export import GGUF_DTYPES, default_out_for
from .playground_page import JsonLinesProcess

WORKER = "qlora_studio.engine.export.cli"

FORMAT_TEXT = {
    "adapter": ("PEFT &adapter", ("The LoRA adapter as PEFT saves it (small), with a model card and the run's "
                                  "config.toml. Load it on top of the same base model.")),
    "merged": ("&Merged model", ("The adapter merged into the base model's 16-bit weights: a complete Hugging Face "
                                 "model folder that loads without PEFT (as large as the base).")),
    "gguf": ("&GGUF (llama.cpp, Ollama)", ("The merged model as one GGUF file and the adapter as a GGUF LoRA adapter, "
                                           "with an Ollama Modelfile. Llama, Mistral and Qwen2 models.")),
}
MERGE_BASE_TEXT = {
    "original": "original 16-bit weights (best quality)",
    "dequantized": "dequantized NF4 weights (exactly the trained model)",
}


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class ExportPage(QWidget):
    """``set_run(run_dir)`` selects the run; ``set_runs_dir`` / ``refresh`` keep the run list current.

    For the main window's earlier placeholder, ``ExportPage(runs_dir)`` is accepted as well.
    """

    #: The export finished: its folder.
    exported = Signal(Path)
    #: The export failed or was cancelled: one line.
    failed = Signal(str)

    def __init__(self, parent: QWidget | Path | str | None = None, runs_dir: Path | str | None = None):
        if isinstance(parent, (str, Path)):
            parent, runs_dir = None, parent
        super().__init__(parent)
        self.runs_dir = Path(runs_dir) if runs_dir else None
        self.worker: JsonLinesProcess | None = None
        self.out_edited = False
        self.last_out: Path | None = None
        self._error = ""
        self._cancelled = False

        self.run_combo = QComboBox()
        self.run_combo.setObjectName("exportRun")
        self.tree = QTreeWidget()
        self.tree.setObjectName("exportArtifacts")
        self.tree.setHeaderLabels(["Adapter", "Step", "Size", "Folder"])
        self.tree.setRootIsDecorated(False)
        self.tree.setMaximumHeight(150)

        self.format_group = QButtonGroup(self)
        self.format_buttons: dict[str, QRadioButton] = {}
        formats_box = QVBoxLayout()
        for index, (fmt, (title, help_text)) in enumerate(FORMAT_TEXT.items()):
            button = QRadioButton(title)
            button.setObjectName(f"exportFormat_{fmt}")
            button.setToolTip(help_text)
            self.format_group.addButton(button, index)
            self.format_buttons[fmt] = button
            formats_box.addWidget(button)
        self.format_buttons["adapter"].setChecked(True)
        self.format_help = QLabel()
        self.format_help.setWordWrap(True)
        self.format_help.setObjectName("exportFormatHelp")

        self.merge_base = QComboBox()
        self.merge_base.setObjectName("exportMergeBase")
        for key, text in MERGE_BASE_TEXT.items():
            self.merge_base.addItem(text, key)
        self.merge_base.setToolTip("The adapter was trained against the 4-bit weights. Merging into the original "
                                   "16-bit weights keeps the base at full precision; merging into the dequantized "
                                   "4-bit weights reproduces the trained model exactly.")
        self.gguf_dtype = QComboBox()
        self.gguf_dtype.setObjectName("exportGgufDtype")
        for dtype in GGUF_DTYPES:
            self.gguf_dtype.addItem(dtype, dtype)
        self.gguf_dtype.setToolTip("f16: the usual choice; bf16: the range of the training dtype; "
                                   "q8_0: 8-bit, half the size, a little less precise.")
        self.with_base = QCheckBox("Also write the base model as GGUF (to use with the GGUF adapter)")
        self.with_base.setObjectName("exportWithBase")
        self.card_paths = QCheckBox("Keep local folder paths in the model card")
        self.card_paths.setObjectName("exportCardPaths")

        self.out_edit = QLineEdit()
        self.out_edit.setObjectName("exportOut")
        self.browse = QPushButton("&Browse…")
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(self.browse)

        options = QFormLayout()
        options.addRow("Format:", formats_box)
        options.addRow("", self.format_help)
        options.addRow("Merge into:", self.merge_base)
        options.addRow("GGUF weights:", self.gguf_dtype)
        options.addRow("", self.with_base)
        options.addRow("", self.card_paths)
        options.addRow("&Output folder:", out_row)

        self.export_button = QPushButton("&Export")
        self.export_button.setObjectName("exportStart")
        self.cancel_button = QPushButton("&Cancel")
        self.cancel_button.setObjectName("exportCancel")
        self.cancel_button.setEnabled(False)
        self.open_button = QPushButton("Show &folder")
        self.open_button.setObjectName("exportShowFolder")
        self.progress = QProgressBar()
        self.progress.setObjectName("exportProgress")
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress.setTextVisible(False)
        self.status = QLabel("")
        self.status.setObjectName("exportStatus")
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        run_row = QHBoxLayout()
        caption = QLabel("&Run:")
        caption.setBuddy(self.run_combo)
        run_row.addWidget(caption)
        run_row.addWidget(self.run_combo, 1)
        buttons = QHBoxLayout()
        buttons.addWidget(self.export_button)
        buttons.addWidget(self.cancel_button)
        buttons.addStretch(1)
        buttons.addWidget(self.open_button)
        layout = QVBoxLayout(self)
        layout.addLayout(run_row)
        layout.addWidget(self.tree)
        layout.addLayout(options)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.run_combo.currentIndexChanged.connect(self._show_run)
        self.tree.currentItemChanged.connect(lambda *_: self._update_out())
        self.format_group.idClicked.connect(lambda _id: self._format_changed())
        self.gguf_dtype.currentIndexChanged.connect(lambda _i: self._update_out())
        self.out_edit.textEdited.connect(self._out_edited)
        self.browse.clicked.connect(self._browse)
        self.export_button.clicked.connect(self.start_export)
        self.cancel_button.clicked.connect(self.cancel)
        self.open_button.clicked.connect(self._open_folder)
        self.tree.itemActivated.connect(lambda item, _col: self._open(Path(item.text(3))))
        self._format_changed()

    # -- the run and what to export -----------------------------------------------------------

    def set_runs_dir(self, path: Path) -> None:
        self.runs_dir = Path(path)
        self.refresh()

    def set_run(self, run_dir: Path | None) -> None:
        self.refresh(select=Path(run_dir) if run_dir else None)

    def showEvent(self, event: Any) -> None:
        super().showEvent(event)
        self.refresh()

    def refresh(self, select: Path | None = None) -> None:
        current = select or self.current_run()
        folders: list[Path] = []
        if self.runs_dir is not None and self.runs_dir.is_dir():
            folders = sorted((p for p in self.runs_dir.iterdir() if (p / runs.EVENTS).exists() or (p / runs.CONFIG).exists()),
                             key=lambda p: p.stat().st_mtime, reverse=True)
        if current is not None and current not in folders and current.is_dir():
            folders.insert(0, current)
        self.run_combo.blockSignals(True)
        self.run_combo.clear()
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

    def current_checkpoint(self) -> int | None:
        item = self.tree.currentItem()
        return int(item.text(1)) if item is not None and item.text(1) else None

    def fmt(self) -> str:
        return next(fmt for fmt, button in self.format_buttons.items() if button.isChecked())

    def select_format(self, fmt: str) -> None:
        self.format_buttons[fmt].setChecked(True)
        self._format_changed()

    def artifacts(self) -> list[tuple[str, str]]:
        """``(kind, folder)`` of each exportable adapter of the current run."""
        return [(self.tree.topLevelItem(i).text(0), self.tree.topLevelItem(i).text(3))
                for i in range(self.tree.topLevelItemCount()) if self.tree.topLevelItem(i).text(3)]

    def _show_run(self) -> None:
        self.tree.clear()
        run = self.current_run()
        if run is not None:
            if (run / runs.ADAPTER).is_dir():
                self._add("Final adapter", "", run / runs.ADAPTER)
            for step, path in reversed(runs.list_checkpoints(run)):
                self._add("Checkpoint", str(step), path / runs.ADAPTER)
        if self.tree.topLevelItemCount():
            self.tree.setCurrentItem(self.tree.topLevelItem(0))
        else:
            text = "Nothing to export yet: no adapter or checkpoint in this run." if run else "No run yet."
            item = QTreeWidgetItem([text, "", "", ""])
            item.setFlags(Qt.ItemFlag.NoItemFlags)
            self.tree.addTopLevelItem(item)
        for col in range(3):
            self.tree.resizeColumnToContents(col)
        self.out_edited = False
        self._update_out()
        self._update_buttons()

    def _add(self, kind: str, step: str, path: Path) -> None:
        size = _size_text(folder_size(path)) if path.is_dir() else ""
        self.tree.addTopLevelItem(QTreeWidgetItem([kind, step, size, str(path)]))

    def _format_changed(self) -> None:
        fmt = self.fmt()
        self.format_help.setText(FORMAT_TEXT[fmt][1])
        self.merge_base.setEnabled(fmt in ("merged", "gguf"))
        self.gguf_dtype.setEnabled(fmt == "gguf")
        self.with_base.setEnabled(fmt == "gguf")
        self._update_out()

    def default_out(self) -> Path | None:
        run = self.current_run()
        if run is None:
            return None
        return default_out_for(run, self.fmt(), self.gguf_dtype.currentData(), self.current_checkpoint())

    def _update_out(self) -> None:
        if not self.out_edited:
            default = self.default_out()
            self.out_edit.setText(str(default) if default else "")

    def _out_edited(self, text: str) -> None:
        self.out_edited = bool(text.strip())

    def _browse(self) -> None:
        start = self.out_edit.text() or str(self.current_run() or Path.home())
        folder = QFileDialog.getExistingDirectory(self, "Export into which folder?", str(Path(start).parent))
        if folder:
            name = Path(self.out_edit.text()).name or self.fmt()
            self.out_edit.setText(str(Path(folder) / name))
            self.out_edited = True

    def _update_buttons(self) -> None:
        running = self.worker is not None and self.worker.isRunning()
        self.export_button.setEnabled(not running and bool(self.artifacts()))
        self.cancel_button.setEnabled(running)
        self.run_combo.setEnabled(not running)
        self.open_button.setEnabled(self.current_run() is not None)

    # -- running the export -------------------------------------------------------------------

    def confirm(self, title: str, text: str) -> bool:
        """Asked before replacing an existing folder (tests replace this)."""
        answer = QMessageBox.question(self, title, text, QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
                                      QMessageBox.StandardButton.No)
        return answer == QMessageBox.StandardButton.Yes

    def command(self, out: Path, overwrite: bool) -> list[str]:
        run = self.current_run()
        args = [str(run), "--format", self.fmt(), "--out", str(out), "--progress-json",
                "--merge-base", self.merge_base.currentData(), "--gguf-dtype", self.gguf_dtype.currentData()]
        if self.current_checkpoint() is not None:
            args += ["--checkpoint", str(self.current_checkpoint())]
        if overwrite:
            args.append("--overwrite")
        if self.with_base.isChecked() and self.fmt() == "gguf":
            args.append("--with-base-gguf")
        if self.card_paths.isChecked():
            args.append("--card-paths")
        return args

    def start_export(self) -> bool:
        """Start the export; False if nothing was started (no run, or the person kept the old folder)."""
        if self.current_run() is None or (self.worker is not None and self.worker.isRunning()):
            return False
        text = self.out_edit.text().strip()
        out = Path(text).expanduser() if text else self.default_out()
        if out is None:
            return False
        overwrite = False
        if out.exists():
            if not self.confirm("Replace the folder?", f"{out} already exists. Replace it with this export?"):
                self.status.setText("Export not started: the folder exists.")
                return False
            overwrite = True
        self.last_out = out
        self._error, self._cancelled = "", False
        self.progress.setValue(0)
        self.status.setText("Starting…")
        self.worker = JsonLinesProcess(self)
        self.worker.event.connect(self._on_event)
        self.worker.exited.connect(self._on_exit)
        self.worker.start(WORKER, self.command(out, overwrite))
        self._update_buttons()
        return True

    def cancel(self) -> None:
        if self.worker is not None and self.worker.isRunning():
            self._cancelled = True
            self.status.setText("Cancelling…")
            self.worker.terminate()

    def shutdown(self) -> None:
        """End a running export (the window calls this when it closes); its partial folder is removed."""
        if self.worker is not None and self.worker.isRunning():
            self._cancelled = True
            self.worker.terminate()
            if not self.worker.process.waitForFinished(10000):
                self.worker.kill()

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "progress":
            self.progress.setValue(int(1000 * float(event.get("fraction", 0))))
            self.status.setText(str(event.get("message", "")))
        elif kind == "done":
            self.last_out = Path(event["out"])
        elif kind == "error":
            self._error = str(event.get("message", ""))

    def _on_exit(self, code: int, stderr_tail: str) -> None:
        self._update_buttons()
        if code == 0 and self.last_out is not None and self.last_out.is_dir():
            self.progress.setValue(1000)
            self.status.setText(f"Exported to {self.last_out}")
            self.exported.emit(self.last_out)
            self._show_run()
            return
        self.progress.setValue(0)
        if self._cancelled:
            message = "Export cancelled; nothing was written."
        else:
            reason = self._error or (stderr_tail.splitlines()[-1] if stderr_tail else f"exit code {code}")
            message = f"Export failed: {reason}"
        self.status.setText(message)
        self.failed.emit(message)

    def _open_folder(self) -> None:
        target = self.last_out if self.last_out is not None and self.last_out.is_dir() else self.current_run()
        if target is not None:
            self._open(target)

    def _open(self, path: Path) -> None:
        if path.exists():
            QDesktopServices.openUrl(QUrl.fromLocalFile(str(path)))
