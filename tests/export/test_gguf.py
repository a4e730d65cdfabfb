"""GGUF structure, checked with gguf.GGUFReader: names, shapes, types, metadata, and the values of
the tensors whose layout llama.cpp changes (the llama q/k row permutation)."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch

from qlora_studio.engine.export import export
from qlora_studio.engine.export.gguf_model import permute_for_rope

ARCH = {"llama_run": "llama", "mistral_run": "llama", "qwen2_run": "qwen2"}


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def _hf_weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


@pytest.fixture(scope="module")
def exports(tmp_path_factory, request):
    """One f16 export with the base GGUF per architecture, made on first use."""
    made = {}

    def get(fixture: str):
        if fixture not in made:
            tiny = request.getfixturevalue(fixture)
            out = export(tiny.run, "gguf", out=tmp_path_factory.mktemp("gguf") / fixture, gguf_include_base=True)
            merged = export(tiny.run, "merged", out=tmp_path_factory.mktemp("merged") / fixture)
            made[fixture] = (tiny, out, merged)
        return made[fixture]

    return get


@pytest.mark.parametrize("fixture", list(ARCH))
def test_model_gguf_structure(fixture, exports):
    tiny, out, merged = exports(fixture)
    config = json.loads((tiny.model / "config.json").read_text())
    reader = gguf.GGUFReader(out / "run-f16.gguf")
    arch = ARCH[fixture]
    assert _field(reader, "general.architecture") == arch
    assert _field(reader, "general.type") == "model"
    assert _field(reader, f"{arch}.block_count") == config["num_hidden_layers"]
    assert _field(reader, f"{arch}.embedding_length") == config["hidden_size"]
    assert _field(reader, f"{arch}.feed_forward_length") == config["intermediate_size"]
    assert _field(reader, f"{arch}.attention.head_count") == config["num_attention_heads"]
    assert _field(reader, f"{arch}.attention.head_count_kv") == config["num_key_value_heads"]
    assert _field(reader, f"{arch}.rope.dimension_count") == config["hidden_size"] // config["num_attention_heads"]
    assert _field(reader, f"{arch}.context_length") == config["max_position_embeddings"]
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_F16

    tensors = {t.name: t for t in reader.tensors}
    layers = range(config["num_hidden_layers"])
    expected = {"token_embd.weight", "output_norm.weight"}
    expected |= {f"blk.{i}.{n}.weight" for i in layers for n in (
        "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")}
    if not config["tie_word_embeddings"]:
        expected.add("output.weight")
    if arch == "qwen2":
        expected |= {f"blk.{i}.attn_{n}.bias" for i in layers for n in "qkv"}
    assert set(tensors) == expected

    hf = _hf_weights(merged)
    hidden, kv = config["hidden_size"], config["num_key_value_heads"] * config["hidden_size"] // config["num_attention_heads"]
    assert list(tensors["blk.0.attn_k.weight"].shape) == [hidden, kv]  # GGUF lists the fastest dimension first
    assert list(tensors["token_embd.weight"].shape) == [hidden, config["vocab_size"]]
    for name, t in tensors.items():
        wanted = gguf.GGMLQuantizationType.F32 if len(t.shape) == 1 else gguf.GGMLQuantizationType.F16
        assert t.tensor_type == wanted, name

    # Values: the merged weights, with q/k rows permuted for llama.cpp's llama architecture only.
    q = torch.from_numpy(np.array(tensors["blk.1.attn_q.weight"].data, dtype=np.float32))
    k = torch.from_numpy(np.array(tensors["blk.1.attn_k.weight"].data, dtype=np.float32))
    hf_q = hf["model.layers.1.self_attn.q_proj.weight"].float()
    hf_k = hf["model.layers.1.self_attn.k_proj.weight"].float()
    if arch == "llama":
        hf_q = permute_for_rope(hf_q, config["num_attention_heads"])
        hf_k = permute_for_rope(hf_k, config["num_key_value_heads"])
    assert torch.allclose(q, hf_q, atol=1e-3, rtol=1e-3)
    assert torch.allclose(k, hf_k, atol=1e-3, rtol=1e-3)
    down = torch.from_numpy(np.array(tensors["blk.0.ffn_down.weight"].data, dtype=np.float32))
    assert torch.allclose(down, hf["model.layers.0.mlp.down_proj.weight"].float(), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("fixture", list(ARCH))
def test_tokenizer_metadata(fixture, exports):
    from transformers import AutoTokenizer

    tiny, out, _ = exports(fixture)
    tok = AutoTokenizer.from_pretrained(tiny.model)
    config = json.loads((tiny.model / "config.json").read_text())
    reader = gguf.GGUFReader(out / "run-f16.gguf")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == config["vocab_size"]
    vocab = tok.get_vocab()
    assert all(tokens[i] == t for t, i in vocab.items())
    assert types[tok.eos_token_id] == gguf.TokenType.CONTROL
    assert types[-1] == gguf.TokenType.UNUSED  # padding rows past the tokenizer's vocabulary
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tok.eos_token_id
    assert _field(reader, "tokenizer.ggml.bos_token_id") == tok.bos_token_id
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    template = _field(reader, "tokenizer.chat_template")
    if fixture == "mistral_run":
        assert _field(reader, "tokenizer.ggml.model") == "llama"
        assert "tokenizer.ggml.merges" not in reader.fields
        scores = _field(reader, "tokenizer.ggml.scores")
        assert types[vocab["<0x41>"]] == gguf.TokenType.BYTE and types[vocab["<unk>"]] == gguf.TokenType.UNKNOWN
        assert scores[vocab["\u2581the"]] > scores[vocab["\u2581capital"]]  # earlier merge, higher score
        assert _field(reader, "tokenizer.ggml.add_space_prefix") is True
    else:
        assert _field(reader, "tokenizer.ggml.model") == "gpt2"
        assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
        merges = _field(reader, "tokenizer.ggml.merges")
        assert merges[0] == " ".join(json.loads((tiny.model / "tokenizer.json").read_text())["model"]["merges"][0])
    if fixture == "qwen2_run":
        assert template == tok.chat_template
    else:  # no template of its own: the project's default, which training used
        assert "### Assistant:" in template


@pytest.mark.parametrize("fixture", list(ARCH))
def test_lora_gguf_structure(fixture, exports):
    tiny, out, _ = exports(fixture)
    adapter_cfg = json.loads((tiny.run / "adapter" / "adapter_config.json").read_text())
    reader = gguf.GGUFReader(out / "run-lora-f32.gguf")
    assert _field(reader, "general.type") == "adapter"
    assert _field(reader, "general.architecture") == ARCH[fixture]
    assert _field(reader, "adapter.type") == "lora"
    assert _field(reader, "adapter.lora.alpha") == pytest.approx(adapter_cfg["lora_alpha"])
    model = {t.name: t for t in gguf.GGUFReader(out / "run-f16.gguf").tensors}
    tensors = {t.name: t for t in reader.tensors}
    pairs = {n.rsplit(".", 1)[0] for n in tensors}
    assert len(pairs) == 2 * 7 and len(tensors) == 2 * len(pairs)
    r = adapter_cfg["r"]
    for weight in pairs:
        n_in, n_out = (int(d) for d in model[weight].shape)
        a, b = tensors[f"{weight}.lora_a"], tensors[f"{weight}.lora_b"]
        assert [int(d) for d in a.shape] == [n_in, r] and [int(d) for d in b.shape] == [r, n_out]
        assert a.tensor_type == b.tensor_type == gguf.GGMLQuantizationType.F32


def test_base_gguf_plus_lora_equals_merged_weights(exports):
    """base + alpha/r * B A, computed from the GGUF files the way llama.cpp does, is the merged GGUF."""
    _, out, _ = exports("llama_run")
    base = {t.name: t for t in gguf.GGUFReader(next(out.glob("base-*.gguf"))).tensors}
    merged = {t.name: t for t in gguf.GGUFReader(out / "run-f16.gguf").tensors}
    lora_reader = gguf.GGUFReader(out / "run-lora-f32.gguf")
    lora = {t.name: t for t in lora_reader.tensors}
    alpha = _field(lora_reader, "adapter.lora.alpha")
    for name in ("blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_up.weight"):
        a = torch.from_numpy(np.array(lora[f"{name}.lora_a"].data))
        b = torch.from_numpy(np.array(lora[f"{name}.lora_b"].data))
        w = torch.from_numpy(np.array(base[name].data, dtype=np.float32))
        rebuilt = w + alpha / a.shape[0] * (b @ a)
        expected = torch.from_numpy(np.array(merged[name].data, dtype=np.float32))
        assert torch.allclose(rebuilt, expected, atol=2e-3, rtol=1e-2), name


@pytest.mark.parametrize("dtype, qtype", [("bf16", gguf.GGMLQuantizationType.BF16), ("q8_0", gguf.GGMLQuantizationType.Q8_0)])
def test_other_weight_types(dtype, qtype, llama_run, tmp_path):
    out = export(llama_run.run, "gguf", out=tmp_path / dtype, gguf_dtype=dtype)
    reader = gguf.GGUFReader(out / f"run-{dtype}.gguf")
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == qtype and types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    up = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    values = gguf.quants.dequantize(np.array(up.data), qtype)
    from safetensors.torch import load_file

    merged = export(llama_run.run, "merged", out=tmp_path / "merged")
    hf = load_file(merged / "model.safetensors")["model.layers.0.mlp.up_proj.weight"].float().numpy()
    assert np.abs(values.reshape(hf.shape) - hf).max() < 0.01 * np.abs(hf).max()


def test_modelfile_and_card(exports):
    _, out, _ = exports("llama_run")
    modelfile = (out / "Modelfile").read_text()
    assert "FROM ./run-f16.gguf" in modelfile
    assert "ADAPTER ./run-lora-f32.gguf" in modelfile
    assert "{{ .Prompt }}" in modelfile and 'PARAMETER stop "</s>"' in modelfile
    card = (out / "README.md").read_text()
    assert "run-f16.gguf" in card and "run-lora-f32.gguf" in card and "original 16-bit weights" in card


def test_unsupported_architecture_is_refused(llama_run, tmp_path):
    import shutil

    from qlora_studio.engine.export import ExportError

    base = tmp_path / "base"
    shutil.copytree(llama_run.model, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (base / "config.json").write_text(json.dumps(cfg))
    run = tmp_path / "run"
    shutil.copytree(llama_run.run, run)
    (run / "config.toml").write_text((run / "config.toml").read_text().replace(str(llama_run.model), str(base)))
    with pytest.raises(ExportError, match="Llama, Mistral and Qwen2"):
        export(run, "gguf", out=tmp_path / "gguf")
    assert not (tmp_path / "gguf").exists()
