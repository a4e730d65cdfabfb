"""The fused 4-bit + LoRA layer computes what PEFT's layers compute."""

import pytest
import torch

from qlora_studio import config as C


def _model(demo_template, dtype, fused, dropout=0.0):
    from qlora_studio.engine.model import load_model

    cfg = C.replace(C.load(demo_template / "config.toml"), train={"fused_lora": fused},
                    quant={"compute_dtype": "float32" if dtype is torch.float32 else "bfloat16"},
                    lora={"dropout": dropout})
    torch.manual_seed(0)
    model, tok, _ = load_model(cfg, torch.device("cpu"), dtype, demo_template)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # a trained adapter, so both products matter
    return model, tok


def _grads(model, tok, demo_template):
    from qlora_studio.engine.data import Batcher, collate, load_dataset
    from qlora_studio.engine.trainer import loss_sum

    cfg = C.load(demo_template / "config.toml")
    data = load_dataset(cfg.data, tok, demo_template)
    batch = collate(Batcher(data.train, 4, 0).next(), tok.pad_token_id)
    model.train()
    loss = loss_sum(model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_fused_layers_match_peft(demo_template, dtype, rtol):
    from qlora_studio.engine.lora_kernels import LoRA4bitFunction  # noqa: F401

    peft_model, tok = _model(demo_template, dtype, fused=False)
    fused_model, _ = _model(demo_template, dtype, fused=True)
    loss_p, grads_p = _grads(peft_model, tok, demo_template)
    loss_f, grads_f = _grads(fused_model, tok, demo_template)
    torch.testing.assert_close(loss_f, loss_p, rtol=rtol / 10, atol=1e-3)
    assert grads_f.keys() == grads_p.keys() and len(grads_f) == 56
    for name in grads_p:
        a, b = grads_f[name], grads_p[name]
        # Compare each adapter matrix's gradient as a whole (relative to its norm).
        assert (a - b).norm() <= rtol * b.norm() + 1e-6, name


def test_fused_layer_with_dropout_and_disabled_adapter(demo_template):
    model, tok = _model(demo_template, torch.float32, fused=True, dropout=0.1)
    ids = torch.randint(3, 900, (2, 12))
    model.eval()
    with torch.no_grad():
        with_adapter = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    # The adapter is back on after the context. (On CPUs with bf16 instructions bitsandbytes has by
    # now repacked the weights for its bf16 inference kernel, hence the loose tolerance.)
    with torch.no_grad():
        again = model(input_ids=ids).logits
    assert (again - with_adapter).abs().max() < 0.1 < (base - with_adapter).abs().max()
    model.train()
    _, grads = _grads(model, tok, demo_template)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


def _steps(model, tok, demo_template, steps: int = 3) -> list[float]:
    """Losses of a few training steps through the trainer's update (which says the weights changed)."""
    from qlora_studio.engine.data import Batcher, collate, load_dataset
    from qlora_studio.engine.trainer import loss_sum, update

    cfg = C.load(demo_template / "config.toml")
    data = load_dataset(cfg.data, tok, demo_template)
    batcher = Batcher(data.train, 4, 0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = loss_sum(model, collate(batcher.next(), tok.pad_token_id))
        loss.backward()
        update(params, opt, sched, cfg)
        losses.append(float(loss))
    return losses


def test_compute_dtype_copies_follow_the_optimizer(demo_template, monkeypatch):
    from qlora_studio.engine import lora_kernels

    model, tok = _model(demo_template, torch.bfloat16, fused=True)
    kept = _steps(model, tok, demo_template)
    fused = lora_kernels.fused_layers(model)
    assert fused and all("_compute_copies" in m.__dict__ for m in fused)
    # the same steps with A and scale·B cast in every pass: the same losses, bit for bit
    monkeypatch.setattr(lora_kernels, "compute_copies", lambda module, adapter, dtype: None)
    model, tok = _model(demo_template, torch.bfloat16, fused=True)
    assert _steps(model, tok, demo_template) == kept
    assert len(set(kept)) == len(kept)  # the updates changed what the steps computed


def test_compute_dtype_copies_are_refreshed_in_place_when_the_weights_change(demo_template):
    from qlora_studio.engine import lora_kernels

    model, _ = _model(demo_template, torch.bfloat16, fused=True)
    module = lora_kernels.fused_layers(model)[0]
    adapter = module.active_adapters[0]
    la, lb = module.lora_A[adapter].weight, module.lora_B[adapter].weight
    scale = float(module.scaling[adapter])
    a, b = lora_kernels.compute_copies(module, adapter, torch.bfloat16)
    assert a.dtype == torch.bfloat16 and torch.equal(a, la.to(torch.bfloat16))
    assert torch.equal(b, (lb * scale).to(torch.bfloat16))
    assert lora_kernels.compute_copies(module, adapter, torch.float32) is None  # the adapter's own dtype
    with torch.no_grad():
        la.add_(1.0)  # an in-place change: its version counter moves
    a2, b2 = lora_kernels.compute_copies(module, adapter, torch.bfloat16)
    assert a2 is a and b2 is b and torch.equal(a, la.to(torch.bfloat16))  # the same tensors, new values
    lb.data.mul_(2.0)  # a change through .data, which no version counter sees
    assert not torch.equal(lora_kernels.compute_copies(module, adapter, torch.bfloat16)[1], (lb * scale).to(torch.bfloat16))
    lora_kernels.weights_changed()
    assert torch.equal(lora_kernels.compute_copies(module, adapter, torch.bfloat16)[1], (lb * scale).to(torch.bfloat16))
    lb.data.mul_(2.0)
    lora_kernels.weights_changed()
    lora_kernels.refresh_copies([module])  # what a CUDA graph's replay does first
    assert torch.equal(module._compute_copies["b"], (lb * scale).to(torch.bfloat16))
