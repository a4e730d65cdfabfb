"""Re-attaching to a run that trains without this window.

A worker outlives its window (see :mod:`qlora_studio.gui.supervisor`): the person closed the window
and chose "keep training in the background", the window crashed, or the run was started from the
command line. Its run folder still says everything: ``events.jsonl`` grows by one line per event
and ``worker.pid`` names the process. A :class:`RunFollower` replays the file into the window, then
follows it as it grows, until the run's terminal event or the end of the process.

Stop works without a pipe to the worker: the file ``RUN_DIR/STOP``, which the worker checks every
step; if the process is still alive after the grace period it is killed (its process group when it
leads one, as a worker started by a window does).

The follower has the supervisor's signals (``worker_started``, ``stop_escalated``, ``run_ended``) so
:class:`~qlora_studio.gui.run_control.RunControl` treats both alike; events arrive in lists, and the
thread reads no further until the GUI thread has taken a list (:meth:`RunFollower.consumed`), so a
long run's history is replayed in bounded memory and never floods the event loop.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from PySide6.QtCore import QObject, QThread, Signal

from .. import events as ev
from .. import runs
from . import jobs
from .supervisor import (
    DEFAULT_GRACE_S,
    Outcome,
    RunResult,
    StopEscalation,
    detached_message,
    finished_message,
    remove_stale_stop_file,
    stopped_message,
)

POLL_S = 0.2  # how often a quiet events.jsonl is checked for new lines
BATCH = 500  # events handed to the GUI thread at a time (a few tens of milliseconds of its work)
EXIT_WAIT_S = 10.0  # after the terminal event, how long to let the worker finish exiting
PID_FILE_SLACK_S = 2.0  # clock granularity between a process's start time and its pid file's mtime


class EventTail:
    """The events appended to an ``events.jsonl`` since the last read.

    Only complete lines count: a line the worker is still writing (or one cut short by a kill) waits
    for its newline. Lines that are not events are skipped, as :func:`qlora_studio.events.read` does.
    """

    CHUNK = 1 << 20

    def __init__(self, path: Path):
        self.path = Path(path)
        self.offset = 0
        self._partial = b""
        self._pending: list[dict[str, Any]] = []

    def read(self, limit: int = BATCH) -> list[dict[str, Any]]:
        """Up to ``limit`` new events, oldest first (empty when nothing new is complete)."""
        while len(self._pending) < limit:
            try:
                with open(self.path, "rb") as fh:
                    fh.seek(self.offset)
                    chunk = fh.read(self.CHUNK)
            except OSError:
                break  # not there yet, or removed: nothing new
            if not chunk:
                break
            self.offset += len(chunk)
            *lines, self._partial = (self._partial + chunk).split(b"\n")
            for raw in lines:
                event = ev.parse_line(raw.decode("utf-8", "replace"))
                if event is not None:
                    self._pending.append(event)
        batch, self._pending = self._pending[:limit], self._pending[limit:]
        return batch


def find_worker(run_dir: Path) -> psutil.Process | None:
    """The live worker process of a run folder, or None.

    ``worker.pid`` outlives a killed worker, and its number may since belong to another process: a
    process counts only if it started before the pid file was written and is not a zombie.
    """
    pid_file = Path(run_dir) / runs.PID
    try:
        pid = int(pid_file.read_text().strip())
        written = pid_file.stat().st_mtime
        proc = psutil.Process(pid)
        if proc.create_time() > written + PID_FILE_SLACK_S or proc.status() == psutil.STATUS_ZOMBIE:
            return None
    except (OSError, ValueError, psutil.Error):
        return None
    return proc


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class RunFollower(QThread):
    """Follows one run folder whose worker another process started. Create a new one per attach."""

    events = Signal(object)  # a list of event dicts; call consumed() once it is handled
    worker_started = Signal(object)  # the worker's process id (int)
    stop_escalated = Signal(str)  # the grace period ran out: says so before killing
    run_ended = Signal(object)  # RunResult

    def __init__(self, run_dir: Path, worker: psutil.Process, *, grace_s: float = DEFAULT_GRACE_S,
                 parent: QObject | None = None):
        super().__init__(parent)
        self.run_dir = Path(run_dir)
        self.worker = worker
        self._lock = threading.Lock()
        self._stop_requested = False
        self._escalation = StopEscalation(grace_s, self._lock, alive=lambda: _alive(self.worker),
                                          kill=self._kill_worker, announce=self.stop_escalated.emit)
        self._detached = threading.Event()
        self._consumed = threading.Event()
        jobs.register(self)

    # ------------------------------------------------------------------ called from the GUI thread

    @property
    def grace_s(self) -> float:
        return self._escalation.grace_s

    @property
    def pid(self) -> int:
        return self.worker.pid

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def consumed(self) -> None:
        """The GUI thread has handled the last list of events: read on."""
        self._consumed.set()

    def request_stop(self) -> bool:
        """Ask the worker to stop after the current step (the STOP file); kill it after ``grace_s``."""
        with self._lock:
            if self._stop_requested or not _alive(self.worker):
                return False
            try:
                (self.run_dir / runs.STOP).touch()
            except OSError:
                return False  # the folder went away; nothing reaches the worker
            self._stop_requested = True
            self._escalation.arm()
            return True

    def kill(self) -> None:
        """End the worker now (its last periodic checkpoint, if any, stays)."""
        self._escalation.kill("user")

    def detach(self) -> None:
        """Stop following; the worker trains on (the window is closing)."""
        self._detached.set()
        self._consumed.set()

    # ------------------------------------------------------------------ the thread

    def run(self) -> None:
        self.worker_started.emit(self.pid)
        tail = EventTail(self.run_dir / runs.EVENTS)
        terminal: dict[str, Any] | None = None
        gone = False
        while not self._detached.is_set():
            batch = tail.read(BATCH)
            if batch:
                for event in batch:
                    if event.get("type") in ev.TERMINAL_TYPES:
                        terminal = event
                    elif event.get("type") == "run_started":
                        terminal = None  # a resumed run starts afresh
                if terminal is not None:
                    self._escalation.cancel()  # it has stopped (or ended): nothing left to kill for
                self._hand_over(batch)
                if len(batch) == BATCH:
                    continue  # more history waiting: no pause
            if terminal is not None:
                self._await_exit(EXIT_WAIT_S)  # so that a Resume right away finds the run ended
                break
            if gone:
                break  # it ended without a terminal event; the last read above took all it wrote
            if not _alive(self.worker):
                gone = True
                continue  # read once more: lines it wrote just before it went
            self._detached.wait(POLL_S)

        self._escalation.cancel()
        if self._detached.is_set():
            self.run_ended.emit(RunResult(Outcome.DETACHED, None, self.run_dir, detached_message(self.pid)))
            return
        if self._escalation.killed_by is not None or terminal is None:
            remove_stale_stop_file(self.run_dir)
        self.run_ended.emit(self._result(terminal))

    def _hand_over(self, batch: list[dict[str, Any]]) -> None:
        self._consumed.clear()
        self.events.emit(batch)
        while not self._consumed.wait(0.25):
            if self._detached.is_set():
                return

    def _await_exit(self, timeout: float) -> None:
        # Polled, not psutil's wait(): that would reap the worker if it were our own child (a test's).
        deadline = time.monotonic() + timeout
        while _alive(self.worker) and time.monotonic() < deadline:
            if self._detached.wait(0.1):
                return

    # ------------------------------------------------------------------ stopping

    def _kill_worker(self) -> None:
        pid = self.pid
        try:
            if os.name == "posix" and os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)  # a group leader: its helpers go with it
            else:
                self.worker.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass

    def _result(self, terminal: dict[str, Any] | None) -> RunResult:
        kind = (terminal or {}).get("type")
        common: dict[str, Any] = {"exit_code": None, "run_dir": self.run_dir, "last_event": terminal}
        killed = self._escalation.killed_message(self.run_dir)
        if killed is not None:
            return RunResult(Outcome.KILLED, message=killed, **common)
        if kind == "finished":
            return RunResult(Outcome.FINISHED, message=finished_message(terminal), **common)
        if kind == "stopped":
            return RunResult(Outcome.STOPPED, message=stopped_message(terminal), **common)
        if kind == "failed":
            message = str(terminal.get("message") or "The run failed.")
            return RunResult(Outcome.FAILED, message=message, failure=terminal, **common)
        ckpt = runs.latest_checkpoint(self.run_dir)
        kept = f" Its last checkpoint ({ckpt.name}) can be resumed." if ckpt else ""
        return RunResult(
            Outcome.CRASHED,
            message=f"The worker (process {self.pid}) ended without saying how; the run is interrupted.{kept} "
                    f"Its log: {self.run_dir / runs.LOG}",
            **common,
        )
