"""A run outlives its window, and a later window follows and stops it: with the real worker on the demo.

* A window that crashes mid-run (its process killed) does not take the run with it: the worker's
  standard input closes and its output pipe breaks, and it trains to the end all the same.
* A window opened on a runs folder where a worker trains (started from the command line here)
  replays and follows its events on the Training page, and its Stop button stops it with a checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from PySide6.QtWidgets import QProgressBar, QPushButton

from qlora_studio import events as ev
from qlora_studio import runs
from qlora_studio.gui import jobs
from qlora_studio.gui.supervisor import Outcome

from .helpers import click, loss_points, runs_table_status

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and process groups")

# A window's process as far as a run is concerned: a RunControl (the window's link to the worker)
# starting the real worker. It says when the run trains; the test then kills it, as a crash would.
CRASHING_WINDOW = """
import sys
from pathlib import Path
from PySide6.QtWidgets import QApplication
from qlora_studio.gui.run_control import RunControl
from qlora_studio.gui.supervisor import worker_command

config, run_dir, staging, steps = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
app = QApplication([])
control = RunControl(staging)
control.worker_pid.connect(lambda pid: pid and print(f"worker {pid}", flush=True))
control.event.connect(lambda event: event["type"] == "step" and print("training", flush=True))
control.start_command(worker_command(config, run_dir, max_steps=steps), run_dir, "a run whose window crashes")
app.exec()
"""


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_the_worker_trains_to_the_end_when_its_window_crashes(tmp_path, app_home):
    run_dir, staging = tmp_path / "runs" / "orphan", tmp_path / "staging"
    steps = 20
    env = jobs.python_env({"QT_QPA_PLATFORM": "offscreen"})
    window = subprocess.Popen(
        [sys.executable, "-c", CRASHING_WINDOW, str(app_home / "demo" / "config.toml"), str(run_dir), str(staging),
         str(steps)],
        stdout=subprocess.PIPE, text=True, env=env,
    )
    worker_pid = None
    try:
        assert window.stdout is not None
        for line in window.stdout:
            if line.startswith("worker "):
                worker_pid = int(line.split()[1])
            if line.strip() == "training":
                break
        assert worker_pid is not None, "the window never started a worker"
        window.kill()  # the crash: no clean-up, no detach, no stop
        window.wait(timeout=30)
        window.stdout.close()
        crashed_at = max((e["step"] for e in ev.read(run_dir / runs.EVENTS) if e["type"] == "step"), default=0)
        assert crashed_at < steps

        wait_for(lambda: not runs.pid_alive(worker_pid), timeout=240, what="the orphaned worker to end")
        kinds = [e["type"] for e in ev.read(run_dir / runs.EVENTS)]
        assert kinds[-1] == "finished" and "failed" not in kinds
        assert kinds.count("step") == steps
        assert runs.summarize(run_dir).status == "finished"
        assert (run_dir / runs.ADAPTER / "adapter_config.json").is_file()
        assert not list(staging.glob("*.stderr"))  # the standard-error file left nothing behind
    finally:
        if window.poll() is None:
            window.kill()
            window.wait()
        if worker_pid is not None and runs.pid_alive(worker_pid):
            os.killpg(worker_pid, signal.SIGKILL)


def test_a_window_follows_a_run_started_outside_it_and_stops_it(make_window, qtbot, app_home):
    run_dir = app_home / "runs" / "from-the-command-line"
    worker = subprocess.Popen(
        [sys.executable, "-m", "qlora_studio", "train", str(app_home / "demo" / "config.toml"),
         "--output", str(run_dir), "--max-steps", "300"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=jobs.python_env(),
    )
    try:
        wait_for(lambda: any(e["type"] == "step" for e in ev.read(run_dir / runs.EVENTS)), timeout=240,
                 what="the worker's first step")
        window = make_window()  # its first listing of the runs folder finds the run training
        qtbot.waitUntil(lambda: window.run.attached, timeout=15_000)
        assert window.tabs.currentWidget() is window.training_page
        qtbot.waitUntil(lambda: loss_points(window) >= 1, timeout=15_000)  # the replayed history
        replayed = loss_points(window)
        qtbot.waitUntil(lambda: loss_points(window) >= replayed + 3, timeout=60_000)  # followed as it grows
        progress = window.findChild(QProgressBar, "progressBar")
        qtbot.waitUntil(lambda: progress.value() >= replayed, timeout=5_000)
        assert progress.maximum() == 300
        assert not window.findChild(QPushButton, "startButton").isEnabled()  # one run at a time

        window.runs_page.refresh()
        qtbot.waitUntil(lambda: runs_table_status(window).get(run_dir.name) == "running", timeout=10_000)
        assert window.run.attached  # a refresh does not attach twice

        click(qtbot, window, "stopButton")
        qtbot.waitUntil(lambda: not window.run.running, timeout=90_000)
        result = window.last_result
        assert result.outcome is Outcome.STOPPED, result.message
        assert window.training_page.status.text().startswith("Stopped gracefully at step")
        assert worker.wait(timeout=30) == 3  # the worker contract's "stopped on request"
        assert runs.summarize(run_dir).status == "stopped"
        stopped_at = runs.read_state(runs.latest_checkpoint(run_dir))["step"]
        assert 0 < stopped_at < 300
        assert window.playground_page.run_dir == run_dir  # its checkpoint can be tried at once
        assert window.findChild(QPushButton, "startButton").isEnabled()
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
