"""A Triton kernel for one chunk of losses.FrozenHeadCrossEntropy: loss and gradient over the logits, in place.

The PyTorch path of the chunked loss casts a chunk's logits to fp32 and walks them several times
(max, exponentials, sum, division, the cast of the probabilities back): 6 bytes of memory per
logit at its widest, and about 30 bytes of memory traffic. :func:`cross_entropy_rows` reads the
compute-dtype logits in fp32 registers instead, row by row, with the same formula:

    peak = max(l),  norm = sum(exp(l - peak)),  loss = log(norm) + peak - l[target]
    grad = exp(l - peak) / norm - onehot(target)

and writes the gradient over the logits in their own dtype, as the PyTorch path's cast does. Only
the chunk's logits exist: a third of the memory, and a fifth of the traffic. The sums are in a
different order than torch's, so results agree to fp32 rounding. CUDA only (imported there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096  #: columns a program loads at once
WARPS = 16


@triton.jit
def _rows(logits, stride, targets, losses, n_cols, BLOCK: tl.constexpr, GRAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * stride
    cols = tl.arange(0, BLOCK)
    peak = tl.full([BLOCK], float("-inf"), tl.float32)
    for start in range(0, n_cols, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
        peak = tl.maximum(peak, x)
    top = tl.max(peak, 0)
    sums = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n_cols, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < n_cols, other=float("-inf")).to(tl.float32)
        sums += tl.exp(x - top)
    norm = tl.sum(sums, 0)
    target = tl.load(targets + row).to(tl.int64)
    picked = tl.load(base + target).to(tl.float32)
    tl.store(losses + row, tl.log(norm) + top - picked)
    if GRAD:
        for start in range(0, n_cols, BLOCK):
            mask = start + cols < n_cols
            x = tl.load(base + start + cols, mask=mask, other=0.0).to(tl.float32)
            p = tl.exp(x - top) / norm
            p = tl.where(start + cols == target, p - 1.0, p)
            tl.store(base + start + cols, p.to(logits.dtype.element_ty), mask=mask)


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, grad: bool) -> torch.Tensor:
    """Each row's cross-entropy (fp32); with ``grad``, ``logits`` is overwritten with d(loss)/d(logits).

    ``logits``: (rows, vocab) with contiguous rows, on a CUDA device; ``targets``: (rows,) class indices.
    """
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError("logits must be a 2-D tensor with contiguous rows")
    rows, cols = logits.shape
    losses = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _rows[(rows,)](logits, logits.stride(0), targets, losses, cols, BLOCK=BLOCK, GRAD=grad, num_warps=WARPS)
    return losses


__all__ = ["cross_entropy_rows"]
