"""What the optimizer step costs for all-linear LoRA, and what the engine's multi-tensor paged AdamW saves.

bitsandbytes' paged AdamW updates one parameter at a time from Python (a prefetch of each state and
one kernel per parameter: 224 parameters for LoRA on the 1B shape, 448 on the 8B shape). This
script times one optimizer step over the LoRA parameters of a benchmark shape (r=16 on the seven
projections, as bench/perf_harness.py) for:

  bnb          bitsandbytes' PagedAdamW32bit, as the seed recipe and Unsloth use it
  one-sync     this engine's PagedAdamW32bitOneSync (engine/optim.py)
  torch-fused  torch's AdamW(fused=True), state in ordinary GPU memory (not paged)
  fused-paged  this engine's PagedAdamWFused (engine/optim.py): torch's fused AdamW with both states
               in managed (paged) buffers of bitsandbytes', prefetched to the GPU once per step

It reports, per variant, the host time of ``step()`` (until it returns) and the step's wall time
with the GPU drained, as medians over the timed steps, and checks that the parameters after the
last step agree with bitsandbytes' (the same AdamW arithmetic). Nothing here pages on purpose: the
managed buffer is a few hundred MiB, far below the card's free memory.

    python bench/optimizer_step.py --shape 8b [--steps 30]

Needs a CUDA GPU and bitsandbytes. Writes bench/results/optimizer_step-<shape>-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import perf_harness as H
from _results import write_result

RANK = 16


def lora_shapes(shape: str) -> list[tuple[int, int]]:
    """The (rows, columns) of every LoRA A and B matrix of the shape, in model order."""
    s = H.SHAPES[shape]
    h, inter = s["hidden_size"], s["intermediate_size"]
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    projections = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]  # (in, out)
    out = []
    for _ in range(s["num_hidden_layers"]):
        for fan_in, fan_out in projections:
            out += [(RANK, fan_in), (fan_out, RANK)]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=("1b", "8b"), default="1b")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()

    import bitsandbytes as bnb
    import torch

    from qlora_studio.engine.optim import PagedAdamW32bitOneSync, PagedAdamWFused

    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    device = torch.device("cuda", 0)
    shapes = lora_shapes(args.shape)
    g = torch.Generator(device=device).manual_seed(0)
    start = [torch.randn(shape, device=device, generator=g) * 0.02 for shape in shapes]
    grads = [[torch.randn(shape, device=device, generator=g) * 1e-3 for shape in shapes] for _ in range(4)]
    hyper = dict(lr=2e-4, betas=(0.9, 0.999), weight_decay=0.01)

    def make(name):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        if name == "bnb":
            opt = bnb.optim.PagedAdamW32bit(params, **hyper)
            return params, opt.step
        if name == "one-sync":
            opt = PagedAdamW32bitOneSync(params, **hyper)
            return params, opt.step
        if name == "torch-fused":
            opt = torch.optim.AdamW(params, fused=True, **hyper)
            return params, opt.step
        opt = PagedAdamWFused(params, **hyper)
        return params, opt.step

    rows, finals = [], {}
    for name in ("bnb", "one-sync", "torch-fused", "fused-paged"):
        params, step = make(name)
        host, wall = [], []
        for i in range(3 + args.steps):
            for p, gr in zip(params, grads[i % len(grads)]):
                p.grad = gr
            torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            torch.cuda.synchronize(device)
            t2 = time.perf_counter()
            if i >= 3:
                host.append(t1 - t0)
                wall.append(t2 - t0)
        finals[name] = torch.cat([p.detach().flatten() for p in params])
        row = {"variant": name, "parameters": len(params), "host_ms": 1000 * statistics.median(host),
               "wall_ms": 1000 * statistics.median(wall)}
        rows.append(row)
        del params, step
        torch.cuda.empty_cache()
    reference = finals["bnb"]
    for row in rows:
        diff = (finals[row["variant"]] - reference).abs().max().item()
        row["max_abs_diff_vs_bnb"] = diff
    n = sum(a * b for a, b in shapes)
    md = [f"### optimizer step, LoRA r={RANK} on the {args.shape} shape: {len(shapes)} parameters, {n / 1e6:.1f} M values",
          "", "| variant | host ms (step returns) | wall ms (GPU drained) | max abs diff vs bnb after the run |",
          "|---|---|---|---|"]
    for row in rows:
        md.append(f"| {row['variant']} | {row['host_ms']:.2f} | {row['wall_ms']:.2f} | {row['max_abs_diff_vs_bnb']:.2e} |")
    text = "\n".join(md)
    print(text)
    write_result(f"optimizer_step-{args.shape}", {"rows": rows, "steps": args.steps}, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
