"""The monitor page's states, fed from event files in the worker's format and a fake NVML.

data/cpu_run_events.jsonl was recorded from the worker training the demo on a CPU, and
data/h200_run_events.jsonl from a real run on the H200 whose paged state was moved out and back.
data/run_events.jsonl is a longer six-step run written with events.py (allocator figures each step,
three paging events moving 512 MiB in all).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pynvml
import pytest

pytest.importorskip("PySide6", reason="the page needs PySide6")
from PySide6.QtWidgets import QComboBox, QLabel, QTableWidget  # noqa: E402
from monitor_fakes import GIB, MIB, FakeGpu, FakeNvml

from qlora_studio import events
from qlora_studio.gui.pages.monitor_page import MAX_TABLE_ROWS, MonitorPage
from qlora_studio.monitor.nvml import NO_GPU_MESSAGE, NvmlSampler
from qlora_studio.monitor.runview import describe_paging

RUN = Path(__file__).parent / "data" / "run_events.jsonl"
# Recorded from `qlora-studio train` on the offline demo on a CPU (paths shortened).
CPU_RUN = Path(__file__).parent / "data" / "cpu_run_events.jsonl"
# Recorded on the H200 by tests/engine/test_gpu.py's page-out run (QS_RECORD_DIR; paths shortened).
H200_RUN = Path(__file__).parent / "data" / "h200_run_events.jsonl"


@pytest.fixture
def make_page(qtbot):
    def make(nvml=None, **kwargs):
        sampler = NvmlSampler(nvml or FakeNvml(init_error=pynvml.NVML_ERROR_LIBRARY_NOT_FOUND), **kwargs)
        page = MonitorPage(sampler=sampler, autostart=False)
        qtbot.addWidget(page)
        return page, sampler

    return make


def _feed(page, path=RUN):
    for event in events.read(path):
        page.on_event(event)
    page.refresh()


def _points(curve) -> int:
    x, _ = curve.getData()
    return 0 if x is None else len(x)


def _rows(table: QTableWidget) -> list[list[str]]:
    return [[table.item(r, c).text() for c in range(table.columnCount())] for r in range(table.rowCount())]


def test_object_names_the_gui_relies_on(make_page):
    page, _ = make_page()
    assert isinstance(page.findChild(QLabel, "pagingStatus"), QLabel)
    assert isinstance(page.findChild(QTableWidget, "pagingTable"), QTableWidget)
    assert isinstance(page.findChild(QComboBox, "gpuSelector"), QComboBox)
    assert page.findChild(object, "monitorTimeline") is page.timeline


def test_without_a_gpu_the_page_says_so_and_still_shows_the_run(make_page, qtbot):
    page, sampler = make_page()
    sampler.tick()
    qtbot.waitUntil(lambda: page.gpu_status.text() == NO_GPU_MESSAGE, timeout=2000)
    assert not page.gpu_selector.isVisible() and page.gpu_selector.count() == 0
    assert page.paging_status.text() == "Paging: none"
    _feed(page)
    x, y = page.curves["reserved"].getData()
    assert len(x) == 6 and y[0] == pytest.approx(4.5 + 64 / 1024)
    assert _points(page.curves["used"]) == 0
    assert not page.capacity_line.isVisible()


def test_a_recorded_run_fills_the_timeline_table_and_status(make_page):
    page, _ = make_page()
    _feed(page)
    assert page.paging_status.text().startswith("Paging: 3 events, 512 MiB moved")
    assert "paged optimizer state 128 MiB" in page.paging_status.text()
    assert "626" not in page.paging_status.text() and "1,830 faults" in page.paging_status.toolTip()
    rows = _rows(page.paging_table)
    assert [r[1:] for r in rows] == [  # newest first
        ["5", "backward", "128 MiB", "128 MiB", "1,204"],
        ["3", "other", "0 B", "128 MiB", "0"],
        ["3", "optimizer", "128 MiB", "0 B", "626"],
    ]
    paging = [e for e in events.read(RUN) if e["type"] == "paging"]
    points = page.paging_markers.points()
    assert [p.data() for p in points] == [describe_paging(e) for e in paging]
    ends = {e["step"]: e["time"] for e in events.read(RUN) if e["type"] == "step"}
    assert [p.pos().x() for p in points] == [ends[e["step"]] for e in paging]  # placed at their steps
    x, y = page.curves["allocated"].getData()
    assert len(x) == 6 and y[-1] == pytest.approx(3.3)
    assert "peak 6.20 GiB" in page.summary.text()


def test_a_paging_event_that_comes_late_is_placed_at_its_step(make_page):
    page, _ = make_page()
    page.on_event(events.make("run_started", run_dir="r", config={}, model={}, device={}, versions={}, plan={}))
    for step in (1, 2, 3, 10, 20):  # step events thin out on long runs
        page.on_event({**events.make("step", step=step, loss=1.0), "time": 1000.0 + step})
    late = {**events.make("paging", step=2, phase="optimizer", bytes_htod=MIB, bytes_dtoh=0, faults=3), "time": 1030.0}
    between = {**events.make("paging", step=5, phase="other", bytes_htod=0, bytes_dtoh=MIB, faults=0), "time": 1031.0}
    ahead = {**events.make("paging", step=25, phase="optimizer", bytes_htod=MIB, bytes_dtoh=0, faults=0), "time": 1032.0}
    for event in (late, between, ahead):
        page.on_event(event)
    page.refresh()
    # Step 2's own end; step 5 ended by the time step 10's event was written; step 25 has no step event yet.
    assert [p.pos().x() for p in page.paging_markers.points()] == [1002.0, 1010.0, 1032.0]
    assert [r[1] for r in _rows(page.paging_table)] == ["25", "5", "2"]


def test_a_recorded_cpu_run_shows_why_nothing_is_paged(make_page):
    page, sampler = make_page()
    sampler.tick()
    _feed(page, CPU_RUN)
    assert page.paging_status.text() == "Paging counters unavailable: training runs on the CPU, so nothing is paged"
    assert page.paging_table.rowCount() == 0
    _, reserved = page.curves["reserved"].getData()
    assert len(reserved) >= 1 and all(v != v for v in reserved)  # the CPU has no allocator figures: gaps
    assert "torch" not in page.summary.text()


def test_paging_unavailable_is_shown_with_its_reason(make_page):
    page, _ = make_page()
    page.on_event(events.make("run_started", run_dir="r", config={}, model={}, versions={}, plan={},
                              device={"kind": "cuda", "paging_unavailable": "this GPU does not support unified-memory counters"}))
    assert page.paging_status.text() == "Paging counters unavailable: this GPU does not support unified-memory counters"
    page.on_event(events.make("run_started", run_dir="r", config={}, model={}, versions={}, plan={}, device={}))
    assert page.paging_status.text() == "Paging: none"  # a new run starts clean
    page.on_event(events.make("log", level="info", message="Paging counters unavailable: turned off"))
    assert page.paging_status.text() == "Paging counters unavailable: turned off"
    page.on_event(events.make("log", level="info", message="step 3 done"))
    assert page.paging_status.text() == "Paging counters unavailable: turned off"


def test_a_new_run_clears_the_previous_one(make_page):
    page, _ = make_page()
    _feed(page)
    page.on_event(events.make("run_started", run_dir="r2", config={}, model={}, versions={}, plan={}, device={}))
    page.refresh()
    assert page.paging_table.rowCount() == 0
    assert page.paging_status.text() == "Paging: none"
    assert len(page.paging_markers.points()) == 0
    assert _points(page.curves["reserved"]) == 0


def test_reset_forgets_the_run_but_not_the_card(make_page):
    page, sampler = make_page(FakeNvml())
    sampler.tick()
    _feed(page)
    page.reset()
    page.refresh()
    assert page.paging_status.text() == "Paging: none" and page.paging_table.rowCount() == 0
    assert _points(page.curves["allocated"]) == 0
    assert _points(page.curves["used"]) == 1


def test_the_estimated_peak_is_a_dashed_line(make_page):
    page, _ = make_page()
    page.set_estimated_peak(int(7.5 * GIB))
    page.refresh()
    assert page.estimate_line.isVisible() and page.estimate_line.value() == pytest.approx(7.5)
    assert page.estimate_line.pen.style().name == "DashLine"
    page.set_estimated_peak(None)
    page.refresh()
    assert not page.estimate_line.isVisible()


def test_gpus_the_worker_and_capacity(make_page, qtbot):
    me = os.getpid()
    nvml = FakeNvml([
        FakeGpu(name="NVIDIA H200", total=144 * GIB, reserved=512 * MIB, processes=[(1, GIB)]),
        FakeGpu(name="NVIDIA H100", total=80 * GIB, reserved=256 * MIB, used=30 * GIB, processes=[(me, 20 * GIB), (2, GIB)]),
    ])
    page, sampler = make_page(nvml)
    page.show()
    sampler.tick()
    qtbot.waitUntil(lambda: page.gpu_selector.count() == 2, timeout=2000)
    assert page.gpu_selector.isVisible()
    assert page.gpu_status.text() == "Watching NVIDIA H200, NVIDIA H100"
    page.set_worker_pid(me)
    sampler.tick()
    qtbot.waitUntil(lambda: page.gpu_selector.currentData() == 1, timeout=2000)  # the worker's GPU
    page.refresh()
    assert page.capacity_line.isVisible() and page.capacity_line.value() == pytest.approx(80 - 0.25)
    page.timeline.getPlotItem().getViewBox().updateAutoRange()
    y_low, y_high = page.timeline.getPlotItem().getViewBox().viewRange()[1]
    assert y_low <= 0.5 and y_high >= 80 - 0.25  # the card's whole capacity is in view
    _, worker = page.curves["worker"].getData()
    assert list(worker) == [pytest.approx(20.0)]
    rows = _rows(page.process_table)
    assert rows[0] == [str(me), f"{rows[0][1].split('  ')[0]}  (training worker)", "20.0 GiB"]
    assert page.process_table.item(0, 0).font().bold() and not page.process_table.item(1, 0).font().bold()
    page.gpu_selector.setCurrentIndex(0)  # a choice by hand sticks
    sampler.tick()
    qtbot.wait(150)
    assert page.gpu_selector.currentData() == 0
    assert page.capacity_line.value() == pytest.approx(144 - 0.5)
    assert [r[0] for r in _rows(page.process_table)] == ["1"]


def test_samples_cross_from_the_sampler_thread(make_page, qtbot):
    page, sampler = make_page(FakeNvml(), interval_s=0.02)
    page.show()
    sampler.start()
    try:
        qtbot.waitUntil(lambda: _points(page.curves["used"]) >= 3, timeout=5000)
        assert page.sparklines["util_gpu"].label.text() == "Utilisation: 87 %"
    finally:
        page.shutdown()
    assert sampler.on_samples == [] and sampler.on_status == []
    assert sampler.status.state == "ok"  # a sampler the page did not make keeps running
    sampler.stop()


def test_the_window_selector_sets_the_kept_history(make_page):
    page, sampler = make_page(FakeNvml())
    row = page.window_selector.findData(60.0)
    page.window_selector.setCurrentIndex(row)
    assert sampler.window_s == 60.0 and page._alloc.window_s == 60.0
    for i in range(400):  # 400 steps, one a second: only the last minute is kept
        page.on_event({"type": "step", "time": 1000.0 + i, "mem_allocated": GIB, "mem_reserved": 2 * GIB, "mem_peak": 2 * GIB})
    page.refresh()
    x, _ = page.curves["reserved"].getData()
    assert x[-1] - x[0] <= 60.0
    lo, hi = page.timeline.getPlotItem().getViewBox().viewRange()[0]
    assert hi - lo == pytest.approx(60.0, rel=0.05)


def test_the_paging_table_is_bounded(make_page):
    page, _ = make_page()
    for step in range(MAX_TABLE_ROWS + 100):
        page.on_event(events.make("paging", step=step, phase="optimizer", bytes_htod=MIB, bytes_dtoh=0, faults=1))
    assert page.paging_table.rowCount() == MAX_TABLE_ROWS
    assert page.paging_table.item(0, 1).text() == str(MAX_TABLE_ROWS + 99)
    assert page.paging_status.text().startswith(f"Paging: {MAX_TABLE_ROWS + 100} events, 600 MiB moved")


def test_the_page_imports_no_torch():
    code = (
        "import sys; import qlora_studio.gui.pages.monitor_page; "
        "bad = [m for m in ('torch', 'transformers', 'bitsandbytes') if m in sys.modules]; "
        "sys.exit(str(bad) if bad else 0)"
    )
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr or done.stdout


def test_events_arriving_fast_are_coalesced_into_few_redraws(make_page, qtbot, monkeypatch):
    page, _ = make_page()
    page.show()
    qtbot.wait(50)
    calls = []
    monkeypatch.setattr(page, "refresh", lambda: calls.append(time.monotonic()))
    for i in range(200):
        page.on_event({"type": "step", "time": 1000.0 + i, "mem_allocated": 1, "mem_reserved": 2, "mem_peak": 2})
    qtbot.wait(300)
    assert 1 <= len(calls) <= 3


def test_a_run_recorded_on_the_h200_shows_its_page_out_and_back(make_page):
    # tests/engine/test_gpu.py's page-out run: a CPU touch of the paged optimizer state after step 2
    # moves it out, the optimizer of step 3 brings it back (CUPTI's counters, 34 MiB each way).
    page, _ = make_page()
    _feed(page, H200_RUN)
    assert page.paging_status.text() == "Paging: 3 events, 68.0 MiB moved   ·   paged optimizer state 34.0 MiB"
    rows = _rows(page.paging_table)
    assert [r[1:] for r in rows] == [  # newest first
        ["3", "optimizer", "34.0 MiB", "0 B", "0"],
        ["2", "other", "0 B", "34.0 MiB", "0"],
        ["1", "other", "0 B", "0 B", "7"],
    ]
    x, y = page.curves["allocated"].getData()
    assert len(x) == 4 and y[-1] == pytest.approx(168146944 / 2**30)
    assert page.summary.text() == "torch: allocated 160 MiB, reserved 224 MiB, peak 188 MiB"
