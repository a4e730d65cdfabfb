"""Activation checkpointing whose saved layer inputs wait in CPU memory.

With gradient checkpointing a decoder layer keeps only its input for the backward pass and runs
its forward again there. Those inputs still add up: 2 × 2048 tokens × 4096 × 2 bytes is 32 MiB a
layer, 1 GiB for the 32 layers of an 8B model. :func:`offloaded_checkpoint` copies each input to
pinned CPU memory on a side stream while the next layers run, and lets the GPU copy go; backward
brings it back (the previous layer's input is fetched while this one recomputes), recomputes the
layer with the same random state and backpropagates through it. The arithmetic is the checkpointed
layer's own: only where its input waits changes.

:func:`use_offloaded_checkpointing` installs it as the decoder layers' checkpoint function
(``_gradient_checkpointing_func``, which transformers calls as ``fn(forward, *args)`` with the
hidden states first), or, for a Llama-style layer, around its two blocks (:func:`split_layer`):
norm and attention, norm and MLP, each recomputed on its own. With ``cuda_graphs`` each pass is
replayed as a CUDA graph (layer_graphs.py). It needs CUDA; on the CPU the ordinary checkpoint stays.
"""

from __future__ import annotations

import collections
import weakref

import torch

from .lora_kernels import keep_weights, output_unused_in_recomputation, recompute

_streams: dict[int, torch.cuda.Stream] = {}
#: the MLP block of a split layer runs on at most this many tokens at a time (token_tiles) ...
MLP_TILE_TOKENS = 2048
#: ... where a micro-batch's MLP intermediate would take more than this share of the model's GPU memory
MLP_TILE_SHARE = 1 / 20
#: how many checkpointed passes (layers, or blocks of split layers) the host may queue ahead of the GPU
LAYERS_AHEAD = 3
#: a split layer's blocks hand their forward output over in their graph's buffer (no copy): it only
#: goes into the residual add that follows (LayerGraphs.transient_output)
TRANSIENT_BLOCK_OUTPUTS = True
_queued: collections.deque[torch.cuda.Event] = collections.deque()


def _keep_pace(done: torch.cuda.Event) -> None:
    """Wait until the GPU is at most :data:`LAYERS_AHEAD` passes behind (``done``: this pass's end).

    A host far ahead of the GPU (the passes replayed as CUDA graphs) keeps every queued pass's
    memory in use: the inputs waiting for their copy to CPU memory in forward, those fetched back
    in backward. The GPU stays busy with the passes still queued.
    """
    _queued.append(done)
    while len(_queued) > LAYERS_AHEAD:
        _queued.popleft().synchronize()


def settle() -> None:
    """Wait for the passes still queued (their inputs' copies to CPU memory included).

    Their inputs are then free before what comes next allocates: a hook calls this before the
    decoder's final norm (:func:`use_offloaded_checkpointing`), and the trainer before the loss for
    decoders without one, whose temporaries would otherwise come on top of up to
    :data:`LAYERS_AHEAD` inputs still waiting for their copy. The GPU is only briefly idle: the
    host queues the next kernels right after.
    """
    while _queued:
        _queued.popleft().synchronize()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _streams:
        _streams[index] = torch.cuda.Stream(device=index)
    return _streams[index]


