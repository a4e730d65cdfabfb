"""A few AdamW steps on given tensors with given gradients, for comparing optimizer implementations."""

from __future__ import annotations

import torch


def run_adamw(opt_cls, start: list[torch.Tensor], grads: list[list[torch.Tensor]], **kwargs):
    """``opt_cls`` over copies of ``start`` (lr 1e-2, weight decay 0.01), one step per gradient list."""
    params = [torch.nn.Parameter(t.clone()) for t in start]
    opt = opt_cls(params, lr=1e-2, weight_decay=0.01, **kwargs)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return params, opt
