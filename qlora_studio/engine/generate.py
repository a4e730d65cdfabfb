"""Generation from a run (base + its adapter) or from a plain model, to see a result from a terminal."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import config as config_mod
from .. import runs
from ..errors import UserError
from . import device as devices
from .data import render_prompt
from .model import load_base, load_tokenizer, resolve_source


def adapter_of(run_dir: Path, checkpoint: int | None = None) -> Path:
    if checkpoint is not None:
        for step, path in runs.list_checkpoints(run_dir):
            if step == checkpoint:
                return path / runs.ADAPTER
        raise UserError(f"no checkpoint at step {checkpoint}", where=str(run_dir),
                        fix=f"Available: {', '.join(str(s) for s, _ in runs.list_checkpoints(run_dir)) or 'none'}.")
    if (run_dir / runs.ADAPTER).is_dir():
        return run_dir / runs.ADAPTER
    latest = runs.latest_checkpoint(run_dir)
    if latest is None:
        raise UserError("the run has no adapter and no checkpoint yet", where=str(run_dir), fix="Train it first.")
    return latest / runs.ADAPTER


def load_for_generation(target: str, use_adapter: bool = True, device_pref: str = "auto", checkpoint: int | None = None):
    """``target`` is a run folder (its config names the base) or a model folder / hub id."""
    path = Path(target)
    if (path / runs.CONFIG).is_file() and (path / runs.EVENTS).exists():
        cfg = config_mod.load(path / runs.CONFIG)
        source = resolve_source(cfg.model.name_or_path, path)
        adapter = adapter_of(path, checkpoint) if use_adapter else None
    else:
        cfg = config_mod.RunConfig()
        source = resolve_source(target)
        adapter = None
    device = devices.resolve_device(device_pref)
    dtype = devices.resolve_compute_dtype(cfg.quant.compute_dtype, device)
    tokenizer = load_tokenizer(source, cfg)
    model = load_base(source, cfg, device, dtype)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    return model, tokenizer


@torch.no_grad()
def generate(model, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
             chat: bool = True) -> str:
    text = render_prompt(tokenizer, [{"role": "user", "content": prompt}]) if chat else prompt
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False)
    out = model.generate(**enc, **kwargs)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
