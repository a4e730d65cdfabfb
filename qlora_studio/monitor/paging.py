"""Paging counters on the worker side: how many bytes the paged optimizer's state moves, and when.

bitsandbytes' paged optimizers keep their state in CUDA managed (unified) memory, which the driver
moves between GPU and CPU memory page by page: out when the card runs short or the CPU touches it,
back in when a kernel or a prefetch needs it. CUPTI's unified-memory counters
(activity kind ``UNIFIED_MEMORY_COUNTER``) report each move, host to device and device to host,
and the GPU page faults, with a timestamp. This module turns them into per-step, per-phase totals:

    collector = make_collector(enabled=True, device=device)
    if collector.unavailable:
        log.info(unavailable_message(collector.unavailable))
    for step in ...:
        with collector.phase("forward"): ...
        with collector.phase("backward"): ...
        with collector.phase("optimizer"): ...
        for totals in collector.flush(step):      # nonzero (step, phase) totals, often []
            writer.emit("paging", **{"step": step, **totals})
    for totals in collector.flush(step, force=True):  # what is still on its way
        writer.emit("paging", **{"step": step, **totals})
    collector.close()

Attribution is by time, and costs the training loop no synchronisation. A phase records a CUDA
event (a *marker*) on the device's current stream as it opens and as it closes; the GPU stamps
each marker when it gets there, so a phase's interval spans the GPU work it launched, and the
faults that work causes, without draining the device between phases. Every ``flush(step)`` call
records one marker more and gives the phases closed since the previous call that step.

CUPTI is drained (``activity_flush_all``) at most once every ``flush_interval_s`` seconds (5 s by
default), on ``flush(step, force=True)`` and at :meth:`CuptiPagingCollector.close`; a ``flush`` in
between only records its marker and returns ``[]``. A draining flush first turns the waiting
markers into CUPTI timestamps with one wait: it records an *anchor* event, waits for it, and reads
CUPTI's clock; a marker's time is that reading less the GPU time from the marker to the anchor.
Each counter record is then credited to the (step, phase) whose interval holds its start time, so
records that arrive one or more flushes late still count for the step they happened in. A record
outside every phase (a CPU touch between steps, the gradient clipping between backward and
optimizer) goes to the phase ``"other"`` of the first ``flush`` call after it, or, if it is newer
than every marker or older than the history kept, to the step of the flush that reports it.

On the H200 with CUDA 13 the counters work only when CUDA is initialised *before* they are
configured and enabled (enabling first answers ``CUPTI_ERROR_NOT_READY``), so
:func:`make_collector` creates the CUDA context first.

Never crashes training: anything missing or refusing gives a :class:`NullCollector` whose
``unavailable`` says why, and a failure mid-run is logged once and turns the counters off.

torch is imported only inside :func:`make_collector` and :class:`CudaClock`; the rest is plain
Python, so the GUI and the tests can import this module.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger("qlora_studio.monitor.paging")

PHASES = ("forward", "backward", "optimizer")
OTHER = "other"  # moves outside every bracketed phase
UNAVAILABLE_PREFIX = "Paging counters unavailable: "

_BUFFER_BYTES = 4 * 1024 * 1024
_FLUSH_INTERVAL_S = 5.0  # CUPTI is drained at most this often, unless forced (a drain costs ~20 ms)
_KEEP_FLUSHES = 4  # draining flushes whose intervals stay known, for records that arrive late
_MAX_WAITING = 4096  # markers waiting for a timestamp before a flush drains CUPTI regardless
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

    def flush(self, step: int, *, force: bool = False) -> list[dict[str, Any]]:
        return []

    def close(self) -> None:
        pass

    def __enter__(self) -> NullCollector:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class CudaClock:
    """Markers on the training device's GPU timeline, read back later on CUPTI's clock.

    :meth:`mark` records a CUDA event on the device's current stream: asynchronous, it waits for
    nothing. :meth:`resolve` waits once for the given markers, records an *anchor* event behind
    them, waits for it and reads CUPTI's clock at once: the anchor completed at (or a few
    microseconds before) that reading, and each marker's time is the reading less the GPU time
    from the marker to the anchor (``elapsed_time`` is in milliseconds). ``cuda`` is
    ``torch.cuda`` (imported here when not given) or a fake with the same ``Event`` and
    ``current_stream``; ``timestamp`` is CUPTI's ``get_timestamp`` (nanoseconds).
    """

    def __init__(self, timestamp: Callable[[], int], device_index: int, *, cuda: Any = None):
        if cuda is None:
            import torch

            cuda = torch.cuda
        self._cuda = cuda
        self._timestamp = timestamp
        self._index = device_index

    def mark(self) -> Any:
        event = self._cuda.Event(enable_timing=True)
        event.record(self._cuda.current_stream(self._index))
        return event

    def resolve(self, markers: list[Any]) -> list[int]:
        """The CUPTI timestamps (ns) of ``markers``; raises what CUDA or CUPTI raise."""
        for marker in markers:  # markers are in stream order: only the first waits, if any
            marker.synchronize()
        anchor = self.mark()
        anchor.synchronize()
        now = int(self._timestamp())
        return [now - round(marker.elapsed_time(anchor) * 1e6) for marker in markers]


class CuptiPagingCollector:
    """Per-step, per-phase totals from CUPTI's unified-memory counters.

    ``cupti`` is the ``cupti.cupti`` module of cupti-python (or a fake with the same names), and
    ``clock`` a :class:`CudaClock` (or a fake with ``mark`` and ``resolve``). The caller must have
    initialised CUDA on the device before constructing this (see the module docstring);
    construction raises the CUPTI error when the counters cannot be enabled. CUPTI is drained at
    most once every ``flush_interval_s`` seconds of ``now``, and also whenever ``max_waiting``
    markers wait to be resolved; the intervals of the last ``keep_flushes`` draining flushes stay
    known for records that arrive late.
    """

    def __init__(self, cupti: Any, device_index: int, *, clock: Any,
                 flush_interval_s: float = _FLUSH_INTERVAL_S, now: Callable[[], float] = time.monotonic,
                 max_waiting: int = _MAX_WAITING, keep_flushes: int = _KEEP_FLUSHES):
        self._cupti = cupti
        self._clock = clock
        self._interval = flush_interval_s
        self._now = now
        self._max_waiting = max_waiting
        self._keep_flushes = keep_flushes
        self._lock = threading.Lock()
        self._incoming: list[tuple[int, int, int]] = []  # (start ns, counter kind, value)
        # Markers not yet resolved: phases closed since the last flush call, then one group per call.
        self._pending: deque[tuple[Any, Any, str]] = deque(maxlen=max_waiting)
        self._waiting: list[tuple[int, Any, list[tuple[Any, Any, str]]]] = []  # (step, call marker, phases)
        self._waiting_markers = 0
        # Resolved history, one entry per flush call, in time order: the call's time and step, and
        # the starts and intervals of the phases it closed.
        self._calls: list[int] = []
        self._call_steps: list[int] = []
        self._groups: list[tuple[list[int], list[tuple[int, int, str]]]] = []
        self._batches: deque[int] = deque()  # flush calls resolved by each draining flush
        self._horizon = -1  # CUPTI time of the newest flush call forgotten
        self._last_drain = now()
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
        """Bracket ``name``: a marker as it opens and one as it closes, even on an exception."""
        if self.unavailable is not None:
            yield
            return
        start = self._mark()
        try:
            yield
        finally:
            # After an exception (an out-of-memory error, say) the marker still closes the phase;
            # if CUDA itself has failed, recording it fails and the counters turn off.
            if start is not None and self.unavailable is None:
                end = self._mark()
                if end is not None:
                    self._pending.append((start, end, name))

    def flush(self, step: int, *, force: bool = False) -> list[dict[str, Any]]:
        """Totals of the records CUPTI delivered, per (step, phase), nonzero ones only.

        Call it once per step, between phases: the phases closed since the previous call are
        ``step``'s. Between draining flushes (see the module docstring) it returns ``[]``;
        ``force=True`` drains now. Each dict has the keys ``step``, ``phase``, ``bytes_htod``,
        ``bytes_dtoh`` and ``faults``, ordered by step, then phase.
        """
        if self.unavailable is not None:
            return []
        marker = self._mark()
        if marker is None:
            return []
        phases = list(self._pending)
        self._pending.clear()
        self._waiting.append((step, marker, phases))
        self._waiting_markers += 1 + 2 * len(phases)
        now = self._now()
        if not (force or now - self._last_drain >= self._interval or self._waiting_markers >= self._max_waiting):
            return []
        self._last_drain = now
        if not self._resolve_waiting():
            return []
        try:
            self._cupti.activity_flush_all(_FLUSH_FORCED)
        except Exception as exc:  # noqa: BLE001
            self._give_up(f"CUPTI failed to flush its records ({_error_name(self._cupti, exc)})")
            return []
        with self._lock:
            records, self._incoming = self._incoming, []
        totals: dict[tuple[int, str], list[int]] = {}
        for start, kind, value in records:
            counts = totals.setdefault(self._place(start, step), [0, 0, 0])
            counts[0 if kind == self._htod else 1 if kind == self._dtoh else 2] += value
        out = []
        for (at, name), (htod, dtoh, faults) in sorted(totals.items(), key=_record_order):
            if htod or dtoh or faults:
                out.append({"step": at, "phase": name, "bytes_htod": htod, "bytes_dtoh": dtoh, "faults": faults})
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
        self._pending.clear()
        self._waiting.clear()
        _forget(self)

    def __enter__(self) -> CuptiPagingCollector:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- helpers ------------------------------------------------------------------------

    def _mark(self) -> Any:
        try:
            return self._clock.mark()
        except Exception as exc:  # noqa: BLE001 - the training loop reports CUDA errors itself
            self._give_up(f"could not record a GPU marker ({exc})")
            return None

    def _resolve_waiting(self) -> bool:
        """Turn the waiting markers into CUPTI times and add them to the history; False on failure."""
        markers = []
        for _, call, phases in self._waiting:
            markers.append(call)
            for start, end, _ in phases:
                markers += (start, end)
        try:
            times = iter(self._clock.resolve(markers))
        except Exception as exc:  # noqa: BLE001 - a failed CUDA context, a CUPTI error
            self._give_up(f"could not read the GPU markers' times ({_error_name(self._cupti, exc)})")
            return False
        for step, _, phases in self._waiting:
            self._calls.append(next(times))
            self._call_steps.append(step)
            starts, intervals = [], []
            for _, _, name in phases:
                start, end = next(times), next(times)
                starts.append(start)
                intervals.append((start, end, name))
            self._groups.append((starts, intervals))
        self._batches.append(len(self._waiting))
        self._waiting = []
        self._waiting_markers = 0
        while len(self._batches) > self._keep_flushes:
            n = self._batches.popleft()
            if n:
                self._horizon = self._calls[n - 1]
                del self._calls[:n], self._call_steps[:n], self._groups[:n]
        return True

    def _place(self, ts: int, step: int) -> tuple[int, str]:
        """The (step, phase) of a record starting at ``ts``, reported by ``flush(step)``."""
        if ts <= self._horizon:
            return step, OTHER  # older than the history kept
        i = bisect.bisect_left(self._calls, ts)  # the first flush call at or after the record
        if i == len(self._calls):
            return step, OTHER  # newer than every flush call resolved
        starts, intervals = self._groups[i]
        j = bisect.bisect_right(starts, ts) - 1  # phases are in time order and do not overlap
        if j >= 0:
            start, end, name = intervals[j]
            if start <= ts < end:
                return self._call_steps[i], name
        return self._call_steps[i], OTHER

    def _give_up(self, reason: str) -> None:
        """Turn the counters off for the rest of the run and say so once."""
        if self.unavailable is None:
            self.unavailable = reason
            log.warning("%s", unavailable_message(reason))
            self.close()


def _record_order(item: tuple[tuple[int, str], list[int]]) -> tuple[int, int, str]:
    (step, name), _ = item
    return (step, *_phase_order(name))


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
                   init_cuda: Callable[[int], None] | None = None, clock: Any = None,
                   flush_interval_s: float = _FLUSH_INTERVAL_S,
                   now: Callable[[], float] = time.monotonic) -> CuptiPagingCollector | NullCollector:
    """The paging collector for a training run on ``device``, or a :class:`NullCollector` saying why not.

    ``cupti_module``, ``init_cuda``, ``clock`` and ``now`` exist for tests; by default they are
    ``cupti.cupti``, creating a CUDA context with torch, a :class:`CudaClock` on the device with
    ``torch.cuda``, and ``time.monotonic``.
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
        if clock is None:
            clock = CudaClock(cupti.get_timestamp, index)
    except Exception as exc:  # noqa: BLE001
        return NullCollector(f"CUDA failed to initialise on device {index} ({exc})")
    try:
        return CuptiPagingCollector(cupti, index, clock=clock, flush_interval_s=flush_interval_s, now=now)
    except Exception as exc:  # noqa: BLE001
        with contextlib.suppress(Exception):
            cupti.activity_disable(cupti.ActivityKind.UNIFIED_MEMORY_COUNTER)
        return NullCollector(cupti_reason(cupti, exc))
