"""The engine on CUDA (run on the GPU machine: pytest -m gpu)."""

import pytest
import torch

from qlora_studio import config as C
from qlora_studio import events, runs
from qlora_studio.engine.trainer import StopFlag, Trainer

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
    batch = {k: v.cuda() for k, v in collate(Batcher(data.train, 8, 0, tok.pad_token_id).next(), tok.pad_token_id).items()}
    torch.testing.assert_close(loss_sum(model, batch, "chunked"), loss_sum(model, batch, "standard"), rtol=1e-3, atol=1e-2)
