"""Cross-entropy through a frozen output head without materialising the full-vocabulary logits.

For a 128k vocabulary, 2 × 2048 tokens of fp32 logits are 2.1 GB, and their gradient as much
again. :class:`FrozenHeadCrossEntropy` walks the tokens a chunk at a time: it computes a chunk's
logits, its loss and, at once, the gradient with respect to the hidden states (softmax minus the
one-hot target, times the head's weight), then drops the logits. Backward only scales the stored
gradient, so nothing is recomputed. The output head is frozen in QLoRA, so no gradient for its
weight is needed. The sum is the same as ``F.cross_entropy(..., reduction="sum")`` on the full
logits, up to floating-point rounding.

On a GPU with Triton, a chunk's loss and gradient come from one kernel that works over the
compute-dtype logits in place (ce_kernel.py): no fp32 copy of the chunk, the same formula.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from .device import kernel_failed, triton_runs

log = logging.getLogger(__name__)

CHUNK_TOKENS = 1024


class FrozenHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
                scratch=None) -> torch.Tensor:
        total = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        rows = _kernel(hidden)
        with scratch() if scratch is not None else contextlib.nullcontext():
            _chunks(hidden, weight, targets, chunk, rows, total, grad_hidden)
        ctx.save_for_backward(grad_hidden if grad_hidden is not None else hidden.new_empty(0))
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), None, None, None, None


def _chunks(hidden, weight, targets, chunk: int, rows, total: torch.Tensor, grad_hidden: torch.Tensor | None) -> None:
    """Add each chunk's summed loss to ``total`` and write its gradient into ``grad_hidden``."""
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start : start + chunk]
        y = targets[start : start + chunk]
        if rows is not None:
            logits = h @ weight.t()
            try:
                chunk_rows = rows(logits, y, grad_hidden is not None)
            except Exception as exc:  # noqa: BLE001 - a Triton that cannot build the kernel here (it fails before running)
                _kernel_failed(exc)
                rows = None
            else:
                total += chunk_rows.sum()
                if grad_hidden is not None:  # the kernel wrote d(loss)/d(logits) over the logits
                    torch.mm(logits, weight, out=grad_hidden[start : start + chunk])
                del logits, chunk_rows
                continue
            del logits
        logits = (h @ weight.t()).float()
        # log-sum-exp as max + log(sum(exp(logits - max))), with the exponentials written over
        # the logits: one chunk-sized fp32 buffer, no temporary beside it.
        target = logits.gather(1, y[:, None]).squeeze(1)
        peak = logits.amax(dim=-1, keepdim=True)
        exp = logits.sub_(peak).exp_()
        norm = exp.sum(dim=-1, keepdim=True)
        total += (norm.log().add_(peak).squeeze(1) - target).sum()
        if grad_hidden is not None:
            # d(loss)/d(logits) = softmax - onehot, in place over the exponentials.
            probs = exp.div_(norm)
            probs[torch.arange(y.shape[0], device=y.device), y] -= 1.0
            grad_hidden[start : start + chunk] = probs.to(hidden.dtype) @ weight
            del probs
        del logits, exp  # one chunk's logits alive at a time


_KERNEL_OFF: list[str] = []  # why the kernel failed, once it has: the PyTorch operations from then on


def _kernel_failed(exc: BaseException) -> None:
    kernel_failed(_KERNEL_OFF, exc, log, "the chunked loss's Triton kernel failed (%s); the loss runs as PyTorch "
                  "operations from now on (the same results, a little more memory)")


def _kernel(hidden: torch.Tensor):
    """ce_kernel.cross_entropy_rows where it runs (a CUDA tensor, Triton on a Turing or newer GPU,
    and it has not failed before), else None."""
    if _KERNEL_OFF or not triton_runs(hidden.device):
        return None
    try:
        from .ce_kernel import cross_entropy_rows
    except ImportError:
        return None
    return cross_entropy_rows


def frozen_head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk: int = CHUNK_TOKENS, scratch=None) -> torch.Tensor:
    """Summed cross-entropy of ``hidden @ weight.T`` against ``targets`` (no ignored entries).

    ``scratch``: a context-manager factory under which the chunks' temporaries are allocated (the
    CUDA graphs' pool, layer_graphs.GraphContext.scratch); the result and the stored gradient are not.
    """
    if weight.requires_grad:
        raise ValueError("the output head must be frozen for this loss")
    return FrozenHeadCrossEntropy.apply(hidden, weight, targets, chunk, scratch)
