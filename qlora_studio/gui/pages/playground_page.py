"""The Playground page: the base model and the fine-tuned model answer the same prompt side by side.

Generation runs in a worker process (``python -m qlora_studio.engine.playground``, see its
docstring for the protocol) that loads the model once and keeps it while the page lives; this
module imports no torch. Tokens stream into the two panes as the worker reports them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from PySide6.QtCore import (
    QCoreApplication,
    QObject,
    QProcess,
    QProcessEnvironment,
    Signal,
)
from PySide6.QtGui import QTextCursor
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ... import config as config_mod
from ... import formats, runs
from ...errors import UserError
from ..jobs import python_env, register

WORKER = "qlora_studio.engine.playground"
SIDE_TITLES = {"base": "Base model (adapter off)", "tuned": "Fine-tuned (base + adapter)"}
EXAMPLES = 8


class JsonLinesProcess(QObject):
    """A ``python -m module`` worker that talks JSON lines: ``send(dict)`` writes one request to its
    standard input, each line it prints on standard output arrives as ``event(dict)``, and
    ``exited(code, stderr_tail)`` fires when it ends. Registered with ``jobs`` so a closing window
    and the tests can see it running."""

    event = Signal(dict)
    exited = Signal(int, str)

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self.process = QProcess(self)
        env = QProcessEnvironment()
        for key, value in python_env().items():
            env.insert(key, value)
        self.process.setProcessEnvironment(env)
        self.process.readyReadStandardOutput.connect(self._read_stdout)
        self.process.readyReadStandardError.connect(self._read_stderr)
        self.process.finished.connect(self._finished)
        self.process.errorOccurred.connect(self._error)
        self._buffer = b""
        self._stderr: list[str] = []
        app = QCoreApplication.instance()
        if app is not None:
            app.aboutToQuit.connect(self.kill)

    def start(self, module: str, args: list[str] | None = None) -> None:
        self._buffer, self._stderr = b"", []
        register(self)
        self.process.start(sys.executable, ["-m", module, *(args or [])])

    def isRunning(self) -> bool:
        return self.process.state() != QProcess.ProcessState.NotRunning

    def send(self, request: dict[str, Any]) -> None:
        self.process.write((json.dumps(request) + "\n").encode("utf-8"))

    def terminate(self) -> None:
        """Ask it to end (SIGTERM: an export removes its partial folder on the way out)."""
        if self.isRunning():
            self.process.terminate()

    def kill(self, wait_ms: int = 5000) -> None:
        if self.isRunning():
            self.process.kill()
            self.process.waitForFinished(wait_ms)

    def stderr_tail(self) -> str:
        return "\n".join(self._stderr[-5:])

    def _read_stdout(self) -> None:
        self._buffer += bytes(self.process.readAllStandardOutput().data())
        *lines, self._buffer = self._buffer.split(b"\n")
        for raw in lines:
            try:
                event = json.loads(raw.decode("utf-8", "replace"))
            except json.JSONDecodeError:
                continue
            if isinstance(event, dict):
                self.event.emit(event)

    def _read_stderr(self) -> None:
        text = bytes(self.process.readAllStandardError().data()).decode("utf-8", "replace")
        self._stderr = (self._stderr + [line for line in text.splitlines() if line.strip()])[-50:]

    def _error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            self.exited.emit(-1, f"could not start {sys.executable}: {self.process.errorString()}")

    def _finished(self, code: int, status: QProcess.ExitStatus) -> None:
        self._read_stdout()
        self._read_stderr()
        self.exited.emit(code if status == QProcess.ExitStatus.NormalExit else -1, self.stderr_tail())


def example_prompts(run_dir: Path | None, limit: int = EXAMPLES) -> list[str]:
    """The first user messages of the run's training data: the questions the adapter has learned."""
    if run_dir is None or not (run_dir / runs.CONFIG).is_file():
        return []
    try:
        cfg = config_mod.load(run_dir / runs.CONFIG)
        records = formats.read_local(cfg.data.path, limit=50)
        fmt = cfg.data.format if cfg.data.format != "auto" else formats.detect_format(records[0].data.keys(), cfg.data.columns)
        prompts = []
        for record in records:
            if fmt in ("alpaca", "chat", "sharegpt"):
                messages = formats.to_messages(record.data, fmt, cfg.data.columns, record.where)
                text = next((m["content"] for m in messages if m["role"] == "user"), "")
            elif fmt == "prompt_completion":
                text = str(record.data.get(cfg.data.columns.get("prompt", "prompt"), ""))
            else:
                continue
            if text.strip() and text not in prompts:
                prompts.append(text)
            if len(prompts) >= limit:
                break
        return prompts
    except (UserError, OSError, IndexError, ValueError):
        return []


