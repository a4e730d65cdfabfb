"""The fused LoRA layers in the estimate: A and scale·B cast in each pass, and the projections of one
input (q/k/v, gate/up) computed together by lora_kernels.LoRA4bitGroupFunction when no dropout
applies: one product with their A's stacked, one input gradient for the group.

tests/estimate/test_engine_agreement.py holds the same simulation to the engine's real projections,
byte for byte.
"""

from __future__ import annotations

import pytest

from qlora_studio.engine import estimate as E
from qlora_studio.engine import modelinfo

from .shapes import LLAMA_8B, run_config

BATCH, SEQ, C = 2, 1024, 2  # 2,048 tokens: the input's gradient is not the size of any weight


def simulation(dropout: float = 0.0, targets: tuple[str, ...] = ("all-linear",), dtype: str = "bfloat16",
               **overrides) -> E._StepSimulation:
    """The 8B shape's step, every allocation recorded, bytes unrounded; ``overrides``: settings."""
    info = modelinfo.describe(LLAMA_8B)
    run = run_config(train={"micro_batch_size": BATCH, "grad_accum_steps": 1}, data={"max_seq_len": SEQ},
                     lora={"r": 16, "dropout": dropout, "target_modules": list(targets)}, quant={"compute_dtype": dtype})
    s = E._settings(run, liger=False, **overrides)
    shape = E.Shape(BATCH, SEQ, E.DTYPE_BYTES[dtype], s["attention"], s["lora_dropout"], s["lora_r"], False)
    tl = E._Timeline({}, record=True, granule=1)
    return E._StepSimulation(info, E.lora_targets(info, s["target_modules"]), shape, s, tl)


def projections(sim: E._StepSimulation, names: tuple[str, ...]) -> tuple[list[int], int]:
    """Forward and backward through the projections ``names`` of one input: the sizes allocated by
    their backward, and its peak above what was alive before it."""
    tl = sim.tl
    x = tl.alloc(C * LLAMA_8B["hidden_size"] * sim.t)
    saved: dict = {}
    outs = sim.projections_forward(names, x, True, True, saved)
    grads = {name: tl.alloc(tl.size(out)) for name, out in zip(names, outs)}
    tl.free(*outs)
    start, before = len(tl.events), tl.now
    tl.reset_peak()
    tl.free(sim.projections_backward(names, grads, saved, True))
    return [nbytes for _, nbytes, _ in tl.events[start:] if nbytes], tl.peak - before


def test_groups_follow_the_fused_layers():
    assert E._settings(run_config())["lora_groups"]
    assert not E._settings(run_config(train={"fused_lora": False}))["lora_groups"]
    assert simulation()._group(E.QKV) == E.QKV and simulation()._group(E.GATE_UP) == E.GATE_UP
    # dropout draws a mask per projection: each computes its own output; so do PEFT's layers
    assert simulation(0.05)._group(E.QKV) == () and simulation(fused_lora=False)._group(E.QKV) == ()
    # the targeted members only, two or more
    sim = simulation(targets=("q_proj", "v_proj", "gate_proj"))
    assert sim._group(E.QKV) == ("q_proj", "v_proj") and sim._group(E.GATE_UP) == ()


@pytest.mark.parametrize("names", [E.QKV, E.GATE_UP])
def test_a_group_has_one_input_gradient(names):
    h, t = LLAMA_8B["hidden_size"], BATCH * SEQ
    input_grad = C * h * t
    grouped, grouped_peak = projections(simulation(), names)
    alone, alone_peak = projections(simulation(lora_groups=False), names)
    # one gradient for the input, each weight's product added in; one at a time, each projection
    # has its own, and autograd sums them into new tensors
    assert grouped.count(input_grad) == 1
    assert alone.count(input_grad) == 2 * len(names) - 1
    if names == E.QKV:
        # q's weight is dequantized with one input gradient alive, not two (k's and v's summed,
        # and q's own). Not so for gate/up: the group holds both outputs' gradients until it
        # runs, where one at a time up's goes before gate_proj's weight is dequantized.
        assert grouped_peak < alone_peak
    # every A's gradient is one fp32 product (its row blocks are the A's .grad): one allocation
    stacked = 4 * 16 * len(names) * h
    assert grouped.count(stacked) == 1 and stacked not in alone


@pytest.mark.parametrize("keep_weights", [False, True])
def test_a_group_computes_its_outputs_at_its_first_members_call(keep_weights):
    sim = simulation(keep_weights=keep_weights)
    tl, saved = sim.tl, {}
    x = tl.alloc(C * LLAMA_8B["hidden_size"] * sim.t)
    q, k, v = sim.projections_forward(E.QKV, x, True, True, saved)
    # one function saves the input, the product with the stacked A's, those and each scale·B; in a
    # split layer's recomputation (lora_kernels.keep_weights) it also keeps the dequantized weights
    r, t = 16, sim.t
    kept = {"w0", "w1", "w2"} if keep_weights else set()
    assert set(saved["q_proj"]) == {"x", "xa", "a", "b0", "b1", "b2"} | kept and saved["k_proj"] == saved["v_proj"] == {}
    assert tl.size(saved["q_proj"]["xa"]) == C * 3 * r * t
    assert tl.size(saved["q_proj"]["a"]) == C * 3 * r * LLAMA_8B["hidden_size"]
    assert q < k < v  # allocated in the model's order


def test_a_fused_layer_casts_its_adapter_in_each_pass():
    sim = simulation(0.05)
    tl, lin = sim.tl, sim.linear["o_proj"]
    x = tl.alloc(C * lin.in_features * sim.t)
    _, saved = sim.linear_forward("o_proj", x, True, True)
    # A and scale·B in the compute dtype, saved for backward (no copies kept between passes)
    assert tl.size(saved["a"]) == C * 16 * lin.in_features and tl.size(saved["b"]) == C * lin.out_features * 16
    # for an fp32 computation A is used as it is, scale·B is made in fp32
    sim32 = simulation(0.05, dtype="float32")
    x = sim32.tl.alloc(4 * lin.in_features * sim32.t)
    _, saved = sim32.linear_forward("o_proj", x, True, True)
    assert "a" not in saved and sim32.tl.size(saved["b"]) == 4 * lin.out_features * 16
