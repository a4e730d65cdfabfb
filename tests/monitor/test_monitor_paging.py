"""The paging collector on the CPU: its null path, and its aggregation against a fake CUPTI."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from monitor_fakes import MIB, FakeCupti
from monitor_fakes import ActivityUnifiedMemoryCounterKind as Kind

from qlora_studio import events
from qlora_studio.monitor import paging
from qlora_studio.monitor.paging import NullCollector, make_collector, paged_state_bytes


@pytest.fixture
def cupti():
    fake = FakeCupti()
    yield fake


@pytest.fixture
def collector(cupti):
    c = make_collector(True, "cuda:0", cupti_module=cupti, init_cuda=cupti.init_cuda, synchronize=cupti.synchronize)
    assert c.unavailable is None, c.unavailable
    yield c
    c.close()


# ---- the null path -----------------------------------------------------------------------


def _null_contract(c):
    assert isinstance(c, NullCollector)
    assert isinstance(c.unavailable, str) and c.unavailable
    with c.phase("forward"):
        pass
    assert c.flush(1) == []
    c.close()


def test_off_when_turned_off():
    c = make_collector(False, "cuda:0")
    _null_contract(c)
    assert c.unavailable == "turned off"


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "mps"])
@pytest.mark.parametrize("enabled", [True, False])
def test_off_on_the_cpu(device, enabled):
    c = make_collector(enabled, device)
    _null_contract(c)
    assert c.unavailable == "training runs on the CPU, so nothing is paged"


def test_off_without_cupti_python(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupti", None)
    c = make_collector(True, torch.device("cuda", 0), init_cuda=lambda i: pytest.fail("CUDA touched"))
    _null_contract(c)
    assert "cupti-python" in c.unavailable


def test_off_when_another_profiler_is_injected(monkeypatch, cupti):
    monkeypatch.setenv("CUDA_INJECTION64_PATH", "/opt/nsight/libToolsInjection64.so")
    c = make_collector(True, "cuda", cupti_module=cupti, init_cuda=cupti.init_cuda)
    _null_contract(c)
    assert "another profiler" in c.unavailable
    assert not cupti.enabled


def test_off_when_the_device_does_not_support_the_counters():
    cupti = FakeCupti(device_supported=False)
    c = make_collector(True, 0, cupti_module=cupti, init_cuda=cupti.init_cuda, synchronize=cupti.synchronize)
    _null_contract(c)
    assert c.unavailable.startswith("this GPU does not support unified-memory counters")
    assert "ERROR_UM_PROFILING_NOT_SUPPORTED_ON_DEVICE" in c.unavailable


def test_enabling_before_cuda_is_initialised_is_refused_with_a_reason():
    cupti = FakeCupti()
    c = make_collector(True, "cuda:0", cupti_module=cupti, init_cuda=lambda i: None, synchronize=cupti.synchronize)
    _null_contract(c)
    assert "CUDA was not ready" in c.unavailable and "ERROR_NOT_READY" in c.unavailable


def test_cuda_failing_to_start_is_a_reason():
    def broken(index):
        raise RuntimeError("no CUDA GPUs are available")

    c = make_collector(True, "cuda:0", cupti_module=FakeCupti(), init_cuda=broken)
    _null_contract(c)
    assert "no CUDA GPUs are available" in c.unavailable


def test_cuda_is_initialised_before_the_counters_are_configured(cupti, collector):
    assert cupti.configured_while_ready and cupti.enabled
    assert cupti.configured == {Kind.BYTES_TRANSFER_HTOD, Kind.BYTES_TRANSFER_DTOH, Kind.GPU_PAGE_FAULT}


def test_one_collector_per_process(cupti, collector):
    second = make_collector(True, "cuda:0", cupti_module=FakeCupti(), init_cuda=lambda i: None)
    assert isinstance(second, NullCollector) and "already running" in second.unavailable
    collector.close()
    other = FakeCupti()
    third = make_collector(True, "cuda:0", cupti_module=other, init_cuda=other.init_cuda, synchronize=other.synchronize)
    assert third.unavailable is None
    third.close()


# ---- aggregation ---------------------------------------------------------------------------


def _step(cupti, c, *, forward=(), backward=(), optimizer=(), between=()):
    for kind, value in between:
        cupti.record(kind, value)  # e.g. the CPU touching the optimizer state between steps
    with c.phase("forward"):
        for kind, value in forward:
            cupti.enqueue(kind, value)  # asynchronous: happens when the device gets to it
    with c.phase("backward"):
        for kind, value in backward:
            cupti.enqueue(kind, value)
    with c.phase("optimizer"):
        for kind, value in optimizer:
            cupti.enqueue(kind, value)


def test_totals_per_phase_nonzero_only_in_phase_order(cupti, collector):
    _step(
        cupti, collector,
        between=[(Kind.BYTES_TRANSFER_DTOH, 64 * MIB), (Kind.BYTES_TRANSFER_DTOH, 64 * MIB)],
        forward=[(Kind.BYTES_TRANSFER_DTOH, 2 * MIB)],
        optimizer=[(Kind.BYTES_TRANSFER_HTOD, 100 * MIB), (Kind.BYTES_TRANSFER_HTOD, 28 * MIB),
                   (Kind.GPU_PAGE_FAULT, 600), (Kind.GPU_PAGE_FAULT, 26)],
    )
    out = collector.flush(7)
    assert out == [
        {"phase": "forward", "bytes_htod": 0, "bytes_dtoh": 2 * MIB, "faults": 0},
        {"phase": "optimizer", "bytes_htod": 128 * MIB, "bytes_dtoh": 0, "faults": 626},
        {"phase": "other", "bytes_htod": 0, "bytes_dtoh": 128 * MIB, "faults": 0},
    ]
    for totals in out:  # what the training loop emits is a valid paging event
        event = events.make("paging", step=7, **totals)
        assert set(events.EVENT_FIELDS["paging"]) <= set(event)
    assert collector.flush(8) == []  # totals are since the last flush


def test_async_work_is_credited_to_the_phase_that_launched_it(cupti, collector):
    # Without the synchronise at the end of "forward" these bytes would move during "backward".
    _step(cupti, collector, forward=[(Kind.BYTES_TRANSFER_HTOD, 4 * MIB)], backward=[])
    assert collector.flush(1) == [{"phase": "forward", "bytes_htod": 4 * MIB, "bytes_dtoh": 0, "faults": 0}]


def test_late_records_land_in_their_phase_at_the_next_flush(cupti, collector):
    with collector.phase("backward"):
        cupti.record(Kind.BYTES_TRANSFER_DTOH, 8 * MIB, late=True)
    assert collector.flush(1) == []
    cupti.release_held()
    _step(cupti, collector)
    assert collector.flush(2) == [{"phase": "backward", "bytes_htod": 0, "bytes_dtoh": 8 * MIB, "faults": 0}]


def test_phases_may_repeat_within_a_step(cupti, collector):
    for _ in range(4):  # gradient accumulation: forward and backward once per micro-batch
        _step(cupti, collector, forward=[(Kind.GPU_PAGE_FAULT, 3)], backward=[(Kind.GPU_PAGE_FAULT, 2)])
    assert collector.flush(1) == [
        {"phase": "forward", "bytes_htod": 0, "bytes_dtoh": 0, "faults": 12},
        {"phase": "backward", "bytes_htod": 0, "bytes_dtoh": 0, "faults": 8},
    ]


def test_an_exception_inside_a_phase_still_closes_it(cupti, collector):
    with pytest.raises(MemoryError):
        with collector.phase("forward"):
            cupti.record(Kind.BYTES_TRANSFER_HTOD, MIB)
            raise MemoryError("CUDA out of memory")
    cupti.record(Kind.BYTES_TRANSFER_HTOD, 2 * MIB)  # after the phase: "other"
    out = {d["phase"]: d["bytes_htod"] for d in collector.flush(1)}
    assert out == {"forward": MIB, "other": 2 * MIB}


def test_failure_mid_run_turns_the_counters_off_and_says_so_once(cupti, collector, caplog):
    caplog.set_level(logging.INFO)
    _step(cupti, collector, optimizer=[(Kind.BYTES_TRANSFER_HTOD, MIB)])
    cupti.fail_flush = True
    assert collector.flush(1) == []
    assert collector.unavailable and "flush" in collector.unavailable
    flushes = cupti.flushes
    for step in range(2, 10):
        _step(cupti, collector, optimizer=[(Kind.BYTES_TRANSFER_HTOD, MIB)])
        assert collector.flush(step) == []
    assert not cupti.enabled  # counters disabled
    assert cupti.flushes == flushes  # and no more calls into CUPTI
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith(paging.UNAVAILABLE_PREFIX)


def test_close_stops_the_counters(cupti, collector):
    collector.close()
    assert not cupti.enabled
    assert collector.unavailable
    collector.close()  # twice is fine
    with collector.phase("forward"):
        pass
    assert collector.flush(1) == []


# ---- the paged optimizer's state -------------------------------------------------------------


def test_paged_state_bytes_counts_only_managed_state():
    paged1 = torch.zeros(1000, dtype=torch.float32)
    paged2 = torch.zeros(1000, dtype=torch.float32)
    paged1.is_paged = True
    paged2.is_paged = True
    plain = torch.zeros(500, dtype=torch.float32)
    opt = type("Opt", (), {})()
    opt.state = {"p1": {"state1": paged1, "state2": paged2, "step": 3}, "p2": {"state1": plain}}
    assert paged_state_bytes(opt) == 8000


def test_paged_state_bytes_on_the_cpu_is_zero():
    import bitsandbytes as bnb

    p = torch.nn.Parameter(torch.zeros(256, 512))
    opt = bnb.optim.PagedAdamW32bit([p], lr=1e-3)
    p.grad = torch.ones_like(p)
    with pytest.warns(UserWarning, match="not supported on CPU"):
        opt.step()
    assert paged_state_bytes(opt) == 0
