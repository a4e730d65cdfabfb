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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_loss_kernel_gives_the_pytorch_paths_loss_and_gradient(monkeypatch, dtype):
    pytest.importorskip("triton", reason="Triton is not installed")
    from qlora_studio.engine import losses

    g = torch.Generator(device="cuda").manual_seed(0)
    vocab = 5000  # not a multiple of the kernel's block: its last block is masked
    hidden = torch.randn(300, 256, device="cuda", generator=g).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, 256, device="cuda", generator=g) * 0.2).to(dtype)
    targets = torch.randint(0, vocab, (300,), device="cuda", generator=g)
    assert losses._kernel(hidden) is not None

    def loss_and_grad():
        loss = losses.frozen_head_cross_entropy(hidden, weight, targets, chunk=64)  # 5 chunks, the last short
        (grad,) = torch.autograd.grad(loss * 0.5, hidden)
        return loss, grad

    fast, fast_grad = loss_and_grad()
    monkeypatch.setattr(losses, "_kernel", lambda h: None)
    slow, slow_grad = loss_and_grad()
    ref = torch.nn.functional.cross_entropy((hidden @ weight.t()).float(), targets, reduction="sum")
    # The same formula over the same logits; sums in another order (fp32).
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=0)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=0)
    # The probabilities are rounded to the compute dtype in both: at most one rounding step apart.
    assert (fast_grad.float() - slow_grad.float()).norm() <= 1e-2 * slow_grad.float().norm()
    assert fast_grad.abs().sum() > 0


def test_loss_kernel_without_gradient_leaves_the_logits_alone():
    pytest.importorskip("triton", reason="Triton is not installed")
    from qlora_studio.engine.ce_kernel import cross_entropy_rows

    logits = torch.randn(3, 9000, device="cuda").to(torch.bfloat16)
    before = logits.clone()
    rows = cross_entropy_rows(logits, torch.tensor([0, 8999, 17], device="cuda"), grad=False)
    assert torch.equal(logits, before)
    torch.testing.assert_close(rows, torch.nn.functional.cross_entropy(
        before.float(), torch.tensor([0, 8999, 17], device="cuda"), reduction="none"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("nested", [True, False])
def test_nf4_kernel_gives_bitsandbytes_values_bit_for_bit(dtype, nested):
    pytest.importorskip("triton", reason="Triton is not installed")
    import bitsandbytes.functional as bnbF

    from qlora_studio.engine import lora_kernels, nf4_kernel

    torch.manual_seed(0)
    # an 8B MLP weight, and a shape whose last program is partly outside the weight
    for shape in [(14336, 4096), (320, 192)]:
        w = torch.randn(*shape, device="cuda", dtype=dtype) * 0.02
        packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=nested, quant_type="nf4")
        assert nf4_kernel.supported(packed, state)
        assert torch.equal(nf4_kernel.dequantize_nf4(packed, state), bnbF.dequantize_4bit(packed, state)), shape
        weight = torch.nn.Parameter(packed, requires_grad=False)
        weight.quant_state = state
        assert lora_kernels._nf4_kernel(packed, state) is nf4_kernel.dequantize_nf4
        assert torch.equal(lora_kernels._dequantize(weight), bnbF.dequantize_4bit(packed, state))


def test_nf4_kernel_leaves_fp4_to_bitsandbytes():
    pytest.importorskip("triton", reason="Triton is not installed")
    import bitsandbytes.functional as bnbF

    from qlora_studio.engine import lora_kernels, nf4_kernel

    packed, state = bnbF.quantize_4bit(torch.randn(128, 256, device="cuda", dtype=torch.bfloat16), quant_type="fp4")
    assert not nf4_kernel.supported(packed, state) and lora_kernels._nf4_kernel(packed, state) is None


def test_adapter_gradients_come_out_of_the_product_in_fp32():
    # torch.mm(..., out_dtype=float32) on this GPU: no compute-dtype result and no cast after it.
    from qlora_studio.engine import lora_kernels

    torch.manual_seed(0)
    a = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    got = lora_kernels._mm_fp32(a, b)
    assert lora_kernels._FP32_OUT_OFF == [] and got.dtype == torch.float32
    # fp32 accumulation either way; the cast path rounds the result to bf16 first
    torch.testing.assert_close(got, (a.float() @ b.float()), rtol=1e-3, atol=1e-2)
    assert not torch.equal(got, (a @ b).float())


def test_the_gpu_gathers_embedding_rows_from_pinned_cpu_memory():
    from qlora_studio.engine import offload

    torch.manual_seed(0)
    host = torch.randn(1000, 192, dtype=torch.bfloat16).pin_memory()
    device = torch.device("cuda", torch.cuda.current_device())
    before = torch.cuda.memory_allocated(device)
    mapped = offload.mapped_on_gpu(host, device)
    assert torch.cuda.memory_allocated(device) == before  # nothing of the table is copied to the GPU
    assert mapped is not None and mapped.device == device and mapped.data_ptr() == host.data_ptr()
    ids = torch.randint(0, 1000, (2, 300), device=device)
    assert torch.equal(torch.nn.functional.embedding(ids, mapped).cpu(), host[ids.cpu()])
    assert offload.mapped_on_gpu(torch.randn(10, 10).pin_memory(), device) is None  # 4-byte elements
    assert offload.mapped_on_gpu(torch.randn(10, 10, dtype=torch.bfloat16), device) is None  # not pinned
