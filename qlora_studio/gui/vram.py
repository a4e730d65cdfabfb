"""The Training page's GPU memory line: the torch-free estimate (``engine/estimate.py``) of the
settings on screen, against the GPU that NVML reports (if any)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import config as cfgmod

GiB = 1024**3
VERDICTS = {"fits": "fits", "tight": "is tight", "does_not_fit": "does not fit"}


@dataclass
class GpuMemory:
    name: str
    total: int
    free: int


def read_gpu() -> GpuMemory | None:
    """The first GPU's memory from NVML, or None (no driver, no GPU). Runs on a background thread."""
    try:
        from ..engine.estimate import gpu_memory
    except ImportError:
        return None
    found = gpu_memory()
    return GpuMemory(*found) if found else None


def describe(info: Any, cfg: cfgmod.RunConfig, gpu: GpuMemory | None) -> tuple[str, int | None]:
    """A few lines for the page and the estimated peak in bytes (for the monitor's reference line)."""
    from ..engine import estimate

    result = estimate.estimate(info, cfg, gpu.total if gpu else None, gpu.free if gpu else None)
    head = f"Estimated GPU memory: {result.peak / GiB:.2f} GiB at the peak ({result.phase})"
    if result.paged:
        head += f", plus {result.paged / GiB:.2f} GiB of paged optimizer state"
    lines = [head + "."]
    if gpu is not None and result.verdict:
        lines.append(f"On {gpu.name} it {VERDICTS.get(result.verdict, result.verdict)}: {result.reason}.")
    elif gpu is None:
        lines.append("No NVIDIA GPU found: this is what the run would need on one.")
    lines += [s.text for s in result.suggestions]
    lines += [f"Note: {note}." for note in result.notes]
    return "\n".join(lines), result.peak
