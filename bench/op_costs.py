"""Where an 8B step's GPU time can go, operation by operation, on the GPU at hand.

    python bench/op_costs.py [--shape 8b]

Times, with CUDA events and random data, each kind of work a decoder layer does in one training
step of the harness's shape (gradient checkpointing on, so every layer runs forward twice):

  dequant     NF4 dequantization of each projection's weight: bitsandbytes' and the engine's
              kernel (engine/nf4_kernel.py, which the per-step sum counts)
  gemm        the projections' products with the dequantized weight: forward (x W^T) and input
              gradient (g W); a frozen weight has no weight gradient
  lora        the adapter's extra work in the engine's fused layer (engine/lora_kernels.py), timed
              eagerly: the launch costs of its small kernels are in, which CUDA graphs take away
  attention   PyTorch's SDPA, forward and backward, with each backend it offers for the shape
  fused       liger-kernel's RMSNorm and SwiGLU, when installed
  copy        one layer input to pinned CPU memory and back (the offloaded checkpoints)

and adds them up per step (32 layers: forward, recomputation and backward, counting the
products and dequantizations the engine skips: forward_products, dequantizations) to show which
parts are worth making faster. Writes bench/results/op_costs-<shape>-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _results import write_result
from perf_harness import SHAPES


def timed(fn, repeat: int = 10) -> float:
    """Median milliseconds of ``fn()`` on the GPU."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


#: a step's large products forward per projection: the forward pass and the recomputation, but a
#: split block's last projection skips its product in recomputation (lora_kernels.recompute)
LAST_PROJECTIONS = ("o_proj", "down_proj")


def forward_products(name: str) -> int:
    return 1 if name in LAST_PROJECTIONS else 2


def dequantizations(name: str) -> int:
    """A step's NF4 dequantizations of a projection's weight: forward, recomputation and backward,
    but the attention block's and down_proj's are kept from recomputation to backward
    (lora_kernels.keep_weights)."""
    return 3 if name in ("gate_proj", "up_proj") else 2


def graphed(fn, reps: int = 20) -> float:
    """Median milliseconds of one ``fn()`` replayed from a CUDA graph of ``reps`` calls: no launch gaps,
    as the engine's layers run."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(7):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def layer_dims(shape: str) -> tuple[int, int, int, int, int]:
    """(hidden size, MLP width, layers, key/value width, tokens of a micro-batch) of a harness shape."""
    s = SHAPES[shape]
    hidden = s["hidden_size"]
    kv = s["num_key_value_heads"] * (hidden // s["num_attention_heads"])
    return hidden, s["intermediate_size"], s["num_hidden_layers"], kv, s["batch"] * s["seq"]


def shape_arguments(description: str) -> argparse.Namespace:
    """The options of the per-operation scripts (this one, gemm_fusion.py, lora_epilogue.py): the shape and the LoRA rank."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--shape", choices=["1b", "8b"], default="8b")
    ap.add_argument("--rank", type=int, default=16)
    return ap.parse_args()


