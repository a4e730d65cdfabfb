"""The fused LoRA layers in the estimate: A and scale·B cast to the compute dtype in each pass."""

from __future__ import annotations

from qlora_studio.engine import estimate as E
from qlora_studio.engine import modelinfo

from .shapes import LLAMA_8B, run_config

BATCH, SEQ, C = 2, 1024, 2


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
