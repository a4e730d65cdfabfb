"""Short background jobs that must not block the window.

Two kinds:

* :class:`FunctionJob` runs a plain-Python function on a ``QThread`` (reading a model's
  ``config.json``, reading the first records of a dataset) and hands back its result or error.
  :class:`LatestOnlyRunner` runs them for work that is redone whenever the person changes something
  (a model's facts, the memory estimate, the list of runs): one at a time, latest request only.
* :class:`ProcessJob` runs ``python -m <module>`` as a subprocess through ``QProcess``: for work that
  needs torch or a tokenizer (which the GUI process must not import), or that may take long and must
  be killable (a half-finished thread cannot be killed, a process can).

Every job registers itself in a weak set while it runs so the tests (and a closing window) can
check that nothing is left running: :func:`running_jobs`, :func:`shutdown_jobs`.
"""

from __future__ import annotations

import json
import os
import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, QThread, Signal

_LIVE: weakref.WeakSet[QObject] = weakref.WeakSet()

#: The folder that holds the ``qlora_studio`` package, so ``python -m qlora_studio`` works in a
#: subprocess from a source checkout as well as from an installed wheel.
PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for a Python subprocess: ours, unbuffered, with the package importable."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if PACKAGE_ROOT not in paths:
        paths.insert(0, PACKAGE_ROOT)
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class FunctionJob(QThread):
    """Runs ``fn(*args)`` off the GUI thread; emits ``succeeded(result)`` or ``failed(exception)``."""

    succeeded = Signal(object)
    failed = Signal(object)

    def __init__(self, fn: Callable[..., Any], *args: Any, parent: QObject | None = None):
        super().__init__(parent)
        self._fn = fn
        self._args = args
        _LIVE.add(self)

    def run(self) -> None:
        try:
            result = self._fn(*self._args)
        except Exception as exc:  # handed to the GUI thread, which shows it
            self.failed.emit(exc)
        else:
            self.succeeded.emit(result)


@dataclass
class _Request:
    serial: int
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    on_success: Callable[[Any], None] | None
    on_failure: Callable[[BaseException], None] | None


class LatestOnlyRunner(QObject):
    """Runs ``fn(*args)`` as a :class:`FunctionJob` for the latest of a stream of requests.

    One job runs at a time. A request made while it runs waits for it to end, and a newer request
    replaces the one waiting. Only the latest request's answer is handed on, to its ``on_success``
    or ``on_failure``, on the GUI thread; the answer of a job that a newer request or :meth:`cancel`
    has superseded is dropped (a thread cannot be interrupted: that job runs to its end unheard).
    """

    def __init__(self, parent: QObject | None = None):
        super().__init__(parent)
        self._serial = 0  # of the latest request
        self._waiting: _Request | None = None
        self._running: _Request | None = None
        self._job: FunctionJob | None = None

    def submit(self, fn: Callable[..., Any], *args: Any,
               on_success: Callable[[Any], None] | None = None,
               on_failure: Callable[[BaseException], None] | None = None) -> None:
        """Run ``fn(*args)`` now, or when the running job ends if no newer request comes first."""
        self._serial += 1
        self._waiting = _Request(self._serial, fn, args, on_success, on_failure)
        if self._job is None:
            self._start_waiting()

    def cancel(self) -> None:
        """Forget the waiting request and drop the running job's answer."""
        self._serial += 1
        self._waiting = None

    def busy(self) -> bool:
        """A job runs (or has ended and not yet been cleared up); a waiting request starts after it."""
        return self._job is not None

    def shutdown(self, timeout_ms: int = 3000) -> None:
        """Forget the waiting request and wait briefly for the running job (the window is closing)."""
        self._waiting = None
        if self._job is not None:
            self._job.wait(timeout_ms)

    def _start_waiting(self) -> None:
        request, self._waiting = self._waiting, None
        if request is None:
            return
        job = FunctionJob(request.fn, *request.args, parent=self)
        # Slots of this object: the job's signals come from its thread and are queued to ours,
        # answer first, then ``finished``.
        job.succeeded.connect(self._succeeded)
        job.failed.connect(self._failed)
        job.finished.connect(self._job_done)
        self._running, self._job = request, job
        job.start()

    def _succeeded(self, result: Any) -> None:
        request = self._running
        if request is not None and request.serial == self._serial and request.on_success is not None:
            request.on_success(result)

    def _failed(self, exc: BaseException) -> None:
        request = self._running
        if request is not None and request.serial == self._serial and request.on_failure is not None:
            request.on_failure(exc)

    def _job_done(self) -> None:
        if self._job is not None:
            self._job.deleteLater()
        self._running, self._job = None, None
        self._start_waiting()


