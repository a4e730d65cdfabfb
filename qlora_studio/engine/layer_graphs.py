"""CUDA graphs for the checkpointed decoder layers: the layer's own kernels, queued without Python.

"Layer" here is whatever offload.py checkpoints: a decoder layer, or one of a split layer's blocks.

A decoder layer's pass is a few hundred kernel launches: seven LoRA projections (a 4-bit
dequantization and three matrix products each), norms, RoPE, attention, SwiGLU, and in backward
their gradients. On an H200 the host needs longer to queue them than the GPU needs to run them:
bench/profile_step.py measured the host busy for the whole of forward and backward (1B and 8B
shapes) while the GPU idled half of a 1B step.

:class:`LayerGraphs` records a layer's two passes under gradient checkpointing, once per input
shape, and from then on replays them:

* **forward**, the pass under ``no_grad`` whose output goes on to the next layer;
* **backward**, the recomputed forward with autograd and the gradients of the layer's input and of
  its adapters; the adapters' gradients are added to their ``.grad``. A split layer's block is
  recomputed without its last projection's product, whose output nothing reads there
  (lora_kernels.recompute).

The graphs hold the kernels that the eager layer launches, on the same inputs: the arithmetic is
unchanged, dropout masks included (a replay draws from the CUDA generator as the eager call would,
and the backward pass restores the state the forward pass started from, as checkpointing does).

What it needs and how it stays safe:

* a shape is recorded the second time it is seen; the first call runs eagerly and compiles or
  tunes whatever is lazy (Triton kernels, cuBLAS workspaces). At most :data:`MAX_SHAPES` shapes are
  recorded; others run eagerly.
* the tensors a graph reads and writes sit at fixed addresses: one set per shape, shared by all
  layers, since the layers run one after another (:class:`_Buffers`); the input and gradient
  buffers of every shape are views of one storage. Inputs are copied in; a graph writes its result
  over its input at the end, and the caller takes a copy, or, for an output that is used at once
  and dropped (``transient_output``: a split layer's blocks), the buffer itself.
* all graphs draw their temporaries from one memory pool; no temporary outlives its graph. So do
  cuBLAS's workspaces (:func:`_workspaces_in_pool`) and, between the forward and the backward
  replays, the chunked loss (:meth:`GraphContext.scratch`), whose temporaries are gone before the
  next replay.
* a pass given token ranges (the MLP block, offload.mlp_tile) records them one after another in
  its graph: each range's temporaries go before the next range's.
* each adapter weight gets a gradient buffer of its own for good; a replay adds into it and it is
  attached as ``.grad`` before the replay (``zero_grad(set_to_none=True)`` detaches it).
* a layer that cannot be recorded (a host synchronisation, an output that is not one tensor like
  its input, an argument that needs a gradient) makes its caller run eagerly; a failed recording
  turns the graphs off for the run, with a warning.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any

import torch

from .lora_kernels import recompute
from .offload import tiled_forward

log = logging.getLogger(__name__)

#: input shapes recorded per model; batches of other shapes run eagerly
MAX_SHAPES = 4


class NotGraphable(Exception):
    """This call cannot be recorded; it runs eagerly."""


def _signature(value: Any) -> Any:
    """A hashable description of an argument: tensors by shape, dtype and layout, plain values as is."""
    if isinstance(value, torch.Tensor):
        if value.requires_grad:
            raise NotGraphable("an argument other than the hidden states needs a gradient")
        return ("tensor", tuple(value.shape), value.stride(), value.dtype, value.device)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(_signature(v) for v in value))
    if isinstance(value, dict):
        return ("dict", *((k, _signature(v)) for k, v in sorted(value.items())))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise NotGraphable(f"an argument of type {type(value).__name__}")


def _tensors(value: Any, out: list[torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (tuple, list)):
        for v in value:
            _tensors(v, out)
    elif isinstance(value, dict):
        for _, v in sorted(value.items()):
            _tensors(v, out)
    return out


def _replace(value: Any, new) -> Any:
    """``value`` with its tensors taken in order from the iterator ``new``."""
    if isinstance(value, torch.Tensor):
        return next(new)
    if isinstance(value, (tuple, list)):
        return type(value)(_replace(v, new) for v in value)
    if isinstance(value, dict):
        replaced = {k: _replace(v, new) for k, v in sorted(value.items())}
        return {k: replaced[k] for k in value}
    return value


def _split(run) -> tuple[Any, tuple, dict]:
    """A checkpointed call ``run`` as (function, bound positional arguments, keyword arguments)."""
    if isinstance(run, functools.partial):
        return run.func, run.args, dict(run.keywords)
    return run, (), {}


class _Buffers:
    """The fixed-address tensors of one input shape, shared by every layer's graphs.

    ``hidden`` is the input, and after a forward replay the output; ``grad`` the output's gradient,
    and after a backward replay the input's. Layers with the same hidden shape (the attention and
    MLP blocks) share these two; the other arguments (position embeddings, mask) are per shape.
    """

    def __init__(self, pair: tuple[torch.Tensor, torch.Tensor], args: tuple, kwargs: dict):
        self.hidden, self.grad = pair
        sources = _tensors((args, kwargs), [])
        self.leaves = [torch.empty_like(t) for t in sources]
        self.args, self.kwargs = _replace((args, kwargs), iter(self.leaves))
        # The tensors last copied in, held so that their memory is not reused while compared by identity.
        self.last: list[tuple[torch.Tensor, int] | None] = [None] * len(self.leaves)

    def load(self, hidden: torch.Tensor, args: tuple, kwargs: dict) -> None:
        self.hidden.copy_(hidden)
        # The position embeddings and the mask are the same tensors for every layer of a step:
        # copied once.
        for i, (dst, src) in enumerate(zip(self.leaves, _tensors((args, kwargs), []))):
            last = self.last[i]
            if last is None or last[0] is not src or last[1] != src._version:
                dst.copy_(src)
                self.last[i] = (src, src._version)


class GraphContext:
    """What the layers of one model share: the memory pool, the capture stream, the buffers."""

    def __init__(self, device: torch.device, max_tokens: int | None = None):
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device=device)
        #: tokens of the largest micro-batch (micro-batch size × longest sequence): the input and
        #: gradient buffers of every shape up to it are views of one storage
        self.max_tokens = max_tokens
        self._storage: dict[torch.dtype, torch.Tensor] = {}
        self.buffers: dict[Any, _Buffers] = {}
        self.pairs: dict[Any, tuple[torch.Tensor, torch.Tensor]] = {}  # hidden shape -> (hidden, grad)
        self.graphs = 0
        self.disabled: str | None = None

    def buffers_for(self, key, hidden, args, kwargs) -> _Buffers | None:
        buffers = self.buffers.get(key)
        if buffers is None:
            shape = (tuple(hidden.shape), hidden.dtype)
            if shape not in self.pairs:
                if len(self.pairs) >= MAX_SHAPES:
                    return None
                self.pairs[shape] = self._pair(hidden)
            buffers = self.buffers[key] = _Buffers(self.pairs[shape], args, kwargs)
        return buffers

    def _pair(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """An input and a gradient buffer shaped like ``hidden``. One pass runs at a time and takes
        its results out at once, so the buffers of all shapes can share one storage."""
        n = hidden.numel()
        width = hidden.shape[-1]
        if self.max_tokens is None or n > self.max_tokens * width:
            return torch.empty_like(hidden, memory_format=torch.contiguous_format), torch.empty_like(
                hidden, memory_format=torch.contiguous_format)
        storage = self._storage.get(hidden.dtype)
        if storage is None:
            storage = self._storage[hidden.dtype] = torch.empty(2 * self.max_tokens * width, dtype=hidden.dtype,
                                                                 device=hidden.device)
        half = storage.numel() // 2
        return storage[:n].view(hidden.shape), storage[half:half + n].view(hidden.shape)

    def pool_bytes(self) -> int:
        """GPU memory held by the graphs' pool (reserved, so not in ``torch.cuda.memory_allocated``)."""
        segments = torch.cuda.memory._snapshot(self.device)["segments"]
        return sum(s["total_size"] for s in segments if tuple(s.get("segment_pool_id", (0, 0))) == tuple(self.pool))

    def scratch_in_pool(self) -> bool:
        """Whether :meth:`scratch` allocates in the pool now (graphs recorded and on, and this
        PyTorch able to route allocations to a pool)."""
        return (self.disabled is None and self.graphs > 0
                and hasattr(torch._C, "_cuda_beginAllocateCurrentThreadToPool"))

    @contextlib.contextmanager
    def scratch(self):
        """Allocate in the graphs' pool, on the capture stream, between replays.

        The pool is idle between the forward pass's last replay and the backward pass's first: the
        chunked loss (losses.py) takes its temporaries from it instead of from memory of its own.
        Whatever is allocated here must be freed before the next replay, which reuses these
        addresses without asking the allocator; results are allocated before entering. A no-op
        until something is recorded, or with the graphs off.
        """
        if not self.scratch_in_pool():
            yield
            return
        begin = torch._C._cuda_beginAllocateCurrentThreadToPool
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream), _workspaces_in_pool():
            begin(index, self.pool)
            try:
                yield
            finally:
                torch._C._cuda_endAllocateToPool(index, self.pool)
                torch._C._cuda_releasePool(index, self.pool)
        current.wait_stream(self.stream)

    def turn_off(self, reason: str) -> None:
        if self.disabled is None:
            self.disabled = reason
            log.warning("CUDA graphs off for this run: %s; the layers run eagerly (same results, slower)", reason)


