"""The paging collector on the CPU: its null path, and its aggregation against a fake CUPTI and a
fake torch.cuda whose events run on the same simulated device."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from monitor_fakes import MIB, FakeClock, FakeCuda, FakeCupti
from monitor_fakes import ActivityUnifiedMemoryCounterKind as Kind

from qlora_studio import events
from qlora_studio.monitor import paging
from qlora_studio.monitor.paging import (
    CudaClock,
    NullCollector,
    make_collector,
    paged_state_bytes,
)


@pytest.fixture
def cupti():
    fake = FakeCupti()
    yield fake


@pytest.fixture
def cuda(cupti):
    return FakeCuda(cupti)


@pytest.fixture
def wall():
    return FakeClock()


def _make(cupti, cuda=None, **kw):
    cuda = cuda or FakeCuda(cupti)
    return make_collector(True, "cuda:0", cupti_module=cupti, init_cuda=cupti.init_cuda,
                          clock=CudaClock(cupti.get_timestamp, 0, cuda=cuda), **kw)


@pytest.fixture
def collector(cupti, cuda, wall):
    c = _make(cupti, cuda, now=wall, flush_interval_s=1.0)  # the tests count in steps of one second
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
    assert c.flush(2, force=True) == []
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
    c = make_collector(True, 0, cupti_module=cupti, init_cuda=cupti.init_cuda,
                       clock=CudaClock(cupti.get_timestamp, 0, cuda=FakeCuda(cupti)))
    _null_contract(c)
    assert c.unavailable.startswith("this GPU does not support unified-memory counters")
    assert "ERROR_UM_PROFILING_NOT_SUPPORTED_ON_DEVICE" in c.unavailable


def test_enabling_before_cuda_is_initialised_is_refused_with_a_reason():
    cupti = FakeCupti()
    c = make_collector(True, "cuda:0", cupti_module=cupti, init_cuda=lambda i: None,
                       clock=CudaClock(cupti.get_timestamp, 0, cuda=FakeCuda(cupti)))
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
    third = _make(other)
    assert third.unavailable is None
    third.close()


# ---- the GPU clock --------------------------------------------------------------------------


def test_the_clock_reads_markers_back_on_cuptis_clock(cupti, cuda):
    clock = CudaClock(cupti.get_timestamp, 0, cuda=cuda)
    at_first = cupti.clock_ns
    first = clock.mark()  # idle device: stamped at once
    cupti.enqueue(Kind.BYTES_TRANSFER_HTOD, MIB)  # work queued before the second marker
    second = clock.mark()
    cupti.advance(50_000)
    assert second.gpu_ns is None  # still behind the queued work
    times = clock.resolve([first, second])
    assert times[0] == at_first
    assert times[1] > times[0] + 50_000  # stamped only when the device got there, after the work
    assert times[1] - times[0] == second.gpu_ns - first.gpu_ns
    assert cuda.recorded == 3  # two markers and the anchor


def test_the_clock_says_what_went_wrong_with_a_marker(cupti, cuda):
    clock = CudaClock(cupti.get_timestamp, 0, cuda=cuda)
    with pytest.raises(RuntimeError, match="must be recorded"):
        clock.resolve([cuda.Event(enable_timing=True)])
    with pytest.raises(RuntimeError, match="enable_timing"):
        untimed = cuda.Event()
        untimed.record(cuda.current_stream(0))
        clock.resolve([untimed])


# ---- aggregation ---------------------------------------------------------------------------


def _step(cupti, c, *, forward=(), backward=(), optimizer=(), between=()):
    """One step as the engine runs it: three phases, its own synchronise, then nothing else."""
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
    cupti.synchronize()  # the training loop's torch.cuda.synchronize at the end of the step


def _totals(phase, *, step, htod=0, dtoh=0, faults=0):
    return {"step": step, "phase": phase, "bytes_htod": htod, "bytes_dtoh": dtoh, "faults": faults}


def test_totals_per_phase_nonzero_only_in_phase_order(cupti, collector):
    _step(
        cupti, collector,
        between=[(Kind.BYTES_TRANSFER_DTOH, 64 * MIB), (Kind.BYTES_TRANSFER_DTOH, 64 * MIB)],
        forward=[(Kind.BYTES_TRANSFER_DTOH, 2 * MIB)],
        optimizer=[(Kind.BYTES_TRANSFER_HTOD, 100 * MIB), (Kind.BYTES_TRANSFER_HTOD, 28 * MIB),
                   (Kind.GPU_PAGE_FAULT, 600), (Kind.GPU_PAGE_FAULT, 26)],
    )
    out = collector.flush(7, force=True)
    assert out == [
        _totals("forward", step=7, dtoh=2 * MIB),
        _totals("optimizer", step=7, htod=128 * MIB, faults=626),
        _totals("other", step=7, dtoh=128 * MIB),
    ]
    for totals in out:  # what the training loop emits is a valid paging event
        event = events.make("paging", **{"step": 7, **totals})
        assert set(events.EVENT_FIELDS["paging"]) <= set(event)
    assert collector.flush(8, force=True) == []  # totals are since the last flush


def test_phases_do_not_synchronise_the_device(cupti, collector):
    with collector.phase("forward"):
        cupti.enqueue(Kind.BYTES_TRANSFER_HTOD, MIB)
    with collector.phase("backward"):
        cupti.enqueue(Kind.GPU_PAGE_FAULT, 3)
    with collector.phase("optimizer"):
        pass
    assert cupti.syncs == 0
    assert len(cupti.gpu_queue) == 2 + 5  # the work and the markers behind it (the first ran at once)
    assert collector.flush(1) == []  # within the interval: no wait either
    assert cupti.syncs == 0 and cupti.flushes == 0
    assert collector.flush(2, force=True) == [
        _totals("forward", step=1, htod=MIB), _totals("backward", step=1, faults=3),
    ]
    assert cupti.syncs >= 1 and cupti.flushes == 1


def test_async_work_is_credited_to_the_phase_that_launched_it(cupti, collector):
    # The bytes move while the device runs forward's work, after the CPU has left "forward".
    _step(cupti, collector, forward=[(Kind.BYTES_TRANSFER_HTOD, 4 * MIB)], backward=[(Kind.GPU_PAGE_FAULT, 1)])
    assert collector.flush(1, force=True) == [_totals("forward", step=1, htod=4 * MIB),
                                              _totals("backward", step=1, faults=1)]


def test_the_default_interval_keeps_drains_rare(cupti, cuda, wall):
    c = _make(cupti, cuda, now=wall)  # a drain costs about 20 ms on an H200: 0.4% of 5 s
    assert c.flush(0) == []
    wall.advance(4.9)
    c.flush(1)
    assert cupti.flushes == 0
    wall.advance(0.2)
    c.flush(2)
    assert cupti.flushes == 1
    c.close()


def test_flushes_within_the_interval_leave_cupti_alone_until_it_has_passed(cupti, collector, wall):
    assert collector.flush(0) == []  # just started: the first second has not passed
    for step in (1, 2, 3):
        _step(cupti, collector, optimizer=[(Kind.BYTES_TRANSFER_HTOD, step * MIB)])
        wall.advance(0.3)
        assert collector.flush(step) == []
    assert cupti.flushes == 0
    _step(cupti, collector, optimizer=[(Kind.BYTES_TRANSFER_HTOD, 4 * MIB)])
    wall.advance(0.2)  # 1.1 s since the collector started
    out = collector.flush(4)
    assert cupti.flushes == 1
    assert out == [_totals("optimizer", step=s, htod=s * MIB) for s in (1, 2, 3, 4)]
    _step(cupti, collector, optimizer=[(Kind.BYTES_TRANSFER_HTOD, MIB)])
    wall.advance(0.5)
    assert collector.flush(5) == [] and cupti.flushes == 1  # the interval counts from the last drain
    out = collector.flush(6, force=True)
    assert cupti.flushes == 2
    assert out == [_totals("optimizer", step=5, htod=MIB)]


def test_the_interval_is_a_setting(cupti):
    wall = FakeClock()
    c = _make(cupti, now=wall, flush_interval_s=0.0)
    try:
        for step in (1, 2):
            _step(cupti, c, backward=[(Kind.GPU_PAGE_FAULT, step)])
            assert c.flush(step) == [_totals("backward", step=step, faults=step)]
        assert cupti.flushes == 2
    finally:
        c.close()


def test_late_records_are_credited_to_their_own_step(cupti, collector):
    with collector.phase("backward"):
        cupti.record(Kind.BYTES_TRANSFER_DTOH, 8 * MIB, late=True)  # CUPTI holds it past the next flush
    assert collector.flush(1, force=True) == []
    cupti.release_held()
    _step(cupti, collector, forward=[(Kind.GPU_PAGE_FAULT, 5)])
    assert collector.flush(2, force=True) == [
        _totals("backward", step=1, dtoh=8 * MIB), _totals("forward", step=2, faults=5),
    ]


def test_records_outside_phases_go_to_the_next_flush_calls_step(cupti, collector, wall):
    cupti.record(Kind.BYTES_TRANSFER_DTOH, MIB)  # before any phase: step 1 is being prepared
    _step(cupti, collector)
    collector.flush(1)
    _step(cupti, collector, between=[(Kind.BYTES_TRANSFER_DTOH, 2 * MIB)])  # a touch before step 2
    collector.flush(2)
    _step(cupti, collector, between=[(Kind.BYTES_TRANSFER_DTOH, 4 * MIB)])
    cupti.record(Kind.BYTES_TRANSFER_DTOH, 8 * MIB)  # after step 3's phases, before its flush call
    assert cupti.flushes == 0
    assert collector.flush(3, force=True) == [
        _totals("other", step=1, dtoh=MIB), _totals("other", step=2, dtoh=2 * MIB),
        _totals("other", step=3, dtoh=12 * MIB),
    ]


def test_phases_may_repeat_within_a_step(cupti, collector):
    for _ in range(4):  # gradient accumulation: forward and backward once per micro-batch
        _step(cupti, collector, forward=[(Kind.GPU_PAGE_FAULT, 3)], backward=[(Kind.GPU_PAGE_FAULT, 2)])
    assert collector.flush(1, force=True) == [
        _totals("forward", step=1, faults=12), _totals("backward", step=1, faults=8),
    ]


def test_many_markers_waiting_drain_cupti_before_the_interval(cupti):
    cupti.init_cuda(0)
    # 7 markers per step here (3 phases and the flush call): the third step's flush drains.
    c = paging.CuptiPagingCollector(cupti, 0, clock=CudaClock(cupti.get_timestamp, 0, cuda=FakeCuda(cupti)),
                                    now=FakeClock(), max_waiting=20)
    try:
        out = []
        for step in range(1, 4):
            _step(cupti, c, forward=[(Kind.GPU_PAGE_FAULT, step)])
            out += c.flush(step)
        assert cupti.flushes == 1
        assert out == [_totals("forward", step=s, faults=s) for s in (1, 2, 3)]
    finally:
        c.close()


def test_history_for_late_records_is_bounded(cupti, collector, wall):
    for step in range(1, 40):
        _step(cupti, collector, forward=[(Kind.GPU_PAGE_FAULT, 1)])
        assert collector.flush(step, force=True) == [_totals("forward", step=step, faults=1)]
    assert len(collector._calls) == len(collector._groups) == paging._KEEP_FLUSHES
    # A record older than the history kept cannot be placed: "other", at the flush that reports it.
    with collector.phase("forward"):
        cupti.record(Kind.BYTES_TRANSFER_DTOH, MIB, late=True)
    for step in range(40, 40 + paging._KEEP_FLUSHES + 1):
        _step(cupti, collector)
        assert collector.flush(step, force=True) == []
    cupti.release_held()
    assert collector.flush(99, force=True) == [_totals("other", step=99, dtoh=MIB)]


def test_an_exception_inside_a_phase_still_closes_it(cupti, collector):
    with pytest.raises(MemoryError):
        with collector.phase("forward"):
            cupti.record(Kind.BYTES_TRANSFER_HTOD, MIB)
            raise MemoryError("CUDA out of memory")
    cupti.record(Kind.BYTES_TRANSFER_HTOD, 2 * MIB)  # after the phase: "other"
    out = {d["phase"]: d["bytes_htod"] for d in collector.flush(1, force=True)}
    assert out == {"forward": MIB, "other": 2 * MIB}


def _one_warning(caplog):
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and warnings[0].getMessage().startswith(paging.UNAVAILABLE_PREFIX)
    return warnings[0].getMessage()


def test_failure_mid_run_turns_the_counters_off_and_says_so_once(cupti, cuda, collector, caplog):
    caplog.set_level(logging.INFO)
    _step(cupti, collector, optimizer=[(Kind.BYTES_TRANSFER_HTOD, MIB)])
    cupti.fail_flush = True
    assert collector.flush(1, force=True) == []
    assert collector.unavailable and "flush" in collector.unavailable
    flushes, recorded = cupti.flushes, cuda.recorded
    for step in range(2, 10):
        _step(cupti, collector, optimizer=[(Kind.BYTES_TRANSFER_HTOD, MIB)])
        assert collector.flush(step, force=True) == []
    assert not cupti.enabled  # counters disabled
    assert cupti.flushes == flushes  # and no more calls into CUPTI
    assert cuda.recorded == recorded  # nor markers
    _one_warning(caplog)


def test_a_failed_cuda_context_is_not_resolved_twice(cupti, cuda, collector, caplog):
    caplog.set_level(logging.INFO)
    _step(cupti, collector, optimizer=[(Kind.BYTES_TRANSFER_HTOD, MIB)])
    assert collector.flush(1) == []  # markers waiting
    cuda.broken = "CUDA error: an illegal memory access was encountered"
    assert collector.flush(2, force=True) == []
    assert collector.unavailable == f"could not record a GPU marker ({cuda.broken})"
    assert not cupti.enabled
    cuda.broken = None  # whatever CUDA does next, the collector has let go
    _step(cupti, collector)
    assert collector.flush(3, force=True) == []
    assert "illegal memory access" in _one_warning(caplog)


def test_markers_that_cannot_be_read_back_turn_the_counters_off(cupti, collector, caplog):
    caplog.set_level(logging.INFO)
    _step(cupti, collector, optimizer=[(Kind.BYTES_TRANSFER_HTOD, MIB)])
    cupti.fail_timestamp = cupti.Result.ERROR_NOT_INITIALIZED
    flushes = cupti.flushes
    assert collector.flush(1, force=True) == []
    assert collector.unavailable == "could not read the GPU markers' times (ERROR_NOT_INITIALIZED)"
    assert cupti.flushes == flushes + 1  # only close's own flush, after disabling the counters
    assert not cupti.enabled
    _one_warning(caplog)


def test_an_exception_from_a_broken_device_inside_a_phase_is_not_hidden(cupti, cuda, collector, caplog):
    with pytest.raises(RuntimeError, match="device-side assert"), collector.phase("backward"):
        cuda.broken = "CUDA error: device-side assert triggered"
        raise RuntimeError(cuda.broken)
    assert collector.unavailable and "device-side assert" in collector.unavailable
    assert not cupti.enabled


def test_the_default_clock_without_a_gpu_turns_the_counters_off_with_a_reason(cupti, caplog):
    if torch.cuda.is_available():
        pytest.skip("this checks the default clock on a machine without CUDA")
    caplog.set_level(logging.INFO)
    c = make_collector(True, "cuda:0", cupti_module=cupti, init_cuda=cupti.init_cuda)
    assert c.unavailable is None  # torch.cuda is there; it fails at the first marker
    with c.phase("forward"):
        pass
    assert c.unavailable.startswith("could not record a GPU marker (")
    assert not cupti.enabled
    _one_warning(caplog)


def test_close_stops_the_counters(cupti, collector):
    collector.close()
    assert not cupti.enabled
    assert collector.unavailable
    assert cupti.flushes == 1  # close drains CUPTI
    collector.close()  # twice is fine
    with collector.phase("forward"):
        pass
    assert collector.flush(1) == [] and collector.flush(2, force=True) == []
    assert cupti.flushes == 1


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
