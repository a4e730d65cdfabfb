"""Session-wide fixtures: one tiny run per architecture, built once (a few seconds each)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from .builders import build_adapter, build_model, sample_ids, write_run

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@dataclass
class TinyRun:
    root: Path
    model: Path
    run: Path
    sample: torch.Tensor
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # adapter seed -> in-memory logits


def _tiny_run(root: Path, arch: str, chat_template: str | None = None, spm: bool = False) -> TinyRun:
    model = build_model(root / "model", arch, chat_template=chat_template, spm=spm)
    tiny = TinyRun(root, model, root / "run", sample_ids())

    def make_adapter(folder: Path, seed: int) -> None:
        tiny.logits[seed] = build_adapter(model, folder, seed=seed, sample=tiny.sample)

    write_run(tiny.run, model, make_adapter)
    return tiny


@pytest.fixture(scope="session")
def llama_run(tmp_path_factory) -> TinyRun:
    return _tiny_run(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="session")
def mistral_run(tmp_path_factory) -> TinyRun:
    # Mistral's tokenizer is SentencePiece-style BPE: the GGUF's "llama" tokenizer path.
    return _tiny_run(tmp_path_factory.mktemp("mistral"), "mistral", spm=True)


@pytest.fixture(scope="session")
def qwen2_run(tmp_path_factory) -> TinyRun:
    from .builders import CHAT_TEMPLATE

    return _tiny_run(tmp_path_factory.mktemp("qwen2"), "qwen2", chat_template=CHAT_TEMPLATE)
