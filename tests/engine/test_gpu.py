"""The engine on CUDA (run on the GPU machine: pytest -m gpu)."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from qlora_studio import config as C
from qlora_studio import events, runs
from qlora_studio.engine.trainer import StopFlag, Trainer

from .adamw import run_adamw

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_demo_trains_on_cuda_with_bf16_and_paged_adamw(demo_template, tmp_path):
    cfg = C.replace(C.load(demo_template / "config.toml"),
                    train={"max_steps": 40, "device": "cuda", "checkpoint_every": 20, "gradient_checkpointing": True})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    writer = events.EventWriter(run_dir / runs.EVENTS)
    outcome = Trainer(cfg, run_dir, writer, StopFlag(run_dir), base_dir=demo_template).run()
    writer.close()
    evts = list(events.read(run_dir / runs.EVENTS))
    assert outcome.status == "finished"
    started = evts[0]
    assert started["device"]["kind"] == "cuda" and started["device"]["compute_dtype"] == "bfloat16"
    # The GPU paths are on by default (the demo's embedding is untied, so it waits in CPU memory).
    assert {"offload_checkpoints", "embeddings_on_cpu"} <= set(started["model"]["fast_paths"])
    steps = [e for e in evts if e["type"] == "step"]
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]
    assert all(e["mem_allocated"] > 0 and e["mem_peak"] >= e["mem_allocated"] for e in steps)
    assert [s for s, _ in runs.list_checkpoints(run_dir)] == [20]


def test_cuda_model_is_4bit_with_bf16_rest(demo_template):
    import bitsandbytes as bnb

    from qlora_studio.engine.model import load_model

    cfg = C.load(demo_template / "config.toml")
    model, _, info = load_model(cfg, torch.device("cuda", 0), torch.bfloat16, demo_template)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == info.quantized_layers == 28
    assert all(m.weight.device.type == "cuda" and m.weight.quant_state.quant_type == "nf4" for m in layers)
    base = model.get_base_model()
    assert base.lm_head.weight.dtype == torch.bfloat16 and base.model.norm.weight.dtype == torch.bfloat16


def test_chunked_loss_matches_standard_on_cuda(demo_template):
    from qlora_studio.engine.data import Batcher, collate, load_dataset
    from qlora_studio.engine.model import load_model
    from qlora_studio.engine.trainer import loss_sum

    cfg = C.load(demo_template / "config.toml")
    model, tok, _ = load_model(cfg, torch.device("cuda", 0), torch.bfloat16, demo_template)
    data = load_dataset(cfg.data, tok, demo_template)
    batch = {k: v.cuda() for k, v in collate(Batcher(data.train, 8, 0).next(), tok.pad_token_id).items()}
    torch.testing.assert_close(loss_sum(model, batch, "chunked"), loss_sum(model, batch, "standard"), rtol=1e-3, atol=1e-2)


def test_real_out_of_memory_is_recovered_under_a_memory_cap(demo_template, tmp_path, monkeypatch):
    """Cap this process's share of the GPU between the peaks of micro-batch 64 and 16, then train at 64."""
    import gc

    from qlora_studio.engine import device as devices
    from qlora_studio.engine import offload

    # The MLP in ranges of tokens would make the two peaks nearly equal (a range holds 16 rows).
    monkeypatch.setattr(offload, "mlp_tile", lambda model, max_tokens: None)
    from qlora_studio.engine.data import Batcher, collate, load_dataset
    from qlora_studio.engine.model import load_model
    from qlora_studio.engine.trainer import accumulate

    cfg = C.replace(C.load(demo_template / "config.toml"),
                    train={"device": "cuda", "micro_batch_size": 64, "grad_accum_steps": 1, "max_steps": 3,
                           "checkpoint_every": 0, "loss_impl": "standard", "cuda_graphs": False},
                    data={"max_seq_len": 128})
    device = torch.device("cuda", 0)
    model, tok, _ = load_model(cfg, device, torch.bfloat16, demo_template)
    data = load_dataset(cfg.data, tok, demo_template)
    examples = Batcher(data.train, 64, 0).next()

    def peak(rows: int) -> int:
        # Allocated, not reserved: the reserved peak includes cached blocks that the allocator gives
        # back before it fails under a cap, so a cap under the reserved peak of 64 rows may not
        # be under what they need (no out-of-memory error, in three of four runs on the H200).
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        accumulate(model, [collate(examples[:rows], tok.pad_token_id)], cfg, device)
        model.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated()

    peak(16)  # what is made once (cuBLAS's workspaces, kernels) is made here, counted in neither peak
    big, small = peak(64), peak(16)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    assert big > small
    total = torch.cuda.get_device_properties(0).total_memory
    cap = (big + small) / 2
    torch.cuda.set_per_process_memory_fraction(cap / total, 0)
    try:
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        writer = events.EventWriter(run_dir / runs.EVENTS)
        outcome = Trainer(cfg, run_dir, writer, StopFlag(run_dir), base_dir=demo_template).run()
        writer.close()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    evts = list(events.read(run_dir / runs.EVENTS))
    assert outcome.status == "finished"
    recovered = [e for e in evts if e["type"] == "oom_recovered"]
    assert recovered and recovered[-1]["micro_batch_size"] * recovered[-1]["grad_accum_steps"] == 64
    assert devices.memory_stats(device)["mem_peak"] <= cap


