"""Loading a causal LM with a frozen 4-bit base and LoRA adapters on its linear layers.

Unlike PEFT's ``prepare_model_for_kbit_training`` this keeps embeddings, the output head and the
norms in the compute dtype: casting them to fp32 doubles their memory (about 2 GB more on an 8B
model with a 128k vocabulary) and makes the output-head product run in fp32.
"""

from __future__ import annotations

import inspect
import json
import logging
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ALL_LINEAR, RunConfig
from ..errors import ModelError
from ..formats import HUB_ID, expand_user, path_exists
from .device import triton_runs

log = logging.getLogger(__name__)

SAFE_WEIGHTS = ("*.safetensors",)
PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")


@dataclass
class ModelInfo:
    name: str
    architecture: str
    params: int
    trainable_params: int
    quantized_layers: int
    lora_layers: int
    target_modules: list[str]
    #: the GPU-only paths in use (engine/offload.py, fused kernels), for the run's record
    fast_paths: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def resolve_source(name_or_path: str, base_dir: Path | None = None) -> str:
    """A local folder (relative paths resolve against ``base_dir``) or a hub id, unchanged."""
    p = expand_user(name_or_path)
    if not p.is_absolute() and base_dir is not None and path_exists(base_dir / p):
        return str((base_dir / p).resolve())
    if path_exists(p):
        return str(p.resolve())
    if name_or_path.startswith((".", "/", "~")) or HUB_ID.fullmatch(name_or_path) is None:
        raise ModelError("model folder not found", where=name_or_path, fix="Check the path, or give a hub id such as org/name.")
    return name_or_path


def check_local_model(folder: Path, allow_pickle: bool, *, trust_remote_code: bool = False) -> None:
    """Clear errors for a local folder that cannot be a loadable model, before anything is loaded."""
    if not folder.is_dir():
        raise ModelError("not a folder", where=str(folder), fix="Pick the folder that holds config.json and the weights.")
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ModelError("no config.json in the model folder", where=str(folder), fix="Pick the folder that holds config.json and the weights.")
    try:
        cfg = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelError(f"config.json is not valid JSON ({exc})", where=str(cfg_file)) from None
    except OSError as exc:
        raise ModelError(f"cannot read config.json ({exc.strerror or exc})", where=str(cfg_file),
                         fix="Check that the model's files are readable.") from None
    if not isinstance(cfg, dict):
        raise ModelError("config.json must hold a JSON object", where=str(cfg_file))
    safe = [p for pat in SAFE_WEIGHTS for p in folder.glob(pat)]
    pickled = [p for pat in PICKLE_WEIGHTS for p in folder.glob(pat)]
    if not safe and not pickled:
        raise ModelError("the model folder has no weights (*.safetensors)", where=str(folder), fix="Download or copy the model's weight files into it.")
    if not safe and not allow_pickle:
        raise ModelError(
            "the model's weights are pickle files (.bin), which can run code when loaded",
            where=str(folder),
            fix="Convert them to safetensors, or allow it for this model with model.allow_pickle_weights = true.",
        )
    check_causal(cfg, str(cfg_file))
    shapes = weight_shapes(folder) if safe else {}
    if "auto_map" in cfg:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

        if trust_remote_code:
            return  # its configuration class is the model's own code, which only the loader runs
        if cfg.get("model_type") not in CONFIG_MAPPING_NAMES:
            raise ModelError(
                "the model is defined by its own code (config.json's auto_map), which runs only with your consent",
                where=str(cfg_file),
                fix="Read that code; if you trust it, allow it for this model with model.trust_remote_code = true.",
            )
        # A model type transformers implements itself: loaded with that implementation, no code of the model's.
    config = _model_config(folder, cfg_file, trust_remote_code)
    if shapes and "quantization_config" not in cfg:  # pre-quantized weights are packed: other shapes
        check_shapes(config, shapes, cfg_file, trust_remote_code)


