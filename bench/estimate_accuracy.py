"""How close the VRAM estimate comes to what training really takes on the GPU.

Random-weight models with the shapes of Llama-3.2-1B and Llama-3.1-8B are built once (with
bench/perf_harness.py's builder, so the benchmarks share them). For each shape and gradient-
checkpointing setting one worker process loads the model with the engine (``engine.model.load_model``)
and runs every grid point through the engine's own training step (``engine.trainer.train_step``):
a few optimizer steps on random full-length sequences with every token learned. Measured:

* ``torch.cuda.max_memory_reserved()`` over the point's steps (and the allocated peak),
* the CUDA context as NVML sees it: the process's GPU memory minus PyTorch's reserved memory,
  taken after a warm-up step has loaded the training kernels and before the paged optimizer
  exists (NVML may count its unified memory too),

and the estimate's peak is compared with their sum. Points whose estimate exceeds the GPU are
skipped; a point that runs out of memory is recorded as such. The run settings are the
configuration defaults (LoRA r=64 on every projection, dropout 0.05, paged AdamW 32-bit, the
chunked loss, the fused LoRA layers) unless changed below.

    python bench/estimate_accuracy.py                      # the whole grid, about 8 minutes on an H200
    python bench/estimate_accuracy.py --dry-run            # the estimates only: no GPU, no torch
    python bench/estimate_accuracy.py --shapes 1b --seqs 512,1024 --batches 1,2 --checkpointing on --loss standard

Writes bench/results/estimate-<date>-<commit>.json and .md (or into --results DIR; a run of one
shape writes estimate-1b-... or estimate-8b-...).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from perf_harness import SHAPES, build_model  # the shared random-weight models

from qlora_studio import config as C
from qlora_studio.engine import estimate as E
from qlora_studio.engine.modelinfo import read_model_config

GiB = 1024**3
GOAL = 0.10  # every point within +-10 %
HEADROOM = 4 * GiB  # points whose estimate leaves less than this of the GPU are skipped


# ----------------------------------------------------------------------------------------------
# The grid, its configurations and their estimates (torch-free)


def model_config(shape: str) -> dict:
    """The config.json that perf_harness.build_model writes for ``shape`` (for --dry-run)."""
    spec = {k: v for k, v in SHAPES[shape].items() if k not in ("batch", "seq")}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 8192,
            "rope_theta": 500000.0, "head_dim": spec["hidden_size"] // spec["num_attention_heads"], **spec}


def point_config(model_dir: Path, checkpointing: bool, seq: int, batch: int, args) -> C.RunConfig:
    """The run configuration of one grid point: the defaults, with the point's shape of batch."""
    train = {"micro_batch_size": batch, "grad_accum_steps": args.accum, "max_steps": args.steps,
             "gradient_checkpointing": checkpointing, "device": "cuda"}
    if args.loss:
        train["loss_impl"] = args.loss
    lora = {} if args.lora_r is None else {"r": args.lora_r}
    return C.replace(C.RunConfig(), model={"name_or_path": str(model_dir)}, data={"path": "random", "max_seq_len": seq},
                     train=train, lora=lora)


def grid(args, limit: int | None) -> list[dict]:
    """Every point with its estimate; those that would not fit the GPU are marked skipped."""
    points = []
    for shape in args.shapes:
        model_dir = Path(args.models) / f"llama-{shape}"
        config = read_model_config(str(model_dir)) if (model_dir / "config.json").exists() else model_config(shape)
        for checkpointing in args.checkpointing:
            for seq in args.seqs:
                for batch in args.batches:
                    cfg = point_config(model_dir, checkpointing, seq, batch, args)
                    est = E.estimate(config, cfg, suggest=False)
                    point = {"shape": shape, "checkpointing": checkpointing, "seq": seq, "batch": batch,
                             "loss_impl": cfg.train.loss_impl, "estimate": _estimate_record(est)}
                    if limit is not None and est.peak + est.paged > limit - HEADROOM:
                        point["skipped"] = f"the estimate, {est.peak / GiB:.1f} GiB, does not fit the GPU"
                    points.append(point)
    return points


