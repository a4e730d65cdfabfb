"""The training supervisor: a QThread that runs the worker process and turns its output into signals.

Training runs in its own process (``python -m qlora_studio train CONFIG --output RUN_DIR --events``)
so that a crash in native code cannot take the window down and all GPU memory is returned when the
run ends. This thread reads the worker's standard output line by line; each event line becomes an
``event`` signal, anything else and the worker's standard error become ``log_line`` signals.

The worker must outlive the window: closing it can *detach* (the thread lets go and the worker
trains on by itself), and a crashed window must not take the run with it. So the worker runs in its
own process group (no signal meant for the window reaches it), a closed standard input means
nothing to it, a broken standard-output pipe only ends the echo of its events (they still go to
``RUN_DIR/events.jsonl``), and its standard error goes to a file that this thread follows rather
than to a pipe: a pipe would break with the window, and the worker's last message ("Finished: …")
would then fail the run it had just completed. A later window re-attaches through the run folder
(:mod:`qlora_studio.gui.follower`).

Stop follows the worker contract: a line ``stop`` on the worker's standard input and a file
``RUN_DIR/STOP`` (either is enough; both cover a worker that is busy or not reading its input).
The worker then finishes the current step, writes a checkpoint and exits with code 3. If it has
not exited after a grace period (default 60 s), its process group is killed. The ``run_ended``
signal's :class:`RunResult` says which of the two happened.
"""

from __future__ import annotations

import enum
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from PySide6.QtCore import QObject, QThread, Signal

from .. import events as ev
from .. import runs
from . import jobs

DEFAULT_GRACE_S = 60.0
PIPE_DRAIN_S = 2.0  # after the worker exits, how long to wait for its pipes to close
STDERR_POLL_S = 0.1  # how often the worker's standard-error file is read for new lines

EXIT_FINISHED, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_STOPPED = 0, 1, 2, 3


class Outcome(enum.StrEnum):
    FINISHED = "finished"  # exit 0: trained to the end, adapter written
    STOPPED = "stopped"  # exit 3 after a stop request: checkpoint written
    KILLED = "killed"  # did not stop within the grace period, or the person chose to kill it
    FAILED = "failed"  # exit 2 (bad input) or 1 (internal error)
    CRASHED = "crashed"  # ended by a signal, or an exit code outside the contract
    DETACHED = "detached"  # the window let go of a worker that trains on in the background


@dataclass
class RunResult:
    outcome: Outcome
    exit_code: int | None
    run_dir: Path
    message: str
    failure: dict[str, Any] | None = None  # the worker's ``failed`` event, if it sent one
    last_event: dict[str, Any] | None = None  # the terminal event (stopped/finished/failed)
    stderr_tail: list[str] = field(default_factory=list)


def _pump(name: str, stream: Any, lines: queue.Queue[tuple[str, str | None]]) -> None:
    """Copy a pipe's lines into the queue; ``None`` marks its end."""
    try:
        for line in stream:
            line = line.rstrip("\n")
            if line.strip():
                lines.put((name, line))
    except (OSError, ValueError):
        pass
    lines.put((name, None))


def _follow_file(fh: BinaryIO, done: threading.Event, lines: queue.Queue[tuple[str, str | None]]) -> None:
    """Copy the lines written to a file into the queue until ``done`` is set and nothing is left to
    read; ``None`` marks the end. A line still being written waits for its newline."""
    partial = b""
    try:
        with fh:
            while True:
                finished = done.is_set()  # read once more after the writer has gone
                chunk = fh.read(65536)
                if chunk:
                    *complete, partial = (partial + chunk).split(b"\n")
                    for raw in complete:
                        line = raw.decode("utf-8", "replace").rstrip("\r")
                        if line.strip():
                            lines.put(("err", line))
                    continue
                if finished:
                    break
                done.wait(STDERR_POLL_S)
    except OSError:
        pass
    if partial.strip():
        lines.put(("err", partial.decode("utf-8", "replace")))
    lines.put(("err", None))


