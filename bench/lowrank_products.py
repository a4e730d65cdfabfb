"""The LoRA layer's thin products, cuBLAS against the engine's Triton kernels, on the GPU at hand.

    python bench/lowrank_products.py [--shape 8b|1b|both] [--sweep] [--wide]

Per projection of a Llama layer of the harness's shapes (bench/perf_harness.py: random bf16 data,
rank 16, q/k/v and gate/up grouped as the engine groups them), the four thin products of
engine/lowrank_kernel.py:

  x A^T     forward and recomputation (twice a step)    times_small
  g B       backward                                    times_small
  g^T xA    B's gradient, backward                      small_t_times (transposed)
  gB^T x    A's gradient, backward                      small_t_times

each timed as a CUDA graph of 20 calls (no launch gaps; the median of 7 replays), as torch runs it
(cuBLAS; the fp32-output products as lora_kernels._mm_fp32 does them) and as the kernels run it with
their default configuration; with ``--sweep`` also every configuration of a grid, and the fastest.
Reported: ms per call, the bandwidth the tall operand is read at, the largest difference from
cuBLAS relative to its largest value, and ms per step (32 or 16 layers) for each.
With ``--wide``, :func:`wide_forward` too. Writes bench/results/lowrank_products-<shape>-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_result
from perf_harness import SHAPES

REPS = 20
TILES = {"times_small": [(32, 128), (64, 64), (64, 128), (128, 64), (32, 256)],
         "small_t_times": [(64, 64), (128, 32), (128, 64), (64, 128), (256, 32)]}


def graphed_ms(fn) -> float:
    """Median ms of one ``fn()`` from a CUDA graph of REPS calls."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(REPS):
            fn()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / REPS)
    del graph
    return statistics.median(times)


