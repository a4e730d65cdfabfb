"""Shared fixtures: everything offline, tiny models built here, never downloaded."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_template(tmp_path_factory) -> Path:
    """The offline demo (tiny Llama, tokenizer, data, config), built once per session."""
    from qlora_studio.engine.demo import build_demo

    folder = tmp_path_factory.mktemp("demo-template")
    build_demo(folder)
    return folder


@pytest.fixture
def demo(demo_template, tmp_path) -> Path:
    """A private copy of the demo that a test may change."""
    folder = tmp_path / "demo"
    shutil.copytree(demo_template, folder)
    return folder
