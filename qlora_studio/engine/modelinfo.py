"""What a model is, from its ``config.json`` alone: shapes, parameter counts, LoRA targets.

The memory estimate and the GUI's Model page need to know a model before a byte of its weights is
downloaded, so this module reads only ``config.json`` (from a local folder, or through
``huggingface_hub`` for a hub id, honouring ``HF_HUB_OFFLINE`` and the standard cache) and derives
the rest from the architecture's known layout.

Supported layouts are the Llama-style decoders: Llama, Mistral, Qwen2/Qwen3, Gemma 1/2/3 (also as
the ``text_config`` of a multimodal Gemma 3), Granite, SmolLM3, OLMo 2, GLM-4 and Phi-3 (whose
attention and MLP projections are fused). A config with the Llama keys but an unknown
``model_type`` is read as Llama-like and says so in :attr:`ModelInfo.notes`.

Torch-free: the GUI imports this at start-up.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelError

CONFIG_FILE = "config.json"

#: Architectures that are not causal language models, by ``model_type``: a clear error beats a
#: wrong estimate for an encoder.
NON_CAUSAL_TYPES = frozenset({
    "bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
    "modernbert", "t5", "mt5", "umt5", "bart", "mbart", "pegasus", "marian", "whisper", "vit", "clip",
    "siglip", "wav2vec2", "hubert", "mpnet", "camembert",
})
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")

#: ``model_type`` values of the Llama-style families this module knows, by layout.
LLAMA_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "granite", "smollm3", "olmo2", "glm4", "exaone4"})
GEMMA_TYPES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})
FUSED_TYPES = frozenset({"phi3"})
#: Layout details that differ between these families.
FUSED_QKV_TYPES = frozenset({"phi3"})
FUSED_MLP_TYPES = frozenset({"phi3", "glm4"})
FOUR_NORM_TYPES = frozenset({"gemma2", "gemma3", "gemma3_text", "glm4"})
QK_NORM_TYPES = frozenset({"qwen3", "gemma3", "gemma3_text", "olmo2", "exaone4"})
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size")


@dataclass(frozen=True)
class Linear:
    """One linear projection of a decoder layer: the unit that is quantized and gets LoRA."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False
    #: how many of these the model has (layers, or layers of a vision tower)
    count: int = 1
    #: the name of the tensor that feeds it; projections with the same input share it
    #: (q/k/v read the same normed hidden state)
    input: str = ""

    @property
    def params(self) -> int:
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelInfo:
    """The shape of a causal LM and its parameter counts, split by how QLoRA stores them."""

    architecture: str
    model_type: str
    layers: int
    hidden_size: int
    intermediate_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    tie_word_embeddings: bool
    #: every parameter, counted as the unquantized model holds it
    param_count: int
    #: weights of the linear projections: stored in 4 bits
    quantizable_params: int
    #: embeddings, output head (unless tied), norms and biases: kept in the compute dtype
    unquantized_params: int
    embedding_params: int
    head_params: int
    norm_params: int
    bias_params: int
    #: the decoder's linear projections, one entry per kind (``count`` = layers)
    linears: tuple[Linear, ...]
    #: RMSNorms per decoder layer (2 for Llama, 4 for Gemma 2/3)
    norms_per_layer: int = 2
    #: q/k RMSNorms inside attention: per head (Qwen3, Gemma 3) or over the whole projection (OLMo 2)
    qk_norm: bool = False
    qk_norm_full: bool = False
    #: ``tanh`` soft-capping of the final logits (Gemma 2/3): one more vocab-sized buffer
    final_logit_softcapping: float | None = None
    #: sliding-window attention span, when the model has one
    sliding_window: int | None = None
    #: linear layers of a vision tower (multimodal configs): quantized, never run on text batches
    vision_linears: tuple[Linear, ...] = ()
    vision_other_params: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Reading config.json


def _offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it only once, at import)."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    return False


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or "\\" in name or (len(name) > 1 and name[1] == ":")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ModelError("config.json is not UTF-8 text", where=str(path), fix="Re-download the model's config.json.") from None
    except OSError as exc:
        raise ModelError(f"cannot read config.json ({exc.strerror or exc})", where=str(path)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"config.json is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})",
            where=str(path),
            fix="Re-download the model's config.json or fix the file.",
        ) from None
    if not isinstance(data, dict):
        raise ModelError("config.json must hold a JSON object", where=str(path), fix="Re-download the model's config.json.")
    return data


