"""Damage to a model folder, drawn by hypothesis and applied to a copy of the demo's tiny Llama.

Each damage is a small tuple so that hypothesis can shrink it and print it; :func:`apply` carries it
out. ``FAMILY`` names the kind of damage for the report.
"""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import strategies as st

FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")
CONFIG_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "head_dim", "architectures", "model_type", "max_position_embeddings", "rms_norm_eps",
               "tie_word_embeddings", "rope_parameters", "torch_dtype", "dtype", "quantization_config", "auto_map")

#: Configurations of models that are not causal language models (written with transformers' own
#: classes so that they are otherwise valid).
NON_CAUSAL = ("BertModel", "BertForMaskedLM", "RobertaForSequenceClassification", "T5ForConditionalGeneration",
              "LlamaForSequenceClassification")

#: Chat templates: one that works, one that refuses some conversations, one that does not parse.
TEMPLATES = {
    "working": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
    "refusing": "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                "{% endif %}{{ m['content'] }}{% endfor %}",
    "unparsable": "{% for m in messages %}{{ m['content'] }",
}

json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.sampled_from([0, -1, 1, 3, 10**9, 10**12]),
              st.floats(allow_nan=False), st.text(max_size=12), st.sampled_from(["llama", "bert", "LlamaForCausalLM"])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=5,
)

damages = st.one_of(
    st.tuples(st.just("delete"), st.sampled_from(FILES)),
    st.tuples(st.just("truncate"), st.sampled_from(FILES), st.floats(0.0, 0.999)),
    st.tuples(st.just("overwrite"), st.sampled_from(FILES), st.floats(0.0, 1.0), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("replace"), st.sampled_from(FILES), st.binary(max_size=256)),
    st.tuples(st.just("config value"), st.sampled_from(CONFIG_KEYS), json_values),
    st.tuples(st.just("config json"), json_values),
    st.tuples(st.just("non-causal"), st.sampled_from(NON_CAUSAL)),
    st.tuples(st.just("no pad token"), st.booleans()),
    st.tuples(st.just("chat template"), st.sampled_from(sorted(TEMPLATES))),
    st.tuples(st.just("pickle weights"), st.booleans()),
    st.tuples(st.just("drop tensor"), st.integers(0, 38)),
    st.tuples(st.just("extra tensor"), st.sampled_from(["model.layers.9.mlp.up_proj.weight", "junk"])),
    st.tuples(st.just("weights index"), json_values),
)

FAMILY = {
    "delete": "missing files", "truncate": "truncated files", "overwrite": "corrupt bytes", "replace": "random bytes",
    "config value": "config.json that does not match the weights", "config json": "config.json that does not match the weights",
    "non-causal": "non-causal architecture", "no pad token": "tokenizer without a pad token",
    "chat template": "tokenizer chat templates", "pickle weights": "pickle weights",
    "drop tensor": "weights missing or adding tensors", "extra tensor": "weights missing or adding tensors",
    "weights index": "damaged weights index",
}


def family(ops: list[tuple]) -> str:
    return FAMILY[ops[0][0]]


def _edit_json(path: Path, change) -> None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or already damaged by an earlier step
        data = {}
    if not isinstance(data, dict):
        data = {}
    change(data)
    path.write_text(json.dumps(data))


def _non_causal(folder: Path, arch: str) -> None:
    import transformers

    model_type = {"Bert": "bert", "Roberta": "roberta", "T5": "t5", "Llama": "llama"}[next(
        prefix for prefix in ("Bert", "Roberta", "T5", "Llama") if arch.startswith(prefix))]
    if model_type == "llama":
        _edit_json(folder / "config.json", lambda d: d.update(architectures=[arch]))
        return
    cfg = transformers.AutoConfig.for_model(model_type).to_dict()
    cfg["architectures"] = [arch]
    (folder / "config.json").write_text(json.dumps(cfg, default=str))


def _rewrite_weights(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    if not path.is_file():
        return
    try:
        tensors = load_file(str(path))
    except Exception:  # noqa: BLE001 - already damaged by an earlier step
        return
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def apply(folder: Path, ops: list[tuple]) -> dict:
    """Damage ``folder`` in place; returns settings the run must use (e.g. allow_pickle_weights)."""
    import torch

    settings: dict = {}
    for op in ops:
        kind, *args = op
        if kind == "delete":
            (folder / args[0]).unlink(missing_ok=True)
        elif kind == "truncate":
            path = folder / args[0]
            if path.is_file():
                data = path.read_bytes()
                path.write_bytes(data[: int(len(data) * args[1])])
        elif kind == "overwrite":
            path = folder / args[0]
            if path.is_file() and path.stat().st_size:
                data = bytearray(path.read_bytes())
                at = int((len(data) - 1) * args[1])
                data[at: at + len(args[2])] = args[2]
                path.write_bytes(bytes(data))
        elif kind == "replace":
            (folder / args[0]).write_bytes(args[1])
        elif kind == "config value":
            _edit_json(folder / "config.json", lambda d, a=args: d.update({a[0]: a[1]}))
        elif kind == "config json":
            (folder / "config.json").write_text(json.dumps(args[0]))
        elif kind == "non-causal":
            _non_causal(folder, args[0])
        elif kind == "no pad token":
            def drop_pad(d, also_eos=args[0]):
                d.pop("pad_token", None)
                if also_eos:
                    d.pop("eos_token", None)
            _edit_json(folder / "tokenizer_config.json", drop_pad)
        elif kind == "chat template":
            _edit_json(folder / "tokenizer_config.json", lambda d, a=args: d.update(chat_template=TEMPLATES[a[0]]))
        elif kind == "pickle weights":
            path = folder / "model.safetensors"
            if path.is_file():
                path.rename(folder / "pytorch_model.bin")
            settings["allow_pickle_weights"] = args[0]
        elif kind == "drop tensor":
            _rewrite_weights(folder, lambda t, a=args: t.pop(sorted(t)[a[0] % len(t)]) if t else None)
        elif kind == "extra tensor":
            _rewrite_weights(folder, lambda t, a=args: t.update({a[0]: torch.zeros(768, 256, dtype=torch.bfloat16)}))
        elif kind == "weights index":
            (folder / "model.safetensors.index.json").write_text(json.dumps(args[0]))
        else:
            raise AssertionError(kind)
    return settings
