"""The engine's GPU-only paths in the estimate: offloaded checkpoints, the embedding in CPU memory,
liger-kernel's fused kernels (engine/model.py::gpu_fast_paths, engine/offload.py).

The engine switches them on only on a CUDA device, so a CPU estimate (what the engine-agreement
tests compare with real CPU steps) has none of them.
"""

from __future__ import annotations

from qlora_studio.engine import estimate as E
from qlora_studio.engine import modelinfo

from .shapes import LLAMA_1B, LLAMA_8B, run_config

OFF = {"offload_checkpoints": False, "embeddings_on_cpu": False, "fused_kernels": False}
LOADED = ("weights_4bit", "quant_constants", "weights_16bit", "lora", "optimizer", "gradients")


def point(model=LLAMA_8B, *, layers=None, seq=2048, liger=True, device="cuda", quant_type="nf4", **train):
    train = {"micro_batch_size": 2, "grad_accum_steps": 1, **train}
    if layers is not None:
        model = {**model, "num_hidden_layers": layers}
    run = run_config(train=train, data={"max_seq_len": seq}, lora={"r": 16}, quant={"quant_type": quant_type})
    return E.estimate(model, run, suggest=False, liger=liger, device=device)


def step_bytes(est: E.Estimate) -> int:
    """What the step adds at its peak to what loading left (and the adapters' gradients)."""
    return est.allocated - sum(est.item(k) for k in LOADED)


# --- when they apply --------------------------------------------------------------------------


def test_only_a_cuda_estimate_counts_them():
    cpu = point(device="cpu")
    assert not any(cpu.settings[k] for k in OFF)
    assert cpu.cpu_pinned == 0 and cpu.item("weights_16bit") == 2 * modelinfo.describe(LLAMA_8B).unquantized_params
    # the CPU estimate is the same whatever the GPU paths' settings
    assert point(device="cpu", **OFF).allocated == cpu.allocated
    cuda = point()
    assert all(cuda.settings[k] for k in OFF) and cuda.allocated < point(**OFF).allocated


def test_each_can_be_turned_off():
    on = point()
    for key in OFF:
        off = point(**{key: False})
        assert not off.settings[key] and off.allocated > on.allocated, key


def test_gpu_paths_are_named_in_the_report(monkeypatch):
    report = E.format_report(point(), "llama-8b")
    assert ("GPU paths checkpointed layer inputs in CPU memory, checkpointed layers replayed as CUDA graphs, "
            "input embedding in CPU memory, liger-kernel's") in report
    assert "pinned CPU memory instead" in report
    monkeypatch.setattr(E, "triton_installed", lambda: False)
    assert "GPU paths" not in E.format_report(point(**OFF), "llama-8b")


def test_the_nf4_kernel_counts_no_fp32_scales(monkeypatch):
    # bitsandbytes rebuilds a double-quantized weight's absmax in fp32 before the weight;
    # nf4_kernel.py does not. FP4 weights (bitsandbytes' path) are as large as NF4 ones.
    monkeypatch.setattr(E, "triton_installed", lambda: True)
    for train in ({}, {"offload_checkpoints": False}, {"gradient_checkpointing": False}):
        nf4 = point(**train)
        fp4 = point(quant_type="fp4", **train)
        assert nf4.settings["nf4_kernel"] and not fp4.settings["nf4_kernel"]
        assert nf4.allocated < fp4.allocated, train
    assert "the NF4 dequantization's Triton kernel" in E.format_report(point(), "llama-8b")
    assert "NF4 dequantization" not in E.format_report(point(fused_lora=False), "llama-8b")
    monkeypatch.setattr(E, "triton_installed", lambda: False)
    assert not point().settings["nf4_kernel"]


# --- offloaded checkpoints ----------------------------------------------------------------------


