"""Where a training step's peak GPU memory comes from: what is alive at the peak, and who made it.

    python bench/memory_peak.py --shape 1b [--steps 2] [--set cuda_graphs=false ...]

Runs three warm-up steps of the engine (the CUDA graphs are recorded in them), then records the
caching allocator's history (``torch.cuda.memory._record_memory_history``) over ``--steps`` more,
replays it to find the moment the allocated bytes peak outside the CUDA graphs' pool, and lists the
allocations alive then, grouped by the innermost line of this project (and the innermost line
overall) that made them.
The CUDA graphs' pool, which replays use without allocating, is reported beside the peak: the
memory in use at once is their sum. Writes bench/results/memory_peak-<shape>-<date>-<commit>.json.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import perf_harness as H
from _results import write_result


def _where(frames: list[dict]) -> str:
    own = next((f for f in frames if "qlora_studio" in f["filename"]), None)
    inner = frames[0] if frames else None

    def fmt(f):
        return f"{Path(f['filename']).name}:{f['line']} {f['name']}" if f else "?"

    return fmt(own) if own is inner else f"{fmt(own)} <- {fmt(inner)}"


def peak_breakdown(trace: list[dict], start_bytes: int,
                   pool: list[tuple[int, int]] = ()) -> tuple[int, list[tuple[str, int]]]:
    """The peak of allocated bytes over ``trace`` (starting from ``start_bytes``) and what was alive
    then, leaving out allocations inside ``pool`` (address ranges of the CUDA graphs' pool, which
    is counted whole beside the peak: the chunked loss allocates its temporaries there)."""
    alive: dict[int, tuple[int, str]] = {}
    now = peak = start_bytes
    at_peak: dict[int, tuple[int, str]] = {}
    for event in trace:
        action = event["action"]
        if any(lo <= event.get("addr", -1) < hi for lo, hi in pool):
            continue
        if action == "alloc":
            alive[event["addr"]] = (event["size"], _where(event.get("frames", [])))
            now += event["size"]
            if now > peak:
                peak, at_peak = now, dict(alive)
        elif action == "free_completed":
            entry = alive.pop(event["addr"], None)
            now -= entry[0] if entry else event["size"]
    by_site: dict[str, int] = defaultdict(int)
    for size, site in at_peak.values():
        by_site[site] += size
    return peak, sorted(by_site.items(), key=lambda kv: -kv[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=H.SHAPES, default="1b")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--models", default="bench-models")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a train setting, e.g. cuda_graphs=false")
    args = ap.parse_args()

    import torch

    from qlora_studio.engine.trainer import train_step

    e = H.warmed_up_engine(args.models, args.shape, args.set, args.steps)
    model, params, opt, sched, cfg, device, info, overrides = (e.model, e.params, e.opt, e.sched, e.cfg, e.device,
                                                               e.info, e.overrides)
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
    for b in e.batches:
        train_step(model, [b], params, opt, sched, cfg, device)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    trace = snapshot["device_traces"][device.index or 0]
    graphs = getattr(model, "layer_graphs", None)
    segments = [seg for seg in snapshot["segments"]
                if graphs is not None and tuple(seg.get("segment_pool_id", (0, 0))) == tuple(graphs.pool)]
    peak, sites = peak_breakdown(trace, start, [(seg["address"], seg["address"] + seg["total_size"]) for seg in segments])
    pool = graphs.pool_bytes() if graphs is not None else 0
    print(f"allocated before the recorded steps {start / 2**20:,.0f} MiB; peak {peak / 2**20:,.0f} MiB "
          f"(allocator's own figure {torch.cuda.max_memory_allocated() / 2**20:,.0f} MiB); graphs' pool {pool / 2**20:,.0f} MiB")
    pool_segments = sorted((seg["total_size"] for seg in segments), reverse=True)
    if pool_segments:
        print("the pool's segments (MiB): " + ", ".join(f"{n / 2**20:.0f}" for n in pool_segments))
    print("alive at the peak, by where it was made (MiB):")
    for site, size in sites[:25]:
        print(f"{size / 2**20:10.1f}  {site}")
    variant = "".join(f"-{k}-{str(v).lower()}" for k, v in overrides.items())
    write_result(f"memory_peak-{args.shape}{variant}", {
        "fast_paths": info.fast_paths, "settings": overrides, "start_bytes": start, "peak_bytes": peak,
        "allocator_peak_bytes": torch.cuda.max_memory_allocated(), "graph_pool_bytes": pool,
        "graph_pool_segments": pool_segments,
        "alive_at_peak": [{"site": s, "bytes": n} for s, n in sites[:40]]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
