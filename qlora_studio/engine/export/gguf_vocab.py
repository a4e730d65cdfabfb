"""Tokenizer metadata for GGUF files, read from a Hugging Face fast tokenizer (``tokenizer.json``).

llama.cpp knows two tokenizer families that cover the Llama, Mistral and Qwen2 models:

* ``gpt2`` -- byte-level BPE (Llama 3, Qwen2, GPT-2 style): the vocabulary, the merges, and the
  name of the pre-tokenizer's split regex (``tokenizer.ggml.pre``), recognised here by comparing
  the tokenizer's own regex with the ones llama.cpp implements;
* ``llama`` -- SentencePiece-style BPE with byte fallback (Llama 2, Mistral): the vocabulary with a
  score per token. SentencePiece merges the pair whose result scores highest, so a token's score
  is minus the rank of the merge that creates it, which reproduces the merge order of
  ``tokenizer.json``.

Models whose tokenizer has no chat template were trained (by QLoRA Studio) with
``formats.DEFAULT_TEMPLATE``; the GGUF then carries that template in Jinja form so llama.cpp and
Ollama prompt the model the way it was trained.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ... import formats
from .errors import ExportError

# The split regexes of the pre-tokenizers llama.cpp implements, as tokenizer.json spells them.
PRE_TOKENIZER_REGEXES = {
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": "gpt-2",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+": "qwen2",
}

# gguf.TokenType values (kept here as plain ints so this module imports without gguf).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def default_chat_template() -> str:
    """``formats.DEFAULT_TEMPLATE`` as a Jinja chat template (no BOS: llama.cpp adds it itself)."""
    t = formats.DEFAULT_TEMPLATE
    return (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}" + t["system"] + "{{ message['content'] }}"
        "{% elif message['role'] == 'user' %}" + t["user"] + "{{ message['content'] }}"
        "{% else %}" + t["assistant"] + "{{ message['content'] }}{{ eos_token }}{% endif %}"
        "{% if not loop.last %}" + t["separator"] + "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}" + t["separator"] + t["assistant"] + "{% endif %}"
    )


@dataclass
class Vocab:
    model: str
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    merges: list[str] | None = None
    scores: list[float] | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str = ""
    template_is_default: bool = False
    warnings: list[str] = field(default_factory=list)

    def add_to(self, writer) -> None:
        """Write the ``tokenizer.ggml.*`` keys to a ``gguf.GGUFWriter``."""
        writer.add_tokenizer_model(self.model)
        if self.pre:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges is not None:
            writer.add_token_merges(self.merges)
        adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
                  "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
        for key, token_id in self.special.items():
            adders[key](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(False)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.chat_template:
            writer.add_chat_template(self.chat_template)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"unreadable JSON ({exc})", where=str(path)) from None
    return data if isinstance(data, dict) else {}


def _components(node: Any, kind: str) -> list[dict[str, Any]]:
    """The pre-tokenizer / normalizer / decoder steps of a tokenizer.json node, flattened."""
    if not isinstance(node, dict):
        return []
    if node.get("type") == "Sequence":
        out = []
        for child in node.get(kind, []) or []:
            out += _components(child, kind)
        return out
    return [node]


def _pre_tokenizer_name(pre: Any) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer, or None if it is not one llama.cpp knows."""
    steps = _components(pre, "pretokenizers")
    splits = [s for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(steps) == 1 and byte_level and byte_level[0].get("use_regex", True):
        return "gpt-2"
    if len(splits) == 1 and byte_level and not byte_level[0].get("use_regex", True):
        regex = (splits[0].get("pattern") or {}).get("Regex")
        return PRE_TOKENIZER_REGEXES.get(regex)
    return None


def _merges(model: dict[str, Any]) -> list[tuple[str, str]]:
    pairs = []
    for merge in model.get("merges") or []:
        if isinstance(merge, str):
            left, _, right = merge.partition(" ")
        else:
            left, right = merge
        pairs.append((left, right))
    return pairs


def read_vocab(folder: Path, n_vocab: int, trust_remote_code: bool = False) -> Vocab:
    """The GGUF tokenizer description of the tokenizer in ``folder`` for a model with ``n_vocab`` rows.

    Tokens, special tokens and the chat template come from the tokenizer as transformers loads it
    (the one training used: its class may add tokens that tokenizer.json lacks); the algorithm --
    merges, pre-tokenizer, normalizer -- comes from tokenizer.json."""
    from transformers import AutoTokenizer

    data = _read_json(folder / "tokenizer.json")
    if not data:
        raise ExportError("GGUF export needs a fast tokenizer (tokenizer.json) in the model folder", where=str(folder),
                          fix="Save the tokenizer with a recent transformers version (tokenizer.save_pretrained).")
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"the tokenizer is a {model.get('type')} model; GGUF export supports BPE tokenizers", where=str(folder))
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot load the tokenizer ({exc})".splitlines()[0], where=str(folder)) from None
    model_cfg = _read_json(folder / "config.json")

    ids: dict[str, int] = dict(tok.get_vocab())
    added = {i: t for i, t in tok.added_tokens_decoder.items()}
    size = max(ids.values(), default=-1) + 1
    if size > n_vocab:
        raise ExportError(f"the tokenizer has {size} tokens but the model only {n_vocab} embeddings", where=str(folder))
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [UNUSED] * n_vocab
    for text, i in ids.items():
        tokens[i] = text
        types[i] = NORMAL

    pieces = _merges(model)
    byte_level = any(s.get("type") == "ByteLevel" for s in _components(data.get("pre_tokenizer"), "pretokenizers"))
    decoders = _components(data.get("decoder"), "decoders")
    byte_fallback = bool(model.get("byte_fallback")) or any(d.get("type") == "ByteFallback" for d in decoders)
    vocab = Vocab(model="gpt2" if byte_level else "llama", tokens=tokens, types=types)
    if byte_level:
        vocab.merges = [f"{a} {b}" for a, b in pieces]
        vocab.pre = _pre_tokenizer_name(data.get("pre_tokenizer"))
        if vocab.pre is None:
            vocab.pre = "default"
            vocab.warnings.append("the tokenizer's pre-tokenizer is not one llama.cpp implements; llama.cpp will split "
                                  "text with its default rules, so its tokens may differ from the original tokenizer's")
    elif byte_fallback:
        rank = {a + b: r for r, (a, b) in enumerate(pieces)}
        vocab.scores = [-float(rank.get(t, len(pieces) + i)) if types[i] == NORMAL and len(t) > 1 else 0.0
                        for i, t in enumerate(tokens)]
        for i, t in enumerate(tokens):
            if len(t) == 6 and t.startswith("<0x") and t.endswith(">"):
                types[i] = BYTE
        steps = _components(data.get("normalizer"), "normalizers") + _components(data.get("pre_tokenizer"), "pretokenizers")
        vocab.add_space_prefix = any(
            (s.get("type") == "Prepend" and s.get("prepend") == "\u2581")
            or (s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never" and s.get("add_prefix_space", True))
            for s in steps
        )
    else:
        raise ExportError("the tokenizer is neither byte-level BPE nor SentencePiece-style BPE with byte fallback",
                          where=str(folder), fix="Export the adapter or merged format instead.")

    for i, token in added.items():
        if i < n_vocab:
            types[i] = CONTROL if token.special else USER_DEFINED
    if tok.unk_token is not None and tok.unk_token_id is not None and tok.unk_token_id < n_vocab:
        types[tok.unk_token_id] = UNKNOWN

    for key in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tok, f"{key}_token_id")
        if token_id is None and isinstance(model_cfg.get(f"{key}_token_id"), int):
            token_id = model_cfg[f"{key}_token_id"]
        if token_id is not None:
            vocab.special[key] = int(token_id)
    # QLoRA Studio's training starts every sequence with the tokenizer's BOS token, if it has one.
    vocab.add_bos = tok.bos_token_id is not None

    template = tok.chat_template
    if isinstance(template, dict):
        template = template.get("default") or next(iter(template.values()), None)
    if template:
        vocab.chat_template = template
    else:
        vocab.chat_template = default_chat_template()
        vocab.template_is_default = True
    return vocab
