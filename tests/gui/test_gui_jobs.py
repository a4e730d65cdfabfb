"""LatestOnlyRunner: one background job at a time, and only the latest request's answer is handed on."""

from __future__ import annotations

import threading

from qlora_studio.gui import jobs
from qlora_studio.gui.jobs import LatestOnlyRunner


class Gated:
    """A function that records its calls and their threads, and waits for the test before it answers."""

    def __init__(self):
        self.calls: list[int] = []
        self.threads: list[int] = []
        self.gate = threading.Event()

    def __call__(self, n: int) -> int:
        self.calls.append(n)
        self.threads.append(threading.get_ident())
        self.gate.wait(10)
        if n < 0:
            raise ValueError(f"negative request {n}")
        return n * 10


def test_requests_made_while_a_job_runs_coalesce_to_the_latest(qtbot):
    runner = LatestOnlyRunner()
    fn = Gated()
    answers: list[int] = []
    for n in (1, 2, 3, 4):
        runner.submit(fn, n, on_success=answers.append)
        qtbot.waitUntil(lambda: bool(fn.calls), timeout=5_000)
    assert fn.calls == [1] and runner.busy()  # 2 to 4 wait; each replaced the one before
    fn.gate.set()
    qtbot.waitUntil(lambda: not runner.busy(), timeout=5_000)
    assert fn.calls == [1, 4]  # 2 and 3 never ran
    assert answers == [40]  # the answer to 1 was superseded before it came
    assert threading.get_ident() not in fn.threads


def test_a_failure_goes_to_the_latest_requests_handler(qtbot):
    runner = LatestOnlyRunner()
    fn = Gated()
    fn.gate.set()
    answers: list[int] = []
    errors: list[BaseException] = []
    runner.submit(fn, -1, on_success=answers.append, on_failure=errors.append)
    qtbot.waitUntil(lambda: bool(errors), timeout=5_000)
    assert answers == [] and isinstance(errors[0], ValueError) and "negative request -1" in str(errors[0])
    qtbot.waitUntil(lambda: not runner.busy(), timeout=5_000)
    runner.submit(fn, 5, on_success=answers.append, on_failure=errors.append)
    qtbot.waitUntil(lambda: bool(answers), timeout=5_000)
    assert answers == [50] and len(errors) == 1
    qtbot.waitUntil(lambda: not runner.busy(), timeout=5_000)


def test_cancel_drops_the_running_answer_and_the_waiting_request(qtbot):
    runner = LatestOnlyRunner()
    fn = Gated()
    answers: list[int] = []
    errors: list[BaseException] = []
    runner.submit(fn, 1, on_success=answers.append, on_failure=errors.append)
    qtbot.waitUntil(lambda: bool(fn.calls), timeout=5_000)
    runner.submit(fn, -2, on_success=answers.append, on_failure=errors.append)
    runner.cancel()
    fn.gate.set()
    qtbot.waitUntil(lambda: not runner.busy(), timeout=5_000)
    qtbot.wait(50)  # room for a (wrongly) queued answer to arrive
    assert fn.calls == [1] and answers == [] and errors == []
    runner.submit(fn, 3, on_success=answers.append)  # a request after cancel() is answered
    qtbot.waitUntil(lambda: answers == [30], timeout=5_000)
    qtbot.waitUntil(lambda: not runner.busy(), timeout=5_000)


def test_shutdown_waits_for_the_running_job_and_starts_no_other(qtbot):
    runner = LatestOnlyRunner()
    fn = Gated()
    runner.submit(fn, 1)
    qtbot.waitUntil(lambda: bool(fn.calls), timeout=5_000)
    runner.submit(fn, 2)
    threading.Timer(0.2, fn.gate.set).start()
    runner.shutdown(5_000)
    assert fn.calls == [1] and not jobs.running_jobs()  # it has ended; 2 was forgotten
    qtbot.waitUntil(lambda: not runner.busy(), timeout=5_000)
    assert fn.calls == [1]
