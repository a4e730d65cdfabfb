"""A fused forward and backward for a 4-bit linear layer with a LoRA adapter.

PEFT computes ``base(x) + B(A(dropout(x))) * scale`` as separate modules: it clones the base
output, copies the input to fp32 for the adapter, runs two fp32 matrix products, scales and casts
the result back, and autograd keeps an fp32 copy of the input for the backward pass. On a GPU
those copies, casts and fp32 products took about a fifth of a step's GPU time (bench/profile_step.py
on the 1B shape).

:class:`LoRA4bitFunction` does the same arithmetic in the compute dtype, as the base layer does:

    forward   y  = x W^T + scale (x_d A^T) B^T          W dequantized from 4 bits, dropped after use
    backward  dx = g W + scale (g B) A                   W dequantized again, as bitsandbytes does
              dA = scale (g B)^T x_d,  dB = scale g^T (x_d A^T)

with ``x_d`` the dropped-out input of the adapter (``x`` itself without dropout). It keeps only
the inputs and the rank-r product ``x_d A^T``. The adapter's weights stay in fp32 (the optimizer's
master copy); their gradients are accumulated in fp32 from compute-dtype products.

The adapter's rank-r term is computed first and the large product is added to it (``addmm_``):
cuBLAS reads the term in the large product's epilogue, where a separate addition after it is a
pass of its own over the output (those additions were about 5% of an 8B step's GPU time on an
H200, bench/profile_step.py). ``scale`` is folded into B's rows; A and scale·B are kept in the
compute dtype between passes (:func:`compute_copies`). On a GPU the weight is dequantized by
nf4_kernel.py (bitsandbytes' values, in one pass), elsewhere by bitsandbytes.
"""

from __future__ import annotations

import logging
import types

import torch

from .device import kernel_failed, triton_runs

log = logging.getLogger(__name__)


def _dequantize(weight) -> torch.Tensor:
    """The frozen weight in its compute dtype: nf4_kernel's one-pass kernel on a GPU that runs it,
    else bitsandbytes' (the same values)."""
    state = weight.quant_state
    kernel = _nf4_kernel(weight.data, state)
    if kernel is not None:
        try:
            return kernel(weight.data, state)
        except Exception as exc:  # noqa: BLE001 - a Triton that cannot build the kernel here (it fails before running)
            _kernel_failed(exc)
    import bitsandbytes.functional as bnbF

    return bnbF.dequantize_4bit(weight.data, state)


_KERNEL_OFF: list[str] = []  # why the kernel failed, once it has: bitsandbytes' dequantization from then on


def _kernel_failed(exc: BaseException) -> None:
    kernel_failed(_KERNEL_OFF, exc, log, "the NF4 dequantization kernel failed (%s); bitsandbytes dequantizes the "
                  "weights from now on (the same values, a little slower)")


def _nf4_kernel(data: torch.Tensor, state):
    """nf4_kernel.dequantize_nf4 where it runs (a CUDA weight it supports, Triton on a Turing or newer
    GPU, and it has not failed before), else None."""
    if _KERNEL_OFF or not triton_runs(data.device):
        return None
    try:
        from . import nf4_kernel
    except ImportError:
        return None
    return nf4_kernel.dequantize_nf4 if nf4_kernel.supported(data, state) else None


