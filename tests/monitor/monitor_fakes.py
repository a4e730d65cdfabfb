"""Stand-ins for NVML and CUPTI that behave like the real libraries on a machine without a GPU.

``FakeNvml`` raises pynvml's own ``NVMLError`` classes with pynvml's own codes (pynvml is pure
Python, so its errors and constants work without a driver), answers ``UNINITIALIZED`` when used
before ``nvmlInit`` or after ``nvmlShutdown``, and can be broken mid-run.

``FakeCupti`` follows cupti-python's ``cupti.cupti`` names and reproduces the H200/CUDA 13 quirk:
enabling the unified-memory counters before CUDA is initialised raises ``ERROR_NOT_READY``.
Work queued on the "GPU" produces its records only when the device is synchronised, like real
asynchronous kernels. ``FakeCuda`` is the part of ``torch.cuda`` the paging clock uses: events
recorded on that same simulated device, stamped by a GPU clock whose origin differs from CUPTI's,
with torch's errors for an event never recorded or not yet completed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

MIB = 1024 * 1024
GIB = 1024 * MIB


# ---------------------------------------------------------------------------------------------
# NVML


@dataclass
class FakeGpu:
    name: str = "NVIDIA H200"
    uuid: str = "GPU-00000000-0000-0000-0000-000000000000"
    total: int = 144 * GIB
    reserved: int = 512 * MIB
    used: int = 10 * GIB
    util: int = 87
    mem_util: int = 45
    temp: int = 51
    power_mw: int = 312_000
    pcie_tx_kb: int = 1024
    pcie_rx_kb: int = 2048
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, used bytes)
    unsupported: set[str] = field(default_factory=set)  # names of functions answering NOT_SUPPORTED


class FakeNvml:
    NVMLError = pynvml.NVMLError
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_PCIE_UTIL_TX_BYTES = pynvml.NVML_PCIE_UTIL_TX_BYTES
    NVML_PCIE_UTIL_RX_BYTES = pynvml.NVML_PCIE_UTIL_RX_BYTES
    nvmlMemory_v2 = pynvml.nvmlMemory_v2

    def __init__(self, gpus: list[FakeGpu] | None = None, *, init_error: int | None = None,
                 memory_v2: bool = True, names: dict[int, str] | None = None):
        self.gpus = gpus if gpus is not None else [FakeGpu()]
        self.init_error = init_error
        self.memory_v2 = memory_v2
        self.names = names or {}
        self.broken: int | None = None  # an error code every call answers while set
        self.initialised = False
        self.calls: dict[str, int] = {}
        # pynvml's error codes, under the names the reader looks for.
        for name in dir(pynvml):
            if name.startswith("NVML_ERROR_"):
                setattr(self, name, getattr(pynvml, name))

    def _call(self, name: str, *, needs_init: bool = True) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.broken is not None:
            raise pynvml.NVMLError(self.broken)
        if needs_init and not self.initialised:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def _gpu(self, handle: Any, fn: str) -> FakeGpu:
        gpu = self.gpus[handle]
        if fn in gpu.unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return gpu

    def nvmlInit(self) -> None:
        self._call("nvmlInit", needs_init=False)
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self._call("nvmlShutdown")
        self.initialised = False

    def nvmlDeviceGetCount(self) -> int:
        self._call("nvmlDeviceGetCount")
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        self._call("nvmlDeviceGetHandleByIndex")
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        return index

    def nvmlDeviceGetName(self, handle: int) -> str:
        self._call("nvmlDeviceGetName")
        return self._gpu(handle, "nvmlDeviceGetName").name

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        self._call("nvmlDeviceGetUUID")
        return self._gpu(handle, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetMemoryInfo(self, handle: int, version: int | None = None) -> SimpleNamespace:
        self._call("nvmlDeviceGetMemoryInfo")
        gpu = self._gpu(handle, "nvmlDeviceGetMemoryInfo")
        if version is not None:
            if not self.memory_v2:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
            free = gpu.total - gpu.reserved - gpu.used
            return SimpleNamespace(version=version, total=gpu.total, reserved=gpu.reserved, free=free, used=gpu.used)
        # v1 counts the driver's reserve as used
        used = gpu.used + gpu.reserved
        return SimpleNamespace(total=gpu.total, free=gpu.total - used, used=used)

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        self._call("nvmlDeviceGetUtilizationRates")
        gpu = self._gpu(handle, "nvmlDeviceGetUtilizationRates")
        return SimpleNamespace(gpu=gpu.util, memory=gpu.mem_util)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        self._call("nvmlDeviceGetTemperature")
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._gpu(handle, "nvmlDeviceGetTemperature").temp

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        self._call("nvmlDeviceGetPowerUsage")
        return self._gpu(handle, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetPcieThroughput(self, handle: int, counter: int) -> int:
        self._call("nvmlDeviceGetPcieThroughput")
        gpu = self._gpu(handle, "nvmlDeviceGetPcieThroughput")
        return gpu.pcie_tx_kb if counter == pynvml.NVML_PCIE_UTIL_TX_BYTES else gpu.pcie_rx_kb

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        self._call("nvmlDeviceGetComputeRunningProcesses")
        gpu = self._gpu(handle, "nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in gpu.processes]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: int) -> list[SimpleNamespace]:
        self._call("nvmlDeviceGetGraphicsRunningProcesses")
        self._gpu(handle, "nvmlDeviceGetGraphicsRunningProcesses")
        return []

    def nvmlSystemGetProcessName(self, pid: int) -> str:
        self._call("nvmlSystemGetProcessName")
        if pid not in self.names:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        return self.names[pid]


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ---------------------------------------------------------------------------------------------
# CUPTI


class Result(enum.IntEnum):
    SUCCESS = 0
    ERROR_INVALID_PARAMETER = 1
    ERROR_NOT_READY = 13
    ERROR_NOT_INITIALIZED = 15
    ERROR_UM_PROFILING_NOT_SUPPORTED = 28
    ERROR_UM_PROFILING_NOT_SUPPORTED_ON_DEVICE = 29
    ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED = 39


class ActivityKind(enum.IntEnum):
    MEMCPY = 1
    KERNEL = 3
    UNIFIED_MEMORY_COUNTER = 25


class ActivityUnifiedMemoryCounterKind(enum.IntEnum):
    UNKNOWN = 0
    BYTES_TRANSFER_HTOD = 1
    BYTES_TRANSFER_DTOH = 2
    CPU_PAGE_FAULT_COUNT = 3
    GPU_PAGE_FAULT = 4


class cuptiError(Exception):  # noqa: N801 - cupti-python's name
    def __init__(self, status: int):
        self.status = status
        super().__init__(Result(status).name)


class _Config:
    def __init__(self) -> None:
        self.scope = 0
        self.kind = 0
        self.device_id = 0
        self.enable = 0


class ActivityUnifiedMemoryCounterConfig:
    """An array of configs; a field set on the array is set on every element (numpy-style)."""

    registry: dict[int, ActivityUnifiedMemoryCounterConfig] = {}

    def __init__(self, size: int):
        object.__setattr__(self, "_items", [_Config() for _ in range(size)])
        object.__setattr__(self, "ptr", id(self))
        ActivityUnifiedMemoryCounterConfig.registry[self.ptr] = self

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in ("scope", "kind", "device_id", "enable"):
            raise AttributeError(name)
        for item in self._items:
            setattr(item, name, value)

    def __getitem__(self, i: int) -> _Config:
        return self._items[i]

    def __len__(self) -> int:
        return len(self._items)


class FakeCupti:
    """A module-like object with the names the collector uses from ``cupti.cupti``."""

    Result = Result
    ActivityKind = ActivityKind
    ActivityUnifiedMemoryCounterKind = ActivityUnifiedMemoryCounterKind
    ActivityUnifiedMemoryCounterConfig = ActivityUnifiedMemoryCounterConfig
    cuptiError = cuptiError

    def __init__(self, *, device_supported: bool = True):
        self.device_supported = device_supported
        self.cuda_ready = False
        self.configured: set[int] = set()
        self.configured_while_ready = False
        self.enabled = False
        self.callbacks: tuple[Any, Any] | None = None
        self.clock_ns = 1_000_000
        self.buffer: list[SimpleNamespace] = []
        self.gpu_queue: list[tuple[int, int]] = []
        self.held: list[SimpleNamespace] = []  # records CUPTI delivers one flush late
        self.fail_flush = False
        self.fail_timestamp: Result | None = None  # an error get_timestamp raises while set
        self.flushes = 0
        self.syncs = 0  # waits for the device: torch.cuda.synchronize and Event.synchronize

    # -- the CUPTI API --------------------------------------------------------------------

    def activity_configure_unified_memory_counter(self, ptr: int, count: int) -> None:
        config = ActivityUnifiedMemoryCounterConfig.registry[ptr]
        if not self.device_supported:
            raise cuptiError(Result.ERROR_UM_PROFILING_NOT_SUPPORTED_ON_DEVICE)
        self.configured = {int(config[i].kind) for i in range(count) if config[i].enable}
        self.configured_while_ready = self.cuda_ready

    def activity_enable(self, kind: int) -> None:
        if kind == ActivityKind.UNIFIED_MEMORY_COUNTER and not (self.cuda_ready and self.configured_while_ready):
            raise cuptiError(Result.ERROR_NOT_READY)
        self.enabled = True

    def activity_disable(self, kind: int) -> None:
        self.enabled = False

    def activity_register_callbacks(self, requested: Any, completed: Any) -> None:
        size, _ = requested()
        assert size > 0
        self.callbacks = (requested, completed)

    def activity_flush_all(self, flag: int) -> None:
        self.flushes += 1
        if self.fail_flush:
            raise cuptiError(Result.ERROR_INVALID_PARAMETER)
        records, self.buffer = self.buffer, []
        if self.callbacks and records:
            self.callbacks[1](records)

    def get_timestamp(self) -> int:
        if self.fail_timestamp is not None:
            raise cuptiError(self.fail_timestamp)
        return self.clock_ns

    # -- the simulated hardware ------------------------------------------------------------

    def init_cuda(self, index: int) -> None:
        self.cuda_ready = True

    def advance(self, ns: int = 1000) -> None:
        self.clock_ns += ns

    def record(self, kind: ActivityUnifiedMemoryCounterKind, value: int, *, late: bool = False) -> None:
        """A move or fault happening now (a CPU touch, or a kernel the device is running)."""
        if not self.enabled or int(kind) not in self.configured:
            return
        self.advance(1)  # not at the very nanosecond of an event stamped just before
        rec = SimpleNamespace(kind=int(ActivityKind.UNIFIED_MEMORY_COUNTER), counter_kind=int(kind),
                              value=value, start=self.clock_ns, end=self.clock_ns + 10)
        (self.held if late else self.buffer).append(rec)
        # Other activity kinds share the buffers; the collector must skip them.
        self.buffer.append(SimpleNamespace(kind=int(ActivityKind.KERNEL), start=self.clock_ns, value=1))
        self.advance()

    def enqueue(self, kind: ActivityUnifiedMemoryCounterKind, value: int) -> None:
        """Work launched asynchronously: it happens on the device later, at the next synchronise."""
        self.gpu_queue.append((int(kind), value))
        self.advance()

    def launch_event(self, event: FakeEvent) -> None:
        """An event recorded on the stream: stamped at once on an idle device, else after the work before it."""
        if self.gpu_queue:
            self.gpu_queue.append(event)
        else:
            self._stamp(event)

    def _stamp(self, event: FakeEvent) -> None:
        event.complete(self.clock_ns)

    def synchronize(self) -> None:
        """torch.cuda.synchronize: the device runs everything queued, in order."""
        self.syncs += 1
        self.advance()
        queue, self.gpu_queue = self.gpu_queue, []
        for item in queue:
            if isinstance(item, FakeEvent):
                self._stamp(item)
            else:
                self.record(ActivityUnifiedMemoryCounterKind(item[0]), item[1])

    def release_held(self) -> None:
        self.buffer.extend(self.held)
        self.held = []


# ---------------------------------------------------------------------------------------------
# torch.cuda's events, on FakeCupti's simulated device


GPU_CLOCK_OFFSET_NS = 987_654_321_000  # CUDA events' clock does not share CUPTI's origin


class FakeEvent:
    def __init__(self, cuda: FakeCuda, enable_timing: bool = False):
        self._cuda = cuda
        self.enable_timing = enable_timing
        self.recorded = False
        self.gpu_ns: int | None = None  # the GPU clock when the stream reached the event

    def record(self, stream: Any = None) -> None:
        self._cuda.check()
        assert stream == self._cuda.stream, f"recorded on {stream!r}, not the training device's stream"
        self.recorded = True
        self._cuda.recorded += 1
        self._cuda.cupti.launch_event(self)

    def complete(self, cupti_ns: int) -> None:
        self.gpu_ns = cupti_ns + GPU_CLOCK_OFFSET_NS

    def synchronize(self) -> None:
        self._cuda.check()
        if self.recorded and self.gpu_ns is None:
            self._cuda.cupti.synchronize()
        else:
            self._cuda.cupti.syncs += 1

    def elapsed_time(self, end: FakeEvent) -> float:
        self._cuda.check()
        if not (self.recorded and end.recorded):
            raise RuntimeError("Both events must be recorded before calculating elapsed time.")
        if not (self.enable_timing and end.enable_timing):
            raise RuntimeError("Both events must be created with argument 'enable_timing=True'.")
        if self.gpu_ns is None or end.gpu_ns is None:
            raise RuntimeError("CUDA error: device not ready")
        return (end.gpu_ns - self.gpu_ns) / 1e6


class FakeCuda:
    """``torch.cuda`` for the paging clock: ``Event`` and ``current_stream`` on FakeCupti's device."""

    def __init__(self, cupti: FakeCupti, device_index: int = 0):
        self.cupti = cupti
        self.device_index = device_index
        self.stream = ("stream", device_index)
        self.broken: str | None = None  # a sticky CUDA error every call raises while set
        self.recorded = 0

    def check(self) -> None:
        if self.broken is not None:
            raise RuntimeError(self.broken)

    def Event(self, enable_timing: bool = False) -> FakeEvent:  # torch.cuda's name
        return FakeEvent(self, enable_timing=enable_timing)

    def current_stream(self, device: int | None = None) -> Any:
        self.check()
        assert device == self.device_index, f"asked for the stream of device {device}, not {self.device_index}"
        return self.stream
