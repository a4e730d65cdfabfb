"""What the monitor shows about a training run, built from its events.

Both views use this: the page is fed events live by the GUI's supervisor, the terminal view
follows ``RUN_DIR/events.jsonl``. Keeping the wording here makes them say the same thing.

Plain Python: no torch, no Qt.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import events as ev
from .. import runs
from .paging import UNAVAILABLE_PREFIX, unavailable_message

MIB = 1024 * 1024


def fmt_bytes(n: float | None) -> str:
    """Bytes for people, in binary units: "512 MiB", "1.50 GiB", "0 B"; "–" for unknown."""
    if n is None:
        return "–"
    n = float(n)
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.2f} {unit}" if value < 10 else f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{n:.0f} B"


def paging_unavailable_reason(event: dict[str, Any]) -> str | None:
    """The reason the worker's paging counters are off, if this event says so.

    The worker says it in ``run_started`` (``device["paging_unavailable"]``) or in a ``log`` event
    whose message starts with "Paging counters unavailable: ".
    """
    kind = event.get("type")
    if kind == "run_started":
        reason = (event.get("device") or {}).get("paging_unavailable")
        return str(reason) if reason else None
    if kind == "log":
        message = str(event.get("message") or "")
        if message.startswith(UNAVAILABLE_PREFIX):
            return message[len(UNAVAILABLE_PREFIX):].strip() or "no reason given"
    return None


@dataclass
class PagingSummary:
    """Totals of a run's ``paging`` events and the one-line status both views show."""

    events: int = 0
    bytes_htod: int = 0
    bytes_dtoh: int = 0
    faults: int = 0
    unavailable: str | None = None
    recent: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=5))

    def add(self, event: dict[str, Any]) -> bool:
        """Take in one event; True if it changed the summary."""
        if event.get("type") == "paging":
            self.events += 1
            self.bytes_htod += int(event.get("bytes_htod") or 0)
            self.bytes_dtoh += int(event.get("bytes_dtoh") or 0)
            self.faults += int(event.get("faults") or 0)
            self.recent.append(event)
            return True
        reason = paging_unavailable_reason(event)
        if reason is not None:
            self.unavailable = reason
            return True
        return False

    @property
    def bytes_moved(self) -> int:
        return self.bytes_htod + self.bytes_dtoh

    def status_line(self) -> str:
        if self.events:
            noun = "event" if self.events == 1 else "events"
            return f"Paging: {self.events} {noun}, {fmt_bytes(self.bytes_moved)} moved"
        if self.unavailable:
            return unavailable_message(self.unavailable)
        return "Paging: none"


def describe_paging(event: dict[str, Any]) -> str:
    """One paging event in a line: "step 12 optimizer: in 128 MiB, out 0 B, 626 faults"."""
    return (
        f"step {event.get('step', '?')} {event.get('phase', '?')}: "
        f"in {fmt_bytes(event.get('bytes_htod') or 0)}, out {fmt_bytes(event.get('bytes_dtoh') or 0)}, "
        f"{int(event.get('faults') or 0):,} faults"
    )


@dataclass
class RunState:
    status: str = "created"  # created, running, and then the type of the terminal event
    device: dict[str, Any] = field(default_factory=dict)
    last_step: dict[str, Any] | None = None
    paging: PagingSummary = field(default_factory=PagingSummary)

    def add(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "run_started":
            self.status = "running"
            self.device = dict(event.get("device") or {})
            self.last_step = None
            self.paging = PagingSummary()
        elif kind == "step":
            self.last_step = event
        elif kind in ev.TERMINAL_TYPES:
            self.status = str(kind)
        self.paging.add(event)


class RunFollower:
    """Follows a run folder: new lines of ``events.jsonl`` and the worker's process id.

    Reads only what was appended since the last poll (a long run's event file is large), never
    a torn last line, and starts over if the file was replaced by a shorter one.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.state = RunState()
        self._offset = 0
        self._partial = b""

    def worker_pid(self) -> int | None:
        """The worker's pid while it runs; None when the file is absent or the process is gone."""
        try:
            pid = int((self.run_dir / runs.PID).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if runs.pid_alive(pid) else None

    def poll(self) -> RunState:
        path = self.run_dir / runs.EVENTS
        try:
            size = os.path.getsize(path)
        except OSError:
            return self.state
        if size < self._offset:
            self.state = RunState()
            self._offset = 0
            self._partial = b""
        if size == self._offset:
            return self.state
        with open(path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read(size - self._offset)
        self._offset += len(data)
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()  # an incomplete last line waits for the next poll
        for raw in lines:
            event = ev.parse_line(raw.decode("utf-8", "replace"))
            if event is not None:
                self.state.add(event)
        return self.state