class _Saved:
    """One layer's input: in pinned CPU memory after the forward pass, back on the GPU for backward."""

    last: weakref.ref | None = None  # the most recent one, so the next layer's can link to it

    def __init__(self, hidden: torch.Tensor):
        self.device = hidden.device
        self.requires_grad = hidden.requires_grad
        stream = _side_stream(hidden.device)
        self.host: torch.Tensor | None = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)
        stream.wait_stream(torch.cuda.current_stream(hidden.device))
        with torch.cuda.stream(stream):
            self.host.copy_(hidden, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(stream)
        hidden.record_stream(stream)  # the allocator keeps its memory until the copy is done
        _keep_pace(copied)
        self.back: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        # The layer before this one: its backward comes next. A weak reference, so that a forward
        # pass whose backward never runs (an out-of-memory error) frees its inputs with its graph.
        self.previous = _Saved.last
        _Saved.last = weakref.ref(self)

    def fetch(self) -> None:
        """Start the copy back to the GPU on the side stream (once)."""
        if self.back is not None or self.host is None:
            return
        stream = _side_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.back = self.host.to(self.device, non_blocking=True)
            self.ready = torch.cuda.Event()
            self.ready.record(stream)

    def take(self) -> torch.Tensor:
        self.fetch()
        current = torch.cuda.current_stream(self.device)
        current.wait_event(self.ready)
        back, self.back, self.host = self.back, None, None
        back.record_stream(current)
        return back

    def fetch_previous(self) -> None:
        previous = self.previous() if self.previous is not None else None
        self.previous = None
        if previous is not None:
            previous.fetch()


def token_tiles(hidden: torch.Tensor, tile: int | None) -> list[slice] | None:
    """Ranges of at most ``tile`` of ``hidden``'s tokens (its rows once all but the last dimension
    are flattened), of equal size but the last; None when one range holds them all."""
    tokens = hidden.numel() // hidden.shape[-1]
    if not tile or tokens <= tile:
        return None
    size = -(-tokens // -(-tokens // tile))
    return [slice(start, min(start + size, tokens)) for start in range(0, tokens, size)]


def tiled_forward(run, hidden: torch.Tensor, tiles: list[slice]) -> torch.Tensor:
    """``run`` on each range of ``hidden``'s tokens (token_tiles), into one output shaped like ``hidden``."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = torch.empty_like(flat)
    for part in tiles:
        out[part] = run(flat[part])
    return out.view(hidden.shape)


def _tiled_backward(run, hidden: torch.Tensor, grad: torch.Tensor, tiles: list[slice]) -> torch.Tensor | None:
    """Recompute and backpropagate one range of tokens after another; the input's gradient."""
    flat, grad = hidden.detach().reshape(-1, hidden.shape[-1]), grad.reshape(-1, hidden.shape[-1])
    grad_in = torch.empty_like(flat) if hidden.requires_grad else None
    for part in tiles:
        h = flat[part].detach().requires_grad_(hidden.requires_grad)
        out = recompute(run, h)
        if out.requires_grad:
            torch.autograd.backward(out, grad[part])
        if grad_in is not None:
            grad_in[part] = h.grad if h.grad is not None else 0
    return grad_in.view(hidden.shape) if grad_in is not None else None


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run, graphs, tile, hidden, anchor, *rest):
        ctx.run, ctx.rest, ctx.graphs = run, rest, graphs
        ctx.tiles = token_tiles(hidden, tile) if not rest else None
        ctx.rng_cpu = torch.get_rng_state()
        ctx.rng_cuda = torch.cuda.get_rng_state(hidden.device)
        ctx.saved = _Saved(hidden)
        if graphs is not None:
            out = graphs.forward(run, hidden, rest, ctx.rng_cuda, ctx.tiles)
            if out is not None:
                return out
        with torch.no_grad():
            return run(hidden, *rest) if ctx.tiles is None else tiled_forward(run, hidden, ctx.tiles)

    @staticmethod
    def backward(ctx, *grads):
        saved: _Saved = ctx.saved
        hidden = saved.take().detach().requires_grad_(saved.requires_grad)
        saved.fetch_previous()  # copies while this layer recomputes
        graphs, tiles, done, grad_in = ctx.graphs, ctx.tiles, False, None
        with torch.random.fork_rng(devices=[hidden.device]):
            torch.set_rng_state(ctx.rng_cpu)
            torch.cuda.set_rng_state(ctx.rng_cuda, hidden.device)
            if graphs is not None and len(grads) == 1 and grads[0] is not None:
                done, grad_in = graphs.backward(ctx.run, hidden, ctx.rest, grads[0], ctx.rng_cuda, tiles)
            if not done and tiles is not None and grads[0] is not None:
                done, grad_in = True, _tiled_backward(ctx.run, hidden, grads[0], tiles)
            if not done:
                out = recompute(ctx.run, hidden, *ctx.rest)
        if not done:
            outs = out if isinstance(out, tuple) else (out,)
            pairs = [(o, g) for o, g in zip(outs, grads)
                     if isinstance(o, torch.Tensor) and o.requires_grad and g is not None]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            grad_in = hidden.grad if saved.requires_grad else None
        done_event = torch.cuda.Event()
        done_event.record(torch.cuda.current_stream(hidden.device))
        _keep_pace(done_event)
        n_rest = len(ctx.rest)
        ctx.run = ctx.rest = ctx.saved = ctx.graphs = ctx.tiles = None
        return (None, None, None, grad_in, None) + (None,) * n_rest


_anchors: dict[torch.device, torch.Tensor] = {}


def offloaded_checkpoint(function, hidden: torch.Tensor, *rest, graphs=None, tile: int | None = None):
    """``function(hidden, *rest)``, keeping only ``hidden`` for backward, and that in CPU memory.

    ``anchor`` is an empty tensor that requires grad, so the result requires grad (and the layer's
    adapters get their gradients) even when ``hidden`` does not, as for the first layer's input.
    ``graphs``: the layer's :class:`~.layer_graphs.LayerGraphs`, which replay its passes as CUDA graphs.
    ``tile``: for a ``function`` of the hidden states alone that works token by token (a norm and an
    MLP), run it on at most this many tokens at a time, forward and backward: each range is
    recomputed and differentiated before the next, so only one range's intermediates exist at once.
    Every token's output is computed as before; the adapters' gradients are sums over the ranges.
    """
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in rest):
        # Only the hidden states get a gradient here; anything else that needs one takes the usual path.
        from torch.utils.checkpoint import checkpoint

        return checkpoint(function, hidden, *rest, use_reentrant=False)
    anchor = _anchors.get(hidden.device)
    if anchor is None:
        anchor = _anchors[hidden.device] = torch.empty(0, device=hidden.device, requires_grad=True)
    return _OffloadedCheckpoint.apply(function, graphs, tile, hidden, anchor, *rest)