def _estimate_record(est: E.Estimate) -> dict:
    return {"peak": est.peak, "allocated": est.allocated, "reserved": est.reserved, "paged": est.paged,
            "phase": est.phase, "items": {i.key: i.bytes for i in est.items}}


# ----------------------------------------------------------------------------------------------
# The worker: one model loaded by the engine, the grid points of one checkpointing setting


def measure(model, cfg: C.RunConfig, params, optimizer, scheduler, device, vocab: int, steps: int) -> dict:
    """Peak memory of ``steps`` optimizer steps of the engine's training step at one grid point."""
    import torch

    from qlora_studio.engine.trainer import train_step

    cuda = device.type == "cuda"
    generator = torch.Generator().manual_seed(0)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        batches = []
        for _ in range(cfg.train.grad_accum_steps):
            ids = torch.randint(10, vocab - 1, (cfg.train.micro_batch_size, cfg.data.max_seq_len), generator=generator)
            batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
        train_step(model, batches, params, optimizer, scheduler, cfg, device)
    if not cuda:  # a smoke run of the benchmark itself
        return {"allocated": 0, "reserved": 0}
    torch.cuda.synchronize()
    return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}


class ProcessMemory:
    """This process's GPU memory from NVML: its own entry, or the device's use beyond a baseline
    taken before CUDA started (when the process table does not show this process's id)."""

    def __init__(self):
        import pynvml

        pynvml.nvmlInit()
        self.nvml = pynvml
        self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        self.baseline = pynvml.nvmlDeviceGetMemoryInfo(self.handle).used

    @classmethod
    def start(cls) -> ProcessMemory | None:
        try:
            return cls()
        except Exception:  # noqa: BLE001 - NVML raises its own error types; without it, a CPU smoke run
            return None

    def used(self) -> int:
        for proc in self.nvml.nvmlDeviceGetComputeRunningProcesses(self.handle):
            if proc.pid == os.getpid() and proc.usedGpuMemory:
                return int(proc.usedGpuMemory)
        return int(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used - self.baseline)


