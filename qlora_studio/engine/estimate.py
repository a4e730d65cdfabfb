"""How much GPU memory a QLoRA run needs, from ``config.json`` and the run configuration alone.

The estimate follows what this project's engine allocates (``engine/model.py``, ``engine/trainer.py``):
a frozen 4-bit bitsandbytes base, embeddings/head/norms in the compute dtype, PEFT LoRA adapters in
fp32 on the quantized linear layers, no autocast, transformers' Llama-style decoder layers under
non-reentrant gradient checkpointing, and the cross-entropy on fp32 logits. It is a model of the
tensors alive at the step's peak, not a fitted curve; docs/estimate.md derives each term and
bench/estimate_accuracy.py measures it against the H200.

The peak is the largest of four moments of a training step:

* **forward** -- the loss is being computed: activations saved for backward, plus the logits, their
  fp32 copy and log-softmax output;
* **loss backward** -- the log-softmax backward holds its saved output, the incoming gradient and
  its result, three fp32 vocabulary-sized buffers;
* **layer backward** -- the top decoder layer's backward (after recomputing it, with
  checkpointing): that layer's saved tensors, the gradients flowing through it and a dequantized
  bf16 copy of the largest 4-bit weight;
* **optimizer step** -- LoRA gradients and the optimizer's states (and temporaries).

Torch-free: the GUI imports this at start-up, and ``qlora-studio estimate`` runs without a GPU.
"""

from __future__ import annotations

import argparse
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

# --- bitsandbytes optimizers (bitsandbytes/optim/optimizer.py) ---------------------------------
PAGED_MIN_NUMEL = 100_000  #: smaller state tensors are ordinary device tensors even when "paged"
EIGHT_BIT_MIN_NUMEL = 4096  #: smaller tensors keep 32-bit states in the 8-bit optimizers
EIGHT_BIT_BLOCK = 256  #: elements per fp32 absmax of a blockwise 8-bit state

# --- the engine (engine/trainer.py) ---------------------------------------------------------
LOSS_CHUNK_TOKENS = 4096  #: tokens per output-head chunk of the ``chunked`` loss
LORA_BYTES = 4  #: PEFT keeps LoRA weights in fp32 over a 4-bit base and casts their input to fp32
#: Whether autograd adds a tensor's second gradient into the first one's buffer (measured: no)
ACCUMULATE_IN_PLACE = False
BNB_FUSED_MAX_TOKENS = 1536  #: above this many tokens bitsandbytes dequantizes, then runs F.linear
DROPOUT_MASK_BYTES = 1  #: CUDA's fused dropout saves a bool mask

# --- the process and the caching allocator ------------------------------------------------
#: Driver context, kernel images loaded lazily during training, cuBLAS handles: what NVML shows
#: for the process beyond PyTorch's reserved memory. Measured by bench/estimate_accuracy.py.
CUDA_CONTEXT_BYTES = 600 * MiB
#: Reserved-but-unallocated memory in PyTorch's caching allocator at the peak (block rounding,
#: segments split by earlier allocations), as a fraction of the memory allocated during the step.
ALLOCATOR_SLACK = 0.06
#: The same for the tensors allocated once at load (weights, adapters, optimizer states).
PERSISTENT_SLACK = 0.01
ALLOCATION_GRANULE = 512  #: the caching allocator rounds every block to 512 bytes

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
    note: str = ""


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
    offset: 8/64 + 32/(64*256) = 0.127 bits per weight instead of 32/64 = 0.5.
    """
    packed = constants = params = 0
    for lin in linears:
        n = lin.params
        blocks = _ceil_div(n, QUANT_BLOCK)
        if double_quant:
            per = blocks + 4 * _ceil_div(blocks, NESTED_BLOCK) + 4  # 8-bit absmax, fp32 absmax2, offset
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
    device: int  #: ordinary device tensors
    paged: int  #: CUDA unified memory (paged optimizers only)
    step_temporary: int  #: extra bytes while ``step()`` runs


def optimizer_bytes(optimizer: str, tensor_sizes: list[int]) -> OptimizerBytes:
    """AdamW's two states per trainable tensor, as each optimizer stores them."""
    device = paged = temporary = 0
    is_paged = optimizer in PAGED_OPTIMIZERS
    for n in tensor_sizes:
        if optimizer.endswith("8bit") and n >= EIGHT_BIT_MIN_NUMEL:
            states = 2 * n  # two uint8 states
            device += 2 * 4 * _ceil_div(n, EIGHT_BIT_BLOCK)  # their fp32 absmax, never paged
        else:
            states = 2 * 4 * n
        if is_paged and n >= PAGED_MIN_NUMEL:
            paged += states
        else:
            device += states
    if optimizer == "adamw_torch":
        # torch.optim.AdamW (foreach) builds a sqrt(v) copy of every state during the step
        temporary = 4 * sum(tensor_sizes)
    return OptimizerBytes(device, paged, temporary)


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
    #: "cuda", or "cpu" for PyTorch's CPU kernels (dropout keeps an fp32 mask, no FlashAttention
    #: workspaces, bitsandbytes always dequantizes): how the tests check this model on a CPU
    device: str = "cuda"

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


