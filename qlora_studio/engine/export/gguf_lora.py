"""A PEFT LoRA adapter as a llama.cpp GGUF adapter (``--lora`` / ``llama_adapter_lora_init``).

What llama.cpp expects (src/llama-adapter.cpp, llama-graph.cpp): ``general.type = adapter``,
``adapter.type = lora``, ``adapter.lora.alpha``, the architecture of the base GGUF, and for every
adapted weight ``W`` (GGUF name ``N``) two tensors ``N.lora_a`` and ``N.lora_b``. In ggml's
column-major terms ``W`` is ``[n_in, n_out]``, ``lora_a`` is ``[n_in, r]`` and ``lora_b`` is
``[r, n_out]``; as row-major arrays these are exactly PEFT's ``lora_A.weight`` (``r x n_in``) and
``lora_B.weight`` (``n_out x r``). llama.cpp adds ``alpha / r * B (A x)`` with ``r`` read from each
``lora_b``; a module whose PEFT scale differs from that (rsLoRA, ``alpha_pattern``) has the ratio
folded into its ``B``. ``B`` of a query or key projection gets the same row permutation as the
weight itself in the ``llama`` architecture (gguf_model.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import torch

from .gguf_model import Arch, PlannedTensor, TensorNamer, write_gguf
from .lora import LoraAdapter


def adapter_plan(adapter: LoraAdapter, namer: TensorNamer, order: list[str]) -> list[PlannedTensor]:
    """``lora_a`` / ``lora_b`` pairs (float32) in the base model's tensor order."""
    planned = []
    for weight in order:
        if weight not in adapter.pairs:
            continue
        name = namer.gguf_name(weight)
        a_shape, b_shape = adapter.shapes(weight)
        planned.append(PlannedTensor(f"{weight}#a", f"{name}.lora_a", a_shape, gguf.GGMLQuantizationType.F32))
        planned.append(PlannedTensor(f"{weight}#b", f"{name}.lora_b", b_shape, gguf.GGMLQuantizationType.F32))
    return planned


def global_alpha(adapter: LoraAdapter) -> float:
    return float(adapter.config.get("lora_alpha", 8))


def write_lora_gguf(path: Path, adapter: LoraAdapter, namer: TensorNamer, arch: Arch, order: list[str], name: str,
                    on_tensor: Callable[[int], None] | None = None) -> None:
    planned = adapter_plan(adapter, namer, order)
    alpha = global_alpha(adapter)

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)

    def stream():
        for t in planned:
            weight, half = t.hf_name.rsplit("#", 1)
            if half == "a":
                yield t.hf_name, adapter.a(weight)
            else:
                pair = adapter.pairs[weight]
                b = adapter.b(weight)
                llama_scale = alpha / pair.rank
                if abs(pair.scale - llama_scale) > 1e-12 * max(1.0, abs(llama_scale)):
                    b = b * (pair.scale / llama_scale)
                yield t.hf_name, b

    def fix_rows(key: str, tensor: torch.Tensor) -> torch.Tensor:
        weight, half = key.rsplit("#", 1)
        return namer.fix_rows(weight, tensor) if half == "b" else tensor

    write_gguf(path, arch, metadata, planned, stream(), {}, fix_rows, on_tensor)
