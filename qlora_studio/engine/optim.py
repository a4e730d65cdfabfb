"""Paged AdamW with one device synchronisation per step.

bitsandbytes' optimizers synchronise the whole device after updating each parameter: for LoRA on
all linear layers that is hundreds of host round trips per step (448 on an 8B model), each of them
waiting for the GPU to drain. The updates are kernels on one stream, and the pages they touch are
moved by the driver on demand or by prefetches on that stream, so they are ordered without it.
This subclass keeps the per-parameter work as it is — the same state, the same kernels, the same
mathematics — and synchronises once, at the end of the step, where the paged state must be settled.
"""

from __future__ import annotations

import torch
from bitsandbytes.optim import PagedAdamW8bit, PagedAdamW32bit


class _OneSyncStep:
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.initialized:
            self.check_overrides()
            self.to_gpu()
            self.initialized = True
        device = None
        for gindex, group in enumerate(self.param_groups):
            for pindex, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if not self.state[p]:
                    self.init_state(group, p, gindex, pindex)
                self.prefetch_state(p)
                self.update_step(group, p, gindex, pindex)
                device = p.device
        if device is not None and device.type == "cuda":
            torch.cuda.synchronize(device)
        return loss


class PagedAdamW32bitOneSync(_OneSyncStep, PagedAdamW32bit):
    """PagedAdamW32bit, synchronising once per step instead of once per parameter."""


class PagedAdamW8bitOneSync(_OneSyncStep, PagedAdamW8bit):
    """PagedAdamW8bit, synchronising once per step instead of once per parameter."""
