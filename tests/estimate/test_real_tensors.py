"""The estimate's weights, adapters, gradients and optimizer states against a real 4-bit model.

The offline demo's tiny Llama is loaded by the engine on the CPU (bitsandbytes NF4 with double
quantization, PEFT LoRA); the bytes of its actual tensors must equal the estimate's lines.
"""

from __future__ import annotations

import pytest
import torch

from qlora_studio import config as C
from qlora_studio.engine import estimate as E
from qlora_studio.engine import modelinfo


def _storages(tensors) -> int:
    """Bytes of the distinct storages behind these tensors."""
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.fixture(scope="module")
def loaded(demo_template):
    from qlora_studio.engine.model import load_model

    cfg = C.load(demo_template / "config.toml")
    model, _, _ = load_model(cfg, torch.device("cpu"), torch.bfloat16, demo_template)
    model_config = modelinfo.read_model_config(str(demo_template / "model"))
    return cfg, model, model_config


def test_weights_and_adapters(loaded):
    import bitsandbytes as bnb

    cfg, model, model_config = loaded
    est = E.estimate(model_config, cfg, device="cpu", suggest=False)
    quantized = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert quantized and all(w.dtype == torch.uint8 for w in quantized)
    assert _storages(quantized) == est.item("weights_4bit")
    states = [w.quant_state for w in quantized]
    constants = [t for s in states for t in (s.absmax, s.offset, s.code, s.state2.absmax, s.state2.code)]
    assert _storages(constants) == est.item("quant_constants")
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    # PEFT keeps the adapters in fp32 over a 4-bit base (whose weight is not a float tensor)
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    assert _storages(lora) == est.item("lora")
    others = [p for n, p in model.named_parameters() if "lora_" not in n and not isinstance(p, bnb.nn.Params4bit)]
    assert all(p.dtype == torch.bfloat16 for p in others)
    assert _storages(others) == est.item("weights_16bit")


@pytest.mark.parametrize("optimizer", ["paged_adamw_32bit", "paged_adamw_8bit", "adamw_32bit", "adamw_torch"])
def test_gradients_and_optimizer_states(loaded, optimizer):
    from qlora_studio.engine.trainer import build_optimizer

    cfg, model, model_config = loaded
    cfg = C.replace(cfg, train={"optimizer": optimizer, "grad_accum_steps": 1})
    est = E.estimate(model_config, cfg, device="cpu", suggest=False)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    assert _storages([p.grad for p in params]) == est.item("lora")  # fp32 gradients, one per adapter weight
    opt = build_optimizer(cfg, params)
    opt.step()  # creates the states
    # Per-tensor step counts of 4 bytes (torch's AdamW) are not modelled; the fused optimizer's, one
    # shared tensor of them, are.
    tensors = [t for state in opt.state.values() for t in state.values()
               if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() > 4
               and t.data_ptr() not in {q.data_ptr() for q in _qmaps(opt)}]
    sizes = E.lora_tensors(E.lora_targets(modelinfo.describe(model_config), ["all-linear"]), cfg.lora.r)
    expected = E.optimizer_bytes(optimizer, sizes, fused=cfg.train.fused_optimizer, cuda=False)
    # on the CPU nothing is paged: every state is an ordinary tensor
    assert expected.paged == 0
    assert _storages(tensors) == expected.device
    for p in params:
        p.grad = None


def _qmaps(opt):
    """The 8-bit optimizers' shared quantization maps (not per-parameter state)."""
    return [t for t in getattr(opt, "name2qmap", {}).values() if isinstance(t, torch.Tensor)]
