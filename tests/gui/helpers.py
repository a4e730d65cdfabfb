"""Helpers the desktop app's tests share: reading the window through its stable objectNames, and
run folders written the way the worker leaves them."""

from __future__ import annotations

import json
from pathlib import Path

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QPushButton, QTableWidget

from qlora_studio import events as ev
from qlora_studio import runs


def loss_points(window) -> int:
    """Points drawn on the training-loss chart (its first data item is the raw loss)."""
    plot = window.findChild(pg.PlotWidget, "lossPlot")
    raw = plot.getPlotItem().listDataItems()[0]
    x, _ = raw.getData()
    return 0 if x is None else len(x)


def click(qtbot, window, name: str) -> None:
    button = window.findChild(QPushButton, name)
    assert button is not None and button.isEnabled(), f"{name} is not clickable"
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def runs_table_status(window) -> dict[str, str]:
    """Run folder name → the status the Runs page shows."""
    table = window.findChild(QTableWidget, "runsTable")
    return {table.item(r, 1).text(): table.item(r, 0).text() for r in range(table.rowCount())}


def write_run(runs_dir: Path, name: str, status: str, losses: list[float], *, checkpoint_step: int | None = None) -> Path:
    """A run folder as the worker leaves it (events.jsonl, optionally a checkpoint)."""
    run_dir = runs_dir / name
    run_dir.mkdir(parents=True)
    writer = ev.EventWriter(run_dir / runs.EVENTS)
    config = {"model": {"name_or_path": "/m/tiny"}, "data": {"path": "/d/qa.jsonl"}}
    writer.emit("run_started", run_dir=str(run_dir), config=config, model={}, device={}, versions={}, plan={"max_steps": 100})
    for step, loss in enumerate(losses, start=1):
        writer.emit("step", step=step, loss=loss, lr=1e-3, tokens_per_s=1000.0)
    if checkpoint_step is not None:
        ckpt = run_dir / runs.CHECKPOINTS / runs.checkpoint_name(checkpoint_step)
        (ckpt / "adapter").mkdir(parents=True)
        (ckpt / runs.STATE).write_text(json.dumps({"step": checkpoint_step}))
    if status == "stopped":
        writer.emit("stopped", step=len(losses), checkpoint="x", reason="stop requested")
    elif status == "finished":
        (run_dir / runs.ADAPTER).mkdir()
        (run_dir / runs.ADAPTER / "adapter_model.safetensors").write_bytes(b"\0" * 2048)
        writer.emit("finished", step=len(losses), adapter=str(run_dir / runs.ADAPTER), train_loss=losses[-1],
                    eval_loss=None, tokens=1, duration_s=1.0)
    writer.close()
    return run_dir
