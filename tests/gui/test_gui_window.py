"""The main window driving the real training worker on the demo, through the stable objectNames."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import (
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTabWidget,
)

from qlora_studio import runs
from qlora_studio.gui.supervisor import Outcome

from .helpers import click, loss_points, runs_table_status, write_run

REPO = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets")


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


def test_seven_pages_in_order_with_stable_names_and_shortcuts(window, qtbot):
    tabs = window.findChild(QTabWidget, "pages")
    pages = [(tabs.tabText(i), tabs.widget(i).objectName()) for i in range(tabs.count())]
    assert pages == [("Model", "modelPage"), ("Dataset", "datasetPage"), ("Training", "trainingPage"),
                     ("GPU Monitor", "monitorPage"), ("Export", "exportPage"), ("Playground", "playgroundPage"),
                     ("Runs", "runsPage")]
    for i in range(tabs.count()):
        shortcut = QKeySequence(f"Ctrl+{i + 1}")
        action = next(a for a in window.actions() if a.shortcut() == shortcut)
        action.trigger()
        assert tabs.currentIndex() == i


def test_a_run_chosen_on_the_runs_page_goes_to_the_playground_and_export(window, qtbot):
    finished = write_run(window.state.runs_dir, "a-finished", "finished", [3.0, 2.0, 1.0])
    write_run(window.state.runs_dir, "b-stopped", "stopped", [4.0, 3.5], checkpoint_step=2)
    window.tabs.setCurrentWidget(window.runs_page)
    table = window.findChild(QTableWidget, "runsTable")
    qtbot.waitUntil(lambda: table.rowCount() == 2, timeout=10_000)
    window.runs_page.select_run(finished)
    assert window.playground_page.run_dir == finished
    assert window.export_page.current_run() == finished
    assert window.playground_page.checkpoint_combo.currentText() == "final adapter"


def test_closing_the_window_ends_the_playground_worker(make_window, qtbot):
    window = make_window()
    run_dir = write_run(window.state.runs_dir, "finished", "finished", [2.0, 1.0])
    window.playground_page.set_run(run_dir)
    window.tabs.setCurrentWidget(window.playground_page)  # showing it starts its worker (loading torch)
    worker = window.playground_page.worker
    assert worker is not None and worker.isRunning()
    window.close()
    assert not worker.isRunning()  # the window's shutdown ended it; the no-leftovers check agrees
    assert window.playground_page.worker is None


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