def test_offloaded_layer_inputs_do_not_add_up_with_the_layers():
    h, tokens = LLAMA_8B["hidden_size"], 2 * 2048
    layer_input = 2 * h * tokens  # bf16 hidden states of one micro-batch
    offloaded = [point(layers=n, cuda_graphs=False) for n in (16, 32, 64)]
    assert {e.phase for e in offloaded} == {"layer backward"}
    # the same activations at the peak however deep the model: one layer's, its input and the next one's
    assert len({e.item("activations") for e in offloaded}) == 1
    assert len({step_bytes(e) for e in offloaded}) == 1
    # kept on the GPU, every layer's input is there at the first layer's backward
    kept = [point(layers=n, offload_checkpoints=False) for n in (16, 32)]
    assert kept[1].item("activations") - kept[0].item("activations") == 16 * layer_input
    assert offloaded[2].item("activations") < kept[0].item("activations") - 10 * layer_input
    # their pinned CPU copies do add up: both blocks' inputs of every (split) layer
    moved_embedding = 2 * modelinfo.describe(LLAMA_8B).embedding_params
    assert [e.cpu_pinned - moved_embedding for e in offloaded] == [2 * n * layer_input for n in (16, 32, 64)]


def test_offload_needs_gradient_checkpointing():
    without = point(gradient_checkpointing=False)
    assert without.allocated == point(gradient_checkpointing=False, offload_checkpoints=False).allocated
    assert without.cpu_pinned == 2 * modelinfo.describe(LLAMA_8B).embedding_params  # the embedding only
    assert "checkpointed layer inputs" not in E.format_report(without)


def simulated_step(layers: int, keep_weights: bool = True, transient_outputs: bool = True, **train) -> E._Timeline:
    """One micro-step of the 8B shape, every allocation recorded."""
    info = modelinfo.describe({**LLAMA_8B, "num_hidden_layers": layers})
    s = E._settings(run_config(train={"micro_batch_size": 2, "grad_accum_steps": 1, **train},
                               data={"max_seq_len": 2048}, lora={"r": 16}), liger=False)
    s["keep_weights"] = keep_weights
    s["transient_outputs"] = transient_outputs
    targets = E.lora_targets(info, s["target_modules"])
    shape = E.Shape(2, 2048, 2, s["attention"], s["lora_dropout"], s["lora_r"], False)
    tl = E._Timeline({}, record=True)
    E._StepSimulation(info, targets, shape, s, tl).run()
    return tl


def test_each_offloaded_input_comes_back_once_on_a_side_stream():
    layer_input = 2 * LLAMA_8B["hidden_size"] * 2 * 2048
    for layers in (1, 2, 6):
        events = simulated_step(layers, cuda_graphs=False).events
        fetched = {handle for handle, nbytes, stream in events if stream == 1}
        assert len(fetched) == 2 * layers  # a split layer's two blocks
        assert {nbytes for handle, nbytes, stream in events if handle in fetched and nbytes} == {layer_input}
        # the block being recomputed and the one before it, never more
        alive = most = 0
        for handle, nbytes, _ in events:
            if handle in fetched:
                alive += 1 if nbytes else -1
                most = max(most, alive)
        assert alive == 0 and most == 2
    # the plain checkpoint keeps the inputs on the GPU: nothing on the side stream
    assert not any(stream for _, _, stream in simulated_step(6, offload_checkpoints=False).events)


def test_offload_recomputes_each_block_to_its_output():
    # transformers' checkpoint stops recomputing at the layer's last saved tensor and makes the
    # residual sum between the blocks again; offload.py's runs each block of a split layer to its
    # output (held with the incoming gradient until its backward returns) and fetches each block's
    # input back. Per layer: two inputs fetched and the MLP block's output, less that residual sum.
    h, tokens = LLAMA_8B["hidden_size"], 2 * 2048

    def difference(layers):
        offloaded = [nbytes for _, nbytes, _ in simulated_step(layers, False, cuda_graphs=False).events if nbytes]
        plain = [nbytes for _, nbytes, _ in simulated_step(layers, offload_checkpoints=False).events if nbytes]
        return len(offloaded) - len(plain), sum(offloaded) - sum(plain)

    one = difference(1)
    for layers in (2, 6):
        count, nbytes = difference(layers)
        assert count - one[0] == layers - 1
        assert nbytes - one[1] == (layers - 1) * 2 * h * tokens
    # Once per step, less: offload.py's checkpoint needs no gradient for the embeddings' output, so
    # the first layer computes no input gradient (model.gpu_fast_paths removes transformers' hook).
    assert one[0] < 1 and one[1] < 2 * h * tokens


