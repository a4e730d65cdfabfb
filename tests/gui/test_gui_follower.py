"""Re-attaching to a run that trains without the window: reading a growing events.jsonl, finding the
worker from its pid file, and following, stopping, killing and letting go of it.

These tests use small scripts that write a run folder the way the worker does (and can be made to
ignore a stop or die mid-line on purpose); tests/gui/test_gui_reattach.py uses the real worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qlora_studio import runs
from qlora_studio.gui.follower import BATCH, EventTail, find_worker
from qlora_studio.gui.run_control import RunControl
from qlora_studio.gui.supervisor import Outcome

HISTORY = BATCH + 500  # steps written before the window attaches: more than one list to hand over

# A run folder as the worker writes it: pid file, run_started, a long history at once, then a step
# every 20 ms. "obey" honours the STOP file like the worker (stopped event, exit 3), "ignore" does
# not, "die" ends in the middle of writing a line.
FAKE_WORKER = """
import json, os, pathlib, sys, time
run, mode = pathlib.Path(sys.argv[1]), sys.argv[2]
run.mkdir(parents=True, exist_ok=True)
(run / "worker.pid").write_text(str(os.getpid()))
out = open(run / "events.jsonl", "a")
def emit(type_, **fields):
    out.write(json.dumps({"v": 1, "type": type_, "time": time.time(), **fields}) + "\\n")
    out.flush()
emit("run_started", run_dir=str(run), plan={"max_steps": 100000})
step = 0
for _ in range(HISTORY):
    step += 1
    emit("step", step=step, loss=1.0 / step)
(run / "ready").touch()
while True:
    time.sleep(0.02)
    step += 1
    if mode == "die" and step == HISTORY + 10:
        out.write('{"v": 1, "type": "step", "st')
        out.flush()
        os._exit(1)
    if mode == "obey" and (run / "STOP").exists():
        (run / "STOP").unlink()
        emit("stopped", step=step - 1, checkpoint=str(run / "checkpoints" / "step-1"), reason="stop file")
        (run / "worker.pid").unlink()
        sys.exit(3)
    emit("step", step=step, loss=1.0 / step)
