"""The event schema: what a training run says about itself, one JSON object per line.

Every run writes ``events.jsonl`` in its run folder; ``qlora-studio train --events`` prints the same
lines on standard output. The GUI, the monitor and the tests read them. Each line is an object with

* ``v``     -- the schema version (:data:`SCHEMA_VERSION`),
* ``type``  -- one of :data:`EVENT_FIELDS`' keys,
* ``time``  -- seconds since the epoch (float),

and the fields listed for its type in :data:`EVENT_FIELDS` (more may be added in a minor change;
readers ignore fields they do not know). docs/events.md documents each field.

Plain Python: no torch, no Qt.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

SCHEMA_VERSION = 1

EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    # config (dict), model (dict: name, architecture, params, trainable_params, ...),
    # device (dict: kind, name, compute_dtype, ...), versions (dict), plan (dict: max_steps, ...)
    "run_started": ("run_dir", "config", "model", "device", "versions", "plan"),
    # data summary: examples, truncated, val_examples, format, tokens
    "data_ready": ("format", "train_examples", "val_examples", "truncated", "max_seq_len"),
    "step": (
        "step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "step_s",
        "mem_allocated", "mem_reserved", "mem_peak",
    ),
    "eval": ("step", "loss", "perplexity"),
    "checkpoint": ("step", "path"),
    "paging": ("step", "phase", "bytes_htod", "bytes_dtoh", "faults"),
    "oom_recovered": ("step", "micro_batch_size", "grad_accum_steps"),
    "log": ("level", "message"),
    "stopped": ("step", "checkpoint", "reason"),
    "finished": ("step", "adapter", "train_loss", "eval_loss", "tokens", "duration_s"),
    "failed": ("kind", "message", "advice", "log"),
}

TERMINAL_TYPES = ("stopped", "finished", "failed")


def make(type_: str, **fields: Any) -> dict[str, Any]:
    """Build an event; unknown types are a programming error."""
    if type_ not in EVENT_FIELDS:
        raise ValueError(f"unknown event type {type_!r}")
    return {"v": SCHEMA_VERSION, "type": type_, "time": time.time(), **fields}


def dumps(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"), allow_nan=True, default=str)


def parse_line(line: str) -> dict[str, Any] | None:
    """An event from one line, or None for a line that is not an event (e.g. a stray print)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        event = json.loads(line)
    except json.JSONDecodeError:
        return None
    if not isinstance(event, dict) or "type" not in event:
        return None
    return event


def read(path: str | Path) -> Iterator[dict[str, Any]]:
    """The events of a file; a torn last line (a killed writer) is skipped."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                event = parse_line(line)
                if event is not None:
                    yield event
    except FileNotFoundError:
        return


class EventWriter:
    """Appends events to ``events.jsonl`` and, if asked, echoes them to a stream (the ``--events`` pipe).

    Thread-safe: the CUPTI collector and the stdin watcher may emit from other threads. Each event
    is flushed at once so a reader sees it live and a kill loses at most the line being written.
    """

    def __init__(self, path: str | Path | None, echo: IO[str] | None = None, *, enabled: bool = True):
        self.path = Path(path) if path else None
        self.echo = echo
        self.enabled = enabled
        self._lock = threading.Lock()
        self._fh = open(self.path, "a", encoding="utf-8") if (self.path and enabled) else None
        self.listeners: list[Any] = []

    def emit(self, type_: str, **fields: Any) -> dict[str, Any]:
        event = make(type_, **fields)
        if not self.enabled:
            return event
        line = dumps(event)
        with self._lock:
            if self._fh is not None:
                self._fh.write(line + "\n")
                self._fh.flush()
            if self.echo is not None:
                try:
                    self.echo.write(line + "\n")
                    self.echo.flush()
                except (BrokenPipeError, ValueError):
                    # The reader went away (GUI closed): keep training, keep the file.
                    self.echo = None
        for listener in self.listeners:
            listener(event)
        return event

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def stdout_writer() -> IO[str]:
    return sys.stdout
