"""Where a training step's time goes: torch.profiler over a few engine steps on a GPU.

    python bench/profile_step.py --shape 1b [--steps 3] [--phases 20] [--set offload_checkpoints=false ...]

Prints the GPU's busy fraction over the profiled steps (kernel time / wall time) and the top
operators by GPU time and by CPU time; with ``--phases N``, first N steps without the profiler, each
timed per phase (forward and backward, then clipping and the optimizer step) with the GPU drained
between them, so a slow phase or a drift over the steps shows. ``--set KEY=VALUE`` changes a
``train`` setting (e.g. turns one of the GPU paths off). Writes
bench/results/profile-<shape>-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import perf_harness as H
from _results import write_result


KERNEL_CLASSES = [  # (class, substrings of a kernel's name), first match wins
    ("dequantize", ("kDequantize", "dequant")),
    ("attention", ("flash", "fmha", "attention", "cudnn")),
    ("loss kernel", ("_rows", "cross_entropy")),
    ("liger", ("_rms_norm", "_swiglu", "_rope", "silu_mul", "liger")),
    ("optimizer", ("kOptimizer", "adam", "Optimizer")),
    ("matrix products", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "splitK", "sm90", "sm80")),
    ("copies", ("Memcpy", "Memset", "copy")),
]


def kernel_classes(events) -> dict[str, float]:
    """GPU kernel milliseconds grouped by KERNEL_CLASSES (the rest: "other")."""
    from torch.autograd import DeviceType

    out: dict[str, float] = {}
    for e in events:
        if e.device_type != DeviceType.CUDA:
            continue
        name = e.name
        cls = next((c for c, keys in KERNEL_CLASSES if any(k.lower() in name.lower() for k in keys)), "other")
        out[cls] = out.get(cls, 0.0) + e.time_range.elapsed_us() / 1000
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=H.SHAPES, default="1b")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--models", default="bench-models")
    ap.add_argument("--gradient-checkpointing", type=int, default=1)
    ap.add_argument("--phases", type=int, default=0, help="steps timed per phase before profiling")
    ap.add_argument("--gc-off", action="store_true", help="Python's garbage collector off while timing phases")
    ap.add_argument("--trace", help="also write the profiled steps' Chrome trace here (gzipped)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a train setting, e.g. fused_kernels=false")
    args = ap.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from qlora_studio.engine.trainer import accumulate, train_step, update

    e = H.warmed_up_engine(args.models, args.shape, args.set, args.steps,
                           gradient_checkpointing=bool(args.gradient_checkpointing))
    model, params, opt, sched, cfg, device, info, overrides = (e.model, e.params, e.opt, e.sched, e.cfg, e.device,
                                                               e.info, e.overrides)
    phases = []
    if args.gc_off:
        import gc

        gc.collect()
        gc.disable()
    for b in H.batches(args.shape, args.phases, seed=99):
        t0 = time.perf_counter()
        loss = accumulate(model, [b], cfg, device)
        t_host = time.perf_counter()  # the host is done queueing forward and backward
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        update(params, opt, sched, cfg)
        t_host_update = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        phases.append({"forward_backward_s": t1 - t0, "forward_backward_host_s": t_host - t0,
                       "update_s": t2 - t1, "update_host_s": t_host_update - t1, "loss": float(loss)})
    if phases:
        print("step  forward+backward ms (host)  update ms (host)")
        for i, ph in enumerate(phases):
            print(f"{i:4d}  {ph['forward_backward_s'] * 1000:9.1f} ({ph['forward_backward_host_s'] * 1000:6.1f})"
                  f"  {ph['update_s'] * 1000:9.1f} ({ph['update_host_s'] * 1000:6.1f})")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for b in e.batches:
            train_step(model, [b], params, opt, sched, cfg, device)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    if args.trace:
        import gzip
        import shutil
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".json") as raw:
            prof.export_chrome_trace(raw.name)
            with open(raw.name, "rb") as src, gzip.open(args.trace, "wb") as dst:
                shutil.copyfileobj(src, dst)
    events = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in events)
    by_gpu = sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:25]
    by_cpu = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    print(f"{args.steps} steps in {wall * 1000:.0f} ms wall; GPU kernels {gpu_us / 1000:.0f} ms "
          f"({100 * gpu_us / 1e6 / wall:.0f}% busy, profiler overhead included)")
    kernels = kernel_classes(prof.events())
    print("GPU kernel time by class (ms over the profiled steps): "
          + ", ".join(f"{k} {v:.1f}" for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])))
    rows = []
    print(f"{'operator':60s} {'GPU ms':>9s} {'CPU ms':>9s} {'calls':>7s}")
    for e in by_gpu:
        rows.append({"op": e.key, "gpu_ms": e.self_device_time_total / 1000, "cpu_ms": e.self_cpu_time_total / 1000, "calls": e.count})
        print(f"{e.key[:60]:60s} {e.self_device_time_total / 1000:9.1f} {e.self_cpu_time_total / 1000:9.1f} {e.count:7d}")
    print("-- by CPU time")
    for e in by_cpu:
        print(f"{e.key[:60]:60s} {e.self_device_time_total / 1000:9.1f} {e.self_cpu_time_total / 1000:9.1f} {e.count:7d}")
    variant = "".join(f"-{k}-{str(v).lower()}" for k, v in overrides.items()) + ("-gc-off" if args.gc_off else "")
    write_result(f"profile-{args.shape}{variant}", {"wall_ms": wall * 1000, "gpu_ms": gpu_us / 1000, "steps": args.steps,
                                            "top_gpu": rows, "kernel_classes_ms": kernels, "phases": phases, "settings": overrides, "gc_off": args.gc_off,
                                            "fast_paths": info.fast_paths})
    return 0


if __name__ == "__main__":
    sys.exit(main())
