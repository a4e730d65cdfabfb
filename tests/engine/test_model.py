import pytest
import torch

from qlora_studio import config as C
from qlora_studio.errors import ModelError


def _cfg(demo, **sections):
    return C.replace(C.load(demo / "config.toml"), **sections)


@pytest.mark.parametrize("quant_type, double", [("nf4", True), ("fp4", False)])
def test_quantized_layers_and_lora_everywhere(demo_template, quant_type, double):
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    from qlora_studio.engine.model import load_model

    cfg = _cfg(demo_template, quant={"quant_type": quant_type, "double_quant": double})
    model, tok, info = load_model(cfg, torch.device("cpu"), torch.bfloat16, demo_template)
    base = model.get_base_model()
    # The model's own linear layers (LoRA's A and B matrices aside).
    linear = [(n, m) for n, m in base.named_modules()
              if isinstance(m, (torch.nn.Linear, bnb.nn.Linear4bit)) and "lora_" not in n]
    quantized = [(n, m) for n, m in linear if isinstance(m, bnb.nn.Linear4bit)]
    # Every linear layer but the output head is 4-bit and sits inside a LoRA layer.
    assert {n for n, _ in linear} - {n for n, _ in quantized} == {"lm_head"}
    assert len(quantized) == 4 * 7 == info.quantized_layers == info.lora_layers
    for name, layer in quantized:
        assert name.endswith(".base_layer")
        state = layer.weight.quant_state
        assert state.quant_type == quant_type
        assert (state.state2 is not None) == double, name
        assert isinstance(base.get_submodule(name.rsplit(".", 1)[0]), LoraLayer)
    # Embeddings, output head and norms stay in the compute dtype (not fp32) and frozen.
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    assert base.lm_head.weight.dtype == torch.bfloat16
    assert base.model.norm.weight.dtype == torch.bfloat16
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert info.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_target_modules_subset_and_unknown(demo_template):
    from qlora_studio.engine.model import load_model

    cfg = _cfg(demo_template, lora={"target_modules": ["q_proj", "v_proj"]})
    _, _, info = load_model(cfg, torch.device("cpu"), torch.bfloat16, demo_template)
    assert info.lora_layers == 8
    with pytest.raises(ModelError, match="does not have"):
        load_model(_cfg(demo_template, lora={"target_modules": ["query"]}), torch.device("cpu"), torch.bfloat16, demo_template)


def test_model_folder_checks(demo, tmp_path):
    from qlora_studio.engine.model import check_local_model

    (demo / "model" / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="no weights"):
        check_local_model(demo / "model", allow_pickle=False)
    (demo / "model" / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="pickle"):
        check_local_model(demo / "model", allow_pickle=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        check_local_model(empty, allow_pickle=False)