class _Timeline:
    """Bytes alive through a simulated training step, by kind, and its largest moment.

    Every tensor the step creates is an :meth:`alloc` (rounded like the caching allocator) and,
    when its last reference goes, a :meth:`free`. The kinds become lines of the breakdown.
    """

    def __init__(self, base: dict[str, int]):
        self._sizes: dict[int, tuple[int, str]] = {}
        self._next = 1
        self.by_kind: dict[str, int] = dict(base)
        self.now = sum(base.values())
        self.phase = "forward"
        self.peak = -1
        self.peak_kinds: dict[str, int] = {}
        self.peak_phase = ""
        self.phase_peaks: dict[str, int] = {}

    def alloc(self, nbytes: int, kind: str = "work") -> int:
        handle = self._next
        self._next += 1
        nbytes = _granule(max(0, int(nbytes)))
        self._sizes[handle] = (nbytes, kind)
        self.now += nbytes
        self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes
        if self.now > self.phase_peaks.get(self.phase, -1):
            self.phase_peaks[self.phase] = self.now
        if self.now > self.peak:
            self.peak, self.peak_kinds, self.peak_phase = self.now, dict(self.by_kind), self.phase
        return handle

    def free(self, *handles: int | None) -> None:
        for handle in handles:
            if handle is None or handle not in self._sizes:
                continue
            nbytes, kind = self._sizes.pop(handle)
            self.now -= nbytes
            self.by_kind[kind] -= nbytes

    def size(self, handle: int) -> int:
        return self._sizes[handle][0]

    def keep(self, handle: int | None) -> int | None:
        """Mark a tensor as saved for backward (the "activations" line)."""
        if handle is not None and handle in self._sizes:
            nbytes, old = self._sizes[handle]
            self._sizes[handle] = (nbytes, "activations")
            self.by_kind[old] -= nbytes
            self.by_kind["activations"] = self.by_kind.get("activations", 0) + nbytes
        return handle


