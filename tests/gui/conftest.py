"""Fixtures for the desktop app's tests: an offscreen Qt platform, isolated app homes holding the
real demo, and a guard that fails a test which leaves a background thread or a worker process running."""

from __future__ import annotations

import os

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # before Qt is imported anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import shutil
import time
from pathlib import Path

import psutil
import pytest
from PySide6.QtWidgets import QApplication

from qlora_studio.gui import jobs


@pytest.fixture
def app_home(tmp_path: Path, demo_template: Path) -> Path:
    """A fresh data folder for one app instance, with the demo (tests/conftest.py) in place."""
    home = tmp_path / "home"
    home.mkdir()
    shutil.copytree(demo_template, home / "demo")
    return home


@pytest.fixture
def make_window(qtbot, app_home: Path):
    """Build main windows on ``app_home`` (a second one sees what the first one saved)."""
    from qlora_studio.gui.app_state import AppState
    from qlora_studio.gui.main_window import MainWindow

    made = []

    def make(home: Path | None = None, **kwargs):
        window = MainWindow(AppState.create(home or app_home), **kwargs)
        window.ask_close_during_run = lambda: "stop"  # no modal question in tests
        qtbot.addWidget(window)
        window.show()
        qtbot.waitExposed(window)
        made.append(window)
        return window

    yield make
    for window in made:
        if window.run.running:
            window.run.kill()
            qtbot.waitUntil(lambda w=window: not w.run.running, timeout=15000)


@pytest.fixture
def window(make_window):
    return make_window()


def _children() -> list[psutil.Process]:
    try:
        return [p for p in psutil.Process().children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.Error:
        return []


@pytest.fixture(autouse=True)
def no_leftovers():
    """Fail the test if a background job, the supervisor thread or a worker process outlives it."""
    yield
    # Give jobs that are ending (a cancelled scan, a worker writing its last line) a moment.
    deadline = time.monotonic() + 10
    while (jobs.running_jobs() or _children()) and time.monotonic() < deadline:
        app = QApplication.instance()
        if app is not None:
            app.processEvents()
        time.sleep(0.05)
    threads = [type(job).__name__ for job in jobs.running_jobs()]
    children = _children()
    names = [" ".join(p.cmdline()[:6]) for p in children if p.is_running()]
    for child in children:
        try:
            child.kill()
        except psutil.Error:
            pass
    for job in jobs.running_jobs():
        cancel = getattr(job, "cancel", None)
        if cancel is not None:
            cancel()
    assert not threads, f"background jobs still running after the test: {threads}"
    assert not names, f"processes still running after the test: {names}"
