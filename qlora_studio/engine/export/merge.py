"""Merging a LoRA adapter into 16-bit weights, one tensor at a time.

The base's original safetensors shards are read tensor by tensor; each weight that has a LoRA pair
becomes ``W + scale * B @ A`` (computed in float32, rounded once to the output dtype), and the
result is streamed to new shards. Peak memory is about the largest tensor plus its update -- a
7B model merges in a few GB of RAM, without a GPU (see bench/export_merge_memory.py).

Two choices of ``W`` (the model card records which):

* ``original`` (default): the base's own 16-bit weights. The adapter was trained against the
  4-bit NF4 weights ``Q(W)``, so the merged model differs from the trained one by ``W - Q(W)``,
  the quantization error -- which is the error the base was deployed with anyway; this is what
  the QLoRA paper and PEFT's merge do for a 16-bit model.
* ``dequantized``: ``Q(W)``, the NF4 weights dequantized again (the same bitsandbytes routines the
  training used), for every layer that was quantized. This reproduces exactly the model you trained
  and evaluated, quantization error included, in 16-bit form.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ExportError
from .lora import LoraAdapter
from .safetensors_io import SafetensorsReader, SafetensorsWriter, TensorSpec
from .source import MODEL_SIDE_FILES, ExportSource, model_config

MERGE_BASES = ("original", "dequantized")
DEFAULT_SHARD_BYTES = 5 * 1000**3

Progress = Callable[[float, str], None]

_16BIT = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def _config_dtype(cfg: dict[str, Any]) -> str | None:
    return cfg.get("dtype") or cfg.get("torch_dtype")


def output_dtype(base_config: dict[str, Any]) -> torch.dtype:
    """The base's 16-bit dtype; bf16 for a base stored in float32 (its range is float32's)."""
    return _16BIT.get(str(_config_dtype(base_config)), torch.bfloat16)


@dataclass(frozen=True)
class QuantSettings:
    """How the training quantized the base: needed to reproduce ``Q(W)`` for a dequantized merge."""

    quant_type: str = "nf4"
    double_quant: bool = True
    dtype: torch.dtype = torch.bfloat16
    blocksize: int = 64

    @classmethod
    def from_source(cls, source: ExportSource) -> QuantSettings:
        if source.cfg is None:
            return cls()
        compute = source.cfg.quant.compute_dtype
        dtype = {"float16": torch.float16, "float32": torch.float32}.get(compute, torch.bfloat16)
        return cls(source.cfg.quant.quant_type, source.cfg.quant.double_quant, dtype)

    def roundtrip(self, weight: torch.Tensor) -> torch.Tensor:
        """``Q(W)``: quantize to 4 bits and back, as bitsandbytes did when the base was loaded."""
        import bitsandbytes.functional as bnbf

        w = weight.to(self.dtype)
        packed, state = bnbf.quantize_4bit(w, blocksize=self.blocksize, compress_statistics=self.double_quant,
                                           quant_type=self.quant_type)
        return bnbf.dequantize_4bit(packed, state).to(self.dtype)


def quantized_weight_names(folder: Path, trust_remote_code: bool = False) -> set[str]:
    """Weights that transformers' bitsandbytes integration turns into 4-bit: every ``nn.Linear``
    except the output head. Found on a weightless (meta-device) instance of the architecture."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    head = model.get_output_embeddings()
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and module is not head}


