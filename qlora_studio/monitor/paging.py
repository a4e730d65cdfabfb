"""Paging counters on the worker side: how many bytes the paged optimizer's state moves, and when.

bitsandbytes' paged optimizers keep their state in CUDA managed (unified) memory, which the driver
moves between GPU and CPU memory page by page: out when the card runs short or the CPU touches it,
back in when a kernel or a prefetch needs it. CUPTI's unified-memory counters
(activity kind ``UNIFIED_MEMORY_COUNTER``) report each move, host to device and device to host,
and the GPU page faults, with a timestamp. This module turns them into per-phase totals:

    collector = make_collector(enabled=True, device=device)
    if collector.unavailable:
        log.info(unavailable_message(collector.unavailable))
    for step in ...:
        with collector.phase("forward"): ...
        with collector.phase("backward"): ...
        with collector.phase("optimizer"): ...
        for totals in collector.flush(step):      # only nonzero phases
            writer.emit("paging", step=step, **totals)
    collector.close()

Attribution is by time: each phase records CUPTI timestamps as it opens and closes, and each
counter record is credited to the phase whose interval holds its start time (records outside every
phase go to the phase ``"other"``, e.g. a CPU touch between steps). Because CUDA runs
asynchronously, a phase synchronises the device as it closes so that its GPU work, and the faults
it causes, fall inside its interval. Records that CUPTI delivers late still land in the right
phase, but in the totals of the next flush.

On the H200 with CUDA 13 the counters work only when CUDA is initialised *before* they are
configured and enabled (enabling first answers ``CUPTI_ERROR_NOT_READY``), so
:func:`make_collector` creates the CUDA context first.

Never crashes training: anything missing or refusing gives a :class:`NullCollector` whose
``unavailable`` says why, and a failure mid-run is logged once and turns the counters off.

torch is imported only inside :func:`make_collector`; the rest is plain Python, so the GUI and the
tests can import this module.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("qlora_studio.monitor.paging")

PHASES = ("forward", "backward", "optimizer")
OTHER = "other"  # moves outside every bracketed phase
UNAVAILABLE_PREFIX = "Paging counters unavailable: "

_BUFFER_BYTES = 4 * 1024 * 1024
_HISTORY = 512  # phase intervals kept for records that arrive late
_FLUSH_FORCED = 1  # CUPTI_ACTIVITY_FLAG_FLUSH_FORCED
_SCOPE_PROCESS_SINGLE_DEVICE = 1  # CUPTI_ACTIVITY_UNIFIED_MEMORY_COUNTER_SCOPE_PROCESS_SINGLE_DEVICE

# Why CUPTI said no, in words a person can act on (keyed by cupti.Result names).
_REASONS = {
    "ERROR_UM_PROFILING_NOT_SUPPORTED": "this system does not support unified-memory counters",
    "ERROR_UM_PROFILING_NOT_SUPPORTED_ON_DEVICE": "this GPU does not support unified-memory counters",
    "ERROR_UM_PROFILING_NOT_SUPPORTED_ON_NON_P2P_DEVICES":
        "the visible GPUs lack peer-to-peer access; limit CUDA_VISIBLE_DEVICES to the training GPU",
    "ERROR_UM_PROFILING_NOT_SUPPORTED_WITH_MPS": "unified-memory counters do not work under MPS",
    "ERROR_VIRTUALIZED_DEVICE_NOT_SUPPORTED": "unified-memory counters do not work on a virtual GPU",
    "ERROR_MULTIPLE_SUBSCRIBERS_NOT_SUPPORTED": "another profiler is attached to this process",
    "ERROR_NOT_READY": "CUDA was not ready when the counters were enabled",
    "ERROR_NOT_INITIALIZED": "CUPTI could not start; the driver may be older than cupti-python needs",
    "ERROR_INSUFFICIENT_PRIVILEGES": "CUPTI needs access to the GPU's performance counters",
}


def unavailable_message(reason: str) -> str:
    """The sentence the worker logs and the monitor shows."""
    return UNAVAILABLE_PREFIX + reason


def paged_state_bytes(optimizer: Any) -> int:
    """Bytes of optimizer state held in paged (managed) memory.

    bitsandbytes' paged optimizers allocate a state tensor in managed memory only for parameters of
    at least 100k elements and mark it ``is_paged``; smaller ones live in ordinary device memory
    and are not counted. On the CPU the paged optimizers fall back to ordinary tensors: 0.
    """
    total = 0
    for state in getattr(optimizer, "state", {}).values():
        for value in state.values():
            if getattr(value, "is_paged", False):
                total += int(value.nbytes)
    return total


class NullCollector:
    """The collector when the counters cannot run: phases cost nothing, flush returns nothing."""

    def __init__(self, reason: str):
        self.unavailable: str | None = reason
        self._phase = contextlib.nullcontext()

    def phase(self, name: str) -> contextlib.AbstractContextManager[None]:
        return self._phase

    def flush(self, step: int) -> list[dict[str, Any]]:
        return []

    def close(self) -> None:
        pass

    def __enter__(self) -> NullCollector:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class CuptiPagingCollector:
    """Per-phase totals from CUPTI's unified-memory counters.

    ``cupti`` is the ``cupti.cupti`` module of cupti-python (or a fake with the same names).
    The caller must have initialised CUDA on the device before constructing this (see the module
    docstring); construction raises the CUPTI error when the counters cannot be enabled.
    ``synchronize`` waits for the device's queued work; it runs as each phase closes.
    """

    def __init__(self, cupti: Any, device_index: int, *, synchronize: Callable[[], None],
                 history: int = _HISTORY):
        self._cupti = cupti
        self._sync = synchronize
        self._lock = threading.Lock()
        self._incoming: list[tuple[int, int, int]] = []  # (start ns, counter kind, value)
        self._starts: deque[int] = deque(maxlen=history)
        self._intervals: deque[tuple[int, int, str]] = deque(maxlen=history)
        self._open: tuple[int, str] | None = None
        self._totals: dict[str, list[int]] = {}
        self._closed = False
        self.unavailable: str | None = None

        kinds = cupti.ActivityUnifiedMemoryCounterKind
        self._htod = int(kinds.BYTES_TRANSFER_HTOD)
        self._dtoh = int(kinds.BYTES_TRANSFER_DTOH)
        self._fault = int(kinds.GPU_PAGE_FAULT)
        self._um_kind = int(cupti.ActivityKind.UNIFIED_MEMORY_COUNTER)
        counters = (self._htod, self._dtoh, self._fault)
        config = cupti.ActivityUnifiedMemoryCounterConfig(len(counters))
        # NVIDIA's samples set these on the whole array and ``kind`` per element; setting every
        # field per element as well leaves no doubt about what each entry holds.
        config.scope = _SCOPE_PROCESS_SINGLE_DEVICE
        config.device_id = device_index
        config.enable = 1
        for i, kind in enumerate(counters):
            config[i].scope = _SCOPE_PROCESS_SINGLE_DEVICE
            config[i].kind = kind
            config[i].device_id = device_index
            config[i].enable = 1
        self._config = config  # CUPTI reads it during the call; keep it alive regardless
        cupti.activity_configure_unified_memory_counter(config.ptr, len(counters))
        cupti.activity_enable(cupti.ActivityKind.UNIFIED_MEMORY_COUNTER)
        # Bound methods referenced from self, so they live as long as CUPTI may call them.
        self._requested = self._buffer_requested
        self._completed = self._buffer_completed
        cupti.activity_register_callbacks(self._requested, self._completed)
        _register_for_exit(self)

    # ---- CUPTI's side (may run on a CUPTI thread) ------------------------------------------

    def _buffer_requested(self) -> tuple[int, int]:
        return _BUFFER_BYTES, 0  # 0: as many records as fit

    def _buffer_completed(self, activities: list[Any]) -> None:
        keep = []
        for record in activities:
            if int(record.kind) != self._um_kind:
                continue
            kind = int(record.counter_kind)
            if kind in (self._htod, self._dtoh, self._fault):
                keep.append((int(record.start), kind, int(record.value)))
        if keep:
            with self._lock:
                self._incoming.extend(keep)

    # ---- the training loop's side ---------------------------------------------------------

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self.unavailable is not None:
            yield
            return
        start = self._timestamp()
        self._open = (start, name) if start is not None else None
        finished = False
        try:
            yield
            finished = True
        finally:
            self._open = None
            if start is not None and self.unavailable is None:
                self._close_phase(start, name, finished)

    def _close_phase(self, start: int, name: str, finished: bool) -> None:
        if finished:  # after an exception (an out-of-memory error, say) the loop deals with CUDA
            try:
                self._sync()
            except Exception as exc:  # noqa: BLE001 - the training loop reports CUDA errors itself
                self._give_up(f"could not synchronise the device ({exc})")
                return
        end = self._timestamp()
        if end is not None:
            self._starts.append(start)
            self._intervals.append((start, end, name))

    def flush(self, step: int) -> list[dict[str, Any]]:
        """Per-phase totals since the last flush, nonzero ones only, in phase order."""
        if self.unavailable is not None:
            return []
        try:
            self._cupti.activity_flush_all(_FLUSH_FORCED)
        except Exception as exc:  # noqa: BLE001
            self._give_up(f"CUPTI failed to flush its records ({_error_name(self._cupti, exc)})")
            return []
        with self._lock:
            records, self._incoming = self._incoming, []
        for start, kind, value in records:
            totals = self._totals.setdefault(self._phase_at(start), [0, 0, 0])
            if kind == self._htod:
                totals[0] += value
            elif kind == self._dtoh:
                totals[1] += value
            else:
                totals[2] += value
        out = []
        for name in sorted(self._totals, key=_phase_order):
            htod, dtoh, faults = self._totals[name]
            if htod or dtoh or faults:
                out.append({"phase": name, "bytes_htod": htod, "bytes_dtoh": dtoh, "faults": faults})
        self._totals.clear()
        return out

    def close(self) -> None:
        """Stop the counters and drop what is left. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._cupti.activity_disable(self._cupti.ActivityKind.UNIFIED_MEMORY_COUNTER)
            self._cupti.activity_flush_all(_FLUSH_FORCED)
        if self.unavailable is None:
            self.unavailable = "the collector was closed"
        _forget(self)

    def __enter__(self) -> CuptiPagingCollector:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- helpers ------------------------------------------------------------------------

    def _phase_at(self, ts: int) -> str:
        """The phase whose interval ``[start, end)`` holds ``ts`` (in time order, not overlapping)."""
        if self._open is not None and ts >= self._open[0]:
            return self._open[1]
        i = bisect.bisect_right(self._starts, ts) - 1
        if i >= 0:
            start, end, name = self._intervals[i]
            if start <= ts < end:
                return name
        return OTHER

    def _timestamp(self) -> int | None:
        try:
            return int(self._cupti.get_timestamp())
        except Exception as exc:  # noqa: BLE001
            self._give_up(f"CUPTI failed to read its clock ({_error_name(self._cupti, exc)})")
            return None

    def _give_up(self, reason: str) -> None:
        """Turn the counters off for the rest of the run and say so once."""
        if self.unavailable is None:
            self.unavailable = reason
            log.warning("%s", unavailable_message(reason))
            self.close()