class LayerGraphs:
    """The recorded passes of one checkpointed layer (see the module's description)."""

    def __init__(self, context: GraphContext, layer: torch.nn.Module):
        self.context = context
        self.layer = layer
        self.seen: dict[Any, int] = {}
        self.graphs: dict[Any, torch.cuda.CUDAGraph] = {}
        self.params: list[torch.nn.Parameter] | None = None
        self.grads: list[torch.Tensor] = []
        #: the forward pass's output is used once, at once, and dropped (a split layer's block, whose
        #: output only goes into the residual add after it): handed over in the buffer itself
        self.transient_output = False

    # -- the two passes ---------------------------------------------------------------------------

    def forward(self, run, hidden: torch.Tensor, rest: tuple, rng_state: torch.Tensor,
                tiles: list[slice] | None = None) -> torch.Tensor | None:
        """The layer's output through its graph, or None: the caller runs it eagerly. ``tiles``: run it
        on these ranges of the tokens one after another (offload.token_tiles)."""
        prepared = self._prepare("forward", run, hidden, rest)
        if prepared is None:
            return None
        graph_key, fn, buffers, kwargs = prepared
        buffers.load(hidden, rest, kwargs)
        graph = self.graphs.get(graph_key)
        if graph is None:
            graph = self._record(graph_key, lambda: self._capture_forward(fn, buffers, tiles))
            # The recording's warm-up drew random numbers: the state goes back to the step's.
            torch.cuda.set_rng_state(rng_state, hidden.device)
            if graph is None:
                return None
        graph.replay()
        # The next replay writes over the buffer: a transient output is read before that, since the
        # stream runs in order and nothing else holds it; any other output is copied out.
        return buffers.hidden.detach() if self.transient_output else buffers.hidden.clone()

    def backward(self, run, hidden: torch.Tensor, rest: tuple, grad: torch.Tensor, rng_state: torch.Tensor,
                 tiles: list[slice] | None = None) -> tuple[bool, torch.Tensor | None]:
        """Recompute and backpropagate through the graph: (done, the input's gradient or None);
        with ``tiles``, one range of the tokens after another."""
        prepared = self._prepare(("backward", hidden.requires_grad), run, hidden, rest)
        if prepared is None:
            return False, None
        graph_key, fn, buffers, kwargs = prepared
        buffers.load(hidden, rest, kwargs)
        buffers.grad.copy_(grad)
        graph = self.graphs.get(graph_key)
        if graph is None:
            graph = self._record(graph_key, lambda: self._capture_backward(fn, buffers, hidden.requires_grad, tiles))
            torch.cuda.set_rng_state(rng_state, hidden.device)
            if graph is None:
                return False, None
        self._attach_grads()
        graph.replay()
        return True, (buffers.grad.clone() if hidden.requires_grad else None)

    # -- bookkeeping ------------------------------------------------------------------------------

    def _prepare(self, kind, run, hidden: torch.Tensor, rest: tuple):
        """(graph key, the call on the fixed buffers, the buffers, the call's keyword arguments) when
        this call can use a graph."""
        context = self.context
        if context.disabled is not None or not hidden.is_cuda or torch.cuda.is_current_stream_capturing():
            return None
        func, bound, kwargs = _split(run)
        try:
            shape_key = (tuple(hidden.shape), hidden.stride(), hidden.dtype, _signature(rest), _signature(kwargs))
        except NotGraphable:
            return None
        graph_key = (kind, shape_key)
        if graph_key not in self.graphs:
            count = self.seen.get(graph_key, 0) + 1
            self.seen[graph_key] = count
            if count < 2:  # the first call runs eagerly: it compiles and tunes what is lazy
                return None
        buffers = context.buffers_for(shape_key, hidden, rest, kwargs)
        if buffers is None:
            return None
        fn = functools.partial(_call, func, bound, buffers)
        return graph_key, fn, buffers, kwargs

    def _record(self, graph_key, capture) -> torch.cuda.CUDAGraph | None:
        try:
            graph = capture()
        except NotGraphable as exc:
            log.info("layer %s runs eagerly: %s", type(self.layer).__name__, exc)
            self.seen[graph_key] = -(1 << 60)  # never again for this shape
            return None
        except Exception as exc:  # noqa: BLE001 - whatever the layer's kernels refuse under capture
            torch.cuda.synchronize(self.context.device)
            _reset_generator(self.context)
            from .model import first_line

            self.context.turn_off(f"recording {type(self.layer).__name__} failed ({type(exc).__name__}: {first_line(exc)})")
            return None
        self.graphs[graph_key] = graph
        self.context.graphs += 1
        return graph

    def _trainable(self) -> list[torch.nn.Parameter]:
        if self.params is None:
            self.params = [p for p in self.layer.parameters() if p.requires_grad]
            self.grads = [torch.zeros_like(p, memory_format=torch.contiguous_format) for p in self.params]
        return self.params

    def _attach_grads(self) -> None:
        fresh = []
        for p, buf in zip(self.params or [], self.grads):
            g = p.grad
            if g is buf:
                continue
            if g is None:
                fresh.append(buf)
            else:
                buf.copy_(g)  # a gradient from an eager pass of this step
            p.grad = buf
        if fresh:
            torch._foreach_zero_(fresh)

    # -- recording --------------------------------------------------------------------------------

    def _warm_up(self, step):
        """One eager call on the capture stream: lazy set-up must not happen inside the recording."""
        stream = self.context.stream
        stream.wait_stream(torch.cuda.current_stream(self.context.device))
        with torch.cuda.stream(stream):
            result = step()
        torch.cuda.current_stream(self.context.device).wait_stream(stream)
        return result

    def _capture_forward(self, fn, buffers: _Buffers, tiles: list[slice] | None) -> torch.cuda.CUDAGraph:
        def step():
            with torch.no_grad():
                return fn(buffers.hidden) if tiles is None else tiled_forward(fn, buffers.hidden, tiles)

        out = self._warm_up(step)
        if not isinstance(out, torch.Tensor) or out.shape != buffers.hidden.shape or out.dtype != buffers.hidden.dtype:
            raise NotGraphable("its output is not one tensor shaped like its input")
        del out
        graph = torch.cuda.CUDAGraph()
        with _workspaces_in_pool(), torch.cuda.graph(graph, pool=self.context.pool, stream=self.context.stream):
            buffers.hidden.copy_(step())  # after everything that reads the input
        return graph

    def _capture_backward(self, fn, buffers: _Buffers, input_grad: bool,
                          tiles: list[slice] | None) -> torch.cuda.CUDAGraph:
        params = self._trainable()
        skip = 1 if input_grad else 0
        used: list[int] = []

        def step(part: slice | None, write: bool):
            """Recompute and differentiate the pass (or a range of its tokens); with ``write``, add the
            adapters' gradients to their buffers and put the input's gradient over the output's."""
            h = (buffers.hidden if part is None else _tokens(buffers.hidden)[part]).detach().requires_grad_(input_grad)
            grad = buffers.grad if part is None else _tokens(buffers.grad)[part]
            out = recompute(fn, h)
            if not isinstance(out, torch.Tensor) or not out.requires_grad:
                raise NotGraphable("its output is not one tensor that needs a gradient")
            inputs = ([h] if input_grad else []) + params
            grads = torch.autograd.grad(out, inputs, grad, allow_unused=True)
            if write:
                if used:
                    torch._foreach_add_([self.grads[i] for i in used], [grads[skip + i] for i in used])
                if input_grad:
                    grad.copy_(grads[0])  # after everything that reads the output's gradient
            return grads

        parts = tiles or [None]

        def warm_up():
            for part in parts:  # every shape of tile, so nothing is compiled while recording
                grads = step(part, write=False)
            return grads

        grads = self._warm_up(warm_up)
        used.extend(i for i, g in enumerate(grads[skip:]) if g is not None)
        del grads
        if not used and not input_grad:
            raise NotGraphable("nothing in it needs a gradient")
        graph = torch.cuda.CUDAGraph()
        with _workspaces_in_pool(), torch.cuda.graph(graph, pool=self.context.pool, stream=self.context.stream):
            for part in parts:
                step(part, write=True)  # each range's temporaries go before the next one's
        return graph


