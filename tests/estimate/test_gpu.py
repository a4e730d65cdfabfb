"""The estimate against a real training step on CUDA (run on the GPU machine: pytest -m gpu tests/estimate).

A mid-sized random Llama keeps this quick; bench/estimate_accuracy.py measures the full grid.
"""

from __future__ import annotations

import pytest
import torch

from qlora_studio import config as C
from qlora_studio.engine import estimate as E

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("llama-mid")
    config = LlamaConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=4, vocab_size=32768, max_position_embeddings=4096)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


# The GPU-only paths come last: liger-kernel's patch also replaces transformers' classes for models
# built later in the process, which the cases without it must not get.
@pytest.mark.parametrize("checkpointing, loss, fused, fast", [
    (True, "chunked", True, False), (False, "chunked", True, False), (True, "standard", False, False),
    (False, "standard", False, False), (True, "chunked", True, True), (False, "chunked", True, True),
])
def test_estimate_matches_a_cuda_step(model_folder, checkpointing, loss, fused, fast):
    """``fast``: the GPU-only paths of engine/model.py (offloaded checkpoints, the untied embedding in
    CPU memory, liger-kernel's kernels when installed), as load_model switches them on."""
    from qlora_studio.engine.model import attach_lora, gpu_fast_paths, load_base
    from qlora_studio.engine.modelinfo import read_model_config
    from qlora_studio.engine.trainer import build_optimizer, build_scheduler, train_step

    cfg = C.from_dict({
        "model": {"name_or_path": str(model_folder)},
        "data": {"max_seq_len": 1024},
        "train": {"micro_batch_size": 4, "grad_accum_steps": 1, "gradient_checkpointing": checkpointing,
                  "loss_impl": loss, "fused_lora": fused, "device": "cuda", "offload_checkpoints": fast,
                  "embeddings_on_cpu": fast, "fused_kernels": fast},
    })
    device = torch.device("cuda", 0)
    torch.cuda.empty_cache()
    model, _ = attach_lora(load_base(str(model_folder), cfg, device, torch.bfloat16), cfg)
    paths = gpu_fast_paths(model, cfg, device)
    assert ("embeddings_on_cpu" in paths) is fast
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer, 3)
    torch.cuda.reset_peak_memory_stats()
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        ids = torch.randint(10, 32000, (4, 1024), generator=generator)
        train_step(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}],
                   params, optimizer, scheduler, cfg, device)
    torch.cuda.synchronize()
    allocated = torch.cuda.max_memory_allocated()
    est = E.estimate(read_model_config(str(model_folder)), cfg, suggest=False, liger="fused_kernels" in paths)
    assert est.allocated == pytest.approx(allocated, rel=0.05), (est.allocated / 2**20, allocated / 2**20)
    del model, optimizer, params
