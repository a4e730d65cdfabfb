"""Live tensor bytes of a PyTorch program on the CPU, operator by operator, and their peak.

A ``TorchDispatchMode`` sees every operator's outputs; each new storage is counted until it dies
(a weak reference to it expires). That is the CPU's equivalent of ``torch.cuda.max_memory_allocated``
for the tensors an operator returns. Two kinds of memory are not operator outputs and are added
here: bitsandbytes' 4-bit product is a Python kernel whose inner tensors (the dequantized
weight) are followed by running it under the mode, and ``logsumexp``'s temporary, (x - max).exp(),
is counted for the moment of the call.
"""

from __future__ import annotations

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class PeakTracker(TorchDispatchMode):
    def __init__(self, ignore: set[int] = frozenset()):
        super().__init__()
        self.ignore = set(ignore)  # storages that existed before (the model's parameters)
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = 0
        self.peak = 0

    def _collect(self) -> None:
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.now -= self.live.pop(key)[1]

    def _bump(self, extra: int = 0) -> None:
        self.peak = max(self.peak, self.now + extra)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if str(func) == "bitsandbytes.gemm_4bit.default":
            from bitsandbytes.backends.default.ops import _gemm_4bit_default_impl

            with self:
                return _gemm_4bit_default_impl(*args, **kwargs)
        self._collect()
        if func is torch.ops.aten.logsumexp.default:
            self._bump(args[0].numel() * args[0].element_size())
        out = func(*args, **kwargs)
        self._collect()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live and key not in self.ignore:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.now += storage.nbytes()
        self._bump()
        return out


def model_storages(model: torch.nn.Module) -> set[int]:
    """The storages of a model's parameters, buffers and 4-bit quantization states."""
    tensors = list(model.parameters()) + list(model.buffers())
    for p in list(tensors):
        state = getattr(p, "quant_state", None)
        if state is not None:
            tensors += [state.absmax, state.code, state.offset]
            if state.state2 is not None:
                tensors += [state.state2.absmax, state.state2.code]
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}