def finished_message(terminal: dict[str, Any] | None) -> str:
    adapter = (terminal or {}).get("adapter")
    return "Training finished." + (f" Adapter: {adapter}" if adapter else "")


def stopped_message(terminal: dict[str, Any] | None) -> str:
    info = terminal or {}
    at = f" at step {info['step']}" if info.get("step") is not None else ""
    ckpt = info.get("checkpoint")
    saved = f"; checkpoint saved: {ckpt}" if ckpt else ""
    return f"Stopped gracefully{at}{saved}."


def killed_after_grace_message(grace_s: float, run_dir: Path) -> str:
    ckpt = runs.latest_checkpoint(run_dir)
    kept = f" The last checkpoint ({ckpt.name}) is kept." if ckpt else " No checkpoint had been written."
    return f"The worker did not stop within the {grace_s:g} s grace period and was killed.{kept}"


KILLED_ON_REQUEST = "The worker was killed on request."


def detached_message(pid: int | None) -> str:
    return (f"Training continues in the background (process {pid}); "
            "the window follows it when it opens again.")


def remove_stale_stop_file(run_dir: Path) -> None:
    """A STOP file the worker never honoured (it was killed, or it ended without a word) would stop
    a resumed run at once."""
    try:
        (run_dir / runs.STOP).unlink(missing_ok=True)
    except OSError:
        pass


class StopEscalation:
    """What follows a stop request, for a :class:`Supervisor` and a follower alike.

    :meth:`arm` starts the grace timer once the request has gone out; if the worker is still alive
    when it runs out, ``announce`` gets a sentence saying so and the worker is killed. :meth:`kill`
    ends it at once (the person's choice). :attr:`killed_by` remembers which came first, and
    :meth:`killed_message` turns it into the run's result message.

    The owner says how to tell that its worker is alive (``alive``) and how to kill it (``kill``,
    called only while it is alive); both are called with ``lock`` held, the owner's lock that also
    guards its worker. Call :meth:`arm` with that lock held too.
    """

    def __init__(self, grace_s: float, lock: threading.Lock, *, alive: Callable[[], bool],
                 kill: Callable[[], None], announce: Callable[[str], None]):
        self.grace_s = float(grace_s)
        self.killed_by: str | None = None  # "grace" or "user"
        self._lock = lock
        self._alive = alive
        self._kill_worker = kill
        self._announce = announce
        self._timer: threading.Timer | None = None

    def arm(self) -> None:
        self._timer = threading.Timer(self.grace_s, self._expired)
        self._timer.daemon = True
        self._timer.start()

    def cancel(self) -> None:
        """The worker has stopped or gone: nothing is left to kill for."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()

    def kill(self, by: str) -> None:
        """Kill the worker if it is alive; ``by`` is "grace" or "user"."""
        with self._lock:
            if not self._alive():
                return
            self.killed_by = self.killed_by or by
            self._kill_worker()

    def killed_message(self, run_dir: Path) -> str | None:
        """The run's result message if the worker was killed, else None."""
        if self.killed_by == "grace":
            return killed_after_grace_message(self.grace_s, run_dir)
        if self.killed_by == "user":
            return KILLED_ON_REQUEST
        return None

    def _expired(self) -> None:
        with self._lock:
            alive = self._alive()
        if alive:
            self._announce(f"The worker did not stop within {self.grace_s:g} s of the stop request; killing it.")
            self.kill("grace")


def worker_command(config_path: Path | None, run_dir: Path, *, resume: bool = False, max_steps: int | None = None) -> list[str]:
    """The worker's argument list, per the contract in docs/architecture.md."""
    argv = [sys.executable, "-m", "qlora_studio", "train"]
    if resume:
        argv += ["--resume", str(run_dir)]
    else:
        if config_path is None:
            raise ValueError("a new run needs a configuration file")
        argv += [str(config_path), "--output", str(run_dir)]
    if max_steps is not None:
        argv += ["--max-steps", str(max_steps)]
    return argv + ["--events"]


