"""A Triton kernel that dequantizes a bitsandbytes NF4 weight: the same values, in one pass.

The fused LoRA layer (lora_kernels.py) dequantizes each frozen weight three times a step (forward,
recomputation, backward). bitsandbytes does it in three kernels: the 8-bit block scales to fp32,
the offset added to them, then the weight. On an H200 they took 30 ms of a 400 ms step on the 8B
shape (bench/profile_step.py), and 0.108–0.143 ms for one of its MLP weights, where this kernel
takes about 0.06 ms, 2.46 TB/s (bench/op_costs.py). :func:`dequantize_nf4` reads the packed weight
and the scales once and writes the weight, with bitsandbytes' arithmetic:

    scale  = code2[absmax_q[block]] * absmax2[block // blocksize2] + offset    (double quantization)
    w[2i]  = nf4[byte_i >> 4] * scale,   w[2i + 1] = nf4[byte_i & 15] * scale

in fp32, without fused multiply-adds (bitsandbytes rounds the product and the sum separately),
then cast to the weight's dtype. The results are bit for bit bitsandbytes'. CUDA only (imported there).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

BLOCK = 4096  #: packed bytes per program (8,192 weights)
WARPS = 8  #: the fastest of 512 to 8,192 bytes by 2 to 16 warps on an H200: 2.46 TB/s (bench/op_costs.py)


@triton.jit
def _nf4(packed, absmax, code2, absmax2, offset, table, out, n_bytes, HALF_BLOCK: tl.constexpr,
         BLOCK2: tl.constexpr, NESTED: tl.constexpr, BLOCK: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n_bytes
    byte = tl.load(packed + offs, mask=mask, other=0).to(tl.int32)
    block = offs // HALF_BLOCK
    if NESTED:
        q = tl.load(absmax + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(code2 + q) * tl.load(absmax2 + block // BLOCK2, mask=mask, other=0.0)
        scale = scale + tl.load(offset)
    else:
        scale = tl.load(absmax + block, mask=mask, other=0.0)
    high = tl.load(table + (byte >> 4)) * scale
    low = tl.load(table + (byte & 15)) * scale
    # (BLOCK, 2): each byte's pair of weights, stored side by side
    values = tl.join(high, low).to(out.dtype.element_ty)
    tl.store(out + 2 * offs[:, None] + tl.arange(0, 2)[None, :], values, mask=mask[:, None])


def supported(weight: torch.Tensor, state) -> bool:
    """Whether :func:`dequantize_nf4` takes this packed weight and its bitsandbytes QuantState."""
    nested = bool(getattr(state, "nested", False))
    numel = math.prod(state.shape)
    return (weight.is_cuda and weight.dtype == torch.uint8 and weight.is_contiguous()
            and state.quant_type == "nf4" and state.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and state.blocksize % 2 == 0 and numel % 2 == 0 and weight.numel() * 2 == numel
            and state.code is not None and state.code.numel() == 16
            and state.code.dtype == torch.float32 and state.code.device == weight.device
            and not getattr(state, "packing_format_for_cpu", False)
            and (not nested or (state.absmax.dtype == torch.uint8 and state.state2.absmax.dtype == torch.float32
                                and state.state2.code.dtype == torch.float32 and torch.is_tensor(state.offset)
                                and state.offset.device == weight.device))
            and (nested or state.absmax.dtype == torch.float32))


def dequantize_nf4(weight: torch.Tensor, state) -> torch.Tensor:
    """The weight ``weight`` (packed NF4 bytes) stands for, shaped and typed as ``state`` says."""
    out = torch.empty(state.shape, dtype=state.dtype, device=weight.device)
    n_bytes = weight.numel()
    nested = bool(state.nested)
    absmax2 = state.state2.absmax if nested else state.absmax
    code2 = state.state2.code if nested else state.code
    offset = state.offset if nested else state.absmax
    grid = (triton.cdiv(n_bytes, BLOCK),)
    _nf4[grid](weight, state.absmax, code2, absmax2, offset, state.code, out, n_bytes,
               HALF_BLOCK=state.blocksize // 2, BLOCK2=state.state2.blocksize if nested else 1, NESTED=nested,
               BLOCK=BLOCK, num_warps=WARPS, enable_fp_fusion=False)
    return out


__all__ = ["dequantize_nf4", "supported"]
