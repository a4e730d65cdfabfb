"""Exports of a training run: the PEFT adapter, a merged 16-bit model, and GGUF files for llama.cpp.

:func:`export` is the one entry point (the command line, the GUI's worker and the tests use it).
Each format checks the free disk space against its size estimate before writing, never replaces
an existing folder unless ``overwrite=True``, and writes atomically (``staging.py``): a folder with
the final name only ever holds a complete export.

This ``__init__`` imports no torch, so ``qlora_studio.cli`` can build its parser cheaply; the
format modules are imported when an export runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .errors import ExportError

FORMATS = ("adapter", "merged", "gguf")
MERGE_BASES = ("original", "dequantized")
GGUF_DTYPES = ("f16", "bf16", "q8_0")

Progress = Callable[[float, str], None]

__all__ = ["FORMATS", "GGUF_DTYPES", "MERGE_BASES", "ExportError", "default_out", "default_out_for", "export"]


def _silent(fraction: float, message: str) -> None:
    return None


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ExportError(f"{name} {value!r} is not a valid choice", fix=f"Use one of: {', '.join(choices)}.")


def default_out_for(folder: str | Path, fmt: str, gguf_dtype: str = "f16", checkpoint: int | None = None,
                    is_run: bool = True) -> Path:
    """``RUN_DIR/exports/<format>[-<dtype>][-step<N>]`` for a run; ``<ADAPTER>-<format>...`` beside a
    bare adapter folder. Torch-free, for the GUI."""
    name = f"gguf-{gguf_dtype}" if fmt == "gguf" else fmt
    if checkpoint is not None:
        name += f"-step{checkpoint}"
    folder = Path(folder)
    return folder / "exports" / name if is_run else folder.parent / f"{folder.name}-{name}"


def default_out(source, fmt: str, gguf_dtype: str = "f16") -> Path:
    if source.run_dir is not None:
        return default_out_for(source.run_dir, fmt, gguf_dtype, source.checkpoint)
    return default_out_for(source.adapter_dir, fmt, gguf_dtype, source.checkpoint, is_run=False)


def export(
    run_dir: str | Path,
    fmt: str,
    out: str | Path | None = None,
    checkpoint: int | str | None = None,
    progress: Progress | None = None,
    overwrite: bool = False,
    merge_base: str = "original",
    gguf_dtype: str = "f16",
    *,
    include_paths: bool = False,
    gguf_include_base: bool = False,
) -> Path:
    """Export a run (or a bare adapter folder) and return the output folder.

    ``fmt``: ``adapter`` (PEFT files, card, config), ``merged`` (a 16-bit Hugging Face model) or
    ``gguf`` (merged model and LoRA adapter as GGUF, plus an Ollama Modelfile). ``checkpoint``: a
    step number or ``"latest"``; the final adapter when None. ``progress(fraction, message)`` is
    called as the export advances. ``merge_base``: ``original`` 16-bit weights or ``dequantized``
    NF4 weights (see merge.py). ``include_paths`` keeps local paths in the model card.
    ``gguf_include_base`` also writes the base model as GGUF, to use with the GGUF adapter.
    """
    from . import source as source_mod
    from .staging import check_free_space, check_target, staged_folder

    _check_choice("format", fmt, FORMATS)
    _check_choice("merge base", merge_base, MERGE_BASES)
    _check_choice("GGUF type", gguf_dtype, GGUF_DTYPES)
    progress = progress or _silent
    src = source_mod.resolve(run_dir, checkpoint)
    target = Path(out).expanduser().resolve() if out is not None else default_out(src, fmt, gguf_dtype)
    check_target(target, overwrite)
    progress(0.0, "preparing")

    if fmt == "adapter":
        from . import adapter

        check_free_space(target.parent, adapter.estimate(src))
        with staged_folder(target, overwrite=overwrite) as staging:
            adapter.write(src, staging, progress, include_paths=include_paths)
    elif fmt == "merged":
        from . import merged

        with merged.open_plan(src, merge_base) as plan:
            check_free_space(target.parent, merged.estimate(plan))
            with staged_folder(target, overwrite=overwrite) as staging:
                merged.write(src, plan, staging, progress, include_paths=include_paths)
    else:
        from . import gguf_export

        with gguf_export.open_plan(src, merge_base, gguf_dtype, include_base=gguf_include_base) as plan:
            check_free_space(target.parent, plan.estimate())
            with staged_folder(target, overwrite=overwrite) as staging:
                plan.write(staging, progress, include_paths=include_paths)
    progress(1.0, f"exported to {target}")
    return target
