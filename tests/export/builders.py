"""Tiny models, tokenizers, adapters and run folders built locally for the export tests.

Nothing is downloaded. Every linear dimension is a multiple of 64 (bitsandbytes' CPU 4-bit
kernels need it). Weights are drawn with a large initializer range so that greedy decoding of a
random model is not stuck on one token, and LoRA B matrices are random (PEFT initialises them to
zero), so a merge that forgets the adapter is caught.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "### User:\nName three colours.\n\n### Assistant:\nRed, green and blue.",
    "Low-rank adapters make fine-tuning cheap: only two small matrices per layer are trained.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 2024. Symbols: ( ) [ ] { } < > = + - * / % & | ! ?",
]
SPECIAL = ("<s>", "</s>", "<pad>")
VOCAB = 512

ARCHS = {
    # GQA and untied head: the llama converter's q/k permutation sees two head counts.
    "llama": {"cls": "LlamaForCausalLM", "config": "LlamaConfig", "tie_word_embeddings": False, "num_key_value_heads": 2},
    "mistral": {"cls": "MistralForCausalLM", "config": "MistralConfig", "tie_word_embeddings": False,
                "num_key_value_heads": 2, "sliding_window": None},
    # Qwen2: q/k/v biases and a tied output head.
    "qwen2": {"cls": "Qwen2ForCausalLM", "config": "Qwen2Config", "tie_word_embeddings": True, "num_key_value_heads": 2},
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def build_tokenizer(folder: Path, chat_template: str | None = None):
    """A byte-level BPE (GPT-2 pre-tokenizer) trained on :data:`CORPUS`, saved as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 64, special_tokens=list(SPECIAL),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    if chat_template:
        fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return fast


def build_spm_tokenizer(folder: Path):
    """A SentencePiece-style BPE with byte fallback, laid out like Llama 2's and Mistral's tokenizer.json:
    ``<unk> <s> </s>``, the 256 byte tokens ``<0x00>``..``<0xFF>``, then the learned pieces (``▁`` marks
    a space); a normalizer that prepends ``▁`` and replaces spaces by it."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    learner = Tokenizer(models.BPE())  # pieces learned within words, as SentencePiece does
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    learner.train_from_iterator(CORPUS * 4, trainer=trainers.BpeTrainer(vocab_size=VOCAB - 64 - 256, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path, arch: str = "llama", seed: int = 0, chat_template: str | None = None,
                hidden: int = 128, layers: int = 2, heads: int = 4, spm: bool = False) -> Path:
    import transformers

    spec = dict(ARCHS[arch])
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_spm_tokenizer(folder) if spm else build_tokenizer(folder, chat_template)
    config_cls = getattr(transformers, spec.pop("config"))
    model_cls = getattr(transformers, spec.pop("cls"))
    config = config_cls(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=256, initializer_range=0.08, rms_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        **spec,
    )
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():  # non-trivial norms, so a wrongly mapped norm tensor changes the output
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn_like(p)) if "norm" in name else p.normal_(0, 0.05)
    model.to(torch.bfloat16).save_pretrained(folder)
    return folder


def build_adapter(model_folder: Path, adapter_folder: Path, seed: int = 1, r: int = 8, alpha: float = 16.0,
                  sample: torch.Tensor | None = None) -> torch.Tensor | None:
    """A LoRA adapter on every linear layer with random B; returns the in-memory logits for ``sample``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_folder, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.eval()
    logits = None
    if sample is not None:
        with torch.no_grad():
            logits = model(sample).logits
    model.save_pretrained(adapter_folder)
    return logits


def sample_ids(length: int = 12) -> torch.Tensor:
    return torch.tensor([[1] + [(7 * i + 3) % 300 + 10 for i in range(length - 1)]])


def write_run(run_dir: Path, model_folder: Path, adapter_builder, losses: int = 30, checkpoint_step: int = 10) -> Path:
    """A finished run folder: config.toml, events.jsonl, adapter/ and one checkpoint.

    ``adapter_builder(folder, seed)`` writes an adapter; the final one has seed 1, the checkpoint's seed 2.
    """
    from qlora_studio import config as config_mod
    from qlora_studio import events as ev
    from qlora_studio import runs

    run_dir.mkdir(parents=True)
    cfg = config_mod.from_dict({
        "model": {"name_or_path": str(model_folder)},
        "data": {"path": str(run_dir.parent / "data.jsonl")},
        "lora": {"r": 8, "alpha": 16.0, "dropout": 0.0},
        "train": {"max_steps": losses, "eval_every": 10, "checkpoint_every": checkpoint_step},
    })
    cfg.save(run_dir / runs.CONFIG)
    adapter_builder(run_dir / runs.ADAPTER, 1)
    ckpt = run_dir / runs.CHECKPOINTS / runs.checkpoint_name(checkpoint_step)
    adapter_builder(ckpt / runs.ADAPTER, 2)
    (ckpt / runs.STATE).write_text(json.dumps({"step": checkpoint_step}))
    writer = ev.EventWriter(run_dir / runs.EVENTS)
    writer.emit("run_started", run_dir=str(run_dir), config=cfg.to_dict(), model={}, device={"kind": "cpu"},
                versions={"torch": torch.__version__, "qlora-studio": "0.1.0"}, plan={"max_steps": losses})
    for step in range(1, losses + 1):
        writer.emit("step", step=step, epoch=step / losses, loss=3.0 / (1 + 0.1 * step), lr=2e-4, grad_norm=1.0, tokens=100,
                    tokens_per_s=1000.0, step_s=0.1, mem_allocated=None, mem_reserved=None, mem_peak=None)
        if step % 10 == 0:
            writer.emit("eval", step=step, loss=3.2 / (1 + 0.1 * step), perplexity=1.0)
    writer.emit("finished", step=losses, adapter=str(run_dir / runs.ADAPTER), train_loss=3.0 / (1 + 0.1 * losses),
                eval_loss=3.2 / (1 + 0.1 * losses), tokens=100 * losses, duration_s=time.time() % 10)
    writer.close()
    return run_dir