def _model_config(folder: Path, cfg_file: Path, trust_remote_code: bool):
    """transformers' configuration object, with its own validation (types, head counts, model type)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - config classes validate with many exception types
        detail = " ".join(str(exc).split())  # validation errors put the reason on their second line
        detail = detail if len(detail) <= 240 else detail[:239] + "…"
        raise ModelError(f"config.json is not a valid model configuration ({detail or type(exc).__name__})", where=str(cfg_file),
                         fix="Download or copy the model's config.json again.") from None


_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|block|layer)\.(\d+)\.")


def check_shapes(config, shapes: dict[str, tuple[int, ...]], cfg_file: Path, trust_remote_code: bool = False) -> None:
    """The weights must have the shapes config.json describes.

    The model is built on the meta device (no memory) and its tensors compared with the headers of
    the weights, by name; names that differ (checkpoints the loader renames) are left to the loader.
    An absurd layer count is refused before building anything, so building stays cheap.
    """
    from transformers import AutoModelForCausalLM

    layers = getattr(config, "num_hidden_layers", None)
    found = {int(m.group(1)) for name in shapes for m in [_LAYER_INDEX.search(name)] if m}
    if isinstance(layers, int) and found and not 1 <= layers <= max(found) + 1:
        raise ModelError(f"config.json describes {layers} layers; the weights hold {max(found) + 1}", where=str(cfg_file),
                         fix="The config.json belongs to another model: copy the model's own files again.")
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # whatever the model's constructor raises, the loader would too
        if trust_remote_code:  # the model's own code may not build on the meta device: leave it to the loader
            log.debug("could not build %s on the meta device to check its shapes", cfg_file, exc_info=True)
            return
        raise ModelError(f"config.json describes a model that cannot be built ({type(exc).__name__}: {first_line(exc)})",
                         where=str(cfg_file), fix="Download or copy the model's config.json again.") from None
    wrong = [(name, tuple(t.shape), shapes[name]) for name, t in model.state_dict().items()
             if name in shapes and tuple(t.shape) != shapes[name]]
    if wrong:
        name, expected, actual = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ModelError(
            f"the weights do not match config.json: {name} is {list(actual)} in the weights, config.json implies "
            f"{list(expected)}{more}",
            where=str(cfg_file),
            fix="The config.json belongs to another model: copy the model's own files again.",
        )


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers will load: the shards an index names, or model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, OSError):
            weight_map = None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ModelError("the weights index is not valid (it needs a weight_map of tensor names to files)", where=str(index),
                             fix="Download or copy the model's files again.")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"the weights index names {len(missing)} missing file(s): {', '.join(missing[:3])}",
                             where=str(index), fix="Download or copy the missing weight files into the model folder.")
        return files
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def weight_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors headers (nothing is read beyond them).

    A truncated or overwritten file fails here, naming the file, instead of deep inside the loader.
    """
    from safetensors import SafetensorError, safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(folder):
        try:
            with safe_open(str(path), framework="pt") as fh:
                for name in fh.keys():  # noqa: SIM118 - a safetensors file, not a dict
                    shapes[name] = tuple(fh.get_slice(name).get_shape())
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"the weights file is damaged or incomplete ({first_line(exc)})", where=str(path),
                             fix="Download or copy the file again.") from None
    return shapes