class MergePlan:
    """The merged model's tensors: their specifications up front, their values as a stream."""

    def __init__(self, source: ExportSource, merge_base: str = "original"):
        if merge_base not in MERGE_BASES:
            raise ExportError(f"merge base {merge_base!r} is not one of {', '.join(MERGE_BASES)}")
        self.source = source
        self.merge_base = merge_base
        self.folder = source.base_folder()
        self.files = source.base_weight_files()
        self.base_config = model_config(self.folder)
        if self.base_config.get("quantization_config"):
            raise ExportError(
                "the base model is stored pre-quantized, so its original 16-bit weights are not there to merge into",
                where=str(self.folder),
                fix="Point model.name_or_path in the run's config.toml to the original 16-bit model, or export the adapter format.",
            )
        self.dtype = output_dtype(self.base_config)
        self.adapter = LoraAdapter(source.adapter_dir)
        self.quant = QuantSettings.from_source(source)
        self.quantized: set[str] = set()
        if merge_base == "dequantized":
            trust = bool(source.cfg and source.cfg.model.trust_remote_code)
            self.quantized = quantized_weight_names(self.folder, trust)
        self.specs = self._specs()

    def close(self) -> None:
        self.adapter.close()

    def _out_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return self.dtype if dtype.is_floating_point else dtype

    def _specs(self) -> list[TensorSpec]:
        specs: list[TensorSpec] = []
        for file in self.files:
            with SafetensorsReader(file) as reader:
                for name in reader.names():
                    spec = reader.spec(name)
                    specs.append(TensorSpec(name, self._out_dtype(spec.dtype), spec.shape))
        by_name = {s.name: s for s in specs}
        for weight, pair in self.adapter.pairs.items():
            spec = by_name.get(weight)
            if spec is None:
                raise ExportError(
                    f"the adapter updates {weight}, which the base model does not have",
                    where=str(self.folder),
                    fix="Check that model.name_or_path in the run's config.toml is the model the adapter was trained on.",
                )
            a_shape, b_shape = self.adapter.shapes(weight)
            if spec.shape != (b_shape[0], a_shape[1]):
                raise ExportError(f"the adapter's {pair.module} is {b_shape[0]}x{a_shape[1]}, the base weight is "
                                  f"{'x'.join(map(str, spec.shape))}", where=str(self.folder),
                                  fix="The adapter was trained on another model.")
        return specs

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self.specs)

    def merge_one(self, name: str, tensor: torch.Tensor, apply_adapter: bool = True) -> torch.Tensor:
        if not apply_adapter:
            return tensor.to(self._out_dtype(tensor.dtype))
        if name in self.quantized:
            tensor = self.quant.roundtrip(tensor)
        if name in self.adapter.pairs:
            merged = tensor.float()
            merged += self.adapter.delta(name)
            return merged.to(self.dtype)
        return tensor.to(self._out_dtype(tensor.dtype))

    def tensors(self, progress: Progress | None = None, apply_adapter: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """``(name, merged tensor)`` in the order of :attr:`specs`; the base's own weights (in the
        output dtype) with ``apply_adapter=False``."""
        done, total = 0, max(self.total_bytes, 1)
        for file in self.files:
            with SafetensorsReader(file) as reader:
                for name in reader.names():
                    merged = self.merge_one(name, reader.read(name), apply_adapter)
                    yield name, merged
                    done += merged.numel() * merged.element_size()
                    if progress is not None:
                        progress(done / total, f"merging {name}")

    def describe(self) -> dict[str, Any]:
        return {
            "merge_base": self.merge_base,
            "dtype": str(self.dtype).replace("torch.", ""),
            "lora_modules": len(self.adapter.pairs),
            "quant_type": self.quant.quant_type,
            "double_quant": self.quant.double_quant,
        }


def shard_specs(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive groups of at most ``max_bytes`` (a larger tensor gets a shard of its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def estimate_merged_bytes(plan: MergePlan) -> int:
    return plan.total_bytes + sum(p.stat().st_size for p in side_files(plan.folder))


def side_files(folder: Path) -> list[Path]:
    return [folder / n for n in MODEL_SIDE_FILES if (folder / n).is_file()]


def write_merged_model(plan: MergePlan, out: Path, progress: Progress | None = None,
                       max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> list[Path]:
    """Write a Hugging Face model folder (sharded safetensors, config, tokenizer) into ``out``."""
    shards = shard_specs(plan.specs, max_shard_bytes)
    if len(shards) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    stream = plan.tensors(progress)
    written = []
    for name, group in zip(names, shards):
        with SafetensorsWriter(out / name, group, {"format": "pt"}) as writer:
            for spec in group:
                tensor_name, tensor = next(stream)
                writer.write(tensor_name, tensor)
        written.append(out / name)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": plan.total_bytes},
            "weight_map": {spec.name: name for name, group in zip(names, shards) for spec in group},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    for path in side_files(plan.folder):
        shutil.copyfile(path, out / path.name)
    config = dict(plan.base_config)
    dtype_name = str(plan.dtype).replace("torch.", "")
    config["dtype"] = dtype_name
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype_name
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return written