def mlp_tile(model, max_tokens: int | None) -> int | None:
    """The tokens per range for split layers' MLP blocks (:func:`split_layer`), or None for no ranges.

    Ranges cost time: each one more dequantizes the MLP's 4-bit weights once more, forward,
    recomputed and backward (about 6% of a step of the 8B shape in two ranges, bench/perf_harness.py
    row engine-mlp-whole). They are used where they save a sizeable share of the memory: when one
    MLP intermediate of the largest micro-batch (``max_tokens`` × intermediate size, compute dtype)
    is more than :data:`MLP_TILE_SHARE` of the model's parameters on the GPU. On the 1B benchmark
    shape (4 × 1,024 tokens) that is 67 MB against 1.07 GB, and the ranges keep its step within
    1.7 GB; on the 8B shape (2 × 2,048) 117 MB against 4.8 GB, and the step stays whole and faster.
    """
    width = getattr(getattr(model, "config", None), "intermediate_size", None)
    if not max_tokens or not isinstance(width, int) or max_tokens <= MLP_TILE_TOKENS:
        return None
    resident = sum(p.numel() * p.element_size() for p in model.parameters() if p.is_cuda)
    embedding = getattr(model.get_input_embeddings(), "weight", None)  # kept in the compute dtype
    dtype_bytes = embedding.element_size() if embedding is not None else 2
    return MLP_TILE_TOKENS if max_tokens * width * dtype_bytes > MLP_TILE_SHARE * resident else None


def _settle_before(module: torch.nn.Module) -> None:
    """Call :func:`settle` before ``module`` runs while training (the final norm: its fp32
    temporaries then do not come on top of the last layers' inputs)."""
    def hook(mod, args):
        if mod.training and torch.is_grad_enabled():
            settle()

    module.register_forward_pre_hook(hook)