@contextlib.contextmanager
def _workspaces_in_pool():
    """cuBLAS's workspaces made inside (in the graphs' pool), and given back to it after.

    PyTorch keeps a 32 MiB workspace per cuBLAS handle and stream (on Hopper), for good: one per
    thread that runs products (forward, autograd's backward) and stream (the default one, the
    capture stream), 128 MiB in all. Dropped before a recording, the workspace the recording needs
    is allocated in the pool; dropped after, it becomes one of the pool's temporaries that the
    graph uses while it runs, like any other. The default stream's, which nothing uses once the
    layers replay, are gone too. PyTorch's own CUDA graph trees (torch.compile) do the same.
    """
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()
    try:
        yield
    finally:
        if clear is not None:
            clear()


def _reset_generator(context: GraphContext) -> None:
    """Take the CUDA generator out of capture mode after a failed recording.

    A recording that fails ends without telling the generator, which then refuses every random
    draw outside a recording ("Offset increment outside graph capture"): dropout would fail. An
    empty recording ends properly and resets it.
    """
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=context.stream):
            pass
        del graph
    except Exception:  # noqa: BLE001 - nothing more to do; the next random draw would say so
        log.debug("could not reset the CUDA generator after a failed recording", exc_info=True)


def _tokens(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (tokens, width): the rows that offload.token_tiles ranges index."""
    return t.view(-1, t.shape[-1])


def _call(func, bound: tuple, buffers: _Buffers, hidden: torch.Tensor):
    return func(*bound, hidden, *buffers.args, **buffers.kwargs)


__all__ = ["MAX_SHAPES", "GraphContext", "LayerGraphs", "NotGraphable"]