class Supervisor(QThread):
    """Runs one worker process from start to end. Create a new one for each run."""

    event = Signal(object)  # a parsed event dict
    log_line = Signal(str)  # a line of the worker's standard error (or a stray stdout line)
    worker_started = Signal(object)  # the worker's process id (int)
    stop_escalated = Signal(str)  # the grace period ran out: says so before killing
    run_ended = Signal(object)  # RunResult

    def __init__(
        self,
        argv: list[str],
        run_dir: Path,
        *,
        grace_s: float = DEFAULT_GRACE_S,
        env: dict[str, str] | None = None,
        stderr_dir: Path | None = None,
        parent: QObject | None = None,
    ):
        super().__init__(parent)
        self.argv = list(argv)
        self.run_dir = Path(run_dir)
        self.stderr_dir = Path(stderr_dir) if stderr_dir is not None else Path(tempfile.gettempdir())
        self.env = jobs.python_env(env)
        self._proc: subprocess.Popen[str] | None = None
        self._lock = threading.Lock()
        self._stop_requested = False
        self._escalation = StopEscalation(grace_s, self._lock, alive=self._worker_alive,
                                          kill=self._kill_worker, announce=self.stop_escalated.emit)
        self._stderr_tail: list[str] = []
        self._detached = False
        jobs.register(self)

    # ------------------------------------------------------------------ called from the GUI thread

    @property
    def grace_s(self) -> float:
        return self._escalation.grace_s

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def stop_requested(self) -> bool:
        return self._stop_requested

    def request_stop(self) -> bool:
        """Ask the worker to stop after the current step; kill it if it has not after ``grace_s``.

        Returns False when there is nothing to stop (not started, already ended, already asked).
        """
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None or self._stop_requested:
                return False
            self._stop_requested = True
            try:
                if self.run_dir.is_dir():
                    (self.run_dir / runs.STOP).touch()
            except OSError:
                pass  # standard input still reaches it
            try:
                assert proc.stdin is not None
                proc.stdin.write("stop\n")
                proc.stdin.flush()
            except (OSError, ValueError):
                pass  # the worker closed its input; the STOP file still reaches it
            self._escalation.arm()
            return True

    def kill(self) -> None:
        """End the worker now (its last periodic checkpoint, if any, stays)."""
        self._escalation.kill("user")

    # ------------------------------------------------------------------ the thread

    def run(self) -> None:
        try:
            proc, stderr_path, stderr_source = self._start_worker()
        except OSError as exc:
            self.run_ended.emit(
                RunResult(Outcome.CRASHED, None, self.run_dir, f"Could not start the training worker: {exc}")
            )
            return
        with self._lock:
            self._proc = proc
        self.worker_started.emit(proc.pid)

        # One daemon thread per stream feeds a queue, so this loop can also notice a detach request
        # and a chatty standard error can never block the worker.
        lines: queue.Queue[tuple[str, str | None]] = queue.Queue()
        stderr_done = threading.Event()
        threading.Thread(target=_pump, args=("out", proc.stdout, lines), daemon=True, name="worker-out").start()
        threading.Thread(target=_follow_file, args=(stderr_source, stderr_done, lines), daemon=True,
                         name="worker-err").start()
        if os.name == "posix":
            self._remove(stderr_path)  # both ends hold it open; nothing is left behind, even by a crash

        terminal: dict[str, Any] | None = None
        failure: dict[str, Any] | None = None
        open_streams = 2
        exited_at: float | None = None
        while open_streams and not self._detached:
            try:
                name, line = lines.get(timeout=0.25)
            except queue.Empty:
                if proc.poll() is not None:
                    stderr_done.set()  # the file has all it will get
                    # A grandchild that inherited the stdout pipe could hold it open after the
                    # worker exits; do not wait for it for ever.
                    exited_at = exited_at or time.monotonic()
                    if time.monotonic() - exited_at > PIPE_DRAIN_S:
                        break
                continue
            if line is None:
                open_streams -= 1
                continue
            if name == "err":
                self._stderr_tail = (self._stderr_tail + [line])[-20:]
                self.log_line.emit(line)
                continue
            event = ev.parse_line(line)
            if event is None:
                self.log_line.emit(line)
                continue
            if event.get("type") in ev.TERMINAL_TYPES:
                terminal = event
                if event["type"] == "failed":
                    failure = event
            self.event.emit(event)
        stderr_done.set()

        if self._detached:
            # The worker trains on without us: its events still go to RUN_DIR/events.jsonl.
            self._escalation.cancel()
            self._remove(stderr_path)
            self.run_ended.emit(RunResult(Outcome.DETACHED, None, self.run_dir, detached_message(proc.pid)))
            return

        exit_code = proc.wait()
        self._escalation.cancel()
        with self._lock:
            for stream in (proc.stdin, proc.stdout):
                try:
                    if stream is not None:
                        stream.close()
                except OSError:
                    pass
        self._remove(stderr_path)
        remove_stale_stop_file(self.run_dir)
        self.run_ended.emit(self._result(exit_code, terminal, failure))

    def detach(self) -> None:
        """Stop watching and leave the worker training on its own (the window is closing)."""
        self._detached = True

    # ------------------------------------------------------------------ helpers

    def _worker_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _kill_worker(self) -> None:
        proc = self._proc
        assert proc is not None  # StopEscalation kills only a live worker
        try:
            if os.name == "posix":
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
        except (ProcessLookupError, PermissionError):
            pass

    def _start_worker(self) -> tuple[subprocess.Popen[str], Path, BinaryIO]:
        """Start the worker in its own process group, its standard error going to a fresh file (see
        the module docstring for why not a pipe); returns it, the file, and the file open for reading."""
        popen_kwargs: dict[str, Any] = {}
        if os.name == "posix":
            popen_kwargs["start_new_session"] = True  # its own process group: one kill ends it all
        else:
            popen_kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP  # type: ignore[attr-defined]
        self.stderr_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{self.run_dir.name}-", suffix=".stderr", dir=self.stderr_dir)
        os.close(fd)
        path = Path(name)
        source = None
        try:
            source = open(path, "rb")  # noqa: SIM115 - the reading thread closes it
            with open(path, "ab") as sink:  # the worker gets its own copy of this handle
                proc = subprocess.Popen(
                    self.argv,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=sink,
                    text=True,
                    encoding="utf-8",
                    errors="replace",
                    bufsize=1,
                    env=self.env,
                    **popen_kwargs,
                )
        except OSError:
            if source is not None:
                source.close()
            self._remove(path)
            raise
        return proc, path, source

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            path.unlink(missing_ok=True)
        except OSError:
            pass  # Windows, while the worker still holds it open: a small file stays behind

    def _result(self, code: int, terminal: dict[str, Any] | None, failure: dict[str, Any] | None) -> RunResult:
        tail = list(self._stderr_tail)
        common: dict[str, Any] = {"exit_code": code, "run_dir": self.run_dir, "failure": failure,
                                  "last_event": terminal, "stderr_tail": tail}
        killed = self._escalation.killed_message(self.run_dir)
        if killed is not None:
            return RunResult(Outcome.KILLED, message=killed, **common)
        if code == EXIT_FINISHED:
            return RunResult(Outcome.FINISHED, message=finished_message(terminal), **common)
        if code == EXIT_STOPPED:
            return RunResult(Outcome.STOPPED, message=stopped_message(terminal), **common)
        if code in (EXIT_BAD_INPUT, EXIT_INTERNAL):
            if failure is not None:
                message = str(failure.get("message") or "The run failed.")
            elif tail:
                message = tail[-1]
            else:
                message = f"The worker exited with code {code}."
            return RunResult(Outcome.FAILED, message=message, **common)
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            message = f"The worker was ended by {name}."
        else:
            message = f"The worker exited with unexpected code {code}."
        if tail:
            message += f" Last output: {tail[-1]}"
        return RunResult(Outcome.CRASHED, message=message, **common)
