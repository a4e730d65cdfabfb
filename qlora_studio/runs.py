"""Run folders: the source of truth that the engine writes and the GUI, monitor and tests read.

Layout of a run folder::

    RUN_DIR/
      config.toml          the configuration the run uses (resolved paths)
      events.jsonl         the event stream (see events.py)
      train.log            the worker's log, tracebacks included
      STOP                 (optional) a graceful stop request; removed when honoured
      worker.pid           the worker's process id while it runs
      checkpoints/
        step-00000200/     a complete checkpoint (written to .tmp-..., then renamed)
          adapter/         PEFT adapter (adapter_config.json, adapter_model.safetensors)
          trainer_state.json, optimizer.pt, rng.pt
      adapter/             the final adapter, present only when the run finished

Plain Python: no torch, no Qt.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import events as ev

CONFIG = "config.toml"
EVENTS = "events.jsonl"
LOG = "train.log"
STOP = "STOP"
PID = "worker.pid"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
STATE = "trainer_state.json"

_CKPT = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def new_run_dir(runs_dir: str | Path, run_name: str = "") -> Path:
    """A run folder that does not exist yet: the run name, or the date and time, with -2, -3... if taken."""
    runs_dir = Path(runs_dir)
    name = run_name or time.strftime("run-%Y%m%d-%H%M%S")
    path = runs_dir / name
    n = 1
    while path.exists():
        n += 1
        path = runs_dir / f"{name}-{n}"
    return path


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first. Temporary folders of an interrupted write are ignored."""
    root = Path(run_dir) / CHECKPOINTS
    found = []
    if root.is_dir():
        for child in root.iterdir():
            m = _CKPT.match(child.name)
            if m and child.is_dir() and (child / STATE).is_file():
                found.append((int(m.group(1)), child))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def pid_alive(pid: int) -> bool:
    if pid <= 0:  # 0 and negative numbers name process groups, not a worker
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1][:1] != "Z"
    except OSError:
        return True


@dataclass
class RunSummary:
    path: Path
    status: str = "unknown"  # running, finished, stopped, failed, interrupted, created
    model: str = ""
    dataset: str = ""
    step: int = 0
    max_steps: int = 0
    final_loss: float | None = None
    eval_loss: float | None = None
    started_at: float | None = None
    ended_at: float | None = None
    message: str = ""
    losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def duration_s(self) -> float | None:
        if self.started_at is None or self.ended_at is None:
            return None
        return self.ended_at - self.started_at

    @property
    def resumable(self) -> bool:
        return self.status in ("stopped", "interrupted", "failed") and latest_checkpoint(self.path) is not None


def _table(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _whole(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def summarize(run_dir: str | Path) -> RunSummary:
    """Read a run folder's events into a summary; a run with no terminal event is running or interrupted.

    Fields of the wrong type (a damaged file, another program's lines) are ignored, never raised on:
    the Runs page and ``train --resume`` read every run folder they are shown.
    """
    run_dir = Path(run_dir)
    s = RunSummary(path=run_dir, status="created")
    last: dict[str, Any] | None = None
    for event in ev.read(run_dir / EVENTS):
        kind = event.get("type")
        t = _number(event.get("time"))
        if kind == "run_started":
            s.status = "running"
            s.started_at = s.started_at or t
            cfg = _table(event.get("config"))
            s.model = _text(_table(cfg.get("model")).get("name_or_path"))
            s.dataset = _text(_table(cfg.get("data")).get("path"))
            s.max_steps = _whole(_table(event.get("plan")).get("max_steps"), 0)
        elif kind == "step":
            s.step = _whole(event.get("step"), s.step)
            loss = _number(event.get("loss"))
            if loss is not None:
                s.final_loss = loss
                s.losses.append((s.step, loss))
        elif kind == "eval":
            loss = _number(event.get("loss"))
            if loss is not None:
                s.eval_loss = loss
        if kind in ev.TERMINAL_TYPES:
            s.status = kind
            s.ended_at = t
            s.message = _text(event.get("message")) or _text(event.get("reason"))
        elif kind == "run_started":
            s.ended_at = None
        last = event
    if s.status == "running":
        pid_file = run_dir / PID
        alive = False
        if pid_file.exists():
            try:
                alive = pid_alive(int(pid_file.read_text().strip()))
            except (ValueError, OSError):
                alive = False
        if not alive:
            s.status = "interrupted"
            s.ended_at = _number(last.get("time")) if last else None
    return s


def list_runs(runs_dir: str | Path) -> list[RunSummary]:
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    runs = [summarize(p) for p in root.iterdir() if p.is_dir() and (p / EVENTS).exists()]
    return sorted(runs, key=lambda r: r.started_at or 0, reverse=True)


def read_state(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / STATE).read_text(encoding="utf-8"))