def main() -> int:
    args = shape_arguments(__doc__.splitlines()[0])

    import bitsandbytes.functional as bnbF
    import torch
    import torch.nn.functional as F

    from qlora_studio.engine.lora_kernels import LoRA4bitFunction
    from qlora_studio.engine.nf4_kernel import dequantize_nf4

    s = SHAPES[args.shape]
    hidden, inter, layers = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"]
    heads, kv_heads = s["num_attention_heads"], s["num_key_value_heads"]
    head_dim = hidden // heads
    batch, seq = s["batch"], s["seq"]
    tokens = batch * seq
    dev, dt = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    projections = {"q_proj": (hidden, hidden), "k_proj": (kv_heads * head_dim, hidden),
                   "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, hidden),
                   "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    rows: dict[str, dict] = {}
    per_layer = {"dequant": 0.0, "gemm": 0.0, "lora": 0.0}  # ms per layer and step
    for name, (out_f, in_f) in projections.items():
        w = torch.randn(out_f, in_f, device=dev, dtype=dt) * 0.02
        packed, state = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        weight = torch.nn.Parameter(packed, requires_grad=False)
        weight.quant_state = state
        x = torch.randn(tokens, in_f, device=dev, dtype=dt, requires_grad=True)
        g = torch.randn(tokens, out_f, device=dev, dtype=dt)
        a = (torch.randn(args.rank, in_f, device=dev) * 0.01).requires_grad_()
        b = (torch.randn(out_f, args.rank, device=dev) * 0.01).requires_grad_()
        wd = bnbF.dequantize_4bit(packed, state)
        dequant = timed(lambda: bnbF.dequantize_4bit(packed, state))
        kernel = timed(lambda: dequantize_nf4(packed, state))
        fwd = timed(lambda: x @ wd.t())
        dgrad = timed(lambda: g @ wd)

        def fused_forward():
            with torch.no_grad():
                LoRA4bitFunction.apply(x, x, weight, a, b, 1.0, None)

        def fused_step():
            y = LoRA4bitFunction.apply(x, x, weight, a, b, 1.0, None)
            y.backward(g)

        fused_fwd = timed(fused_forward)
        fused_all = timed(fused_step)
        fused_bwd = fused_all - fused_fwd
        lora_fwd = fused_fwd - kernel - fwd  # the fused layer dequantizes with nf4_kernel
        lora_bwd = fused_bwd - kernel - dgrad
        rows[name] = {"shape": [out_f, in_f], "dequant_ms": dequant, "nf4_kernel_ms": kernel,
                      "nf4_kernel_TBps": (packed.numel() + w.numel() * 2) / kernel / 1e9, "forward_gemm_ms": fwd, "input_grad_gemm_ms": dgrad,
                      "fused_forward_ms": fused_fwd, "fused_backward_ms": fused_bwd,
                      "lora_forward_extra_ms": lora_fwd, "lora_backward_extra_ms": lora_bwd,
                      "gemm_tflops": 2 * tokens * out_f * in_f / fwd / 1e9}
        # Per step: forward and recomputation, then backward.
        per_layer["dequant"] += dequantizations(name) * kernel
        per_layer["gemm"] += forward_products(name) * fwd + dgrad
        per_layer["lora"] += 2 * lora_fwd + lora_bwd
        del w, packed, weight, x, g, a, b, wd

    # The NF4 kernel's block size and warps, on the largest weight.
    from qlora_studio.engine import nf4_kernel

    sweep = {}
    out_f, in_f = projections["down_proj"]
    packed, state = bnbF.quantize_4bit(torch.randn(out_f, in_f, device=dev, dtype=dt), compress_statistics=True,
                                       quant_type="nf4")
    chosen = (nf4_kernel.BLOCK, nf4_kernel.WARPS)
    for block in (512, 1024, 2048, 4096, 8192):
        for warps in (2, 4, 8, 16):
            nf4_kernel.BLOCK, nf4_kernel.WARPS = block, warps
            ms = timed(lambda: dequantize_nf4(packed, state))
            sweep[f"{block}x{warps}"] = (packed.numel() + out_f * in_f * 2) / ms / 1e9
    nf4_kernel.BLOCK, nf4_kernel.WARPS = chosen
    print("NF4 kernel, TB/s by bytes per program x warps: "
          + ", ".join(f"{k} {v:.2f}" for k, v in sorted(sweep.items(), key=lambda kv: -kv[1])))
    del packed, state

    attention: dict[str, dict] = {}
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(batch, heads, seq, head_dim, device=dev, dtype=dt, requires_grad=True)
    k = torch.randn(batch, kv_heads, seq, head_dim, device=dev, dtype=dt, requires_grad=True)
    v = torch.randn(batch, kv_heads, seq, head_dim, device=dev, dtype=dt, requires_grad=True)
    go = torch.randn(batch, heads, seq, head_dim, device=dev, dtype=dt)
    for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        for gqa in (True, False):
            key = f"{backend.lower()}{'-gqa' if gqa else '-repeat'}"
            try:
                def forward():
                    with sdpa_kernel(getattr(SDPBackend, backend)):
                        if gqa:
                            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                        rep = heads // kv_heads
                        return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                                              is_causal=True)

                def step():
                    forward().backward(go)

                with torch.no_grad():
                    ref = forward()
                f_ms = timed(lambda: forward().detach())
                all_ms = timed(step)
                attention[key] = {"forward_ms": f_ms, "backward_ms": all_ms - f_ms, "step_ms": 2 * f_ms + (all_ms - f_ms)}
                del ref
            except Exception as exc:  # a backend that does not take the shape says why
                attention[key] = {"error": str(exc).splitlines()[0][:160]}
    for key, r in attention.items():
        print(f"attention {key:28s} " + (r["error"] if "error" in r else
                                        f"forward {r['forward_ms']:.2f} ms, backward {r['backward_ms']:.2f} ms"))

    fused: dict[str, float] = {}
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers import LigerRMSNorm

        norm = LigerRMSNorm(hidden).to(dev, dt)
        h = torch.randn(tokens, hidden, device=dev, dtype=dt, requires_grad=True)
        gh = torch.randn(tokens, hidden, device=dev, dtype=dt)
        fused["rmsnorm_forward_ms"] = timed(lambda: norm(h).detach())
        fused["rmsnorm_backward_ms"] = timed(lambda: norm(h).backward(gh)) - fused["rmsnorm_forward_ms"]
        gate = torch.randn(tokens, inter, device=dev, dtype=dt, requires_grad=True)
        up = torch.randn(tokens, inter, device=dev, dtype=dt, requires_grad=True)
        gi = torch.randn(tokens, inter, device=dev, dtype=dt)
        fused["swiglu_forward_ms"] = timed(lambda: LigerSiLUMulFunction.apply(gate, up).detach())
        fused["swiglu_backward_ms"] = timed(lambda: LigerSiLUMulFunction.apply(gate, up).backward(gi)) - fused["swiglu_forward_ms"]
        per_layer["fused"] = (2 * (2 * fused["rmsnorm_forward_ms"] + fused["swiglu_forward_ms"])
                              + 2 * fused["rmsnorm_backward_ms"] + fused["swiglu_backward_ms"])
    except ImportError as exc:
        fused["error"] = str(exc)

    layer_input = torch.randn(tokens, hidden, device=dev, dtype=dt)
    pinned = torch.empty(layer_input.shape, dtype=dt, pin_memory=True)
    copy = {"bytes": layer_input.numel() * 2,
            "to_cpu_ms": timed(lambda: pinned.copy_(layer_input, non_blocking=True)),
            "to_gpu_ms": timed(lambda: layer_input.copy_(pinned, non_blocking=True))}
    copy["to_cpu_GBps"] = copy["bytes"] / copy["to_cpu_ms"] / 1e6
    copy["to_gpu_GBps"] = copy["bytes"] / copy["to_gpu_ms"] / 1e6
    per_layer["copy"] = copy["to_cpu_ms"] + copy["to_gpu_ms"]

    flash = attention.get("flash_attention-gqa", {})
    if "step_ms" in flash:
        per_layer["attention (flash)"] = flash["step_ms"]
    per_step = {k: v * layers for k, v in per_layer.items()}
    total = sum(per_step.values())
    print(f"\n{'projection':10s} {'bnb deq':>8s} {'kernel':>7s} {'fwd GEMM':>9s} {'TFLOP/s':>8s} {'dgrad':>7s} {'LoRA fwd+':>10s} {'LoRA bwd+':>10s}")
    for name, r in rows.items():
        print(f"{name:10s} {r['dequant_ms']:8.3f} {r['nf4_kernel_ms']:7.3f} {r['forward_gemm_ms']:9.3f} {r['gemm_tflops']:8.0f} {r['input_grad_gemm_ms']:7.3f}"
              f" {r['lora_forward_extra_ms']:10.3f} {r['lora_backward_extra_ms']:10.3f}")
    print(f"\nper step ({layers} layers, forward + recomputation + backward), ms:")
    for k, v in sorted(per_step.items(), key=lambda kv: -kv[1]):
        print(f"  {k:22s} {v:8.1f}  ({100 * v / total:4.1f}%)")
    print(f"  {'sum':22s} {total:8.1f}   (tokens per step {tokens}: {tokens / total * 1000:,.0f} tok/s if nothing else ran)")
    print(f"copy: {copy['to_cpu_GBps']:.1f} GB/s to CPU, {copy['to_gpu_GBps']:.1f} GB/s to GPU")
    write_result(f"op_costs-{args.shape}", {"shape": args.shape, "tokens": tokens, "rank": args.rank,
                                           "projections": rows, "nf4_kernel_sweep_TBps": sweep, "attention": attention, "fused": fused, "copy": copy,
                                           "per_step_ms": per_step, "sum_ms": total})
    return 0


if __name__ == "__main__":
    sys.exit(main())
