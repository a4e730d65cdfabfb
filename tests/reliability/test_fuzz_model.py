"""Fuzzing model folders: a damaged folder is refused with a ModelError naming it (or the file in it),
or it loads and trains.

Damage: missing, truncated or overwritten files (weights, config.json, tokenizer), a config.json that
does not match the weights, non-causal architectures, tokenizers without a pad token or with chat
templates that work, refuse conversations or do not parse, pickle weights, tensors dropped or added.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_studio import config
from qlora_studio.errors import UserError

from . import fuzzkit
from .model_damage import apply, damages, family

FUZZ = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}
damage_lists = st.lists(damages, min_size=1, max_size=2)


def _damaged_copy(demo_template: Path, tmp: str, ops: list[tuple]) -> tuple[Path, dict]:
    folder = Path(tmp) / "model"
    shutil.copytree(demo_template / "model", folder)
    return folder, apply(folder, ops)


def _check_where(err: UserError, folder: Path) -> None:
    assert err.where.startswith(str(folder)), err.one_line()


@settings(max_examples=fuzzkit.examples(80), **FUZZ)
@given(ops=damage_lists)
def test_a_damaged_model_folder_is_checked_or_named(demo_template, ops):
    """The cheap checks that run before a run folder exists: config.json, weights' headers, shapes, tokenizer."""
    from qlora_studio.engine.demo import demo_config
    from qlora_studio.engine.model import check_local_model, load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        folder, extra = _damaged_copy(demo_template, tmp, ops)
        allow = extra.get("allow_pickle_weights", False)
        outcome = fuzzkit.call(f"model folder: {family(ops)}", check_local_model, folder, allow)
        if isinstance(outcome, UserError):
            _check_where(outcome, folder)
            return
        cfg = config.replace(demo_config(), model={"name_or_path": str(folder), "allow_pickle_weights": allow})
        tokenizer = fuzzkit.call(f"model folder: {family(ops)}", load_tokenizer, str(folder), cfg)
        if isinstance(tokenizer, UserError):
            _check_where(tokenizer, folder)
        else:
            assert tokenizer.pad_token is not None


@settings(max_examples=fuzzkit.examples(6), **FUZZ)
@given(ops=damage_lists)
def test_a_damaged_model_folder_loads_and_tokenizes_or_is_named(demo_template, ops):
    """What the worker does before the first step: 4-bit base, LoRA, tokenizer, the demo data."""
    import torch

    from qlora_studio.engine.data import load_dataset
    from qlora_studio.engine.demo import demo_config
    from qlora_studio.engine.model import load_model

    def load(cfg):
        _model, tokenizer, _info = load_model(cfg, torch.device("cpu"), torch.bfloat16)
        return load_dataset(cfg.data, tokenizer)

    with tempfile.TemporaryDirectory() as tmp:
        folder, extra = _damaged_copy(demo_template, tmp, ops)
        cfg = config.replace(demo_config(), model={"name_or_path": str(folder), **extra},
                             data={"path": str(demo_template / "data.jsonl")})
        outcome = fuzzkit.call(f"model folder, loaded: {family(ops)}", load, cfg)
        if isinstance(outcome, UserError) and not outcome.where.startswith(str(demo_template)):
            _check_where(outcome, folder)


@settings(max_examples=fuzzkit.examples(3), **FUZZ)
@given(ops=damage_lists)
def test_cli_train_accepts_or_exits_2_on_a_damaged_model_folder(demo_template, ops):
    with tempfile.TemporaryDirectory() as tmp:
        folder, extra = _damaged_copy(demo_template, tmp, ops)
        config_path = fuzzkit.demo_config_file(demo_template, Path(tmp), model={"name_or_path": str(folder), **extra})
        run_dir = Path(tmp) / "run"
        result = fuzzkit.cli("train", config_path, "--output", run_dir, "--max-steps", "1")
        outcome = fuzzkit.check_cli_outcome(result, run_dir, where=str(folder))
        fuzzkit.tally(f"command line: model folder: {family(ops)}", outcome)
