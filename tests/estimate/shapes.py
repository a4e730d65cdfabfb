"""Model configs for the estimate's tests: real shapes as config.json dictionaries, no weights."""

from __future__ import annotations

import json
from pathlib import Path

from qlora_studio import config as C

#: Llama-3.2-1B and Llama-3.1-8B, as their config.json files describe them.
LLAMA_1B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
    "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
    "vocab_size": 128256, "max_position_embeddings": 131072, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}
LLAMA_8B = {
    **LLAMA_1B, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "head_dim": 128,
    "tie_word_embeddings": False,
}


def run_config(**sections) -> C.RunConfig:
    """A run configuration with the defaults, some keys changed: ``run_config(train={...})``."""
    return C.replace(C.RunConfig(), **sections)


def write_model_folder(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder
