"""QLoRA Studio: point-and-click QLoRA fine-tuning of causal language models.

Layers (enforced by import-linter contracts in pyproject.toml):

* plain: ``config``, ``events``, ``formats``, ``errors``, ``runs`` -- no torch, no Qt;
* ``engine`` -- model loading, data, training loop, checkpoints, export, estimates (torch, never Qt);
* ``monitor`` -- NVML and CUPTI readers (no Qt);
* ``gui`` -- the only package that imports PySide6; it imports no torch at start-up;
* ``cli`` -- the command line, beside them.
"""

__version__ = "0.1.0"
