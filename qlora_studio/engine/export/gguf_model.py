"""Hugging Face Llama, Mistral and Qwen2 checkpoints as GGUF: architecture, hyperparameters,
tensor names and types, written one tensor at a time with the ``gguf`` package's writer.

Names come from ``gguf.get_tensor_name_map``. One layout difference matters: llama.cpp's ``llama``
architecture (used for Llama and Mistral) rotates adjacent pairs of each attention head's query and
key dimensions, while Hugging Face's implementation rotates the first half of the head against the
second half. The rows of ``q_proj`` and ``k_proj`` (and of a LoRA ``B`` that updates them) are
therefore reordered per head, ``[x0..x(d/2-1), x(d/2)..x(d-1)] -> [x0, x(d/2), x1, x(d/2+1), ...]``,
which makes both rotations compute the same thing. Qwen2 uses llama.cpp's NEOX rotation, which is
Hugging Face's, so its rows stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from .errors import ExportError
from .gguf_vocab import Vocab
from .safetensors_io import TensorSpec


@dataclass(frozen=True)
class Arch:
    hf_name: str
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


ARCHITECTURES = {
    "LlamaForCausalLM": Arch("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA, True),
    "MistralForCausalLM": Arch("MistralForCausalLM", gguf.MODEL_ARCH.LLAMA, True),
    "Qwen2ForCausalLM": Arch("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2, False),
}

GGUF_TYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
FILE_TYPES = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}

#: Buffers some checkpoints carry that llama.cpp recomputes.
SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


def architecture(config: dict[str, Any], where: str) -> Arch:
    names = config.get("architectures") or []
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise ExportError(
        f"GGUF export supports Llama, Mistral and Qwen2 models, not {', '.join(names) or config.get('model_type', 'this model')}",
        where=where,
        fix="Export the merged format instead; llama.cpp's own converter may handle it.",
    )


class HParams:
    """The numbers llama.cpp needs, read from a Hugging Face config.json."""

    def __init__(self, config: dict[str, Any], where: str):
        try:
            self.hidden = int(config["hidden_size"])
            self.layers = int(config["num_hidden_layers"])
            self.heads = int(config["num_attention_heads"])
            self.ffn = int(config["intermediate_size"])
            self.vocab = int(config["vocab_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ExportError(f"config.json lacks {exc}", where=where) from None
        self.kv_heads = int(config.get("num_key_value_heads") or self.heads)
        self.head_dim = int(config.get("head_dim") or self.hidden // self.heads)
        self.context = int(config.get("max_position_embeddings") or 4096)
        self.rms_eps = float(config.get("rms_norm_eps", 1e-6))
        rope = dict(config.get("rope_parameters") or {})
        legacy = config.get("rope_scaling") or {}
        rope = {**legacy, **rope}
        self.rope_theta = float(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
        self.rope_type = rope.get("rope_type") or rope.get("type") or "default"
        self.rope = rope
        self.where = where

    def add_to(self, writer: gguf.GGUFWriter, arch: Arch) -> None:
        writer.add_context_length(self.context)
        writer.add_embedding_length(self.hidden)
        writer.add_block_count(self.layers)
        writer.add_feed_forward_length(self.ffn)
        writer.add_head_count(self.heads)
        writer.add_head_count_kv(self.kv_heads)
        writer.add_layer_norm_rms_eps(self.rms_eps)
        writer.add_rope_freq_base(self.rope_theta)
        writer.add_rope_dimension_count(self.head_dim)
        writer.add_vocab_size(self.vocab)
        if self.head_dim * self.heads != self.hidden:
            writer.add_key_length(self.head_dim)
            writer.add_value_length(self.head_dim)
        if self.rope_type == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(self.rope["factor"]))
        elif self.rope_type == "yarn":
            writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            writer.add_rope_scaling_factor(float(self.rope["factor"]))
            writer.add_rope_scaling_orig_ctx_len(int(self.rope.get("original_max_position_embeddings", self.context)))
        elif self.rope_type == "llama3" and arch.gguf_arch == gguf.MODEL_ARCH.LLAMA:
            pass  # expressed by the rope_freqs tensor (rope_frequency_factors)
        elif self.rope_type != "default":
            raise ExportError(f"RoPE scaling {self.rope_type!r} cannot be exported to GGUF here", where=self.where)

    def rope_frequency_factors(self, config: dict[str, Any]) -> torch.Tensor | None:
        """Llama 3.1's RoPE scaling as llama.cpp's per-frequency divisors (the ``rope_freqs`` tensor),
        computed from transformers' own implementation so both agree by construction."""
        if self.rope_type != "llama3":
            return None
        from transformers import AutoConfig
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        hf_config = AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
        scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
        base = 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim))
        return (base / scaled.float()).float()


