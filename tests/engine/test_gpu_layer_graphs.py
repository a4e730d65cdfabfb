"""CUDA graphs of the checkpointed layers (engine/layer_graphs.py) replay the eager layer's kernels:
the same losses and adapter gradients, dropout included, over recording and replays, with and
without gradient accumulation; a layer that cannot be recorded runs eagerly. Run on the GPU
machine: pytest -m gpu."""

import logging

import pytest
import torch

from .test_gpu_fast_paths import close, model_and_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# zero the gradients before the pass? pass 2 adds to an eager pass's gradients, pass 4 to a replay's
ZERO_BEFORE = [True, False, True, False]


def _passes(demo_template, dropout: float, **train):
    from qlora_studio.engine.trainer import loss_sum

    model, batch, info = model_and_batch(demo_template, dropout, fused_kernels=False, **train)
    results = []
    for i, zero in enumerate(ZERO_BEFORE):
        if zero:
            for p in model.parameters():
                p.grad = None
        torch.manual_seed(100 + i)
        loss = loss_sum(model, batch, "chunked")
        loss.backward()
        grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((float(loss), grads))
    return results, info, getattr(model, "layer_graphs", None)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_replayed_layers_give_the_eager_losses_and_gradients(demo_template, dropout):
    eager, info_eager, none = _passes(demo_template, dropout, cuda_graphs=False)
    graphed, info, context = _passes(demo_template, dropout, cuda_graphs=True)
    assert none is None and "cuda_graphs" not in info_eager.fast_paths
    assert "cuda_graphs" in info.fast_paths
    assert context.disabled is None
    assert context.graphs > 0 and context.pool_bytes() > 0
    for (loss_ref, grads_ref), (loss, grads) in zip(eager, graphed):
        # The same kernels on the same inputs and dropout masks; only cuBLAS's choice of algorithm
        # inside a recording may differ.
        assert loss == pytest.approx(loss_ref, rel=1e-5)
        close(grads_ref, grads, 1e-3)
    # Different dropout masks per pass: the passes differ, so the comparison above is not vacuous.
    if dropout:
        assert eager[0][0] != eager[2][0]


class _Layer(torch.nn.Module):
    def __init__(self, sync: bool):
        super().__init__()
        self.sync = sync
        self.lin = torch.nn.Linear(256, 256, device="cuda")
        self.drop = torch.nn.Dropout(0.2)

    def forward(self, h: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.sync and float(h.abs().amax()) > 1e30:  # a read on the host, which a recording refuses
            h = h * 0
        return self.drop(torch.nn.functional.gelu(self.lin(h))) * scale + h


def _run(layer, graphs, x, scale, passes=3):
    from qlora_studio.engine.offload import offloaded_checkpoint

    layer.train()
    out = None
    for i in range(passes):
        torch.manual_seed(7 + i)
        h = x.clone().requires_grad_(True)
        out = offloaded_checkpoint(lambda t, s: layer(t, s), h, scale, graphs=graphs)
        out.square().sum().backward()
    return out.detach(), layer.lin.weight.grad.clone(), h.grad.clone()


def _eager_and_graphed(sync: bool):
    """Three passes of the same small layer, eagerly and through a LayerGraphs: both results and the context."""
    from qlora_studio.engine.layer_graphs import GraphContext, LayerGraphs

    torch.manual_seed(0)
    eager_layer, graph_layer = _Layer(sync), _Layer(sync)
    graph_layer.load_state_dict(eager_layer.state_dict())
    x = torch.randn(8, 256, device="cuda")
    scale = torch.full((), 0.5, device="cuda")
    ref = _run(eager_layer, None, x, scale)
    context = GraphContext(torch.device("cuda", 0))
    got = _run(graph_layer, LayerGraphs(context, graph_layer), x, scale)
    # the same dropout masks, forward and recomputation alike: equal to rounding
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    return context


def test_a_small_layer_is_recorded_and_accumulates_as_eager():
    context = _eager_and_graphed(sync=False)
    assert context.graphs == 2 and context.disabled is None


def test_a_layer_that_cannot_be_recorded_runs_eagerly_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        context = _eager_and_graphed(sync=True)
    assert context.graphs == 0 and "failed" in context.disabled
    assert "CUDA graphs off" in caplog.text


def test_batches_of_two_widths_each_get_their_graphs(demo_template):
    from qlora_studio.engine.trainer import loss_sum

    def run(graphs: bool):
        model, batch, _ = model_and_batch(demo_template, 0.1, fused_kernels=False, cuda_graphs=graphs,
                                          micro_batch_size=8)
        # 8 columns fewer from the front: the answers, which are learned, sit at the ends of the rows
        short = {k: v[:, 8:] for k, v in batch.items()}
        assert (short["labels"] != -100).any()
        results = []
        for i, b in enumerate([batch, short, batch, short, batch, short]):
            for p in model.parameters():
                p.grad = None
            torch.manual_seed(200 + i)
            loss = loss_sum(model, b, "chunked")
            loss.backward()
            results.append((float(loss), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}))
        return results, getattr(model, "layer_graphs", None)

    eager, _ = run(False)
    graphed, context = run(True)
    assert context.disabled is None and len(context.pairs) == 2
    # the two shapes' input buffers are views of one storage, sized for the longest micro-batch
    (first, _), (second, _) = context.pairs.values()
    assert first.untyped_storage().data_ptr() == second.untyped_storage().data_ptr()
    for (loss_ref, grads_ref), (loss, grads) in zip(eager, graphed):
        assert loss == pytest.approx(loss_ref, rel=1e-5)
        close(grads_ref, grads, 1e-3)


