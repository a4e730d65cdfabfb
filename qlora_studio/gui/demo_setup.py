"""Creates the demo (a tiny random model, a sample dataset and a config) on first launch.

``python -m qlora_studio demo DIR`` builds the model with torch, so it runs as a subprocess: the
window stays responsive and the GUI process stays torch-free. It writes to a temporary folder that
is renamed into place when complete, so a demo folder is never half-written.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, Signal

from . import jobs

DEMO_FILES = ("config.toml", "data.jsonl", "model/config.json")


def demo_ready(demo_dir: Path) -> bool:
    return all((demo_dir / name).is_file() for name in DEMO_FILES)


class DemoSetup(QObject):
    """Makes sure ``demo_dir`` holds the demo; emits ``ready(Path)`` or ``failed(str)``."""

    ready = Signal(object)
    failed = Signal(str)

    def __init__(self, demo_dir: Path, parent: QObject | None = None):
        super().__init__(parent)
        self.demo_dir = Path(demo_dir)
        self._tmp = self.demo_dir.with_name(f"{self.demo_dir.name}.tmp-{os.getpid()}")
        self._output: list[str] = []
        self.process: QProcess | None = None

    def isRunning(self) -> bool:  # noqa: N802 - the name jobs.running_jobs() asks for
        return self.process is not None and self.process.state() != QProcess.ProcessState.NotRunning

    def start(self) -> bool:
        """Start building the demo; returns False (and emits nothing) if it is already there."""
        if demo_ready(self.demo_dir):
            return False
        shutil.rmtree(self._tmp, ignore_errors=True)
        self.demo_dir.parent.mkdir(parents=True, exist_ok=True)
        self.process = QProcess(self)
        env = QProcessEnvironment()
        for key, value in jobs.python_env().items():
            env.insert(key, value)
        self.process.setProcessEnvironment(env)
        self.process.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        self.process.readyReadStandardOutput.connect(self._read)
        self.process.finished.connect(self._finished)
        self.process.errorOccurred.connect(self._error)
        jobs.register(self)
        self.process.start(sys.executable, ["-m", "qlora_studio", "demo", str(self._tmp)])
        return True

    def cancel(self) -> None:
        if self.isRunning():
            assert self.process is not None
            self.process.finished.disconnect(self._finished)
            self.process.kill()
            self.process.waitForFinished(5000)
        shutil.rmtree(self._tmp, ignore_errors=True)

    def _read(self) -> None:
        assert self.process is not None
        text = bytes(self.process.readAllStandardOutput().data()).decode("utf-8", "replace")
        self._output.extend(line for line in text.splitlines() if line.strip())
        self._output = self._output[-20:]

    def _error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            assert self.process is not None
            self.failed.emit(f"Could not start {sys.executable}: {self.process.errorString()}")

    def _finished(self, code: int, status: QProcess.ExitStatus) -> None:
        self._read()
        if status == QProcess.ExitStatus.NormalExit and code == 0 and demo_ready(self._tmp):
            if self.demo_dir.exists():
                shutil.rmtree(self.demo_dir)
            self._tmp.rename(self.demo_dir)
            self.ready.emit(self.demo_dir)
            return
        shutil.rmtree(self._tmp, ignore_errors=True)
        last = self._output[-1] if self._output else f"exit code {code}"
        self.failed.emit(f"Creating the demo failed: {last}")