class _StepSimulation:
    """The tensors of one training micro-step, in the order the engine creates and frees them.

    It mirrors transformers' Llama-style decoder layer; PEFT's LoRA over a bitsandbytes 4-bit
    linear (``peft/tuners/lora/bnb.py``: the base output is cloned, the adapter's input cast to
    fp32, dropout, lora_A, lora_B, scaling, cast back, add); bitsandbytes' ``MatMul4Bit``, which
    saves no input and dequantizes its weight for the input gradient; PyTorch's non-reentrant
    activation checkpointing, which keeps each layer's input and recomputes the layer in backward;
    and the engine's ``loss_sum``. Autograd frees a saved tensor when the backward of the
    operation that saved it has run; gradients of a tensor used twice are added in place.

    ``keep=False`` runs a layer the way a checkpointed forward does: nothing is saved, every
    tensor dies with its last Python reference.
    """

    def __init__(self, info: ModelInfo, targets: tuple[Linear, ...], shape: Shape, settings: dict[str, Any],
                 base: dict[str, int]):
        self.info, self.shape, self.s = info, shape, settings
        self.targeted = {lin.name for lin in targets if not lin.input.startswith("vision_")}
        self.linear = {lin.name: lin for lin in info.linears}
        self.tl = _Timeline(base)
        self.t = shape.tokens
        self.c = shape.c
        self.grads_present = settings["grad_accum_steps"] > 1
        self.checkpointing = settings["gradient_checkpointing"]
        # transformers' gradient_checkpointing_enable() hooks the embeddings so that their output
        # requires a gradient: the first layer then saves and computes like every other one
        self.embeddings_need_grad = self.checkpointing
        #: gradients computed before a checkpointed layer's recomputation, by projection
        self._pending: dict[str, int] = {}

    # --- the 4-bit linear layer with its LoRA adapter ----------------------------------------

    def _dequantized_weight(self, lin: Linear) -> int:
        """bitsandbytes rebuilds the whole weight in the compute dtype, and its absmax in fp32."""
        return self.tl.alloc(self.c * lin.params + 4 * _ceil_div(lin.params, QUANT_BLOCK))

    def linear_forward(self, name: str, input_grad: bool, keep: bool, last: bool = False) -> tuple[int | None, dict[str, int]]:
        """Returns the output and the tensors kept for backward.

        ``last``: this adapter saves the last tensor of a recomputed layer, so the recomputation
        stops once lora_B has run (PyTorch's early stop) and there is no output.
        """
        tl, t, c, lin = self.tl, self.t, self.c, self.linear[name]
        if t > BNB_FUSED_MAX_TOKENS or self.shape.device == "cpu":  # dequantize, then F.linear
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
        mask = dropped = None
        if self.shape.dropout > 0:
            mask_bytes = DROPOUT_MASK_BYTES if self.shape.device == "cuda" else LORA_BYTES
            mask = tl.alloc(mask_bytes * lin.in_features * t)
            dropped = tl.alloc(LORA_BYTES * lin.in_features * t)
        a_out = tl.alloc(LORA_BYTES * self.shape.r * t)
        b_out = tl.alloc(LORA_BYTES * lin.out_features * t)
        if last:
            summed = None
            tl.free(b_out, result)
        else:
            scaled = tl.alloc(LORA_BYTES * lin.out_features * t)
            tl.free(b_out)
            low = tl.alloc(c * lin.out_features * t)
            tl.free(scaled)
            summed = tl.alloc(c * lin.out_features * t)
            tl.free(result, low)
        # lora_A keeps its input, lora_B keeps lora_A's output, dropout its mask (for an input gradient)
        saved = {"a_in": dropped if dropped is not None else x32, "a_out": a_out}
        if mask is not None and input_grad:
            saved["mask"] = mask
        if not keep:
            saved = {}
        for handle in (x32, mask, dropped, a_out):
            if handle in saved.values():
                tl.keep(handle)
            else:
                tl.free(handle)
        return summed, saved

    def linear_backward(self, name: str, saved: dict[str, int], input_grad: bool) -> int | None:
        """Returns the input's gradient (compute dtype), or None when the input needs none."""
        tl, t, c, lin = self.tl, self.t, self.c, self.linear[name]
        grad = None
        if name in self.targeted:  # the adapter's branch runs first: it was created last
            g_scaled = self._pending.pop(name, None)
            if g_scaled is None:
                g_scaled = self._lora_output_grad(lin)
            g_r = tl.alloc(LORA_BYTES * self.shape.r * t)  # lora_B's input gradient
            self._param_grad(LORA_BYTES * self.shape.r * lin.out_features)
            tl.free(g_scaled, saved.get("a_out"))
            if input_grad:
                grad = tl.alloc(LORA_BYTES * lin.in_features * t)  # lora_A's input gradient
            self._param_grad(LORA_BYTES * self.shape.r * lin.in_features)
            tl.free(g_r, saved.get("a_in"))
            if grad is not None and "mask" in saved:
                g = tl.alloc(LORA_BYTES * lin.in_features * t)  # dropout's backward
                tl.free(grad, saved["mask"])
                grad = g
            if grad is not None:
                g = tl.alloc(c * lin.in_features * t)  # back to the compute dtype
                tl.free(grad)
                grad = g
        if input_grad:
            w = self._dequantized_weight(lin)
            base = tl.alloc(c * lin.in_features * t)
            tl.free(w)
            grad = base if grad is None else self._accumulate(grad, base)
        return grad

    def _lora_output_grad(self, lin: Linear) -> int:
        """The adapter output's gradient, through the cast back and the scaling (fp32)."""
        g32 = self.tl.alloc(LORA_BYTES * lin.out_features * self.t)
        g_scaled = self.tl.alloc(LORA_BYTES * lin.out_features * self.t)
        self.tl.free(g32)
        return g_scaled

    def _accumulate(self, buffer: int, new: int) -> int:
        """Autograd adds a second gradient for the same tensor to the first one."""
        if ACCUMULATE_IN_PLACE:
            self.tl.free(new)
            return buffer
        total = self.tl.alloc(self.tl.size(buffer))
        self.tl.free(buffer, new)
        return total

    def _param_grad(self, nbytes: int) -> None:
        if self.grads_present:  # a later micro-batch: the new gradient is added in place to .grad
            self.tl.free(self.tl.alloc(nbytes))
        else:
            self.tl.alloc(nbytes, "gradients")

    # --- RMSNorm -------------------------------------------------------------------------------

    def norm_forward(self, width: int, rows: int, input_grad: bool, keep: bool) -> tuple[int, dict[str, int]]:
        """x.float(), pow, mean, + eps, rsqrt, product, cast back, times the (frozen) weight."""
        tl, c = self.tl, self.c
        x32 = tl.alloc(4 * width * rows)
        sq = tl.alloc(4 * width * rows)
        var = tl.alloc(4 * rows)
        tl.free(sq)
        var_eps = tl.alloc(4 * rows)
        tl.free(var)
        rs = tl.alloc(4 * rows)
        tl.free(var_eps)
        normed = tl.alloc(4 * width * rows)
        saved = {"x32": tl.keep(x32), "rs": tl.keep(rs)} if keep and input_grad else {}
        if not saved:
            tl.free(x32, rs)
        low = tl.alloc(c * width * rows)
        tl.free(normed)
        out = tl.alloc(c * width * rows)
        tl.free(low)
        return out, saved

    def norm_backward(self, width: int, rows: int, saved: dict[str, int]) -> int:
        tl, c = self.tl, self.c
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

    def _rope_backward(self, width: int, grad: int) -> int:
        tl, t, c = self.tl, self.t, self.c
        g_sin = tl.alloc(c * width * t)
        halves = (tl.alloc(c * width * t), tl.alloc(c * width * t))  # slices' backward: zeros, then copy
        tl.free(g_sin)
        g = tl.alloc(c * width * t)
        tl.free(*halves, grad)
        return g

    def attention_forward(self, input_grad: bool, keep: bool) -> tuple[int, dict[str, Any]]:
        info, tl, t, c, shape = self.info, self.tl, self.t, self.c, self.shape
        q_w, kv_w = info.heads * info.head_dim, info.kv_heads * info.head_dim
        state: dict[str, Any] = {"linears": {}}
        if "qkv_proj" in self.linear:
            qkv, state["linears"]["qkv_proj"] = self.linear_forward("qkv_proj", input_grad, keep)
            q = k = None
            v = qkv  # q, k and v are views of one tensor; v keeps it alive
        else:
            q, state["linears"]["q_proj"] = self.linear_forward("q_proj", input_grad, keep)
            k, state["linears"]["k_proj"] = self.linear_forward("k_proj", input_grad, keep)
            v, state["linears"]["v_proj"] = self.linear_forward("v_proj", input_grad, keep)
        state["qk_norm"] = {}
        if info.qk_norm:  # per head (Qwen3, Gemma 3) or over the whole projection (OLMo 2)
            q_n, state["qk_norm"]["q"] = self.norm_forward(*self._qk_norm_shape(info.heads), True, keep)
            k_n, state["qk_norm"]["k"] = self.norm_forward(*self._qk_norm_shape(info.kv_heads), True, keep)
            tl.free(q, k)
            q, k = q_n, k_n
        q_rot = self._rope(q_w)
        k_rot = self._rope(kv_w)
        tl.free(q, k)
        kernel = self.kernel()
        kept = [q_rot, k_rot, v]
        per_seq = shape.batch * shape.seq * shape.seq
        grouped = info.kv_heads != info.heads
        if kernel == "flash":  # FlashAttention-2 with grouped-query heads handled natively
            out = tl.alloc(c * q_w * t)
            kept += [out, tl.alloc(4 * info.heads * t)]  # the output and the fp32 log-sum-exp
        else:
            if grouped:  # transformers repeats k and v to every query head
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
        state["attention"] = [tl.keep(h) for h in kept] if keep else []
        o, state["linears"]["o_proj"] = self.linear_forward("o_proj", True, keep)
        if not keep:
            tl.free(*kept)
        return o, state

    def attention_backward(self, grad: int, state: dict[str, Any], input_grad: bool) -> int | None:
        """``grad`` belongs to the caller (it is the residual stream's gradient too)."""
        info, tl, t, c = self.info, self.tl, self.t, self.c
        q_w, kv_w = info.heads * info.head_dim, info.kv_heads * info.head_dim
        saved = state["linears"]
        g_out = self.linear_backward("o_proj", saved["o_proj"], True)
        kernel = self.kernel()
        grouped = info.kv_heads != info.heads
        dq = tl.alloc(c * q_w * t)
        if kernel == "flash":
            dk, dv = tl.alloc(c * kv_w * t), tl.alloc(c * kv_w * t)
            if self.shape.device == "cuda":
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
                if self.shape.device == "cuda":
                    tl.free(tl.alloc(4 * q_w * t))  # the kernel's fp32 accumulator
            if grouped:  # repeat_kv's backward sums the copies
                dk, dv = tl.alloc(c * kv_w * t), tl.alloc(c * kv_w * t)
                tl.free(dk_full, dv_full)
            else:
                dk, dv = dk_full, dv_full
        tl.free(g_out, *state["attention"])
        g_k = self._rope_backward(kv_w, dk)
        g_q = self._rope_backward(q_w, dq)
        if info.qk_norm:
            g_k = self._replace(g_k, self.norm_backward(*self._qk_norm_shape(info.kv_heads), state["qk_norm"]["k"]))
            g_q = self._replace(g_q, self.norm_backward(*self._qk_norm_shape(info.heads), state["qk_norm"]["q"]))
        if "qkv_proj" in saved:
            g_qkv = tl.alloc(c * (q_w + 2 * kv_w) * t)  # the three gradients, concatenated
            tl.free(g_q, g_k, dv)
            g_in = self.linear_backward("qkv_proj", saved["qkv_proj"], input_grad)
            tl.free(g_qkv)
            return g_in
        g_in = None
        for name, g in (("v_proj", dv), ("k_proj", g_k), ("q_proj", g_q)):
            g_x = self.linear_backward(name, saved[name], input_grad)
            tl.free(g)
            g_in = g_x if g_in is None else self._accumulate(g_in, g_x)
        return g_in

    def _qk_norm_shape(self, heads: int) -> tuple[int, int]:
        """(width, rows) of a q or k norm."""
        if self.info.qk_norm_full:
            return heads * self.info.head_dim, self.t
        return self.info.head_dim, self.t * heads

    def _replace(self, old: int, new: int) -> int:
        self.tl.free(old)
        return new

    # --- MLP and the decoder layer -------------------------------------------------------------

    def mlp_forward(self, keep: bool, recompute: bool = False) -> tuple[int | None, dict[str, Any]]:
        """The gated MLP. ``recompute``: a checkpointed layer's recomputation, which stops after
        the last tensor the layer saves (then there is no output)."""
        tl, t, c, i = self.tl, self.t, self.c, self.info.intermediate_size
        saved: dict[str, Any] = {}
        if "gate_up_proj" in self.linear:
            gate_up, saved["gate_up_proj"] = self.linear_forward("gate_up_proj", True, keep)
            act = tl.alloc(c * i * t)  # silu(gate) keeps its input: the fused output
            kept = [gate_up, act]
        else:
            gate, saved["gate_proj"] = self.linear_forward("gate_proj", True, keep)
            act = tl.alloc(c * i * t)  # silu keeps its input
            up, saved["up_proj"] = self.linear_forward("up_proj", True, keep)
            kept = [gate, act, up]  # the product keeps both factors
        prod = tl.alloc(c * i * t)
        saved["mlp"] = [tl.keep(h) for h in kept] if keep else []
        if not keep:
            tl.free(*kept)
        stop = recompute and self.info.norms_per_layer == 2
        if stop and "down_proj" not in self.targeted:
            tl.free(prod)
            saved["down_proj"] = {}
            return None, saved
        down, saved["down_proj"] = self.linear_forward("down_proj", True, keep, last=stop)
        tl.free(prod)
        return down, saved

    def mlp_backward(self, grad: int, saved: dict[str, Any]) -> int:
        """``grad`` belongs to the caller."""
        tl, t, c, i = self.tl, self.t, self.c, self.info.intermediate_size
        g_prod = self.linear_backward("down_proj", saved["down_proj"], True)
        g_act, g_up = tl.alloc(c * i * t), tl.alloc(c * i * t)
        tl.free(g_prod)
        if "gate_up_proj" in self.linear:
            g_gate = tl.alloc(c * i * t)  # silu's backward
            tl.free(g_act)
            g_gu = tl.alloc(2 * c * i * t)  # the two halves, concatenated
            tl.free(g_up, g_gate, *saved["mlp"])
            g_x = self.linear_backward("gate_up_proj", saved["gate_up_proj"], True)
            tl.free(g_gu)
            return g_x
        gate, act, up = saved["mlp"]
        tl.free(act, up)
        g_x = self.linear_backward("up_proj", saved["up_proj"], True)
        tl.free(g_up)
        g_gate = tl.alloc(c * i * t)  # silu's backward
        tl.free(g_act, gate)
        g_x2 = self.linear_backward("gate_proj", saved["gate_proj"], True)
        tl.free(g_gate)
        return self._accumulate(g_x, g_x2)

    def layer_forward(self, input_grad: bool, keep: bool, recompute: bool = False) -> tuple[int | None, dict[str, Any]]:
        """One decoder layer on the residual stream: norm, attention, add, norm, MLP, add.

        Gemma 2/3 also normalise the attention and MLP outputs (four norms per layer). A
        recomputation (``recompute``) ends with the last saved tensor: no residual add, no output.
        """
        tl, t, c, h = self.tl, self.t, self.c, self.info.hidden_size
        post = self.info.norms_per_layer > 2
        saved: dict[str, Any] = {}
        n1, saved["n1"] = self.norm_forward(h, t, input_grad, keep)
        attn, saved["attn"] = self.attention_forward(input_grad, keep)
        tl.free(n1)
        if post:
            attn = self._post(attn, saved, "post_attn", keep)
        h1 = tl.alloc(c * h * t)
        tl.free(attn)
        n2, saved["n2"] = self.norm_forward(h, t, True, keep)
        mlp, saved["mlp"] = self.mlp_forward(keep, recompute)
        tl.free(n2)
        if post:
            mlp = self._post(mlp, saved, "post_mlp", keep)
        if recompute:
            tl.free(h1, mlp)
            return None, saved
        out = tl.alloc(c * h * t)
        tl.free(h1, mlp)
        return out, saved

    def _post(self, x: int, saved: dict[str, Any], key: str, keep: bool) -> int:
        out, saved[key] = self.norm_forward(self.info.hidden_size, self.t, True, keep)
        self.tl.free(x)
        return out

    def layer_backward(self, grad: int, saved: dict[str, Any], input_grad: bool) -> int | None:
        """Returns the gradient of the layer's input: the residual stream's, with both branches added."""
        tl, h, t = self.tl, self.info.hidden_size, self.t
        g = self.norm_backward(h, t, saved["post_mlp"]) if saved.get("post_mlp") else grad
        g_n2 = self.mlp_backward(g, saved["mlp"])
        if g != grad:
            tl.free(g)
        g_h1 = self.norm_backward(h, t, saved["n2"])
        tl.free(g_n2)
        grad = self._accumulate(grad, g_h1)
        g = self.norm_backward(h, t, saved["post_attn"]) if saved.get("post_attn") else grad
        g_n1 = self.attention_backward(g, saved["attn"], input_grad)
        if g != grad:
            tl.free(g)
        if not input_grad:
            tl.free(grad)
            return None
        g_x = self.norm_backward(h, t, saved["n1"])
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
        tl, c = self.tl, self.c
        v, h = self.info.vocab_size, self.info.hidden_size
        shifted = tl.alloc(c * n * h) if self.shape.batch > 1 else None  # hidden[:, :-1].reshape
        selected = tl.keep(tl.alloc(c * n * h))  # index_select of the learned positions
        tl.free(shifted)
        chunks = [min(LOSS_CHUNK_TOKENS, n - start) for start in range(0, n, LOSS_CHUNK_TOKENS)]
        for k in chunks:  # checkpointed: nothing is kept
            tl.free(self._chunk_log_probs(k))
        tl.free(hidden)
        tl.phase = "loss backward"
        g_sel = None
        for k in reversed(chunks):
            log_probs = self._chunk_log_probs(k)  # recomputed
            g = tl.alloc(4 * k * v, "loss")
            g_in = tl.alloc(4 * k * v, "loss")
            tl.free(g, log_probs)
            g_low = tl.alloc(c * k * v, "loss")
            tl.free(g_in)
            g_h = tl.alloc(c * k * h)
            tl.free(g_low)
            full = tl.alloc(c * n * h)  # the chunk's slice backward
            tl.free(g_h)
            g_sel = full if g_sel is None else self._accumulate(g_sel, full)
        tl.free(selected)
        g_shift = tl.alloc(c * n * h)  # index_select's backward
        tl.free(g_sel)
        g_hidden = tl.alloc(c * self.t * h)
        tl.free(g_shift)
        return g_hidden

    def _chunk_log_probs(self, k: int) -> int:
        tl, v = self.tl, self.info.vocab_size
        logits = tl.alloc(self.c * k * v, "loss")
        f32 = tl.alloc(4 * k * v, "loss")
        tl.free(logits)
        log_probs = tl.alloc(4 * k * v, "loss")
        tl.free(f32)
        return log_probs

    # --- the step ------------------------------------------------------------------------------

    def run(self) -> _Timeline:
        info, tl, t, c, shape = self.info, self.tl, self.t, self.c, self.shape
        h, layers = info.hidden_size, info.layers
        tl.phase = "forward"
        tl.alloc(3 * 8 * t)  # input ids, attention mask and labels
        tl.alloc(8 * shape.batch * (shape.seq - 1))  # the shifted labels
        tl.keep(tl.alloc(2 * c * info.head_dim * shape.seq))  # RoPE's cos and sin
        kernel = self.kernel()
        if kernel != "flash":  # the 4-D mask: boolean for SDPA, additive for eager
            tl.keep(tl.alloc((1 if kernel == "efficient" else c) * shape.batch * shape.seq * shape.seq))
        x = tl.alloc(c * h * t)  # the embeddings
        inputs, saved = [], []
        for index in range(layers):
            input_grad = index > 0 or self.embeddings_need_grad
            out, layer_saved = self.layer_forward(input_grad=input_grad, keep=not self.checkpointing)
            if self.checkpointing:
                inputs.append(tl.keep(x))
            else:
                tl.free(x)
            saved.append(layer_saved)
            x = out
        final, final_saved = self.norm_forward(h, t, True, True)
        tl.free(x)
        g = self.loss(final)
        g = self._replace(g, self.norm_backward(h, t, final_saved))
        tl.phase = "layer backward"
        for index in reversed(range(layers)):
            input_grad = index > 0 or self.embeddings_need_grad
            layer_saved = saved[index]
            if self.checkpointing:
                # the recomputation starts when backward first needs a saved tensor: in down_proj's
                # adapter, after the gradient has passed the cast back and the scaling
                if "down_proj" in self.targeted:
                    self._pending["down_proj"] = self._lora_output_grad(self.linear["down_proj"])
                _, layer_saved = self.layer_forward(input_grad=input_grad, keep=True, recompute=True)
            g = self.layer_backward(g, layer_saved, input_grad=input_grad)
            if self.checkpointing:
                tl.free(inputs[index])
        tl.free(g)
        return tl


