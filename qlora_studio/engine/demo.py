"""The offline demo: a tiny random-weight Llama, a tokenizer built here, a sample dataset, a config.

Nothing is downloaded. Every linear dimension is a multiple of 64 (bitsandbytes' CPU 4-bit kernels
need it). The sample dataset, ``resources/demo_qa.jsonl``, holds short question/answer pairs that a
tiny model can memorise in a minute on a laptop CPU, so a person sees the loss fall and the answers
appear.
"""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from .. import formats
from ..config import RunConfig, from_dict

DEMO_DATA = "demo_qa.jsonl"
SPECIAL = {"bos": "<s>", "eos": "</s>", "pad": "<pad>"}

#: The demo run's settings: the paper's recipe (NF4, double quantization, LoRA on all linear
#: layers, paged AdamW) at a scale that trains in well under a minute on two CPU cores.
DEMO_SETTINGS = {
    "model": {"name_or_path": "model"},
    "quant": {"quant_type": "nf4", "double_quant": True, "compute_dtype": "auto"},
    "lora": {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": ["all-linear"]},
    "data": {"path": "data.jsonl", "format": "auto", "max_seq_len": 128},
    "train": {
        "micro_batch_size": 8, "grad_accum_steps": 1, "max_steps": 300, "learning_rate": 1e-3,
        "max_grad_norm": 1.0, "gradient_checkpointing": False, "checkpoint_every": 100,
        "log_every": 1, "seed": 42, "optimizer": "paged_adamw_32bit",
    },
    "output": {"runs_dir": "runs"},
}

LM_HEAD_SCALE = 5.0
MODEL_SHAPE = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 4, "max_position_embeddings": 512}


def resource_text(name: str) -> str:
    """A file of ``resources/``: from the installed package, or from a source checkout run in place."""
    try:
        return resources.files("qlora_studio.resources").joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError:
        return (Path(__file__).resolve().parents[2] / "resources" / name).read_text(encoding="utf-8")


def demo_records() -> list[dict]:
    text = resource_text(DEMO_DATA)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def build_tokenizer(texts: list[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on ``texts`` (the demo data and the template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
    )


def build_model(folder: Path, tokenizer, seed: int = 0) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = -(-len(tokenizer) // 64) * 64
    config = LlamaConfig(
        vocab_size=vocab,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        **MODEL_SHAPE,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        # With the usual 0.02 init, a frozen output head caps the logits near 5, so the loss could
        # not fall below about 2 even when every answer is right. A larger head lets it fall to ~0.
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model = model.to(torch.bfloat16)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def demo_config() -> RunConfig:
    return from_dict(json.loads(json.dumps(DEMO_SETTINGS)), "demo settings")


def build_demo(folder: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``folder/model``, ``folder/data.jsonl`` and ``folder/config.toml``; return the config path."""
    folder = Path(folder)
    config_path = folder / "config.toml"
    if config_path.exists() and not overwrite:
        return config_path
    folder.mkdir(parents=True, exist_ok=True)
    records = demo_records()
    texts = []
    for r in records:
        messages = formats.to_messages(r, "alpaca", {}, "demo")
        texts.append("".join(s.text for s in formats.render_default(messages, eos="")))
    tokenizer = build_tokenizer(texts)
    tmp = folder / ".tmp-model"
    shutil.rmtree(tmp, ignore_errors=True)
    build_model(tmp, tokenizer)
    if (folder / "model").exists():
        shutil.rmtree(folder / "model")
    tmp.rename(folder / "model")
    with open(folder / "data.jsonl", "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    demo_config().save(config_path)
    return config_path
