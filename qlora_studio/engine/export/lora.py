"""A saved PEFT LoRA adapter, indexed by the base weight each low-rank pair updates.

PEFT computes ``y = W x + scale * B (A x)`` with ``scale = alpha / r`` (``alpha / sqrt(r)`` with
rsLoRA), where ``alpha`` and ``r`` may differ per module through ``alpha_pattern`` and
``rank_pattern``. Every exporter (merge, GGUF adapter) needs the pairs with their own scale, so
this module resolves them once and refuses adapters it cannot export faithfully (DoRA, trained
embeddings, biases on B) instead of silently dropping part of them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ExportError
from .safetensors_io import SafetensorsReader
from .source import ADAPTER_WEIGHTS, read_adapter_config

_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>A|B)\.weight$")


@dataclass(frozen=True)
class LoraPair:
    module: str  # e.g. model.layers.0.self_attn.q_proj
    a_key: str
    b_key: str
    rank: int
    alpha: float
    scale: float

    @property
    def weight_name(self) -> str:
        """The base model's tensor this pair updates."""
        return f"{self.module}.weight"


def _pattern_value(patterns: dict[str, float], module: str, default: float) -> float:
    """PEFT's rule: a pattern key matches a module name ending in it (as a regex), first match wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


class LoraAdapter:
    """The pairs of an adapter folder, read lazily from its safetensors file."""

    def __init__(self, adapter_dir: str | Path):
        self.folder = Path(adapter_dir)
        self.config = read_adapter_config(self.folder)
        self._check_config()
        self._reader = SafetensorsReader(self.folder / ADAPTER_WEIGHTS)
        self.pairs: dict[str, LoraPair] = self._index()

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> LoraAdapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_config(self) -> None:
        cfg = self.config
        where = str(self.folder / "adapter_config.json")
        if cfg.get("peft_type", "LORA") != "LORA":
            raise ExportError(f"a {cfg.get('peft_type')} adapter is not a LoRA adapter", where=where)
        unsupported = {
            "use_dora": "DoRA adapters",
            "fan_in_fan_out": "fan_in_fan_out adapters (GPT-2 style Conv1D layers)",
            "lora_bias": "adapters with a bias on B",
            "modules_to_save": "adapters that also train whole modules (modules_to_save)",
            "trainable_token_indices": "adapters that train token embeddings",
        }
        for key, what in unsupported.items():
            if cfg.get(key):
                raise ExportError(f"{what} cannot be exported", where=where,
                                  fix="Export the adapter format instead and use it with PEFT.")

    def _index(self) -> dict[str, LoraPair]:
        halves: dict[str, dict[str, str]] = {}
        for key in self._reader.names():
            m = _KEY.match(key)
            if m is None:
                what = "trained embeddings (lora_embedding_*)" if "lora_embedding" in key else f"tensor {key}"
                raise ExportError(f"the adapter holds {what}, which this exporter does not support",
                                  where=str(self.folder), fix="Export the adapter format instead and use it with PEFT.")
            halves.setdefault(m.group("module"), {})[m.group("ab")] = key
        alpha = float(self.config.get("lora_alpha", 8))
        alpha_pattern = {k: float(v) for k, v in (self.config.get("alpha_pattern") or {}).items()}
        rslora = bool(self.config.get("use_rslora"))
        pairs = {}
        for module, keys in halves.items():
            if set(keys) != {"A", "B"}:
                raise ExportError(f"module {module} has only half of its LoRA pair", where=str(self.folder))
            a_shape = self._reader.spec(keys["A"]).shape
            b_shape = self._reader.spec(keys["B"]).shape
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise ExportError(f"module {module} has LoRA shapes A {a_shape}, B {b_shape} that do not fit", where=str(self.folder))
            rank = a_shape[0]
            module_alpha = _pattern_value(alpha_pattern, module, alpha)
            scale = module_alpha / (math.sqrt(rank) if rslora else rank)
            pair = LoraPair(module, keys["A"], keys["B"], rank, module_alpha, scale)
            pairs[pair.weight_name] = pair
        if not pairs:
            raise ExportError("the adapter holds no LoRA weights", where=str(self.folder))
        return pairs

    def shapes(self, weight_name: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        pair = self.pairs[weight_name]
        return self._reader.spec(pair.a_key).shape, self._reader.spec(pair.b_key).shape

    def a(self, weight_name: str) -> torch.Tensor:
        return self._reader.read(self.pairs[weight_name].a_key).float()

    def b(self, weight_name: str) -> torch.Tensor:
        return self._reader.read(self.pairs[weight_name].b_key).float()

    def delta(self, weight_name: str) -> torch.Tensor:
        """``scale * B @ A`` in float32: the update the adapter adds to that weight."""
        pair = self.pairs[weight_name]
        return (self.b(weight_name) @ self.a(weight_name)).mul_(pair.scale)
