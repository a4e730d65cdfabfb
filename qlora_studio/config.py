"""The run configuration: one typed, validated object, read and written as TOML.

Sections: ``model``, ``quant``, ``lora``, ``data``, ``train``, ``output``. The defaults are the QLoRA
paper's recipe (Dettmers et al. 2023): NF4 with double quantization, bf16 compute where supported,
LoRA r=64 / alpha=16 / dropout 0.05 on every linear layer except the output head, paged AdamW
32-bit, learning rate 2e-4 with a constant schedule, max grad norm 0.3, gradient checkpointing,
loss on the responses only.

Every section validates itself when it is built (like PEFT's config dataclasses), so an object of
these classes is always valid. :func:`load` reports an unknown or invalid key with the key, the file
and the valid choices.

Plain Python: no torch, no Qt.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from .errors import ConfigError, lookup_path

ALL_LINEAR = "all-linear"

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", "bfloat16", "float16", "float32")
DATA_FORMATS = ("auto", "alpaca", "chat", "sharegpt", "prompt_completion", "text")
SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("paged_adamw_32bit", "paged_adamw_8bit", "adamw_32bit", "adamw_torch")
DEVICES = ("auto", "cuda", "cpu")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
LOSS_IMPLS = ("standard", "chunked")
SEED_MAX = 2**32 - 1  # numpy's and most seeding functions' range
MAX_EPOCHS = 1_000_000  # beyond any real plan; epochs x examples must stay a finite number of steps


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"{name} = {value!r} is not a valid choice",
            fix=f"Valid choices: {', '.join(choices)}.",
        )


def _positive(name: str, value: float, *, allow_zero: bool = False) -> None:
    _finite(name, value)
    if allow_zero and value < 0 or not allow_zero and value <= 0:
        bound = "at least 0" if allow_zero else "greater than 0"
        raise ConfigError(f"{name} = {value!r} must be {bound}", fix=f"Set {name} to a number {bound}.")


def _finite(name: str, value: float) -> None:
    # TOML has nan and inf; no setting means anything with them (and nan passes every comparison).
    if not math.isfinite(value):
        raise ConfigError(f"{name} = {value!r} must be a finite number", fix=f"Set {name} to a number.")


def _between(name: str, value: float, low: float, high: float, *, high_open: bool = False, fix: str = "") -> None:
    _finite(name, value)
    if value < low or value > high or (high_open and value == high):
        bound = f"in [{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{name} = {value!r} must be {bound}", fix=fix or f"Set {name} to a number {bound}.")


@dataclass
class ModelConfig:
    """Which model to fine-tune: a local folder or a Hugging Face hub id."""

    name_or_path: str = ""
    revision: str = "main"
    trust_remote_code: bool = False
    allow_pickle_weights: bool = False
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        _choice("model.attn_implementation", self.attn_implementation, ATTENTION)


@dataclass
class QuantConfig:
    """How the frozen base weights are stored: 4-bit NF4 or FP4, with or without double quantization."""

    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"

    def __post_init__(self) -> None:
        _choice("quant.quant_type", self.quant_type, QUANT_TYPES)
        _choice("quant.compute_dtype", self.compute_dtype, COMPUTE_DTYPES)


@dataclass
class LoraConfig:
    """The trainable low-rank adapters."""

    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: [ALL_LINEAR])

    def __post_init__(self) -> None:
        _positive("lora.r", self.r)
        _positive("lora.alpha", self.alpha)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout = {self.dropout!r} must be in [0, 1)", fix="Use e.g. 0.05.")
        if not self.target_modules:
            raise ConfigError("lora.target_modules is empty", fix=f'Use ["{ALL_LINEAR}"] or module names such as "q_proj".')


@dataclass
class DataConfig:
    """The dataset: a local file or a hub dataset id, its format and how it is split."""

    path: str = ""
    format: str = "auto"
    columns: dict[str, str] = field(default_factory=dict)
    split: str = "train"
    max_seq_len: int = 1024
    train_on_prompt: bool = False
    val_fraction: float = 0.0
    val_path: str = ""
    shuffle_seed: int = 0

    def __post_init__(self) -> None:
        _choice("data.format", self.format, DATA_FORMATS)
        _positive("data.max_seq_len", self.max_seq_len)
        _between("data.shuffle_seed", self.shuffle_seed, 0, SEED_MAX)
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction = {self.val_fraction!r} must be in [0, 1)", fix="Use e.g. 0.05, or 0 for none.")
        valid_roles = ("instruction", "input", "output", "messages", "conversations", "prompt", "completion", "text", "system")
        for key in self.columns:
            if key not in valid_roles:
                raise ConfigError(f"data.columns has an unknown role {key!r}", fix=f"Valid roles: {', '.join(valid_roles)}.")


@dataclass
class TrainConfig:
    """The training loop's hyperparameters."""

    micro_batch_size: int = 4
    grad_accum_steps: int = 4
    max_steps: int = 1000
    epochs: float = 0.0
    learning_rate: float = 2e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    optimizer: str = "paged_adamw_32bit"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 0.3
    gradient_checkpointing: bool = True
    seed: int = 42
    eval_every: int = 0
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    #: a `step` event every this many steps; 0 = every step up to 1,000, then thinning so that a
    #: long run's event log grows only logarithmically (about 4,000 events for 20,000 steps)
    log_every: int = 0
    device: str = "auto"
    loss_impl: str = "chunked"
    #: compute each 4-bit linear layer and its adapter in one fused function (engine/lora_kernels.py)
    fused_lora: bool = True
    #: on a GPU, gradient checkpointing keeps each layer's input in pinned CPU memory instead of on
    #: the card (engine/offload.py); the same arithmetic, copies overlap with compute. A Llama-style
    #: layer's MLP then runs on 2,048 tokens at a time where its intermediate is large (offload.mlp_tile)
    offload_checkpoints: bool = True
    #: on a GPU, an untied input embedding stays in pinned CPU memory and only the rows a step
    #: uses are copied over (1 GiB less on an 8B model); exact
    embeddings_on_cpu: bool = True
    #: on a GPU with liger-kernel installed, fused Triton kernels for RMSNorm, SwiGLU and RoPE
    #: (the same formulas, computed in one pass)
    fused_kernels: bool = True
    #: paged_adamw_32bit as one fused AdamW kernel call per step over states in one paged buffer
    #: (engine/optim.py), instead of bitsandbytes' kernel per parameter; the same arithmetic
    fused_optimizer: bool = True
    #: on a GPU, with offload_checkpoints, each checkpointed layer's forward and backward are
    #: recorded once per input shape as CUDA graphs and replayed (engine/layer_graphs.py): the same
    #: kernels without the host's per-kernel cost
    cuda_graphs: bool = True
    #: CUPTI's unified-memory counters: the paged optimizer's page moves per phase (GPU only)
    paging_counters: bool = True

    def __post_init__(self) -> None:
        _positive("train.micro_batch_size", self.micro_batch_size)
        _positive("train.grad_accum_steps", self.grad_accum_steps)
        _positive("train.max_steps", self.max_steps, allow_zero=True)
        _between("train.epochs", self.epochs, 0, MAX_EPOCHS, fix="Use e.g. 1 to 3, or train.max_steps.")
        if self.max_steps == 0 and self.epochs == 0:
            raise ConfigError("train.max_steps and train.epochs are both 0", fix="Set one of them.")
        _positive("train.learning_rate", self.learning_rate)
        _between("train.learning_rate", self.learning_rate, 0, 1, fix="QLoRA uses about 1e-4 to 2e-4.")
        _choice("train.schedule", self.schedule, SCHEDULES)
        _positive("train.warmup_steps", self.warmup_steps, allow_zero=True)
        _choice("train.optimizer", self.optimizer, OPTIMIZERS)
        _positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _positive("train.max_grad_norm", self.max_grad_norm, allow_zero=True)
        for name in ("adam_beta1", "adam_beta2"):
            _between(f"train.{name}", getattr(self, name), 0, 1, high_open=True, fix="Use e.g. 0.9 and 0.999.")
        _between("train.seed", self.seed, 0, SEED_MAX)
        for name in ("eval_every", "checkpoint_every", "log_every"):
            _positive(f"train.{name}", getattr(self, name), allow_zero=True)
        _positive("train.keep_checkpoints", self.keep_checkpoints)
        _choice("train.device", self.device, DEVICES)
        _choice("train.loss_impl", self.loss_impl, LOSS_IMPLS)


