"""How much GPU memory a QLoRA run needs, from ``config.json`` and the run configuration alone.

The estimate is not a fitted curve. It simulates one training step of this project's engine
tensor by tensor -- every allocation and release, in order -- and reports the largest moment:

* the model as the engine loads it (``engine/model.py``): 4-bit NF4/FP4 weights with their
  quantization constants, embeddings, output head and norms in the compute dtype, LoRA adapters
  in fp32 on the selected projections;
* the step as the engine runs it (``engine/trainer.py``, ``engine/lora_kernels.py``,
  ``engine/losses.py``): transformers' Llama-style decoder layers, the fused 4-bit + LoRA function
  (q/k/v and gate/up together without dropout) or PEFT's layers, SDPA/eager attention,
  non-reentrant gradient checkpointing with its recomputation, the chunked or standard
  cross-entropy, gradient accumulation, the optimizer's states (paged ones live in CUDA unified
  memory and are reported apart);
* the engine's GPU-only paths (``engine/model.py::gpu_fast_paths``), for a CUDA estimate: layer
  inputs offloaded to CPU memory between forward and backward, Llama-style layers checkpointed as
  their two blocks (``engine/offload.py``), their MLP on a range of tokens at a time where that
  saves a sizeable share, the checkpointed passes replayed as CUDA graphs from a memory pool of
  their own (``engine/layer_graphs.py``), which the loss's temporaries and cuBLAS's workspaces
  share, the loss's Triton kernel (``engine/ce_kernel.py``) where Triton is installed, an untied
  input embedding in CPU memory, liger-kernel's fused RMSNorm, SwiGLU and RoPE where installed;
* PyTorch's CUDA caching allocator, replayed over the same allocations, for the reserved memory
  (what fragmentation adds), and the CUDA context that NVML sees besides.

tests/estimate/ checks the simulation against the bytes of real tensors and against the live
bytes of the engine's real step on the CPU; bench/estimate_accuracy.py checks the whole against
measured peaks on the H200. docs/estimate.md explains each term.

Torch-free: the GUI imports this at start-up, and ``qlora-studio estimate`` runs without a GPU.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import config as config_mod
from ..config import ALL_LINEAR, RunConfig
from ..errors import ModelError, UserError
from .modelinfo import Linear, ModelInfo, describe, read_model_config

GiB = 1024**3
MiB = 1024**2

# --- bitsandbytes 4-bit storage (bitsandbytes.functional.quantize_4bit) -----------------------
QUANT_BLOCK = 64  #: weights per absmax constant
NESTED_BLOCK = 256  #: absmax constants per second-level fp32 constant (double quantization)
NF4_CODE_BYTES = 16 * 4  #: the 16-entry fp32 code book each quantized weight carries
NESTED_CODE_BYTES = 256 * 4  #: the 8-bit code book of its double-quantized absmax (one per weight)

# --- bitsandbytes optimizers (bitsandbytes/optim/optimizer.py) ---------------------------------
PAGED_MIN_NUMEL = 100_000  #: smaller state tensors are ordinary device tensors even when "paged"
EIGHT_BIT_MIN_NUMEL = 4096  #: smaller tensors keep 32-bit states in the 8-bit optimizers
EIGHT_BIT_BLOCK = 256  #: elements per fp32 absmax of a blockwise 8-bit state

# --- the engine (engine/trainer.py) ---------------------------------------------------------
LOSS_CHUNK_TOKENS = 1024  #: at most this many tokens per output-head chunk of the ``chunked`` loss (as trainer.py)
LOSS_LOGITS_BYTES = 128 << 20  #: and at most this much for a chunk's fp32 logits (as trainer.py)
LAYERS_AHEAD = 3  #: passes the host queues ahead of the GPU, their inputs still on it (as offload.py)
#: the projections whose weights a split layer's recomputation keeps for its backward (lora_kernels.keep_weights)
KEPT_WEIGHTS = frozenset({"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "down_proj"})
MLP_TILE_TOKENS = 2048  #: a split layer's MLP block runs on at most this many tokens at a time ... (as offload.py)
MLP_TILE_SHARE = 1 / 20  #: ... where one MLP intermediate is more than this share of the parameters' memory
#: ``model_type`` values whose decoder layers offload.split_layer checkpoints as two blocks
SPLIT_LAYER_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "granite", "smollm3", "gemma"})
#: projections a layer calls on one input, in its order (lora_kernels.GROUPS)
QKV = ("q_proj", "k_proj", "v_proj")
GATE_UP = ("gate_proj", "up_proj")


def loss_chunk_tokens(vocab_size: int) -> int:
    """``trainer.loss_chunk_tokens``: tokens per chunk of the chunked loss."""
    by_bytes = max(64, LOSS_LOGITS_BYTES // (4 * vocab_size) // 64 * 64)
    return max(1, min(LOSS_CHUNK_TOKENS, by_bytes))


LORA_BYTES = 4  #: PEFT keeps LoRA weights in fp32 over a 4-bit base and casts their input to fp32
BNB_FUSED_MAX_TOKENS = 1536  #: above this many tokens bitsandbytes dequantizes, then runs F.linear
DROPOUT_MASK_BYTES = 1  #: CUDA's fused dropout saves a bool mask

# --- the GPU-only paths (engine/model.py::gpu_fast_paths, engine/offload.py) --------------------


@dataclass(frozen=True)
class FusedKernels:
    """What liger-kernel's patch for a model type replaces (``liger_kernel/transformers/monkey_patch.py``)."""

    #: ``apply_rotary_pos_emb`` -> ``LigerRopeFunction``: q and k rotated where they are
    rope: bool = True
    #: ``LigerRMSNormFunction`` writes the input's gradient over the output's (``in_place``)
    norm_in_place: bool = True
    #: the q/k norms of the attention are patched too
    qk_norm: bool = False


#: The model types whose kernels the engine swaps when liger-kernel is installed: the gated MLP
#: (SwiGLU, GEGLU for Gemma) and the RMSNorms everywhere, RoPE as stated. glm4 is left out:
#: liger-kernel has no RoPE kernel for it and refuses ``rope=True``.
FUSED_KERNELS: dict[str, FusedKernels] = {
    **{t: FusedKernels() for t in ("llama", "mistral", "qwen2", "granite", "smollm3", "phi3", "gemma")},
    "qwen3": FusedKernels(qk_norm=True),
    "gemma2": FusedKernels(norm_in_place=False),
    "gemma3": FusedKernels(norm_in_place=False, qk_norm=True),
    "gemma3_text": FusedKernels(norm_in_place=False, qk_norm=True),
    "olmo2": FusedKernels(norm_in_place=False),  # its q/k norms stay transformers'
    "exaone4": FusedKernels(norm_in_place=False, qk_norm=True),
}
#: Model types whose input embedding is not a plain ``nn.Embedding`` (a scaled one, which
#: ``offload.embeddings_on_cpu`` leaves on the GPU)
SCALED_EMBEDDING_TYPES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})


def embeddings_movable(info: ModelInfo) -> bool:
    """Whether ``offload.embeddings_on_cpu`` moves this model's input embedding to CPU memory:
    untied (a tied one is the output head too) and a plain ``nn.Embedding``."""
    return not info.tie_word_embeddings and info.model_type not in SCALED_EMBEDDING_TYPES and info.embedding_params > 0


# --- the process and the caching allocator ------------------------------------------------
#: Driver context, kernel images loaded lazily during training, cuBLAS handles: what NVML shows
#: for the process beyond PyTorch's reserved memory. Measured by bench/estimate_accuracy.py:
#: 758 MiB on an H200 with CUDA 13 (driver 580), at every point of the 1B and 8B grids.
CUDA_CONTEXT_BYTES = 758 * MiB
ALLOCATION_GRANULE = 512  #: the caching allocator rounds every block to 512 bytes
#: cuBLAS's workspace (32 MiB on Hopper), one per thread that runs products: the forward's and
#: autograd's backward thread. PyTorch allocates them through its caching allocator.
CUBLAS_WORKSPACE = 32 * MiB
CUBLAS_WORKSPACE_BYTES = 2 * CUBLAS_WORKSPACE

#: A configuration "fits" when its estimated peak plus this fraction fits the available memory;
#: within the fraction it is "tight" (about the estimate's measured accuracy).
MARGIN = 0.10

FITS, TIGHT, DOES_NOT_FIT = "fits", "tight", "does_not_fit"
VERDICT_TEXT = {FITS: "fits", TIGHT: "tight", DOES_NOT_FIT: "does not fit"}

DTYPE_BYTES = {"auto": 2, "bfloat16": 2, "float16": 2, "float32": 4}
PAGED_OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit")


# ----------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class Item:
    """One line of the breakdown: what it is and its bytes at the peak."""

    key: str
    label: str
    bytes: int


@dataclass(frozen=True)
class Suggestion:
    """A change to the configuration, with the setting it touches (for a GUI button)."""

    setting: str
    value: Any
    text: str


@dataclass
class Estimate:
    """The estimated peak GPU memory of one training step, its breakdown and a verdict."""

    model: ModelInfo
    settings: dict[str, Any]
    #: the breakdown at the peak moment; the items sum to :attr:`peak`
    items: list[Item]
    #: which moment of the step is the peak: forward, loss backward, layer backward, optimizer step
    phase: str
    #: bytes of tensors alive at the peak (what torch.cuda.max_memory_allocated would show)
    allocated: int
    #: allocated plus the caching allocator's slack (torch.cuda.max_memory_reserved)
    reserved: int
    #: reserved plus the CUDA context: what NVML shows for the process at its peak
    peak: int
    #: optimizer states in CUDA unified memory (paged optimizers): resident on the GPU while there
    #: is room, moved to CPU memory under pressure; not part of :attr:`peak`
    paged: int
    #: the peak of each moment, for the curious and for the tests
    phases: dict[str, int]
    gpu_total: int | None = None
    gpu_free: int | None = None
    verdict: str | None = None
    reason: str = ""
    suggestions: list[Suggestion] = field(default_factory=list)
    max_micro_batch: int | None = None
    max_seq_len: int | None = None
    notes: list[str] = field(default_factory=list)
    #: pinned CPU memory the GPU-only paths use instead (a micro-batch's offloaded layer inputs,
    #: the input embedding): not part of :attr:`peak`
    cpu_pinned: int = 0

    def item(self, key: str) -> int:
        return sum(i.bytes for i in self.items if i.key == key)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.to_dict(),
            "settings": dict(self.settings),
            "items": [dataclasses.asdict(i) for i in self.items],
            "phase": self.phase,
            "allocated": self.allocated,
            "reserved": self.reserved,
            "peak": self.peak,
            "paged": self.paged,
            "phases": dict(self.phases),
            "gpu_total": self.gpu_total,
            "gpu_free": self.gpu_free,
            "verdict": self.verdict,
            "reason": self.reason,
            "suggestions": [dataclasses.asdict(s) for s in self.suggestions],
            "max_micro_batch": self.max_micro_batch,
            "max_seq_len": self.max_seq_len,
            "notes": list(self.notes),
            "cpu_pinned": self.cpu_pinned,
        }


# ----------------------------------------------------------------------------------------------
# The pieces


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _granule(n: int) -> int:
    return _ceil_div(n, ALLOCATION_GRANULE) * ALLOCATION_GRANULE if n else 0


@dataclass(frozen=True)
class QuantizedBytes:
    """The storage of the 4-bit weights: packed values and quantization constants."""

    packed: int
    constants: int
    params: int

    @property
    def constant_bits_per_param(self) -> float:
        return 8 * self.constants / self.params if self.params else 0.0


def quantized_bytes(linears: tuple[Linear, ...], double_quant: bool) -> QuantizedBytes:
    """bitsandbytes' 4-bit storage of these linear layers.

    Two weights per byte; per block of 64 weights one absmax constant, stored in fp32 or, with
    double quantization, as an 8-bit code plus one fp32 constant per 256 blocks and an fp32
    offset: 8/64 + 32/(64*256) = 0.127 bits per weight instead of 32/64 = 0.5. Each weight also
    carries its code books (16 fp32 values for NF4/FP4, 256 for the 8-bit absmax).
    """
    packed = constants = params = 0
    for lin in linears:
        n = lin.params
        blocks = _ceil_div(n, QUANT_BLOCK)
        if double_quant:  # 8-bit absmax, fp32 second-level absmax, the offset, their code book
            per = blocks + 4 * _ceil_div(blocks, NESTED_BLOCK) + 4 + NESTED_CODE_BYTES
        else:
            per = 4 * blocks
        packed += lin.count * _ceil_div(n, 2)
        constants += lin.count * (per + NF4_CODE_BYTES)
        params += lin.count * n
    return QuantizedBytes(packed, constants, params)


def lora_targets(info: ModelInfo, target_modules: list[str]) -> tuple[Linear, ...]:
    """The linear layers that get LoRA, as the engine picks them (leaf names; all-linear = all)."""
    every = (*info.linears, *info.vision_linears)
    if ALL_LINEAR in target_modules:
        return every
    names = {lin.name for lin in every}
    unknown = [m for m in target_modules if m not in names]
    if unknown:
        raise ModelError(
            f"lora.target_modules names {', '.join(unknown)}, which the model does not have",
            fix=f"Its linear layers are: {', '.join(dict.fromkeys(lin.name for lin in every))} (or use \"{ALL_LINEAR}\").",
        )
    return tuple(lin for lin in every if lin.name in target_modules)