def test_split_layers_keep_weights_from_recomputation_to_backward():
    # lora_kernels.keep_weights: the attention block's four projections and the MLP's down_proj
    # are not dequantized again in backward; the first layer's q/k/v input needs no gradient, so
    # its three weights are dequantized there as before (none of them is kept)
    h, i, kv = LLAMA_8B["hidden_size"], LLAMA_8B["intermediate_size"], 1024

    def dequantized(layers, keep):
        weights = {2 * n for n in (h * h, kv * h, i * h)}  # the weights in bf16 (the NF4 kernel: no fp32 scales)
        return [n for _, n, _ in simulated_step(layers, keep, cuda_graphs=False).events if n in weights]

    for layers in (1, 3):
        kept, again = dequantized(layers, True), dequantized(layers, False)
        assert len(again) - len(kept) == 2 + 5 * (layers - 1)
        assert sum(again) - sum(kept) == 2 * (h * h + i * h) + (layers - 1) * 2 * (2 * h * h + 2 * kv * h + i * h)


def test_split_blocks_hand_their_output_over_in_the_graphs_buffer():
    # offload.TRANSIENT_BLOCK_OUTPUTS: with the graphs, a block's forward output is the graph's
    # buffer, not a copy of it: two hidden-sized tensors fewer per layer, and never a higher peak
    hidden = 2 * LLAMA_8B["hidden_size"] * 2 * 2048

    def copies(layers, transient):
        sim = simulated_step(layers, transient_outputs=transient)
        return sum(1 for _, n, _ in sim.events if n == hidden), sim

    for layers in (1, 3):
        (kept, handed), (copied, copying) = copies(layers, True), copies(layers, False)
        assert copied - kept == 2 * layers
        assert handed.peak <= copying.peak
    assert point().settings["transient_outputs"] is True
    # without the graphs there is no buffer to hand over: the setting changes nothing
    eager = [simulated_step(2, cuda_graphs=False, transient_outputs=t).events for t in (True, False)]
    assert eager[0] == eager[1]


