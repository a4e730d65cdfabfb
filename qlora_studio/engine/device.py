"""Where training runs and in which dtype it computes."""

from __future__ import annotations

import torch

from ..errors import ConfigError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def triton_runs(device: torch.device) -> bool:
    """Whether Triton kernels (the engine's and liger-kernel's) run on ``device``: a CUDA GPU of the
    Turing generation (sm_75) or newer."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (7, 5)


def kernel_failed(off: list[str], exc: BaseException, logger, message: str) -> None:
    """An engine Triton kernel failed (to build: it fails before it runs). Record why in ``off``, its
    module's switch to the fallback for the rest of the run, and warn once with ``message % why``.

    Running out of GPU memory for its output is not the kernel's failure: that error goes on to the
    caller (the trainer retries with a smaller micro-batch) and the kernel stays on."""
    if isinstance(exc, torch.OutOfMemoryError):
        raise exc
    from .model import first_line

    off.append(f"{type(exc).__name__}: {first_line(exc)}")
    logger.warning(message, off[0])


def resolve_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(
                "train.device = 'cuda' but no CUDA GPU is available",
                fix="Set train.device to 'auto' or 'cpu', or check the NVIDIA driver (`qlora-studio doctor`).",
            )
        import os

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def cpu_supports_bf16() -> bool:
    try:
        a = torch.ones(8, 8, dtype=torch.bfloat16)
        return bool(torch.isfinite((a @ a).float()).all())
    except (RuntimeError, TypeError):
        return False


def resolve_compute_dtype(preference: str, device: torch.device) -> torch.dtype:
    """bf16 where supported; fp16 on GPUs without bf16; fp32 on a CPU without bf16."""
    if preference != "auto":
        dtype = DTYPES[preference]
        if device.type == "cuda" and dtype is torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ConfigError(
                "quant.compute_dtype = 'bfloat16' but this GPU has no bf16 support",
                fix="Use 'float16' or 'auto'.",
            )
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def describe(device: torch.device, dtype: torch.dtype) -> dict:
    info = {"kind": device.type, "index": device.index, "compute_dtype": str(dtype).replace("torch.", "")}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=props.name,
            total_memory=props.total_memory,
            capability=f"{props.major}.{props.minor}",
            bf16=torch.cuda.is_bf16_supported(),
        )
    else:
        import platform

        info.update(name=platform.processor() or platform.machine(), bf16=dtype is torch.bfloat16)
    return info


def memory_stats(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"mem_allocated": None, "mem_reserved": None, "mem_peak": None}
    return {
        "mem_allocated": torch.cuda.memory_allocated(device),
        "mem_reserved": torch.cuda.memory_reserved(device),
        "mem_peak": torch.cuda.max_memory_allocated(device),
    }
