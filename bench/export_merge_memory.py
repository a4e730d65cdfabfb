"""Peak memory of merging a LoRA adapter into a large model, on the CPU.

Writes a random Llama-architecture model (TinyLlama-1.1B's shape by default, about 2.2 GB in bf16,
in a few shards) and a rank-64 adapter on every linear layer straight to safetensors files -- one
tensor at a time, so building it needs no memory either -- then runs ``export(..., "merged")``
and ``export(..., "gguf")`` in child processes and reports, for each, the resident memory when the
export starts (the libraries loaded), the highest resident memory sampled while it runs, and the
process's lifetime peak (``ru_maxrss``, which includes a transient spike while torch imports), next
to a child that only imports the same libraries.

The claim under test: merging streams layer by layer, so its peak is the libraries plus about one
tensor, independent of the model size (a 7B model merges within 24 GB; here far less).

    python bench/export_merge_memory.py [--preset 1b|3b|7b] [--keep DIR]

Results go to bench/results/export_merge_memory-<date>-<commit>.json (+ .md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _results import write_result

PRESETS = {
    # hidden, intermediate, layers, heads, kv heads, vocab
    "1b": (2048, 5632, 22, 32, 4, 32000),   # TinyLlama-1.1B
    "3b": (3072, 8192, 28, 24, 8, 128256),  # Llama-3.2-3B
    "7b": (4096, 11008, 32, 32, 32, 32000),  # Llama-2-7B
}
RANK = 64
SHARDS = 2  # aimed for; tensors are not split, so there may be one more


def tensor_specs(hidden, inter, layers, heads, kv, vocab):
    import torch

    from qlora_studio.engine.export.safetensors_io import TensorSpec

    head = hidden // heads
    specs = [TensorSpec("model.embed_tokens.weight", torch.bfloat16, (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", torch.bfloat16, (hidden,)),
            TensorSpec(p + "self_attn.q_proj.weight", torch.bfloat16, (hidden, hidden)),
            TensorSpec(p + "self_attn.k_proj.weight", torch.bfloat16, (kv * head, hidden)),
            TensorSpec(p + "self_attn.v_proj.weight", torch.bfloat16, (kv * head, hidden)),
            TensorSpec(p + "self_attn.o_proj.weight", torch.bfloat16, (hidden, hidden)),
            TensorSpec(p + "post_attention_layernorm.weight", torch.bfloat16, (hidden,)),
            TensorSpec(p + "mlp.gate_proj.weight", torch.bfloat16, (inter, hidden)),
            TensorSpec(p + "mlp.up_proj.weight", torch.bfloat16, (inter, hidden)),
            TensorSpec(p + "mlp.down_proj.weight", torch.bfloat16, (hidden, inter)),
        ]
    specs += [TensorSpec("model.norm.weight", torch.bfloat16, (hidden,)),
              TensorSpec("lm_head.weight", torch.bfloat16, (vocab, hidden))]
    return specs


def write_model(folder: Path, preset: str) -> tuple[int, int]:
    """The model's files; returns (bytes of weights, number of shards)."""
    import torch

    from qlora_studio.engine.export.merge import shard_specs
    from qlora_studio.engine.export.safetensors_io import SafetensorsWriter

    hidden, inter, layers, heads, kv, vocab = PRESETS[preset]
    folder.mkdir(parents=True)
    specs = tensor_specs(*PRESETS[preset])
    total = sum(s.nbytes for s in specs)
    shards = shard_specs(specs, total // SHARDS + 1)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    gen = torch.Generator().manual_seed(0)
    for name, group in zip(names, shards):
        with SafetensorsWriter(folder / name, group) as writer:
            for spec in group:
                if len(spec.shape) == 1:
                    t = torch.ones(spec.shape, dtype=spec.dtype)
                else:
                    t = (torch.randn(spec.shape, generator=gen) * 0.02).to(spec.dtype)
                writer.write(spec.name, t)
                del t
    index = {"metadata": {"total_size": total},
             "weight_map": {s.name: n for n, g in zip(names, shards) for s in g}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "dtype": "bfloat16", "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2}
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder, vocab)
    return total, len(shards)


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE with ``vocab_size`` tokens (no merges beyond the bytes: enough for export)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    merges = []
    letters = sorted(a for a in alphabet if a.isalpha())
    for a in letters:
        for b in letters:
            if len(vocab) >= vocab_size:
                break
            if a + b not in vocab:
                vocab[a + b] = len(vocab)
                merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)