# ----------------------------------------------------------------------------------------------
# The estimate


def _settings(run: RunConfig, seq: int | None = None, batch: int | None = None, **overrides: Any) -> dict[str, Any]:
    t = run.train
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
    "allocator": "allocator slack (reserved, not allocated)",
    "context": "CUDA context and kernels",
}


def _breakdown(info: ModelInfo, s: dict[str, Any]) -> tuple[list[Item], str, int, int, dict[str, int]]:
    """The items at the peak, the peak's phase, the allocated bytes, the paged bytes, each phase's peak."""
    c = DTYPE_BYTES[s["compute_dtype"]]
    targets = lora_targets(info, s["target_modules"])
    shape = Shape(s["micro_batch_size"], s["seq_len"], c, s["attention"], s["lora_dropout"], s["lora_r"], s["padded"], s["device"])

    q = quantized_bytes((*info.linears, *info.vision_linears), s["double_quant"])
    sizes = lora_tensors(targets, s["lora_r"])
    lora = sum(_granule(LORA_BYTES * n) for n in sizes)
    opt = optimizer_bytes(s["optimizer"], sizes)
    persistent = {
        "weights_4bit": q.packed,
        "quant_constants": q.constants,
        "weights_16bit": c * info.unquantized_params,
        "lora": lora,
        "optimizer": opt.device,
    }
    if s["grad_accum_steps"] > 1:  # a later micro-batch starts with the gradients of the earlier ones
        persistent["gradients"] = lora
    timeline = _StepSimulation(info, targets, shape, s, persistent).run()
    phases = dict(timeline.phase_peaks)
    # the optimizer step: activations are gone; the gradients, states and step temporaries remain
    phases["optimizer step"] = sum(persistent.values()) + (0 if "gradients" in persistent else lora) + opt.step_temporary
    if phases["optimizer step"] > timeline.peak:
        kinds = {**persistent, "gradients": lora, "work": opt.step_temporary}
        phase = "optimizer step"
    else:
        kinds, phase = timeline.peak_kinds, timeline.peak_phase
    allocated = sum(kinds.values())
    dynamic = allocated - sum(persistent.values())
    kinds["allocator"] = int(ALLOCATOR_SLACK * dynamic + PERSISTENT_SLACK * sum(persistent.values()))
    kinds["context"] = CUDA_CONTEXT_BYTES
    items = [Item(key, LABELS[key], kinds.get(key, 0)) for key in LABELS]
    if not s["double_quant"]:
        items[1] = Item("quant_constants", "4-bit constants (fp32 absmax)", q.constants)
    return items, phase, allocated, opt.paged, phases


