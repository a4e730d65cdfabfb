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


def _count_calls(monkeypatch, cls) -> list:
    calls = []
    apply = cls.apply
    monkeypatch.setattr(cls, "apply", lambda *args: calls.append(1) or apply(*args))
    return calls


@pytest.mark.parametrize("dtype, rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_grouped_projections_give_what_each_alone_gives(demo_template, monkeypatch, dtype, rtol):
    from qlora_studio.engine import lora_kernels

    model, tok = _model(demo_template, dtype, fused=True)
    groups = lora_kernels.lora_groups(model)
    layers = model.config.num_hidden_layers
    assert sorted(len(g.members) for g in groups) == [2] * layers + [3] * layers  # gate/up and q/k/v
    calls = _count_calls(monkeypatch, lora_kernels.LoRA4bitGroupFunction)
    loss, grads = _grads(model, tok, demo_template)
    assert len(calls) == 2 * layers and not any(g.left for g in groups)  # every output taken
    monkeypatch.setattr(lora_kernels, "GROUPS", ())
    alone, tok = _model(demo_template, dtype, fused=True)
    assert not lora_kernels.lora_groups(alone)
    loss_1, grads_1 = _grads(alone, tok, demo_template)
    assert len(calls) == 2 * layers
    torch.testing.assert_close(loss, loss_1, rtol=rtol / 10, atol=1e-4)
    assert grads.keys() == grads_1.keys()
    for name in grads:
        assert (grads[name] - grads_1[name]).norm() <= rtol * grads_1[name].norm() + 1e-6, name


def test_group_members_called_on_other_inputs_compute_their_own(demo_template):
    from qlora_studio.engine import lora_kernels

    model, _ = _model(demo_template, torch.float32, fused=True)
    group = next(g for g in lora_kernels.lora_groups(model) if len(g.members) == 3)
    q, k, v = group.members
    hidden = q.base_layer.in_features
    torch.manual_seed(2)
    x1, x2 = torch.randn(2, 5, hidden), torch.randn(2, 5, hidden)
    with torch.no_grad():
        group.off = True  # each projection alone: the reference
        alone = {(m, i): m(x) for m in (q, k, v) for i, x in ((1, x1), (2, x2))}
        group.off = False
        assert torch.equal(q(x1), alone[q, 1]) and set(group.left) == {1, 2}
        assert torch.equal(k(x2), alone[k, 2])  # another input: what was left for x1 is dropped
        assert group.misses == 1 and group.input[0] is x2 and set(group.left) == {0, 2}
        assert torch.equal(v(x2), alone[v, 2]) and torch.equal(q(x2), alone[q, 2]) and not group.left
        k(x1)
        x1.add_(1.0)  # changed in place: q and v must not take outputs of its old values
        x1_changed = x1.clone()
        group.off = True
        expected = v(x1_changed)
        group.off = False
        assert torch.equal(v(x1), expected) and group.misses == 2
        q(x2)
        assert group.misses == lora_kernels.GROUP_MISSES and group.off and not group.left
        assert torch.equal(k(x2), alone[k, 2])  # from now on each computes its own


def test_dropout_keeps_each_projection_apart(demo_template, monkeypatch):
    from qlora_studio.engine import lora_kernels

    model, tok = _model(demo_template, torch.float32, fused=True, dropout=0.1)
    grouped = _count_calls(monkeypatch, lora_kernels.LoRA4bitGroupFunction)
    alone = _count_calls(monkeypatch, lora_kernels.LoRA4bitFunction)
    _grads(model, tok, demo_template)  # training: each projection draws its own dropout mask
    assert not grouped and len(alone) == 7 * model.config.num_hidden_layers
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.randint(3, 900, (1, 8)))  # no dropout in evaluation: grouped again
    assert len(grouped) == 2 * model.config.num_hidden_layers


def test_kept_weights_serve_the_backward_and_change_nothing(demo_template, monkeypatch):
    from qlora_studio.engine import lora_kernels

    model, tok = _model(demo_template, torch.float32, fused=True)
    dequantize = lora_kernels._dequantize
    calls = []
    monkeypatch.setattr(lora_kernels, "_dequantize", lambda weight: calls.append(1) or dequantize(weight))
    loss, grads = _grads(model, tok, demo_template)
    plain = len(calls)
    model.zero_grad(set_to_none=True)
    fused = lora_kernels.fused_layers(model)
    assert lora_kernels.keep_weights(fused) == len(fused) == 7 * model.config.num_hidden_layers
    calls.clear()
    loss_kept, grads_kept = _grads(model, tok, demo_template)
    # each backward that computes its input's gradient took the weight from forward
    assert len(calls) == len(fused) < plain
    assert torch.equal(loss_kept, loss) and all(torch.equal(grads_kept[n], grads[n]) for n in grads)
    calls.clear()
    with torch.no_grad():  # a forward pass that records no gradients keeps nothing
        model(input_ids=torch.randint(3, 900, (1, 8)))
    assert len(calls) == len(fused)


