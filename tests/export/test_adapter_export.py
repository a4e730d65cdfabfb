"""The adapter format: PEFT reads it back exactly; the card and the run's config travel with it."""

from __future__ import annotations

import torch

from qlora_studio import config as config_mod
from qlora_studio.engine.export import export
from qlora_studio.engine.export.card import LOSS_CURVE


def _peft_logits(model_folder, adapter_folder, sample):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_folder).eval()
    with torch.no_grad():
        return model(sample).logits


def test_peft_loads_the_exported_adapter_with_identical_logits(llama_run, tmp_path):
    out = export(llama_run.run, "adapter", out=tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md", "config.toml", LOSS_CURVE} <= {
        p.name for p in out.iterdir()}
    logits = _peft_logits(llama_run.model, out, llama_run.sample)
    assert torch.equal(logits, llama_run.logits[1])


def test_checkpoint_export_uses_that_checkpoints_adapter(llama_run, tmp_path):
    out = export(llama_run.run, "adapter", out=tmp_path / "ckpt", checkpoint=10)
    logits = _peft_logits(llama_run.model, out, llama_run.sample)
    assert torch.equal(logits, llama_run.logits[2])
    assert not torch.equal(llama_run.logits[1], llama_run.logits[2])
    card = (out / "README.md").read_text()
    assert "checkpoint at step 10" in card


def test_card_describes_the_run_without_local_paths(llama_run, tmp_path):
    out = export(llama_run.run, "adapter", out=tmp_path / "adapter")
    card = (out / "README.md").read_text()
    for expected in ("model (local)", "data.jsonl (local)", "30 of 30", "Final training loss | 0.7500",
                     "Final evaluation loss | 0.8000", "q_proj", "transformers", "peft", f"]({LOSS_CURVE})"):
        assert expected in card, expected
    assert str(llama_run.root) not in card
    png = (out / LOSS_CURVE).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000
    copied = config_mod.load(out / "config.toml")
    assert copied.model.name_or_path == str(llama_run.model)


def test_card_keeps_paths_when_asked(llama_run, tmp_path):
    out = export(llama_run.run, "adapter", out=tmp_path / "adapter", include_paths=True)
    assert str(llama_run.model) in (out / "README.md").read_text()


def test_default_output_folder_is_inside_the_run(llama_run):
    out = export(llama_run.run, "adapter", overwrite=True)
    assert out == llama_run.run / "exports" / "adapter"
    assert (out / "adapter_model.safetensors").is_file()


def test_a_bare_adapter_folder_exports_too(llama_run, tmp_path):
    out = export(llama_run.run / "adapter", "adapter", out=tmp_path / "bare")
    assert torch.equal(_peft_logits(llama_run.model, out, llama_run.sample), llama_run.logits[1])
    assert "config.toml" not in {p.name for p in out.iterdir()}
