"""`qlora-studio doctor`: what this machine offers for QLoRA training, with reasons for what is missing."""

from __future__ import annotations

import platform
import sys
from typing import Any


def _item(ok: bool, value: Any, reason: str = "") -> dict[str, Any]:
    return {"ok": ok, "value": value, "reason": reason}


def report() -> dict[str, dict[str, Any]]:
    checks: dict[str, dict[str, Any]] = {}
    checks["python"] = _item(sys.version_info >= (3, 11), platform.python_version(),
                             "" if sys.version_info >= (3, 11) else "Python 3.11 or newer is needed")
    try:
        import torch
    except ImportError as exc:
        checks["torch"] = _item(False, "missing", str(exc))
        return checks
    checks["torch"] = _item(True, torch.__version__)
    cuda = torch.cuda.is_available()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        checks["cuda"] = _item(True, torch.version.cuda)
        checks["gpu"] = _item(True, f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute {props.major}.{props.minor}")
        checks["bf16"] = _item(torch.cuda.is_bf16_supported(), torch.cuda.is_bf16_supported(),
                               "" if torch.cuda.is_bf16_supported() else "this GPU computes in fp16 instead")
    else:
        reason = "this torch build has no CUDA" if torch.version.cuda is None else "no NVIDIA GPU or driver found"
        checks["cuda"] = _item(False, "unavailable", reason + "; training runs on the CPU")
        checks["gpu"] = _item(False, "none", reason)
        from .engine.device import cpu_supports_bf16

        bf16 = cpu_supports_bf16()
        checks["bf16"] = _item(bf16, f"{bf16} (CPU)", "" if bf16 else "the CPU computes in fp32")
    try:
        import bitsandbytes as bnb

        backends = "cuda" if cuda else "cpu"
        checks["bitsandbytes"] = _item(True, f"{bnb.__version__} ({backends} backend)")
    except Exception as exc:  # bitsandbytes can fail at import with many error types
        checks["bitsandbytes"] = _item(False, "unavailable", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    try:
        import pynvml

        pynvml.nvmlInit()
        checks["nvml"] = _item(True, f"driver {pynvml.nvmlSystemGetDriverVersion()}, {pynvml.nvmlDeviceGetCount()} GPU(s)")
        pynvml.nvmlShutdown()
    except ImportError:
        checks["nvml"] = _item(False, "unavailable", "nvidia-ml-py is not installed")
    except Exception as exc:
        checks["nvml"] = _item(False, "unavailable", f"no NVIDIA driver ({type(exc).__name__})")
    try:
        import cupti  # noqa: F401

        checks["cupti"] = _item(cuda, "cupti-python installed", "" if cuda else "no CUDA GPU to profile")
    except ImportError:
        checks["cupti"] = _item(False, "unavailable", "cupti-python is not installed (pip install 'qlora-studio[cupti]')")
    return checks
