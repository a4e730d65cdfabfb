"""modelinfo: config.json from a folder or the hub cache, and the shape and counts it implies."""

from __future__ import annotations

import json

import pytest

from qlora_studio.engine import modelinfo
from qlora_studio.errors import ModelError

from .shapes import LLAMA_1B, LLAMA_8B, write_model_folder

# --- reading config.json ---------------------------------------------------------------------


def test_reads_a_local_folder_and_the_file_itself(tmp_path):
    folder = write_model_folder(tmp_path / "m", LLAMA_1B)
    assert modelinfo.read_model_config(str(folder)) == LLAMA_1B
    assert modelinfo.read_model_config(str(folder / "config.json")) == LLAMA_1B


@pytest.mark.parametrize("content, message", [
    ("{\n  \"hidden_size\": 2048,\n  oops\n}", r"not valid JSON \(line 3"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_malformed_config_json(tmp_path, content, message):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(content, encoding="utf-8")
    with pytest.raises(ModelError, match=message) as err:
        modelinfo.read_model_config(str(folder))
    assert str(folder / "config.json") in str(err.value)


def test_not_utf8_config(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_bytes(b'{"a": "\xff\xfe"}')
    with pytest.raises(ModelError, match="not UTF-8"):
        modelinfo.read_model_config(str(folder))


def test_folder_without_config_and_missing_paths(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json in the model folder"):
        modelinfo.read_model_config(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="model folder not found"):
        modelinfo.read_model_config(str(tmp_path / "nowhere" / "model"))
    with pytest.raises(ModelError, match="model folder not found"):
        modelinfo.read_model_config("./no-such-model")
    with pytest.raises(ModelError, match="no model given"):
        modelinfo.read_model_config("  ")


def _cache_model(cache, repo_id: str, files: dict[str, str | bytes]):
    """A Hugging Face cache entry as huggingface_hub lays it out: refs/main -> a snapshot folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo_id.replace("/", "--"))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, content in files.items():
        path = snapshot / name
        path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return snapshot


def test_hub_id_with_only_config_json_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _cache_model(tmp_path, "org/tiny-llama", {"config.json": json.dumps(LLAMA_8B)})
    assert modelinfo.read_model_config("org/tiny-llama", cache_dir=tmp_path) == LLAMA_8B
    # config.json alone is not a downloaded model
    assert modelinfo.is_cached("org/tiny-llama", cache_dir=tmp_path) is False


def test_hub_id_not_cached_while_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set") as err:
        modelinfo.read_model_config("org/absent", cache_dir=tmp_path)
    assert "org/absent" in str(err.value)


def test_invalid_hub_id(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="not a valid hub id"):
        modelinfo.read_model_config("org/bad name!", cache_dir=tmp_path)


def test_is_cached_needs_every_shard(tmp_path):
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    snapshot = _cache_model(tmp_path, "org/sharded", {
        "config.json": json.dumps(LLAMA_8B),
        "model.safetensors.index.json": json.dumps(index),
        "model-00001-of-00002.safetensors": b"x",
    })
    assert modelinfo.is_cached("org/sharded", cache_dir=tmp_path) is False
    (snapshot / "model-00002-of-00002.safetensors").write_bytes(b"x")
    assert modelinfo.is_cached("org/sharded", cache_dir=tmp_path) is True
    _cache_model(tmp_path, "org/single", {"config.json": "{}", "model.safetensors": b"x"})
    assert modelinfo.is_cached("org/single", cache_dir=tmp_path) is True
    assert modelinfo.is_cached("org/never-seen", cache_dir=tmp_path) is False


# --- describing a config -----------------------------------------------------------------------


def test_llama_shapes_and_published_parameter_counts():
    small, big = modelinfo.describe(LLAMA_1B), modelinfo.describe(LLAMA_8B)
    # Llama-3.2-1B has 1,235,814,400 parameters, Llama-3.1-8B 8,030,261,248.
    assert small.param_count == 1_235_814_400
    assert big.param_count == 8_030_261_248
    assert (big.layers, big.hidden_size, big.intermediate_size, big.heads, big.kv_heads, big.head_dim) == (32, 4096, 14336, 32, 8, 128)
    assert big.context_length == 131072 and big.vocab_size == 128256
    assert small.tie_word_embeddings and small.head_params == 0
    assert big.head_params == big.embedding_params == 128256 * 4096
    for info in (small, big):
        assert info.quantizable_params + info.unquantized_params == info.param_count
        assert info.unquantized_params == info.embedding_params + info.head_params + info.norm_params + info.bias_params
    assert big.quantizable_params == 32 * (4096 * (4096 + 1024 + 1024 + 4096) + 3 * 4096 * 14336)


def test_linear_module_names():
    assert modelinfo.linear_module_names(LLAMA_1B) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    phi3 = {**LLAMA_1B, "model_type": "phi3", "architectures": ["Phi3ForCausalLM"]}
    assert modelinfo.linear_module_names(phi3) == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def test_nested_text_config():
    """A multimodal Gemma-3-like config: the language model sits in text_config."""
    config = {
        "architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3",
        "text_config": {"model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240,
                        "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
                        "vocab_size": 262208, "max_position_embeddings": 131072},
        "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                          "image_size": 896, "patch_size": 14, "vision_use_head": False},
    }
    info = modelinfo.describe(config)
    assert (info.architecture, info.model_type, info.layers, info.head_dim) == ("Gemma3ForConditionalGeneration", "gemma3_text", 34, 256)
    assert info.tie_word_embeddings and info.norms_per_layer == 4 and info.qk_norm
    assert info.vision_linears and any("vision" in note for note in info.notes)
    text_only = modelinfo.describe({**config["text_config"], "architectures": ["Gemma3ForCausalLM"]})
    assert info.param_count > text_only.param_count


@pytest.mark.parametrize("config, message", [
    ({"architectures": ["BertForMaskedLM"], "model_type": "bert", "hidden_size": 768}, "not a causal language model"),
    ({"architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "is_encoder_decoder": True}, "not a causal language model"),
    ({**LLAMA_1B, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "num_local_experts": 8}, "mixture-of-experts"),
    ({**LLAMA_1B, "hidden_size": None}, "no usable hidden_size"),
    ({**LLAMA_1B, "num_key_value_heads": 5}, "does not divide"),
])
def test_clear_errors(config, message):
    with pytest.raises(ModelError, match=message):
        modelinfo.describe(config, where="config.json")


def test_sliding_window_only_when_used():
    mistral = {**LLAMA_1B, "model_type": "mistral", "architectures": ["MistralForCausalLM"], "sliding_window": 4096}
    assert modelinfo.describe(mistral).sliding_window == 4096
    qwen2 = {**LLAMA_1B, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4096,
             "use_sliding_window": False}
    assert modelinfo.describe(qwen2).sliding_window is None


def test_unknown_llama_like_type_is_read_with_a_note():
    info = modelinfo.describe({**LLAMA_1B, "architectures": ["NovelForCausalLM"], "model_type": "novel"})
    assert info.param_count == modelinfo.describe(LLAMA_1B).param_count
    assert any("read as Llama-like" in note for note in info.notes)


# Small configs of every family the estimate knows, checked against transformers' own modules.
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "granite", "olmo2",
            "smollm3", "glm4", "exaone4"]


@pytest.mark.parametrize("model_type", FAMILIES)
def test_counts_and_linear_names_match_transformers(model_type):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        model_type, hidden_size=256, intermediate_size=640, num_hidden_layers=3, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, vocab_size=1000, pad_token_id=0,
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    as_json = {**config.to_dict(), "architectures": [type(model).__name__]}
    info = modelinfo.describe(as_json)
    linear = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}
    assert info.param_count == sum(p.numel() for p in model.parameters())
    assert info.quantizable_params == sum(m.weight.numel() for m in linear.values())
    assert sorted(modelinfo.linear_module_names(as_json)) == sorted({n.rsplit(".", 1)[-1] for n in linear})
