"""The estimate against a real training step on CUDA (run on the GPU machine: pytest -m gpu tests/estimate).

A mid-sized random Llama keeps this quick; bench/estimate_accuracy.py measures the full grid.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize("checkpointing, loss, fused, fast", [
    (True, "chunked", True, False), (False, "chunked", True, False), (True, "standard", False, False),
    (False, "standard", False, False), (True, "chunked", True, True), (False, "chunked", True, True),
])
def test_estimate_matches_a_cuda_step(model_folder, checkpointing, loss, fused, fast):
    """``fast``: the GPU-only paths of engine/model.py (offloaded checkpoints, the untied embedding in
    CPU memory, liger-kernel's kernels when installed), as load_model switches them on. Each case is
    measured in its own process (gpu_step.py), as each training run has its own worker."""
    from qlora_studio.engine.modelinfo import read_model_config

    run = {"model": {"name_or_path": str(model_folder)}, "data": {"max_seq_len": 1024},
           "train": {"micro_batch_size": 4, "grad_accum_steps": 1, "device": "cuda",
                     "gradient_checkpointing": checkpointing, "loss_impl": loss, "fused_lora": fused,
                     "offload_checkpoints": fast, "embeddings_on_cpu": fast, "fused_kernels": fast}}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("gpu_step.py")), json.dumps(run)],
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert ("embeddings_on_cpu" in measured["paths"]) is fast
    cfg = C.from_dict(run)
    est = E.estimate(read_model_config(str(model_folder)), cfg, suggest=False, liger="fused_kernels" in measured["paths"])
    allocated = measured["allocated"]
    assert est.allocated == pytest.approx(allocated, rel=0.05), (est.allocated / 2**20, allocated / 2**20)
