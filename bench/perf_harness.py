"""Speed and memory of QLoRA training: this engine against the seed's stack and Unsloth, on one GPU.

Builds random-weight models with real shapes once (bf16 safetensors on local disk), then runs
each contender in its own process on the same data (random token ids, every token learned):

  seed         transformers + PEFT (prepare_model_for_kbit_training) + bitsandbytes: the usual recipe
  engine       this project's engine with exactly the shared settings
  unsloth      Unsloth, when it is importable (a benchmark peer, never a dependency)
  engine-auto  this engine with the settings it picks for the GPU (see ``auto_settings``)
  engine-...   the engine with one of its changes turned off, or the paging counters on: what each
               gives on its own (see ENGINE_VARIANTS)

Shared settings: LoRA r=16, alpha=16, dropout 0 on all seven projections, gradient checkpointing,
PagedAdamW32bit, bf16 compute, SDPA attention; 3 warm-up steps, then 8 timed ones. Every
contender records its losses, so the first steps of ``seed`` and ``engine`` can be compared.

    python bench/perf_harness.py --shape 1b --contenders seed,engine,unsloth,engine-auto
    python bench/perf_harness.py --shape tiny --contenders seed,engine   # a CPU smoke run

Writes bench/results/perf-<date>-<commit>.json and .md (or --results DIR).
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

SHAPES = {
    # Llama-3.2-1B: tied embeddings.
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, batch=4, seq=1024),
    # Llama-3.1-8B.
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False, batch=2, seq=2048),
    # A CPU smoke shape (every dimension a multiple of 64).
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1024, tie_word_embeddings=False, batch=2, seq=64),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WARMUP, TIMED = 3, 8


def build_model(shape: str, folder: Path) -> None:
    """A random-weight Llama of the shape, saved as bf16 safetensors with a small local tokenizer."""
    if (folder / "config.json").exists():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from qlora_studio.engine.demo import build_tokenizer

    spec = {k: v for k, v in SHAPES[shape].items() if k not in ("batch", "seq")}
    config = LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, **spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp, safe_serialization=True, max_shard_size="4GB")
    build_tokenizer(["a b c d e f g h"], vocab_size=300).save_pretrained(tmp)
    tmp.rename(folder)
    del model


def batches(shape: str, steps: int, seed: int = 1234):
    import torch

    s = SHAPES[shape]
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(10, s["vocab_size"] - 1, (s["batch"], s["seq"]), generator=g)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def run_config(model_dir: Path, shape: str | None = None, *, gradient_checkpointing=True, loss_impl="chunked"):
    """The shared settings; with ``shape``, its micro-batch and sequence length (what sizes the
    engine's CUDA graph buffers)."""
    from qlora_studio import config as C

    batch, seq = (SHAPES[shape]["batch"], SHAPES[shape]["seq"]) if shape else (1, 1024)
    return C.from_dict({
        "model": {"name_or_path": str(model_dir), "attn_implementation": "sdpa"},
        "quant": {"quant_type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"},
        "lora": {"r": 16, "alpha": 16.0, "dropout": 0.0, "target_modules": TARGETS},
        "data": {"max_seq_len": seq},
        "train": {"micro_batch_size": batch, "grad_accum_steps": 1, "max_steps": 1, "optimizer": "paged_adamw_32bit",
                  "learning_rate": 2e-4, "max_grad_norm": 0.3, "gradient_checkpointing": gradient_checkpointing,
                  "loss_impl": loss_impl, "device": "auto"},
    }, "benchmark")


def warmed_up_engine(models: str, shape: str, sets: list[str], steps: int, *, gradient_checkpointing: bool = True):
    """The engine on the shape's model with ``KEY=VALUE`` train settings changed (``sets``), after
    three warm-up steps (the CUDA graphs are recorded in them), for the diagnostic scripts: a
    namespace of model, cfg, params, opt, sched, info, device, overrides, and ``batches`` for
    ``steps`` more."""
    import types

    import torch

    from qlora_studio import config as C
    from qlora_studio.engine import device as devices
    from qlora_studio.engine.model import load_model
    from qlora_studio.engine.trainer import build_optimizer, build_scheduler, train_step

    model_dir = Path(models) / f"llama-{shape}"
    build_model(shape, model_dir)
    device = devices.resolve_device("auto")
    overrides = {}
    for item in sets:
        key, _, value = item.partition("=")
        overrides[key] = {"true": True, "false": False}.get(value.lower(), value)
    cfg = C.replace(run_config(model_dir, shape, gradient_checkpointing=gradient_checkpointing), train=overrides)
    model, _, info = load_model(cfg, device, torch.bfloat16)
    print(f"GPU paths: {info.fast_paths}; settings changed: {overrides}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(cfg, params)
    sched = build_scheduler(cfg, opt, 100)
    model.train()
    data = list(batches(shape, 3 + steps))
    for b in data[:3]:
        train_step(model, [b], params, opt, sched, cfg, device)
    torch.cuda.synchronize()
    return types.SimpleNamespace(model=model, cfg=cfg, params=params, opt=opt, sched=sched, info=info, device=device,
                                 overrides=overrides, batches=data[3:])


def auto_settings(shape: str, device) -> dict:
    """What the engine picks by itself: recomputation only if the estimate says it is needed."""
    import torch

    s = SHAPES[shape]
    settings = {"loss_impl": "chunked", "gradient_checkpointing": True}
    if device.type != "cuda":
        return settings
    try:
        from qlora_studio.engine.estimate import estimate
        from qlora_studio.engine.modelinfo import read_model_config

        cfg = run_config(Path(os.environ["QS_BENCH_MODEL"]), gradient_checkpointing=False, loss_impl="chunked")
        from qlora_studio import config as C

        cfg = C.replace(cfg, data={"max_seq_len": s["seq"]}, train={"micro_batch_size": s["batch"]})
        free, total = torch.cuda.mem_get_info()
        est = estimate(read_model_config(os.environ["QS_BENCH_MODEL"]), cfg, gpu_total=total, gpu_free=free)
        settings["gradient_checkpointing"] = est.verdict != "fits"
        settings["estimate_gb"] = round(est.peak / 1e9, 2)
    except Exception as exc:  # the estimate is advisory here; fall back to recomputation
        settings["estimate_error"] = str(exc)[:200]
    return settings


# ----------------------------------------------------------------------------------------------
# Contenders, each in its own process


def contender_seed(model_dir: Path, shape: str, steps: int) -> tuple[list[float], list[float], dict]:
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": 0 if dev == "cuda" else "cpu"}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW32bit(params, lr=2e-4)
    model.train()

    return _time_steps(_hf_step(model, params, opt, dev), shape, steps), {}


# Engine rows: the engine with its defaults ("engine"), and with one of its changes turned off each,
# so that what each change gives is measured on its own.
ENGINE_VARIANTS = {
    "engine": {},
    "engine-peft-lora": {"fused_lora": False},           # PEFT's LoRA layers instead of the fused function
    "engine-no-fused-kernels": {"fused_kernels": False},  # transformers' RMSNorm, SwiGLU and RoPE
    "engine-no-offload": {"offload_checkpoints": False},  # checkpointed layer inputs stay on the GPU
    "engine-embeddings-on-gpu": {"embeddings_on_cpu": False},
    "engine-bnb-optimizer": {"fused_optimizer": False},   # bitsandbytes' per-parameter paged AdamW kernels
    "engine-eager": {"cuda_graphs": False},               # the layers launched from Python, not replayed as CUDA graphs
    "engine-loss-chunk-1024": {"loss_chunk_tokens": 1024},  # the chunked loss's earlier fixed chunk
    "engine-loss-chunk-512": {"loss_chunk_tokens": 512},    # twice the chunk a 128k vocabulary gets
    "engine-ahead-6": {"layers_ahead": 6},                  # the host queues up to 6 checkpointed passes ahead, not 3
    "engine-loss-torch": {"loss_kernel": False},          # the chunked loss in PyTorch operations, not its Triton kernel
    "engine-mlp-whole": {"mlp_tile_tokens": None},        # a split layer's MLP block on all tokens at once
    "engine-bnb-dequant": {"nf4_kernel": False},          # bitsandbytes' NF4 dequantization, not the engine's kernel
    "engine-ungrouped": {"lora_groups": False},          # q/k/v and gate/up each through their own fused function
    "engine-dequant-again": {"keep_weights": False},      # backward dequantizes every weight again, none kept from recomputation
    "engine-block-copies": {"transient_outputs": False},  # a split layer's blocks copy their output out of the graph's buffer
    "engine-cpu-gather": {"gather_on_gpu": False},        # the CPU gathers the embedding rows and copies them to the GPU
    "engine-recompute-all": {"skip_products": False},     # a split block's recomputation computes its last projection's output too
    "engine-cupti": {"paging_counters": True},            # with the CUPTI paging counters collecting
    "engine-auto": {"auto": True},                        # the settings it picks by itself for the GPU
}
# The rows' overrides that are no setting: (engine module, its attribute, the attribute's value
# from the override's value), set in the contender's own process.
_ENGINE_SWITCHES = {
    "loss_kernel": ("losses", "_kernel", lambda off: lambda hidden: None),
    "nf4_kernel": ("lora_kernels", "_nf4_kernel", lambda off: lambda data, state: None),
    "keep_weights": ("offload", "keep_weights", lambda off: lambda modules: 0),
    "layers_ahead": ("offload", "LAYERS_AHEAD", lambda n: n),
    "gather_on_gpu": ("offload", "GATHER_ON_GPU", lambda on: on),
    "transient_outputs": ("offload", "TRANSIENT_BLOCK_OUTPUTS", lambda on: on),
    "skip_products": ("lora_kernels", "SKIP_UNUSED_PRODUCTS", lambda on: on),
    "lora_groups": ("lora_kernels", "GROUPS", lambda off: ()),
    "mlp_tile_tokens": ("offload", "mlp_tile", lambda tile: lambda model, max_tokens: tile),
}
_CONFIG_KEYS = ("fused_lora", "fused_kernels", "offload_checkpoints", "embeddings_on_cpu", "fused_optimizer", "cuda_graphs")


def contender_engine(model_dir: Path, shape: str, steps: int, variant: str = "engine"):
    import importlib

    import torch

    from qlora_studio import config as C
    from qlora_studio.engine import device as devices
    from qlora_studio.engine import trainer
    from qlora_studio.engine.model import load_model
    from qlora_studio.engine.trainer import build_optimizer, build_scheduler, train_step

    overrides = ENGINE_VARIANTS[variant]
    device = devices.resolve_device("auto")
    settings = auto_settings(shape, device) if overrides.get("auto") else {}
    cfg = run_config(model_dir, shape, **{k: v for k, v in settings.items() if k in ("gradient_checkpointing", "loss_impl")})
    cfg = C.replace(cfg, train={k: v for k, v in overrides.items() if k in _CONFIG_KEYS})
    settings.update({k: v for k, v in overrides.items() if k != "auto"})
    for key, (module, attribute, value) in _ENGINE_SWITCHES.items():
        if key in overrides:
            setattr(importlib.import_module(f"qlora_studio.engine.{module}"), attribute, value(overrides[key]))
    if "loss_chunk_tokens" in overrides:
        trainer.LOSS_CHUNK_TOKENS = overrides["loss_chunk_tokens"]
        trainer.LOSS_LOGITS_BYTES = 1 << 40
    collector = None
    if overrides.get("paging_counters"):
        collector = trainer.make_paging_collector(device)
        settings["paging_counters"] = collector.unavailable or "on"
    model, _, info = load_model(cfg, device, torch.bfloat16 if device.type == "cuda" else devices.resolve_compute_dtype("auto", device))
    settings["fast_paths"] = info.fast_paths
    params = [p for p in model.parameters() if p.requires_grad]
    opt = build_optimizer(cfg, params)
    sched = build_scheduler(cfg, opt, steps)
    model.train()

    def step(b):
        # The same labels convention as the others: the loss is over next-token predictions.
        loss, _, _ = train_step(model, [b], params, opt, sched, cfg, device, collector)
        if collector is not None:
            collector.flush(0)
        return loss

    graphs = getattr(model, "layer_graphs", None)
    result = _time_steps(step, shape, steps, graphs)
    if graphs is not None:
        settings["cuda_graphs"] = graphs.disabled or f"{graphs.graphs} recorded, pool {graphs.pool_bytes() / 1e9:.2f} GB"
    return result, settings


def contender_unsloth(model_dir: Path, shape: str, steps: int):
    import bitsandbytes as bnb
    import torch
    import unsloth  # noqa: F401  (must come before transformers)
    from unsloth import FastLanguageModel

    s = SHAPES[shape]
    model, _ = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=s["seq"], dtype=torch.bfloat16,
                                                 load_in_4bit=True, local_files_only=True)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             bias="none", use_gradient_checkpointing="unsloth", random_state=0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW32bit(params, lr=2e-4)
    model.train()

    return _time_steps(_hf_step(model, params, opt, "cuda"), shape, steps), {"gradient_checkpointing": "unsloth"}


def _hf_step(model, params, opt, device):
    """A step as the peers write it: the model's own loss (labels in the batch), clip, optimizer."""
    import torch

    def step(b):
        b = {k: v.to(device) for k, v in b.items()}
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _time_steps(step, shape: str, steps: int, graphs=None):
    """Losses and step times; on a GPU also sets PEAK["allocated"]: the most memory in use at once.

    With CUDA graphs (``graphs``: the model's GraphContext) a replay uses their pool without
    allocating, so the peak of the steps after the warm-up, when every graph is recorded, is the
    allocator's peak outside the pool plus the pool (_peak.PeakMemory).
    """
    import torch

    cuda = torch.cuda.is_available()
    losses, times = [], []
    peak = None
    if cuda:
        from _peak import PeakMemory

        torch.cuda.synchronize()
        peak = PeakMemory(graphs)
        peak.reset()
    warm_peak = warm_reserved = 0
    for i, b in enumerate(batches(shape, steps)):
        if peak is not None and i == WARMUP:
            # While recording, the graphs' temporaries are allocations: no pool on top.
            warm_peak, warm_reserved = peak.allocated(pool=False), peak.reserved()
            peak.reset()
        t0 = time.perf_counter()
        loss = step(b)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    if peak is not None:
        PEAK["allocated"] = max(warm_peak, peak.allocated())
        PEAK["reserved"] = max(warm_reserved, peak.reserved())
    return losses, times


PEAK: dict[str, int] = {}


def worker(args) -> int:
    import torch

    model_dir = Path(args.model)
    os.environ["QS_BENCH_MODEL"] = str(model_dir)
    if args.worker in ENGINE_VARIANTS:
        fn = lambda m, s, n: contender_engine(m, s, n, args.worker)  # noqa: E731
    else:
        fn = {"seed": contender_seed, "unsloth": contender_unsloth}[args.worker]
    (losses, times), settings = fn(model_dir, args.shape, args.steps)
    s = SHAPES[args.shape]
    timed = times[WARMUP:WARMUP + TIMED]
    result = {
        "contender": args.worker, "shape": args.shape, "batch": s["batch"], "seq": s["seq"],
        "tokens_per_s": s["batch"] * s["seq"] * len(timed) / sum(timed),
        "step_s": sum(timed) / len(timed), "losses": losses, "settings": settings,
        # Every step's time, and the median of the timed ones: one slow step moves the mean, not this.
        "step_times_s": [round(t, 4) for t in times],
        "tokens_per_s_median": s["batch"] * s["seq"] / sorted(timed)[len(timed) // 2],
    }
    if torch.cuda.is_available():
        result["peak_allocated_gb"] = PEAK.get("allocated", torch.cuda.max_memory_allocated()) / 1e9
        result["peak_reserved_gb"] = PEAK.get("reserved", torch.cuda.max_memory_reserved()) / 1e9
    Path(args.result).write_text(json.dumps(result))
    return 0


# ----------------------------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    by = {r["contender"]: r for r in rows if "tokens_per_s" in r}
    lines = ["| contender | tokens/s | tokens/s (median step) | peak allocated GB | peak reserved GB | × seed | × Unsloth | settings |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['contender']} | failed: {r.get('error', '')[:80]} | | | | | | |")
            continue
        ratio = lambda ref: f"{r['tokens_per_s'] / by[ref]['tokens_per_s']:.2f}" if ref in by else "–"
        lines.append(f"| {r['contender']} | {r['tokens_per_s']:,.0f} | {r.get('tokens_per_s_median', 0):,.0f} | "
                     f"{r.get('peak_allocated_gb', 0):.2f} | "
                     f"{r.get('peak_reserved_gb', 0):.2f} | {ratio('seed')} | {ratio('unsloth')} | {json.dumps(r.get('settings', {}))} |")
    return "\n".join(lines)


def loss_agreement(rows: list[dict], n: int = 20) -> dict | None:
    by = {r["contender"]: r for r in rows if "losses" in r}
    if "seed" not in by or "engine" not in by:
        return None
    a, b = by["seed"]["losses"][:n], by["engine"]["losses"][:n]
    rel = [abs(x - y) / abs(x) for x, y in zip(a, b)]
    return {"steps": len(rel), "max_rel_diff": max(rel), "mean_rel_diff": sum(rel) / len(rel), "seed": a, "engine": b}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=SHAPES, default="1b")
    ap.add_argument("--contenders", default="seed,engine,unsloth,engine-auto")
    ap.add_argument("--models", default=os.environ.get("QS_BENCH_MODELS", "bench-models"), help="where the random models are kept")
    ap.add_argument("--steps", type=int, default=20, help="steps per contender (the first 3 warm up; 8 are timed)")
    ap.add_argument("--results", help="folder for the result files (default bench/results)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    model_dir = Path(args.models) / f"llama-{args.shape}"
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_model(args.shape, model_dir)
    print(f"model {model_dir.name} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for name in args.contenders.split(","):
        result_file = model_dir.parent / f"{args.shape}-{name}.json"
        result_file.unlink(missing_ok=True)
        t0 = time.perf_counter()
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        if name == "unsloth" and os.environ.get("QS_PEER_PATH"):
            # The peer's own pins (datasets 4.x, trl) come first, for its process only.
            env["PYTHONPATH"] = os.pathsep.join([os.environ["QS_PEER_PATH"], env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, __file__, "--worker", name, "--shape", args.shape, "--model", str(model_dir),
                               "--steps", str(args.steps), "--result", str(result_file)],
                              capture_output=True, text=True, env=env)
        if proc.returncode == 0 and result_file.exists():
            row = json.loads(result_file.read_text())
        else:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
            row = {"contender": name, "error": " | ".join(tail)}
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(f"{name}: " + (f"{row['tokens_per_s']:,.0f} tok/s, peak {row.get('peak_allocated_gb', 0):.2f} GB allocated"
                             if "tokens_per_s" in row else f"failed: {row['error'][-400:]}") + f" ({row['wall_s']} s)", flush=True)
    md = f"### {args.shape} shape, micro-batch {SHAPES[args.shape]['batch']} × {SHAPES[args.shape]['seq']} tokens\n\n" + table(rows)
    agree = loss_agreement(rows)
    if agree:
        md += (f"\n\nLoss agreement, engine vs seed recipe, first {agree['steps']} steps on identical data: "
               f"max relative difference {agree['max_rel_diff']:.2%}, mean {agree['mean_rel_diff']:.2%}.\n")
    print(md)
    from _results import write_result

    if args.results:
        import _results

        _results.RESULTS = Path(args.results)
    write_result(f"perf-{args.shape}", {"rows": rows, "loss_agreement": agree}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