def test_a_group_output_nothing_uses_leaves_its_adapter_without_gradient(demo_template):
    from qlora_studio.engine import lora_kernels

    model, _ = _model(demo_template, torch.float32, fused=True)
    group = next(g for g in lora_kernels.lora_groups(model) if len(g.members) == 3)
    q, k, v = group.members
    adapter = q.active_adapters[0]
    torch.manual_seed(3)
    x = torch.randn(2, 5, q.base_layer.in_features, requires_grad=True)

    def grads(grouped: bool):
        group.off = not grouped
        for m in (q, k, v):
            m.zero_grad(set_to_none=True)
        x.grad = None
        out_q, out_k, _ = q(x), k(x), v(x)  # v's output is not used
        (out_q.square().sum() + out_k.sum()).backward()
        return x.grad.clone(), [m.lora_A[adapter].weight.grad for m in (q, k, v)]

    alone_x, alone = grads(False)
    grouped_x, grouped = grads(True)
    assert alone[2] is None and grouped[2] is None
    torch.testing.assert_close(grouped_x, alone_x, rtol=1e-5, atol=1e-6)
    for a, b in zip(grouped[:2], alone[:2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _block_grads(block, x, lora_kernels=None, scale=None):
    """The input's and the adapters' gradients of ``block`` (a layer's MLP) for the output gradient
    ``x * 0.5 + 1``; inside a recomputation when ``lora_kernels`` is given, ``scale``: a factor after it."""
    for p in block.parameters():
        p.grad = None
    h = x.clone().requires_grad_(True)
    run = (lambda t: block(t) * scale) if scale is not None else block
    out = run(h) if lora_kernels is None else lora_kernels.recompute(run, h)
    out.backward(x * 0.5 + 1)
    return [h.grad.clone()] + [p.grad.clone() for p in block.parameters() if p.requires_grad]


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_recomputed_blocks_last_projection_skips_its_product_once_checked(demo_template, monkeypatch, dropout):
    from qlora_studio.engine import lora_kernels

    model, _ = _model(demo_template, torch.float32, fused=True, dropout=dropout)
    mlp = model.base_model.model.model.layers[0].mlp
    down = mlp.down_proj
    assert lora_kernels.output_unused_in_recomputation([down, None, mlp.act_fn]) == 1
    dequantize = lora_kernels._dequantize
    calls = []
    monkeypatch.setattr(lora_kernels, "_dequantize", lambda weight: calls.append(weight) or dequantize(weight))
    torch.manual_seed(4)
    x = torch.randn(2, 6, down.out_features)
    model.eval()
    with torch.no_grad():
        output = mlp(x)
    model.train()

    def grads(**kwargs):
        torch.manual_seed(5)  # the same dropout masks
        calls.clear()
        return _block_grads(mlp, x, **kwargs)

    reference = grads()
    forward_dequantized = sum(w is down.base_layer.weight for w in calls)
    assert forward_dequantized == 2  # forward and backward: nothing is kept here
    checked = grads(lora_kernels=lora_kernels)  # the first recomputation computes it and checks the claim
    assert down.__dict__["_output_unused"] is True
    assert sum(w is down.base_layer.weight for w in calls) == 2
    skipped = grads(lora_kernels=lora_kernels)
    # the skipped product needs no weight: only backward dequantizes it
    assert sum(w is down.base_layer.weight for w in calls) == 1
    for ref, a, b in zip(reference, checked, skipped):
        assert ref.norm() > 0
        assert torch.equal(ref, a) and torch.equal(ref, b)
    # outside a recomputation it computes its output as before
    model.eval()
    with torch.no_grad():
        assert torch.equal(mlp(x), output) and output.abs().sum() > 0


def test_a_block_that_reads_its_last_projections_output_turns_the_skip_off(demo_template):
    from qlora_studio.engine import lora_kernels

    model, _ = _model(demo_template, torch.float32, fused=True)
    mlp = model.base_model.model.model.layers[0].mlp
    down = mlp.down_proj
    lora_kernels.output_unused_in_recomputation([down])
    torch.manual_seed(4)
    x = torch.randn(2, 6, down.out_features)
    reference = _block_grads(mlp, x, scale=3.0)
    checked = _block_grads(mlp, x, lora_kernels, scale=3.0)  # the block scales the output: claim refuted
    assert down.__dict__["_output_unused"] is False
    again = _block_grads(mlp, x, lora_kernels, scale=3.0)
    for ref, a, b in zip(reference, checked, again):
        assert torch.equal(ref, a) and torch.equal(ref, b)
    # a claim once checked that a block later breaks is an error, never a silent gradient
    down.__dict__["_output_unused"] = True
    with pytest.raises(RuntimeError, match="skipped in recomputation"):
        _block_grads(mlp, x, lora_kernels, scale=3.0)
    assert down.__dict__["_output_unused"] is False


def test_without_the_setting_a_recomputation_computes_every_output(demo_template, monkeypatch):
    from qlora_studio.engine import lora_kernels

    model, _ = _model(demo_template, torch.float32, fused=True)
    mlp = model.base_model.model.model.layers[0].mlp
    lora_kernels.output_unused_in_recomputation([mlp.down_proj])
    monkeypatch.setattr(lora_kernels, "SKIP_UNUSED_PRODUCTS", False)
    skipped = []
    apply = lora_kernels.LoRA4bitFunction.apply
    monkeypatch.setattr(lora_kernels.LoRA4bitFunction, "apply", lambda *a: skipped.append(a[-1]) or apply(*a))
    x = torch.randn(2, 6, mlp.down_proj.out_features)
    for _ in range(2):
        _block_grads(mlp, x, lora_kernels)
    assert mlp.down_proj.__dict__["_output_unused"] is True and not any(skipped)



def test_an_output_changed_in_place_after_the_projection_refutes_the_claim():
    # (PyTorch refuses in-place changes of the fused function's own output; a block could still
    # return it changed through another route, such as a module of its own that wraps it.)
    from qlora_studio.engine import lora_kernels

    layer = torch.nn.Module()
    layer.__dict__["_output_unused"] = None
    out = torch.ones(3)
    with lora_kernels.recomputation() as record:
        record.note(layer, out, skipped=False)
        out.mul_(2)
    record.check(out)
    assert layer.__dict__["_output_unused"] is False
    layer.__dict__["_output_unused"] = None
    with lora_kernels.recomputation() as record:
        record.note(layer, out, skipped=False)
    record.check(out)
    assert layer.__dict__["_output_unused"] is True