def write_adapter(folder: Path, model: Path, preset: str) -> int:
    import torch

    from qlora_studio.engine.export.safetensors_io import SafetensorsWriter, TensorSpec

    folder.mkdir(parents=True)
    specs = [s for s in tensor_specs(*PRESETS[preset]) if len(s.shape) == 2 and ".layers." in s.name]
    lora = []
    for s in specs:
        module = "base_model.model." + s.name[: -len(".weight")]
        lora += [TensorSpec(f"{module}.lora_A.weight", torch.float32, (RANK, s.shape[1])),
                 TensorSpec(f"{module}.lora_B.weight", torch.float32, (s.shape[0], RANK))]
    gen = torch.Generator().manual_seed(1)
    with SafetensorsWriter(folder / "adapter_model.safetensors", lora) as writer:
        for s in lora:
            writer.write(s.name, torch.randn(s.shape, generator=gen) * 0.01)
    targets = sorted({s.name.split(".")[-2] for s in specs})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": targets,
        "base_model_name_or_path": str(model), "task_type": "CAUSAL_LM", "bias": "none"}))
    return sum(s.nbytes for s in lora)


CHILD = """
import resource, sys, threading, time
import psutil
import torch, transformers, peft, bitsandbytes, gguf  # what an export imports
from qlora_studio.engine.export import export
mode, adapter, out = sys.argv[1:4]
me = psutil.Process()
before = me.memory_info().rss
peak = [before]
done = threading.Event()
def sample():
    while not done.wait(0.005):
        peak[0] = max(peak[0], me.memory_info().rss)
threading.Thread(target=sample, daemon=True).start()
t = time.time()
if mode != "imports":
    export(adapter, mode, out=out)
seconds = time.time() - t
done.set()
peak[0] = max(peak[0], me.memory_info().rss)
print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, before, peak[0])
"""


def peak_rss(mode: str, adapter: Path, out: Path) -> dict:
    """A child process running one export: its lifetime peak RSS (``ru_maxrss``, which includes
    transient spikes while the libraries import), its RSS when the export starts and the highest
    RSS sampled (every 5 ms) while it runs."""
    proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(adapter), str(out)], capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    seconds, lifetime, before, during = proc.stdout.strip().splitlines()[-1].split()
    return {"seconds": round(float(seconds), 1), "lifetime_peak_rss": int(lifetime), "rss_at_start": int(before),
            "peak_rss_during_export": int(during), "export_peak_above_start": int(during) - int(before)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=PRESETS, default="1b")
    parser.add_argument("--keep", type=Path, help="build in this folder and keep it (default: a temporary folder)")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="qlora-merge-bench-"))
    try:
        t = time.time()
        model_bytes, n_shards = write_model(root / "model", args.preset)
        adapter_bytes = write_adapter(root / "adapter", root / "model", args.preset)
        build_s = time.time() - t
        imports = peak_rss("imports", root / "adapter", root / "unused")
        merged = peak_rss("merged", root / "adapter", root / "merged")
        shutil.rmtree(root / "merged")
        gguf_run = peak_rss("gguf", root / "adapter", root / "gguf")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    gb = 1e9
    result = {"preset": args.preset, "model_bytes": model_bytes, "shards": n_shards, "adapter_bytes": adapter_bytes, "lora_rank": RANK,
              "build_s": round(build_s, 1), "imports_only": imports, "merged": merged, "gguf_f16": gguf_run}

    def row(name: str, r: dict) -> str:
        return (f"| {name} | {r['lifetime_peak_rss'] / gb:.2f} GB | {r['rss_at_start'] / gb:.2f} GB | "
                f"{r['peak_rss_during_export'] / gb:.2f} GB | {r['export_peak_above_start'] / gb:.2f} GB | {r['seconds']:.0f} s |")

    table = "\n".join([
        f"# Merge memory ({args.preset} preset, CPU)", "",
        (f"Model {model_bytes / gb:.2f} GB bf16 in {n_shards} shards; adapter rank {RANK} on all linear layers "
         f"({adapter_bytes / gb:.2f} GB fp32)."), "",
        "| run | lifetime peak RSS | RSS at start | peak RSS during export | export's own peak | time |",
        "|---|---|---|---|---|---|",
        row("imports only", imports), row("merged (safetensors)", merged), row("gguf f16 (+ LoRA GGUF)", gguf_run), "",
    ])
    print(table)
    write_result("export_merge_memory", result, table)


if __name__ == "__main__":
    main()
