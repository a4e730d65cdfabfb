"""The most GPU memory in use at once during training steps, the CUDA graphs' pool counted once.

A replay of the engine's CUDA graphs (engine/layer_graphs.py) uses their pool without allocating,
so the memory in use at once is the allocator's peak plus the pool's reserved bytes. The chunked
loss, though, allocates its temporaries *in* the pool (``GraphContext.scratch``), and the allocator
counts those as allocated too: added to the whole pool they would be counted twice. PeakMemory
keeps the allocator's peak of what lies outside the pool: when the loss starts allocating in the
pool it notes the peak so far, and it starts a new peak when the loss is done.

    peak = PeakMemory(getattr(model, "layer_graphs", None))   # CUDA only
    peak.reset(); ...warm-up steps...; warm = peak.allocated(pool=False); peak.reset()
    ...steps...; peak.allocated(), peak.reserved()
"""

from __future__ import annotations

import contextlib


class PeakMemory:
    def __init__(self, graphs=None):
        import torch

        self.torch = torch
        self.graphs = graphs
        self._marks: list[tuple[int, int]] = []  # (allocated, reserved) peaks before each use of the pool
        if graphs is not None:
            inner = graphs.scratch

            @contextlib.contextmanager
            def scratch():
                if not graphs.scratch_in_pool():  # allocations stay outside the pool: they count
                    with inner():
                        yield
                    return
                cuda = self.torch.cuda
                self._marks.append((cuda.max_memory_allocated(), cuda.max_memory_reserved()))
                try:
                    with inner():
                        yield
                finally:  # the loss's temporaries are freed by now: the peak starts again from here
                    cuda.reset_peak_memory_stats()

            graphs.scratch = scratch  # the trainer looks the method up on the object at every step

    def reset(self) -> None:
        self._marks.clear()
        self.torch.cuda.reset_peak_memory_stats()

    def allocated(self, pool: bool = True) -> int:
        """Since the last reset: the allocator's peak outside the graphs' pool, plus (``pool``) the
        pool. Without the pool for steps that record graphs: their temporaries are allocations then."""
        peak = max([a for a, _ in self._marks] + [self.torch.cuda.max_memory_allocated()])
        return peak + (self.graphs.pool_bytes() if pool and self.graphs is not None else 0)

    def reserved(self) -> int:
        """Since the last reset: the allocator's peak of reserved memory (the pool included)."""
        return max([r for _, r in self._marks] + [self.torch.cuda.max_memory_reserved()])