def ops_for(shape: str, rank: int):
    """(name, calls per layer and step, tall operand's bytes, cuBLAS call, kernel call(config)) per thin product."""
    import torch

    from qlora_studio.engine import lowrank_kernel as K
    from qlora_studio.engine.lora_kernels import _mm_fp32

    s = SHAPES[shape]
    hidden, inter = s["hidden_size"], s["intermediate_size"]
    kv = s["num_key_value_heads"] * (hidden // s["num_attention_heads"])
    tokens = s["batch"] * s["seq"]
    dev, dt = torch.device("cuda"), torch.bfloat16
    # (projection group, input width, output widths)
    groups = [("qkv", hidden, [hidden, kv, kv]), ("o", hidden, [hidden]), ("gate_up", hidden, [inter, inter]),
              ("down", inter, [hidden])]
    ops = []
    for name, width, outs in groups:
        x = torch.randn(tokens, width, device=dev, dtype=dt)
        a_all = torch.randn(rank * len(outs), width, device=dev, dtype=dt) * 0.02
        xa = x @ a_all.t()
        gb = torch.randn(tokens, rank * len(outs), device=dev, dtype=dt)
        ops.append((f"{name} x A^T", 2, x.numel() * 2, lambda x=x, a=a_all: x @ a.t(),
                    lambda c, x=x, a=a_all: K.times_small(x, a.t(), c), "times_small"))
        ops.append((f"{name} gB^T x", 1, x.numel() * 2, lambda x=x, gb=gb: _mm_fp32(gb.t(), x),
                    lambda c, x=x, gb=gb: K.small_t_times(gb, x, 1.0, False, c), "small_t_times"))
        for i, n in enumerate(outs):
            g = torch.randn(tokens, n, device=dev, dtype=dt)
            b = torch.randn(n, rank, device=dev, dtype=dt) * 0.02
            xs = xa[:, i * rank:(i + 1) * rank]
            ops.append((f"{name}[{i}] g B", 1, g.numel() * 2, lambda g=g, b=b: g @ b,
                        lambda c, g=g, b=b: K.times_small(g, b, c), "times_small"))
            ops.append((f"{name}[{i}] g^T xA", 1, g.numel() * 2, lambda g=g, xs=xs: _mm_fp32(g.t(), xs).mul_(0.5),
                        lambda c, g=g, xs=xs: K.small_t_times(xs, g, 0.5, True, c), "small_t_times"))
    return ops


def run(shape: str, rank: int, sweep: bool) -> dict:
    import torch

    from qlora_studio.engine import lowrank_kernel as K

    layers = SHAPES[shape]["num_hidden_layers"]
    rows = []
    totals = {"cublas_ms": 0.0, "kernel_ms": 0.0, "best_ms": 0.0}
    for name, per_step, nbytes, torch_fn, kernel_fn, kind in ops_for(shape, rank):
        ref = torch_fn()
        got = kernel_fn(None)
        err = ((got.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()
        row = {"op": name, "calls_per_layer_step": per_step, "tall_MB": nbytes / 1e6,
               "cublas_ms": graphed_ms(torch_fn), "kernel_ms": graphed_ms(lambda: kernel_fn(None)), "max_rel_diff": err}
        row["cublas_TBps"] = nbytes / row["cublas_ms"] / 1e9
        row["kernel_TBps"] = nbytes / row["kernel_ms"] / 1e9
        best = (row["kernel_ms"], None)
        if sweep:
            for tile in TILES[kind]:
                for splits in (1, 2, 4):
                    for warps in (4, 8):
                        for stages in (3, 4):
                            config = (*tile, splits, warps, stages)
                            try:
                                ms = graphed_ms(lambda: kernel_fn(config))
                            except Exception as exc:  # noqa: BLE001 - a configuration the compiler refuses
                                print(f"  {name} {config}: {type(exc).__name__}", flush=True)
                                continue
                            if ms < best[0]:
                                best = (ms, config)
            row["best_ms"], row["best_config"] = best
        for key in totals:
            totals[key] += row.get(key, row["kernel_ms"]) * per_step * layers
        rows.append(row)
        print(f"{shape} {name:18s} cuBLAS {row['cublas_ms'] * 1e3:7.1f} µs ({row['cublas_TBps']:.2f} TB/s)  kernel "
              f"{row['kernel_ms'] * 1e3:7.1f} µs ({row['kernel_TBps']:.2f} TB/s)  best {best[0] * 1e3:7.1f} µs "
              f"{best[1]}  diff {err:.1e}", flush=True)
    print(f"{shape} per step: cuBLAS {totals['cublas_ms']:.2f} ms, kernels {totals['kernel_ms']:.2f} ms, "
          f"best configurations {totals['best_ms']:.2f} ms", flush=True)
    return {"shape": shape, "rank": rank, "layers": layers, "ops": rows,
            "per_step_ms": totals}


def wide_forward(shape: str, rank: int) -> dict:
    """A group's forward as it is (the adapters' terms written out, each large product added to its
    term in cuBLAS's epilogue) against one product per member over the input widened by the adapters'
    rank-r columns, [x | x A^T] [W | B]^T (zeros where another member's columns are): ms per pass,
    and the widened products alone against the plain ones; the input gradient's product with the
    weight read from the widened buffer (strided rows) against a contiguous weight."""
    import torch

    from qlora_studio.engine import lowrank_kernel as K

    s = SHAPES[shape]
    hidden, inter = s["hidden_size"], s["intermediate_size"]
    kv = s["num_key_value_heads"] * (hidden // s["num_attention_heads"])
    tokens = s["batch"] * s["seq"]
    dev, dt = torch.device("cuda"), torch.bfloat16
    out = {}
    for name, width, outs in [("qkv", hidden, [hidden, kv, kv]), ("o", hidden, [hidden]),
                              ("gate_up", hidden, [inter, inter]), ("down", inter, [hidden])]:
        r_all = rank * len(outs)
        x = torch.randn(tokens, width, device=dev, dtype=dt)
        a_all = torch.randn(r_all, width, device=dev, dtype=dt) * 0.02
        ws = [torch.randn(n, width, device=dev, dtype=dt) * 0.02 for n in outs]
        bs = [torch.randn(n, rank, device=dev, dtype=dt) * 0.02 for n in outs]
        wide_ws = []
        for i, (w, b) in enumerate(zip(ws, bs)):
            ww = torch.zeros(w.shape[0], width + r_all, device=dev, dtype=dt)
            ww[:, :width] = w
            ww[:, width + i * rank:width + (i + 1) * rank] = b
            wide_ws.append(ww)
        wide = torch.empty(tokens, width + r_all, device=dev, dtype=dt)
        gs = [torch.randn(tokens, n, device=dev, dtype=dt) for n in outs]

        def now():
            xa = K.times_small(x, a_all.t())
            for i, (w, b) in enumerate(zip(ws, bs)):
                o = xa[:, i * rank:(i + 1) * rank] @ b.t()
                o.addmm_(x, w.t())

        def widened():
            wide[:, :width].copy_(x)
            wide[:, width:].copy_(K.times_small(x, a_all.t()))
            for ww in wide_ws:
                wide @ ww.t()

        row = {"now_ms": graphed_ms(now), "wide_ms": graphed_ms(widened),
               "copy_ms": graphed_ms(lambda: wide[:, :width].copy_(x)),
               "plain_products_ms": graphed_ms(lambda: [x @ w.t() for w in ws]),
               "wide_products_ms": graphed_ms(lambda: [wide @ ww.t() for ww in wide_ws]),
               "dgrad_contiguous_ms": graphed_ms(lambda: [g @ w for g, w in zip(gs, ws)]),
               "dgrad_strided_ms": graphed_ms(lambda: [g @ ww[:, :width] for g, ww in zip(gs, wide_ws)])}
        out[name] = row
        print(f"{shape} {name:8s} " + "  ".join(f"{k} {v * 1e3:.1f} µs" for k, v in row.items()), flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["1b", "8b", "both"], default="both")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--sweep", action="store_true", help="time every configuration of the grid too")
    ap.add_argument("--wide", action="store_true", help="time the forward over an input widened by the adapters' columns too")
    args = ap.parse_args()
    for shape in (["8b", "1b"] if args.shape == "both" else [args.shape]):
        result = run(shape, args.rank, args.sweep)
        if args.wide:
            result["wide_forward"] = wide_forward(shape, args.rank)
        write_result(f"lowrank_products-{shape}", result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
