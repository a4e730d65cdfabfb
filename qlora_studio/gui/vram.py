"""The GPU memory estimate of the settings on screen: the torch-free estimator
(``engine/estimate.py``) against the GPU that NVML reports (if any).

Both functions run on background threads (:class:`~qlora_studio.gui.jobs.FunctionJob`): NVML may
take a moment to initialise, and an estimate with suggestions takes tens to hundreds of
milliseconds, too long for the GUI thread while a person types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import config as cfgmod


@dataclass
class GpuMemory:
    name: str
    total: int
    free: int


def read_gpu() -> GpuMemory | None:
    """The first GPU's memory from NVML, or None (no driver, no GPU)."""
    try:
        from ..engine.estimate import gpu_memory
    except ImportError:
        return None
    found = gpu_memory()
    return GpuMemory(*found) if found else None


def compute(info: Any, cfg: cfgmod.RunConfig, gpu: GpuMemory | None) -> Any:
    """The ``engine.estimate.Estimate`` of ``cfg`` on the model ``info``, with a verdict and
    suggestions against ``gpu`` when there is one. Raises UserError for settings it cannot judge."""
    from ..engine import estimate

    return estimate.estimate(info, cfg, gpu.total if gpu else None, gpu.free if gpu else None)