def test_a_layer_with_four_norms_is_recomputed_whole():
    # offload.split_layer takes Llama-style layers only; Gemma 2's is checkpointed whole
    gemma2 = {**LLAMA_8B, "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "num_hidden_layers": 2}
    est = point(gemma2, cuda_graphs=False)
    assert est.cpu_pinned == 2 * 2 * LLAMA_8B["hidden_size"] * 2 * 2048  # one input per layer (embedding tied)


# --- CUDA graphs of the checkpointed passes -----------------------------------------------------------


def test_cuda_graphs_add_their_pool_and_buffers():
    graphs, eager = point(), point(cuda_graphs=False)
    assert graphs.settings["cuda_graphs"] and not eager.settings["cuda_graphs"]
    assert eager.item("graphs") == 0
    # the pool holds one pass's temporaries: more than the fixed buffers, less than a layer's share of the step
    h, tokens = LLAMA_8B["hidden_size"], 2 * 2048
    buffers = 2 * 2 * h * tokens + 2 * E.CUBLAS_WORKSPACE
    assert buffers < graphs.item("graphs") < graphs.allocated / 4
    # the gradients of every adapter stay allocated for the graphs, from the start of the step
    assert graphs.item("gradients") == graphs.item("lora")
    # a pool apart from the allocator's: the eager temporaries no longer share memory with the layers'
    assert graphs.allocated > eager.allocated
    assert point(cuda_graphs=True, offload_checkpoints=False).item("graphs") == 0  # they need the offloaded checkpoint


# --- the embedding in CPU memory --------------------------------------------------------------------


def test_an_untied_embedding_leaves_the_gpu():
    info = modelinfo.describe(LLAMA_8B)
    on, off = point(), point(embeddings_on_cpu=False)
    embedding = 2 * info.embedding_params  # 128256 x 4096 in bf16: 1 GiB
    assert on.item("weights_16bit") == 2 * info.unquantized_params - embedding == off.item("weights_16bit") - embedding
    assert off.allocated - on.allocated == embedding  # the looked-up rows cost what the embedding's output did
    assert on.cpu_pinned - off.cpu_pinned == embedding
    assert "embeddings in CPU memory" in next(i.label for i in on.items if i.key == "weights_16bit")


def test_a_tied_or_scaled_embedding_stays():
    tied = point(LLAMA_1B)  # Llama-3.2-1B: the embedding is the output head too
    assert not tied.settings["embeddings_on_cpu"]
    assert tied.item("weights_16bit") == 2 * modelinfo.describe(LLAMA_1B).unquantized_params
    assert tied.allocated == point(LLAMA_1B, embeddings_on_cpu=False).allocated
    untied_1b = point({**LLAMA_1B, "tie_word_embeddings": False})
    assert untied_1b.settings["embeddings_on_cpu"]
    # Gemma's embedding scales its output (not a plain nn.Embedding): the engine leaves it on the GPU
    gemma = {**LLAMA_1B, "model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "head_dim": 256,
             "num_attention_heads": 8, "num_key_value_heads": 4, "tie_word_embeddings": False}
    assert not point(gemma).settings["embeddings_on_cpu"]


# --- liger-kernel's fused kernels -----------------------------------------------------------------


def test_fused_kernels_only_where_liger_kernel_is_installed(monkeypatch):
    present, absent = point(liger=True), point(liger=False)
    assert present.settings["fused_kernels"] and not absent.settings["fused_kernels"]
    assert present.allocated < absent.allocated
    assert absent.allocated == point(liger=True, fused_kernels=False).allocated
    assert any("liger-kernel is not installed" in n for n in absent.notes)
    assert not any("liger-kernel" in n for n in present.notes + point(liger=False, fused_kernels=False).notes)
    # without ``liger`` the estimate looks for the package itself
    monkeypatch.setattr(E, "liger_installed", lambda: True)
    assert point(liger=None).settings["fused_kernels"]
    monkeypatch.setattr(E, "liger_installed", lambda: False)
    assert not point(liger=None).settings["fused_kernels"]


def test_fused_kernels_keep_less_per_layer():
    # without checkpointing every layer keeps its tensors. transformers' RMSNorm keeps an fp32 copy
    # of its input (4 bytes per value) where liger's keeps the bf16 input itself (2), twice a layer;
    # transformers' MLP keeps gate, silu(gate) and up (3 x 2 x I), liger's SwiGLU gate and up
    h, i, tokens = LLAMA_1B["hidden_size"], LLAMA_1B["intermediate_size"], 2 * 2048

    def per_layer(liger: bool) -> float:
        a, b = (point(LLAMA_1B, layers=n, liger=liger, gradient_checkpointing=False) for n in (16, 32))
        assert a.phase == b.phase
        return (b.item("activations") - a.item("activations")) / 16

    assert per_layer(False) - per_layer(True) == tokens * (2 * (4 - 2) * h + 2 * i)


def test_fused_kernels_by_model_type():
    # glm4: liger-kernel has no RoPE kernel for it; an unknown model type gets none either
    for model_type, fused in (("qwen3", True), ("phi3", True), ("glm4", False), ("somethingnew", False)):
        config = {**LLAMA_1B, "model_type": model_type, "architectures": ["XForCausalLM"]}
        present, absent = point(config, liger=True), point(config, liger=False)
        assert present.settings["fused_kernels"] is fused, model_type
        assert (present.allocated < absent.allocated) is fused, model_type


def test_the_mlp_in_token_ranges_and_the_loss_kernel_are_named_where_they_apply(monkeypatch):
    # The 8B shape at 2 × 2,048 tokens keeps its MLP whole; at 8 × 2,048 its intermediate (470 MB)
    # is over 1/20 of the parameters' memory, and the MLP runs on 2,048 tokens at a time.
    assert point().settings["mlp_tile"] is None
    long = point(micro_batch_size=8)
    assert long.settings["mlp_tile"] == E.MLP_TILE_TOKENS
    assert "the MLP on 2,048 tokens at a time" in E.format_report(long, "llama-8b")
    # each range's intermediates instead of the micro-batch's: less than without the ranges
    monkeypatch.setattr(E, "MLP_TILE_SHARE", float("inf"))
    whole = point(micro_batch_size=8)
    assert whole.settings["mlp_tile"] is None and whole.allocated > long.allocated
    assert point(micro_batch_size=8, offload_checkpoints=False).settings["mlp_tile"] is None  # split layers only
    monkeypatch.setattr(E, "triton_installed", lambda: True)
    with_kernel = point()
    assert "the loss's Triton kernel" in E.format_report(with_kernel, "llama-8b")
    monkeypatch.setattr(E, "triton_installed", lambda: False)
    assert "Triton" not in E.format_report(point(), "llama-8b")