_FP32_OUT_OFF: list[str] = []  # why torch.mm(..., out_dtype=float32) failed here, once it has


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` in fp32 from compute-dtype operands: on a GPU the product writes fp32 directly
    (no compute-dtype result and no cast kernel after it), elsewhere the product is cast."""
    if a.is_cuda and a.dtype != torch.float32 and not _FP32_OUT_OFF:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError, NotImplementedError) as exc:  # an older PyTorch, or a GPU without it
            _FP32_OUT_OFF.append(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            log.info("fp32 products of compute-dtype operands are not available here (%s); casting instead",
                     _FP32_OUT_OFF[0])
    return (a @ b).float()


_GENERATION = [0]  # bumped by weights_changed(): every compute-dtype copy is refreshed at its next use


def weights_changed() -> None:
    """Say that adapter weights may have changed in a way their version counters do not show (the
    trainer calls it after every optimizer step): the compute-dtype copies are rebuilt at next use."""
    _GENERATION[0] += 1


def compute_copies(module, adapter: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The adapter's A and scale·B in the compute dtype, kept on the module between passes; None
    where the adapter is already in that dtype.

    Cast in every pass, they were 1,351 of the 8,667 kernels of an 8B step (bench/profile_step.py's
    trace). The copies are refreshed in place
    when the weights' version counters, their storage or weights_changed()'s generation differ from
    those they were made from, so a CUDA graph that reads them stays valid (refresh_copies)."""
    la, lb = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    if la.dtype == dtype:
        return None
    scale = float(module.scaling[adapter])
    key = (_GENERATION[0], la._version, lb._version, la.data_ptr(), lb.data_ptr(), scale)
    copies = module.__dict__.get("_compute_copies")
    with torch.no_grad():
        if (copies is None or copies["adapter"] != adapter or copies["a"].dtype != dtype
                or copies["a"].shape != la.shape or copies["b"].shape != lb.shape or copies["a"].device != la.device):
            copies = {"a": la.to(dtype, copy=True), "b": torch.mul(lb, scale).to(dtype), "key": key, "adapter": adapter}
            module._compute_copies = copies
        elif copies["key"] != key:
            copies["a"].copy_(la)
            torch.mul(lb, scale, out=copies["b"])
            copies["key"] = key
    return copies["a"], copies["b"]


def refresh_copies(modules) -> None:
    """Bring the compute-dtype copies of these fused layers up to date (before a CUDA graph that
    reads them replays: the graph holds their addresses, not the casts)."""
    for module in modules:
        copies = module.__dict__.get("_compute_copies")
        if copies is not None:
            compute_copies(module, copies["adapter"], copies["a"].dtype)


class LoRA4bitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_d, weight, lora_a, lora_b, scale: float, bias, copies=None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xd2 = x_d.reshape(-1, shape[-1])
        dtype = x.dtype
        if copies is not None:  # compute_copies: A and scale B in the compute dtype
            a, b = copies
        else:
            a = lora_a.to(dtype)
            b = (lora_b * scale).to(dtype)  # the scale goes into B's rows
        xa = xd2 @ a.t()
        out = xa @ b.t()  # the adapter's term first, then the frozen weight's product is added to it in
        w = _dequantize(weight).to(dtype)  # cuBLAS's epilogue, instead of in a pass of its own over `out`
        out.addmm_(x2, w.t())
        del w
        if bias is not None:
            out += bias.to(dtype)
        ctx.save_for_backward(xd2, xa, a, b)
        ctx.weight = weight
        ctx.scale = scale
        ctx.shape = shape
        ctx.same_input = x_d is x
        ctx.has_bias = bias is not None
        return out.view(*shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        xd2, xa, a, b = ctx.saved_tensors  # b: scale B
        g = grad.reshape(-1, grad.shape[-1]).to(xd2.dtype)
        gb = g @ b  # scale (g B), (tokens, r)
        grad_a = _mm_fp32(gb.t(), xd2)
        grad_b = _mm_fp32(g.t(), xa).mul_(ctx.scale)
        grad_xd = None
        if ctx.same_input:
            grad_x = gb @ a  # the adapter's term first, as in forward
        else:
            grad_xd = (gb @ a).view(ctx.shape)
        w = _dequantize(ctx.weight).to(g.dtype)
        if ctx.same_input:
            grad_x.addmm_(g, w)
        else:
            grad_x = g @ w
        del w
        grad_bias = g.sum(0) if ctx.has_bias else None
        return grad_x.view(ctx.shape), grad_xd, None, grad_a, grad_b, None, grad_bias, None


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Replaces a PEFT ``lora.bnb.Linear4bit`` forward when one plain LoRA adapter is active."""
    adapter = self.active_adapters[0] if len(self.active_adapters) == 1 else None
    if (self.disable_adapters or self.merged or adapter is None or adapter not in self.lora_A
            or adapter in getattr(self, "lora_variant", {}) or kwargs.get("adapter_names") is not None
            # bitsandbytes repacks weights for its CPU inference kernel; only its own path reads that layout.
            or getattr(self.base_layer.weight.quant_state, "packing_format_for_cpu", False)):
        return self._peft_forward(x, *args, **kwargs)
    dropout = self.lora_dropout[adapter]
    x_d = dropout(x) if isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and self.training else x
    base = self.base_layer
    return LoRA4bitFunction.apply(x, x_d, base.weight, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                  float(self.scaling[adapter]), base.bias, compute_copies(self, adapter, x.dtype))


def fused_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The PEFT 4-bit LoRA layers in ``module`` that fuse_lora_layers routed through the fused function."""
    return [m for m in module.modules() if hasattr(m, "_peft_forward")]


def fuse_lora_layers(model) -> int:
    """Route every PEFT 4-bit LoRA layer of ``model`` through :class:`LoRA4bitFunction`; returns the count."""
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear4bit) and not hasattr(module, "_peft_forward"):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count


__all__ = ["LoRA4bitFunction", "compute_copies", "fuse_lora_layers", "fused_layers", "refresh_copies", "weights_changed"]