def use_offloaded_checkpointing(model, cuda_graphs: bool = False, max_tokens: int | None = None):
    """Make every checkpointed layer of ``model`` offload its input; returns how many layers and,
    with ``cuda_graphs``, the :class:`~.layer_graphs.GraphContext` the layers' graphs share (else None).

    A Llama-style layer is checkpointed as its two residual blocks (:func:`split_layer`), its MLP
    block in ranges of tokens where :func:`mlp_tile` says so; any other layer whole.
    ``max_tokens``: the largest micro-batch's tokens, for the graphs' buffers."""
    from functools import partial

    from .layer_graphs import GraphContext, LayerGraphs

    context = None
    tile = mlp_tile(model, max_tokens)

    def graphs_for(module):
        nonlocal context
        if not cuda_graphs:
            return None
        if context is None:
            # The layers' device (the input embedding may sit in CPU memory: embeddings_on_cpu).
            context = GraphContext(next(p.device for p in model.parameters() if p.is_cuda), max_tokens)
        return LayerGraphs(context, module)

    count = 0
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and hasattr(module, "_gradient_checkpointing_func"):
            if split_layer(module, graphs_for, tile):
                module._gradient_checkpointing_func = _direct
            else:
                module._gradient_checkpointing_func = partial(offloaded_checkpoint, graphs=graphs_for(module))
            count += 1
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else None
    if count and isinstance(getattr(decoder, "norm", None), torch.nn.Module):
        _settle_before(decoder.norm)
    return count, context


def _direct(function, *args):
    return function(*args)


#: the children of a Llama-style decoder layer: h + attn(norm1(h)), then h + mlp(norm2(h))
BLOCKS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")


def split_layer(layer: torch.nn.Module, graphs_for=lambda module: None, tile: int | None = None) -> bool:
    """Checkpoint a Llama-style decoder layer as two blocks, norm and attention, norm and MLP.

    Both residual adds stay outside, in the layer's own forward. Backward then recomputes and
    differentiates one block at a time, so only one block's activations exist at once (for the MLP
    block of an 8B model about half of the layer's), for one more input in CPU memory per layer.
    With ``tile``, the MLP block, which works token by token, runs on at most that many tokens at a
    time (``offloaded_checkpoint(tile=...)``, :func:`mlp_tile`): its intermediates, several times
    the hidden size wide, exist for one range of tokens at once. Each token's values are those of
    the whole layer's recomputation; the adapters' gradients are summed over the ranges.
    The recomputation skips the blocks' last projections' products (o_proj, down_proj): a block's
    output goes only into the block's own backward, which never reads its values
    (lora_kernels.recompute, checked per layer before the first skip).

    It works on the layer's children in place, so the model's structure and weights' names stay:
    while training with gradients, each norm passes its input through and the block after it
    applies the norm inside its checkpoint; otherwise (evaluation, generation) everything runs as
    before. Returns False, changing nothing, for a layer with other children (Gemma's four norms).
    """
    from functools import partial

    if {name for name, _ in layer.named_children()} != set(BLOCKS):
        return False
    norm1, attn, norm2, mlp = (getattr(layer, name) for name in BLOCKS)
    norm1_forward, attn_forward, norm2_forward, mlp_forward = norm1.forward, attn.forward, norm2.forward, mlp.forward
    attn_graphs, mlp_graphs = graphs_for(attn), graphs_for(mlp)
    for graphs in (attn_graphs, mlp_graphs):
        if graphs is not None:
            graphs.transient_output = TRANSIENT_BLOCK_OUTPUTS

    def checkpointing() -> bool:
        return layer.training and torch.is_grad_enabled()

    returns_tuple = [True]  # the attention's output: (output, weights) in transformers' models

    def attention_block(hidden, *extra, by_name: bool, **kwargs):
        normed = norm1_forward(hidden)
        out = attn_forward(hidden_states=normed, **kwargs) if by_name else attn_forward(normed, *extra, **kwargs)
        returns_tuple[0] = isinstance(out, tuple)
        return out[0] if returns_tuple[0] else out

    def mlp_block(hidden):
        return mlp_forward(norm2_forward(hidden))

    def passing(norm_forward):
        return lambda hidden: hidden if checkpointing() else norm_forward(hidden)

    def attn_checkpointed(*args, **kwargs):
        if not checkpointing():
            return attn_forward(*args, **kwargs)
        by_name = "hidden_states" in kwargs
        hidden, extra = (kwargs.pop("hidden_states"), args) if by_name else (args[0], args[1:])
        run = partial(attention_block, by_name=by_name, **kwargs)
        out = offloaded_checkpoint(run, hidden, *extra, graphs=attn_graphs)
        return (out, None) if returns_tuple[0] else out

    def mlp_checkpointed(hidden):
        if not checkpointing():
            return mlp_forward(hidden)
        return offloaded_checkpoint(mlp_block, hidden, graphs=mlp_graphs, tile=tile)

    norm1.forward, norm2.forward = passing(norm1_forward), passing(norm2_forward)
    attn.forward, mlp.forward = attn_checkpointed, mlp_checkpointed
    # Backward recomputes a block and differentiates it at once: the attention block's projections
    # and the MLP's last one keep their dequantized weight from the one to the other.
    keep_weights([*attn.modules(), getattr(mlp, "down_proj", None)])
    # The blocks' last projections: their outputs are the blocks' outputs, which a recomputation
    # passes only to the block's backward; it skips their products (checked first, lora_kernels).
    output_unused_in_recomputation([getattr(attn, "o_proj", None), getattr(mlp, "down_proj", None)])
    return True