def lora_tensors(targets: tuple[Linear, ...], r: int) -> list[int]:
    """The element counts of every LoRA tensor (A: r x in, B: out x r), one entry per tensor."""
    sizes: list[int] = []
    for lin in targets:
        sizes += [r * lin.in_features, lin.out_features * r] * lin.count
    return sizes


@dataclass(frozen=True)
class OptimizerBytes:
    device_tensors: tuple[int, ...]  #: ordinary device tensors, one entry per allocation
    paged: int  #: CUDA unified memory (paged optimizers only)
    step_temporary: int  #: extra bytes while ``step()`` runs

    @property
    def device(self) -> int:
        return sum(self.device_tensors)


def optimizer_bytes(optimizer: str, tensor_sizes: list[int], *, fused: bool = False, cuda: bool = True) -> OptimizerBytes:
    """AdamW's two states per trainable tensor, as each optimizer stores them.

    ``fused``: ``paged_adamw_32bit`` as engine/optim.py's PagedAdamWFused runs it
    (``train.fused_optimizer``): both states of every tensor in one buffer each, paged on CUDA
    whatever their size, and one fp32 step count per tensor in one device tensor.
    """
    if fused and optimizer == "paged_adamw_32bit":
        states = 4 * sum(tensor_sizes)
        steps = (4 * len(tensor_sizes),) if tensor_sizes else ()
        if cuda:
            return OptimizerBytes(steps, 2 * states, 0)
        return OptimizerBytes((states, states, *steps), 0, 0)
    device: list[int] = []
    paged = temporary = 0
    is_paged = optimizer in PAGED_OPTIMIZERS
    for n in tensor_sizes:
        if optimizer.endswith("8bit") and n >= EIGHT_BIT_MIN_NUMEL:
            states = [n, n]  # two uint8 states
            absmax = 4 * _ceil_div(n, EIGHT_BIT_BLOCK)
            device += [absmax, absmax]  # their fp32 absmax, never paged
        else:
            states = [4 * n, 4 * n]
        if is_paged and n >= PAGED_MIN_NUMEL:
            paged += sum(states)
        else:
            device += states
    if optimizer == "adamw_torch":
        # torch.optim.AdamW (foreach) builds a sqrt(v) copy of every state during the step
        temporary = 4 * sum(tensor_sizes)
    return OptimizerBytes(tuple(device), paged, temporary)


@dataclass(frozen=True)
class Shape:
    """One training micro-batch and the settings that decide which tensors it creates."""

    batch: int
    seq: int
    c: int  #: bytes per element of the compute dtype
    attention: str
    dropout: float
    r: int
    padded: bool
    #: "cuda", or "cpu" for PyTorch's CPU kernels (dropout keeps its mask in the input's dtype, no
    #: FlashAttention workspaces, bitsandbytes always dequantizes): how the tests check the model
    device: str = "cuda"

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


