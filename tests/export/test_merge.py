"""The merged format: transformers loads it and its logits are base + adapter within bf16 rounding."""

from __future__ import annotations

import json

import pytest
import torch

from qlora_studio.engine.export import ExportError, export
from qlora_studio.engine.export import source as source_mod
from qlora_studio.engine.export.merge import MergePlan, write_merged_model


def _logits(folder, sample, **kwargs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return model(sample).logits


@pytest.mark.parametrize("fixture", ["llama_run", "qwen2_run"])
def test_merged_model_matches_base_plus_adapter(fixture, request, tmp_path):
    tiny = request.getfixturevalue(fixture)
    out = export(tiny.run, "merged", out=tmp_path / "merged")
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert (out / "tokenizer.json").is_file() and (out / "README.md").is_file()
    merged = _logits(out, tiny.sample)
    reference = tiny.logits[1]
    base = _logits(tiny.model, tiny.sample)
    error = (merged - reference).abs().max().item()
    effect = (base - reference).abs().max().item()
    # bf16 keeps 8 significant bits: rounding each merged weight moves the logits by well under 2 %
    # of their range, while forgetting the adapter would move them by far more.
    assert error < 0.02 * reference.abs().max().item()
    assert error < 0.1 * effect
    assert "original 16-bit weights" in (out / "README.md").read_text()


def test_sharded_output_loads_with_its_index(llama_run, tmp_path):
    src = source_mod.resolve(llama_run.run)
    plan = MergePlan(src)
    try:
        out = tmp_path / "sharded"
        out.mkdir()
        files = write_merged_model(plan, out, max_shard_bytes=100_000)
    finally:
        plan.close()
    assert len(files) > 3
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in files}
    whole = export(llama_run.run, "merged", out=tmp_path / "whole")
    assert torch.equal(_logits(out, llama_run.sample), _logits(whole, llama_run.sample))


def test_dequantized_merge_reproduces_the_4bit_trained_model(llama_run, tmp_path):
    """Merging into Q(W) gives the model QLoRA trained: a 4-bit NF4 base with the adapter on top."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    out = export(llama_run.run, "merged", out=tmp_path / "dq", merge_base="dequantized")
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    base4 = AutoModelForCausalLM.from_pretrained(llama_run.model, quantization_config=quant, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"})
    qlora = PeftModel.from_pretrained(base4, llama_run.run / "adapter").eval()
    with torch.no_grad():
        trained = qlora(llama_run.sample).logits.float()
    dequantized = _logits(out, llama_run.sample)
    original = _logits(export(llama_run.run, "merged", out=tmp_path / "orig"), llama_run.sample)
    # The 4-bit model computes in bf16; the merged one is read back in float32.
    assert (dequantized - trained).abs().max() < 0.05 * trained.abs().max()
    assert (dequantized - trained).abs().max() < 0.5 * (original - trained).abs().max()
    assert "dequantized NF4 weights" in (out / "README.md").read_text()


def _run_with_base(llama_run, tmp_path, base):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(llama_run.run, run)
    (run / "config.toml").write_text((run / "config.toml").read_text().replace(str(llama_run.model), str(base)))
    return run


def test_missing_base_folder_is_refused(llama_run, tmp_path):
    run = _run_with_base(llama_run, tmp_path, tmp_path / "nowhere")
    with pytest.raises(ExportError, match="no longer exists"):
        export(run, "merged", out=tmp_path / "merged")


def test_adapter_for_another_model_is_refused(llama_run, tmp_path):
    """A base without the layers the adapter updates (here: one layer instead of two)."""
    import shutil

    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(llama_run.model, base)
    weights = load_file(base / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layers.1." not in k}, base / "model.safetensors")
    cfg = json.loads((base / "config.json").read_text())
    cfg["num_hidden_layers"] = 1
    (base / "config.json").write_text(json.dumps(cfg))
    run = _run_with_base(llama_run, tmp_path, base)
    with pytest.raises(ExportError, match="model.layers.1.*which the base model does not have"):
        export(run, "merged", out=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_pre_quantized_base_is_refused(llama_run, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(llama_run.model, base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (base / "config.json").write_text(json.dumps(cfg))
    run = _run_with_base(llama_run, tmp_path, base)
    with pytest.raises(ExportError, match="pre-quantized"):
        export(run, "merged", out=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_dora_adapter_is_refused(llama_run, tmp_path):
    import shutil

    folder = tmp_path / "dora"
    shutil.copytree(llama_run.run / "adapter", folder)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="DoRA"):
        export(folder, "merged", out=tmp_path / "merged")