#: the GPU gathers the embedding's rows from pinned CPU memory itself (mapped_on_gpu), instead of
#: the CPU gathering them and copying them over
GATHER_ON_GPU = True


class _Mapped:
    """``__cuda_array_interface__`` over pinned host memory, as 16-bit integers (the interface has
    no bfloat16); it holds the host tensor, so the memory lives as long as the CUDA tensor over it."""

    def __init__(self, host: torch.Tensor):
        self.host = host
        self.__cuda_array_interface__ = {"shape": (host.numel(),), "typestr": "<i2", "data": (host.data_ptr(), False),
                                         "version": 3, "strides": None}


def mapped_on_gpu(host: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """A CUDA tensor over the pinned CPU tensor ``host`` (2-byte elements): GPU kernels read it
    across the bus, without a copy. None where this CUDA or PyTorch cannot address it so."""
    if not host.is_pinned() or host.element_size() != 2 or not host.is_contiguous():
        return None
    try:
        view = torch.as_tensor(_Mapped(host), device=device)
    except (RuntimeError, TypeError, ValueError):
        return None
    if view.device != device or view.data_ptr() != host.data_ptr():
        return None
    return view.view(host.dtype).view(host.shape)


def embeddings_on_cpu(model) -> bool:
    """Keep a frozen, untied input embedding in pinned CPU memory; look rows up there.

    A 128k × 4096 bf16 embedding is 1 GiB of GPU memory that a step reads only a few thousand rows
    of. Where the GPU can address pinned CPU memory (:func:`mapped_on_gpu`, with
    :data:`GATHER_ON_GPU`) it gathers the rows itself across the bus, without waiting for the host;
    elsewhere the token ids come to the CPU, the rows are gathered into pinned memory and copied to
    the GPU. Untied only: a tied embedding is also the output head, which the GPU needs whole.
    Returns whether it was moved.
    """
    embedding = model.get_input_embeddings()
    head = model.get_output_embeddings()
    weight = getattr(embedding, "weight", None)
    # A plain nn.Embedding only: subclasses (Gemma's scaled embedding) do more in their forward.
    if (type(embedding) is not torch.nn.Embedding or weight is None or weight.requires_grad
            or weight.device.type != "cuda" or (head is not None and head.weight is weight)
            or embedding.max_norm is not None):
        return False
    device = weight.device
    weight.data = weight.data.to("cpu").pin_memory()
    mapped = mapped_on_gpu(weight.data, device) if GATHER_ON_GPU else None

    def forward(ids: torch.Tensor) -> torch.Tensor:
        if mapped is not None and ids.device == device:
            return torch.nn.functional.embedding(ids, mapped)
        flat = ids.reshape(-1).to("cpu")
        rows = torch.empty((flat.shape[0], weight.shape[1]), dtype=weight.dtype, pin_memory=True)
        torch.index_select(weight, 0, flat, out=rows)
        return rows.to(device, non_blocking=True).view(*ids.shape, weight.shape[1])

    embedding.forward = forward
    return True


__all__ = ["embeddings_on_cpu", "offloaded_checkpoint", "settle", "token_tiles", "use_offloaded_checkpointing"]