"""


@pytest.fixture
def fake_worker(tmp_path):
    started: list[subprocess.Popen] = []
    script = tmp_path / "fake_worker.py"
    script.write_text(f"HISTORY = {HISTORY}\n" + textwrap.dedent(FAKE_WORKER))

    def start(mode: str) -> tuple[Path, subprocess.Popen]:
        run_dir = tmp_path / "runs" / mode
        proc = subprocess.Popen([sys.executable, str(script), str(run_dir), mode])
        started.append(proc)
        deadline = time.monotonic() + 30
        while not (run_dir / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the fake worker did not start"
            time.sleep(0.02)
        return run_dir, proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def attach(qtbot, run_dir: Path, grace_s: float = 60.0):
    control = RunControl(run_dir.parent / "staging")
    control.grace_s = grace_s
    events: list[dict] = []
    control.event.connect(events.append)
    assert control.attach(run_dir)
    assert control.attached and control.running
    return control, events


def steps(events: list[dict]) -> list[int]:
    return [e["step"] for e in events if e["type"] == "step"]


def test_event_tail_waits_for_a_torn_line_and_skips_non_events(tmp_path):
    path = tmp_path / "events.jsonl"
    tail = EventTail(path)
    assert tail.read() == []  # no file yet
    with open(path, "w") as fh:
        fh.write(json.dumps({"type": "step", "step": 1}) + "\n")
        fh.write("a stray line\n")
        fh.write('{"type": "step", "st')
    assert [e["step"] for e in tail.read()] == [1]
    assert tail.read() == []  # the torn line is not an event yet
    with open(path, "a") as fh:
        fh.write('ep": 2}\n' + "".join(json.dumps({"type": "step", "step": s}) + "\n" for s in range(3, 8)))
    assert [e["step"] for e in tail.read(limit=3)] == [2, 3, 4]
    assert [e["step"] for e in tail.read(limit=3)] == [5, 6, 7]
    assert tail.read() == []


def test_find_worker_needs_a_live_process_that_wrote_the_pid_file(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert find_worker(run_dir) is None  # no pid file
    pid_file = run_dir / runs.PID
    pid_file.write_text(str(os.getpid()))
    assert find_worker(run_dir).pid == os.getpid()
    # The same number in a pid file written before this process started: the worker that wrote
    # it is gone and its number has been reused.
    long_ago = time.time() - 3600 * 24 * 365
    os.utime(pid_file, (long_ago, long_ago))
    assert find_worker(run_dir) is None
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()
    pid_file.write_text(str(ended.pid))
    assert find_worker(run_dir) is None
    pid_file.write_text("not a number")
    assert find_worker(run_dir) is None


def test_replays_the_history_follows_and_stops_with_the_stop_file(qtbot, fake_worker):
    run_dir, proc = fake_worker("obey")
    control, events = attach(qtbot, run_dir)
    qtbot.waitUntil(lambda: len(steps(events)) > HISTORY + 5, timeout=20_000)
    seen = steps(events)
    assert seen == list(range(1, len(seen) + 1))  # every step once, in order, across lists
    assert events[0]["type"] == "run_started"

    with qtbot.waitSignal(control.ended, timeout=20_000) as ended:
        assert control.stop()
        assert control.stopping and not control.stop()
    result = ended.args[0]
    assert result.outcome is Outcome.STOPPED, result.message
    assert result.message.startswith(f"Stopped gracefully at step {steps(events)[-1]}; checkpoint saved:")
    assert events[-1]["type"] == "stopped"
    assert proc.wait(timeout=10) == 3
    assert not control.running and not (run_dir / runs.STOP).exists()


def test_a_worker_that_ignores_the_stop_file_is_killed_after_the_grace_period(qtbot, fake_worker):
    run_dir, proc = fake_worker("ignore")
    control, _ = attach(qtbot, run_dir, grace_s=1.0)
    escalations: list[str] = []
    control.escalated.connect(escalations.append)
    with qtbot.waitSignal(control.ended, timeout=20_000) as ended:
        assert control.stop()
    result = ended.args[0]
    assert result.outcome is Outcome.KILLED
    assert "did not stop within the 1 s grace period and was killed" in result.message
    assert "No checkpoint had been written" in result.message
    assert escalations and "killing it" in escalations[0]
    assert proc.wait(timeout=10) != 0
    assert not (run_dir / runs.STOP).exists()  # a resumed run must not stop at once


def test_a_worker_that_dies_mid_line_ends_the_run_as_interrupted(qtbot, fake_worker):
    run_dir, proc = fake_worker("die")
    control, events = attach(qtbot, run_dir)
    with qtbot.waitSignal(control.ended, timeout=20_000) as ended:
        pass
    result = ended.args[0]
    assert result.outcome is Outcome.CRASHED and "interrupted" in result.message
    assert steps(events) == list(range(1, HISTORY + 10))  # all it wrote but the torn line
    assert proc.wait(timeout=10) == 1
    assert runs.summarize(run_dir).status == "interrupted"


def test_letting_go_leaves_the_worker_training(qtbot, fake_worker):
    run_dir, proc = fake_worker("obey")
    control, events = attach(qtbot, run_dir)
    qtbot.waitUntil(lambda: len(steps(events)) > HISTORY, timeout=20_000)
    with qtbot.waitSignal(control.ended, timeout=5_000) as ended:
        control.detach()
    assert ended.args[0].outcome is Outcome.DETACHED
    assert proc.poll() is None and runs.summarize(run_dir).status == "running"
    assert control.attach(run_dir)  # a window can follow it again
    with qtbot.waitSignal(control.ended, timeout=20_000):
        control.stop()
    assert proc.wait(timeout=10) == 3
