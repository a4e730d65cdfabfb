"""The estimate's arithmetic on known shapes, its monotonicity, and the verdict with suggestions."""

from __future__ import annotations

import json

import pytest

from qlora_studio.engine import estimate as E
from qlora_studio.engine import modelinfo
from qlora_studio.errors import ModelError

from .shapes import LLAMA_1B, LLAMA_8B, run_config

GiB = 1024**3
ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def point(model=LLAMA_8B, *, gpu=None, **train):
    seq = train.pop("seq", 2048)
    train.setdefault("micro_batch_size", 2)
    train.setdefault("grad_accum_steps", 1)
    gpu_bytes = int(gpu * GiB) if gpu is not None else None
    return E.estimate(model, run_config(train=train, data={"max_seq_len": seq}), gpu_bytes, gpu_bytes)


# --- storage of the weights, adapters and optimizer states ---------------------------------------


def test_packed_4bit_values_are_half_the_quantized_parameters():
    for config in (LLAMA_1B, LLAMA_8B):
        info = modelinfo.describe(config)
        assert point(config).item("weights_4bit") * 2 == info.quantizable_params


def test_quantization_constants():
    info = modelinfo.describe(LLAMA_8B)
    double = E.quantized_bytes(info.linears, double_quant=True)
    single = E.quantized_bytes(info.linears, double_quant=False)
    # 8-bit absmax per 64 weights plus an fp32 constant per 256 of them: 0.127 bits per weight
    assert double.constant_bits_per_param == pytest.approx(8 / 64 + 32 / (64 * 256), rel=5e-3)  # 0.127
    assert single.constant_bits_per_param == pytest.approx(32 / 64, rel=1e-3)
    # exactly: per weight tensor, the absmax codes, the second-level constants, offset and code books
    lin = info.linears[0]
    blocks = lin.params // 64
    assert E.quantized_bytes((lin,), True).constants == lin.count * (blocks + 4 * -(-blocks // 256) + 4 + 64 + 1024)
    assert E.quantized_bytes((lin,), False).constants == lin.count * (4 * blocks + 64)


def test_sixteen_bit_weights_and_adapters():
    info = modelinfo.describe(LLAMA_8B)
    est = point(embeddings_on_cpu=False)  # test_fast_paths.py: with the untied embedding in CPU memory
    assert est.item("weights_16bit") == 2 * info.unquantized_params
    r = est.settings["lora_r"]
    per_layer = sum(r * (lin.in_features + lin.out_features) for lin in info.linears)
    assert est.item("lora") == 4 * per_layer * info.layers  # fp32, as PEFT keeps them over a 4-bit base
    # once: the fused layers keep no compute-dtype copies between passes (they cast A and scale·B in
    # each pass, as PEFT's layers do), so the adapters are the same whichever layer computes them
    assert set(E.LABELS) == {i.key for i in est.items} and "lora_copies" not in E.LABELS
    assert point(embeddings_on_cpu=False, fused_lora=False).item("lora") == est.item("lora")
    est32 = E.estimate(LLAMA_8B, run_config(quant={"compute_dtype": "float32"},
                                            train={"grad_accum_steps": 1, "embeddings_on_cpu": False}), suggest=False)
    assert est32.item("weights_16bit") == 4 * info.unquantized_params


def test_optimizer_states_by_kind():
    sizes = [100_000, 99_999, 4096, 4095]
    paged = E.optimizer_bytes("paged_adamw_32bit", sizes)
    # paged only from 100,000 elements (bitsandbytes' get_state_buffer), two fp32 states each
    assert paged.paged == 8 * 100_000 and paged.device == 8 * (99_999 + 4096 + 4095)
    plain = E.optimizer_bytes("adamw_32bit", sizes)
    assert plain.paged == 0 and plain.device == 8 * sum(sizes) and plain.step_temporary == 0
    eight = E.optimizer_bytes("paged_adamw_8bit", sizes)
    # 8-bit states from 4096 elements, with an fp32 absmax per 256; smaller tensors keep 32 bits
    assert eight.paged == 2 * 100_000
    assert eight.device == 2 * 99_999 + 2 * 4096 + 8 * 4095 + 8 * (-(-100_000 // 256) + -(-99_999 // 256) + 16)
    assert E.optimizer_bytes("adamw_torch", sizes).step_temporary == 4 * sum(sizes)
    # the engine's fused paged AdamW pages every state, whatever its size; its step counts are one tensor
    fused = E.optimizer_bytes("paged_adamw_32bit", sizes, fused=True)
    assert fused.paged == 8 * sum(sizes) and fused.device_tensors == (4 * len(sizes),)
    on_cpu = E.optimizer_bytes("paged_adamw_32bit", sizes, fused=True, cuda=False)
    assert on_cpu.paged == 0 and on_cpu.device_tensors == (4 * sum(sizes), 4 * sum(sizes), 4 * len(sizes))
    assert E.optimizer_bytes("paged_adamw_8bit", sizes, fused=True) == eight  # 8-bit states stay bitsandbytes'


def test_lora_targets_follow_the_engine():
    info = modelinfo.describe(LLAMA_1B)
    assert [lin.name for lin in E.lora_targets(info, ["all-linear"])] == ALL7
    assert [lin.name for lin in E.lora_targets(info, ["v_proj", "q_proj"])] == ["q_proj", "v_proj"]
    with pytest.raises(ModelError, match="does not have.*q_proj, k_proj"):
        E.lora_targets(info, ["query"])
    fewer = E.estimate(LLAMA_1B, run_config(lora={"target_modules": ["q_proj", "v_proj"]}), suggest=False)
    assert fewer.item("lora") < point(LLAMA_1B).item("lora")


# --- the step ------------------------------------------------------------------------------------


def test_items_add_up():
    est = point()
    assert sum(i.bytes for i in est.items) == est.peak
    assert est.allocated + est.item("allocator") == est.reserved
    assert est.reserved + est.item("context") == est.peak == max(est.phases.values()) + est.item("allocator") + est.item("context")
    assert est.phase in est.phases and est.paged > 0
    json.dumps(est.to_dict())


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("loss", ["chunked", "standard"])
def test_monotone_in_sequence_length_and_batch(checkpointing, loss):
    grid = [[point(LLAMA_1B, seq=s, micro_batch_size=b, gradient_checkpointing=checkpointing, loss_impl=loss)
             for b in (1, 2, 4)] for s in (256, 512, 1024)]
    for row in grid:
        assert [e.allocated for e in row] == sorted(e.allocated for e in row)
        assert [e.item("activations") for e in row] == sorted(e.item("activations") for e in row)
    for col in zip(*grid):
        assert [e.allocated for e in col] == sorted(e.allocated for e in col)
    assert grid[-1][-1].allocated > grid[0][0].allocated


def test_checkpointing_lowers_activations():
    on, off = point(gradient_checkpointing=True), point(gradient_checkpointing=False)
    assert on.item("activations") * 4 < off.item("activations")
    assert on.peak < off.peak
    # without recomputation every layer keeps its tensors: activations grow with the layer count
    deeper = point({**LLAMA_8B, "num_hidden_layers": 64}, gradient_checkpointing=False)
    assert deeper.item("activations") > 1.9 * off.item("activations")


def test_chunked_loss_needs_less_than_full_logits():
    standard, chunked = point(loss_impl="standard", seq=4096), point(loss_impl="chunked", seq=4096)
    assert standard.phase == "loss backward"
    # three fp32 vocabulary-sized buffers over 2 x 4095 positions at the log-softmax backward
    assert standard.item("loss") >= 12 * 2 * 4095 * 128256
    assert chunked.item("loss") < standard.item("loss") / 5


def test_accumulation_keeps_gradients_alive():
    one, four = point(grad_accum_steps=1, cuda_graphs=False), point(grad_accum_steps=4, cuda_graphs=False)
    assert four.allocated > one.allocated
    assert four.item("gradients") == four.item("lora")
    # with CUDA graphs the gradients are kept anyway (their buffers are the graphs' outputs)
    assert point(grad_accum_steps=4).allocated == point(grad_accum_steps=1).allocated


def test_cpu_has_no_context_or_allocator():
    est = E.estimate(LLAMA_1B, run_config(), device="cpu", suggest=False)
    assert est.item("context") == est.item("allocator") == 0 and est.peak == est.allocated


# --- verdict and suggestions ---------------------------------------------------------------------


def test_no_gpu_no_verdict():
    est = point()
    assert est.verdict is None and est.suggestions == [] and est.max_micro_batch is None


def test_verdicts_against_the_card():
    est = point()
    floor = est.peak - est.item("allocator")
    roomy = est.peak * 1.1 + est.paged
    assert point(gpu=roomy * 1.05 / GiB).verdict == "fits"
    assert point(gpu=(est.peak * 1.05) / GiB).verdict == "tight"
    assert point(gpu=floor * 0.95 / GiB).verdict == "does_not_fit"
    # paged optimizer states may move to CPU memory: tight, with the reason
    paged = point(gpu=(est.peak * 1.1 + est.paged / 2) / GiB)
    assert paged.verdict == "tight" and "paged optimizer states" in paged.reason
    assert [(s.setting, s.value) for s in paged.suggestions] == [("train.optimizer", "paged_adamw_8bit")]


def test_free_memory_decides_and_names_other_programs():
    est = point()
    run = run_config(train={"micro_batch_size": 2, "grad_accum_steps": 1}, data={"max_seq_len": 2048})
    busy = E.estimate(LLAMA_8B, run, gpu_total=80 * GiB, gpu_free=int(est.allocated * 0.8))
    assert busy.verdict == "does_not_fit" and "in use by other programs" in busy.reason


def test_suggestions_when_it_does_not_fit():
    too_big = point(LLAMA_1B, gpu=40, micro_batch_size=8, seq=4096, gradient_checkpointing=False)
    assert too_big.verdict == "does_not_fit"
    settings = {s.setting: s.value for s in too_big.suggestions}
    assert settings["train.gradient_checkpointing"] is True
    assert 1 <= settings["train.micro_batch_size"] < 8
    assert settings["data.max_seq_len"] < 4096 and settings["data.max_seq_len"] % 64 == 0
    # the largest micro-batch it names fits, twice that does not
    b = too_big.max_micro_batch
    assert point(LLAMA_1B, gpu=40, micro_batch_size=b, seq=4096, gradient_checkpointing=False).verdict in ("fits", "tight")
    assert point(LLAMA_1B, gpu=40, micro_batch_size=2 * b, seq=4096, gradient_checkpointing=False).verdict != "fits"


def test_suggests_dropping_checkpointing_when_there_is_room():
    roomy = point(LLAMA_1B, gpu=80, micro_batch_size=2, seq=1024)
    assert roomy.verdict == "fits"
    drop = [s for s in roomy.suggestions if s.setting == "train.gradient_checkpointing" and s.value is False]
    assert len(drop) == 1 and "CUDA graphs" in drop[0].text  # which need checkpointing
    assert roomy.max_micro_batch >= 2 and roomy.max_seq_len >= 1024
    eager = point(LLAMA_1B, gpu=80, micro_batch_size=2, seq=1024, cuda_graphs=False)
    assert any("about a third faster" in s.text for s in eager.suggestions)


def test_suggests_turning_the_graphs_off_when_only_that_fits():
    graphs, eager = point(), point(cuda_graphs=False)
    assert graphs.peak > eager.peak
    card = (graphs.peak + eager.peak) / 2 * (1 + E.MARGIN) / GiB  # room for one of them, with the margin
    est = point(gpu=card)
    assert est.verdict != "fits" and est.peak * (1 + E.MARGIN) > card * GiB
    off = [s for s in est.suggestions if s.setting == "train.cuda_graphs"]
    assert len(off) == 1 and off[0].value is False and "slower steps" in off[0].text
    without = point(gpu=card, cuda_graphs=False)
    assert without.peak * (1 + E.MARGIN) <= card * GiB
    assert not any(s.setting == "train.cuda_graphs" for s in without.suggestions)


def test_nothing_fits_a_tiny_card():
    est = point(gpu=2)
    assert est.verdict == "does_not_fit" and est.max_micro_batch is None
    assert any(s.setting == "model.name_or_path" for s in est.suggestions)