class ProcessJob(QObject):
    """``python -m module`` with a JSON request on standard input and a JSON answer on standard output.

    ``succeeded(dict)`` carries the parsed answer; ``failed(str)`` the reason (the last line of
    standard error, or a crash). Standard error lines stream through ``progress(str)``.
    """

    succeeded = Signal(object)
    failed = Signal(str)
    progress = Signal(str)

    def __init__(self, module: str, request: dict[str, Any], parent: QObject | None = None):
        super().__init__(parent)
        self.module = module
        self.request = request
        self._stderr_tail: list[str] = []
        self._cancelled = False
        self.process = QProcess(self)
        env = QProcessEnvironment()
        for key, value in python_env().items():
            env.insert(key, value)
        self.process.setProcessEnvironment(env)
        self.process.readyReadStandardError.connect(self._read_stderr)
        self.process.finished.connect(self._finished)
        self.process.errorOccurred.connect(self._error)

    def start(self) -> None:
        _LIVE.add(self)
        self.process.start(sys.executable, ["-m", self.module])
        self.process.write(json.dumps(self.request).encode("utf-8"))
        self.process.closeWriteChannel()

    def isRunning(self) -> bool:  # noqa: N802 - the same name as QThread's, for running_jobs()
        return self.process.state() != QProcess.ProcessState.NotRunning

    def cancel(self) -> None:
        """Kill the subprocess; no signal follows."""
        self._cancelled = True
        if self.isRunning():
            self.process.kill()
            self.process.waitForFinished(5000)

    def _read_stderr(self) -> None:
        text = bytes(self.process.readAllStandardError().data()).decode("utf-8", "replace")
        for line in text.splitlines():
            if line.strip():
                self._stderr_tail = (self._stderr_tail + [line])[-20:]
                self.progress.emit(line)

    def _error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart and not self._cancelled:
            self.failed.emit(f"could not start {sys.executable}: {self.process.errorString()}")

    def _finished(self, code: int, status: QProcess.ExitStatus) -> None:
        if self._cancelled:
            return
        self._read_stderr()
        out = bytes(self.process.readAllStandardOutput().data()).decode("utf-8", "replace")
        if status == QProcess.ExitStatus.NormalExit and code == 0:
            try:
                answer = json.loads(out)
            except json.JSONDecodeError:
                self.failed.emit(f"{self.module} wrote an answer that is not JSON: {out[:200]!r}")
                return
            self.succeeded.emit(answer)
            return
        reason = self._stderr_tail[-1] if self._stderr_tail else f"exit code {code}"
        self.failed.emit(reason)


def running_jobs() -> list[QObject]:
    """Jobs (and supervisors, which register here too) that are still running."""
    alive = []
    for job in list(_LIVE):
        try:
            if job.isRunning():
                alive.append(job)
        except RuntimeError:  # the C++ object is gone
            continue
    return alive


def register(job: QObject) -> None:
    """Track another long-lived thread (the training supervisor) in :func:`running_jobs`."""
    _LIVE.add(job)


def shutdown_jobs(timeout_ms: int = 3000) -> None:
    """Cancel subprocess jobs and wait briefly for threads: used when the window closes."""
    for job in running_jobs():
        if isinstance(job, ProcessJob):
            job.cancel()
        elif isinstance(job, QThread):
            job.wait(timeout_ms)
