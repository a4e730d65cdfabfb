"""The model card (README.md) and loss-curve picture that go with every export.

The card says what the export is and how it was made: base model, dataset, configuration,
steps, final training and evaluation loss, which base weights a merge used and why that matters,
and the library versions of the training and of the export. Local paths are reduced to their last
component unless ``include_paths`` is set, so a card can be published as is.

The loss curve is drawn with matplotlib's Agg renderer (no GUI toolkit, safe in a worker process).
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ... import __version__
from .source import ExportSource

LOSS_CURVE = "loss_curve.png"
CARD = "README.md"

LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "safetensors", "gguf")

MERGE_NOTES = {
    "original": (
        "The adapter was merged into the base model's **original 16-bit weights**. The adapter was "
        "trained against the 4-bit NF4 version of those weights, so this model differs from the one "
        "evaluated during training by the quantization error of the base; in exchange, the base "
        "keeps its full 16-bit quality (this is what PEFT's merge does for a 16-bit model). Export "
        "with `--merge-base dequantized` to reproduce the trained model exactly."
    ),
    "dequantized": (
        "The adapter was merged into the **dequantized NF4 weights**: every layer that was 4-bit "
        "during training was quantized and dequantized again with bitsandbytes, then the LoRA update "
        "was added. This reproduces the model that was trained and evaluated, including the 4-bit "
        "quantization error of the base, stored in 16-bit form. Merging into the original 16-bit "
        "weights (`--merge-base original`, the default) keeps the base's full precision instead."
    ),
}


@dataclass
class CardInfo:
    """What an exporter adds to the card beyond the run itself."""

    fmt: str
    files: list[str] = field(default_factory=list)
    merge: dict[str, Any] | None = None
    gguf: dict[str, Any] | None = None
    include_paths: bool = False


def library_versions() -> dict[str, str]:
    versions = {"qlora-studio": __version__}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def display_ref(ref: str, include_paths: bool) -> str:
    """A hub id as is; a local path as its last component unless paths are wanted."""
    if not ref:
        return "unknown"
    path = Path(ref).expanduser()
    local = path.is_absolute() or ref.startswith((".", "~")) or path.exists()
    if not local or include_paths:
        return ref
    return f"{path.name} (local)"


def is_hub_id(ref: str) -> bool:
    return bool(ref) and not Path(ref).expanduser().exists() and not ref.startswith((".", "/", "~")) and ref.count("/") <= 1


def loss_history(source: ExportSource) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """Training and evaluation losses up to the exported step; a resumed run's repeated steps keep
    their latest value."""
    limit = source.step if source.checkpoint is not None else None
    train: dict[int, float] = {}
    evals: dict[int, float] = {}
    for event in source.history:
        kind, step, loss = event.get("type"), event.get("step"), event.get("loss")
        if not isinstance(step, int) or not isinstance(loss, (int, float)) or (limit is not None and step > limit):
            continue
        if kind == "step":
            train[step] = float(loss)
        elif kind == "eval":
            evals[step] = float(loss)
    return sorted(train.items()), sorted(evals.items())


def draw_loss_curve(path: Path, train: list[tuple[int, float]], evals: list[tuple[int, float]], title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 3.6), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="#9ecae1", linewidth=1, label="training loss")
        if len(losses) >= 20:
            smooth, value = [], losses[0]
            for loss in losses:
                value = 0.9 * value + 0.1 * loss
                smooth.append(value)
            ax.plot(steps, smooth, color="#08519c", linewidth=1.8, label="training loss (smoothed)")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, color="#d94801", marker="o", markersize=3, linewidth=1.5, label="evaluation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", metadata={"Software": None})


def _fmt_loss(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def _table(rows: list[tuple[str, Any]]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return lines


def write_card(folder: Path, source: ExportSource, info: CardInfo) -> None:
    """Write README.md (and loss_curve.png when the run logged losses) into ``folder``."""
    train, evals = loss_history(source)
    if train or evals:
        draw_loss_curve(folder / LOSS_CURVE, train, evals, f"{source.label}: loss")
    (folder / CARD).write_text(render_card(source, info, has_curve=bool(train or evals)), encoding="utf-8")


def render_card(source: ExportSource, info: CardInfo, has_curve: bool) -> str:
    train, evals = loss_history(source)
    cfg = source.cfg
    adapter_cfg = source.adapter_config
    base = display_ref(source.base_ref, info.include_paths)
    dataset = display_ref(cfg.data.path, info.include_paths) if cfg else "unknown"
    kind = {"adapter": "LoRA adapter", "merged": "merged model", "gguf": "GGUF model and LoRA adapter"}[info.fmt]

    front = ["---", "library_name: " + {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}[info.fmt],
             "pipeline_tag: text-generation", "tags:", "- qlora", "- lora", "- qlora-studio"]
    if info.fmt == "gguf":
        front.append("- gguf")
    if is_hub_id(source.base_ref):
        front.append(f"base_model: {source.base_ref}")
    front.append("---")

    lines = front + ["", f"# {source.label} — {kind}", "",
                     f"A QLoRA fine-tune of **{base}**, trained and exported with QLoRA Studio {__version__}.", ""]

    origin = "final adapter" if source.checkpoint is None else f"checkpoint at step {source.checkpoint}"
    status = source.summary.status if source.summary else "unknown"
    max_steps = source.summary.max_steps if source.summary and source.summary.max_steps else None
    steps = "unknown" if source.step is None else (f"{source.step} of {max_steps}" if max_steps else str(source.step))
    lines += ["## Training", ""]
    lines += _table([
        ("Base model", base),
        ("Dataset", dataset),
        ("Exported", origin),
        ("Steps", steps),
        ("Run status", status),
        ("Final training loss", _fmt_loss(train[-1][1] if train else None)),
        ("Final evaluation loss", _fmt_loss(evals[-1][1] if evals else None)),
    ])
    if has_curve:
        lines += ["", f"![Training loss]({LOSS_CURVE})"]

    lines += ["", "## Configuration", ""]
    targets = adapter_cfg.get("target_modules")
    if isinstance(targets, list):  # PEFT may save full module paths; the layer names are what matter
        targets = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets}))
    rows: list[tuple[str, Any]] = [
        ("LoRA rank / alpha / dropout", f"{adapter_cfg.get('r')} / {adapter_cfg.get('lora_alpha')} / {adapter_cfg.get('lora_dropout')}"),
        ("LoRA target modules", f"`{targets}`"),
    ]
    if cfg:
        t = cfg.train
        rows += [
            ("Base quantization", (f"{cfg.quant.quant_type.upper()}, double quantization "
                                   f"{'on' if cfg.quant.double_quant else 'off'}, compute dtype {cfg.quant.compute_dtype}")),
            ("Optimizer", (f"{t.optimizer}, learning rate {t.learning_rate:g} ({t.schedule}, {t.warmup_steps} warm-up steps), "
                           f"weight decay {t.weight_decay:g}, max grad norm {t.max_grad_norm:g}")),
            ("Batch", f"{t.micro_batch_size} × {t.grad_accum_steps} gradient accumulation = {t.micro_batch_size * t.grad_accum_steps} sequences per step"),
            ("Sequence length", (f"{cfg.data.max_seq_len} tokens, data format {cfg.data.format}, "
                                 f"loss on {'prompt and response' if cfg.data.train_on_prompt else 'responses only'}")),
            ("Seed", t.seed),
        ]
    lines += _table(rows)
    lines += ["", "The full configuration is in `config.toml`." if cfg else ""]

    if info.merge:
        lines += ["", "## Merge", "", MERGE_NOTES[info.merge["merge_base"]], "",
                  f"Weights are stored in {info.merge['dtype']}; {info.merge['lora_modules']} LoRA modules were merged."]
    if info.gguf:
        g = info.gguf
        lines += ["", "## GGUF files", "",
                  f"* `{g['model']}` — the merged model ({g['dtype']}, llama.cpp architecture `{g['arch']}`).",
                  (f"* `{g['adapter']}` — the LoRA adapter alone, for llama.cpp's `--lora` on a {g['dtype']} GGUF "
                   f"of the base model" + (f" (`{g['base']}`)." if g.get("base") else "."))]
        lines += ["* `Modelfile` — for Ollama: `ollama create NAME -f Modelfile`."]
        if g.get("default_template"):
            lines += ["", ("The base tokenizer has no chat template; the model was trained with QLoRA Studio's default "
                           "prompt format (`### User:` / `### Assistant:`), which the GGUF carries as its chat template.")]
        for warning in g.get("warnings", []):
            lines += ["", f"**Note:** {warning}."]
        lines += ["",
                  "```sh", f"llama-cli -m {g['model']} -p \"Hello\"", "```"]
    lines += ["", "## Usage", ""] + _usage(info, source)

    lines += ["", "## Versions", ""]
    trained = {}
    for event in source.history:
        if event.get("type") == "run_started" and isinstance(event.get("versions"), dict):
            trained = event["versions"]
    exported = library_versions()
    names = list(dict.fromkeys([*exported, *trained]))
    lines += ["| library | training | export |", "|---|---|---|"]
    lines += [f"| {n} | {trained.get(n, '—')} | {exported.get(n, '—')} |" for n in names]
    return "\n".join(lines).rstrip() + "\n"


def _usage(info: CardInfo, source: ExportSource) -> list[str]:
    base = source.base_ref if is_hub_id(source.base_ref) else "PATH/TO/BASE_MODEL"
    if info.fmt == "adapter":
        return ["```python", "from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{base}")',
                'model = PeftModel.from_pretrained(base, "PATH/TO/THIS/FOLDER")', "```"]
    if info.fmt == "merged":
        return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                'model = AutoModelForCausalLM.from_pretrained("PATH/TO/THIS/FOLDER")',
                'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/THIS/FOLDER")', "```"]
    g = info.gguf or {}
    return ["```python", "from llama_cpp import Llama", "",
            f'llm = Llama(model_path="{g.get("model", "model.gguf")}")', "```"]