def permute_for_rope(rows: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of each head from half-split to interleaved (see the module docstring)."""
    head = rows.shape[0] // n_heads
    return rows.reshape(n_heads, 2, head // 2, *rows.shape[1:]).transpose(1, 2).reshape(rows.shape)


class TensorNamer:
    """Hugging Face tensor names to GGUF names, and the per-tensor layout fixes."""

    def __init__(self, arch: Arch, hp: HParams):
        self.arch = arch
        self.hp = hp
        self.map = gguf.get_tensor_name_map(arch.gguf_arch, hp.layers)

    def gguf_name(self, hf_name: str) -> str | None:
        """None for tensors llama.cpp does not use; an error for tensors it would need but cannot name."""
        if hf_name.endswith(SKIPPED_SUFFIXES):
            return None
        name = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name} ({self.arch.name} architecture)",
                              fix="Export the merged format instead.")
        return name

    def fix_rows(self, hf_name: str, rows: torch.Tensor) -> torch.Tensor:
        """Apply the llama q/k row permutation to a weight, a bias or a LoRA B of ``hf_name``."""
        if not self.arch.permute_qk:
            return rows
        if ".q_proj." in hf_name:
            return permute_for_rope(rows, self.hp.heads)
        if ".k_proj." in hf_name:
            return permute_for_rope(rows, self.hp.kv_heads)
        return rows


def tensor_type(shape: tuple[int, ...], dtype: str) -> gguf.GGMLQuantizationType:
    """Vectors (norms, biases) stay float32, as llama.cpp expects; matrices take the chosen type.
    q8_0 needs rows that are a multiple of 32 values; other matrices fall back to f16."""
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    qtype = GGUF_TYPES[dtype]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else gguf.GGMLQuantizationType.F16


def nbytes(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    numel = int(np.prod(shape)) if shape else 1
    return numel // block * size


def to_gguf_array(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The bytes llama.cpp reads for ``tensor`` stored as ``qtype``."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return tensor.to(torch.float32).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.BF16:
        # torch rounds to bf16 to nearest even, like ggml; the raw 16-bit patterns are written as is.
        return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint8)
    return gguf.quants.quantize(tensor.to(torch.float32).contiguous().numpy(), qtype)


@dataclass
class PlannedTensor:
    hf_name: str | None  # None for tensors made here (rope_freqs)
    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType


def plan_tensors(specs: Iterable[TensorSpec], namer: TensorNamer, dtype: str, extra: dict[str, torch.Tensor]) -> list[PlannedTensor]:
    planned = [PlannedTensor(None, name, tuple(t.shape), gguf.GGMLQuantizationType.F32) for name, t in extra.items()]
    for spec in specs:
        name = namer.gguf_name(spec.name)
        if name is not None:
            planned.append(PlannedTensor(spec.name, name, spec.shape, tensor_type(spec.shape, dtype)))
    return planned


def write_gguf(
    path: Path,
    arch: Arch,
    metadata: Callable[[gguf.GGUFWriter], None],
    planned: list[PlannedTensor],
    stream: Iterator[tuple[str, torch.Tensor]],
    extra: dict[str, torch.Tensor],
    fix_rows: Callable[[str, torch.Tensor], torch.Tensor],
    on_tensor: Callable[[int], None] | None = None,
) -> None:
    """Write a GGUF file: metadata and tensor table first, then the tensors as ``stream`` yields them
    (Hugging Face names, in the order of ``planned``), so only one tensor is in memory at a time."""
    writer = gguf.GGUFWriter(path, arch.name)
    try:
        metadata(writer)
        for t in planned:
            writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), nbytes(t.shape, t.qtype), raw_dtype=t.qtype)
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in planned:
            if t.hf_name is None:
                tensor = extra[t.name]
            else:
                while True:
                    hf_name, tensor = next(stream)
                    if hf_name == t.hf_name:
                        break
                    if not hf_name.endswith(SKIPPED_SUFFIXES):
                        raise AssertionError(f"tensor stream out of order: {hf_name}, expected {t.hf_name}")
                tensor = fix_rows(t.hf_name, tensor)
            writer.write_tensor_data(to_gguf_array(tensor, t.qtype))
            if on_tensor is not None:
                on_tensor(nbytes(t.shape, t.qtype))
        writer.flush()
    finally:
        writer.close()


def model_metadata(arch: Arch, hp: HParams, vocab: Vocab, name: str, dtype: str) -> Callable[[gguf.GGUFWriter], None]:
    def add(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        hp.add_to(writer, arch)
        writer.add_file_type(FILE_TYPES[dtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        vocab.add_to(writer)

    return add
