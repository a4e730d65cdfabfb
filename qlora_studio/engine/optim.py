"""Paged AdamW for the engine: one fused kernel call per step, or bitsandbytes' kernels with one sync.

:class:`PagedAdamWFused` is what ``paged_adamw_32bit`` runs with ``train.fused_optimizer`` on (the
default). bitsandbytes' paged optimizers update one parameter at a time from Python: for all-linear
LoRA on an 8B model that is 448 state prefetches and 448 kernel launches a step, each followed by a
synchronisation of the whole device. Here the two AdamW states of every parameter are views of one
buffer each, in CUDA unified (managed) memory allocated through bitsandbytes as its paged
optimizers allocate theirs; a step prefetches each buffer to the GPU once and updates all
parameters in torch's fused multi-tensor AdamW kernel, without waiting for the GPU. The arithmetic
is AdamW's with decoupled weight decay, as in bitsandbytes' 32-bit kernel (fp32 states, bias
corrections, eps added to the corrected root); results agree to fp32 rounding
(bench/optimizer_step.py). Every state is paged, where bitsandbytes pages only tensors of 100,000
elements or more and keeps smaller ones in ordinary GPU memory (about 150 MB of them for the 8B
shape). On the CPU the states are ordinary tensors in the same layout.

The ``*OneSync`` classes keep bitsandbytes' per-parameter kernels and state (``paged_adamw_8bit``,
and ``paged_adamw_32bit`` with ``train.fused_optimizer`` off) but synchronise once, at the end of
the step, instead of after every parameter: the updates are kernels on one stream and the pages
they touch are moved by the driver on demand or by prefetches on that stream, so they are ordered
without it.
"""

from __future__ import annotations

from typing import Any

import torch
from bitsandbytes.optim import PagedAdamW8bit, PagedAdamW32bit

_STATES = ("exp_avg", "exp_avg_sq")


class _DevicePointer:
    """A device pointer to fp32 values described by ``__cuda_array_interface__``, for torch.as_tensor to wrap."""

    def __init__(self, pointer: int, numel: int):
        self.__cuda_array_interface__ = {"shape": (numel,), "typestr": "<f4", "data": (pointer, False),
                                         "version": 3, "strides": None}


def _managed_buffer(numel: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``numel`` fp32 zeros in unified memory: bitsandbytes' CPU-side tensor and a CUDA tensor over the same pages."""
    import bitsandbytes.functional as bnbF

    host = bnbF.get_paged(numel, dtype=torch.float32, device=device)
    view = torch.as_tensor(_DevicePointer(host.data_ptr(), numel), device=device)
    if view.data_ptr() != host.data_ptr():
        raise RuntimeError("torch copied the managed buffer instead of wrapping it")
    view.zero_()
    return host, view


class PagedAdamWFused(torch.optim.AdamW):
    """AdamW in torch's fused kernel with its states in paged memory (see the module docstring).

    ``paged``: keep the states in unified memory; by default on CUDA, never on the CPU. All
    parameters must be fp32 (the engine keeps LoRA weights in fp32) and on one device.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, paged: bool | None = None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        params = self._all_params()
        devices = {p.device for p in params}
        if len(devices) > 1 or any(p.dtype != torch.float32 for p in params):
            raise ValueError(f"PagedAdamWFused needs fp32 parameters on one device; got {devices}, "
                             f"{sorted({str(p.dtype) for p in params})}")
        self.paged = bool(params) and (params[0].device.type == "cuda" if paged is None else paged)
        self._managed: list[torch.Tensor] = []  # bitsandbytes' CPU-side tensors over the unified buffers
        self._lay_out(params)

    def _all_params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"]]

    def _lay_out(self, params: list[torch.nn.Parameter]) -> None:
        """Give every parameter its (zero) state as views of shared buffers, allocated once."""
        if not params:
            return
        device = params[0].device
        total = sum(p.numel() for p in params)
        buffers = []
        for _ in _STATES:
            if self.paged:
                host, view = _managed_buffer(total, device)
                self._managed.append(host)
            else:
                view = torch.zeros(total, dtype=torch.float32, device=device)
            buffers.append(view)
        steps = torch.zeros(len(params), dtype=torch.float32, device=device)  # the fused kernel's step counts
        offset = 0
        for i, p in enumerate(params):
            state: dict[str, Any] = {"step": steps[i]}
            for key, buffer in zip(_STATES, buffers):
                view = buffer[offset:offset + p.numel()].view_as(p)
                view.is_paged = self.paged  # what the GPU Monitor counts as paged state
                state[key] = view
            self.state[p] = state
            offset += p.numel()

    def managed_host_tensors(self) -> list[torch.Tensor]:
        """The unified state buffers as CPU tensors: reading or writing them moves their pages to host memory."""
        return list(self._managed)

    @torch.no_grad()
    def step(self, closure=None):
        if self._managed:
            import bitsandbytes.functional as bnbF

            for host in self._managed:  # pages on the host come back in bulk, not one fault at a time
                bnbF.prefetch_tensor(host)
        return super().step(closure)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state saved by this class or by bitsandbytes' 32-bit AdamW, into the same paged buffers."""
        views = {p: self.state[p] for p in self._all_params()}
        super().load_state_dict(self._from_bitsandbytes(state_dict))
        with torch.no_grad():
            for p, ours in views.items():
                loaded = self.state.get(p, {})
                for key in _STATES:
                    if key in loaded:
                        ours[key].copy_(loaded[key])
                    else:
                        ours[key].zero_()
                ours["step"].fill_(float(loaded.get("step", 0.0)))
                self.state[p] = ours

    def _from_bitsandbytes(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """bitsandbytes' 32-bit AdamW keeps ``state1``/``state2`` and an integer step: the same two moments."""
        wrapped = "__bnb_optimizer_quant_state__"
        states = state_dict.get("state", {})
        if not any(isinstance(s, dict) and ("state1" in s or wrapped in s) for s in states.values()):
            return state_dict
        converted = {}
        for index, s in states.items():
            moments = {**s, **s.get(wrapped, {})}
            if moments.get("state1") is None or moments.get("state2") is None or moments["state1"].dtype == torch.uint8:
                raise ValueError("this optimizer state is not a 32-bit AdamW's (8-bit states cannot be loaded here)")
            converted[index] = {"step": torch.tensor(float(moments["step"])), "exp_avg": moments["state1"],
                                "exp_avg_sq": moments["state2"]}
        groups = []
        for ours, saved in zip(self.param_groups, state_dict["param_groups"]):
            group = {k: v for k, v in ours.items() if k != "params"}
            group.update({k: saved[k] for k in ("lr", "betas", "eps", "weight_decay", "initial_lr") if k in saved})
            groups.append({**group, "params": saved["params"]})
        return {"state": converted, "param_groups": groups}


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
