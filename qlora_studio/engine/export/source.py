"""What an export starts from: a run folder (or a bare adapter folder), the adapter of its final
step or of a checkpoint, the run's configuration and history, and the base model's files.

Torch-free, so the GUI can list what is exportable without loading anything heavy.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ... import config as config_mod
from ... import events as ev
from ... import runs
from ...errors import UserError
from .errors import ExportError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

#: Files of a model folder that belong with merged weights (configuration, tokenizer, template).
MODEL_SIDE_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
    "chat_template.jinja", "chat_template.json",
)


@dataclass
class ExportSource:
    """Everything an exporter needs to know about where its input comes from."""

    adapter_dir: Path
    base_ref: str
    run_dir: Path | None = None
    checkpoint: int | None = None
    step: int | None = None
    cfg: config_mod.RunConfig | None = None
    summary: runs.RunSummary | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    _base_folder: Path | None = None

    @property
    def adapter_config(self) -> dict[str, Any]:
        return read_adapter_config(self.adapter_dir)

    @property
    def label(self) -> str:
        """A short name for files and titles: the run's folder name (and checkpoint)."""
        name = (self.run_dir or self.adapter_dir).name
        return f"{name}-step{self.checkpoint}" if self.checkpoint is not None else name

    def base_folder(self) -> Path:
        """The base model's local folder, found on first use (a hub id is looked up in the cache)."""
        if self._base_folder is None:
            revision = self.cfg.model.revision if self.cfg else "main"
            ref = self.base_ref
            if self.run_dir is not None and not Path(ref).expanduser().is_absolute() and (self.run_dir / ref).is_dir():
                ref = str(self.run_dir / ref)  # a path relative to the run folder
            self._base_folder = locate_base(ref, revision)
        return self._base_folder

    def base_weight_files(self) -> list[Path]:
        return weight_files(self.base_folder())


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_CONFIG
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError("no adapter_config.json", where=str(adapter_dir), fix="Pick a folder written by PEFT's save_pretrained.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"adapter_config.json is not valid JSON ({exc})", where=str(path)) from None
    if not isinstance(data, dict):
        raise ExportError("adapter_config.json must hold a JSON object", where=str(path))
    return data


def _checkpoint_adapter(run_dir: Path, checkpoint: int | str) -> tuple[int, Path]:
    found = runs.list_checkpoints(run_dir)
    available = ", ".join(str(step) for step, _ in found) or "none"
    if checkpoint == "latest":
        if not found:
            raise ExportError("the run has no checkpoint", where=str(run_dir), fix="Train it first.")
        step, path = found[-1]
        return step, path / runs.ADAPTER
    try:
        wanted = int(checkpoint)
    except (TypeError, ValueError):
        raise ExportError(f"--checkpoint {checkpoint!r} is not a step number", fix=f"Available steps: {available}.") from None
    for step, path in found:
        if step == wanted:
            return step, path / runs.ADAPTER
    raise ExportError(f"the run has no checkpoint at step {wanted}", where=str(run_dir), fix=f"Available steps: {available}.")


def resolve(run_dir: str | Path, checkpoint: int | str | None = None) -> ExportSource:
    """The export source for a run folder (final adapter or a checkpoint) or a bare adapter folder."""
    path = Path(run_dir).expanduser()
    if not path.is_dir():
        raise ExportError("folder not found", where=str(path), fix="Pass a run folder (it holds config.toml and events.jsonl).")
    path = path.resolve()
    if (path / ADAPTER_CONFIG).is_file() and not (path / runs.CONFIG).is_file():
        if checkpoint is not None:
            raise ExportError("--checkpoint needs a run folder, not an adapter folder", where=str(path))
        base = str(read_adapter_config(path).get("base_model_name_or_path") or "")
        if not base:
            raise ExportError("adapter_config.json names no base model", where=str(path / ADAPTER_CONFIG))
        return ExportSource(adapter_dir=path, base_ref=base)
    if not (path / runs.CONFIG).is_file():
        raise ExportError(
            "not a run folder (no config.toml) and not an adapter folder (no adapter_config.json)",
            where=str(path),
            fix="Pass the folder of a training run.",
        )
    try:
        cfg = config_mod.load(path / runs.CONFIG)
    except UserError as exc:
        raise ExportError(f"the run's configuration cannot be read ({exc.what})", where=exc.where, fix=exc.fix) from None
    summary = runs.summarize(path)
    history = list(ev.read(path / runs.EVENTS))
    if checkpoint is None:
        adapter = path / runs.ADAPTER
        if not (adapter / ADAPTER_CONFIG).is_file():
            steps = [str(s) for s, _ in runs.list_checkpoints(path)]
            fix = f"Export a checkpoint instead: --checkpoint {steps[-1]} (available: {', '.join(steps)})." if steps else "Train it first."
            raise ExportError(f"the run has no final adapter (status: {summary.status})", where=str(path), fix=fix)
        step = _final_step(history, summary)
        ckpt = None
    else:
        ckpt, adapter = _checkpoint_adapter(path, checkpoint)
        step = ckpt
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise ExportError("the checkpoint holds no adapter", where=str(adapter.parent))
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise ExportError(f"no {ADAPTER_WEIGHTS} in the adapter folder", where=str(adapter),
                          fix="Only safetensors adapters are exported; re-save it with safe_serialization=True.")
    base_ref = cfg.model.name_or_path or str(read_adapter_config(adapter).get("base_model_name_or_path") or "")
    return ExportSource(adapter_dir=adapter, base_ref=base_ref, run_dir=path, checkpoint=ckpt, step=step,
                        cfg=cfg, summary=summary, history=history)


def _final_step(history: list[dict[str, Any]], summary: runs.RunSummary) -> int | None:
    for event in reversed(history):
        if event.get("type") == "finished" and isinstance(event.get("step"), int):
            return event["step"]
    return summary.step or None


def locate_base(ref: str, revision: str = "main") -> Path:
    """A local model folder as is; a hub id from the local cache, downloaded only when allowed."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ExportError("the base model folder no longer exists", where=ref,
                          fix="Merging needs the original base weights: restore the folder or fix model.name_or_path in the run's config.toml.")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(ref, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception as exc:  # noqa: BLE001 - every failure means "not in the cache"
        cached_error = exc
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ExportError(f"the base model {ref} is not in the local Hugging Face cache ({type(cached_error).__name__})",
                          fix="Unset HF_HUB_OFFLINE to download it, or point model.name_or_path to a local copy.")
    try:
        return Path(snapshot_download(ref, revision=revision, allow_patterns=patterns))
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"cannot get the base model {ref} ({type(exc).__name__}: {exc})".splitlines()[0],
                          fix="Check the network and the model id, or point model.name_or_path to a local copy.") from None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors shards of a model folder, in index order."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as exc:
            raise ExportError(f"the weight index is unreadable ({exc})", where=str(index)) from None
        files = []
        for name in weight_map.values():
            if name not in files:
                files.append(name)
        paths = [folder / name for name in sorted(files)]
    else:
        paths = sorted(folder.glob("*.safetensors"))
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise ExportError(f"a weight file is missing: {missing[0].name}", where=str(folder), fix="Download the model again.")
    if not paths:
        pickled = sorted(folder.glob("*.bin"))
        fix = "Convert the base model to safetensors first." if pickled else "The folder must hold the model's weights."
        raise ExportError("the base model has no safetensors weights", where=str(folder), fix=fix)
    return paths


def model_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExportError("the base model folder has no config.json", where=str(folder)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"config.json is not valid JSON ({exc})", where=str(path)) from None