@pytest.mark.parametrize("graphs", [False, True])
def test_an_mlp_in_token_ranges_gives_the_losses_and_gradients_of_the_whole(demo_template, monkeypatch, graphs):
    from qlora_studio.engine import offload

    whole, _, _ = _passes(demo_template, 0.0, cuda_graphs=graphs)
    tiled_calls = []
    real = offload.token_tiles

    def spy(hidden, tile):
        tiles = real(hidden, tile)
        if tiles is not None:
            tiled_calls.append(len(tiles))
        return tiles

    monkeypatch.setattr(offload, "MLP_TILE_TOKENS", 48)
    monkeypatch.setattr(offload, "token_tiles", spy)
    tiled, info, context = _passes(demo_template, 0.0, cuda_graphs=graphs)
    assert tiled_calls and min(tiled_calls) >= 2  # the MLP blocks ran in ranges
    assert ("cuda_graphs" in info.fast_paths) == graphs
    if graphs:
        assert context.disabled is None and context.graphs > 0
    for (loss_ref, grads_ref), (loss, grads) in zip(whole, tiled):
        # Each token's values as before; the adapters' gradients summed over the ranges.
        assert loss == pytest.approx(loss_ref, rel=1e-4)
        close(grads_ref, grads, 1e-2)  # bf16 products: summed over two ranges, rounded apart


def test_replays_after_optimizer_steps_read_the_updated_adapters(demo_template):
    # The graphs read the adapters' weights where they are: the replays of steps 3 and 4 must see
    # the optimizer's updates.
    from qlora_studio import config as C
    from qlora_studio.engine.trainer import loss_sum, update

    cfg = C.load(demo_template / "config.toml")
    runs = {}
    for graphs in (False, True):
        model, batch, info = model_and_batch(demo_template, 0.0, fused_kernels=False, cuda_graphs=graphs)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
        losses = []
        for _ in range(4):
            loss = loss_sum(model, batch, "chunked")
            loss.backward()
            update(params, opt, sched, cfg)
            losses.append(float(loss))
        runs[graphs] = losses
        if graphs:
            assert model.layer_graphs.graphs > 0 and model.layer_graphs.disabled is None
    assert runs[True] == pytest.approx(runs[False], rel=1e-4)
    assert len(set(runs[False])) == 4


@pytest.mark.parametrize("graphs", [False, True])
def test_recomputation_without_the_blocks_last_products_gives_checkpointings_gradients(demo_template, monkeypatch,
                                                                                        graphs):
    # Ordinary checkpointing recomputes every output; the offloaded split blocks skip o_proj's and
    # down_proj's products from their second recomputation on (lora_kernels.recomputation), eager
    # or recorded. Four passes each: the same losses and gradients.
    from qlora_studio.engine import lora_kernels

    skipped = []
    apply = lora_kernels.LoRA4bitFunction.apply
    monkeypatch.setattr(lora_kernels.LoRA4bitFunction, "apply", lambda *a: skipped.append(a[-1]) or apply(*a))
    reference, _, _ = _passes(demo_template, 0.1, offload_checkpoints=False, cuda_graphs=False)
    assert skipped and not any(skipped)
    skipped.clear()
    result, info, _ = _passes(demo_template, 0.1, cuda_graphs=graphs)
    assert "offload_checkpoints" in info.fast_paths
    assert any(skipped)
    for (loss_ref, grads_ref), (loss, grads) in zip(reference, result):
        assert loss == pytest.approx(loss_ref, rel=1e-5)
        close(grads_ref, grads, 1e-3)