def worker(args) -> int:
    gpu = ProcessMemory.start()  # before CUDA starts
    import gc

    import torch

    from qlora_studio.engine.model import load_model
    from qlora_studio.engine.trainer import accumulate, build_optimizer, build_scheduler

    model_dir = Path(args.model)
    checkpointing = args.checkpointing == ["on"]
    points = [tuple(int(x) for x in p.split("x")) for p in args.points.split(",")]
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    first = point_config(model_dir, checkpointing, *points[0], args)
    model, _, _ = load_model(first, device, torch.bfloat16)
    vocab = model.get_base_model().config.vocab_size
    model.train()
    # one micro-step loads the training kernels; then the context, before the paged optimizer exists
    ids = torch.randint(10, vocab - 1, (1, min(256, points[0][0])))
    accumulate(model, [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}], first, device)
    model.zero_grad(set_to_none=True)
    gc.collect()
    context = 0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        context = gpu.used() - torch.cuda.memory_reserved() if gpu else 0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(first, params)
    scheduler = build_scheduler(first, optimizer, args.steps * len(points))
    for seq, batch in points:
        cfg = point_config(model_dir, checkpointing, seq, batch, args)
        record = {"seq": seq, "batch": batch, "context": context}
        t0 = time.perf_counter()
        try:
            record.update(measure(model, cfg, params, optimizer, scheduler, device, vocab, args.steps))
            if cuda and gpu:
                record["context_after"] = gpu.used() - torch.cuda.memory_reserved()
        except torch.cuda.OutOfMemoryError as exc:
            record["oom"] = str(exc).splitlines()[0][:200]
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        record["seconds"] = round(time.perf_counter() - t0, 1)
        print("POINT " + json.dumps(record), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------
# The parent: build, run the workers, compare, report


def run_group(args, shape: str, checkpointing: bool, points: list[dict]) -> None:
    """One worker process for the points of one shape and checkpointing setting (ascending estimates)."""
    model_dir = Path(args.models) / f"llama-{shape}"
    todo = sorted((p for p in points if "skipped" not in p), key=lambda p: p["estimate"]["peak"])
    if not todo:
        return
    command = [sys.executable, __file__, "--worker", "--model", str(model_dir), "--steps", str(args.steps),
               "--accum", str(args.accum), "--checkpointing", "on" if checkpointing else "off",
               "--points", ",".join(f"{p['seq']}x{p['batch']}" for p in todo)]
    if args.loss:
        command += ["--loss", args.loss]
    if args.lora_r is not None:
        command += ["--lora-r", str(args.lora_r)]
    by_key = {(p["seq"], p["batch"]): p for p in todo}
    t0 = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    for line in proc.stdout:
        if line.startswith("POINT "):
            record = json.loads(line[6:])
            point = by_key[(record.pop("seq"), record.pop("batch"))]
            point["measured"] = record
            print("  " + row_text(point), flush=True)
    stderr = proc.stderr.read()
    proc.wait()
    for point in todo:
        if "measured" not in point:
            point["error"] = " | ".join(stderr.strip().splitlines()[-6:])[-600:] or f"worker exit {proc.returncode}"
    print(f"  ({shape}, checkpointing {'on' if checkpointing else 'off'}: {time.perf_counter() - t0:.0f} s)", flush=True)


def compare(point: dict) -> None:
    m = point.get("measured")
    if not m or "reserved" not in m:
        return
    m["peak"] = m["reserved"] + m["context"]
    est = point["estimate"]
    point["error"] = (est["peak"] - m["peak"]) / m["peak"]
    point["allocated_error"] = (est["allocated"] - m["allocated"]) / m["allocated"]
    point["reserved_error"] = (est["reserved"] - m["reserved"]) / m["reserved"]


def point_head(point: dict) -> str:
    return f"{point['shape']:>3} ckpt {'on ' if point['checkpointing'] else 'off'} {point['seq']:>5} x {point['batch']}"


def row_text(point: dict) -> str:
    compare(point)
    head = point_head(point)
    est = point["estimate"]["peak"] / GiB
    if "skipped" in point:
        return f"{head}: estimate {est:6.2f} GiB, skipped ({point['skipped']})"
    m = point.get("measured", {})
    if "oom" in m:
        return f"{head}: estimate {est:6.2f} GiB, OUT OF MEMORY"
    if "peak" not in m:
        return f"{head}: estimate {est:6.2f} GiB, not measured"
    return (f"{head}: estimate {est:6.2f} GiB, measured {m['peak'] / GiB:6.2f} GiB ({point['error']:+.1%}); "
            f"allocated {point['allocated_error']:+.1%}, reserved {point['reserved_error']:+.1%}")


def markdown(points: list[dict], args) -> str:
    lines = [
        "### VRAM estimate against measured peaks",
        "",
        (f"Engine defaults (LoRA r={args.lora_r or C.LoraConfig().r} on every projection, dropout {C.LoraConfig().dropout}, "
        f"paged AdamW 32-bit, {points[0]['loss_impl'] if points else ''} loss), random full-length sequences, "
        f"{args.steps} optimizer steps per point. Measured peak = torch.cuda.max_memory_reserved() + the CUDA "
        "context as NVML sees it. Error = (estimate - measured) / measured."),
        "",
        "| shape | checkpointing | tokens | micro-batch | estimate GiB | measured GiB | error | allocated: est. / meas. GiB | phase |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for p in points:
        est = p["estimate"]
        m = p.get("measured", {})
        cells = [p["shape"], "on" if p["checkpointing"] else "off", str(p["seq"]), str(p["batch"]), f"{est['peak'] / GiB:.2f}"]
        if "skipped" in p:
            cells += ["skipped (does not fit)", "", "", est["phase"]]
        elif "oom" in m:
            cells += ["out of memory", "", "", est["phase"]]
        elif "peak" in m:
            cells += [f"{m['peak'] / GiB:.2f}", f"{p['error']:+.1%}",
                      f"{est['allocated'] / GiB:.2f} / {m['allocated'] / GiB:.2f}", est["phase"]]
        else:
            cells += ["not measured", "", "", est["phase"]]
        lines.append("| " + " | ".join(cells) + " |")
    measured = [p for p in points if isinstance(p.get("error"), float)]
    if measured:
        worst = max(measured, key=lambda p: abs(p["error"]))
        within = sum(abs(p["error"]) <= GOAL for p in measured)
        contexts = sorted(p["measured"]["context"] for p in measured)
        lines += [
            "",
            (f"{within} of {len(measured)} measured points within ±{GOAL:.0%}; the largest error is {worst['error']:+.1%} "
            f"({worst['shape']}, {worst['seq']} x {worst['batch']}, checkpointing {'on' if worst['checkpointing'] else 'off'})."),
            (f"CUDA context measured: {contexts[0] / 2**20:.0f} to {contexts[-1] / 2**20:.0f} MiB "
            f"(the estimate assumes {E.CUDA_CONTEXT_BYTES / 2**20:.0f} MiB)."),
        ]
    return "\n".join(lines) + "\n"


def _csv(kind):
    return lambda text: [kind(x) for x in text.split(",") if x]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", type=_csv(str), default=["1b", "8b"], help="comma-separated: 1b, 8b")
    ap.add_argument("--seqs", type=_csv(int), default=[512, 1024, 2048, 4096])
    ap.add_argument("--batches", type=_csv(int), default=[1, 2, 4, 8])
    ap.add_argument("--checkpointing", type=_csv(str), default=["on", "off"], help="on, off or both")
    ap.add_argument("--loss", choices=C.LOSS_IMPLS, help="train.loss_impl (default: the configuration's default)")
    ap.add_argument("--lora-r", type=int, help="LoRA rank (default: the configuration's default)")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per point")
    ap.add_argument("--gpu-memory", type=float, metavar="GiB", help="the GPU's size for skipping (default: NVML)")
    ap.add_argument("--models", default=os.environ.get("QS_BENCH_MODELS", "bench-models"), help="where the random models are kept")
    ap.add_argument("--results", help="folder for the result files (default bench/results)")
    ap.add_argument("--dry-run", action="store_true", help="print the grid of estimates only (no GPU needed)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--points", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke run of the worker
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    unknown = [s for s in args.shapes if s not in ("1b", "8b")]
    if unknown or not set(args.checkpointing) <= {"on", "off"}:
        ap.error("shapes are 1b and 8b; checkpointing is on and/or off")
    args.checkpointing = [c == "on" for c in args.checkpointing]

    gpu = E.gpu_memory(0)
    limit = int(args.gpu_memory * GiB) if args.gpu_memory else (gpu[1] if gpu else None)
    if args.dry_run:
        for point in grid(args, limit):
            est = point["estimate"]
            print(f"{point_head(point)}: estimate {est['peak'] / GiB:6.2f} GiB at the {est['phase']}"
                  + (f"; skipped: {point['skipped']}" if "skipped" in point else ""))
        return 0
    if gpu is None:
        print("no NVIDIA GPU (NVML): use --dry-run to see the estimates", file=sys.stderr)
        return 2
    print(f"GPU {gpu[0]}: {gpu[1] / GiB:.1f} GiB", flush=True)
    for shape in args.shapes:
        folder = Path(args.models) / f"llama-{shape}"
        folder.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        build_model(shape, folder)
        print(f"model {folder.name} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    points = grid(args, limit)
    for shape in args.shapes:
        for checkpointing in args.checkpointing:
            group = [p for p in points if p["shape"] == shape and p["checkpointing"] == checkpointing]
            run_group(args, shape, checkpointing, group)
            for point in group:
                if "skipped" in point:
                    print("  " + row_text(point), flush=True)
    for point in points:
        compare(point)
    md = markdown(points, args)
    print(md)
    import _results

    if args.results:
        _results.RESULTS = Path(args.results)
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "model", "points")}
    name = "estimate" if sorted(args.shapes) == ["1b", "8b"] else "estimate-" + "-".join(args.shapes)
    _results.write_result(name, {"settings": settings, "gpu": gpu[0], "points": points}, md)
    measured = [p for p in points if isinstance(p.get("error"), float)]
    return 0 if measured and all(abs(p["error"]) <= GOAL for p in measured) else 1


if __name__ == "__main__":
    sys.exit(main())
