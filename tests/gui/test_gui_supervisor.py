"""The supervisor's handling of every way a worker can end.

The real worker always honours a stop request and cannot be made to crash on cue, so these tests
run small scripts that follow (or break) the worker contract on purpose; tests/gui/test_window.py
drives the real worker.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from qlora_studio import runs
from qlora_studio.gui.supervisor import Outcome, Supervisor, worker_command

PRELUDE = """
import json, sys, time
def emit(type_, **fields):
    sys.stdout.write(json.dumps({"v": 1, "type": type_, "time": time.time(), **fields}) + "\\n")
    sys.stdout.flush()
"""


def script(tmp_path: Path, body: str) -> list[str]:
    path = tmp_path / "worker.py"
    path.write_text(PRELUDE + textwrap.dedent(body))
    return [sys.executable, str(path)]


def run_to_end(qtbot, sup: Supervisor, timeout: int = 20000):
    events, logs = [], []
    sup.event.connect(events.append)
    sup.log_line.connect(logs.append)
    with qtbot.waitSignal(sup.run_ended, timeout=timeout) as blocker:
        sup.start()
    sup.wait(5000)
    return blocker.args[0], events, logs


def test_events_become_signals_and_exit_0_is_finished(qtbot, tmp_path):
    argv = script(tmp_path, """
        emit("run_started", run_dir="x", plan={"max_steps": 3})
        print("not an event line")
        sys.stderr.write("a log line on stderr\\n")
        for step in (1, 2, 3):
            emit("step", step=step, loss=3.0 / step)
        emit("finished", step=3, adapter="/runs/x/adapter")
    """)
    result, events, logs = run_to_end(qtbot, Supervisor(argv, tmp_path / "run"))
    assert result.outcome is Outcome.FINISHED and result.exit_code == 0
    assert [e["type"] for e in events] == ["run_started", "step", "step", "step", "finished"]
    assert [e["loss"] for e in events if e["type"] == "step"] == [3.0, 1.5, 1.0]
    assert "not an event line" in logs and "a log line on stderr" in logs
    assert "/runs/x/adapter" in result.message


def test_stop_request_reaches_the_worker_by_stdin_and_stop_file(qtbot, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = script(tmp_path, f"""
        import pathlib
        emit("step", step=1, loss=1.0)
        line = sys.stdin.readline().strip()
        stop_file = pathlib.Path({str(run_dir)!r}) / "STOP"
        emit("log", level="info", message=f"got {{line}}, stop file {{stop_file.exists()}}")
        stop_file.unlink()
        emit("stopped", step=1, checkpoint="ckpt-1", reason="stop requested")
        sys.exit(3)
    """)
    sup = Supervisor(argv, run_dir, grace_s=30)
    sup.event.connect(lambda e: e["type"] == "step" and sup.request_stop())
    result, events, _ = run_to_end(qtbot, sup)
    assert result.outcome is Outcome.STOPPED and result.exit_code == 3
    assert any(e.get("message") == "got stop, stop file True" for e in events)
    assert "Stopped gracefully at step 1" in result.message and "ckpt-1" in result.message
    assert not sup.request_stop()  # nothing left to stop


def test_worker_that_ignores_stop_is_killed_after_the_grace_period(qtbot, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    argv = script(tmp_path, """
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        emit("step", step=1, loss=1.0)
        time.sleep(120)
    """)
    sup = Supervisor(argv, run_dir, grace_s=1.0)
    escalations = []
    sup.stop_escalated.connect(escalations.append)
    sup.event.connect(lambda e: e["type"] == "step" and sup.request_stop())
    result, _, _ = run_to_end(qtbot, sup)
    assert result.outcome is Outcome.KILLED
    assert "grace period" in result.message and "No checkpoint" in result.message
    assert escalations and "did not stop within 1 s" in escalations[0]
    assert not (run_dir / runs.STOP).exists()  # a resumed run must not stop at once


def test_bad_input_shows_the_failed_event(qtbot, tmp_path):
    argv = script(tmp_path, """
        emit("failed", kind="bad_data", message="data.jsonl, line 3: malformed JSON", advice="Fix line 3.", log="")
        sys.stderr.write("qlora-studio: error: data.jsonl, line 3: malformed JSON\\n")
        sys.exit(2)
    """)
    result, _, _ = run_to_end(qtbot, Supervisor(argv, tmp_path / "run"))
    assert result.outcome is Outcome.FAILED and result.exit_code == 2
    assert result.message == "data.jsonl, line 3: malformed JSON"
    assert result.failure["advice"] == "Fix line 3."


def test_failure_without_event_uses_the_last_stderr_line(qtbot, tmp_path):
    argv = script(tmp_path, """
        sys.stderr.write("qlora-studio: error: config.toml: unknown key train.foo\\n")
        sys.exit(2)
    """)
    result, _, _ = run_to_end(qtbot, Supervisor(argv, tmp_path / "run"))
    assert result.outcome is Outcome.FAILED
    assert result.message == "qlora-studio: error: config.toml: unknown key train.foo"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_crash_in_native_code_is_reported_not_fatal(qtbot, tmp_path):
    argv = script(tmp_path, """
        import os
        emit("step", step=1, loss=1.0)
        os.abort()
    """)
    result, events, _ = run_to_end(qtbot, Supervisor(argv, tmp_path / "run"))
    assert result.outcome is Outcome.CRASHED
    assert "SIGABRT" in result.message
    assert events and events[0]["type"] == "step"


def test_kill_on_request(qtbot, tmp_path):
    argv = script(tmp_path, """
        emit("step", step=1, loss=1.0)
        time.sleep(120)
    """)
    sup = Supervisor(argv, tmp_path / "run", grace_s=60)
    sup.event.connect(lambda e: sup.kill())
    result, _, _ = run_to_end(qtbot, sup)
    assert result.outcome is Outcome.KILLED and "on request" in result.message


def test_worker_command_follows_the_contract(tmp_path):
    cfg, run = tmp_path / "c.toml", tmp_path / "run"
    assert worker_command(cfg, run)[1:] == ["-m", "qlora_studio", "train", str(cfg), "--output", str(run), "--events"]
    assert worker_command(None, run, resume=True)[3:] == ["train", "--resume", str(run), "--events"]
    assert worker_command(cfg, run, max_steps=5)[-3:] == ["--max-steps", "5", "--events"]
