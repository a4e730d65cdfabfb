"""The NVML sampler on a machine without a GPU: absent NVML, a fake NVML, failures mid-run."""

from __future__ import annotations

import logging
import sys
import threading

import pynvml
import pytest
from monitor_fakes import GIB, MIB, FakeClock, FakeGpu, FakeNvml

from qlora_studio.monitor.nvml import NO_GPU_MESSAGE, NvmlReader, NvmlSampler


def _sampler(nvml, clock=None, **kwargs):
    clock = clock or FakeClock()
    reader = NvmlReader(nvml, wall=clock, clock=clock)
    return NvmlSampler(reader=reader, clock=clock, **kwargs), clock


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("qlora_studio.monitor")]


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED])
def test_without_a_driver_the_sampler_settles_in_no_gpu_and_stays_quiet(caplog, code):
    caplog.set_level(logging.DEBUG)
    nvml = FakeNvml(init_error=code)
    sampler, clock = _sampler(nvml)
    assert sampler.tick() is None
    assert sampler.status.state == "no_gpu"
    assert sampler.status.message == NO_GPU_MESSAGE
    for _ in range(50):
        clock.advance(10)
        assert sampler.tick() is None
    assert nvml.calls["nvmlInit"] == 1  # never retried
    assert _warnings(caplog) == []
    assert len([r for r in caplog.records if NO_GPU_MESSAGE in r.getMessage()]) == 1


def test_without_nvidia_ml_py_the_sampler_says_no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    sampler = NvmlSampler()
    assert sampler.tick() is None
    assert sampler.status.state == "no_gpu"
    sampler.start()  # the thread sees the settled state and ends at once
    sampler.stop()
    assert sampler.status.state == "no_gpu"


def test_an_empty_gpu_list_is_no_gpu():
    sampler, _ = _sampler(FakeNvml(gpus=[]))
    assert sampler.tick() is None
    assert sampler.status.state == "no_gpu"


def test_a_sample_reads_every_figure_in_si_units():
    me = 4242
    gpu = FakeGpu(used=10 * GIB, reserved=512 * MIB, processes=[(7, 1 * GIB), (me, 8 * GIB), (9, None)])
    nvml = FakeNvml([gpu, FakeGpu(name="NVIDIA H100", processes=[])], names={me: "/usr/bin/python3"})
    sampler, _ = _sampler(nvml)
    sampler.worker_pid = me
    assert sampler.tick() == sampler.interval_s
    assert sampler.status.state == "ok"
    assert [g.name for g in sampler.gpus] == ["NVIDIA H200", "NVIDIA H100"]
    s = sampler.latest(0)
    assert (s.total, s.used, s.reserved, s.free) == (144 * GIB, 10 * GIB, 512 * MIB, 144 * GIB - 512 * MIB - 10 * GIB)
    assert s.usable == 144 * GIB - 512 * MIB
    assert (s.util_gpu, s.util_mem, s.temperature_c, s.power_w) == (87, 45, 51, 312.0)
    assert (s.pcie_tx_bps, s.pcie_rx_bps) == (1024 * 1024, 2048 * 1024)
    # biggest first; names from NVML, else /proc, else the pid
    assert [p.pid for p in s.processes] == [me, 7, 9]
    assert s.processes[0].name == "python3"
    assert s.processes[2].used_bytes is None
    times, cols = sampler.series(0)
    assert len(times) == 1 and cols["worker"] == [8 * GIB] and cols["used"] == [10 * GIB]
    _, cols1 = sampler.series(1)
    assert cols1["worker"][0] != cols1["worker"][0]  # NaN: the worker is not on GPU 1


def test_memory_falls_back_to_the_v1_query():
    gpu = FakeGpu(used=3 * GIB, reserved=256 * MIB)
    sampler, _ = _sampler(FakeNvml([gpu], memory_v2=False))
    sampler.tick()
    s = sampler.latest(0)
    assert s.used == 3 * GIB + 256 * MIB and s.reserved == 0 and s.free == s.total - s.used


def test_an_unsupported_figure_is_none_and_not_asked_again():
    gpu = FakeGpu(unsupported={"nvmlDeviceGetPowerUsage", "nvmlDeviceGetPcieThroughput"})
    nvml = FakeNvml([gpu])
    sampler, clock = _sampler(nvml)
    for _ in range(10):
        sampler.tick()
        clock.advance(2.0)
    s = sampler.latest(0)
    assert s.power_w is None and s.pcie_tx_bps is None and s.temperature_c == 51
    assert nvml.calls["nvmlDeviceGetPowerUsage"] == 1
    assert nvml.calls["nvmlDeviceGetPcieThroughput"] == 1
    assert sampler.status.state == "ok"


