"""The Training page: hyperparameters and presets, Start/Stop/Resume, progress, live charts, log.

The page only shows and edits; the main window owns the run (the supervisor) and feeds this page
the worker's events through :meth:`on_event` and its standard error through :meth:`append_log`.
"""

from __future__ import annotations

import math
import time
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSpinBox,
    QSplitter,
    QVBoxLayout,
    QWidget,
)

from ... import config as cfgmod
from .. import presets
from ..charts import TrainingCharts
from ..estimate_panel import EstimatePanel
from ..help_texts import tip
from ..widgets import add_row, wrap_label

LOG_LINES = 2000  # the log pane keeps the newest lines (bounded memory); train.log in the run folder has them all


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _num(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "–"


class Progress:
    """Steps done, steps planned and an ETA from the wall-clock rate since the first step seen.

    The rate restarts with each ``run_started``: a resumed run's history (replayed when the window
    re-attaches to it) must not count the time the run was stopped as training time.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total = 0
        self.step = 0
        self._first: tuple[float, int] | None = None
        self._last_time: float | None = None

    def on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "run_started":
            self.total = int((event.get("plan") or {}).get("max_steps") or 0)
            self._first = None
        elif kind == "step":
            self.step = int(event.get("step", self.step))
            now = float(event.get("time") or time.time())
            if self._first is None:
                self._first = (now, self.step)
            self._last_time = now

    def eta_s(self) -> float | None:
        if self._first is None or self._last_time is None or not self.total:
            return None
        t0, s0 = self._first
        done = self.step - s0
        if done <= 0 or self._last_time <= t0:
            return None
        per_step = (self._last_time - t0) / done
        return max(0.0, (self.total - self.step) * per_step)


class TrainingPage(QWidget):
    start_requested = Signal()
    stop_requested = Signal()
    resume_requested = Signal()
    preset_chosen = Signal(str)
    changed = Signal()

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.progress_state = Progress()
        self._progress_timer = QTimer(self)
        self._progress_timer.setSingleShot(True)
        self._progress_timer.setInterval(100)
        self._progress_timer.timeout.connect(self.show_progress)

        # --- presets and controls
        self.preset = QComboBox()
        self.preset.setObjectName("presetCombo")
        self.preset.addItems(list(presets.PRESETS) + [presets.CUSTOM])
        self.preset.setToolTip(tip("app.preset"))
        self.start_button = QPushButton("&Start")
        self.start_button.setObjectName("startButton")
        self.start_button.setToolTip("Start a new run with the settings of all pages (F5).")
        self.stop_button = QPushButton("S&top")
        self.stop_button.setObjectName("stopButton")
        self.stop_button.setToolTip("Ask the run to stop after the current step and save a checkpoint (Shift+F5).")
        self.stop_button.setEnabled(False)
        self.resume_button = QPushButton("Resu&me")
        self.resume_button.setObjectName("resumeButton")
        self.resume_button.setToolTip("Continue the last stopped or interrupted run from its latest checkpoint.")
        self.resume_button.setEnabled(False)
        self.grace = QSpinBox()
        self.grace.setObjectName("stopGrace")
        self.grace.setRange(1, 3600)
        self.grace.setSuffix(" s")
        self.grace.setValue(60)
        self.grace.setToolTip(tip("app.stop_grace_s"))

        controls = QHBoxLayout()
        preset_label = QLabel("&Preset:")
        preset_label.setBuddy(self.preset)
        controls.addWidget(preset_label)
        controls.addWidget(self.preset)
        controls.addSpacing(16)
        controls.addWidget(self.start_button)
        controls.addWidget(self.stop_button)
        controls.addWidget(self.resume_button)
        controls.addStretch(1)
        grace_label = QLabel("Stop &grace period:")
        grace_label.setBuddy(self.grace)
        grace_label.setToolTip(tip("app.stop_grace_s"))
        controls.addWidget(grace_label)
        controls.addWidget(self.grace)

        self.progress = QProgressBar()
        self.progress.setObjectName("progressBar")
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("No run yet")
        self.eta = QLabel("")
        self.eta.setObjectName("etaLabel")
        self.status = wrap_label("Ready.", "runStatus")
        progress_row = QHBoxLayout()
        progress_row.addWidget(self.progress, 1)
        progress_row.addWidget(self.eta)

        # --- hyperparameters
        self.fields: dict[str, QWidget] = {}
        form_box = QGroupBox("Hyperparameters")
        form = QFormLayout(form_box)
        self._int(form, "micro_batch_size", "Micro &batch size:", 1, 4096)
        self._int(form, "grad_accum_steps", "Gradient &accumulation:", 1, 4096)
        self._int(form, "max_steps", "Ma&x steps:", 0, 10_000_000)
        self._float(form, "epochs", "Epochs:", 0.0, 1000.0, 2, 0.5)
        self._float(form, "learning_rate", "&Learning rate:", 1e-8, 1.0, 6, 1e-5)
        self._combo(form, "schedule", "Sch&edule:", cfgmod.SCHEDULES)
        self._int(form, "warmup_steps", "&Warmup steps:", 0, 1_000_000)
        self._combo(form, "optimizer", "&Optimizer:", cfgmod.OPTIMIZERS)
        self._float(form, "weight_decay", "Weight decay:", 0.0, 10.0, 4, 0.01)
        self._float(form, "max_grad_norm", "Max gradient &norm:", 0.0, 1000.0, 3, 0.1)
        self._check(form, "gradient_checkpointing", "Gradient checkpointing")
        self._check(form, "offload_checkpoints", "Checkpoints wait in CPU memory (GPU)")
        self._check(form, "embeddings_on_cpu", "Input embedding in CPU memory (GPU)")
        self._check(form, "fused_kernels", "Fused kernels, with liger-kernel (GPU)")
        self._check(form, "fused_optimizer", "Fused paged AdamW")
        self._check(form, "cuda_graphs", "Layers replayed as CUDA graphs (GPU)")
        self._check(form, "paging_counters", "Paging counters for the GPU Monitor")
        self._int(form, "eval_every", "Evaluate ever&y:", 0, 1_000_000)
        self._int(form, "checkpoint_every", "&Checkpoint every:", 0, 1_000_000)
        self._int(form, "keep_checkpoints", "&Keep checkpoints:", 1, 1000)
        self._int(form, "log_every", "Log every:", 0, 1_000_000)
        self.fields["log_every"].setSpecialValueText("auto")
        self._int(form, "seed", "Seed:", 0, 2**31 - 1)
        self._combo(form, "device", "&Device:", cfgmod.DEVICES)
        self.run_name = QLineEdit()
        self.run_name.setObjectName("runName")
        self.run_name.setPlaceholderText("date and time")
        add_row(form, "R&un name:", self.run_name, "output.run_name")
        # The main window fills it in (computed off the GUI thread); its headline is ``vramEstimateVerdict``.
        self.estimate = EstimatePanel(name="vramEstimate")
        estimate_box = QGroupBox("GPU memory estimate")
        QVBoxLayout(estimate_box).addWidget(self.estimate)
        left = QWidget()
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 0, 0)
        left_layout.addWidget(form_box)
        left_layout.addWidget(estimate_box)
        left_layout.addStretch(1)
        form_scroll = QScrollArea()
        form_scroll.setWidgetResizable(True)
        form_scroll.setWidget(left)
        form_scroll.setMinimumWidth(360)

        # --- charts and log
        self.charts = TrainingCharts()
        self.log = QPlainTextEdit()
        self.log.setObjectName("logView")
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(LOG_LINES)
        self.log.setLineWrapMode(QPlainTextEdit.LineWrapMode.NoWrap)
        self.log.setPlaceholderText("The worker's output appears here.")
        right = QSplitter(Qt.Orientation.Vertical)
        right.addWidget(self.charts)
        right.addWidget(self.log)
        right.setStretchFactor(0, 3)
        right.setStretchFactor(1, 1)
        body = QSplitter(Qt.Orientation.Horizontal)
        body.addWidget(form_scroll)
        body.addWidget(right)
        body.setStretchFactor(0, 1)
        body.setStretchFactor(1, 3)
        body.setSizes([400, 1000])
        self.splitters = (body, right)

        outer = QVBoxLayout(self)
        outer.addLayout(controls)
        outer.addLayout(progress_row)
        outer.addWidget(self.status)
        outer.addWidget(body, 1)

        # --- behaviour
        self.start_button.clicked.connect(self.start_requested)
        self.stop_button.clicked.connect(self.stop_requested)
        self.resume_button.clicked.connect(self.resume_requested)
        self.preset.activated.connect(self._preset_activated)
        self.run_name.textChanged.connect(self.changed)

        order = [self.preset, self.start_button, self.stop_button, self.resume_button, self.grace]
        order += list(self.fields.values()) + [self.run_name, self.log]
        for a, b in zip(order, order[1:], strict=False):
            self.setTabOrder(a, b)

    # ------------------------------------------------------------------ form helpers

    def _register(self, form: QFormLayout, key: str, label: str, widget: QWidget) -> None:
        widget.setObjectName(f"train_{key}")
        self.fields[key] = widget
        add_row(form, label, widget, f"train.{key}")

    def _int(self, form: QFormLayout, key: str, label: str, low: int, high: int) -> None:
        box = QSpinBox()
        box.setRange(low, high)
        box.valueChanged.connect(self.changed)
        self._register(form, key, label, box)

    def _float(self, form: QFormLayout, key: str, label: str, low: float, high: float, decimals: int, step: float) -> None:
        box = QDoubleSpinBox()
        box.setDecimals(decimals)
        box.setRange(low, high)
        box.setSingleStep(step)
        box.valueChanged.connect(self.changed)
        self._register(form, key, label, box)

    def _combo(self, form: QFormLayout, key: str, label: str, choices: tuple[str, ...]) -> None:
        box = QComboBox()
        box.addItems(list(choices))
        box.currentIndexChanged.connect(self.changed)
        self._register(form, key, label, box)

    def _check(self, form: QFormLayout, key: str, label: str) -> None:
        box = QCheckBox(label)
        box.setObjectName(f"train_{key}")
        box.setToolTip(tip(f"train.{key}"))
        box.toggled.connect(self.changed)
        self.fields[key] = box
        form.addRow("", box)

    # ------------------------------------------------------------------ config in and out

    def apply_config(self, cfg: cfgmod.RunConfig) -> None:
        values = cfg.to_dict()["train"]
        for key, widget in self.fields.items():
            value = values[key]
            if isinstance(widget, QCheckBox):
                widget.setChecked(bool(value))
            elif isinstance(widget, QComboBox):
                widget.setCurrentText(str(value))
            elif isinstance(widget, QDoubleSpinBox):
                if value < widget.minimum():
                    widget.setMinimum(value)
                widget.setValue(float(value))
            else:
                widget.setValue(int(value))
        self.run_name.setText(cfg.output.run_name)

    def update_config(self, data: dict[str, dict[str, Any]]) -> None:
        train = data["train"]
        for key, widget in self.fields.items():
            if isinstance(widget, QCheckBox):
                train[key] = widget.isChecked()
            elif isinstance(widget, QComboBox):
                train[key] = widget.currentText()
            elif isinstance(widget, QDoubleSpinBox):
                # A spin box rounds to its decimals; keep the stored value when the box shows it.
                stored = train.get(key)
                shown = widget.value()
                if isinstance(stored, (int, float)) and math.isclose(round(stored, widget.decimals()), shown):
                    train[key] = float(stored)
                else:
                    train[key] = shown
            else:
                train[key] = widget.value()
        data["output"]["run_name"] = self.run_name.text().strip()

    def show_preset(self, name: str) -> None:
        self.preset.setCurrentText(name)

    def _preset_activated(self, index: int) -> None:
        name = self.preset.itemText(index)
        if name != presets.CUSTOM:
            self.preset_chosen.emit(name)

    # ------------------------------------------------------------------ run display

    def set_running(self, running: bool, *, stopping: bool = False) -> None:
        self.start_button.setEnabled(not running)
        self.stop_button.setEnabled(running and not stopping)
        self.preset.setEnabled(not running)
        if running:
            self.resume_button.setEnabled(False)

    def begin_run(self, description: str) -> None:
        self.charts.clear()
        self.progress_state.reset()
        self.progress.setRange(0, 1)
        self.progress.setValue(0)
        self.progress.setFormat("%v / %m steps")
        self.eta.setText("")
        self.status.setText(description)
        self.append_log(f"— {description}")

    def on_event(self, event: dict[str, Any]) -> None:
        self.charts.on_event(event)
        self.progress_state.on_event(event)
        kind = event.get("type")
        if kind == "run_started":
            total = self.progress_state.total
            self.progress.setRange(0, max(1, total))
            device = event.get("device") or {}
            model = event.get("model") or {}
            self.append_log(
                f"Run started in {event.get('run_dir', '?')}: {model.get('name') or model.get('architecture') or 'model'} "
                f"on {device.get('name') or device.get('kind') or 'device'}, {total} steps planned."
            )
            self.status.setText("Training…")
        elif kind == "data_ready":
            self.append_log(
                f"Data: {event.get('train_examples')} training and {event.get('val_examples')} validation examples "
                f"({event.get('format')}), {event.get('truncated')} truncated at {event.get('max_seq_len')} tokens."
            )
        elif kind == "step":
            if not self._progress_timer.isActive():
                self._progress_timer.start()  # a burst of steps updates the bar once
        elif kind == "eval":
            self.append_log(
                f"Evaluation at step {event.get('step')}: loss {_num(event.get('loss'), '.4f')}, "
                f"perplexity {_num(event.get('perplexity'), '.2f')}"
            )
        elif kind == "checkpoint":
            self.append_log(f"Checkpoint saved at step {event.get('step')}: {event.get('path')}")
            self.status.setText(f"Training… checkpoint saved at step {event.get('step')}.")
        elif kind == "oom_recovered":
            self.append_log(
                f"Out of GPU memory at step {event.get('step')}: continuing with micro batch {event.get('micro_batch_size')} "
                f"× {event.get('grad_accum_steps')} accumulation steps (same effective batch)."
            )
        elif kind == "log":
            self.append_log(f"[{event.get('level', 'info')}] {event.get('message', '')}")
        elif kind == "finished":
            self._progress_timer.stop()
            step = int(event.get("step") or self.progress_state.step)
            self.progress.setMaximum(max(1, step))
            self.progress.setValue(step)
            self.eta.setText("")
        elif kind == "failed":
            self.append_log(f"Failed ({event.get('kind')}): {event.get('message')}")

    def show_progress(self) -> None:
        step = self.progress_state.step
        if step > self.progress.maximum():
            self.progress.setMaximum(step)
        self.progress.setValue(step)
        eta = self.progress_state.eta_s()
        self.eta.setText("" if eta is None else f"ETA {format_duration(eta)}")

    def append_log(self, line: str) -> None:
        self.log.appendPlainText(line)

    def end_run(self, message: str) -> None:
        if self._progress_timer.isActive():
            self._progress_timer.stop()
            self.show_progress()
        self.status.setText(message)
        self.eta.setText("")
        self.append_log(f"— {message}")
        self.charts.flush()