def test_fused_paged_adamw_keeps_its_state_in_unified_memory_and_does_bitsandbytes_arithmetic():
    import bitsandbytes as bnb

    from qlora_studio.engine.optim import PagedAdamWFused
    from qlora_studio.monitor.paging import paged_state_bytes

    torch.manual_seed(0)
    start = [torch.randn(256, 512, device="cuda"), torch.randn(300, device="cuda"), torch.randn(16, 4096, device="cuda")]
    grads = [[torch.randn_like(t) for t in start] for _ in range(5)]
    results = {cls: run_adamw(cls, start, grads) for cls in (bnb.optim.PagedAdamW32bit, PagedAdamWFused)}
    ours, opt = results[PagedAdamWFused]
    for a, b, s in zip(ours, results[bnb.optim.PagedAdamW32bit][0], start):
        # The same updates up to fp32 rounding (the two kernels order their arithmetic differently):
        # five steps of lr 1e-2 move each value by up to 0.05; they agree within a thousandth of that.
        torch.testing.assert_close(a - s, b - s, rtol=1e-3, atol=2e-5)
    hosts = opt.managed_host_tensors()
    assert opt.paged and len(hosts) == 2
    numel = sum(t.numel() for t in start)
    assert paged_state_bytes(opt) == 2 * 4 * numel  # every state, small ones too
    for host, key in zip(hosts, ("exp_avg", "exp_avg_sq")):
        first = opt.state[ours[0]][key]
        assert first.device.type == "cuda" and first.data_ptr() == host.data_ptr()
        torch.cuda.synchronize()
        assert torch.equal(host[: first.numel()], first.flatten().cpu())  # the same pages, seen from the CPU


def test_a_page_out_during_a_real_run_shows_as_paging_events(demo_template, tmp_path):
    """Train with PagedAdamW; after step 2 touch the paged state from the CPU; step 3 pages it back."""
    pytest.importorskip("cupti", reason="cupti-python is not installed")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_studio.monitor.paging import paged_state_bytes

    # LoRA matrices of at least 100k elements: over 30 MiB of paged state.
    model_dir = tmp_path / "model"
    tok = AutoTokenizer.from_pretrained(demo_template / "model")
    config = LlamaConfig(vocab_size=1024, hidden_size=1024, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    cfg = C.replace(C.load(demo_template / "config.toml"), model={"name_or_path": str(model_dir)},
                    data={"path": str(demo_template / "data.jsonl")}, lora={"r": 128},
                    train={"max_steps": 4, "device": "cuda", "checkpoint_every": 0, "optimizer": "paged_adamw_32bit"})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    writer = events.EventWriter(run_dir / runs.EVENTS)
    trainer = Trainer(cfg, run_dir, writer, StopFlag(run_dir))
    touched = {}

    def touch_after_step_2(event):
        if event["type"] == "step" and event["step"] == 2:
            size = paged_state_bytes(trainer.optimizer)
            torch.cuda.synchronize()
            # The fused paged AdamW's states are CUDA views of two unified buffers; bitsandbytes'
            # CPU-side tensors over those buffers are what the CPU can touch.
            for host in trainer.optimizer.managed_host_tensors():
                host.add_(0.0)  # a CPU write faults every page over to host memory
            touched["bytes"] = size

    writer.listeners.append(touch_after_step_2)
    assert trainer.run().status == "finished"
    writer.close()
    if os.environ.get("QS_RECORD_DIR"):  # bench/run_gpu.sh keeps this real run's events for the monitor page's tests
        shutil.copy(run_dir / runs.EVENTS, Path(os.environ["QS_RECORD_DIR"]) / "gpu_run_events.jsonl")
    evts = list(events.read(run_dir / runs.EVENTS))
    size = touched["bytes"]
    assert size > 30 * 2**20
    steps = [e for e in evts if e["type"] == "step"]
    assert steps[-1]["paged_state_bytes"] == size
    # The touch happens between steps 2 and 3: its moves are flushed with step 2 or 3.
    paging = [e for e in evts if e["type"] == "paging" and e["step"] in (2, 3)]
    moved_in = sum(e["bytes_htod"] for e in paging if e["phase"] == "optimizer" and e["step"] == 3)
    moved_out = sum(e["bytes_dtoh"] for e in paging)
    assert abs(moved_out - size) <= 0.05 * size, paging
    assert abs(moved_in - size) <= 0.05 * size, paging
