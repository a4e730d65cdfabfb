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
H200, bench/profile_step.py). ``scale`` is folded into B's rows. On a GPU the weight is
dequantized by nf4_kernel.py (bitsandbytes' values, in one pass), elsewhere by bitsandbytes.

Projections that a model calls on one input, a layer's q/k/v and gate/up (:data:`GROUPS`), are
computed together by :class:`LoRA4bitGroupFunction` when no dropout applies: one product for all
their A's, forward and backward, and one input gradient into which every weight's product is
added, instead of one per projection summed afterwards (:class:`_Group`). Layers marked by
:func:`keep_weights` (a split layer's, whose recomputation is followed at once by its backward) keep
their dequantized weight from a forward pass that records gradients to its backward.

A split block's recomputation (offload.split_layer) needs its last projection's inputs, not its
output: the block's output goes only into the block's own backward, which reads its gradient, not
its values. Layers marked by :func:`output_unused_in_recomputation` (o_proj, down_proj) skip their
large product there (:func:`recompute`), after one recomputation has checked that the block
returns their output itself. The gradients are the same; on the 8B shape that is about 0.6 TFLOP a
layer less.
"""

from __future__ import annotations

import contextlib
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


class LoRA4bitFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_d, weight, lora_a, lora_b, scale: float, bias, keep_weight: bool = False,
                skip_product: bool = False):
        """``skip_product``: an output nobody reads (a recomputed block's last projection,
        :func:`recompute`): only what backward needs is computed, the output left unwritten."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xd2 = x_d.reshape(-1, shape[-1])
        dtype = x.dtype
        a = lora_a.to(dtype)
        b = (lora_b * scale).to(dtype)  # the scale goes into B's rows
        xa = xd2 @ a.t()
        if skip_product:
            out = x2.new_empty(x2.shape[0], lora_b.shape[0])  # B: (out features, rank)
            ctx.kept = [_dequantize(weight).to(dtype)] if keep_weight else None
        else:
            out = xa @ b.t()  # the adapter's term first, then the frozen weight's product is added to it in
            w = _dequantize(weight).to(dtype)  # cuBLAS's epilogue, instead of in a pass of its own over `out`
            out.addmm_(x2, w.t())
            ctx.kept = [w] if keep_weight else None  # for backward, instead of dequantizing it again there
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
        w = _weight(ctx.weight, ctx.kept, 0, g.dtype)
        if ctx.same_input:
            grad_x.addmm_(g, w)
        else:
            grad_x = g @ w
        del w
        grad_bias = g.sum(0) if ctx.has_bias else None
        return grad_x.view(ctx.shape), grad_xd, None, grad_a, grad_b, None, grad_bias, None, None


class LoRA4bitGroupFunction(torch.autograd.Function):
    """Several 4-bit + LoRA projections of one input (a layer's q/k/v, or gate/up), without dropout.

    Each output is what :class:`LoRA4bitFunction` gives for its projection. What the projections
    share is done once: the product of the input with their A's stacked (one read of the input,
    forward and backward), and the input's gradient, whose adapter terms are one product and to
    which each frozen weight's product is added in cuBLAS's epilogue (no sum of separate gradients
    afterwards). ``layout`` holds, per projection, its 4-bit weight, scale, rank and whether its
    dequantized weight is kept for backward (keep_weights); ``params`` its A, B and bias (None) in turn.
    """

    @staticmethod
    def forward(ctx, x, layout, *params):
        ctx.set_materialize_grads(False)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        dtype = x.dtype
        a_all = torch.cat(params[0::3]).to(dtype)  # the A's stacked: (sum of ranks, in)
        xa = x2 @ a_all.t()
        outs, bs, kept, start = [], [], [], 0
        for (weight, scale, rank, keep), lora_b, bias in zip(layout, params[1::3], params[2::3]):
            b = (lora_b * scale).to(dtype)
            out = xa[:, start:start + rank] @ b.t()  # the adapter's term, then the weight's product added in
            w = _dequantize(weight).to(dtype)
            out.addmm_(x2, w.t())
            kept.append(w if keep else None)
            del w
            if bias is not None:
                out += bias.to(dtype)
            outs.append(out.view(*shape[:-1], out.shape[-1]))
            bs.append(b)
            start += rank
        ctx.save_for_backward(x2, xa, a_all, *bs)
        ctx.kept = kept
        ctx.layout = layout
        ctx.shape = shape
        ctx.has_bias = [bias is not None for bias in params[2::3]]
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grads):
        x2, xa, a_all, *bs = ctx.saved_tensors
        dtype, tokens = x2.dtype, x2.shape[0]
        gs, gbs, result, start = [], [], [], 0
        for (weight, scale, rank, _), b, grad, has_bias in zip(ctx.layout, bs, grads, ctx.has_bias):
            if grad is None:  # an output that nothing used: its adapter gets no gradient, as alone
                gs.append(None)
                gbs.append(x2.new_zeros(tokens, rank))
                result += [None, None, None]
            else:
                g = grad.reshape(-1, grad.shape[-1]).to(dtype)
                gs.append(g)
                gbs.append(g @ b)  # scale (g B)
                grad_b = _mm_fp32(g.t(), xa[:, start:start + rank]).mul_(scale)
                result += [slice(start, start + rank), grad_b, g.sum(0) if has_bias else None]
            start += rank
        gb = torch.cat(gbs, dim=1)
        grad_a = _mm_fp32(gb.t(), x2)  # every A's gradient in one product, row blocks of it
        result[0::3] = [grad_a[rows] if rows is not None else None for rows in result[0::3]]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = gb @ a_all  # the adapters' terms, then each weight's product added in
            for i, ((weight, _, _, _), g) in enumerate(zip(ctx.layout, gs)):
                if g is not None:
                    w = _weight(weight, ctx.kept, i, dtype)
                    grad_x.addmm_(g, w)
                    del w
            grad_x = grad_x.view(ctx.shape)
        ctx.kept = None
        return (grad_x, None, *result)


def _active_adapter(module, training: bool) -> tuple[str | None, bool]:
    """(the one plain LoRA adapter the fused function computes for ``module``, or None; whether it
    drops out part of its input)."""
    adapter = module.active_adapters[0] if len(module.active_adapters) == 1 else None
    if (module.disable_adapters or module.merged or adapter is None or adapter not in module.lora_A
            or adapter in getattr(module, "lora_variant", {})
            # bitsandbytes repacks weights for its CPU inference kernel; only its own path reads that layout.
            or getattr(module.base_layer.weight.quant_state, "packing_format_for_cpu", False)):
        return None, False
    dropout = module.lora_dropout[adapter]
    return adapter, isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and training


def _fused_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """Replaces a PEFT ``lora.bnb.Linear4bit`` forward when one plain LoRA adapter is active."""
    if kwargs.get("adapter_names") is not None:
        return self._peft_forward(x, *args, **kwargs)
    group = self.__dict__.get("_lora_group")
    if group is not None:
        out = group.output(self, x)
        if out is not None:
            return out
    adapter, drops = _active_adapter(self, self.training)
    if adapter is None:
        return self._peft_forward(x, *args, **kwargs)
    x_d = self.lora_dropout[adapter](x) if drops else x
    base = self.base_layer
    recomputing = _recomputing[-1] if _recomputing and "_output_unused" in self.__dict__ else None
    skip = recomputing is not None and recomputing.skips(self)
    out = LoRA4bitFunction.apply(x, x_d, base.weight, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                 float(self.scaling[adapter]), base.bias, _keeps_weight(self, x), skip)
    if recomputing is not None:
        recomputing.note(self, out, skip)
    return out


def keep_weights(modules) -> int:
    """Have these fused layers keep their dequantized weight from a forward pass that records
    gradients to its backward, instead of dequantizing it again there; returns how many.

    For a checkpointed block's recomputation, which is followed at once by the block's backward
    (offload.split_layer): its last projection's weight is then needed first, and kept costs no
    memory beyond what the backward's own dequantization takes at that point; the attention
    block's q/k/v weights (48 MB for an 8B layer) are kept through the attention's backward. A
    first forward pass under checkpointing records no gradients and keeps nothing.
    """
    fused = [m for m in modules if _is_fused(m)]
    for m in fused:
        m.__dict__["_keep_weight"] = True
    return len(fused)


#: a marked layer skips its large product in a block's recomputation (output_unused_in_recomputation)
SKIP_UNUSED_PRODUCTS = True
_recomputing: list["Recomputation"] = []


def output_unused_in_recomputation(modules) -> int:
    """Mark fused layers whose output is, it is claimed, their block's output; returns how many.

    In a :func:`recompute` a marked layer's output is then not computed (its large product and
    bias are skipped). The claim is checked first: until one recomputation has called the layer and
    the block returned that very tensor (:meth:`Recomputation.check`), the layer computes as usual;
    a block that returns anything else (a dropout or a scale after the projection) turns the mark off.
    """
    fused = [m for m in modules if m is not None and _is_fused(m)]
    for m in fused:
        m.__dict__.setdefault("_output_unused", None)  # None: not checked yet; then True or False
    return len(fused)


class Recomputation:
    """The marked layers called in one recomputation of a block, with their outputs."""

    def __init__(self):
        self.calls: list[tuple[torch.nn.Module, torch.Tensor, int, bool]] = []

    def skips(self, module: torch.nn.Module) -> bool:
        return SKIP_UNUSED_PRODUCTS and torch.is_grad_enabled() and module.__dict__.get("_output_unused") is True

    def note(self, module: torch.nn.Module, out: torch.Tensor, skipped: bool) -> None:
        if skipped or module.__dict__.get("_output_unused") is None:
            self.calls.append((module, out, out._version, skipped))

    def check(self, out) -> None:
        """The block returned ``out``: settle the claims it checked; a skipped output that the block
        did not return itself, unchanged (a model whose structure changed between passes), is an
        error, since what was computed from it is not the block's arithmetic."""
        calls, self.calls = self.calls, []
        for module, output, version, skipped in calls:
            returned = output is out and output._version == version  # not changed in place either
            if skipped and not returned:
                module.__dict__["_output_unused"] = False
                raise RuntimeError(f"{type(module).__name__}: an output skipped in recomputation was read by the "
                                   "block; the layer computes it from now on, run the step again")
            if not skipped:
                module.__dict__["_output_unused"] = returned
                if not returned:
                    log.info("a recomputed block reads its last projection's output; it is computed in recomputation")


@contextlib.contextmanager
def recomputation():
    """A checkpointed block recomputed for its backward, whose output goes only into that backward.

    Yields the :class:`Recomputation`; the caller passes the block's output to its ``check``."""
    record = Recomputation()
    _recomputing.append(record)
    try:
        yield record
    finally:
        _recomputing.pop()


def recompute(run, *args):
    """``run(*args)`` with gradients, as a checkpointed block recomputed for its backward: its output
    goes only into that backward, so marked layers may skip theirs; the claims are checked on it."""
    with torch.enable_grad(), recomputation() as record:
        out = run(*args)
    record.check(out)
    return out


def _keeps_weight(module, x: torch.Tensor) -> bool:
    """Whether ``module`` keeps its weight for this pass's backward: only that of an input that
    needs a gradient uses it."""
    return module.__dict__.get("_keep_weight", False) and torch.is_grad_enabled() and x.requires_grad


def _weight(weight, kept: list | None, index: int, dtype: torch.dtype) -> torch.Tensor:
    """The dequantized weight for backward: the one forward kept (handed over once), else dequantized again."""
    if kept is not None and kept[index] is not None:
        w, kept[index] = kept[index], None
        return w
    return _dequantize(weight).to(dtype)


#: sibling projections that read one input in the models transformers has (Llama, Mistral, Qwen, Gemma, ...)
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
#: a group whose outputs were computed this many times for an input its other members were not called
#: with goes back to one projection at a time
GROUP_MISSES = 3


class _Group:
    """Fused LoRA layers that a model calls one after another on the same input tensor.

    The first member called computes every member's output (:class:`LoRA4bitGroupFunction`) and
    the others take theirs when they are called with that same tensor, unchanged. A member called
    with another input drops what was left over; after :data:`GROUP_MISSES` such calls the group is
    turned off and each member computes its own output again.
    """

    def __init__(self, name: str, members: list[torch.nn.Module]):
        self.name = name
        self.members = members
        self.left: dict[int, torch.Tensor] = {}  # outputs not taken yet, by member index
        self.input: tuple[torch.Tensor, int] | None = None  # the input they were computed from, its version
        self.misses = 0
        self.off = False

    def output(self, member: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        """``member``'s output for ``x`` from the group's function, or None: compute it alone."""
        index = self.members.index(member)
        if self.left:
            if self.input[0] is x and self.input[1] == x._version and index in self.left:
                out = self.left.pop(index)
                if not self.left:
                    self.input = None
                return out
            self.left, self.input = {}, None
            self.misses += 1
            if self.misses >= GROUP_MISSES:
                self.off = True
                log.info("%s: the model does not call these projections on one input; each computes its own", self.name)
        if self.off or not torch.is_tensor(x):
            return None
        adapters = {_active_adapter(m, m.training) for m in self.members}
        if len(adapters) != 1:
            return None
        name, drops = adapters.pop()
        if name is None or drops:  # no plain adapter, or dropout (its own mask per projection): one at a time
            return None
        layout, params = [], []
        for m in self.members:
            a = m.lora_A[name].weight
            layout.append((m.base_layer.weight, float(m.scaling[name]), a.shape[0], _keeps_weight(m, x)))
            params += [a, m.lora_B[name].weight, m.base_layer.bias]
        outs = LoRA4bitGroupFunction.apply(x, tuple(layout), *params)
        self.left = {i: out for i, out in enumerate(outs) if i != index}
        self.input = (x, x._version)
        return outs[index]


def fused_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The PEFT 4-bit LoRA layers in ``module`` that fuse_lora_layers routed through the fused function."""
    return [m for m in module.modules() if _is_fused(m)]


def _is_fused(module) -> bool:
    return hasattr(module, "_peft_forward")  # fuse_lora_layers keeps PEFT's own forward there


def fuse_lora_layers(model, group: bool = True) -> int:
    """Route every PEFT 4-bit LoRA layer of ``model`` through :class:`LoRA4bitFunction`, and, with
    ``group``, the siblings of :data:`GROUPS` through :class:`LoRA4bitGroupFunction`; returns the count."""
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLinear4bit) and not _is_fused(module):
            module._peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    if group:
        for parent_name, parent in model.named_modules():
            for names in GROUPS:
                members = [getattr(parent, n, None) for n in names]
                members = [m for m in members if m is not None and _is_fused(m)
                           and "_lora_group" not in m.__dict__]
                if len(members) > 1:
                    shared = _Group(f"{parent_name}.{'/'.join(names)}", members)
                    for m in members:
                        m.__dict__["_lora_group"] = shared
    return count


def lora_groups(module: torch.nn.Module) -> list[_Group]:
    """The groups of fused LoRA layers in ``module`` (fuse_lora_layers)."""
    seen: dict[int, _Group] = {}
    for m in module.modules():
        group = m.__dict__.get("_lora_group")
        if group is not None:
            seen.setdefault(id(group), group)
    return list(seen.values())


__all__ = ["GROUPS", "LoRA4bitFunction", "LoRA4bitGroupFunction", "Recomputation", "fuse_lora_layers", "fused_layers",
           "keep_weights", "lora_groups", "output_unused_in_recomputation", "recompute", "recomputation"]