class _Timeline:
    """Bytes alive through a simulated training step, by kind, and its largest moment.

    Every tensor the step creates is an :meth:`alloc` (rounded like the caching allocator). A
    tensor lives while something refers to it: the code that made it (one reference, dropped with
    :meth:`free`) and autograd when it is saved for backward (:meth:`keep`, released with
    :meth:`free` when the backward that needs it has run). The kinds become breakdown lines.
    """

    def __init__(self, base: dict[str, int], record: bool = False, granule: int = ALLOCATION_GRANULE):
        self._tensors: dict[int, list] = {}  # handle -> [bytes, kind, references]
        self.granule = granule
        self._next = 1
        #: (handle, bytes, stream) for an allocation, (handle, 0, 0) for a release: for the allocator replay
        self.events: list[tuple[int, int, int]] | None = [] if record else None
        self.by_kind: dict[str, int] = dict(base)
        self.now = sum(base.values())
        self.phase = "forward"
        self.phase_peaks: dict[str, int] = {}
        self.peak = -1
        self.peak_phase = ""
        self._peak_kinds: dict[str, int] = {}
        self._at_peak = False  # nothing has changed since the last new peak
        #: allocations go to the CUDA graphs' private pool (engine/layer_graphs.py), apart from the rest
        self.in_pool = False
        self._pool: set[int] = set()
        self.pool_now = self.pool_peak = 0
        self.pool_events: list[tuple[int, int, int]] | None = [] if record else None

    def alloc(self, nbytes: int, kind: str = "work", stream: int = 0) -> int:
        """A new tensor; ``stream`` 1 is a side stream (the caching allocator keeps its blocks apart)."""
        handle = self._next
        self._next = handle + 1
        granule = self.granule
        nbytes = -(-int(nbytes) // granule) * granule if nbytes > 0 else 0
        self._tensors[handle] = [nbytes, kind, 1]
        if self.in_pool:
            self._pool.add(handle)
            if self.pool_events is not None and nbytes:
                self.pool_events.append((handle, nbytes, 0))
            self.pool_now += nbytes
            self.pool_peak = max(self.pool_peak, self.pool_now)
            return handle
        if nbytes:
            if self.events is not None:
                self.events.append((handle, nbytes, stream))
            self.now += nbytes
            self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes
            if self.now > self.phase_peaks.get(self.phase, -1):
                self.phase_peaks[self.phase] = self.now
            if self.now > self.peak:  # the breakdown is copied lazily, before the next change
                self.peak, self.peak_phase, self._at_peak = self.now, self.phase, True
        return handle

    def free(self, *handles: int | None) -> None:
        """Drop one reference to each tensor; the memory goes with the last one."""
        for handle in handles:
            tensor = self._tensors.get(handle)
            if tensor is None:
                continue
            tensor[2] -= 1
            if tensor[2] == 0:
                del self._tensors[handle]
                if handle in self._pool:
                    self._pool.discard(handle)
                    self.pool_now -= tensor[0]
                    if self.pool_events is not None and tensor[0]:
                        self.pool_events.append((handle, 0, 0))
                elif tensor[0]:
                    self._settle_peak()
                    if self.events is not None:
                        self.events.append((handle, 0, 0))
                    self.now -= tensor[0]
                    self.by_kind[tensor[1]] -= tensor[0]

    def ref(self, handle: int | None) -> int | None:
        """One more reference to the tensor (a second name for it, an in-place result), its kind unchanged."""
        tensor = self._tensors.get(handle)
        if tensor is not None:
            tensor[2] += 1
        return handle

    def keep(self, handle: int | None) -> int | None:
        """Autograd saves the tensor for backward: one more reference, and it counts as activations."""
        tensor = self._tensors.get(handle)
        if tensor is not None:
            tensor[2] += 1
            if tensor[1] != "activations" and handle not in self._pool:
                self._settle_peak()
                self.by_kind[tensor[1]] -= tensor[0]
                self.by_kind["activations"] = self.by_kind.get("activations", 0) + tensor[0]
                tensor[1] = "activations"
        return handle

    def _settle_peak(self) -> None:
        if self._at_peak:
            self._peak_kinds, self._at_peak = dict(self.by_kind), False

    @property
    def peak_kinds(self) -> dict[str, int]:
        """The breakdown by kind at the peak."""
        self._settle_peak()
        return self._peak_kinds

    def size(self, handle: int) -> int:
        return self._tensors[handle][0]

    def reset_peak(self) -> None:
        """Watch for the peak from now on (after loading, say)."""
        self.peak, self.phase_peaks, self._at_peak = self.now, {}, True

    @contextlib.contextmanager
    def graph(self, workspace: int = 0):
        """One CUDA graph's replay: its tensors come from the graphs' pool, and none outlives it;
        ``workspace``: cuBLAS's workspace, which is one of them (layer_graphs._workspaces_in_pool)."""
        self.in_pool = True
        if workspace:
            self.alloc(workspace)
        try:
            yield
        finally:
            self.in_pool = False
            for handle in list(self._pool):
                tensor = self._tensors.pop(handle, None)
                if tensor is not None:
                    self.pool_now -= tensor[0]
                    if self.pool_events is not None and tensor[0]:
                        self.pool_events.append((handle, 0, 0))
            self._pool.clear()

    @property
    def pool_bytes(self) -> int:
        """The graphs' pool: its reserved memory, with the allocator replayed when recorded."""
        return _reserved(self.pool_events) if self.pool_events else self.pool_peak


class _StepSimulation:
    """The tensors of one training micro-step, in the order the engine creates and frees them.

    It mirrors transformers' Llama-style decoder layer; the adapter layer, either the engine's
    fused ``lora_kernels.LoRA4bitFunction`` (compute dtype; keeps the adapter's input, the rank-r
    product and the adapter weights cast to the compute dtype in each pass), with
    ``LoRA4bitGroupFunction`` for q/k/v and gate/up when no dropout applies (one product with their
    A's stacked, one input gradient for the group), or PEFT's ``lora.bnb.Linear4bit``
    (the base output cloned, the input cast to fp32 per adapter, dropout, lora_A, lora_B,
    scaling, cast back, add); bitsandbytes' ``MatMul4Bit``, which saves no input and dequantizes
    its weight for the input gradient; PyTorch's non-reentrant activation checkpointing, which
    keeps each layer's input and recomputes the layer in backward, or offload.py's, which keeps it
    in CPU memory and recomputes the whole layer; liger-kernel's fused kernels when the engine uses
    them; and the engine's ``loss_sum``.
    Autograd releases a saved tensor when the backward of the operation that saved it has run, and
    adds a second gradient for the same tensor into a new tensor.

    ``keep=False`` runs a layer the way a checkpointed forward does: nothing is saved.
    """

    def __init__(self, info: ModelInfo, targets: tuple[Linear, ...], shape: Shape, settings: dict[str, Any],
                 timeline: _Timeline):
        self.info, self.shape, self.s = info, shape, settings
        self.targeted = {lin.name for lin in targets if not lin.input.startswith("vision_")}
        self.linear = {lin.name: lin for lin in info.linears}
        self.tl = timeline
        self.t = shape.tokens
        self.c = shape.c
        self.cuda = shape.device == "cuda"
        self.fused = settings["fused_lora"]
        self.grads_present = False
        self.grad_handles: list[int] = []  # the LoRA gradients, released by zero_grad(set_to_none=True)
        self.checkpointing = settings["gradient_checkpointing"]
        #: offload.py's checkpoint: layer inputs wait in CPU memory, a layer is recomputed whole
        self.offload = self.checkpointing and settings["offload_checkpoints"] and self.cuda
        #: ... or, for a Llama-style layer, as its two blocks (offload.split_layer)
        self.split = self.offload and info.model_type in SPLIT_LAYER_TYPES and info.norms_per_layer == 2
        #: layer_graphs.py: the checkpointed passes replayed as CUDA graphs from their own pool
        self.graphs = self.offload and bool(settings.get("cuda_graphs"))
        self._graph_grads: list[int] = []
        self._in_flight: list[int] = []
        #: liger-kernel's RMSNorm, SwiGLU/GEGLU and RoPE (engine/model.py::fused_kernels), or None
        self.kernels = FUSED_KERNELS.get(info.model_type) if settings.get("fused_kernels") and self.cuda else None
        # transformers' gradient_checkpointing_enable() hooks the embeddings so that their output
        # requires a gradient: the first layer then saves and computes like every other one
        # (offload.py's checkpoint does without: model.gpu_fast_paths removes the hook)
        self.embeddings_need_grad = self.checkpointing and not self.offload
        #: gradients computed before a checkpointed layer's recomputation, by projection
        self._pending: dict[str, int] = {}

    # --- the 4-bit linear layer with its LoRA adapter ----------------------------------------

    def _dequantized_weight(self, lin: Linear) -> int:
        """The whole weight rebuilt in the compute dtype. bitsandbytes first rebuilds a
        double-quantized absmax in fp32; the fused layer's NF4 kernel (nf4_kernel.py) does not."""
        kernel = self.fused and self.s.get("nf4_kernel")
        scales = 4 * _ceil_div(lin.params, QUANT_BLOCK) if self.s.get("double_quant") and not kernel else 0
        return self.tl.alloc(self.c * lin.params + scales)

    def _dropout(self, width: int, elem: int, input_grad: bool) -> tuple[int, int | None]:
        """The adapter's dropout: (output, mask kept for backward or None)."""
        tl, t = self.tl, self.t
        mask = tl.alloc((DROPOUT_MASK_BYTES if self.cuda else elem) * width * t)  # CUDA: a bool mask
        out = tl.alloc(elem * width * t)
        if input_grad:
            tl.keep(mask)
        tl.free(mask)
        return out, (mask if input_grad else None)

    def linear_forward(self, name: str, x: int, input_grad: bool, keep: bool, last: bool = False) -> tuple[int | None, dict[str, int]]:
        """The projection ``name`` of input ``x``: returns the output and the tensors kept for backward.

        ``last``: this adapter saves the last tensor of a recomputed layer, so the recomputation
        stops there (PyTorch's early stop) and there is no output.
        """
        tl, t, c, lin = self.tl, self.t, self.c, self.linear[name]
        if name in self.targeted and self.fused:
            return self._fused_forward(name, lin, x, input_grad, keep, last)
        if t > BNB_FUSED_MAX_TOKENS or not self.cuda:  # dequantize, then F.linear
            w = self._dequantized_weight(lin)
            out = tl.alloc(c * lin.out_features * t)
            tl.free(w)
        else:
            out = tl.alloc(c * lin.out_features * t)
        if name not in self.targeted:
            return out, {}
        result = tl.alloc(c * lin.out_features * t)  # PEFT's defensive clone
        tl.free(out)
        x32 = tl.alloc(LORA_BYTES * lin.in_features * t)  # the input, cast to the adapter's fp32
        mask = None
        if self.shape.dropout > 0:
            a_in, mask = self._dropout(lin.in_features, LORA_BYTES, input_grad)
        else:
            a_in = x32
            tl.keep(x32)
        a_out = tl.alloc(LORA_BYTES * self.shape.r * t)
        b_out = tl.alloc(LORA_BYTES * lin.out_features * t)
        summed = None
        if last:
            tl.free(b_out, result)
        else:
            scaled = tl.alloc(LORA_BYTES * lin.out_features * t)
            tl.free(b_out)
            low = tl.alloc(c * lin.out_features * t)
            tl.free(scaled)
            summed = tl.alloc(c * lin.out_features * t)
            tl.free(result, low)
        # lora_A keeps its input, lora_B lora_A's output, dropout its mask (kept above)
        if a_in is not x32:
            tl.keep(a_in)
        tl.keep(a_out)
        tl.free(x32, a_in if a_in is not x32 else None, a_out)
        saved = {"a_in": a_in, "a_out": a_out, "mask": mask}
        return summed, self._saved(saved, keep)

    def _keeps_weight(self, name: str, input_grad: bool, keep: bool) -> bool:
        """lora_kernels.keep_weights: a split layer's recomputation (offload.split_layer) keeps the
        dequantized weights of the attention block's fused projections and of the MLP's last one
        for the backward that follows, where the input needs a gradient."""
        return (keep and input_grad and self.split and self.fused and self.s.get("keep_weights", False)
                and name in self.targeted and name in KEPT_WEIGHTS)

    def _fused_forward(self, name: str, lin: Linear, x: int, input_grad: bool, keep: bool,
                       last: bool) -> tuple[int | None, dict[str, int]]:
        tl, t, c, r = self.tl, self.t, self.c, self.shape.r
        mask = None
        if self.shape.dropout > 0:
            x_d, mask = self._dropout(lin.in_features, c, input_grad)
        else:
            x_d = x
        a = self._cast(r * lin.in_features)  # A in the compute dtype, cast in each pass
        b = self._scaled_b(lin)
        xa = tl.alloc(c * r * t)
        out = tl.alloc(c * lin.out_features * t)  # the adapter's term, then the weight's product added in
        w = self._dequantized_weight(lin)
        kept_w = self._keeps_weight(name, input_grad, keep)
        if not kept_w:
            tl.free(w)
        for handle in (x_d, xa, a, b):  # (a, b: None for an fp32 computation)
            tl.keep(handle)
        tl.free(xa, a, b, x_d if x_d != x else None)
        if last:  # the recomputation stops when the function's saved tensors are packed
            out = self._replace(out, None)
        saved = self._saved({"x_d": x_d, "xa": xa, "a": a, "b": b, "mask": mask}, keep)
        if kept_w:
            saved["w"] = w
        return out, saved

    def _cast(self, elements: int, made: int | None = None) -> int | None:
        """``.to(dtype)`` of an fp32 tensor of ``elements`` values: a new tensor in the compute dtype,
        then ``made`` (the fp32 tensor the pass made for it, if any) goes; for an fp32 computation
        the tensor itself (None for a parameter: nothing new)."""
        if self.c == LORA_BYTES:
            return made
        return self._replace(made, self.tl.alloc(self.c * elements))

    def _scaled_b(self, lin: Linear) -> int | None:
        """``(lora_b * scale).to(dtype)``: the fp32 product, then its cast."""
        elements = lin.out_features * self.shape.r
        return self._cast(elements, self.tl.alloc(LORA_BYTES * elements))

    def _fp32_grad(self, elements: int) -> None:
        """An adapter gradient from ``lora_kernels._mm_fp32``: on a GPU the product writes fp32;
        elsewhere it is made in the compute dtype, then cast."""
        low = self.tl.alloc(self.c * elements) if not self.cuda and self.c != LORA_BYTES else None
        self._param_grad(LORA_BYTES * elements)
        self.tl.free(low)

    def _saved(self, saved: dict[str, int | None], keep: bool) -> dict[str, int]:
        """The tensors autograd keeps; a checkpointed forward keeps none of them."""
        saved = {k: v for k, v in saved.items() if v is not None}
        if not keep:
            self.tl.free(*saved.values())
            return {}
        return saved

    def linear_backward(self, name: str, saved: dict[str, int], grad: int, input_grad: bool) -> int | None:
        """The input's gradient (compute dtype), or None when the input needs none."""
        tl, t, c, lin = self.tl, self.t, self.c, self.linear[name]
        if name in self.targeted and self.fused:
            return self._fused_backward(lin, saved, input_grad)
        g_x = None
        if name in self.targeted:  # the adapter's branch runs first: it was created last
            g_scaled = self._pending.pop(name, None)
            if g_scaled is None:
                g_scaled = self._lora_output_grad(lin)
            g_r = tl.alloc(LORA_BYTES * self.shape.r * t)  # lora_B's input gradient
            self._param_grad(LORA_BYTES * self.shape.r * lin.out_features)
            tl.free(g_scaled, saved.get("a_out"))
            if input_grad:
                g_x = tl.alloc(LORA_BYTES * lin.in_features * t)  # lora_A's input gradient
            self._param_grad(LORA_BYTES * self.shape.r * lin.in_features)
            tl.free(g_r, saved.get("a_in"))
            if g_x is not None and "mask" in saved:
                g_x = self._replace(g_x, tl.alloc(LORA_BYTES * lin.in_features * t))  # dropout's backward
            tl.free(saved.get("mask"))
            if g_x is not None:
                g_x = self._replace(g_x, tl.alloc(c * lin.in_features * t))  # back to the compute dtype
        if input_grad:
            w = self._dequantized_weight(lin)
            base = tl.alloc(c * lin.in_features * t)
            tl.free(w)
            g_x = base if g_x is None else self._accumulate(g_x, base)
        return g_x

    def _fused_backward(self, lin: Linear, saved: dict[str, int], input_grad: bool) -> int | None:
        tl, t, c, r = self.tl, self.t, self.c, self.shape.r
        gb = tl.alloc(c * r * t)  # g @ scale·B
        for rows in (lin.in_features, lin.out_features):  # dA, dB in fp32
            self._fp32_grad(r * rows)
        # The input gradients, whether the input needs one or not (autograd drops them then).
        g_d = None
        kept = saved.pop("w", None)  # the weight its forward kept, or dequantized again
        if self.shape.dropout > 0:  # the dropped-out input's own gradient, then the weight's product apart
            g_d = tl.alloc(c * lin.in_features * t)
            w = kept if kept is not None else self._dequantized_weight(lin)
            g_x = tl.alloc(c * lin.in_features * t)
        else:  # the adapter's term, then the weight's product added in
            g_x = tl.alloc(c * lin.in_features * t)
            w = kept if kept is not None else self._dequantized_weight(lin)
        tl.free(w)
        tl.free(gb, *[saved[k] for k in ("x_d", "xa", "a", "b") if k in saved])
        if not input_grad:
            tl.free(g_x, g_d)
            return None
        if g_d is not None:  # dropout's backward
            g_d = self._replace(g_d, tl.alloc(c * lin.in_features * t))
            g_x = self._accumulate(g_x, g_d)
        tl.free(saved.get("mask"))
        return g_x

    # --- projections of one input: lora_kernels.LoRA4bitGroupFunction ------------------------

    def _group(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """The projections of ``names`` (one of lora_kernels.GROUPS: q/k/v, gate/up) that one
        LoRA4bitGroupFunction computes, in the model's order: the fused adapters among them, two or
        more, when no dropout applies (with it each has its own mask, so each its own function).
        Empty where each projection computes its own output."""
        if not (self.fused and self.s.get("lora_groups") and self.shape.dropout == 0):
            return ()
        members = tuple(name for name in names if name in self.targeted)
        return members if len(members) > 1 else ()

    def projections_forward(self, names: tuple[str, ...], x: int, input_grad: bool, keep: bool,
                            saved: dict[str, Any]) -> list[int]:
        """The projections ``names`` of input ``x``, called in this order: their outputs. A group's
        first member computes every member's output (lora_kernels._Group), the others take theirs."""
        group, outs = self._group(names), {}
        for name in names:
            if name in outs:
                continue
            if name in group:
                outs.update(zip(group, self._group_forward(group, x, input_grad, keep, saved)))
            else:
                outs[name], saved[name] = self.linear_forward(name, x, input_grad, keep)
        return [outs[name] for name in names]

    def projections_backward(self, names: tuple[str, ...], grads: dict[str, int], saved: dict[str, Any],
                             input_grad: bool) -> int | None:
        """Backward through the projections ``names`` of one input (as projections_forward called
        them); frees their outputs' gradients ``grads``; the input's gradient, summed.

        Autograd runs the function made last first: a group's, made at its first member's call,
        when the gradients of all its members are there (they wait until then)."""
        tl, group, g_in = self.tl, self._group(names), None
        for name in reversed(names):
            if name in group[1:]:
                continue
            if name in group:
                g_x = self._group_backward(group, saved[name], input_grad)
                tl.free(*(grads[member] for member in group))
            else:
                g_x = self.linear_backward(name, saved[name], grads[name], input_grad)
                tl.free(grads[name])
            if g_x is not None:
                g_in = g_x if g_in is None else self._accumulate(g_in, g_x)
        return g_in

    def _group_forward(self, group: tuple[str, ...], x: int, input_grad: bool, keep: bool,
                       saved: dict[str, Any]) -> list[int]:
        """LoRA4bitGroupFunction's forward: its outputs; what it saves goes to ``saved`` under the
        first member's name."""
        tl, t, c, r = self.tl, self.t, self.c, self.shape.r
        lins = [self.linear[name] for name in group]
        rank, width = r * len(lins), lins[0].in_features
        a_all = self._cast(rank * width, tl.alloc(LORA_BYTES * rank * width))  # the A's stacked (cat), cast
        xa = tl.alloc(c * rank * t)  # the input times every A, one product
        outs, bs, weights = [], [], {}
        for i, (name, lin) in enumerate(zip(group, lins)):
            bs.append(self._scaled_b(lin))
            # its adapter's term (from xa's columns), then the weight's product added in
            outs.append(tl.alloc(c * lin.out_features * t))
            w = self._dequantized_weight(lin)
            if self._keeps_weight(name, input_grad, keep):
                weights[f"w{i}"] = w  # kept for backward
            else:
                tl.free(w)
        kept = {"x": x, "xa": xa, "a": a_all, **{f"b{i}": b for i, b in enumerate(bs)}}
        for handle in kept.values():
            tl.keep(handle)
        tl.free(xa, a_all, *bs)
        saved[group[0]] = {**self._saved(kept, keep), **weights}
        for name in group[1:]:
            saved[name] = {}
        return outs

    def _group_backward(self, group: tuple[str, ...], saved: dict[str, int], input_grad: bool) -> int | None:
        """LoRA4bitGroupFunction's backward: one input gradient for the whole group."""
        tl, t, c, r = self.tl, self.t, self.c, self.shape.r
        lins = [self.linear[name] for name in group]
        rank, width = r * len(lins), lins[0].in_features
        gbs = []
        for lin in lins:  # per member: g @ scale·B, then B's gradient in fp32
            gbs.append(tl.alloc(c * r * t))
            self._fp32_grad(r * lin.out_features)
        gb = tl.alloc(c * rank * t)  # those, concatenated
        # Every A's gradient is one fp32 product whose row blocks autograd puts in the A's .grad
        # (views of it: the first micro-batch's .grad tensors share its memory, a later one's are
        # added to in place and it goes), so it is one gradient of the stacked A's size.
        self._fp32_grad(rank * width)
        g_x = None
        kept = [saved.pop(f"w{i}", None) for i in range(len(lins))]  # what forward kept, else dequantized again
        if input_grad:
            g_x = tl.alloc(c * width * t)  # gb @ the A's, then each weight's product added in
            for lin, w in zip(lins, kept):
                tl.free(w if w is not None else self._dequantized_weight(lin))
        tl.free(*gbs, gb, *saved.values())
        return g_x

    def _lora_output_grad(self, lin: Linear) -> int:
        """PEFT's adapter output gradient, through the cast back and the scaling (fp32)."""
        g32 = self.tl.alloc(LORA_BYTES * lin.out_features * self.t)
        g_scaled = self.tl.alloc(LORA_BYTES * lin.out_features * self.t)
        self.tl.free(g32)
        return g_scaled

    def _accumulate(self, buffer: int, new: int) -> int:
        """Autograd adds a second gradient for the same tensor to the first one, into a new tensor."""
        total = self.tl.alloc(self.tl.size(buffer))
        self.tl.free(buffer, new)
        return total

    def _param_grad(self, nbytes: int) -> None:
        if self.tl.in_pool:  # a replay: autograd's gradient, added into the .grad kept for the graphs at its end
            self._graph_grads.append(self.tl.alloc(nbytes))
        elif self.grads_present:  # a later micro-batch: the new gradient is added in place to .grad
            self.tl.free(self.tl.alloc(nbytes))
        else:
            self.grad_handles.append(self.tl.alloc(nbytes, "gradients"))

    def _replace(self, old: int | None, new: int | None) -> int | None:
        self.tl.free(old)
        return new

    # --- RMSNorm -------------------------------------------------------------------------------

    def norm_forward(self, x: int | None, width: int, rows: int, input_grad: bool, keep: bool,
                     fused: bool | None = None) -> tuple[int, dict[str, int]]:
        """x.float(), pow, mean, + eps, rsqrt, product, cast back, times the (frozen) weight.

        ``fused`` (default: whether the fused kernels are in use): liger-kernel's
        ``LigerRMSNormFunction``, one kernel that writes the output and an fp32 1/RMS per row and
        keeps those and its input ``x`` itself (not an fp32 copy) for backward.
        """
        tl, c = self.tl, self.c
        if self.kernels is not None if fused is None else fused:
            out = tl.alloc(c * width * rows)
            rs = tl.alloc(4 * rows)
            saved = {"x": tl.keep(x), "rs": tl.keep(rs)} if input_grad and keep else {}
            tl.free(rs)
            return out, saved
        x32 = tl.alloc(4 * width * rows)
        sq = tl.alloc(4 * width * rows)
        var = tl.alloc(4 * rows)
        tl.free(sq)
        var_eps = tl.alloc(4 * rows)
        tl.free(var)
        rs = tl.alloc(4 * rows)
        tl.free(var_eps)
        normed = tl.alloc(4 * width * rows)
        saved = {"x32": x32, "rs": rs} if input_grad else {}
        for handle in saved.values():
            tl.keep(handle)
        tl.free(x32, rs)
        low = tl.alloc(c * width * rows)
        tl.free(normed)
        out = tl.alloc(c * width * rows)
        tl.free(low)
        return out, self._saved(saved, keep)

    def norm_backward(self, grad: int, width: int, rows: int, saved: dict[str, int]) -> int:
        """The input's gradient; ``grad`` (the output's) belongs to the caller."""
        tl, c = self.tl, self.c
        if "x" in saved:  # liger-kernel's: in place over ``grad``, or into a new tensor (zeros_like)
            assert self.kernels is not None
            out = tl.ref(grad) if self.kernels.norm_in_place else tl.alloc(c * width * rows)
            tl.free(*saved.values())
            return out
        g_low = tl.alloc(c * width * rows)  # through the weight product
        g32 = tl.alloc(4 * width * rows)  # through the cast
        tl.free(g_low)
        g_x = tl.alloc(4 * width * rows)  # x's gradient through x * rsqrt
        prod = tl.alloc(4 * width * rows)  # rsqrt's: (g * x).sum(-1)
        tl.free(prod, g32)
        # mean's backward expands; pow's computes grad * (2 * x.pow(1)) in three steps
        pow_work = [tl.alloc(4 * width * rows) for _ in range(4)]
        tl.free(*pow_work, *saved.values())  # added into g_x
        out = tl.alloc(c * width * rows)
        tl.free(g_x)
        return out

    # --- attention -----------------------------------------------------------------------------

    def kernel(self) -> str:
        """Which attention kernel runs: flash (SDPA without a mask), efficient (with one), eager."""
        info, shape = self.info, self.shape
        if shape.attention == "eager":
            return "eager"
        masked = shape.padded or (info.sliding_window is not None and shape.seq > info.sliding_window)
        if shape.attention == "sdpa" and (masked or info.head_dim > 256):
            return "efficient"
        return "flash"

    def _rope(self, width: int) -> int:
        """x * cos + rotate_half(x) * sin: saves only cos and sin."""
        tl, t, c = self.tl, self.t, self.c
        with_cos = tl.alloc(c * width * t)
        neg = tl.alloc(c * width * t // 2)
        rotated = tl.alloc(c * width * t)
        tl.free(neg)
        with_sin = tl.alloc(c * width * t)
        tl.free(rotated)
        out = tl.alloc(c * width * t)
        tl.free(with_cos, with_sin)
        return out

    def _fused_rope_backward(self, width: int, grad: int, copy: bool) -> int:
        """``LigerRopeFunction``'s backward rotates the gradient where it is, after making it
        contiguous in (batch, position, head) order: a copy unless the attention kernel returned it
        that way (FlashAttention and the memory-efficient kernel do; repeat_kv's sum and eager's
        products do not)."""
        if not copy:
            return grad
        g = self.tl.alloc(self.c * width * self.t)
        self.tl.free(grad)
        return g

    def _rope_backward(self, width: int, grad: int) -> int:
        tl, t, c = self.tl, self.t, self.c
        g_sin = tl.alloc(c * width * t)
        halves = (tl.alloc(c * width * t), tl.alloc(c * width * t))  # slices' backward: zeros, then copy
        tl.free(g_sin)
        g = tl.alloc(c * width * t)
        tl.free(*halves, grad)
        return g

    def _qk_norm_shape(self, heads: int) -> tuple[int, int]:
        """(width, rows) of a q or k norm: per head (Qwen3, Gemma 3) or the whole projection (OLMo 2)."""
        if self.info.qk_norm_full:
            return heads * self.info.head_dim, self.t
        return self.info.head_dim, self.t * heads

    def attention_forward(self, x: int, input_grad: bool, keep: bool) -> tuple[int, dict[str, Any]]:
        info, tl, t, c, shape = self.info, self.tl, self.t, self.c, self.shape
        q_w, kv_w = info.heads * info.head_dim, info.kv_heads * info.head_dim
        state: dict[str, Any] = {"linears": {}, "qk_norm": {}}
        if "qkv_proj" in self.linear:
            qkv, state["linears"]["qkv_proj"] = self.linear_forward("qkv_proj", x, input_grad, keep)
            q, k, v = None, None, qkv  # q, k and v are views of one tensor; v keeps it alive
        else:
            q, k, v = self.projections_forward(QKV, x, input_grad, keep, state["linears"])
        if info.qk_norm:
            fused = self.kernels is not None and self.kernels.qk_norm
            q_n, state["qk_norm"]["q"] = self.norm_forward(q, *self._qk_norm_shape(info.heads), True, keep, fused)
            k_n, state["qk_norm"]["k"] = self.norm_forward(k, *self._qk_norm_shape(info.kv_heads), True, keep, fused)
            tl.free(q, k)
            q, k = q_n, k_n
        if self.kernels is not None and self.kernels.rope:
            # LigerRopeFunction rotates q and k where they are; slices of a fused qkv output are
            # made contiguous first (copies). It keeps only cos and sin.
            if q is None:
                q, k = tl.alloc(c * q_w * t), tl.alloc(c * kv_w * t)
            q_rot, k_rot = q, k
        else:
            q_rot = self._rope(q_w)
            k_rot = self._rope(kv_w)
            tl.free(q, k)
        kernel = self.kernel()
        kept = [q_rot, k_rot, v]
        per_seq = shape.batch * shape.seq * shape.seq
        if kernel == "flash":  # FlashAttention-2, grouped-query heads handled natively
            out = tl.alloc(c * q_w * t)
            kept += [out, tl.alloc(4 * info.heads * t)]  # the output and the fp32 log-sum-exp
        else:
            if info.kv_heads != info.heads:  # transformers repeats k and v to every query head
                kept += [tl.alloc(c * q_w * t), tl.alloc(c * q_w * t)]
            if kernel == "efficient":
                bias = tl.alloc(c * per_seq)  # the boolean mask as an additive bias, per layer
                out = tl.alloc(c * q_w * t)
                lse = tl.alloc(4 * info.heads * shape.batch * _ceil_div(shape.seq, 32) * 32)
                kept += [bias, out, lse]
            else:  # eager: scores, scaled, masked, softmax in fp32, cast back, probs @ v, transposed
                scores = tl.alloc(c * info.heads * per_seq)
                scaled = tl.alloc(c * info.heads * per_seq)
                tl.free(scores)
                masked = tl.alloc(c * info.heads * per_seq)
                tl.free(scaled)
                probs32 = tl.alloc(4 * info.heads * per_seq)
                tl.free(masked)
                probs = tl.alloc(c * info.heads * per_seq)
                raw = tl.alloc(c * q_w * t)
                out = tl.alloc(c * q_w * t)
                tl.free(raw)
                kept += [probs32, probs, out]
        if keep:
            for handle in kept:
                tl.keep(handle)
        state["attention"] = kept if keep else []
        o, state["linears"]["o_proj"] = self.linear_forward("o_proj", out, True, keep)
        tl.free(*kept)  # the Python references go when attention returns
        return o, state

    def attention_backward(self, grad: int, state: dict[str, Any], input_grad: bool) -> int | None:
        """``grad`` belongs to the caller (it is the residual stream's gradient too)."""
        info, tl, t, c = self.info, self.tl, self.t, self.c
        q_w, kv_w = info.heads * info.head_dim, info.kv_heads * info.head_dim
        saved = state["linears"]
        g_out = self.linear_backward("o_proj", saved["o_proj"], grad, True)
        kernel = self.kernel()
        grouped = info.kv_heads != info.heads
        dq = tl.alloc(c * q_w * t)
        if kernel == "flash":
            dk, dv = tl.alloc(c * kv_w * t), tl.alloc(c * kv_w * t)
            if self.cuda:
                work = [tl.alloc(4 * q_w * t), tl.alloc(4 * info.heads * t)]  # dq accumulator, row sums
                if grouped:
                    work += [tl.alloc(c * q_w * t), tl.alloc(c * q_w * t)]  # dk, dv per query head
                tl.free(*work)
        else:
            if kernel == "eager":
                per_head = info.heads * self.shape.batch * self.shape.seq * self.shape.seq
                g_probs = tl.alloc(c * per_head)
                dk_full = tl.alloc(c * q_w * t)
                g32 = tl.alloc(4 * per_head)
                tl.free(g_probs)
                g_scores = tl.alloc(4 * per_head)
                tl.free(g32)
                g_low = tl.alloc(c * per_head)
                tl.free(g_scores)
                dv_full = tl.alloc(c * q_w * t)
                tl.free(g_low)
            else:
                dk_full, dv_full = tl.alloc(c * q_w * t), tl.alloc(c * q_w * t)
                if self.cuda:
                    tl.free(tl.alloc(4 * q_w * t))  # the kernel's fp32 accumulator
            if grouped:  # repeat_kv's backward sums the copies
                dk, dv = tl.alloc(c * kv_w * t), tl.alloc(c * kv_w * t)
                tl.free(dk_full, dv_full)
            else:
                dk, dv = dk_full, dv_full
        tl.free(g_out, *state["attention"])
        if self.kernels is not None and self.kernels.rope:
            g_k = self._fused_rope_backward(kv_w, dk, kernel == "eager" or (kernel == "efficient" and grouped))
            g_q = self._fused_rope_backward(q_w, dq, kernel == "eager")
        else:
            g_k = self._rope_backward(kv_w, dk)
            g_q = self._rope_backward(q_w, dq)
        if info.qk_norm:
            g_k = self._replace(g_k, self.norm_backward(g_k, *self._qk_norm_shape(info.kv_heads), state["qk_norm"]["k"]))
            g_q = self._replace(g_q, self.norm_backward(g_q, *self._qk_norm_shape(info.heads), state["qk_norm"]["q"]))
        if "qkv_proj" in saved:
            g_qkv = tl.alloc(c * (q_w + 2 * kv_w) * t)  # the three gradients, concatenated
            tl.free(g_q, g_k, dv)
            g_in = self.linear_backward("qkv_proj", saved["qkv_proj"], g_qkv, input_grad)
            tl.free(g_qkv)
            return g_in
        return self.projections_backward(QKV, dict(zip(QKV, (g_q, g_k, dv))), saved, input_grad)

    # --- MLP and the decoder layer -------------------------------------------------------------

    def mlp_forward(self, x: int, keep: bool, recompute: bool = False) -> tuple[int | None, dict[str, Any]]:
        """The gated MLP. ``recompute``: a checkpointed layer's recomputation, which stops after
        the last tensor the layer saves (then there is no output)."""
        tl, t, c, i = self.tl, self.t, self.c, self.info.intermediate_size
        saved: dict[str, Any] = {}
        if self.kernels is not None:
            # liger-kernel's LigerSiLUMulFunction (GEGLU's alike): one kernel writes act(gate) * up
            # and keeps gate and up; the halves of a fused gate_up output are made contiguous first
            if "gate_up_proj" in self.linear:
                gate_up, saved["gate_up_proj"] = self.linear_forward("gate_up_proj", x, True, keep)
                gate, up = tl.alloc(c * i * t), tl.alloc(c * i * t)
                prod = tl.alloc(c * i * t)
                tl.free(gate_up)
            else:
                gate, up = self.projections_forward(GATE_UP, x, True, keep, saved)
                prod = tl.alloc(c * i * t)
            kept = [gate, up]
        elif "gate_up_proj" in self.linear:
            gate_up, saved["gate_up_proj"] = self.linear_forward("gate_up_proj", x, True, keep)
            act = tl.alloc(c * i * t)  # silu(gate) keeps its input: the fused output
            kept = [gate_up, act]
            prod = tl.alloc(c * i * t)
        elif self._group(GATE_UP):  # gate_proj's call computes up_proj's output too
            gate, up = self.projections_forward(GATE_UP, x, True, keep, saved)
            act = tl.alloc(c * i * t)  # silu keeps its input
            kept = [gate, act, up]  # the product keeps both factors
            prod = tl.alloc(c * i * t)
        else:
            gate, saved["gate_proj"] = self.linear_forward("gate_proj", x, True, keep)
            act = tl.alloc(c * i * t)  # silu keeps its input
            up, saved["up_proj"] = self.linear_forward("up_proj", x, True, keep)
            kept = [gate, act, up]  # the product keeps both factors
            prod = tl.alloc(c * i * t)
        if keep:
            for handle in kept:
                tl.keep(handle)
        saved["mlp"] = kept if keep else []
        tl.free(*kept)
        stop = recompute and self.info.norms_per_layer == 2
        if stop and "down_proj" not in self.targeted:
            tl.free(prod)
            saved["down_proj"] = {}
            return None, saved
        down, saved["down_proj"] = self.linear_forward("down_proj", prod, True, keep, last=stop)
        tl.free(prod)
        return down, saved

    def mlp_backward(self, grad: int, saved: dict[str, Any]) -> int:
        """``grad`` belongs to the caller."""
        tl, t, c, i = self.tl, self.t, self.c, self.info.intermediate_size
        g_prod = self.linear_backward("down_proj", saved["down_proj"], grad, True)
        if self.kernels is not None:
            return self._fused_mlp_backward(g_prod, saved)
        g_act, g_up = tl.alloc(c * i * t), tl.alloc(c * i * t)
        tl.free(g_prod)
        if "gate_up_proj" in self.linear:
            g_gate = tl.alloc(c * i * t)  # silu's backward
            tl.free(g_act)
            g_gu = tl.alloc(2 * c * i * t)  # the two halves, concatenated
            tl.free(g_up, g_gate, *saved["mlp"])
            g_x = self.linear_backward("gate_up_proj", saved["gate_up_proj"], g_gu, True)
            tl.free(g_gu)
            return g_x
        gate, act, up = saved["mlp"]
        tl.free(act, up)
        if self._group(GATE_UP):  # the group's function waits for gate's gradient: silu's backward first
            g_gate = tl.alloc(c * i * t)
            tl.free(g_act, gate)
            return self.projections_backward(GATE_UP, {"gate_proj": g_gate, "up_proj": g_up}, saved, True)
        g_x = self.linear_backward("up_proj", saved["up_proj"], g_up, True)
        tl.free(g_up)
        g_gate = tl.alloc(c * i * t)  # silu's backward
        tl.free(g_act, gate)
        g_x2 = self.linear_backward("gate_proj", saved["gate_proj"], g_gate, True)
        tl.free(g_gate)
        return self._accumulate(g_x, g_x2)

    def _fused_mlp_backward(self, g_prod: int, saved: dict[str, Any]) -> int:
        """liger-kernel's backward writes the gradients of gate and up over the saved gate and up."""
        tl, t, c, i = self.tl, self.t, self.c, self.info.intermediate_size
        gate, up = saved["mlp"]
        tl.free(g_prod)
        if "gate_up_proj" in self.linear:
            g_gu = tl.alloc(2 * c * i * t)  # the two halves, concatenated
            tl.free(gate, up)
            g_x = self.linear_backward("gate_up_proj", saved["gate_up_proj"], g_gu, True)
            tl.free(g_gu)
            return g_x
        return self.projections_backward(GATE_UP, {"gate_proj": gate, "up_proj": up}, saved, True)

    def layer_forward(self, x: int, input_grad: bool, keep: bool, recompute: bool = False) -> tuple[int | None, dict[str, Any]]:
        """One decoder layer on the residual stream ``x``: norm, attention, add, norm, MLP, add.

        Gemma 2/3 also normalise the attention and MLP outputs (four norms per layer). A
        recomputation (``recompute``) ends with the last saved tensor: no residual add, no output.
        """
        tl, t, c, h = self.tl, self.t, self.c, self.info.hidden_size
        post = self.info.norms_per_layer > 2
        saved: dict[str, Any] = {}
        n1, saved["n1"] = self.norm_forward(x, h, t, input_grad, keep)
        attn, saved["attn"] = self.attention_forward(n1, input_grad, keep)
        tl.free(n1)
        if post:
            attn = self._post(attn, saved, "post_attn", keep)
        h1 = tl.alloc(c * h * t)
        tl.free(attn)
        n2, saved["n2"] = self.norm_forward(h1, h, t, True, keep)
        mlp, saved["mlp"] = self.mlp_forward(n2, keep, recompute)
        tl.free(n2)
        if post:
            mlp = self._post(mlp, saved, "post_mlp", keep)
        if recompute:
            tl.free(h1, mlp)
            return None, saved
        out = tl.alloc(c * h * t)
        tl.free(h1, mlp)
        return out, saved

    def _post(self, x: int | None, saved: dict[str, Any], key: str, keep: bool) -> int:
        out, saved[key] = self.norm_forward(x, self.info.hidden_size, self.t, True, keep)
        self.tl.free(x)
        return out

    def layer_backward(self, grad: int, saved: dict[str, Any], input_grad: bool) -> int | None:
        """Returns the gradient of the layer's input: the residual stream's, with both branches added."""
        tl, h, t = self.tl, self.info.hidden_size, self.t
        post_mlp, post_attn = saved.get("post_mlp"), saved.get("post_attn")
        g = self.norm_backward(grad, h, t, post_mlp) if post_mlp else grad
        g_n2 = self.mlp_backward(g, saved["mlp"])
        if post_mlp:
            tl.free(g)
        g_h1 = self.norm_backward(g_n2, h, t, saved["n2"])
        tl.free(g_n2)
        grad = self._accumulate(grad, g_h1)
        g = self.norm_backward(grad, h, t, post_attn) if post_attn else grad
        g_n1 = self.attention_backward(g, saved["attn"], input_grad)
        if post_attn:
            tl.free(g)
        if not input_grad:
            tl.free(grad)
            return None
        g_x = self.norm_backward(g_n1, h, t, saved["n1"])
        tl.free(g_n1)
        return self._accumulate(grad, g_x)

    # --- the loss ------------------------------------------------------------------------------

    def loss(self, hidden: int) -> int:
        """The engine's loss_sum and its backward; returns the final hidden states' gradient."""
        info, tl, t, c, shape = self.info, self.tl, self.t, self.c, self.shape
        v, h = info.vocab_size, info.hidden_size
        n = shape.batch * (shape.seq - 1)
        if self.s["loss_impl"] == "chunked" and not info.final_logit_softcapping:
            return self._chunked_loss(hidden, n)
        logits = tl.alloc(c * t * v, "loss")
        tl.free(hidden)  # the model's output goes with the call
        capped = None
        if info.final_logit_softcapping:  # logits / cap, tanh (kept), * cap
            scaled = tl.alloc(c * t * v, "loss")
            capped = tl.keep(tl.alloc(c * t * v, "loss"))
            tl.free(scaled)
            logits = self._replace(logits, tl.alloc(c * t * v, "loss"))
            tl.free(capped)  # autograd's reference remains
        f32 = tl.alloc(4 * n * v, "loss")  # logits[:, :-1].float()
        log_probs = tl.alloc(4 * n * v, "loss")
        tl.free(f32, logits)
        tl.phase = "loss backward"
        g = tl.alloc(4 * n * v, "loss")  # nll_loss's backward
        g_in = tl.alloc(4 * n * v, "loss")  # log_softmax's backward
        tl.free(g, log_probs)
        g_low = tl.alloc(c * n * v, "loss")
        tl.free(g_in)
        g_full = tl.alloc(c * t * v, "loss")  # the slice [:, :-1] undone
        tl.free(g_low)
        if capped is not None:
            g_full = self._replace(g_full, tl.alloc(c * t * v, "loss"))
            tl.free(capped)
        g_hidden = tl.alloc(c * t * h)  # through the frozen output head
        tl.free(g_full)
        return g_hidden

    def _chunked_loss(self, hidden: int, n: int) -> int:
        """``losses.FrozenHeadCrossEntropy``: per chunk of tokens, the logits in fp32, their
        log-sum-exp, and at once the hidden states' gradient, written into one buffer that is the
        only tensor kept for backward; on a GPU with Triton, the logits in the compute dtype only.
        Every position is counted as learned (the worst case)."""
        tl, c = self.tl, self.c
        v, h = self.info.vocab_size, self.info.hidden_size
        # hidden[:, :-1].reshape; with every position learned no index_select follows. The final
        # norm's output goes (the norm keeps its input).
        selected = tl.alloc(c * n * h) if self.shape.batch > 1 else tl.ref(hidden)
        tl.free(hidden)
        grad_hidden = tl.keep(tl.alloc(c * n * h))
        chunk = loss_chunk_tokens(v)
        # With the CUDA graphs the chunks' temporaries come from their pool (GraphContext.scratch).
        with tl.graph(CUBLAS_WORKSPACE) if self.graphs else contextlib.nullcontext():
            self._loss_chunks(n, chunk)
        tl.free(selected, grad_hidden)  # autograd's reference to grad_hidden remains
        tl.phase = "loss backward"
        scaled = tl.alloc(c * n * h)  # the stored gradient times the incoming one
        tl.free(grad_hidden)
        g_hidden = tl.alloc(c * self.t * h)  # the slice's backward
        tl.free(scaled)
        return g_hidden

    def _loss_chunks(self, n: int, chunk: int) -> None:
        tl, c = self.tl, self.c
        v, h = self.info.vocab_size, self.info.hidden_size
        for start in range(0, n, chunk):  # one chunk's logits alive at a time
            k = min(chunk, n - start)
            if self.s.get("loss_kernel"):  # ce_kernel.py: loss and gradient over the logits in place
                logits = tl.alloc(c * k * v, "loss")
                tl.free(tl.alloc(4 * k), logits)  # each row's loss; the gradient goes straight into its buffer
                continue
            low = tl.alloc(c * k * v, "loss")  # h @ W.T
            logits = tl.alloc(4 * k * v, "loss")  # .float(); the exponentials are written over it
            tl.free(low)
            probs_low = tl.alloc(c * k * v, "loss")  # the probabilities, computed in place, cast
            tl.free(tl.alloc(c * k * h), probs_low)  # @ W, copied into the gradient buffer
            tl.free(logits)

    # --- the blocks of a split layer (offload.split_layer) and the graphs' replays ------------

    def block_forward(self, kind: str, x: int, input_grad: bool, keep: bool) -> tuple[int, dict[str, Any]]:
        """Norm and attention (``kind`` "attn") or norm and MLP ("mlp"); the residual add is outside."""
        tl, t, h = self.tl, self.t, self.info.hidden_size
        saved: dict[str, Any] = {}
        n, saved["norm"] = self.norm_forward(x, h, t, input_grad or kind == "mlp", keep)
        if kind == "attn":
            out, saved["attn"] = self.attention_forward(n, input_grad, keep)
        else:
            out, saved["mlp"] = self.mlp_forward(n, keep)
        tl.free(n)
        return out, saved

    def block_backward(self, kind: str, grad: int, saved: dict[str, Any], input_grad: bool) -> int | None:
        """The block input's gradient; ``grad`` belongs to the caller."""
        tl, t, h = self.tl, self.t, self.info.hidden_size
        if kind == "attn":
            g_n = self.attention_backward(grad, saved["attn"], input_grad)
            if not input_grad:
                return None
        else:
            g_n = self.mlp_backward(grad, saved["mlp"])
        g_x = self.norm_backward(g_n, h, t, saved["norm"])
        tl.free(g_n)
        return g_x

    def _tiles(self, kind: str) -> list[int] | None:
        """offload.token_tiles for a split layer's MLP block: the tokens of each range, or None."""
        t, tile = self.t, self.s.get("mlp_tile")
        if kind != "mlp" or not tile or t <= tile:
            return None
        size = -(-t // -(-t // tile))
        return [min(size, t - start) for start in range(0, t, size)]

    @contextlib.contextmanager
    def _tokens(self, n: int, first: bool):
        """Simulate a range of ``n`` tokens; after the ``first`` range the adapters' gradients exist."""
        t, present = self.t, self.grads_present
        self.t, self.grads_present = n, present or not first
        try:
            yield
        finally:
            self.t, self.grads_present = t, present

    def _forward_pass(self, kind: str, x: int, input_grad: bool) -> int | None:
        """A checkpointed pass under no_grad: its output (a replay's, copied out of the graph), or None
        for a split layer's block whose replay hands over the graph's buffer itself
        (LayerGraphs.transient_output: nothing new is allocated)."""
        tl, tiles = self.tl, self._tiles(kind)
        in_buffer = self.graphs and kind != "layer" and self.s.get("transient_outputs", False)
        if tiles is not None:  # each range's output is copied into one tensor
            with tl.graph(CUBLAS_WORKSPACE) if self.graphs else contextlib.nullcontext():
                out = tl.alloc(self.c * self.info.hidden_size * self.t)
                for i, n in enumerate(tiles):
                    with self._tokens(n, i == 0):
                        tl.free(self.block_forward(kind, x, input_grad, keep=False)[0])
            if not self.graphs:
                return out
            return None if in_buffer else tl.alloc(self.c * self.info.hidden_size * self.t)
        if not self.graphs:
            if kind == "layer":
                return self.layer_forward(x, input_grad, keep=False)[0]
            return self.block_forward(kind, x, input_grad, keep=False)[0]
        with tl.graph(CUBLAS_WORKSPACE):
            if kind == "layer":
                self.layer_forward(x, input_grad, keep=False)
            else:
                self.block_forward(kind, x, input_grad, keep=False)
        return None if in_buffer else tl.alloc(self.c * self.info.hidden_size * self.t)

    def _backward_pass(self, kind: str, x: int, grad: int, input_grad: bool) -> int | None:
        """A checkpointed pass recomputed and differentiated; the input's gradient."""
        tl = self.tl
        held = tl.ref(grad)  # the backward function holds the incoming gradient until it returns
        if self.graphs:
            with tl.graph(CUBLAS_WORKSPACE):
                self._checkpointed_backward(kind, x, tl.ref(grad), input_grad)
            g = tl.alloc(self.c * self.info.hidden_size * self.t) if input_grad else None
            self._graph_grads = []
        else:
            g = self._checkpointed_backward(kind, x, tl.ref(grad), input_grad)
        tl.free(held)
        return g

    def _checkpointed_backward(self, kind: str, x: int, grad: int, input_grad: bool) -> int | None:
        tl, tiles = self.tl, self._tiles(kind)
        if tiles is not None:
            # One range after another: recomputed, differentiated, its input's gradient copied out
            # (into a new tensor, or over the graph's gradient buffer) and its temporaries gone.
            g_in = tl.alloc(self.c * self.info.hidden_size * self.t) if input_grad and not self.graphs else None
            for i, n in enumerate(tiles):
                with self._tokens(n, i == 0):
                    out, saved = self.block_forward(kind, x, input_grad, keep=True)
                    tl.free(self.block_backward(kind, grad, saved, input_grad), out, *self._graph_grads)
                    self._graph_grads = []
            tl.free(grad)
            return g_in
        if kind == "layer":
            out, saved = self.layer_forward(x, input_grad, keep=True)
            g = self.layer_backward(grad, saved, input_grad=input_grad)  # takes ``grad``
        else:
            out, saved = self.block_forward(kind, x, input_grad, keep=True)
            g = self.block_backward(kind, grad, saved, input_grad)
            tl.free(grad)
        tl.free(out)
        return g

    def _offloaded(self, x: int) -> None:
        """A pass's input went to CPU memory; its GPU copy goes once the copy has run. With the graphs
        the host runs ahead, up to offload.LAYERS_AHEAD passes, and those inputs wait meanwhile."""
        if not self.graphs:
            self.tl.free(x)
            return
        self._in_flight.append(x)
        while len(self._in_flight) > LAYERS_AHEAD:
            self.tl.free(self._in_flight.pop(0))

    def _settle(self) -> None:
        self.tl.free(*self._in_flight)
        self._in_flight = []

    def _offloaded_layer_forward(self, x: int, input_grad: bool) -> int:
        """A layer under offload.py's checkpoint, whole or as its two blocks: its output."""
        tl, c, h, t = self.tl, self.c, self.info.hidden_size, self.t
        if not self.split:
            out = self._forward_pass("layer", x, input_grad)
            self._offloaded(x)
            return out
        a = self._forward_pass("attn", x, input_grad)
        h1 = tl.alloc(c * h * t)  # the residual add
        tl.free(a)  # (None: handed over in the graph's buffer)
        self._offloaded(x)
        m = self._forward_pass("mlp", h1, True)
        out = tl.alloc(c * h * t)
        tl.free(m)
        self._offloaded(h1)
        return out

    # --- the step ------------------------------------------------------------------------------

    def run(self, lump: bool = False) -> _Timeline:
        """One micro-step: forward through every layer, the loss, backward through every layer.

        ``lump``: simulate only the two first and two last layers; each middle layer is a lump of
        the bytes it keeps from its forward to its backward and of its adapters' gradients. Exact
        for the peak -- all middle layers are alike and what stays alive at a layer changes
        linearly with its depth, so the largest moment falls in an end layer or outside them --
        and what the suggestions' many estimates need to stay fast. No replay with it.
        """
        info, tl, t, c, shape = self.info, self.tl, self.t, self.c, self.shape
        h, layers = info.hidden_size, info.layers
        simulated = set(range(layers)) if not lump or layers <= 4 else {0, 1, layers - 2, layers - 1}
        tl.phase = "forward"
        batch = [tl.alloc(3 * 8 * t), tl.alloc(8 * shape.batch * (shape.seq - 1))]  # ids, mask, labels; shifted labels
        batch.append(tl.alloc(2 * c * info.head_dim * shape.seq, "activations"))  # RoPE's cos and sin
        kernel = self.kernel()
        if kernel != "flash":  # the 4-D mask: boolean for SDPA, additive for eager
            batch.append(tl.alloc((1 if kernel == "efficient" else c) * shape.batch * shape.seq * shape.seq, "activations"))
        x = tl.alloc(c * h * t)  # the embeddings
        embedded = tl.ref(x)  # the decoder's forward holds them (inputs_embeds) until it returns
        inputs, saved, kept_by_layer = [], [], 0
        for index in range(layers):
            input_grad = index > 0 or self.embeddings_need_grad
            if index not in simulated:  # what layer 1 kept, again
                saved.append(tl.alloc(kept_by_layer, "activations"))
                continue
            if self.offload:  # copied to pinned CPU memory, the GPU copy goes with its last reference
                x = self._offloaded_layer_forward(x, input_grad)
                saved.append({})
                continue
            before = tl.now
            out, layer_saved = self.layer_forward(x, input_grad, keep=not self.checkpointing)
            if self.checkpointing:  # the checkpoint keeps the layer's input
                inputs.append(tl.keep(x))
            tl.free(x)
            saved.append(layer_saved)
            if index == 1:
                kept_by_layer = tl.now - before  # its kept tensors (its output replaced its input)
            x = out
        self._settle()
        final, final_saved = self.norm_forward(x, h, t, True, True)
        tl.free(x, embedded)
        g = self.loss(final)
        g = self._replace(g, self.norm_backward(g, h, t, final_saved))
        tl.phase = "layer backward"
        grads = sum(self._grad_bytes(lin) for lin in info.linears if lin.name in self.targeted)
        prefetched = None  # offloaded: the next layer's input, fetched back while this one recomputes
        for index in reversed(range(layers)):
            input_grad = index > 0 or self.embeddings_need_grad
            layer_saved = saved[index]
            if index not in simulated:
                tl.free(layer_saved)
                if not self.grads_present and not self.graphs:
                    self.grad_handles.append(tl.alloc(grads, "gradients"))
                continue
            if self.offload:
                # offload.py: the input comes back to the GPU (on the side stream; already there when
                # the pass after fetched it), the previous pass's input is fetched, the pass runs
                # again and backward goes through it.
                def fetched():
                    return prefetched if prefetched is not None else tl.alloc(c * h * t, "activations", stream=1)

                if not self.split:
                    layer_input = fetched()
                    prefetched = tl.alloc(c * h * t, "activations", stream=1) if index > 0 else None
                    g_new = self._backward_pass("layer", layer_input, g, input_grad)
                    tl.free(g)
                    g = g_new
                    self._offloaded(layer_input)
                    continue
                mlp_input = fetched()
                prefetched = tl.alloc(c * h * t, "activations", stream=1)  # the attention block's input
                g_in = self._backward_pass("mlp", mlp_input, g, True)
                self._offloaded(mlp_input)
                g = self._accumulate(g, g_in)  # the residual add: h1's two gradients
                attn_input = prefetched
                prefetched = tl.alloc(c * h * t, "activations", stream=1) if index > 0 else None
                g_in = self._backward_pass("attn", attn_input, g, input_grad)
                self._offloaded(attn_input)
                if g_in is None:
                    tl.free(g)
                    g = None
                else:
                    g = self._accumulate(g, g_in)
                continue
            if self.checkpointing:
                # the recomputation starts when backward first needs a saved tensor: in down_proj's
                # adapter, after the gradient has passed the cast back and the scaling
                if "down_proj" in self.targeted and not self.fused:
                    self._pending["down_proj"] = self._lora_output_grad(self.linear["down_proj"])
                layer_input = inputs.pop()
                _, layer_saved = self.layer_forward(layer_input, input_grad, keep=True, recompute=True)
            g = self.layer_backward(g, layer_saved, input_grad=input_grad)
            if self.checkpointing:
                tl.free(layer_input)
        self._settle()
        tl.free(g, *batch)
        return tl

    def graph_buffers(self) -> None:
        """What the CUDA graphs keep for the whole run (layer_graphs.py): the fixed input and
        gradient tensors, the copies of RoPE's tables (and of the mask), and every adapter's .grad.
        (cuBLAS's workspaces are temporaries in their pool.)"""
        if not self.graphs:
            return
        tl, c, h, t, shape = self.tl, self.c, self.info.hidden_size, self.t, self.shape
        tl.alloc(2 * c * h * t, "graphs")
        tl.alloc(2 * c * self.info.head_dim * shape.seq, "graphs")
        if self.kernel() != "flash":
            tl.alloc((1 if self.kernel() == "efficient" else c) * shape.batch * shape.seq * shape.seq, "graphs")
        grads = sum(self._grad_bytes(lin) for lin in self.info.linears if lin.name in self.targeted)
        self.grad_handles.append(tl.alloc(grads * self.info.layers, "gradients"))

    def _grad_bytes(self, lin: Linear) -> int:
        """The bytes of one layer's gradients of this projection's adapter (fp32 A and B)."""
        granule = self.tl.granule
        return sum(-(-LORA_BYTES * self.shape.r * n // granule) * granule for n in (lin.in_features, lin.out_features))


# ----------------------------------------------------------------------------------------------
# Reserved memory: PyTorch's caching allocator, replayed


class _CachingAllocator:
    """PyTorch's CUDA caching allocator, reduced to the rules that decide its reserved memory.

    From ``c10/cuda/CUDACachingAllocator.cpp`` (default settings): sizes round up to 512 bytes;
    requests up to 1 MiB come from 2 MiB segments (the small pool), requests up to 10 MiB from
    20 MiB segments, larger ones from segments of their own size rounded up to 2 MiB. A request
    takes the smallest cached free block that fits; the rest is split off when it is at least
    512 bytes (small pool) or more than 1 MiB (large pool). Freed blocks merge with free
    neighbours in their segment. A block serves only the stream it was allocated on, so each stream
    has its own pools. Segments are never given back, so reserved memory only grows: what
    fragmentation costs is the difference to the allocated bytes.
    """

    SMALL = 1 << 20
    SMALL_SEGMENT = 2 << 20
    MEDIUM_SEGMENT = 20 << 20
    LARGE_MIN = 10 << 20
    LARGE_ROUND = 2 << 20

    def __init__(self) -> None:
        self.reserved = 0
        self._segments = 0
        self._free: dict[tuple[int, bool], list[tuple[int, int, int]]] = {}  # (stream, small) -> (size, segment, offset)
        self._block_at: dict[tuple[int, int], int] = {}  # (segment, offset) -> size, every block
        self._free_at: set[tuple[int, int]] = set()
        self._free_ending: dict[tuple[int, int], int] = {}  # (segment, end) -> offset, free blocks
        self._segment_pool: dict[int, tuple[int, bool]] = {}  # segment -> (stream, small)
        self._segment_size: dict[int, int] = {}
        self._live: dict[int, tuple[int, int]] = {}  # handle -> (segment, offset)

    def malloc(self, handle: int, size: int, stream: int = 0) -> None:
        size = _granule(size)
        small = size <= self.SMALL
        pool = self._free.setdefault((stream, small), [])
        index = bisect.bisect_left(pool, (size, -1, -1))
        if index < len(pool):
            block_size, segment, offset = pool.pop(index)
            self._free_at.discard((segment, offset))
            del self._free_ending[(segment, offset + block_size)]
        else:
            if small:
                block_size = self.SMALL_SEGMENT
            elif size < self.LARGE_MIN:
                block_size = self.MEDIUM_SEGMENT
            else:
                block_size = _ceil_div(size, self.LARGE_ROUND) * self.LARGE_ROUND
            segment, offset = self._segments, 0
            self._segments += 1
            self._segment_pool[segment] = (stream, small)
            self._segment_size[segment] = block_size
            self.reserved += block_size
        rest = block_size - size
        if rest >= ALLOCATION_GRANULE if small else rest > self.SMALL:
            self._block_at[(segment, offset)] = size
            self._insert_free(segment, offset + size, rest)
        else:
            self._block_at[(segment, offset)] = block_size
        self._live[handle] = (segment, offset)

    def free(self, handle: int) -> None:
        segment, offset = self._live.pop(handle)
        size = self._block_at.pop((segment, offset))
        following = (segment, offset + size)
        if following in self._free_at:  # merge with the next free block
            size += self._take_free(*following)
        previous = self._free_ending.get((segment, offset))
        if previous is not None:  # merge with the previous free block
            size += self._take_free(segment, previous)
            offset = previous
        self._insert_free(segment, offset, size)

    def _insert_free(self, segment: int, offset: int, size: int) -> None:
        self._block_at[(segment, offset)] = size
        self._free_at.add((segment, offset))
        self._free_ending[(segment, offset + size)] = offset
        bisect.insort(self._free[self._segment_pool[segment]], (size, segment, offset))

    def _take_free(self, segment: int, offset: int) -> int:
        size = self._block_at.pop((segment, offset))
        self._free_at.discard((segment, offset))
        del self._free_ending[(segment, offset + size)]
        pool = self._free[self._segment_pool[segment]]
        pool.pop(bisect.bisect_left(pool, (size, segment, offset)))
        return size


def _load_weights(tl: _Timeline, info: ModelInfo, targets: tuple[Linear, ...], s: dict[str, Any]) -> None:
    """The model's tensors in the order loading creates them, for the allocator replay.

    transformers materialises each weight in the compute dtype on the GPU, bitsandbytes quantizes
    it there (absmax, packed values, then the double quantization's constants) and the 16-bit
    copy is dropped; PEFT then adds the adapters.
    """
    c = DTYPE_BYTES[s["compute_dtype"]]
    h = info.hidden_size
    embedding = tl.alloc(c * info.embedding_params, "weights_16bit")

    def quantized(lin: Linear) -> None:
        n = lin.params
        blocks = _ceil_div(n, QUANT_BLOCK)
        weight = tl.alloc(c * n)
        absmax = tl.alloc(4 * blocks, "quant_constants")
        tl.alloc(_ceil_div(n, 2), "weights_4bit")
        if s["double_quant"]:
            tl.alloc(4, "quant_constants")  # the offset
            centered = tl.alloc(4 * blocks)
            tl.alloc(blocks, "quant_constants")
            tl.alloc(4 * _ceil_div(blocks, NESTED_BLOCK), "quant_constants")
            tl.alloc(NESTED_CODE_BYTES, "quant_constants")
            tl.free(centered, absmax)
        tl.alloc(NF4_CODE_BYTES, "quant_constants")
        tl.free(weight)
        if lin.bias:
            tl.alloc(c * lin.out_features, "weights_16bit")

    for _ in range(info.layers):
        for lin in info.linears:
            quantized(lin)
        for _ in range(info.norms_per_layer):
            tl.alloc(c * h, "weights_16bit")
    for lin in info.vision_linears:
        for _ in range(lin.count):
            quantized(lin)
    rest = info.norm_params - info.layers * info.norms_per_layer * h + info.vision_other_params
    tl.alloc(c * rest, "weights_16bit")
    if info.head_params:
        tl.alloc(c * info.head_params, "weights_16bit")
    for lin in targets:
        for _ in range(lin.count):
            tl.alloc(LORA_BYTES * s["lora_r"] * lin.in_features, "lora")
            tl.alloc(LORA_BYTES * s["lora_r"] * lin.out_features, "lora")
    if s["embeddings_on_cpu"]:  # gpu_fast_paths moves it once the model is built; its block stays cached
        tl.free(embedding)


def _reserved(events: list[tuple[int, int, int]]) -> int:
    """Reserved bytes after these allocations and releases, by the caching allocator's rules."""
    allocator = _CachingAllocator()
    for handle, nbytes, stream in events:
        if nbytes:
            allocator.malloc(handle, nbytes, stream)
        else:
            allocator.free(handle)
    return allocator.reserved


# ----------------------------------------------------------------------------------------------
# The estimate


def liger_installed() -> bool:
    """Whether liger-kernel can be imported in this environment (without importing it).

    The engine's fused kernels (``train.fused_kernels``) need it in the training worker's
    environment, which is this one when the estimate runs in the app or on the command line.
    """
    import importlib.util

    try:
        return importlib.util.find_spec("liger_kernel") is not None
    except (ImportError, ValueError):  # a broken install: the engine falls back too
        return False


def triton_installed() -> bool:
    """Whether Triton can be imported here (without importing it): the chunked loss's kernel
    (engine/ce_kernel.py) runs on a GPU where it can."""
    import importlib.util

    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):
        return False


def _settings(run: RunConfig, seq: int | None = None, batch: int | None = None, *, liger: bool | None = None,
              **overrides: Any) -> dict[str, Any]:
    """The settings the simulation reads. The GPU-only paths (``engine/model.py::gpu_fast_paths``)
    are on only for a CUDA estimate, as the engine switches them on only on a GPU; the fused kernels
    only where liger-kernel is installed (``liger``: whether it is, None to look)."""
    t = run.train
    cuda = overrides.get("device", "cuda") == "cuda"
    fused_kernels = cuda and bool(getattr(t, "fused_kernels", False))
    settings = {
        "micro_batch_size": batch or t.micro_batch_size,
        "seq_len": seq or run.data.max_seq_len,
        "gradient_checkpointing": t.gradient_checkpointing,
        "attention": run.model.attn_implementation,
        "loss_impl": t.loss_impl,
        "optimizer": t.optimizer,
        "grad_accum_steps": t.grad_accum_steps,
        "compute_dtype": run.quant.compute_dtype,
        "double_quant": run.quant.double_quant,
        "lora_r": run.lora.r,
        "lora_dropout": run.lora.dropout,
        "target_modules": list(run.lora.target_modules),
        "fused_lora": bool(getattr(t, "fused_lora", False)),
        # with the fused layers, q/k/v and gate/up computed together where no dropout applies
        # (lora_kernels.LoRA4bitGroupFunction)
        "lora_groups": bool(getattr(t, "fused_lora", False)),
        "keep_weights": bool(getattr(t, "fused_lora", False)),  # lora_kernels.keep_weights, in split layers
        # with gradient checkpointing only: the simulation checks both
        "offload_checkpoints": cuda and bool(getattr(t, "offload_checkpoints", False)),
        "embeddings_on_cpu": cuda and bool(getattr(t, "embeddings_on_cpu", False)),
        "fused_kernels": fused_kernels and (liger_installed() if liger is None else bool(liger)),
        "fused_optimizer": bool(getattr(t, "fused_optimizer", False)),
        # the chunked loss's Triton kernel (losses.py), where Triton is installed
        "loss_kernel": cuda and triton_installed(),
        # the fused LoRA layer's NF4 dequantization kernel (lora_kernels.py), likewise
        "nf4_kernel": cuda and triton_installed() and run.quant.quant_type == "nf4",
        # with offloaded checkpoints only: the simulation checks
        "cuda_graphs": cuda and bool(getattr(t, "cuda_graphs", False)),
        # with the graphs, a split layer's blocks hand their output over in the graph's buffer
        # (offload.TRANSIENT_BLOCK_OUTPUTS)
        "transient_outputs": True,
        "padded": False,
        "device": "cuda",
    }
    settings.update(overrides)
    return settings


LABELS = {
    "weights_4bit": "4-bit weights (packed values)",
    "quant_constants": "4-bit constants (absmax, double quantization)",
    "weights_16bit": "16-bit weights (embeddings, output head, norms)",
    "lora": "LoRA parameters (fp32)",
    "gradients": "LoRA gradients (fp32)",
    "optimizer": "optimizer states on the GPU",
    "activations": "activations saved for backward",
    "loss": "logits and loss buffers",
    "work": "working memory (gradients in flight, temporaries)",
    "graphs": "CUDA graphs (their memory pool: one pass's temporaries; fixed buffers)",
    "allocator": "allocator slack (reserved, not allocated)",
    "context": "CUDA context and kernels",
}


def _simulate(info: ModelInfo, s: dict[str, Any], replay: bool) -> Estimate:
    """One optimizer step of training, tensor by tensor; its largest moment is the estimate.

    With ``replay`` the step starts from the model's loading, tensor by tensor, and every
    allocation goes through the caching allocator for the reserved memory; with accumulation two
    micro-batches run (the second with the gradients of the first). Without, the loaded tensors
    are lump sums and only the micro-batch that peaks runs: what the suggestions' searches need.
    """
    c = DTYPE_BYTES[s["compute_dtype"]]
    targets = lora_targets(info, s["target_modules"])
    shape = Shape(s["micro_batch_size"], s["seq_len"], c, s["attention"], s["lora_dropout"], s["lora_r"], s["padded"], s["device"])
    cuda = shape.device == "cuda"
    q = quantized_bytes((*info.linears, *info.vision_linears), s["double_quant"])
    sizes = lora_tensors(targets, s["lora_r"])
    opt = optimizer_bytes(s["optimizer"], sizes, fused=s["fused_optimizer"], cuda=cuda)
    accumulating = s["grad_accum_steps"] > 1
    sixteen_bit = info.unquantized_params - (info.embedding_params if s["embeddings_on_cpu"] else 0)
    # offload.mlp_tile: the MLP in ranges of tokens where one intermediate would be a sizeable share
    # of the parameters on the GPU (4-bit packed, 16-bit, the adapters)
    resident = q.packed + c * sixteen_bit + LORA_BYTES * sum(sizes)
    tokens = shape.tokens
    split = (cuda and s["gradient_checkpointing"] and s["offload_checkpoints"]
             and info.model_type in SPLIT_LAYER_TYPES and info.norms_per_layer == 2)
    s["mlp_tile"] = (MLP_TILE_TOKENS if split and tokens > MLP_TILE_TOKENS
                     and tokens * info.intermediate_size * c > MLP_TILE_SHARE * resident else None)

    granule = ALLOCATION_GRANULE if cuda else 1
    if replay:
        tl = _Timeline({}, record=cuda, granule=granule)
        _load_weights(tl, info, targets, s)
        for nbytes in opt.device_tensors:  # the optimizer's ordinary device tensors (from its first step on)
            tl.alloc(nbytes, "optimizer")
    else:
        tl = _Timeline({
            "weights_4bit": q.packed, "quant_constants": q.constants, "weights_16bit": c * sixteen_bit,
            "lora": sum(_granule(LORA_BYTES * n) for n in sizes), "optimizer": opt.device,
        }, granule=granule)
    sim = _StepSimulation(info, targets, shape, s, tl)
    if cuda and not sim.graphs:  # cuBLAS's workspaces, from the first products of forward and backward on
        for _ in range(CUBLAS_WORKSPACE_BYTES // CUBLAS_WORKSPACE):
            tl.alloc(CUBLAS_WORKSPACE)
    micro_batches = [False, True] if accumulating else [False]
    if not replay and accumulating and not sim.graphs:  # the second micro-batch only, its predecessor's gradients in place
        micro_batches = [True]
        sim.grad_handles = [tl.alloc(_granule(LORA_BYTES * n), "gradients") for n in sizes]
    sim.graph_buffers()
    tl.reset_peak()
    for grads_present in micro_batches:
        sim.grads_present = grads_present
        sim.run(lump=not replay)
    tl.phase = "optimizer step"
    tl.free(tl.alloc(opt.step_temporary))
    tl.free(*sim.grad_handles)

    kinds = dict(tl.peak_kinds)
    # The graphs' pool is reserved by the first replays and in use during every one after; the
    # allocator does not count it, the memory in use at once does.
    pool = tl.pool_bytes
    kinds["graphs"] = kinds.get("graphs", 0) + pool
    allocated = tl.peak + pool
    if cuda:
        reserved = (_reserved(tl.events) + pool) if replay else allocated
        kinds["allocator"] = max(0, reserved - allocated)
        kinds["context"] = CUDA_CONTEXT_BYTES
    items = [Item(key, LABELS[key], kinds.get(key, 0)) for key in LABELS]
    if not s["double_quant"]:
        items[1] = Item("quant_constants", "4-bit constants (fp32 absmax)", kinds.get("quant_constants", 0))
    if s["embeddings_on_cpu"]:
        items[2] = Item("weights_16bit", "16-bit weights (output head, norms; embeddings in CPU memory)",
                        kinds.get("weights_16bit", 0))
    pinned = c * info.embedding_params if s["embeddings_on_cpu"] else 0
    if sim.offload:  # each checkpointed pass's input: a layer's, or both blocks' of a split layer
        pinned += (2 if sim.split else 1) * info.layers * c * info.hidden_size * shape.tokens
    return Estimate(info, s, items, tl.peak_phase, allocated, allocated + kinds.get("allocator", 0),
                    sum(i.bytes for i in items), opt.paged, {k: v + pool for k, v in tl.phase_peaks.items()}, cpu_pinned=pinned)


def estimate(
    model_config: dict[str, Any] | ModelInfo,
    run: RunConfig,
    gpu_total: int | None = None,
    gpu_free: int | None = None,
    *,
    padded: bool = False,
    device: str = "cuda",
    suggest: bool = True,
    liger: bool | None = None,
) -> Estimate:
    """The peak GPU memory of training ``run`` on the model of ``model_config`` (its config.json).

    ``gpu_total``/``gpu_free`` (bytes, e.g. from :func:`gpu_memory`) give a verdict and
    suggestions; without them there is none. Every sequence is taken at ``data.max_seq_len`` and
    every position as learned (the worst case). ``padded`` adds what batches of unequal lengths
    cost on top: SDPA then attends through a mask with a kernel that saves more. ``device="cpu"``
    models PyTorch's CPU kernels instead (no context, no allocator): the tests check the model
    against real runs with it. The engine's GPU-only paths (``train.offload_checkpoints``,
    ``train.embeddings_on_cpu``, ``train.fused_kernels``) count only for ``device="cuda"``, the
    fused kernels only where liger-kernel is installed (``liger``: whether it is; None looks).
    """
    info = model_config if isinstance(model_config, ModelInfo) else describe(model_config)
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', not {device!r}")
    settings = _settings(run, padded=padded, device=device, liger=liger)
    settings["embeddings_on_cpu"] = settings["embeddings_on_cpu"] and embeddings_movable(info)
    fused_wanted = device == "cuda" and bool(getattr(run.train, "fused_kernels", False)) and info.model_type in FUSED_KERNELS
    settings["fused_kernels"] = settings["fused_kernels"] and info.model_type in FUSED_KERNELS
    result = _simulate(info, settings, replay=True)
    result.gpu_total, result.gpu_free = gpu_total, gpu_free
    result.notes = list(info.notes) + _notes(info, settings)
    if fused_wanted and not settings["fused_kernels"]:
        result.notes.append("liger-kernel is not installed, so training runs without its fused kernels "
                            "(train.fused_kernels); with it (pip install liger-kernel) a step needs less")
    available = gpu_free if gpu_free is not None else gpu_total
    if available is not None:
        result.verdict, result.reason = verdict(result, available, gpu_total)
        if suggest:
            _suggest(result, info, settings, available)
    return result


def _notes(info: ModelInfo, s: dict[str, Any]) -> list[str]:
    notes = []
    if s["seq_len"] > info.context_length > 0:
        notes.append(f"data.max_seq_len = {s['seq_len']} is longer than the model's context ({info.context_length} tokens)")
    if info.final_logit_softcapping and s["loss_impl"] == "chunked":
        notes.append("this model soft-caps its logits, so the engine computes the standard loss")
    if s["attention"] == "sdpa" and info.head_dim > 256:
        notes.append(f"head_dim {info.head_dim} is too large for FlashAttention: SDPA uses a kernel that saves more")
    return notes


def verdict(result: Estimate, available: int, total: int | None = None) -> tuple[str, str]:
    """fits / tight / does_not_fit, and why, against ``available`` bytes.

    * does not fit: even the tensors alive at the peak and the CUDA context exceed it (when the
      GPU is full the caching allocator gives back its cached blocks and retries, so its slack is
      the one part that may shrink);
    * fits: the whole peak, the paged optimizer states and a :data:`MARGIN` of the peak fit;
    * tight: in between -- within the estimate's margin, relying on the allocator giving back
      its cache, or with paged optimizer states moving to CPU memory (slower steps).
    """
    floor = result.peak - result.item("allocator")
    if floor > available:
        reason = f"needs at least {_gib(floor)} but {_gib(available)} is available"
        if total is not None and available < total and floor <= total:
            reason += f" ({_gib(total - available)} of the {_gib(total)} GPU is in use by other programs)"
        return DOES_NOT_FIT, reason
    if result.peak * (1 + MARGIN) + result.paged <= available:
        return FITS, f"needs {_gib(result.peak + result.paged)} of {_gib(available)} available"
    if result.peak * (1 + MARGIN) > available:
        return TIGHT, (f"needs {_gib(floor)} to {_gib(result.peak)} of {_gib(available)} available: within the "
                       f"estimate's {MARGIN:.0%} margin, or only if the allocator gives back its cached blocks")
    return TIGHT, (f"needs {_gib(result.peak)} of {_gib(available)} available; the {_gib(result.paged)} of paged "
                   "optimizer states will partly live in CPU memory, which slows the optimizer step")


def _largest(predicate, low: int, high: int) -> int | None:
    """The largest value in [low, high] for which a monotone (true, then false) predicate holds."""
    if not predicate(low):
        return None
    if predicate(high):
        return high
    while high - low > 1:
        mid = (low + high) // 2
        if predicate(mid):
            low = mid
        else:
            high = mid
    return low


SEQ_STEP = 64  #: suggested sequence lengths are multiples of this
MAX_SUGGESTED_BATCH = 512


def _suggest(result: Estimate, info: ModelInfo, s: dict[str, Any], available: int) -> None:
    """The largest micro-batch and sequence length that fit, and the settings that would help.

    "Fit" here means the peak with its margin; paged optimizer states are left out, because they
    move to CPU memory when the GPU is full (slower, but the run goes on). The searches skip the
    allocator replay and scale the allocated bytes by this configuration's reserved/allocated
    ratio: close, and many times faster.
    """
    ratio = result.reserved / result.allocated if result.allocated else 1.0

    def quick(**changes: Any) -> Estimate:
        other = _simulate(info, {**s, **changes}, replay=False)
        slack = int(other.allocated * (ratio - 1))
        other.items = [Item(i.key, i.label, slack) if i.key == "allocator" else i for i in other.items]
        other.reserved += slack
        other.peak += slack
        return other

    def room(est: Estimate) -> bool:
        return est.peak * (1 + MARGIN) <= available

    context = info.context_length or 131072
    result.max_micro_batch = _largest(lambda b: room(quick(micro_batch_size=b)), 1, MAX_SUGGESTED_BATCH)
    steps = _largest(lambda k: room(quick(seq_len=k * SEQ_STEP)), 1, max(1, context // SEQ_STEP))
    result.max_seq_len = steps * SEQ_STEP if steps else None
    out = result.suggestions
    graphs = result.item("graphs") > 0  # the settings replay the checkpointed passes as CUDA graphs
    if result.verdict == FITS:
        if s["gradient_checkpointing"]:
            other = quick(gradient_checkpointing=False)
            if verdict(other, available)[0] == FITS:
                # The CUDA graphs replay the checkpointed passes: without checkpointing there are none.
                gain = ("it saves the recomputation but also turns off the CUDA graphs, which need it: "
                        "faster where the GPU is the limit, slower for small models whose steps are short"
                        if graphs else "turning it off makes steps about a third faster")
                out.append(Suggestion("train.gradient_checkpointing", False, (
                    f"Gradient checkpointing is not needed here (without it: {_gib(other.peak + other.paged)}); {gain}.")))
        return
    if room(result):  # only the paged optimizer states do not fit: they page
        if s["optimizer"] == "paged_adamw_32bit":
            other = quick(optimizer="paged_adamw_8bit")
            out.append(Suggestion("train.optimizer", "paged_adamw_8bit", (
                f"To keep the optimizer states on the GPU, use paged_adamw_8bit: they take {_gib(other.paged)} "
                f"instead of {_gib(result.paged)}.")))
        return
    if result.max_micro_batch:
        accum = _ceil_div(s["micro_batch_size"] * s["grad_accum_steps"], result.max_micro_batch)
        out.append(Suggestion("train.micro_batch_size", result.max_micro_batch, (
            f"Use micro-batch {result.max_micro_batch} with grad_accum_steps {accum} (about the same batch size).")))
    if result.max_seq_len:
        out.append(Suggestion("data.max_seq_len", result.max_seq_len,
                              f"Shorten data.max_seq_len to {result.max_seq_len} tokens."))
    changes = []
    if not s["gradient_checkpointing"]:
        changes.append(("train.gradient_checkpointing", "gradient_checkpointing", True, "Turn on gradient checkpointing"))
    if s["loss_impl"] == "standard" and not info.final_logit_softcapping:
        changes.append(("train.loss_impl", "loss_impl", "chunked", "Use the chunked loss"))
    if s["optimizer"] not in PAGED_OPTIMIZERS:
        changes.append(("train.optimizer", "optimizer", "paged_adamw_32bit", "Use the paged optimizer"))
    if graphs:
        changes.append(("train.cuda_graphs", "cuda_graphs", False, "Turn off the CUDA graphs (slower steps)"))
    for setting, key, value, text in changes:
        other = quick(**{key: value})
        if room(other):
            out.append(Suggestion(setting, value, f"{text}: it would need {_gib(other.peak)}."))
    if not out:
        out.append(Suggestion("model.name_or_path", None, (
            f"Even micro-batch 1 of {SEQ_STEP} tokens does not fit: pick a smaller model or a GPU with more memory."
            if not room(quick(micro_batch_size=1, seq_len=SEQ_STEP)) else
            "It fits only at micro-batch 1 with shorter sequences: see the largest sequence length above.")))


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


# ----------------------------------------------------------------------------------------------
# GPU memory and the command line


def gpu_memory(index: int | None = None) -> tuple[str, int, int] | None:
    """(name, total, free) bytes of a GPU from NVML, or None without NVML or a GPU.

    The index defaults to the first device of CUDA_VISIBLE_DEVICES when it is a number.
    """
    import os

    try:
        import pynvml
    except ImportError:
        return None
    if index is None:
        first = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
        index = int(first) if first.isdigit() else 0
    try:
        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - no driver, no GPU: NVML raises its own error types
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        return (name.decode() if isinstance(name, bytes) else str(name)), int(mem.total), int(mem.free)
    except Exception:  # noqa: BLE001 - a GPU NVML cannot describe is no GPU for the verdict
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


HELP = "estimate the GPU memory a configuration needs, from the model's config.json alone"
DESCRIPTION = (
    "Estimate the peak GPU memory of training CONFIG: 4-bit and 16-bit weights, LoRA parameters, "
    "gradients and optimizer states, activations, logits and loss buffers, CUDA context and allocator "
    "slack. Only the model's config.json is read (for a hub id, only that file is fetched). With a GPU "
    "(NVML) or --gpu-memory, it also says whether the run fits and what would make it fit."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG", help="the run configuration (config.toml)")
    parser.add_argument("--json", action="store_true", help="print the estimate as one JSON object")
    parser.add_argument("--gpu-memory", type=float, metavar="GB",
                        help="judge against a GPU with this much free memory (GiB) instead of the one NVML sees")


def resolve_model(name_or_path: str, base_dir: Path) -> str:
    """A model path relative to the configuration's folder, as the engine resolves it."""
    p = Path(name_or_path).expanduser()
    if not p.is_absolute() and (base_dir / p).exists():
        return str((base_dir / p).resolve())
    return name_or_path


def run(args: argparse.Namespace) -> int:
    """``qlora-studio estimate``: 0 on success, 2 on bad input (one line on standard error)."""
    try:
        cfg_path = Path(args.config)
        run_cfg = config_mod.load(cfg_path)
        if not run_cfg.model.name_or_path:
            raise UserError("model.name_or_path is empty", where=str(cfg_path), fix="Set it to a model folder or a hub id.")
        source = resolve_model(run_cfg.model.name_or_path, cfg_path.parent)
        model_cfg = read_model_config(source, run_cfg.model.revision)
        info = describe(model_cfg, where=source)
        gpu_name = None
        total = free = None
        if args.gpu_memory is not None:
            if args.gpu_memory <= 0:
                raise UserError(f"--gpu-memory {args.gpu_memory} must be greater than 0", fix="Give the GPU's memory in GiB, e.g. 24.")
            total = free = int(args.gpu_memory * GiB)
            gpu_name = "--gpu-memory"
        else:
            found = gpu_memory()
            if found is not None:
                gpu_name, total, free = found
        result = estimate(info, run_cfg, total, free)
    except UserError as exc:
        print(f"qlora-studio: error: {exc.one_line()}", file=sys.stderr)
        return 2
    if args.json:
        data = result.to_dict()
        data["model"]["name_or_path"] = run_cfg.model.name_or_path
        data["gpu_name"] = gpu_name
        print(json.dumps(data, indent=2))
    else:
        print(format_report(result, run_cfg.model.name_or_path, gpu_name))
    return 0


def gpu_paths(s: dict[str, Any]) -> list[str]:
    """The engine's GPU-only paths that this estimate counts, in words."""
    paths = []
    if s.get("offload_checkpoints") and s["gradient_checkpointing"]:
        paths.append("checkpointed layer inputs in CPU memory")
        if s.get("mlp_tile"):
            paths.append(f"the MLP on {s['mlp_tile']:,} tokens at a time")
        if s.get("cuda_graphs"):
            paths.append("checkpointed layers replayed as CUDA graphs")
    if s.get("embeddings_on_cpu"):
        paths.append("input embedding in CPU memory")
    if s.get("fused_kernels"):
        paths.append("liger-kernel's RMSNorm, SwiGLU and RoPE")
    if s.get("loss_kernel") and s.get("loss_impl") == "chunked":
        paths.append("the loss's Triton kernel")
    if s.get("nf4_kernel") and s.get("fused_lora"):
        paths.append("the NF4 dequantization's Triton kernel")
    return paths


def format_report(result: Estimate, model_name: str = "", gpu_name: str | None = None) -> str:
    """The estimate as a readable table with the verdict and suggestions."""
    info, s = result.model, result.settings
    lines = []
    dtype = "fp32" if DTYPE_BYTES[s["compute_dtype"]] == 4 else "bf16/fp16"
    lines.append(f"Model     {model_name or info.architecture} ({info.architecture}, {info.param_count / 1e9:.2f} B parameters: "
                 f"{info.quantizable_params / 1e9:.2f} B in 4 bits, {info.unquantized_params / 1e9:.2f} B in {dtype})")
    targets = lora_targets(info, s["target_modules"])
    trainable = sum(lora_tensors(targets, s["lora_r"]))
    lines.append(
        f"Settings  micro-batch {s['micro_batch_size']} x {s['seq_len']} tokens, gradient checkpointing "
        f"{'on' if s['gradient_checkpointing'] else 'off'}, {s['attention']} attention, {s['loss_impl']} loss, "
        f"LoRA r={s['lora_r']} on {len({t.name for t in targets})} projections ({trainable / 1e6:.1f} M trainable), {s['optimizer']}"
    )
    paths = gpu_paths(s)
    if paths:
        lines.append("GPU paths " + ", ".join(paths))
    lines.append("")
    width = max(len(i.label) for i in result.items) + 2
    for item in result.items:
        lines.append(f"  {item.label:<{width}}{item.bytes / GiB:>9.2f} GiB")
    lines.append("  " + "-" * (width + 13))
    lines.append(f"  {'peak (' + result.phase + ')':<{width}}{result.peak / GiB:>9.2f} GiB")
    if result.paged:
        lines.append(f"  {'+ paged optimizer states':<{width}}{result.paged / GiB:>9.2f} GiB  (unified memory; moves to CPU RAM when the GPU is full)")
    if result.cpu_pinned:
        moved = [p for p in paths if "CPU memory" in p]
        lines.append(f"  {'pinned CPU memory instead':<{width}}{result.cpu_pinned / GiB:>9.2f} GiB  (not on the GPU: {', '.join(moved)})")
    lines.append("")
    if result.verdict is None:
        lines.append("Verdict   none: no GPU found (NVML); give --gpu-memory GB to judge against a card")
    else:
        lines.append(f"GPU       {gpu_name or 'the GPU'}: {result.gpu_total / GiB:.1f} GiB total, {result.gpu_free / GiB:.1f} GiB free")
        lines.append(f"Verdict   {VERDICT_TEXT[result.verdict]}: {result.reason}")
        largest = []
        if result.max_micro_batch:
            largest.append(f"micro-batch {result.max_micro_batch} at {s['seq_len']} tokens")
        if result.max_seq_len:
            largest.append(f"sequence length {result.max_seq_len} at micro-batch {s['micro_batch_size']}")
        if largest:
            lines.append("Largest   " + "; ".join(largest) + " (that fit with the margin)")
        for suggestion in result.suggestions:
            lines.append(f"Suggest   {suggestion.text}")
    for note in result.notes:
        lines.append(f"Note      {note}")
    return "\n".join(lines)
