"""The engine: model loading, data, the training loop, checkpoints, export and estimates.

It uses torch, transformers, peft, bitsandbytes and datasets, and never Qt. This ``__init__``
imports nothing, so torch-free modules (``modelinfo``, ``estimate``) stay cheap to import from the
GUI at start-up.
"""
