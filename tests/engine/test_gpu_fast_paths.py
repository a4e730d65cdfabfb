"""The GPU-only paths (offloaded checkpoints, embeddings in CPU memory, fused kernels) change where
tensors wait and how elementwise work is launched, never the arithmetic: the same loss and the same
adapter gradients as without them. Run on the GPU machine: pytest -m gpu."""

import pytest
import torch

from qlora_studio import config as C

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

OFF = {"offload_checkpoints": False, "embeddings_on_cpu": False, "fused_kernels": False, "cuda_graphs": False}


def model_and_batch(demo_template, dropout: float, **train):
    """The demo model with the given train settings, the same adapter values every time, and a batch."""
    from qlora_studio.engine.data import Batcher, collate, load_dataset
    from qlora_studio.engine.model import load_model

    cfg = C.replace(C.load(demo_template / "config.toml"), lora={"dropout": dropout},
                    train={"device": "cuda", "gradient_checkpointing": True, **train})
    model, tok, info = load_model(cfg, torch.device("cuda", 0), torch.bfloat16, demo_template)
    # The same adapter values in every model (A is drawn at random when the adapter is made), and
    # B not 0 (its starting value, which would leave A's gradient 0).
    g = torch.Generator().manual_seed(1)
    for name, p in sorted(model.named_parameters()):
        if p.requires_grad:
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.train()
    data = load_dataset(cfg.data, tok, demo_template)
    batch = {k: v.cuda() for k, v in collate(Batcher(data.train, 8, 0).next(), tok.pad_token_id).items()}
    return model, batch, info


def _loss_and_grads(demo_template, dropout: float, **train):
    from qlora_studio.engine.trainer import loss_sum

    model, batch, info = model_and_batch(demo_template, dropout, **train)
    torch.manual_seed(123)  # the same dropout masks for every model
    loss = loss_sum(model, batch, "chunked")
    loss.backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss), grads, info


def close(a: dict, b: dict, rel: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].norm() > 0, name
        assert (a[name] - b[name]).norm() <= rel * a[name].norm(), name


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_offloaded_checkpoints_and_cpu_embeddings_give_the_same_loss_and_gradients(demo_template, dropout):
    loss_ref, grads_ref, info_ref = _loss_and_grads(demo_template, dropout, **OFF)
    loss, grads, info = _loss_and_grads(demo_template, dropout, **{**OFF, "offload_checkpoints": True,
                                                                    "embeddings_on_cpu": True})
    assert info_ref.fast_paths == []
    assert info.fast_paths == ["offload_checkpoints", "embeddings_on_cpu"]
    # The same kernels on the same inputs, with the dropout masks replayed: equal up to the order of
    # the gradient accumulation's additions.
    assert loss == pytest.approx(loss_ref, rel=1e-6)
    close(grads_ref, grads, 1e-3)


def test_fused_kernels_give_the_same_loss_and_gradients_within_rounding(demo_template):
    pytest.importorskip("liger_kernel", reason="liger-kernel is not installed")
    loss_ref, grads_ref, _ = _loss_and_grads(demo_template, 0.0, **OFF)
    loss, grads, info = _loss_and_grads(demo_template, 0.0, **{**OFF, "fused_kernels": True})
    assert info.fast_paths == ["fused_kernels"]
    # The same formulas; bf16 intermediates are rounded at different places.
    assert loss == pytest.approx(loss_ref, rel=1e-2)
    close(grads_ref, grads, 5e-2)
