"""Checkpoints, written atomically: a temporary folder is filled and synced, then renamed.

A checkpoint folder ``checkpoints/step-XXXXXXXX`` exists only once it is complete, so a worker
killed at any moment leaves the previous checkpoint as the latest loadable one. It holds the
adapter (PEFT format), the optimizer and scheduler states, the RNG states and the trainer state
(step, data position, tokens, batch shape) as JSON, which is written last.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from .. import runs
from ..errors import UserError

TMP_PREFIX = ".tmp-"


class CheckpointError(UserError):
    kind = "checkpoint_failed"


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def clean_temporary(run_dir: Path) -> None:
    root = run_dir / runs.CHECKPOINTS
    if root.is_dir():
        for child in root.iterdir():
            if child.name.startswith(TMP_PREFIX):
                shutil.rmtree(child, ignore_errors=True)


#: A write that fails with less than this free in the run folder's file system is taken for a full disk:
#: torch.save and safetensors report it in their own words ("unexpected pos ...", "I/O error"), not as ENOSPC.
NEARLY_FULL = 16 * 1024 * 1024


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _disk_full(exc: BaseException, free: int | None) -> bool:
    """True when a failed write is the disk being full: ENOSPC anywhere in the chain, or (nearly) no space left."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cause = cause.__cause__ or cause.__context__
    # A writer's error (not a programming error such as a TypeError) with hardly any space left.
    writer_error = isinstance(exc, (OSError, RuntimeError)) or type(exc).__name__ == "SafetensorError"
    return writer_error and free is not None and free < NEARLY_FULL


def save(run_dir: Path, model, optimizer, scheduler, trainer_state: dict[str, Any], keep: int) -> Path:
    root = run_dir / runs.CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = runs.checkpoint_name(trainer_state["step"])
    final = root / name
    tmp = root / f"{TMP_PREFIX}{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        model.save_pretrained(tmp / runs.ADAPTER, safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state()}, tmp / "state.pt")
        (tmp / runs.STATE).write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
        _fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except Exception as exc:  # noqa: BLE001 - a full disk is OSError from Python, RuntimeError from torch.save,
        # SafetensorError from safetensors: whatever the writer, the checkpoint is not written.
        free = _free_bytes(root)  # before the partial checkpoint is removed, which frees its space again
        shutil.rmtree(tmp, ignore_errors=True)
        previous = runs.latest_checkpoint(run_dir)
        if _disk_full(exc, free):
            reason = "No space left on device" + (f", {free / 1e6:.1f} MB free" if free is not None else "")
        else:
            reason = getattr(exc, "strerror", None) or (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(
            f"could not write the checkpoint at step {trainer_state['step']} ({reason})",
            where=str(root),
            fix=f"Free disk space and resume; the previous checkpoint {previous.name if previous else '(none)'} is intact.",
        ) from None
    prune(run_dir, keep)
    return final


def prune(run_dir: Path, keep: int) -> None:
    found = runs.list_checkpoints(run_dir)
    for _, path in found[: max(0, len(found) - keep)]:
        shutil.rmtree(path, ignore_errors=True)


def load(checkpoint: Path, model, optimizer, scheduler) -> dict[str, Any]:
    """Restore adapter weights, optimizer, scheduler and RNG; return the trainer state."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = checkpoint / runs.ADAPTER / "adapter_model.safetensors"
    # The adapter's own device: a frozen embedding may wait in CPU memory (engine/offload.py).
    weights = load_file(str(adapter), device=str(next(p.device for p in model.parameters() if p.requires_grad)))
    result = set_peft_model_state_dict(model, weights)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
    if missing:
        raise CheckpointError(f"the checkpoint's adapter does not match the model ({missing[0]})", where=str(checkpoint))
    optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location="cpu", weights_only=True))
    extra = torch.load(checkpoint / "state.pt", map_location="cpu", weights_only=True)
    scheduler.load_state_dict(extra["scheduler"])
    set_rng_state(extra["rng"])
    return runs.read_state(checkpoint)
