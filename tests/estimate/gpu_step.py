"""One training step's peak GPU memory, measured in a fresh process (used by test_gpu.py).

    python tests/estimate/gpu_step.py MODEL_FOLDER SETTINGS_JSON

Loads the model as the engine's worker does, runs three optimizer steps of micro-batch 4 × 1024
random tokens and prints one JSON line: the peak allocated bytes and the GPU paths in use. A fresh
process per case, as every training run has its own worker: what an earlier case left behind in
the process (cached kernels, workspaces, backend choices) cannot change what this one measures.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    import torch

    from qlora_studio import config as C
    from qlora_studio.engine.model import attach_lora, gpu_fast_paths, load_base
    from qlora_studio.engine.trainer import build_optimizer, build_scheduler, train_step

    folder, train = sys.argv[1], json.loads(sys.argv[2])
    cfg = C.from_dict({"model": {"name_or_path": folder}, "data": {"max_seq_len": 1024},
                       "train": {"micro_batch_size": 4, "grad_accum_steps": 1, "device": "cuda", **train}})
    device = torch.device("cuda", 0)
    model, _ = attach_lora(load_base(folder, cfg, device, torch.bfloat16), cfg)
    paths = gpu_fast_paths(model, cfg, device)
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
    print(json.dumps({"allocated": torch.cuda.max_memory_allocated(), "paths": paths}))


if __name__ == "__main__":
    main()