def estimate(
    model_config: dict[str, Any] | ModelInfo,
    run: RunConfig,
    gpu_total: int | None = None,
    gpu_free: int | None = None,
    *,
    padded: bool = False,
    device: str = "cuda",
    suggest: bool = True,
) -> Estimate:
    """The peak GPU memory of training ``run`` on the model of ``model_config`` (its config.json).

    ``gpu_total``/``gpu_free`` (bytes) give a verdict and suggestions; without them there is none.
    ``padded`` models micro-batches of different lengths, which SDPA attends to with a mask (a
    slower kernel that saves more); the default is the worst case for everything else, every
    sequence at ``data.max_seq_len``.
    """
    info = model_config if isinstance(model_config, ModelInfo) else describe(model_config)
    settings = _settings(run, padded=padded, device=device)
    result = _estimate(info, settings)
    result.gpu_total, result.gpu_free = gpu_total, gpu_free
    result.notes = list(info.notes) + _notes(info, settings)
    available = gpu_free if gpu_free is not None else gpu_total
    if available is not None:
        result.verdict, result.reason = verdict(result.peak, result.paged, available, gpu_total)
        if suggest:
            _suggest(result, info, settings, available)
    return result


def _estimate(info: ModelInfo, settings: dict[str, Any]) -> Estimate:
    items, phase, allocated, paged, phases = _breakdown(info, settings)
    reserved = allocated + next(i.bytes for i in items if i.key == "allocator")
    peak = sum(i.bytes for i in items)
    return Estimate(info, settings, items, phase, allocated, reserved, peak, paged, phases)