def _phase_order(name: str) -> tuple[int, str]:
    return (PHASES.index(name), name) if name in PHASES else (len(PHASES), name)


def _error_name(cupti: Any, exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    if status is not None:
        try:
            return cupti.Result(status).name
        except Exception:  # noqa: BLE001 - an unknown code: fall back to the text
            pass
    return str(exc) or type(exc).__name__


def cupti_reason(cupti: Any, exc: BaseException) -> str:
    """A CUPTI error in words, with CUPTI's own name for it."""
    name = _error_name(cupti, exc)
    known = [key for key in _REASONS if key in name]
    if known:
        return f"{_REASONS[max(known, key=len)]} ({name})"
    return f"CUPTI refused the unified-memory counters ({name})"


# CUPTI's activity buffers and callbacks are process-wide: one collector at a time.
_active: weakref.WeakSet[CuptiPagingCollector] = weakref.WeakSet()
_exit_hook_installed = False


def _register_for_exit(collector: CuptiPagingCollector) -> None:
    global _exit_hook_installed
    _active.add(collector)
    if not _exit_hook_installed:
        # Stop CUPTI before the interpreter tears down the objects its callbacks use.
        atexit.register(_close_all)
        _exit_hook_installed = True


def _forget(collector: CuptiPagingCollector) -> None:
    _active.discard(collector)


def _close_all() -> None:
    for collector in list(_active):
        collector.close()


def _device_index(device: Any) -> int | None:
    """The CUDA index of ``device`` (a torch.device, "cuda:1", "cuda" or 1); None if not CUDA."""
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    kind = getattr(device, "type", None)
    if kind is not None:
        return (device.index or 0) if kind == "cuda" else None
    text = str(device)
    if text == "cuda":
        return 0
    if text.startswith("cuda:") and text[5:].isdigit():
        return int(text[5:])
    return None


def _init_cuda(index: int) -> None:
    """Create the CUDA context on the device: the counters refuse to start before it exists."""
    import torch

    torch.cuda.init()
    torch.empty(1, device=torch.device("cuda", index))


def make_collector(enabled: bool, device: Any, *, cupti_module: Any = None,
                   init_cuda: Callable[[int], None] | None = None,
                   synchronize: Callable[[], None] | None = None) -> CuptiPagingCollector | NullCollector:
    """The paging collector for a training run on ``device``, or a :class:`NullCollector` saying why not.

    ``cupti_module``, ``init_cuda`` and ``synchronize`` exist for tests; by default they are
    ``cupti.cupti``, creating a CUDA context with torch, and ``torch.cuda.synchronize(device)``.
    """
    index = _device_index(device)
    if index is None:
        return NullCollector("training runs on the CPU, so nothing is paged")
    if not enabled:
        return NullCollector("turned off")
    if os.environ.get("CUDA_INJECTION64_PATH"):
        return NullCollector("another profiler is attached (CUDA_INJECTION64_PATH is set, e.g. by Nsight)")
    if _active:
        return NullCollector("a paging collector is already running in this process")
    cupti = cupti_module
    if cupti is None:
        try:
            from cupti import cupti  # type: ignore[no-redef]
        except ImportError:
            return NullCollector("the cupti-python package is not installed (pip install 'qlora-studio[cupti]')")
        except Exception as exc:  # noqa: BLE001 - a broken install (no libcupti) says so here
            return NullCollector(f"cupti-python failed to load ({exc})")
    try:
        (init_cuda or _init_cuda)(index)
    except Exception as exc:  # noqa: BLE001
        return NullCollector(f"CUDA failed to initialise on device {index} ({exc})")
    if synchronize is None:
        def synchronize() -> None:
            import torch

            torch.cuda.synchronize(index)
    try:
        return CuptiPagingCollector(cupti, index, synchronize=synchronize)
    except Exception as exc:  # noqa: BLE001
        with contextlib.suppress(Exception):
            cupti.activity_disable(cupti.ActivityKind.UNIFIED_MEMORY_COUNTER)
        return NullCollector(cupti_reason(cupti, exc))
