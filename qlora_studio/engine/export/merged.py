"""The merged format: a Hugging Face model folder with the LoRA update merged into 16-bit weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .adapter import copy_run_config
from .card import CardInfo, write_card
from .merge import MergePlan, Progress, estimate_merged_bytes, write_merged_model
from .source import ExportSource


@contextmanager
def open_plan(source: ExportSource, merge_base: str) -> Iterator[MergePlan]:
    plan = MergePlan(source, merge_base)
    try:
        yield plan
    finally:
        plan.close()


def estimate(plan: MergePlan) -> int:
    return estimate_merged_bytes(plan)


def write(source: ExportSource, plan: MergePlan, out: Path, progress: Progress, include_paths: bool = False) -> None:
    files = write_merged_model(plan, out, lambda f, m: progress(0.97 * f, m))
    copy_run_config(source, out)
    progress(0.98, "writing the model card")
    write_card(out, source, CardInfo("merged", [p.name for p in files], merge=plan.describe(), include_paths=include_paths))