def _notes(info: ModelInfo, s: dict[str, Any]) -> list[str]:
    notes = []
    if s["seq_len"] > info.context_length > 0:
        notes.append(f"data.max_seq_len = {s['seq_len']} is longer than the model's context ({info.context_length} tokens)")
    if info.final_logit_softcapping and s["loss_impl"] == "chunked":
        notes.append("this model soft-caps its logits, so the engine uses the standard loss")
    if s["attention"] == "sdpa" and info.head_dim > 256:
        notes.append(f"head_dim {info.head_dim} is too large for FlashAttention: SDPA uses a slower kernel")
    return notes


def verdict(peak: int, paged: int, available: int, total: int | None = None) -> tuple[str, str]:
    """fits / tight / does_not_fit for a peak (and paged optimizer states) against available bytes.

    "fits" leaves :data:`MARGIN` of the peak free. Paged optimizer states can move to CPU memory,
    so a run whose states do not fit as well is "tight" (it runs, with paging), not "does not fit".
    """
    need = peak * (1 + MARGIN)
    if peak > available:
        reason = f"needs {_gib(peak)} but {_gib(available)} is available"
        if total is not None and available < total and peak <= total:
            reason += f" ({_gib(total - available)} of the {_gib(total)} GPU is in use by other programs)"
        return DOES_NOT_FIT, reason
    if need + paged <= available:
        return FITS, f"needs {_gib(peak + paged)} of {_gib(available)} available"
    if need > available:
        return TIGHT, f"needs {_gib(peak)} of {_gib(available)} available, within the estimate's {MARGIN:.0%} margin"
    return TIGHT, (
        f"needs {_gib(peak)} of {_gib(available)} available; the {_gib(paged)} of paged optimizer states "
        "will partly live in CPU memory, which slows the optimizer step"
    )


