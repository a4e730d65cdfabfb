"""One training step's peak GPU memory, measured in a fresh process (used by test_gpu.py).

    python tests/estimate/gpu_step.py RUN_CONFIG_JSON

Loads the model of the run configuration (a dict, as ``config.from_dict`` takes it; micro-batch 4 ×
1024 tokens in the test) as the engine's worker does, runs five optimizer steps of random tokens
and prints one JSON line: the peak bytes in use (allocated, and with CUDA graphs their pool, which
replays use without allocating, counted once: bench/_peak.py) and the GPU paths in use. A fresh
process per case, as every training run has its own worker: what an earlier case left behind in
the process (cached kernels, workspaces, backend choices) cannot change what this one measures.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
    from _peak import PeakMemory

    from qlora_studio import config as C
    from qlora_studio.engine.model import attach_lora, gpu_fast_paths, load_base
    from qlora_studio.engine.trainer import build_optimizer, build_scheduler, train_step

    cfg = C.from_dict(json.loads(sys.argv[1]))
    batch, seq = cfg.train.micro_batch_size, cfg.data.max_seq_len
    device = torch.device("cuda", 0)
    model, _ = attach_lora(load_base(cfg.model.name_or_path, cfg, device, torch.bfloat16), cfg)
    paths = gpu_fast_paths(model, cfg, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(cfg, params)
    scheduler = build_scheduler(cfg, optimizer, 3)
    peak = PeakMemory(getattr(model, "layer_graphs", None))
    peak.reset()
    generator = torch.Generator().manual_seed(0)
    peaks = []
    for step in range(5):
        ids = torch.randint(10, 32000, (batch, seq), generator=generator)
        train_step(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}],
                   params, optimizer, scheduler, cfg, device)
        torch.cuda.synchronize()
        if step == 2:  # the CUDA graphs are recorded by now: from here on, replays use their pool
            peaks.append(peak.allocated(pool=False))
            peak.reset()
    peaks.append(peak.allocated())  # outside the pool, plus the pool
    print(json.dumps({"allocated": max(peaks), "paths": paths}))


if __name__ == "__main__":
    main()
