"""Where the adapter's term joins the large product: in its epilogue, or added after it.

    python bench/lora_epilogue.py [--shape 8b|1b] [--rank 16]

For each projection of a Llama layer of the harness's shape (random bf16 data), and the input
gradients of its groups (q/k/v, gate/up) as lora_kernels.py computes them, timed from CUDA graphs
(bench/op_costs.py: graphed):

  term first   t = (x A^T) B^T, then t += x W^T in the large product's epilogue (addmm)
  term last    y = x W^T, then y += (x A^T) B^T, a product over r values that reads and writes y
  plain        y = x W^T alone: what the adapter costs either way is the difference

and the same for the input gradient (g W and (g B) A). lora_kernels.py puts the term first
everywhere; this shows what the other order would change, per step. Writes bench/results/lora_epilogue-<shape>-<date>-<commit>.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_result
from op_costs import forward_products, graphed, layer_dims, shape_arguments


def main() -> int:
    args = shape_arguments(__doc__.splitlines()[0])

    import torch

    hidden, inter, layers, kv, tokens = layer_dims(args.shape)
    dev, dt, r = torch.device("cuda"), torch.bfloat16, args.rank
    torch.manual_seed(0)
    rows = {}
    change = 0.0  # ms a step of the term always last against always first
    # (name, input width, output widths of the group's members)
    for name, width, outs in [("q/k/v", hidden, [hidden, kv, kv]), ("o", hidden, [hidden]),
                              ("gate/up", hidden, [inter, inter]), ("down", inter, [hidden])]:
        x = torch.randn(tokens, width, device=dev, dtype=dt)
        a_all = torch.randn(r * len(outs), width, device=dev, dtype=dt) * 0.02
        xa = x @ a_all.t()
        ws = [torch.randn(n, width, device=dev, dtype=dt) * 0.02 for n in outs]
        bs = [torch.randn(n, r, device=dev, dtype=dt) * 0.02 for n in outs]
        gs = [torch.randn(tokens, n, device=dev, dtype=dt) for n in outs]
        gb = torch.cat([g @ b for g, b in zip(gs, bs)], dim=1)

        def forward(last: bool):
            for i, (w, b) in enumerate(zip(ws, bs)):
                term = xa[:, i * r:(i + 1) * r]
                if last:
                    y = x @ w.t()
                    y.addmm_(term, b.t())
                else:
                    y = term @ b.t()
                    y.addmm_(x, w.t())

        def input_grad(last: bool):
            if last:
                gx = gs[0] @ ws[0]
                for g, w in zip(gs[1:], ws[1:]):
                    gx.addmm_(g, w)
                gx.addmm_(gb, a_all)
            else:
                gx = gb @ a_all
                for g, w in zip(gs, ws):
                    gx.addmm_(g, w)

        row = {"forward_plain_ms": graphed(lambda: [x @ w.t() for w in ws]),
               "forward_term_first_ms": graphed(lambda: forward(False)),
               "forward_term_last_ms": graphed(lambda: forward(True)),
               "input_grad_plain_ms": graphed(lambda: [g @ w for g, w in zip(gs, ws)]),
               "input_grad_term_first_ms": graphed(lambda: input_grad(False)),
               "input_grad_term_last_ms": graphed(lambda: input_grad(True))}
        # forward and recomputation (o and down: forward only), then the input gradient, per layer and step
        for kind, calls in (("forward", forward_products(f"{name}_proj")), ("input_grad", 1)):
            change += (row[f"{kind}_term_last_ms"] - row[f"{kind}_term_first_ms"]) * calls * layers
        rows[name] = row
        print(f"{args.shape} {name:8s} " + "  ".join(f"{k.replace('_ms', '')} {v * 1e3:.1f} µs" for k, v in row.items()),
              flush=True)
    print(f"{args.shape}: the term always last changes a step by {change:+.2f} ms against always first")
    write_result(f"lora_epilogue-{args.shape}", {"shape": args.shape, "tokens": tokens, "rank": r, "projections": rows,
                                                  "term_last_change_ms_per_step": change})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