def test_pcie_is_read_at_its_own_slower_rate():
    nvml = FakeNvml()
    sampler, clock = _sampler(nvml)
    for _ in range(8):  # two seconds at 4 Hz
        sampler.tick()
        clock.advance(0.25)
    assert nvml.calls["nvmlDeviceGetMemoryInfo"] == 8
    assert nvml.calls["nvmlDeviceGetPcieThroughput"] == 2 * 2  # TX and RX, once a second


def test_failure_mid_run_is_said_once_then_retried_with_back_off(caplog):
    caplog.set_level(logging.INFO)
    nvml = FakeNvml()
    sampler, clock = _sampler(nvml, backoff_first_s=1.0, backoff_max_s=8.0)
    states = []
    sampler.on_status.append(lambda status: states.append(status.state))
    for _ in range(3):
        sampler.tick()
        clock.advance(0.25)
    assert sampler.status.state == "ok"

    nvml.broken = pynvml.NVML_ERROR_GPU_IS_LOST
    delay = sampler.tick()
    assert sampler.status.state == "retrying"
    assert "GPU is lost" in sampler.status.message
    assert delay == 1.0
    # Advance in small steps for a minute: retries come at 1, 2, 4, 8, 8, 8 ... seconds apart.
    inits_before = nvml.calls["nvmlInit"]
    retry_times = []
    t0 = clock.now
    for _ in range(240):
        clock.advance(0.25)
        calls = nvml.calls["nvmlInit"]
        sampler.tick()
        if nvml.calls["nvmlInit"] > calls:
            retry_times.append(round(clock.now - t0, 2))
    gaps = [b - a for a, b in zip([0.0, *retry_times[:-1]], retry_times, strict=True)]
    assert gaps[:4] == [1.0, 2.0, 4.0, 8.0]
    assert all(g == 8.0 for g in gaps[4:])
    assert nvml.calls["nvmlInit"] - inits_before == len(retry_times)
    assert len(_warnings(caplog)) == 1

    nvml.broken = None
    for _ in range(40):
        clock.advance(0.25)
        sampler.tick()
    assert sampler.status.state == "ok"
    assert states == ["ok", "retrying", "ok"]
    messages = [r.getMessage() for r in _warnings(caplog)]
    assert len(messages) == 2 and "answering again" in messages[1]
    assert sampler.latest(0).time == clock.now  # sampling again

    # A second failure starts again from the first back-off step and is said again, once.
    nvml.broken = pynvml.NVML_ERROR_UNKNOWN
    assert sampler.tick() == 1.0
    assert len(_warnings(caplog)) == 3


def test_failure_at_start_is_retried_too(caplog):
    caplog.set_level(logging.INFO)
    nvml = FakeNvml(init_error=pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH)
    sampler, clock = _sampler(nvml)
    sampler.tick()
    assert sampler.status.state == "retrying"
    assert "version mismatch" in sampler.status.message.lower()
    nvml.init_error = None
    clock.advance(1.0)
    sampler.tick()
    assert sampler.status.state == "ok"
    assert sampler.latest(0) is not None


def test_memory_stays_flat_over_a_long_session():
    nvml = FakeNvml([FakeGpu(), FakeGpu()])
    sampler, clock = _sampler(nvml, window_s=60.0, max_points=120)
    for _ in range(20_000):  # 83 minutes at 4 Hz
        sampler.tick()
        clock.advance(0.25)
    assert sampler.stored_points() <= 2 * 121
    sampler.window_s = 30.0
    times, _ = sampler.series(0)
    assert times[-1] - times[0] <= 30.0


def test_the_thread_samples_and_stops():
    nvml = FakeNvml()
    sampler = NvmlSampler(nvml, interval_s=0.01)
    got = threading.Event()
    rounds = []

    def on_samples(samples):
        rounds.append(samples)
        if len(rounds) >= 5:
            got.set()

    sampler.on_samples.append(on_samples)
    sampler.start()
    try:
        assert got.wait(5.0)
    finally:
        sampler.stop()
    assert sampler.status.state == "stopped"
    assert not nvml.initialised  # NVML shut down with the thread
    assert all(len(r) == 1 for r in rounds)
    sampler.start()  # a stopped sampler can start again
    try:
        for _ in range(500):
            if sampler.status.state == "ok":
                break
            threading.Event().wait(0.01)
        assert sampler.status.state == "ok"
    finally:
        sampler.stop()
