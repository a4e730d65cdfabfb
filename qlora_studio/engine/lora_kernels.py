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

The adapter's rank-r term is computed first and the large product is added to it (``addmm_``):
cuBLAS reads the term in the large product's epilogue, where a separate addition after it would
be a pass of its own over the output (about 3% of an 8B step on an H200). ``scale`` is folded
into B's rows in the compute dtype.

with ``x_d`` the dropped-out input of the adapter (``x`` itself without dropout). On a GPU the
weight is dequantized by nf4_kernel.py (bitsandbytes' values, in one pass), elsewhere by bitsandbytes. It keeps only
the inputs and the rank-r product ``x_d A^T``. The adapter's weights stay in fp32 (the optimizer's
master copy); their gradients are accumulated in fp32 from compute-dtype products.
"""

from __future__ import annotations

import logging
import types

import torch

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
    from .model import first_line

    _KERNEL_OFF.append(f"{type(exc).__name__}: {first_line(exc)}")
    log.warning("the NF4 dequantization kernel failed (%s); bitsandbytes dequantizes the weights from now on "
                "(the same values, a little slower)", _KERNEL_OFF[0])


def _nf4_kernel(data: torch.Tensor, state):
    """nf4_kernel.dequantize_nf4 where it runs (a CUDA weight it supports, Triton on a Turing or newer
    GPU, and it has not failed before), else None."""
    if _KERNEL_OFF or not data.is_cuda or torch.cuda.get_device_capability(data.device) < (7, 5):
        return None
    try:
        from . import nf4_kernel
    except ImportError:
        return None
    return nf4_kernel.dequantize_nf4 if nf4_kernel.supported(data, state) else None


class LoRA4bitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_d, weight, lora_a, lora_b, scale: float, bias):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xd2 = x_d.reshape(-1, shape[-1])
        dtype = x.dtype
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
        grad_a = (gb.t() @ xd2).float()
        grad_b = (g.t() @ xa).float().mul_(ctx.scale)
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
        return grad_x.view(ctx.shape), grad_xd, None, grad_a, grad_b, None, grad_bias


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
                                  float(self.scaling[adapter]), base.bias)


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


__all__ = ["LoRA4bitFunction", "fuse_lora_layers"]
