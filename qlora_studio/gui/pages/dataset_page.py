"""The Dataset page: which data, in which format, and what the model will see of it.

Two background passes keep the window responsive:

1. a quick one on a thread (plain Python, local files only): reads the first records, detects the
   format and reports a broken file at once;
2. a scan in a subprocess (:mod:`qlora_studio.gui.dataset_scan`) that loads the model's tokenizer,
   renders records exactly as the worker does (template applied, prompt masked) and measures every
   example's token length for the histogram.

Changing max_seq_len only moves the histogram's line and recounts truncation; no rescan.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ... import config as cfgmod
from ... import formats
from ...errors import UserError
from ..help_texts import tip
from ..jobs import FunctionJob, ProcessJob
from ..widgets import BusyIndicator, PathField, add_row, pick_file, wrap_label

DATA_FILTER = "Datasets (*.jsonl *.json *.csv *.parquet *.txt);;All files (*)"
QUICK_RECORDS = 200
PREVIEW_CHARS = 800  # per segment; the rest is elided in the preview only
SAME_NAME = "(same name)"

MASKED_STYLE = "color:#5f5f5f; background-color:#e6e6e6; font-style:italic;"
LEARNED_STYLE = "color:#0b3d0b; background-color:#c9efc9;"


def quick_check(path: str, fmt: str, columns: dict[str, str]) -> dict[str, Any]:
    """Read the first records of a local file and detect its format (runs on a thread).

    A file that cannot be read raises; a format that cannot be told (or columns that do not fit
    it) comes back as ``error`` with the columns found, so the person can map them.
    """
    records = formats.read_local(Path(path), limit=QUICK_RECORDS)
    keys: list[str] = []
    for record in records:
        keys.extend(k for k in record.data if k not in keys)
    where = str(path)
    try:
        if fmt == "auto":
            detected = formats.detect_format(keys, columns, where)
        else:
            formats.check_columns(keys, fmt, columns, where)
            detected = fmt
    except UserError as exc:
        return {"format": None, "columns": keys, "error": exc.one_line()}
    return {"format": detected, "columns": keys, "error": None}


def segments_html(segments: list[list[Any]]) -> str:
    """Rich text for one rendered example: masked prompt greyed, learned response highlighted."""
    parts = []
    for text, learned in segments:
        shown = text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS] + " …"
        style = LEARNED_STYLE if learned else MASKED_STYLE
        parts.append(f'<span style="{style}">{html.escape(shown)}</span>')
    return f'<div style="white-space:pre-wrap;">{"".join(parts)}</div>'


class DatasetPage(QWidget):
    changed = Signal()
    source_committed = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.model_source = ""
        self.model_revision = "main"
        self.trust_remote_code = False
        self.detected_format: str | None = None
        self.columns: list[str] = []
        self.lengths = np.zeros(0, dtype=np.int64)
        self.error: str | None = None
        self._quick_job: FunctionJob | None = None
        self._scan_job: ProcessJob | None = None
        self._generation = 0  # answers of older requests are ignored
        self._column_boxes: dict[str, QComboBox] = {}
        self._mapping_from_config: dict[str, str] = {}
        #: (path prefix, note): see ModelPage.waiting_for.
        self.waiting_for: tuple[str, str] | None = None
        self._loading = False

        # --- source and format
        placeholder = "a .jsonl/.json/.csv/.parquet/.txt file or a hub dataset id"
        self.source = PathField("datasetSource", placeholder, pick_file(DATA_FILTER))
        self.source.edit.setToolTip(tip("data.path"))
        self.split = QLineEdit("train")
        self.split.setObjectName("datasetSplit")
        self.format = QComboBox()
        self.format.setObjectName("datasetFormat")
        self.format.addItem("Detect automatically", "auto")
        for fmt in cfgmod.DATA_FORMATS[1:]:
            self.format.addItem(fmt, fmt)
        self.detected = QLabel("–")
        self.detected.setObjectName("detectedFormat")
        self.columns_form = QFormLayout()
        source_box = QGroupBox("Dataset")
        form = QFormLayout(source_box)
        add_row(form, "&Dataset:", self.source)
        add_row(form, "Hub s&plit:", self.split, "data.split")
        add_row(form, "For&mat:", self.format, "data.format")
        add_row(form, "Detected:", self.detected)
        form.addRow(QLabel("Column mapping:"))
        form.addRow(self.columns_form)

        # --- length and split settings
        self.max_seq_len = QSpinBox()
        self.max_seq_len.setObjectName("maxSeqLen")
        self.max_seq_len.setRange(8, 1_048_576)
        self.max_seq_len.setSingleStep(64)
        self.train_on_prompt = QCheckBox("Also learn the prompt")
        self.train_on_prompt.setObjectName("trainOnPrompt")
        self.train_on_prompt.setToolTip(tip("data.train_on_prompt"))
        self.val_fraction = QDoubleSpinBox()
        self.val_fraction.setObjectName("valFraction")
        self.val_fraction.setRange(0.0, 0.5)
        self.val_fraction.setSingleStep(0.01)
        self.val_fraction.setDecimals(3)
        self.val_path = PathField("valPath", "optional separate validation file", pick_file(DATA_FILTER))
        self.val_path.edit.setToolTip(tip("data.val_path"))
        self.shuffle_seed = QSpinBox()
        self.shuffle_seed.setObjectName("shuffleSeed")
        self.shuffle_seed.setRange(0, 2**31 - 1)
        split_box = QGroupBox("Length and validation split")
        split_form = QFormLayout(split_box)
        add_row(split_form, "Max &sequence length:", self.max_seq_len, "data.max_seq_len")
        split_form.addRow("", self.train_on_prompt)
        add_row(split_form, "Val&idation fraction:", self.val_fraction, "data.val_fraction")
        add_row(split_form, "Validation fi&le:", self.val_path)
        add_row(split_form, "Shuffle s&eed:", self.shuffle_seed, "data.shuffle_seed")

        # --- status
        self.busy = BusyIndicator()
        self.error_label = wrap_label("", "datasetError")
        self.error_label.setStyleSheet("color:#a00000; font-weight:bold;")
        self.error_label.hide()
        self.scan_note = wrap_label("", "scanNote")

        # --- preview
        self.preview = QTableWidget(0, 3)
        self.preview.setObjectName("previewTable")
        self.preview.setHorizontalHeaderLabels(["Record", "As the model sees it", "Tokens"])
        self.preview.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        self.preview.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.preview.horizontalHeader().setSectionResizeMode(2, QHeaderView.ResizeMode.ResizeToContents)
        self.preview.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.preview.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.preview.setWordWrap(True)
        legend = QLabel(
            f'<span style="{MASKED_STYLE}">&nbsp;prompt: masked, not learned&nbsp;</span>&nbsp;&nbsp;'
            f'<span style="{LEARNED_STYLE}">&nbsp;response: learned&nbsp;</span>'
        )
        legend.setObjectName("previewLegend")
        self.template_label = QLabel()
        self.template_label.setObjectName("templateLabel")

        # --- histogram
        self.histogram = pg.PlotWidget(title="Tokens per example")
        self.histogram.setObjectName("lengthHistogram")
        self.histogram.setBackground("w")
        self.histogram.getPlotItem().setLabel("bottom", "tokens")
        self.histogram.getPlotItem().setLabel("left", "examples")
        self.histogram.setMinimumHeight(150)
        self._bars: pg.BarGraphItem | None = None
        self.limit_line = pg.InfiniteLine(angle=90, movable=False, pen=pg.mkPen((200, 30, 30), width=2),
                                          label="max_seq_len", labelOpts={"position": 0.9, "color": (200, 30, 30)})
        self.limit_line.setObjectName("maxSeqLenLine")
        self.histogram.addItem(self.limit_line)
        self.truncated_label = wrap_label("", "truncatedLabel")

        # --- layout
        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 0, 0)
        left_layout.addWidget(source_box)
        left_layout.addWidget(split_box)
        left_layout.addStretch(1)
        right = QSplitter(Qt.Orientation.Vertical)
        preview_box = QWidget()
        preview_layout = QVBoxLayout(preview_box)
        preview_layout.setContentsMargins(0, 0, 0, 0)
        top = QHBoxLayout()
        top.addWidget(legend)
        top.addStretch(1)
        top.addWidget(self.template_label)
        preview_layout.addLayout(top)
        preview_layout.addWidget(self.preview)
        hist_box = QWidget()
        hist_layout = QVBoxLayout(hist_box)
        hist_layout.setContentsMargins(0, 0, 0, 0)
        hist_layout.addWidget(self.histogram)
        hist_layout.addWidget(self.truncated_label)
        right.addWidget(preview_box)
        right.addWidget(hist_box)
        right.setStretchFactor(0, 3)
        right.setStretchFactor(1, 2)
        body = QSplitter(Qt.Orientation.Horizontal)
        body.addWidget(left)
        body.addWidget(right)
        body.setStretchFactor(0, 2)
        body.setStretchFactor(1, 3)
        outer = QVBoxLayout(self)
        outer.addWidget(self.busy)
        outer.addWidget(self.error_label)
        outer.addWidget(self.scan_note)
        outer.addWidget(body, 1)

        # --- behaviour
        self._rescan_timer = QTimer(self)
        self._rescan_timer.setSingleShot(True)
        self._rescan_timer.setInterval(300)
        self._rescan_timer.timeout.connect(self.rescan)
        self.source.committed.connect(self._source_committed)
        self.format.currentIndexChanged.connect(self._format_changed)
        self.split.editingFinished.connect(self._schedule_rescan)
        self.train_on_prompt.toggled.connect(self._schedule_rescan)
        self.max_seq_len.valueChanged.connect(self._update_truncation)
        for signal in (self.max_seq_len.valueChanged, self.val_fraction.valueChanged, self.shuffle_seed.valueChanged,
                       self.train_on_prompt.toggled, self.split.textChanged, self.val_path.edit.textChanged):
            signal.connect(self.changed)

    # ------------------------------------------------------------------ config in and out

    def apply_config(self, cfg: cfgmod.RunConfig) -> None:
        d = cfg.data
        self._loading = True
        try:
            self.source.set_text(d.path)
            self.split.setText(d.split)
            self.format.setCurrentIndex(max(0, self.format.findData(d.format)))
            self.max_seq_len.setValue(d.max_seq_len)
            self.train_on_prompt.setChecked(d.train_on_prompt)
            self.val_fraction.setValue(d.val_fraction)
            self.val_path.set_text(d.val_path)
            self.shuffle_seed.setValue(d.shuffle_seed)
            self._mapping_from_config = dict(d.columns)
            self._rebuild_column_boxes()
        finally:
            self._loading = False
        self.rescan()

    def update_config(self, data: dict[str, dict[str, Any]]) -> None:
        data["data"].update(
            path=self.source.text(),
            format=self.format.currentData(),
            columns=self.mapping(),
            split=self.split.text().strip() or "train",
            max_seq_len=self.max_seq_len.value(),
            train_on_prompt=self.train_on_prompt.isChecked(),
            val_fraction=round(self.val_fraction.value(), 6),
            val_path=self.val_path.text(),
            shuffle_seed=self.shuffle_seed.value(),
        )

    def mapping(self) -> dict[str, str]:
        """data.columns: the roles whose column is not the one of the same name."""
        # Roles loaded from a configuration but not shown (the format is not known yet) are kept.
        result = {r: c for r, c in self._mapping_from_config.items() if r not in self._column_boxes}
        for role, box in self._column_boxes.items():
            column = box.currentText()
            if column and column != SAME_NAME and column != role:
                result[role] = column
        return result

    def set_model(self, source: str, revision: str = "main", trust_remote_code: bool = False) -> None:
        """The tokenizer for the preview and the lengths comes from the chosen model."""
        if (source, revision, trust_remote_code) != (self.model_source, self.model_revision, self.trust_remote_code):
            self.model_source, self.model_revision, self.trust_remote_code = source, revision, trust_remote_code
            self._schedule_rescan()

    def set_source(self, text: str) -> None:
        self.source.set_text(text)
        self._source_committed(text)

    # ------------------------------------------------------------------ scanning

    def _source_committed(self, text: str) -> None:
        # A new dataset has its own columns: forget the old mapping.
        self._mapping_from_config = {}
        self._clear_column_boxes()
        self.source_committed.emit(text)
        self.changed.emit()
        self.rescan()

    def _format_changed(self) -> None:
        if self._loading:
            return
        self._rebuild_column_boxes()
        self.changed.emit()
        self._schedule_rescan()

    def _schedule_rescan(self) -> None:
        if not self._loading:
            self._rescan_timer.start()

    def rescan(self) -> None:
        """Start the quick check and the tokenizer scan for the current settings."""
        self._rescan_timer.stop()
        self._generation += 1
        generation = self._generation
        self._cancel_scan()
        path = self.source.text()
        waiting = self.waiting_for is not None and path.startswith(self.waiting_for[0])
        if not path or waiting:
            self._show_error(None)
            self._set_preview([])
            self._set_lengths([])
            self.scan_note.setText(self.waiting_for[1] if waiting else "Pick a dataset file or type a hub dataset id.")
            return
        fmt = self.format.currentData()
        mapping = self.mapping()
        if formats.looks_local(path):
            job = FunctionJob(quick_check, path, fmt, mapping, parent=self)
            job.succeeded.connect(lambda answer, g=generation: self._quick_done(g, answer))
            job.failed.connect(lambda exc, g=generation: self._quick_failed(g, exc))
            job.finished.connect(job.deleteLater)
            self._quick_job = job
            job.start()
        request = {
            "path": path,
            "format": fmt,
            "columns": mapping,
            "split": self.split.text().strip() or "train",
            "max_seq_len": self.max_seq_len.value(),
            "train_on_prompt": self.train_on_prompt.isChecked(),
            "model": self.model_source,
            "revision": self.model_revision,
            "trust_remote_code": self.trust_remote_code,
        }
        scan = ProcessJob("qlora_studio.gui.dataset_scan", request, parent=self)
        scan.succeeded.connect(lambda answer, g=generation: self._scan_done(g, answer))
        scan.failed.connect(lambda reason, g=generation: self._scan_failed(g, reason))
        self._scan_job = scan
        self.busy.start("Reading and tokenizing the dataset…")
        scan.start()

    def _cancel_scan(self) -> None:
        if self._scan_job is not None:
            self._scan_job.cancel()
            self._scan_job.deleteLater()
            self._scan_job = None

    def _quick_done(self, generation: int, answer: dict[str, Any]) -> None:
        if generation != self._generation:
            return
        self._show_error(answer["error"])
        self._set_detected(answer["format"], answer["columns"])

    def _quick_failed(self, generation: int, exc: BaseException) -> None:
        if generation != self._generation:
            return
        self._show_error(exc.one_line() if isinstance(exc, UserError) else f"Cannot read the dataset: {exc}")
        if isinstance(exc, UserError):
            self._cancel_scan()  # the scan would report the same error, seconds later
            self.busy.stop()
            self._set_preview([])
            self._set_lengths([])

    def _scan_done(self, generation: int, answer: dict[str, Any]) -> None:
        if generation != self._generation:
            return
        self.busy.stop()
        self._scan_job = None
        error = answer.get("error")
        if error:
            self._show_error(UserError(error["what"], error.get("where"), error.get("fix")).one_line())
            if answer.get("columns"):
                self._set_detected(None, answer["columns"])
            self._set_preview([])
            self._set_lengths([])
            return
        self._show_error(None)
        self._set_detected(answer["format"], answer.get("columns", []))
        self._set_preview(answer["rows"])
        self._set_lengths(answer.get("lengths", []))
        read = f"{answer.get('examples', 0):,} examples read"
        notes = [read + (" (the first ones of a larger dataset)" if answer.get("limited") else "")]
        if answer.get("tokenizer_error"):
            notes.append(f"token lengths need the model's tokenizer: {answer['tokenizer_error']}")
        self.scan_note.setText("; ".join(notes) + ".")
        self.template_label.setText(f"Rendered with the {answer.get('template', 'default template')}")

    def _scan_failed(self, generation: int, reason: str) -> None:
        if generation != self._generation:
            return
        self.busy.stop()
        self._scan_job = None
        self.scan_note.setText(f"The dataset scan failed: {reason}")

    # ------------------------------------------------------------------ display

    def _show_error(self, text: str | None) -> None:
        self.error = text
        self.error_label.setText(text or "")
        self.error_label.setVisible(bool(text))

    def _set_detected(self, fmt: str | None, columns: list[str]) -> None:
        self.detected_format = fmt
        self.columns = list(columns)
        chosen = self.format.currentData()
        if fmt is None:
            self.detected.setText("unknown: pick a format and map the columns")
        else:
            self.detected.setText(fmt if chosen == "auto" else f"{fmt} (chosen)")
        self._rebuild_column_boxes()

    def _rebuild_column_boxes(self) -> None:
        """One drop-down per role of the format in use, listing the dataset's columns."""
        previous = self.mapping()
        self._clear_column_boxes()
        fmt = self.format.currentData()
        if fmt == "auto":
            fmt = self.detected_format
        if not fmt:
            return
        required, optional = formats.FORMAT_COLUMNS[fmt]
        for role in required + optional:
            box = QComboBox()
            box.setObjectName(f"column_{role}")
            box.addItem(SAME_NAME)
            box.addItems([c for c in self.columns if c != role])
            current = previous.get(role)
            if current:
                if box.findText(current) < 0:
                    box.addItem(current)
                box.setCurrentText(current)
            box.setToolTip(f"The dataset column that holds the {role}{'' if role in required else ' (optional)'}.")
            box.currentIndexChanged.connect(self._mapping_changed)
            self._column_boxes[role] = box
            caption = QLabel(f"{role}:" if role in required else f"{role} (optional):")
            caption.setBuddy(box)
            self.columns_form.addRow(caption, box)

    def _clear_column_boxes(self) -> None:
        while self.columns_form.rowCount():
            self.columns_form.removeRow(0)
        self._column_boxes = {}

    def _mapping_changed(self) -> None:
        self.changed.emit()
        self._schedule_rescan()

    def _set_preview(self, rows: list[dict[str, Any]]) -> None:
        self.preview.setRowCount(0)
        self.preview.setRowCount(len(rows))
        for i, row in enumerate(rows):
            self.preview.setItem(i, 0, QTableWidgetItem(row["where"].rsplit(", ", 1)[-1]))
            label = QLabel(segments_html(row["segments"]))
            label.setTextFormat(Qt.TextFormat.RichText)
            label.setWordWrap(True)
            label.setMargin(4)
            label.setProperty("plainText", "".join(text for text, _ in row["segments"]))
            self.preview.setCellWidget(i, 1, label)
            tokens = row.get("tokens")
            learned = row.get("learned_tokens")
            text = "–" if tokens is None else f"{tokens} ({learned} learned)"
            self.preview.setItem(i, 2, QTableWidgetItem(text))
        self.preview.resizeRowsToContents()

    def _set_lengths(self, lengths: list[int]) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self._bars is not None:
            self.histogram.removeItem(self._bars)
            self._bars = None
        if self.lengths.size:
            bins = min(40, max(5, int(np.sqrt(self.lengths.size))))
            counts, edges = np.histogram(self.lengths, bins=bins)
            self._bars = pg.BarGraphItem(x0=edges[:-1], x1=edges[1:], height=counts, brush=(90, 130, 200), pen=(60, 90, 150))
            self.histogram.addItem(self._bars)
        self._update_truncation()

    def _update_truncation(self) -> None:
        limit = self.max_seq_len.value()
        self.limit_line.setValue(limit)
        if not self.lengths.size:
            self.truncated_label.setText("")
            return
        over = int((self.lengths > limit).sum())
        total = int(self.lengths.size)
        longest = int(self.lengths.max())
        if over:
            self.truncated_label.setText(
                f"{over:,} of {total:,} examples are longer than {limit:,} tokens and will be truncated (longest: {longest:,})."
            )
        else:
            self.truncated_label.setText(f"All {total:,} examples fit in {limit:,} tokens (longest: {longest:,}).")

    def truncated_count(self) -> int:
        return int((self.lengths > self.max_seq_len.value()).sum()) if self.lengths.size else 0

    def busy_jobs(self) -> bool:
        return bool(self._scan_job is not None and self._scan_job.isRunning())

    def shutdown(self) -> None:
        self._rescan_timer.stop()
        self._cancel_scan()
        if self._quick_job is not None:
            try:
                self._quick_job.wait(3000)
            except RuntimeError:
                pass