def check_causal(cfg: dict[str, Any], where: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise ModelError(f"config.json's architectures must be a list of names, found {archs!r:.80}", where=where,
                         fix='Use e.g. "architectures": ["LlamaForCausalLM"].')
    if model_type is not None and not isinstance(model_type, str):
        raise ModelError(f"config.json's model_type must be a name, found {model_type!r:.80}", where=where,
                         fix='Use e.g. "model_type": "llama".')
    if any(str(a).endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for a in archs):
        return
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not archs:
        return
    raise ModelError(
        f"not a causal language model (architecture {', '.join(map(str, archs)) or model_type or 'unknown'})",
        where=where,
        fix="QLoRA Studio fine-tunes decoder models such as Llama, Mistral or Qwen (…ForCausalLM).",
    )


def linear4bit_names(model: torch.nn.Module) -> list[str]:
    """The distinct leaf names of the quantized linear layers (the output head is never quantized)."""
    import bitsandbytes as bnb

    names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    return sorted(names)


def load_tokenizer(source: str, cfg: RunConfig):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as exc:  # noqa: BLE001 - tokenizer files and the config.json it reads fail in many ways
        raise ModelError(f"cannot load the tokenizer ({first_line(exc)})", where=source, fix="The model folder needs its tokenizer files.") from None
    if tok.pad_token is None:
        # Padding is masked out of the loss and the attention; any existing token will do.
        tok.pad_token = tok.eos_token or tok.unk_token
    if tok.pad_token is None:
        raise ModelError("the tokenizer has neither a pad nor an end-of-sequence token", where=source)
    tok.padding_side = "right"
    return tok


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def quantization_config(cfg: RunConfig, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=cfg.quant.quant_type,
        bnb_4bit_use_double_quant=cfg.quant.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def load_base(source: str, cfg: RunConfig, device: torch.device, dtype: torch.dtype, *, quantize: bool = True,
              check: bool = True):
    """The frozen base model: 4-bit NF4/FP4 through bitsandbytes, everything else in ``dtype``.

    ``check=False``: the caller has already run :func:`check_local_model` on a local folder.
    """
    from huggingface_hub.errors import StrictDataclassError
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    local = Path(source).is_dir()
    if local and check:
        check_local_model(Path(source), cfg.model.allow_pickle_weights, trust_remote_code=cfg.model.trust_remote_code)
    device_map = {"": device.index if device.type == "cuda" else "cpu"}
    kwargs: dict[str, Any] = dict(
        revision=cfg.model.revision,
        dtype=dtype,
        device_map=device_map,
        trust_remote_code=cfg.model.trust_remote_code,
        attn_implementation=cfg.model.attn_implementation,
        use_safetensors=None if cfg.model.allow_pickle_weights else True,
    )
    if quantize:
        kwargs["quantization_config"] = quantization_config(cfg, dtype)
    try:
        model, loading = AutoModelForCausalLM.from_pretrained(source, output_loading_info=True, **kwargs)
    except ModelError:
        raise
    except torch.cuda.OutOfMemoryError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError, AttributeError, TypeError, SafetensorError, StrictDataclassError,
            pickle.UnpicklingError, EOFError) as exc:  # the last two: a damaged .bin (allow_pickle_weights)
        msg = first_line(exc)
        fix = "Check that the folder holds a complete model whose config matches its weights."
        if "trust_remote_code" in str(exc):
            fix = "This model needs its own code; allow it for this model with model.trust_remote_code = true."
        raise ModelError(f"cannot load the model ({msg})", where=source, fix=fix) from None
    missing = sorted(loading.get("missing_keys") or [])
    if missing:
        # transformers would train on with these tensors randomly initialised (and unquantized).
        raise ModelError(f"the weights lack {len(missing)} tensor(s) that config.json describes (first: {missing[0]})",
                         where=source, fix="Download or copy the model's weight files again.")
    if not local:
        check_causal(model.config.to_dict(), source)
    model.config.use_cache = False
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def attach_lora(model, cfg: RunConfig):
    """LoRA on the configured linear layers (all quantized linear layers by default)."""
    from peft import LoraConfig, get_peft_model

    available = linear4bit_names(model)
    wanted = cfg.lora.target_modules
    if ALL_LINEAR in wanted:
        targets = available
    else:
        unknown = [m for m in wanted if m not in available]
        if unknown:
            raise ModelError(
                f"lora.target_modules names {', '.join(unknown)}, which the model does not have",
                where=cfg.model.name_or_path,
                fix=f"Its linear layers are: {', '.join(available)} (or use \"{ALL_LINEAR}\").",
            )
        targets = list(wanted)
    if not targets:
        raise ModelError("the model has no quantized linear layers to put LoRA on", where=cfg.model.name_or_path)
    import bitsandbytes as bnb

    widest = max(min(m.in_features, m.out_features) for name, m in model.named_modules()
                 if isinstance(m, bnb.nn.Linear4bit) and name.rsplit(".", 1)[-1] in targets)
    if cfg.lora.r > widest:
        # An update of a layer cannot have a rank above its width; PEFT would allocate it anyway.
        raise ModelError(f"lora.r = {cfg.lora.r} is larger than every target layer allows (at most {widest} here)",
                         where=cfg.model.name_or_path, fix="Use e.g. lora.r = 16 or 64.")
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if cfg.train.fused_lora:
        from .lora_kernels import fuse_lora_layers

        fuse_lora_layers(model)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing. transformers also hooks the embeddings so their output
        # requires grad (needed only by reentrant checkpointing); engine/estimate.py counts that.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, targets


def load_model(cfg: RunConfig, device: torch.device, dtype: torch.dtype, base_dir: Path | None = None):
    """Base (4-bit) + LoRA + tokenizer, ready to train. Returns ``(model, tokenizer, info)``."""
    source = resolve_source(cfg.model.name_or_path, base_dir)
    if Path(source).is_dir():
        # Before the tokenizer, which reads config.json too: a broken one is reported as such.
        check_local_model(Path(source), cfg.model.allow_pickle_weights, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer = load_tokenizer(source, cfg)
    base = load_base(source, cfg, device, dtype, check=False)
    quantized = count_linear4bit(base)
    model, targets = attach_lora(base, cfg)
    fast = gpu_fast_paths(model, cfg, device)
    lora_layers = sum(1 for _, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(param_count(p) for p in model.parameters())
    arch = (getattr(base.config, "architectures", None) or [type(base).__name__])[0]
    info = ModelInfo(cfg.model.name_or_path, arch, total, trainable, quantized, lora_layers, targets, fast)
    return model, tokenizer, info


def gpu_fast_paths(model, cfg: RunConfig, device: torch.device) -> list[str]:
    """Switch on what runs only on a GPU; returns their names. None of them changes the arithmetic."""
    if device.type != "cuda":
        return []
    from . import offload

    used = []
    # liger-kernel's kernels are written in Triton
    if cfg.train.fused_kernels and triton_runs(device) and fused_kernels(model.get_base_model()):
        used.append("fused_kernels")
    # Before the checkpoints: offload.mlp_tile weighs the memory the model keeps on the GPU.
    moved = cfg.train.embeddings_on_cpu and offload.embeddings_on_cpu(model.get_base_model())
    if cfg.train.gradient_checkpointing and cfg.train.offload_checkpoints:
        layers, graphs = offload.use_offloaded_checkpointing(
            model, cuda_graphs=cfg.train.cuda_graphs, max_tokens=cfg.train.micro_batch_size * cfg.data.max_seq_len)
        if layers:
            used.append("offload_checkpoints")
            # Its checkpoint makes a layer's output need a gradient whatever its input: the hook
            # that makes the embeddings' output need one is not needed, and would keep that output
            # (and later its gradient) on the GPU, and compute the first layer's input gradient.
            model.get_base_model().disable_input_require_grads()
        if graphs is not None:
            used.append("cuda_graphs")
            model.layer_graphs = graphs  # for the benchmark's memory figure (the graphs' pool)
    if moved:
        used.append("embeddings_on_cpu")
    if used:
        log.info("GPU paths: %s", ", ".join(used))
    return used


def fused_kernels(model) -> bool:
    """liger-kernel's RMSNorm, SwiGLU and RoPE for the model's architecture, when it is installed."""
    try:
        from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN
    except ImportError:
        return False
    except Exception as exc:  # noqa: BLE001 - a broken install: train without it, and say so
        log.warning("liger-kernel failed to load (%s); training without its fused kernels", first_line(exc))
        return False
    apply = MODEL_TYPE_TO_APPLY_LIGER_FN.get(getattr(model.config, "model_type", None))
    if apply is None:
        return False
    wanted = dict(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=False)
    accepted = inspect.signature(apply).parameters
    kwargs = {k: v for k, v in wanted.items() if k in accepted}
    try:
        apply(model=model, **kwargs)
    except NotImplementedError as exc:
        # GLM-4 has no fused RoPE; liger says so before patching anything, and the model trains
        # with transformers' own layers (as engine/estimate.py's FUSED_KERNELS assumes).
        log.info("liger-kernel's kernels do not cover %s (%s)", model.config.model_type, first_line(exc))
        return False
    return True


def count_linear4bit(model) -> int:
    import bitsandbytes as bnb

    return sum(1 for m in model.modules() if isinstance(m, bnb.nn.Linear4bit))


def param_count(p: torch.Tensor) -> int:
    """Logical parameter count: a packed 4-bit tensor holds two values per byte."""
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    if shape is not None:
        return int(torch.Size(shape).numel())
    return p.numel()
