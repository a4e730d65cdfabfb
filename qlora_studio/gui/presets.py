"""Named settings for the Training page's preset list.

A preset is a partial configuration (``{section: {key: value}}``) laid over the current one with
:func:`qlora_studio.config.replace`, so model and dataset choices survive picking a preset.
"""

from __future__ import annotations

from typing import Any

from .. import config as cfgmod

Preset = dict[str, dict[str, Any]]

CUSTOM = "Custom"


def _paper() -> Preset:
    """The QLoRA paper's recipe: the configuration's own defaults (see config.py)."""
    defaults = cfgmod.RunConfig()
    return {
        "quant": {"quant_type": defaults.quant.quant_type, "double_quant": defaults.quant.double_quant},
        "lora": {"r": defaults.lora.r, "alpha": defaults.lora.alpha, "dropout": defaults.lora.dropout,
                 "target_modules": list(defaults.lora.target_modules)},
        "data": {"max_seq_len": defaults.data.max_seq_len},
        "train": {
            "micro_batch_size": defaults.train.micro_batch_size,
            "grad_accum_steps": defaults.train.grad_accum_steps,
            "max_steps": defaults.train.max_steps,
            "learning_rate": defaults.train.learning_rate,
            "schedule": defaults.train.schedule,
            "warmup_steps": defaults.train.warmup_steps,
            "optimizer": defaults.train.optimizer,
            "max_grad_norm": defaults.train.max_grad_norm,
            "gradient_checkpointing": defaults.train.gradient_checkpointing,
            "checkpoint_every": defaults.train.checkpoint_every,
        },
    }


def _quick_demo() -> Preset:
    """The demo's own settings (engine/demo.py): every question is trained on, so that afterwards the
    playground can show the fine-tuned model answering all of them. (A held-out split of the demo
    could not be learned: its evaluation loss would only rise.)"""
    from ..engine.demo import DEMO_SETTINGS  # a torch-free module

    return {
        "lora": dict(DEMO_SETTINGS["lora"]),
        "data": {"max_seq_len": DEMO_SETTINGS["data"]["max_seq_len"], "val_fraction": 0.0},
        "train": {**DEMO_SETTINGS["train"], "eval_every": 0},
    }


PRESETS: dict[str, Preset] = {
    # Trains the demo model on the sample data in a few minutes on a laptop CPU.
    "Quick demo": _quick_demo(),
    "QLoRA paper": _paper(),
    # Large models on small GPUs: one example per pass, 8-bit paged optimizer state, shorter
    # sequences, a smaller adapter; the effective batch stays 16 through accumulation.
    "Low VRAM": {
        "quant": {"quant_type": "nf4", "double_quant": True},
        "lora": {"r": 16, "alpha": 16.0, "dropout": 0.05},
        "data": {"max_seq_len": 512},
        "train": {
            "micro_batch_size": 1,
            "grad_accum_steps": 16,
            "optimizer": "paged_adamw_8bit",
            "gradient_checkpointing": True,
            "learning_rate": 2e-4,
            "max_grad_norm": 0.3,
        },
    },
}


def apply(cfg: cfgmod.RunConfig, name: str) -> cfgmod.RunConfig:
    return cfgmod.replace(cfg, **PRESETS[name])


def matching(cfg: cfgmod.RunConfig) -> str:
    """The first preset whose every value the configuration has, else :data:`CUSTOM`."""
    data = cfg.to_dict()
    for name, preset in PRESETS.items():
        if all(data[section].get(key) == value for section, values in preset.items() for key, value in values.items()):
            return name
    return CUSTOM