@dataclass
class OutputConfig:
    """Where runs are written. Paths are relative to the configuration file's folder."""

    runs_dir: str = "runs"
    run_name: str = ""

    def __post_init__(self) -> None:
        if "\x00" in self.runs_dir:
            raise ConfigError("output.runs_dir contains a NUL character", fix="Set it to a folder path.")
        name = self.run_name
        if name and (name in (".", "..") or any(c in name for c in "/\\\x00") or len(name.encode("utf-8", "surrogatepass")) > 200):
            raise ConfigError(
                f"output.run_name = {name[:60]!r} is not a plain folder name",
                fix="Use a name without / or \\, not . or .., of at most 200 bytes (or leave it empty for a timestamp).",
            )


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        import tomli_w

        return tomli_w.dumps(self.to_dict())

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_toml(), encoding="utf-8")
        tmp.replace(path)

    def require_complete(self, source: str = "config") -> None:
        """Check what a run needs beyond valid values: a model and a dataset."""
        if not self.model.name_or_path.strip():
            raise ConfigError("model.name_or_path is empty", where=source, fix="Set it to a model folder or a hub id.")
        if not self.data.path.strip():
            raise ConfigError("data.path is empty", where=source, fix="Set it to a dataset file or a hub dataset id.")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "quant": QuantConfig,
    "lora": LoraConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "output": OutputConfig,
}


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return ``value`` as type ``hint`` or raise a ConfigError naming ``key``."""
    origin = getattr(hint, "__origin__", None)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} = {value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} = {value!r} must be a whole number")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} = {value!r} must be a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} = {value!r} must be a string")
        return value
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key} = {value!r} must be a list of strings")
        return list(value)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise ConfigError(f"{key} = {value!r} must be a table of strings")
        return dict(value)
    return value


def from_dict(data: dict[str, Any], source: str = "config") -> RunConfig:
    """Build a validated :class:`RunConfig`; errors name the key, the source and the valid choices."""
    if not isinstance(data, dict):
        raise ConfigError("the configuration must be a table of sections", where=source)
    sections: dict[str, Any] = {}
    for name, value in data.items():
        if name not in SECTIONS:
            raise ConfigError(
                f"unknown section [{name}]",
                where=source,
                fix=f"Valid sections: {', '.join(SECTIONS)}.",
            )
        if not isinstance(value, dict):
            raise ConfigError(f"[{name}] must be a table", where=source)
        cls = SECTIONS[name]
        hints = get_type_hints(cls)
        kwargs = {}
        for key, item in value.items():
            if key not in hints:
                raise ConfigError(
                    f"unknown key {name}.{key}",
                    where=source,
                    fix=f"Valid keys in [{name}]: {', '.join(hints)}.",
                )
            try:
                kwargs[key] = _check_type(f"{name}.{key}", item, hints[key])
            except ConfigError as exc:
                exc.where = source
                raise ConfigError(exc.what, where=source, fix=exc.fix) from None
        try:
            sections[name] = cls(**kwargs)
        except ConfigError as exc:
            raise ConfigError(exc.what, where=source, fix=exc.fix) from None
    return RunConfig(**sections)


def loads(text: str, source: str = "config") -> RunConfig:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML ({exc})", where=source, fix="Check the quoting and brackets on that line.") from None
    return from_dict(data, source)


def load(path: str | Path) -> RunConfig:
    path = Path(path)
    if not lookup_path(path, ConfigError):
        raise ConfigError("configuration file not found", where=str(path), fix="Check the path, or write one with `qlora-studio demo DIR`.")
    if path.is_dir():
        raise ConfigError("is a folder, not a configuration file", where=str(path), fix="Pass the path of a config.toml.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError("not a UTF-8 text file", where=str(path), fix="Save the configuration as UTF-8 TOML.") from None
    except OSError as exc:
        raise ConfigError(f"cannot read the file ({exc.strerror or exc})", where=str(path),
                          fix="Check that the file is readable.") from None
    return loads(text, str(path))


def replace(cfg: RunConfig, **sections: dict[str, Any]) -> RunConfig:
    """A copy of ``cfg`` with some keys changed, validated again: ``replace(cfg, train={"max_steps": 5})``."""
    data = cfg.to_dict()
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return from_dict(data, "override")