def _fits(info: ModelInfo, settings: dict[str, Any], available: int) -> bool:
    return _estimate(info, settings).peak * (1 + MARGIN) <= available


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
MAX_SUGGESTED_BATCH = 1024


def _suggest(result: Estimate, info: ModelInfo, s: dict[str, Any], available: int) -> None:
    context = info.context_length or 131072
    result.max_micro_batch = _largest(lambda b: _fits(info, {**s, "micro_batch_size": b}, available), 1, MAX_SUGGESTED_BATCH)
    steps = _largest(lambda k: _fits(info, {**s, "seq_len": k * SEQ_STEP}, available), 1, max(1, context // SEQ_STEP))
    result.max_seq_len = steps * SEQ_STEP if steps else None
    out = result.suggestions
    fits_now = result.verdict == FITS
    if not fits_now:
        if result.max_micro_batch and result.max_micro_batch < s["micro_batch_size"]:
            accum = _ceil_div(s["micro_batch_size"] * s["grad_accum_steps"], result.max_micro_batch)
            out.append(Suggestion("train.micro_batch_size", result.max_micro_batch,
                                  f"Use micro-batch {result.max_micro_batch} (and grad_accum_steps {accum} to keep the batch size)."))
        if result.max_seq_len and result.max_seq_len < s["seq_len"]:
            out.append(Suggestion("data.max_seq_len", result.max_seq_len,
                                  f"Or shorten data.max_seq_len to {result.max_seq_len} tokens."))
    alternatives = []
    if not s["gradient_checkpointing"]:
        alternatives.append(("train.gradient_checkpointing", True, "Turn on gradient checkpointing"))
    if s["loss_impl"] == "standard" and not info.final_logit_softcapping:
        alternatives.append(("train.loss_impl", "chunked", "Use the chunked loss"))
    if s["optimizer"] not in PAGED_OPTIMIZERS:
        alternatives.append(("train.optimizer", "paged_adamw_32bit", "Use the paged optimizer (paged_adamw_32bit)"))
    key_of = {"train.gradient_checkpointing": "gradient_checkpointing", "train.loss_impl": "loss_impl", "train.optimizer": "optimizer"}
    if not fits_now:
        for setting, value, text in alternatives:
            other = _estimate(info, {**s, key_of[setting]: value})
            if other.peak * (1 + MARGIN) + other.paged <= available or (other.peak * (1 + MARGIN) <= available and result.verdict == DOES_NOT_FIT):
                out.append(Suggestion(setting, value, f"{text}: it would need {_gib(other.peak)}."))
    elif s["gradient_checkpointing"]:
        other = _estimate(info, {**s, "gradient_checkpointing": False})
        if other.peak * (1 + MARGIN) + other.paged <= available:
            out.append(Suggestion("train.gradient_checkpointing", False,
                                  f"Gradient checkpointing is not needed here (without it: {_gib(other.peak)}); turning it off makes steps faster."))
    if result.verdict == DOES_NOT_FIT and not result.max_micro_batch:
        out.append(Suggestion("model.name_or_path", None, "Even micro-batch 1 does not fit: pick a smaller model or a GPU with more memory."))


def _gib(n: int | float) -> str:
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
    except Exception:  # no driver, no GPU: NVML raises its own error types
        return None
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        return (name.decode() if isinstance(name, bytes) else str(name)), int(mem.total), int(mem.free)
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


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
            gpu_name = f"a {args.gpu_memory:g} GiB GPU"
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
    lines.append("")
    width = max(len(i.label) for i in result.items) + 2
    for item in result.items:
        lines.append(f"  {item.label:<{width}}{item.bytes / GiB:>9.2f} GiB")
    lines.append("  " + "-" * (width + 13))
    lines.append(f"  {'peak (' + result.phase + ')':<{width}}{result.peak / GiB:>9.2f} GiB")
    if result.paged:
        lines.append(f"  {'+ paged optimizer states':<{width}}{result.paged / GiB:>9.2f} GiB  (unified memory; moves to CPU RAM when the GPU is full)")
    lines.append("")
    if result.verdict is None:
        lines.append("Verdict   none: no GPU found (NVML); give --gpu-memory GB to judge against a card")
    else:
        lines.append(f"GPU       {gpu_name or 'GPU'}: {result.gpu_total / GiB:.1f} GiB total, {result.gpu_free / GiB:.1f} GiB free")
        lines.append(f"Verdict   {VERDICT_TEXT[result.verdict]}: {result.reason}")
        if result.max_micro_batch:
            lines.append(f"Largest   micro-batch {result.max_micro_batch} at {s['seq_len']} tokens; "
                         f"sequence length {result.max_seq_len} at micro-batch {s['micro_batch_size']}")
        for suggestion in result.suggestions:
            lines.append(f"Suggest   {suggestion.text}")
    for note in result.notes:
        lines.append(f"Note      {note}")
    return "\n".join(lines)
