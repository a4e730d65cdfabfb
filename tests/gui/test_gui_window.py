"""The main window driving the real training worker on the demo, through the stable objectNames."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QProgressBar, QPushButton, QSpinBox, QTableWidget

from qlora_studio import runs
from qlora_studio.gui.supervisor import Outcome

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets")


def loss_points(window) -> int:
    plot = window.findChild(pg.PlotWidget, "lossPlot")
    raw = plot.getPlotItem().listDataItems()[0]
    x, _ = raw.getData()
    return 0 if x is None else len(x)


def click(qtbot, window, name: str) -> None:
    button = window.findChild(QPushButton, name)
    assert button is not None and button.isEnabled(), f"{name} is not clickable"
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def runs_table_status(window) -> dict[str, str]:
    table = window.findChild(QTableWidget, "runsTable")
    return {table.item(r, 1).text(): table.item(r, 0).text() for r in range(table.rowCount())}


# Runs the app as `qlora-studio` does (the command line's default sub-command), reports once the
# window is up, then closes it.
LAUNCH = """
import json, sys
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication
from qlora_studio.gui import app as gui_app

def report():
    window = next(w for w in QApplication.topLevelWidgets() if w.objectName() == "mainWindow")
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in HEAVY)
    print(json.dumps({"title": window.windowTitle(), "visible": window.isVisible(), "heavy": heavy}))
    window.close()

make_application = gui_app.make_application
def make_and_report(argv=None):
    application = make_application(argv)
    QTimer.singleShot(300, report)
    return application
gui_app.make_application = make_and_report

from qlora_studio.cli import main
sys.exit(main([]))
"""


def test_the_app_starts_without_torch(tmp_path):
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen", "PYTHONPATH": str(REPO), "QLORA_STUDIO_HOME": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", f"HEAVY = {HEAVY!r}\n" + LAUNCH], capture_output=True, text=True,
                         timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    assert answer == {"title": "QLoRA Studio", "visible": True, "heavy": []}


def test_demo_is_preselected_on_first_launch(window, app_home):
    cfg = window.collect_config()
    assert cfg.model.name_or_path == str(app_home / "demo" / "model")
    assert cfg.data.path == str(app_home / "demo" / "data.jsonl")
    assert window.findChild(type(window.training_page.preset), "presetCombo").currentText() == "Quick demo"


def test_demo_run_stop_resume_and_close_during_a_run(window, qtbot):
    window.findChild(QSpinBox, "train_max_steps").setValue(5000)  # long enough to be stopped
    window.findChild(QSpinBox, "train_eval_every").setValue(0)
    click(qtbot, window, "startButton")
    assert window.run.running
    qtbot.waitUntil(lambda: loss_points(window) >= 3, timeout=120_000)
    progress = window.findChild(QProgressBar, "progressBar")
    qtbot.waitUntil(lambda: progress.value() >= 3, timeout=5_000)
    assert progress.maximum() == 5000

    click(qtbot, window, "stopButton")
    qtbot.waitUntil(lambda: not window.run.running, timeout=90_000)
    result = window.last_result
    assert result.outcome is Outcome.STOPPED, result.message
    checkpoint = runs.latest_checkpoint(result.run_dir)
    assert checkpoint is not None
    stopped_at = runs.read_state(checkpoint)["step"]
    assert "Stopped gracefully" in window.training_page.status.text()

    window.tabs.setCurrentWidget(window.runs_page)
    qtbot.waitUntil(lambda: runs_table_status(window).get(result.run_dir.name) == "stopped", timeout=10_000)

    # Resume the stopped run, then close the window while it trains: the window asks (the test
    # answers "stop"), stops the run with a checkpoint and only then closes.
    window.tabs.setCurrentWidget(window.training_page)
    click(qtbot, window, "resumeButton")
    qtbot.waitUntil(lambda: window.training_page.progress_state.step > stopped_at, timeout=120_000)
    assert window.close() is False  # not yet: stopping first
    assert window.run.stopping
    qtbot.waitUntil(lambda: not window.isVisible(), timeout=90_000)
    assert window.last_result.outcome is Outcome.STOPPED
    assert runs.summarize(result.run_dir).status == "stopped"
    assert runs.read_state(runs.latest_checkpoint(result.run_dir))["step"] > stopped_at


def test_broken_dataset_shows_an_error_and_the_window_keeps_working(window, qtbot, tmp_path, app_home):
    bad = tmp_path / "broken.jsonl"
    bad.write_text('{"instruction": "Say hi", "output": "hi"}\n{"instruction": "oops", "output": \n')
    window.tabs.setCurrentWidget(window.dataset_page)
    window.dataset_page.set_source(str(bad))
    qtbot.waitUntil(lambda: window.dataset_page.error is not None, timeout=10_000)
    assert "line 2" in window.dataset_page.error and "malformed JSON" in window.dataset_page.error
    assert window.dataset_page.error_label.isVisible()

    click(qtbot, window, "startButton")
    qtbot.waitUntil(lambda: window.failure_dialog is not None and window.failure_dialog.isVisible(), timeout=90_000)
    dialog = window.failure_dialog
    assert "line 2" in dialog.text()
    assert window.last_result.outcome is Outcome.FAILED
    dialog.accept()

    # Still usable: a good dataset clears the error, Start is available again.
    window.dataset_page.set_source(str(app_home / "demo" / "data.jsonl"))
    qtbot.waitUntil(lambda: window.dataset_page.error is None and window.dataset_page.detected_format == "alpaca", timeout=10_000)
    assert window.findChild(QPushButton, "startButton").isEnabled()
    assert not window.run.running


def test_first_launch_builds_the_demo_and_start_waits_for_it(make_window, qtbot, tmp_path):
    window = make_window(tmp_path / "fresh-home")  # no demo yet: the window creates it
    assert window.demo.isRunning()
    assert "being created" in window.model_page.facts_status.text()
    assert "being created" in window.dataset_page.scan_note.text()
    assert window.dataset_page.error is None  # not a "file not found" error while it is built

    click(qtbot, window, "startButton")  # before the demo is ready: the run waits for it
    assert not window.run.running and "as soon as the demo" in window.training_page.status.text()
    qtbot.waitUntil(lambda: loss_points(window) >= 1, timeout=180_000)
    assert window.model_page.facts is not None  # the pages read the demo once it was there
    click(qtbot, window, "stopButton")
    qtbot.waitUntil(lambda: not window.run.running, timeout=90_000)
    assert window.last_result.outcome is Outcome.STOPPED
