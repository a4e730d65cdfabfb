"""Whether the projections that read one input are faster as one matrix product, on the GPU at hand.

    python bench/gemm_fusion.py [--shape 8b]

A Llama layer's q/k/v projections read the same normed input, and so do gate/up. Each can run as
its own product (as PEFT's modules do) or as one product with the weights stacked. This times,
with CUDA events and random bf16 data of the harness's shape, per layer:

  forward     x W_i^T for each i, against x [W_1; W_2; ...]^T
  input grad  sum_i g_i W_i accumulated in the products' epilogue (addmm), against
              [g_1 g_2 ...] [W_1; W_2; ...] (one product over the stacked output width)
  lora A      x A_i^T for each rank-r A_i, against one product with the A_i stacked

and the saving per step (32 layers: forward, recomputation and backward).
Writes bench/results/gemm_fusion-<shape>-<date>-<commit>.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_result
from op_costs import layer_dims, shape_arguments, timed


def main() -> int:
    args = shape_arguments(__doc__.splitlines()[0])

    import torch

    hidden, inter, layers, kv, tokens = layer_dims(args.shape)
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    groups = {"qkv": [hidden, kv, kv], "gate_up": [inter, inter]}
    x = torch.randn(tokens, hidden, device=dev, dtype=dt)
    rows: dict[str, dict] = {}
    saving = 0.0
    for name, widths in groups.items():
        ws = [torch.randn(n, hidden, device=dev, dtype=dt) * 0.02 for n in widths]
        w_cat = torch.cat(ws)
        gs = [torch.randn(tokens, n, device=dev, dtype=dt) for n in widths]
        g_cat = torch.cat(gs, dim=1)
        a_s = [torch.randn(args.rank, hidden, device=dev, dtype=dt) * 0.01 for _ in widths]
        a_cat = torch.cat(a_s)
        out = torch.empty(tokens, hidden, device=dev, dtype=dt)

        def dgrad_each():
            torch.mm(gs[0], ws[0], out=out)
            for g, w in zip(gs[1:], ws[1:]):
                out.addmm_(g, w)

        r = {"widths": widths,
             "forward_each_ms": timed(lambda: [x @ w.t() for w in ws]),
             "forward_one_ms": timed(lambda: x @ w_cat.t()),
             "input_grad_each_ms": timed(dgrad_each),
             "input_grad_one_ms": timed(lambda: torch.mm(g_cat, w_cat, out=out)),
             "lora_a_each_ms": timed(lambda: [x @ a.t() for a in a_s]),
             "lora_a_one_ms": timed(lambda: x @ a_cat.t())}
        per_layer = (2 * (r["forward_each_ms"] - r["forward_one_ms"]) + (r["input_grad_each_ms"] - r["input_grad_one_ms"])
                     + 2 * (r["lora_a_each_ms"] - r["lora_a_one_ms"]))
        r["saving_per_step_ms"] = per_layer * layers
        saving += r["saving_per_step_ms"]
        rows[name] = r
        print(f"{name:8s} forward {r['forward_each_ms']:.3f} -> {r['forward_one_ms']:.3f} ms, input grad "
              f"{r['input_grad_each_ms']:.3f} -> {r['input_grad_one_ms']:.3f} ms, LoRA A {r['lora_a_each_ms']:.3f} -> "
              f"{r['lora_a_one_ms']:.3f} ms; per step {r['saving_per_step_ms']:.1f} ms")
    print(f"saving per step: {saving:.1f} ms")
    write_result(f"gemm_fusion-{args.shape}", {"shape": args.shape, "tokens": tokens, "rank": args.rank,
                                               "groups": rows, "saving_per_step_ms": saving})
    return 0


if __name__ == "__main__":
    sys.exit(main())
