"""The Model page: which model, how its base is quantized, and where the LoRA adapters go.

Before any weights are loaded it shows what the model's ``config.json`` says (read by the torch-free
``engine.modelinfo`` on a background thread, since a hub id means a download) and offers the
model's linear layer names as LoRA targets.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ... import config as cfgmod
from ..estimate_panel import EstimatePanel
from ..help_texts import tip
from ..jobs import LatestOnlyRunner
from ..widgets import BusyIndicator, PathField, add_row, pick_folder, wrap_label

# The ModelInfo facts the page shows, in order, with their labels.
FACTS = (
    ("architecture", "Architecture"),
    ("layers", "Layers"),
    ("hidden_size", "Hidden size"),
    ("intermediate_size", "MLP size"),
    ("heads", "Attention heads"),
    ("kv_heads", "Key/value heads"),
    ("vocab_size", "Vocabulary"),
    ("context_length", "Context length"),
    ("param_count", "Parameters"),
    ("quantizable_params", "Stored in 4 bits"),
    ("unquantized_params", "Kept in compute dtype"),
    ("sliding_window", "Sliding window"),
)
COUNTS = ("param_count", "quantizable_params", "unquantized_params")


def _human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit} ({n:,})"
    return f"{n:,}"


def describe_model(name_or_path: str, revision: str = "main") -> dict[str, Any]:
    """Read a model's config.json (no weights) and describe it. Runs on a background thread:
    a hub id may mean a download."""
    from ...engine import modelinfo  # torch-free

    raw = modelinfo.read_model_config(name_or_path, revision)
    info = modelinfo.describe(raw, where=name_or_path)
    local = Path(name_or_path).expanduser().exists()
    return {
        "info": info,
        "modules": list(modelinfo.linear_module_names(raw)),
        "local": local,
        "cached": None if local else modelinfo.is_cached(name_or_path, revision),
        "config": raw,
    }


def fact_rows(info: Any) -> list[tuple[str, str]]:
    rows = []
    for key, label in FACTS:
        value = getattr(info, key, None)
        if value is None or value == "":
            continue
        if key in COUNTS:
            text = _human_count(int(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            text = f"{value:,}"
        else:
            text = str(value)
        rows.append((label, text))
    return rows


class ModelPage(QWidget):
    changed = Signal()
    demo_requested = Signal()
    source_committed = Signal(str)
    facts_loaded = Signal(object)  # the describe_model() answer, for the VRAM estimate

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self._facts_reader = LatestOnlyRunner(self)
        self._module_boxes: dict[str, QCheckBox] = {}
        self.facts: dict[str, Any] | None = None
        #: (path prefix, note): files under the prefix are still being created (the demo on first
        #: launch); the page shows the note instead of a "not found" error until it is cleared.
        self.waiting_for: tuple[str, str] | None = None

        # --- source
        self.source = PathField("modelSource", "hub id (org/name) or a local model folder", pick_folder)
        self.source.edit.setToolTip(tip("model.name_or_path"))
        self.demo_button = QPushButton("Use &demo model")
        self.demo_button.setObjectName("useDemoModel")
        self.demo_button.setToolTip("The tiny offline demo model: trains in seconds on a CPU, to try the app.")
        self.revision = QLineEdit("main")
        self.trust_remote_code = QCheckBox("Trust remote code")
        self.attn = QComboBox()
        self.attn.addItems(cfgmod.ATTENTION)
        source_box = QGroupBox("Model")
        source_form = QFormLayout(source_box)
        source_row = QWidget()
        row = QHBoxLayout(source_row)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.source, 1)
        row.addWidget(self.demo_button)
        add_row(source_form, "&Model:", source_row)
        add_row(source_form, "Revisio&n:", self.revision, "model.revision")
        add_row(source_form, "Attention:", self.attn, "model.attn_implementation")
        self.trust_remote_code.setToolTip(tip("model.trust_remote_code"))
        source_form.addRow("", self.trust_remote_code)

        # --- facts from config.json
        self.busy = BusyIndicator()
        self.facts_form = QFormLayout()
        self.facts_status = wrap_label("Pick a model to see what its config.json says.", "modelFactsStatus")
        facts_box = QGroupBox("What config.json says")
        facts_layout = QVBoxLayout(facts_box)
        facts_layout.addWidget(self.busy)
        facts_layout.addWidget(self.facts_status)
        facts_layout.addLayout(self.facts_form)
        facts_layout.addStretch(1)

        # --- quantization
        self.quant_type = QComboBox()
        self.quant_type.setObjectName("quantType")
        self.quant_type.addItem("NF4 (4-bit NormalFloat)", "nf4")
        self.quant_type.addItem("FP4 (4-bit float)", "fp4")
        self.double_quant = QCheckBox("Double quantization")
        self.double_quant.setObjectName("doubleQuant")
        self.double_quant.setToolTip(tip("quant.double_quant"))
        self.compute_dtype = QComboBox()
        self.compute_dtype.setObjectName("computeDtype")
        self.compute_dtype.addItems(cfgmod.COMPUTE_DTYPES)
        quant_box = QGroupBox("Quantization of the frozen base")
        quant_form = QFormLayout(quant_box)
        add_row(quant_form, "&Type:", self.quant_type, "quant.quant_type")
        quant_form.addRow("", self.double_quant)
        add_row(quant_form, "&Compute dtype:", self.compute_dtype, "quant.compute_dtype")

        # --- LoRA
        self.lora_r = QSpinBox()
        self.lora_r.setObjectName("loraR")
        self.lora_r.setRange(1, 1024)
        self.lora_alpha = QDoubleSpinBox()
        self.lora_alpha.setObjectName("loraAlpha")
        self.lora_alpha.setRange(0.01, 4096)
        self.lora_alpha.setDecimals(2)
        self.lora_dropout = QDoubleSpinBox()
        self.lora_dropout.setObjectName("loraDropout")
        self.lora_dropout.setRange(0.0, 0.95)
        self.lora_dropout.setSingleStep(0.01)
        self.lora_dropout.setDecimals(3)
        self.all_linear = QCheckBox("All linear layers (recommended)")
        self.all_linear.setObjectName("allLinear")
        self.all_linear.setToolTip(tip("lora.target_modules"))
        self.modules_grid = QGridLayout()
        self.modules_note = wrap_label("The model's linear layers appear here once its config.json is read.")
        lora_box = QGroupBox("LoRA adapters")
        lora_form = QFormLayout(lora_box)
        add_row(lora_form, "Ran&k r:", self.lora_r, "lora.r")
        add_row(lora_form, "&Alpha:", self.lora_alpha, "lora.alpha")
        add_row(lora_form, "Dro&pout:", self.lora_dropout, "lora.dropout")
        targets = QWidget()
        targets_layout = QVBoxLayout(targets)
        targets_layout.setContentsMargins(0, 0, 0, 0)
        targets_layout.addWidget(self.all_linear)
        targets_layout.addLayout(self.modules_grid)
        targets_layout.addWidget(self.modules_note)
        caption = add_row(lora_form, "Target modules:", targets, "lora.target_modules")
        caption.setAlignment(Qt.AlignmentFlag.AlignTop)

        # --- the memory estimate of all pages' settings (filled in by the main window)
        self.estimate = EstimatePanel(name="modelEstimate")
        estimate_box = QGroupBox("GPU memory estimate (these settings, the Dataset and Training pages' too)")
        QVBoxLayout(estimate_box).addWidget(self.estimate)

        # --- layout: a scroll area so the page stays usable at 200% scaling
        body = QWidget()
        grid = QGridLayout(body)
        grid.addWidget(source_box, 0, 0, 1, 2)
        grid.addWidget(facts_box, 1, 0, 2, 1)
        grid.addWidget(quant_box, 1, 1)
        grid.addWidget(lora_box, 2, 1)
        grid.addWidget(estimate_box, 3, 0, 1, 2)
        grid.setColumnStretch(0, 1)
        grid.setColumnStretch(1, 1)
        grid.setRowStretch(4, 1)
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(body)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(scroll)

        # --- behaviour
        self.source.committed.connect(self._source_committed)
        self.demo_button.clicked.connect(self.demo_requested)
        self.all_linear.toggled.connect(self._all_linear_toggled)
        for widget in (self.quant_type, self.compute_dtype, self.attn):
            widget.currentIndexChanged.connect(self.changed)
        for widget in (self.double_quant, self.trust_remote_code, self.all_linear):
            widget.toggled.connect(self.changed)
        for widget in (self.lora_r, self.lora_alpha, self.lora_dropout):
            widget.valueChanged.connect(self.changed)
        self.revision.textChanged.connect(self.changed)

        self.setTabOrder(self.source.edit, self.source.browse_button)
        self.setTabOrder(self.source.browse_button, self.source.recent_button)
        self.setTabOrder(self.source.recent_button, self.demo_button)
        self.setTabOrder(self.demo_button, self.revision)
        self.setTabOrder(self.revision, self.attn)
        self.setTabOrder(self.attn, self.trust_remote_code)
        self.setTabOrder(self.trust_remote_code, self.quant_type)
        self.setTabOrder(self.quant_type, self.double_quant)
        self.setTabOrder(self.double_quant, self.compute_dtype)
        self.setTabOrder(self.compute_dtype, self.lora_r)
        self.setTabOrder(self.lora_r, self.lora_alpha)
        self.setTabOrder(self.lora_alpha, self.lora_dropout)
        self.setTabOrder(self.lora_dropout, self.all_linear)

    # ------------------------------------------------------------------ config in and out

    def apply_config(self, cfg: cfgmod.RunConfig) -> None:
        m, q, lora = cfg.model, cfg.quant, cfg.lora
        self.source.set_text(m.name_or_path)
        self.revision.setText(m.revision)
        self.trust_remote_code.setChecked(m.trust_remote_code)
        self.attn.setCurrentText(m.attn_implementation)
        self.quant_type.setCurrentIndex(max(0, self.quant_type.findData(q.quant_type)))
        self.double_quant.setChecked(q.double_quant)
        self.compute_dtype.setCurrentText(q.compute_dtype)
        self.lora_r.setValue(lora.r)
        self.lora_alpha.setValue(lora.alpha)
        self.lora_dropout.setValue(lora.dropout)
        all_linear = cfgmod.ALL_LINEAR in lora.target_modules
        for name in lora.target_modules:
            if name != cfgmod.ALL_LINEAR:
                self._module_box(name)
        for name, box in self._module_boxes.items():
            box.setChecked(all_linear or name in lora.target_modules)
        self.all_linear.setChecked(all_linear)
        self._all_linear_toggled(all_linear)
        self.refresh_facts()

    def update_config(self, data: dict[str, dict[str, Any]]) -> None:
        data["model"].update(
            name_or_path=self.source.text(),
            revision=self.revision.text().strip() or "main",
            trust_remote_code=self.trust_remote_code.isChecked(),
            attn_implementation=self.attn.currentText(),
        )
        data["quant"].update(
            quant_type=self.quant_type.currentData(),
            double_quant=self.double_quant.isChecked(),
            compute_dtype=self.compute_dtype.currentText(),
        )
        if self.all_linear.isChecked():
            targets = [cfgmod.ALL_LINEAR]
        else:
            targets = [name for name, box in self._module_boxes.items() if box.isChecked()]
        data["lora"].update(
            r=self.lora_r.value(),
            alpha=self.lora_alpha.value(),
            dropout=round(self.lora_dropout.value(), 6),
            target_modules=targets,
        )

    # ------------------------------------------------------------------ model facts

    def set_source(self, text: str) -> None:
        """Set the model programmatically (demo, recent list) and read its facts."""
        self.source.set_text(text)
        self._source_committed(text)

    def _source_committed(self, text: str) -> None:
        self.source_committed.emit(text)
        self.changed.emit()
        self.refresh_facts()

    def refresh_facts(self) -> None:
        source = self.source.text()
        if not source:
            self._facts_reader.cancel()
            self._show_facts_message("Pick a model to see what its config.json says.")
            return
        if self.waiting_for is not None and source.startswith(self.waiting_for[0]):
            self._facts_reader.cancel()
            self._show_facts_message(self.waiting_for[1])
            return
        self.busy.start(f"Reading {source} config.json…")
        self._facts_reader.submit(
            describe_model, source, self.revision.text().strip() or "main",
            on_success=lambda answer, s=source: self._facts_ready(s, answer),
            on_failure=lambda exc, s=source: self._facts_failed(s, exc),
        )

    def _stale(self, source: str) -> bool:
        return source != self.source.text()

    def _facts_ready(self, source: str, answer: dict[str, Any]) -> None:
        if self._stale(source):
            return
        self.busy.stop()
        self.facts = answer
        self._clear_facts()
        for label, text in fact_rows(answer["info"]):
            value = QLabel(text)
            value.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self.facts_form.addRow(f"{label}:", value)
        for note in getattr(answer["info"], "notes", ()):
            self.facts_form.addRow(wrap_label(f"Note: {note}"))
        if answer["local"]:
            where = "Local folder."
        elif answer["cached"]:
            where = "Already in the local Hugging Face cache: no download needed."
        else:
            where = "Not in the local cache yet: the weights are downloaded when training starts."
        self.facts_status.setText(where)
        self._set_modules(answer["modules"])
        self.facts_loaded.emit(answer)

    def _facts_failed(self, source: str, exc: BaseException) -> None:
        if self._stale(source):
            return
        self.facts = None
        self._show_facts_message(f"Cannot read this model's config.json: {exc}")
        self.facts_loaded.emit(None)

    def _show_facts_message(self, text: str) -> None:
        self.busy.stop()
        self._clear_facts()
        self.facts_status.setText(text)

    def _clear_facts(self) -> None:
        while self.facts_form.rowCount():
            self.facts_form.removeRow(0)

    # ------------------------------------------------------------------ target modules

    def _module_box(self, name: str) -> QCheckBox:
        box = self._module_boxes.get(name)
        if box is None:
            box = QCheckBox(name)
            box.setObjectName(f"target_{name}")
            box.setChecked(self.all_linear.isChecked())
            box.setEnabled(not self.all_linear.isChecked())
            box.toggled.connect(self.changed)
            self._module_boxes[name] = box
            self._relayout_modules()
        return box

    def _set_modules(self, names: list[str]) -> None:
        chosen = {n for n, b in self._module_boxes.items() if b.isChecked()}
        for name in list(self._module_boxes):
            if name not in names and name not in chosen:
                self._module_boxes.pop(name).deleteLater()
        for name in names:
            self._module_box(name)
        self._relayout_modules()
        self.modules_note.setVisible(not self._module_boxes)

    def _relayout_modules(self) -> None:
        for box in self._module_boxes.values():
            self.modules_grid.removeWidget(box)
        for i, box in enumerate(self._module_boxes.values()):
            self.modules_grid.addWidget(box, i // 3, i % 3)
        self.modules_note.setVisible(not self._module_boxes)

    def _all_linear_toggled(self, checked: bool) -> None:
        for box in self._module_boxes.values():
            box.setEnabled(not checked)
            if checked:
                box.setChecked(True)

    def shutdown(self) -> None:
        self._facts_reader.shutdown()