class AnswerPane(QGroupBox):
    """One side's streamed answer and a line saying how it ended."""

    def __init__(self, side: str, parent: QWidget | None = None):
        super().__init__(SIDE_TITLES[side], parent)
        self.text = QPlainTextEdit()
        self.text.setReadOnly(True)
        self.text.setObjectName(f"playground_{side}_answer")
        self.status = QLabel("")
        self.status.setObjectName(f"playground_{side}_status")
        layout = QVBoxLayout(self)
        layout.addWidget(self.text, 1)
        layout.addWidget(self.status)

    def clear(self) -> None:
        self.text.clear()
        self.status.setText("generating…")

    def append(self, text: str) -> None:
        cursor = self.text.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        cursor.insertText(text)
        self.text.setTextCursor(cursor)
        self.text.ensureCursorVisible()


class PlaygroundPage(QWidget):
    """``set_run(run_dir)`` picks the run whose adapter is compared with its base model."""

    #: A generation ended (both sides done or an error): the request id.
    generation_finished = Signal(str)
    #: An error from the worker, as one line.
    failed = Signal(str)

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.run_dir: Path | None = None
        self.adapter_dir: Path | None = None
        self.worker: JsonLinesProcess | None = None
        self.loaded_key: tuple[str, int | None] | None = None
        self.request_id = 0
        self.active: str | None = None
        self.last_done: dict[str, dict[str, Any]] = {}

        self.source_label = QLabel("No run selected.")
        self.source_label.setObjectName("playgroundSource")
        self.source_label.setWordWrap(True)
        self.checkpoint_combo = QComboBox()
        self.checkpoint_combo.setObjectName("playgroundCheckpoint")
        self.adapter_button = QPushButton("Adapter &folder…")
        self.adapter_button.setToolTip("Compare any PEFT adapter folder with the base model it names.")
        top = QHBoxLayout()
        top.addWidget(self.source_label, 1)
        top.addWidget(QLabel("Adapter:"))
        top.addWidget(self.checkpoint_combo)
        top.addWidget(self.adapter_button)

        self.examples = QComboBox()
        self.examples.setObjectName("playgroundExamples")
        self.examples.setToolTip("Prompts from the run's training data: what the adapter has learned.")
        self.prompt = QPlainTextEdit()
        self.prompt.setObjectName("playgroundPrompt")
        self.prompt.setPlaceholderText("Type a prompt. It is wrapped in the model's chat template, as in training.")
        self.prompt.setMaximumHeight(110)
        self.system = QLineEdit()
        self.system.setObjectName("playgroundSystem")
        self.system.setPlaceholderText("Optional system message")
        self.raw = QCheckBox("Raw text (no chat template)")
        self.raw.setObjectName("playgroundRaw")

        self.temperature = QDoubleSpinBox()
        self.temperature.setObjectName("playgroundTemperature")
        self.temperature.setRange(0.0, 2.0)
        self.temperature.setSingleStep(0.1)
        self.temperature.setValue(0.0)
        self.temperature.setToolTip("0 picks the most likely token every time (greedy), so the two answers are "
                                    "reproducible; higher values sample more freely.")
        self.top_p = QDoubleSpinBox()
        self.top_p.setObjectName("playgroundTopP")
        self.top_p.setRange(0.05, 1.0)
        self.top_p.setSingleStep(0.05)
        self.top_p.setValue(0.9)
        self.top_p.setToolTip("Sample only from the most likely tokens whose probabilities add up to this.")
        self.max_tokens = QSpinBox()
        self.max_tokens.setObjectName("playgroundMaxTokens")
        self.max_tokens.setRange(1, 4096)
        self.max_tokens.setValue(128)
        settings = QFormLayout()
        settings.addRow("&Temperature:", self.temperature)
        settings.addRow("Top-&p:", self.top_p)
        settings.addRow("&Max new tokens:", self.max_tokens)

        self.generate_button = QPushButton("&Generate")
        self.generate_button.setObjectName("playgroundGenerate")
        self.generate_button.setDefault(True)
        self.stop_button = QPushButton("&Stop")
        self.stop_button.setObjectName("playgroundStop")
        self.stop_button.setEnabled(False)
        self.status = QLabel("")
        self.status.setObjectName("playgroundStatus")
        self.status.setWordWrap(True)

        prompt_box = QVBoxLayout()
        prompt_box.addWidget(self.examples)
        prompt_box.addWidget(self.prompt)
        prompt_box.addWidget(self.system)
        prompt_box.addWidget(self.raw)
        middle = QHBoxLayout()
        middle.addLayout(prompt_box, 3)
        side = QVBoxLayout()
        side.addLayout(settings)
        side.addWidget(self.generate_button)
        side.addWidget(self.stop_button)
        side.addStretch(1)
        middle.addLayout(side, 1)

        self.panes = {name: AnswerPane(name) for name in SIDE_TITLES}
        answers = QHBoxLayout()
        for pane in self.panes.values():
            answers.addWidget(pane, 1)

        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addLayout(middle)
        layout.addLayout(answers, 1)
        layout.addWidget(self.status)

        self.generate_button.clicked.connect(self.generate)
        self.stop_button.clicked.connect(self.stop)
        self.adapter_button.clicked.connect(self._pick_adapter_folder)
        self.examples.activated.connect(self._use_example)
        self.raw.toggled.connect(self.system.setDisabled)
        self._update_source()

    # -- choosing what to compare -------------------------------------------------------------

    def set_run(self, run_dir: Path | None) -> None:
        """Compare the adapter of this run (its final adapter or a checkpoint) with its base."""
        self.run_dir = Path(run_dir) if run_dir else None
        self.adapter_dir = None
        self._update_source()

    def set_adapter_folder(self, folder: Path | None) -> None:
        """Compare a bare PEFT adapter folder with the base model its adapter_config.json names."""
        self.adapter_dir = Path(folder) if folder else None
        self.run_dir = None
        self._update_source()

    def target(self) -> tuple[str, int | None] | None:
        if self.adapter_dir is not None:
            return str(self.adapter_dir), None
        if self.run_dir is None:
            return None
        return str(self.run_dir), self.checkpoint_combo.currentData()

    def _update_source(self) -> None:
        self.checkpoint_combo.clear()
        self.examples.clear()
        if self.adapter_dir is not None:
            self.source_label.setText(f"Adapter folder: {self.adapter_dir}")
            self.checkpoint_combo.setEnabled(False)
        elif self.run_dir is not None:
            self.source_label.setText(f"Run: {self.run_dir.name}")
            if (self.run_dir / runs.ADAPTER).is_dir():
                self.checkpoint_combo.addItem("final adapter", None)
            for step, _ in reversed(runs.list_checkpoints(self.run_dir)):
                self.checkpoint_combo.addItem(f"checkpoint {step}", step)
            self.checkpoint_combo.setEnabled(self.checkpoint_combo.count() > 1)
            prompts = example_prompts(self.run_dir)
            if prompts:
                self.examples.addItem("Examples from the training data…")
                for text in prompts:
                    self.examples.addItem(text.replace("\n", " ")[:100], text)
        else:
            self.source_label.setText("No run selected: pick one on the Runs page, or choose an adapter folder.")
        self.examples.setVisible(self.examples.count() > 0)
        has_adapter = self.adapter_dir is not None or self.checkpoint_combo.count() > 0
        self.generate_button.setEnabled(has_adapter and self.active is None)
        if self.run_dir is not None and not has_adapter:
            self.status.setText("This run has no adapter yet: it appears after the first checkpoint.")

    def showEvent(self, event: Any) -> None:
        super().showEvent(event)
        if self.target() is not None:
            self.ensure_worker()  # it imports torch while the person types

    def ensure_worker(self) -> JsonLinesProcess:
        if self.worker is None or not self.worker.isRunning():
            self.worker = JsonLinesProcess(self)
            self.worker.event.connect(self._on_event)
            self.worker.exited.connect(self._on_exit)
            self.worker.start(WORKER)
            self.loaded_key = None
        return self.worker

    def _use_example(self, index: int) -> None:
        text = self.examples.itemData(index)
        if text:
            self.prompt.setPlainText(text)

    def _pick_adapter_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a PEFT adapter folder", str(self.run_dir or Path.home()))
        if folder:
            self.set_adapter_folder(Path(folder))

    # -- generating ---------------------------------------------------------------------------

    def request(self) -> dict[str, Any]:
        return {
            "op": "generate", "id": str(self.request_id), "prompt": self.prompt.toPlainText(),
            "system": self.system.text(), "raw": self.raw.isChecked(), "temperature": self.temperature.value(),
            "top_p": self.top_p.value(), "max_new_tokens": self.max_tokens.value(), "seed": 0,
        }

    def generate(self) -> None:
        target = self.target()
        if target is None or self.active is not None:
            return
        if not self.prompt.toPlainText().strip():
            self.status.setText("Type a prompt first.")
            return
        self.ensure_worker()
        if self.loaded_key != target:
            self.worker.send({"op": "load", "target": target[0], "checkpoint": target[1]})
            self.loaded_key = target
            self.status.setText("Loading the model (the first time takes a while)…")
        self.request_id += 1
        self.active = str(self.request_id)
        self.last_done = {}
        for pane in self.panes.values():
            pane.clear()
        self.worker.send(self.request())
        self._set_busy(True)

    def stop(self) -> None:
        if self.worker is not None and self.active is not None:
            self.worker.send({"op": "stop"})
            self.status.setText("Stopping…")

    def shutdown(self) -> None:
        """End the worker (the window calls this when it closes)."""
        if self.worker is not None and self.worker.isRunning():
            self.worker.send({"op": "quit"})
            if not self.worker.process.waitForFinished(3000):
                self.worker.kill()
        self.worker = None
        self.loaded_key = None

    def answers(self) -> dict[str, str]:
        return {name: pane.text.toPlainText() for name, pane in self.panes.items()}

    def _set_busy(self, busy: bool) -> None:
        self.generate_button.setEnabled(not busy and self.target() is not None)
        self.stop_button.setEnabled(busy)
        self.adapter_button.setEnabled(not busy)
        self.checkpoint_combo.setEnabled(not busy and self.checkpoint_combo.count() > 1)

    def _end(self, message: str) -> None:
        request_id, self.active = self.active, None
        self._set_busy(False)
        self.status.setText(message)
        if request_id is not None:
            self.generation_finished.emit(request_id)

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "loading":
            self.status.setText(event.get("message", "loading…"))
        elif kind == "loaded":
            step = f", step {event['step']}" if event.get("step") is not None else ""
            template = "its chat template" if event.get("chat_template") else "the default prompt template"
            self.status.setText(f"Loaded {event.get('base')} on {event.get('device')} ({event.get('dtype')}{step}); "
                                f"prompts use {template}.")
        elif kind == "token" and event.get("id") == self.active:
            self.panes[event["side"]].append(event.get("text", ""))
        elif kind == "done" and event.get("id") == self.active:
            self.last_done[event["side"]] = event
            seconds = max(float(event.get("seconds") or 0), 1e-6)
            ends = {"eos": "ended", "length": "reached the token limit", "stopped": "stopped"}
            self.panes[event["side"]].status.setText(
                f"{event.get('tokens')} tokens, {ends.get(event.get('reason'), event.get('reason'))}, "
                f"{event.get('tokens', 0) / seconds:.1f} tokens/s")
        elif kind == "finished" and event.get("id") == self.active:
            self._end("Done.")
        elif kind == "error":
            if event.get("id") in (None, ""):  # the load failed: load again next time
                self.loaded_key = None
            elif event.get("id") != self.active:  # about a request that has already ended
                return
            message = event.get("message", "error")
            self.failed.emit(message)
            self._end(f"Error: {message}")

    def _on_exit(self, code: int, stderr_tail: str) -> None:
        self.loaded_key = None
        if self.active is not None:
            reason = stderr_tail.splitlines()[-1] if stderr_tail else f"exit code {code}"
            self.failed.emit(reason)
            self._end(f"The generation worker stopped: {reason}")
