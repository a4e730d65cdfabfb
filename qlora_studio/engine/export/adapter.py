"""The adapter format: PEFT's files as trained, the model card and the run's configuration."""

from __future__ import annotations

import shutil
from pathlib import Path

from ... import runs
from .card import CardInfo, write_card
from .merge import Progress
from .source import ADAPTER_CONFIG, ADAPTER_WEIGHTS, ExportSource

#: Tokenizer files a trainer may have saved next to the adapter; they travel with it.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")

CHUNK = 64 * 1024 * 1024


def copy_with_progress(src: Path, dst: Path, on_bytes=None) -> None:
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        while chunk := fin.read(CHUNK):
            fout.write(chunk)
            if on_bytes is not None:
                on_bytes(len(chunk))
    shutil.copystat(src, dst)


def files_to_copy(source: ExportSource) -> list[Path]:
    names = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, *TOKENIZER_FILES)
    return [source.adapter_dir / n for n in names if (source.adapter_dir / n).is_file()]


def estimate(source: ExportSource) -> int:
    return sum(p.stat().st_size for p in files_to_copy(source))


def copy_run_config(source: ExportSource, out: Path) -> None:
    if source.run_dir is not None and (source.run_dir / runs.CONFIG).is_file():
        shutil.copyfile(source.run_dir / runs.CONFIG, out / runs.CONFIG)


def write(source: ExportSource, out: Path, progress: Progress, include_paths: bool = False) -> list[str]:
    files = files_to_copy(source)
    total = max(sum(p.stat().st_size for p in files), 1)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        progress(0.95 * done / total, "copying the adapter")

    for path in files:
        copy_with_progress(path, out / path.name, advance)
    copy_run_config(source, out)
    progress(0.97, "writing the model card")
    write_card(out, source, CardInfo("adapter", [p.name for p in files], include_paths=include_paths))
    return [p.name for p in files]
