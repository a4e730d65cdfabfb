"""Live GPU figures from NVML (nvidia-ml-py's ``pynvml``), usable without Qt.

Two layers:

* :class:`NvmlReader` makes the NVML calls: which GPUs there are, and one :class:`GpuSample` per
  GPU (memory, utilisation, temperature, power, PCIe traffic, memory per process).
* :class:`NvmlSampler` runs a reader in a background thread at 4 Hz into a bounded
  :class:`~qlora_studio.monitor.store.RollingSeries` per GPU, and decides what to do when NVML is
  missing or fails.

Degrade, never crash. Without a driver (or without nvidia-ml-py) the sampler settles in the state
``no_gpu`` with :data:`NO_GPU_MESSAGE` and stops: nothing is retried, nothing is logged again. When
NVML fails mid-session (a GPU fell off the bus, the driver was reloaded), the failure is logged once,
the state becomes ``retrying`` and NVML is re-initialised with exponential back-off; success is
logged once too. A field a GPU does not support (power on some boards, PCIe in a VM) reads as None
and is not asked again.

The NVML module is injected (``NvmlReader(nvml=...)``), so everything here runs against a fake
module on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .store import DEFAULT_MAX_POINTS, DEFAULT_WINDOW_S, RollingSeries

log = logging.getLogger("qlora_studio.monitor")

NO_GPU_MESSAGE = "No NVIDIA GPU detected: training runs on the CPU"

SAMPLE_INTERVAL_S = 0.25
# nvmlDeviceGetPcieThroughput measures over a 20 ms window and blocks for it, twice per GPU (TX
# and RX); asking once a second instead of four times keeps the sampler's cost down.
PCIE_INTERVAL_S = 1.0
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0

# Fields of the per-GPU series. ``worker`` is the training worker's memory as NVML sees it.
SERIES_FIELDS = (
    "used", "usable", "total", "worker", "util_gpu", "util_mem", "temperature_c", "power_w",
    "pcie_tx_bps", "pcie_rx_bps",
)

# The NVML error codes meaning "no NVIDIA GPU here": the library or the kernel driver is absent.
_NO_GPU_ERRORS = ("NVML_ERROR_LIBRARY_NOT_FOUND", "NVML_ERROR_DRIVER_NOT_LOADED", "NVML_ERROR_GPU_NOT_FOUND")
# The codes meaning "this GPU does not offer this figure": remember and stop asking.
_UNSUPPORTED_ERRORS = ("NVML_ERROR_NOT_SUPPORTED", "NVML_ERROR_NO_PERMISSION", "NVML_ERROR_FUNCTION_NOT_FOUND")


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    name: str
    used_bytes: int | None  # None where NVML cannot say (e.g. Windows WDDM)


@dataclass(frozen=True)
class GpuInfo:
    index: int  # NVML's index (PCI order), which may differ from CUDA's
    name: str
    uuid: str


@dataclass(frozen=True)
class GpuSample:
    """One reading of one GPU. Bytes, percent, degrees Celsius, watts, bytes per second."""

    index: int
    time: float  # wall-clock seconds, comparable with the worker's event times
    total: int
    free: int
    used: int
    reserved: int  # memory the driver keeps for itself (0 where NVML cannot tell)
    util_gpu: float | None = None
    util_mem: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    pcie_tx_bps: float | None = None
    pcie_rx_bps: float | None = None
    processes: tuple[GpuProcess, ...] = ()

    @property
    def usable(self) -> int:
        """The memory programs can have: what CUDA reports as total."""
        return self.total - self.reserved

    def process(self, pid: int | None) -> GpuProcess | None:
        if pid is None:
            return None
        for proc in self.processes:
            if proc.pid == pid:
                return proc
        return None


@dataclass(frozen=True)
class MonitorStatus:
    """``starting``, ``ok``, ``no_gpu``, ``retrying`` or ``stopped``, and a sentence for people."""

    state: str
    message: str = ""


class NvmlUnavailable(Exception):
    """NVML cannot run here at all (no driver, no library, no GPU): not worth retrying."""


def _error_codes(nvml: Any, names: Sequence[str]) -> set[int]:
    return {getattr(nvml, name) for name in names if hasattr(nvml, name)}


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return text or type(exc).__name__


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _local_process_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8") as fh:
            return fh.read().strip() or None
    except OSError:
        return None


class NvmlReader:
    """The NVML calls, one GPU sample at a time. Not thread-safe: one owner thread.

    ``nvml`` is the ``pynvml`` module or an object with the same functions and constants; when
    None, ``pynvml`` is imported on :meth:`open`.
    """

    def __init__(self, nvml: Any = None, *, pcie_interval_s: float = PCIE_INTERVAL_S,
                 wall: Callable[[], float] = time.time, clock: Callable[[], float] = time.monotonic):
        self._nvml = nvml
        self.pcie_interval_s = pcie_interval_s
        self._wall = wall
        self._clock = clock
        self._handles: list[Any] = []
        self.gpus: list[GpuInfo] = []
        self._unsupported: set[tuple[int, str]] = set()
        self._memory_v2: bool | None = None
        self._names: dict[int, str] = {}
        self._pcie: dict[int, tuple[float, float | None, float | None]] = {}
        self._open = False

    # ---- life cycle -----------------------------------------------------------------------

    def open(self) -> list[GpuInfo]:
        """Initialise NVML and list the GPUs.

        Raises :class:`NvmlUnavailable` where there is no NVIDIA GPU to watch, and the NVML error
        for anything else (which may pass: the caller retries).
        """
        if self._nvml is None:
            try:
                import pynvml
            except ImportError:
                raise NvmlUnavailable("nvidia-ml-py is not installed") from None
            self._nvml = pynvml
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            if getattr(exc, "value", None) in _error_codes(nvml, _NO_GPU_ERRORS):
                raise NvmlUnavailable(_describe(exc)) from None
            raise
        self._open = True
        count = nvml.nvmlDeviceGetCount()
        if count < 1:
            self.close()
            raise NvmlUnavailable("NVML lists no GPU")
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        self.gpus = []
        for index, handle in enumerate(self._handles):
            name = self._optional(index, "name", nvml.nvmlDeviceGetName, handle)
            uuid = self._optional(index, "uuid", nvml.nvmlDeviceGetUUID, handle)
            self.gpus.append(GpuInfo(index, _text(name) if name else f"GPU {index}", _text(uuid) if uuid else ""))
        return self.gpus

    def close(self) -> None:
        if self._open:
            self._open = False
            self._handles = []
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # noqa: BLE001 - shutting down a broken NVML must not raise
                pass

    # ---- reading --------------------------------------------------------------------------

    def read(self) -> list[GpuSample]:
        """One sample of every GPU. NVML errors other than "not supported" propagate."""
        return [self.read_gpu(index) for index in range(len(self._handles))]

    def read_gpu(self, index: int) -> GpuSample:
        nvml = self._nvml
        handle = self._handles[index]
        total, free, used, reserved = self._memory(handle)
        util = self._optional(index, "util", nvml.nvmlDeviceGetUtilizationRates, handle)
        temp = self._optional(index, "temp", nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
        power_mw = self._optional(index, "power", nvml.nvmlDeviceGetPowerUsage, handle)
        tx, rx = self._pcie_rates(index, handle)
        return GpuSample(
            index=index,
            time=self._wall(),
            total=int(total),
            free=int(free),
            used=int(used),
            reserved=int(reserved),
            util_gpu=float(util.gpu) if util is not None else None,
            util_mem=float(util.memory) if util is not None else None,
            temperature_c=float(temp) if temp is not None else None,
            power_w=power_mw / 1000.0 if power_mw is not None else None,
            pcie_tx_bps=tx,
            pcie_rx_bps=rx,
            processes=self._processes(index, handle),
        )

    def _optional(self, index: int, key: str, fn: Callable[..., Any], *args: Any) -> Any:
        """A figure this GPU may not offer: None, and never asked again, when it does not."""
        if (index, key) in self._unsupported:
            return None
        try:
            return fn(*args)
        except self._nvml.NVMLError as exc:
            if getattr(exc, "value", None) in _error_codes(self._nvml, _UNSUPPORTED_ERRORS):
                self._unsupported.add((index, key))
                return None
            raise

    def _memory(self, handle: Any) -> tuple[int, int, int, int]:
        """(total, free, used, reserved). The v2 query separates the driver's reserve from "used",
        which then agrees with what CUDA reports (total − free); v1 counts it as used."""
        nvml = self._nvml
        if self._memory_v2 is not False and hasattr(nvml, "nvmlMemory_v2"):
            try:
                mem = nvml.nvmlDeviceGetMemoryInfo(handle, version=nvml.nvmlMemory_v2)
            except nvml.NVMLError as exc:
                codes = _error_codes(nvml, _UNSUPPORTED_ERRORS + ("NVML_ERROR_ARGUMENT_VERSION_MISMATCH",))
                if getattr(exc, "value", None) not in codes:
                    raise
                self._memory_v2 = False
            else:
                self._memory_v2 = True
                return mem.total, mem.free, mem.used, mem.reserved
        mem = nvml.nvmlDeviceGetMemoryInfo(handle)
        return mem.total, mem.free, mem.used, 0

    def _pcie_rates(self, index: int, handle: Any) -> tuple[float | None, float | None]:
        now = self._clock()
        last = self._pcie.get(index)
        if last is not None and now - last[0] < self.pcie_interval_s:
            return last[1], last[2]
        nvml = self._nvml
        tx_kb = self._optional(index, "pcie", nvml.nvmlDeviceGetPcieThroughput, handle, nvml.NVML_PCIE_UTIL_TX_BYTES)
        rx_kb = self._optional(index, "pcie", nvml.nvmlDeviceGetPcieThroughput, handle, nvml.NVML_PCIE_UTIL_RX_BYTES)
        tx = tx_kb * 1024.0 if tx_kb is not None else None  # NVML answers in KB/s
        rx = rx_kb * 1024.0 if rx_kb is not None else None
        self._pcie[index] = (now, tx, rx)
        return tx, rx

    def _processes(self, index: int, handle: Any) -> tuple[GpuProcess, ...]:
        nvml = self._nvml
        found: dict[int, int | None] = {}
        for key, fn in (("compute", nvml.nvmlDeviceGetComputeRunningProcesses),
                        ("graphics", nvml.nvmlDeviceGetGraphicsRunningProcesses)):
            for proc in self._optional(index, key, fn, handle) or ():
                used = getattr(proc, "usedGpuMemory", None)
                pid = int(proc.pid)
                if pid not in found or (found[pid] is None and used is not None):
                    found[pid] = int(used) if used is not None else None
        procs = tuple(
            GpuProcess(pid, self._process_name(pid), used)
            for pid, used in sorted(found.items(), key=lambda item: -(item[1] or 0))
        )
        return procs

    def _process_name(self, pid: int) -> str:
        name = self._names.get(pid)
        if name is None:
            try:
                name = os.path.basename(_text(self._nvml.nvmlSystemGetProcessName(pid))) or None
            except self._nvml.NVMLError:
                name = None
            name = name or _local_process_name(pid) or f"pid {pid}"
            if len(self._names) > 1024:  # pids come and go over a long session
                self._names.clear()
            self._names[pid] = name
        return name


class NvmlSampler:
    """Samples every GPU at ``interval_s`` in a daemon thread into a rolling store per GPU.

    Listeners get each round of samples (``on_samples(list[GpuSample])``) and each change of
    :attr:`status` (``on_status(MonitorStatus)``); they are called from the sampler's thread (the
    GUI bridges them to its own thread with a Qt signal). :meth:`tick` is the whole state machine
    and can be driven without the thread, which is how the tests run it with a fake clock.
    """

    def __init__(self, nvml: Any = None, *, interval_s: float = SAMPLE_INTERVAL_S,
                 window_s: float = DEFAULT_WINDOW_S, max_points: int = DEFAULT_MAX_POINTS,
                 backoff_first_s: float = BACKOFF_FIRST_S, backoff_max_s: float = BACKOFF_MAX_S,
                 reader: NvmlReader | None = None, clock: Callable[[], float] = time.monotonic):
        self.reader = reader or NvmlReader(nvml)
        self.interval_s = interval_s
        self.backoff_first_s = backoff_first_s
        self.backoff_max_s = backoff_max_s
        self._clock = clock
        self._window_s = window_s
        self._max_points = max_points
        self._lock = threading.Lock()
        self._series: dict[int, RollingSeries] = {}
        self._latest: dict[int, GpuSample] = {}
        self._status = MonitorStatus("starting", "Looking for NVIDIA GPUs")
        self._backoff = backoff_first_s
        self._next_try = 0.0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.worker_pid: int | None = None
        self.on_samples: list[Callable[[list[GpuSample]], None]] = []
        self.on_status: list[Callable[[MonitorStatus], None]] = []

    # ---- public state ---------------------------------------------------------------------

    @property
    def status(self) -> MonitorStatus:
        return self._status

    @property
    def gpus(self) -> list[GpuInfo]:
        return list(self.reader.gpus)

    def latest(self, index: int) -> GpuSample | None:
        with self._lock:
            return self._latest.get(index)

    def series(self, index: int, fields: Sequence[str] = SERIES_FIELDS) -> tuple[list[float], dict[str, list[float]]]:
        """A consistent copy of one GPU's timeline: (times, {field: values})."""
        with self._lock:
            store = self._series.get(index)
            if store is None:
                return [], {name: [] for name in fields}
            return store.times(), store.columns(fields)

    def stored_points(self) -> int:
        with self._lock:
            return sum(len(store) for store in self._series.values())

    @property
    def window_s(self) -> float:
        return self._window_s

    @window_s.setter
    def window_s(self, window_s: float) -> None:
        with self._lock:
            self._window_s = window_s
            for store in self._series.values():
                store.window_s = window_s

    # ---- the state machine ----------------------------------------------------------------

    def tick(self) -> float | None:
        """Do what is due now; return the seconds until the next tick, or None to stop."""
        state = self._status.state
        if state in ("no_gpu", "stopped"):
            return None
        now = self._clock()
        if state in ("starting", "retrying"):
            if now < self._next_try:
                return self._next_try - now
            try:
                self.reader.close()
                self.reader.open()
            except NvmlUnavailable as exc:
                log.info("GPU monitor: %s (%s)", NO_GPU_MESSAGE, exc)
                self._set_status(MonitorStatus("no_gpu", NO_GPU_MESSAGE))
                return None
            except Exception as exc:  # noqa: BLE001 - any NVML failure degrades, never crashes
                return self._failed(now, exc, "could not start")
        try:
            samples = self.reader.read()
        except Exception as exc:  # noqa: BLE001
            return self._failed(now, exc, "stopped answering")
        self._store(samples)
        if self._status.state != "ok":
            if self._status.state == "retrying":
                log.warning("GPU monitor: NVML is answering again")
            self._backoff = self.backoff_first_s
            names = ", ".join(gpu.name for gpu in self.reader.gpus)
            self._set_status(MonitorStatus("ok", f"Watching {names}"))
        self._notify(self.on_samples, samples)
        return self.interval_s

    def _failed(self, now: float, exc: BaseException, what: str) -> float:
        """Say it once, then retry with exponential back-off, quietly."""
        if self._status.state != "retrying":
            message = f"NVML {what} ({_describe(exc)}); retrying in the background"
            log.warning("GPU monitor: %s", message)
            self._backoff = self.backoff_first_s
            self._set_status(MonitorStatus("retrying", message))
        else:
            self._backoff = min(self._backoff * 2.0, self.backoff_max_s)
        self.reader.close()
        self._next_try = now + self._backoff
        return self._backoff

    def _store(self, samples: list[GpuSample]) -> None:
        worker_pid = self.worker_pid
        with self._lock:
            for sample in samples:
                store = self._series.get(sample.index)
                if store is None:
                    store = self._series[sample.index] = RollingSeries(SERIES_FIELDS, self._window_s, self._max_points)
                worker = sample.process(worker_pid)
                store.add(sample.time, {
                    "used": sample.used, "usable": sample.usable, "total": sample.total,
                    "worker": worker.used_bytes if worker else None,
                    "util_gpu": sample.util_gpu, "util_mem": sample.util_mem,
                    "temperature_c": sample.temperature_c, "power_w": sample.power_w,
                    "pcie_tx_bps": sample.pcie_tx_bps, "pcie_rx_bps": sample.pcie_rx_bps,
                })
                self._latest[sample.index] = sample

    def _set_status(self, status: MonitorStatus) -> None:
        self._status = status
        self._notify(self.on_status, status)

    def _notify(self, listeners: list[Callable[[Any], None]], value: Any) -> None:
        """Call listeners; one that raises (say, a closed window's) is dropped, not fatal."""
        for listener in list(listeners):
            try:
                listener(value)
            except Exception:  # noqa: BLE001
                log.debug("GPU monitor: dropping a listener that raised", exc_info=True)
                with contextlib.suppress(ValueError):
                    listeners.remove(listener)

    # ---- the thread -----------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        if self._status.state == "stopped":
            self._next_try = 0.0
            self._set_status(MonitorStatus("starting", "Looking for NVIDIA GPUs"))
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="qlora-studio-nvml", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.reader.close()
        if self._status.state != "no_gpu":
            self._set_status(MonitorStatus("stopped", "GPU monitor stopped"))

    def _run(self) -> None:
        due = self._clock()
        while not self._stop.is_set():
            delay = self.tick()
            if delay is None:
                return
            # Keep a fixed rate rather than drifting by the time a round takes.
            due += delay
            now = self._clock()
            if due < now:
                due = now
            if self._stop.wait(due - now):
                return