def read_model_config(name_or_path: str, revision: str = "main", *, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """The ``config.json`` of a local model folder (or the file itself), or of a hub id.

    For a hub id only ``config.json`` is fetched (or read from the standard cache); with
    ``HF_HUB_OFFLINE=1`` nothing is fetched and an id that is not cached is an error.
    """
    name = (name_or_path or "").strip()
    if not name:
        raise ModelError("no model given", fix="Set model.name_or_path to a model folder or a hub id such as org/name.")
    path = Path(name).expanduser()
    if path.is_dir():
        cfg_file = path / CONFIG_FILE
        if not cfg_file.is_file():
            raise ModelError("no config.json in the model folder", where=str(path), fix="Pick the folder that holds config.json and the weights.")
        return _read_json(cfg_file)
    if path.is_file():
        if path.suffix.lower() != ".json":
            raise ModelError("not a model folder or a config.json file", where=str(path), fix="Pick the model's folder.")
        return _read_json(path)
    if _looks_local(name):
        raise ModelError("model folder not found", where=name, fix="Check the path, or give a hub id such as org/name.")
    return _read_hub_config(name, revision or "main", cache_dir)


def _read_hub_config(repo_id: str, revision: str, cache_dir: str | Path | None) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = _offline()
    try:
        local = hf_hub_download(repo_id, CONFIG_FILE, revision=revision, cache_dir=cache_dir, local_files_only=offline)
    except HFValidationError:
        raise ModelError("not a model folder and not a valid hub id", where=repo_id, fix="Give a folder path or a hub id such as org/name.") from None
    except LocalEntryNotFoundError:
        if offline:
            raise ModelError(
                "the model is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
                where=repo_id,
                fix="Download it once while online, or unset HF_HUB_OFFLINE.",
            ) from None
        raise ModelError(
            "cannot reach the Hugging Face hub and the model is not in the local cache",
            where=repo_id,
            fix="Check the network connection, or use a local model folder.",
        ) from None
    except GatedRepoError:
        raise ModelError(
            "the model is gated on the hub",
            where=repo_id,
            fix="Accept its licence on the model's hub page, then log in with `hf auth login`.",
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            "no such model on the Hugging Face hub (or it is private)",
            where=repo_id,
            fix="Check the id's spelling; for a private model log in with `hf auth login`.",
        ) from None
    except RevisionNotFoundError:
        raise ModelError(f"the model has no revision {revision!r}", where=repo_id, fix="Use model.revision = \"main\" or an existing branch, tag or commit.") from None
    except EntryNotFoundError:
        raise ModelError("the hub repository has no config.json", where=repo_id, fix="Pick a transformers model repository.") from None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelError(f"cannot fetch config.json ({_first_line(exc)})", where=repo_id, fix="Check the network connection and try again.") from None
    return _read_json(Path(local))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def is_cached(hub_id: str, revision: str = "main", *, cache_dir: str | Path | None = None) -> bool:
    """Whether the hub model is completely in the local cache: config.json and every weight shard."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cfg = try_to_load_from_cache(hub_id, CONFIG_FILE, cache_dir=cache_dir, revision=revision)
    except Exception:  # noqa: BLE001 - an invalid id (whatever the hub's validator raises) is not cached
        return False
    if not isinstance(cfg, str):
        return False
    snapshot = Path(cfg).parent
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = snapshot / index_name
        if index.is_file():
            try:
                shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
            except (OSError, ValueError, AttributeError):
                return False
            return bool(shards) and all((snapshot / shard).is_file() for shard in shards)
    return any(snapshot.glob("*.safetensors")) or (snapshot / "pytorch_model.bin").is_file()


# ----------------------------------------------------------------------------------------------
# Describing a config


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config: the nested ``text_config`` of a multimodal one."""
    text = config.get("text_config")
    if isinstance(text, dict) and "hidden_size" not in config:
        merged = dict(text)
        for key in ("architectures", "tie_word_embeddings"):
            if key in config and key not in text:
                merged[key] = config[key]
        merged.setdefault("model_type", text.get("model_type") or config.get("model_type"))
        return merged
    return config


def check_causal(config: dict[str, Any], where: str | None = None) -> None:
    """A clear error for encoders and other models that are not causal language models."""
    archs = [str(a) for a in (config.get("architectures") or [])]
    model_type = str(config.get("model_type") or "")
    encoder = model_type in NON_CAUSAL_TYPES or bool(config.get("is_encoder_decoder"))
    if not encoder and (not archs or any(a.endswith(CAUSAL_SUFFIXES) for a in archs)):
        return
    raise ModelError(
        f"not a causal language model (architecture {', '.join(archs) or model_type or 'unknown'})",
        where=where,
        fix="QLoRA Studio fine-tunes decoder models such as Llama, Mistral, Qwen or Gemma (…ForCausalLM).",
    )


def _get_int(cfg: dict[str, Any], key: str, where: str | None, *alternatives: str) -> int:
    for name in (key, *alternatives):
        value = cfg.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    raise ModelError(
        f"config.json has no usable {key}",
        where=where,
        fix="The estimate needs a Llama-style config (hidden_size, num_hidden_layers, num_attention_heads, ...).",
    )


def describe(config: dict[str, Any], where: str | None = None) -> ModelInfo:
    """The shape and parameter counts of a causal LM from its config.json."""
    if not isinstance(config, dict):
        raise ModelError("config.json must hold a JSON object", where=where)
    check_causal(config, where)
    cfg = _text_config(config)
    if not isinstance(cfg.get("model_type", ""), str):
        raise ModelError("config.json has a model_type that is not a string", where=where)
    model_type = cfg.get("model_type") or str(config.get("model_type") or "")
    archs = config.get("architectures") or cfg.get("architectures") or []
    architecture = str(archs[0]) if archs else model_type or "unknown"
    if any(k in cfg and cfg[k] for k in MOE_KEYS) and model_type not in LLAMA_TYPES | GEMMA_TYPES:
        raise ModelError(
            f"mixture-of-experts models ({architecture}) are not supported by the memory estimate",
            where=where,
            fix="Pick a dense model such as Llama, Mistral, Qwen or Gemma.",
        )
    notes: list[str] = []

    h = _get_int(cfg, "hidden_size", where, "n_embd", "d_model")
    layers = _get_int(cfg, "num_hidden_layers", where, "n_layer", "num_layers")
    heads = _get_int(cfg, "num_attention_heads", where, "n_head")
    kv_heads = cfg.get("num_key_value_heads") or heads
    if not isinstance(kv_heads, int) or kv_heads <= 0 or heads % kv_heads:
        raise ModelError(f"num_key_value_heads = {kv_heads!r} does not divide num_attention_heads = {heads}", where=where)
    head_dim = cfg.get("head_dim") or h // heads
    if not isinstance(head_dim, int) or head_dim <= 0:
        raise ModelError(f"head_dim = {head_dim!r} is not a positive whole number", where=where)
    inter = _get_int(cfg, "intermediate_size", where, "n_inner", "ffn_dim")
    vocab = _get_int(cfg, "vocab_size", where)
    context = cfg.get("max_position_embeddings") or cfg.get("n_positions") or 0
    tied = bool(cfg.get("tie_word_embeddings", model_type in GEMMA_TYPES))

    if model_type not in LLAMA_TYPES | GEMMA_TYPES | FUSED_TYPES:
        notes.append(f"model_type {model_type or 'unknown'!r} is not one the estimate knows; read as Llama-like")

    q_out, kv_out = heads * head_dim, kv_heads * head_dim
    attn_bias = bool(cfg.get("attention_bias", model_type in ("qwen2", "glm4")))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    # Qwen2 and GLM-4 put biases on q, k and v only; the others put attention_bias on o_proj too.
    o_bias = attn_bias and model_type not in ("qwen2", "glm4")
    if model_type in FUSED_QKV_TYPES:
        attention = (Linear("qkv_proj", h, q_out + 2 * kv_out, attn_bias, layers, "attn_in"),)
    else:
        attention = tuple(Linear(n, h, out, attn_bias, layers, "attn_in") for n, out in (("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)))
    attention += (Linear("o_proj", q_out, h, o_bias, layers, "attn_out"),)
    if model_type in FUSED_MLP_TYPES:
        mlp = (Linear("gate_up_proj", h, 2 * inter, mlp_bias, layers, "mlp_in"),)
    else:
        mlp = tuple(Linear(n, h, inter, mlp_bias, layers, "mlp_in") for n in ("gate_proj", "up_proj"))
    linears = attention + mlp + (Linear("down_proj", inter, h, mlp_bias, layers, "mlp_act"),)

    norms_per_layer = 4 if model_type in FOUR_NORM_TYPES else 2
    qk_norm = model_type in QK_NORM_TYPES or bool(cfg.get("use_qk_norm"))
    if model_type == "olmo2":
        # OLMo 2 normalises the whole q and k projections, not each head.
        qk_norm_params = q_out + kv_out
    else:
        qk_norm_params = 2 * head_dim if qk_norm else 0

    vision_linears, vision_other = _vision_tower(config.get("vision_config"), h)
    embedding = vocab * h
    head = 0 if tied else vocab * h
    norm = layers * (norms_per_layer * h + qk_norm_params) + h
    bias = sum(lin.out_features * lin.count for lin in (*linears, *vision_linears) if lin.bias)
    quantizable = sum(lin.params * lin.count for lin in linears)

    if vision_linears:
        notes.append("vision tower counted from vision_config (approximate); it does not run on text batches")
    softcap = cfg.get("final_logit_softcapping") if model_type in GEMMA_TYPES else None
    window = cfg.get("sliding_window") if isinstance(cfg.get("sliding_window"), int) else None
    if cfg.get("use_sliding_window") is False:  # Qwen2 declares a window it does not use
        window = None

    vision_q = sum(lin.params * lin.count for lin in vision_linears)
    unquantized = embedding + head + norm + bias + vision_other
    return ModelInfo(
        architecture=architecture,
        model_type=model_type,
        layers=layers,
        hidden_size=h,
        intermediate_size=inter,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=vocab,
        context_length=int(context) if isinstance(context, int) else 0,
        tie_word_embeddings=tied,
        param_count=quantizable + vision_q + unquantized,
        quantizable_params=quantizable + vision_q,
        unquantized_params=unquantized,
        embedding_params=embedding,
        head_params=head,
        norm_params=norm,
        bias_params=bias,
        linears=linears,
        norms_per_layer=norms_per_layer,
        qk_norm=qk_norm,
        qk_norm_full=model_type == "olmo2",
        final_logit_softcapping=float(softcap) if isinstance(softcap, (int, float)) and softcap else None,
        sliding_window=window,
        vision_linears=vision_linears,
        vision_other_params=vision_other,
        notes=tuple(notes),
    )


def _vision_tower(vision: Any, text_hidden: int) -> tuple[tuple[Linear, ...], int]:
    """A SigLIP-style vision tower's linear layers and its other parameters (Gemma 3's layout)."""
    if not isinstance(vision, dict):
        return (), 0
    vh, vi, vl = (vision.get(k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers"))
    if not all(isinstance(v, int) and v > 0 for v in (vh, vi, vl)):
        return (), 0
    linears = tuple(
        Linear(name, i, o, True, vl, f"vision_{name}")
        for name, i, o in (("q_proj", vh, vh), ("k_proj", vh, vh), ("v_proj", vh, vh), ("out_proj", vh, vh),
                           ("fc1", vh, vi), ("fc2", vi, vh))
    )
    patch = vision.get("patch_size") or 14
    image = vision.get("image_size") or 224
    positions = (image // patch) ** 2 if isinstance(image, int) and isinstance(patch, int) and patch else 0
    other = (
        3 * patch * patch * vh + vh + positions * vh  # patch embedding and positions
        + vl * 4 * vh + 2 * vh  # layer norms, the final norm
        + vh * text_hidden + vh  # the projection into the text model and its norm
    )
    if vision.get("vision_use_head", True):
        # attention-pooling head: probe, in/out projections, a norm and an MLP
        other += vh + 4 * vh * vh + 4 * vh + 2 * vh + 2 * vh * vi + vi + vh
    return linears, other


def linear_module_names(config: dict[str, Any]) -> list[str]:
    """The LoRA target candidates: the leaf names of the quantized linear layers, in model order."""
    info = describe(config)
    names = [lin.name for lin in info.linears]
    names += [lin.name for lin in info.vision_linears if lin.name not in names]
    return names

