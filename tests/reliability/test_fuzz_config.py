"""Fuzzing the configuration: any TOML text is a valid RunConfig or a ConfigError naming the file.

A configuration that ``config.loads`` accepts must also be usable: it survives a round trip through
TOML, and the training loop's optimizer, schedule, step plan and seeds take its values without an
exception (an accepted value the engine then rejects would be an internal error, exit code 1).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import tomllib
from pathlib import Path
from typing import get_type_hints

import numpy as np
import tomli_w
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_studio import config
from qlora_studio.engine.demo import DEMO_SETTINGS
from qlora_studio.errors import ConfigError

from . import fuzzkit

FUZZ = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
SOURCE = "fuzz.toml"

toml_scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.sampled_from([0, 1, -1, 2**31, 2**32, 2**53 + 1, 10**15]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e300, 0.999999, 1.0]),
    st.text(max_size=30),
    st.sampled_from(["", " ", "auto", "nf4", "cpu", "cuda", "all-linear", "paged_adamw_8bit", "cosine", "\x00", "a" * 5000]),
    st.dates(), st.datetimes(), st.times(),
)
toml_values = st.recursive(toml_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(min_size=1, max_size=8), inner, max_size=3),
), max_leaves=6)

KEYS = [(section, f.name) for section, cls in config.SECTIONS.items() for f in dataclasses.fields(cls)]
HINTS = {(section, name): hint for section, cls in config.SECTIONS.items() for name, hint in get_type_hints(cls).items()}
CHOICES = st.sampled_from([c for group in (config.QUANT_TYPES, config.COMPUTE_DTYPES, config.DATA_FORMATS, config.SCHEDULES,
                                           config.OPTIMIZERS, config.DEVICES, config.ATTENTION, config.LOSS_IMPLS) for c in group])


def typed_values(hint) -> st.SearchStrategy:
    """Values of the key's own type, mostly at or beyond the edges of its range."""
    if hint is bool:
        return st.booleans()
    if hint is int:
        return st.one_of(st.integers(-3, 3), st.sampled_from([2**31, 2**32, 2**63 - 1, -(2**63)]),
                         st.integers(-(2**63), 2**63 - 1))
    if hint is float:
        return st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e-12, 1e308, math.inf, -math.inf, math.nan]),
                         st.floats(allow_nan=True, allow_infinity=True))
    if hint is str:
        return st.one_of(CHOICES, st.text(max_size=20))
    if getattr(hint, "__origin__", None) is list:
        return st.lists(st.text(max_size=10), max_size=3)
    return st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=2)


#: Values for a run that really trains: no absurd sizes (a valid micro-batch of 10**9 is refused by no
#: rule, and would only exhaust the memory of the machine running the tests).
small_values = st.one_of(
    st.booleans(), st.integers(-3, 64), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "auto", "nf4", "fp4", "cpu", "cuda", "all-linear", "q_proj", "adamw_torch", "cosine", "alpaca"]),
    st.lists(st.sampled_from(["q_proj", "all-linear", "nope"]), max_size=2),
)


@st.composite
def mutated_demo(draw, values=toml_values) -> str:
    """The demo's settings with keys set to random values, unknown keys and sections added, or removed."""
    data: dict = {section: dict(values) for section, values in DEMO_SETTINGS.items()}

    def table(section: str) -> dict:
        if not isinstance(data.get(section), dict):
            data[section] = {}
        return data[section]

    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["set", "set", "set", "unknown key", "unknown section", "drop", "not a table"]))
        if action == "set":
            section, key = draw(st.sampled_from(KEYS))
            typed = typed_values(HINTS[(section, key)]) if values is toml_values else st.nothing()
            table(section)[key] = draw(st.one_of(typed, values))
        elif action == "unknown key":
            table(draw(st.sampled_from(list(config.SECTIONS))))[draw(st.text(min_size=1, max_size=12))] = draw(toml_scalars)
        elif action == "unknown section":
            data[draw(st.text(min_size=1, max_size=12))] = {"x": 1}
        elif action == "drop":
            data.pop(draw(st.sampled_from(list(data))), None)
        else:
            data[draw(st.sampled_from(list(config.SECTIONS)))] = draw(toml_scalars)
    return tomli_w.dumps(data)


@st.composite
def truncated_demo(draw) -> str:
    text = tomli_w.dumps(DEMO_SETTINGS)
    return text[: draw(st.integers(0, len(text)))]


config_texts = st.one_of(
    st.tuples(st.just("random text"), st.text(max_size=200)),
    st.tuples(st.just("random TOML"), st.dictionaries(st.text(min_size=1, max_size=10), toml_values, max_size=4).map(tomli_w.dumps)),
    st.tuples(st.just("wrong types, unknown keys, out-of-range values"), mutated_demo()),
    st.tuples(st.just("truncated TOML"), truncated_demo()),
)


def _check_usable(cfg: config.RunConfig) -> None:
    """What the training loop does with the values before the first step, on a one-parameter model."""
    from qlora_studio.engine.trainer import build_optimizer, build_scheduler, plan_steps

    again = config.loads(cfg.to_toml(), "round trip")
    assert again.to_toml() == cfg.to_toml()
    for section in dataclasses.asdict(cfg).values():
        for value in section.values():
            if isinstance(value, float):
                assert math.isfinite(value), cfg
    total = plan_steps(cfg, n_train=40)
    assert isinstance(total, int) and total >= 1
    torch.manual_seed(cfg.train.seed)
    np.random.RandomState(cfg.data.shuffle_seed)
    param = torch.nn.Parameter(torch.zeros(64, 64))
    optimizer = build_optimizer(cfg, [param])
    scheduler = build_scheduler(cfg, optimizer, min(total, 10**6))
    param.grad = torch.ones_like(param)
    optimizer.step()
    scheduler.step()
    assert all(math.isfinite(lr) for lr in scheduler.get_last_lr())


@settings(max_examples=fuzzkit.examples(400), **FUZZ)
@given(case=config_texts)
def test_any_configuration_text_loads_or_names_the_problem(case):
    family, text = case
    outcome = fuzzkit.call(f"configuration: {family}", config.loads, text, SOURCE)
    if isinstance(outcome, ConfigError):
        assert outcome.where == SOURCE, outcome.one_line()
    else:
        _check_usable(outcome)


@st.composite
def one_key(draw) -> str:
    section, key = draw(st.sampled_from(KEYS))
    data = {section: {key: draw(typed_values(HINTS[(section, key)]))}}
    if section == "train" and key not in ("max_steps", "epochs") and draw(st.booleans()):
        data["train"].update(max_steps=0, epochs=1.0)  # a plan by epochs: the epoch count matters too
    elif key == "epochs" and draw(st.booleans()):
        data["train"]["max_steps"] = 0
    return tomli_w.dumps(data)


@settings(max_examples=fuzzkit.examples(400), **FUZZ)
@given(text=one_key())
def test_every_key_refuses_values_out_of_its_range(text):
    """One key at a time, at and beyond the edges of its range: refused, or usable by the engine."""
    outcome = fuzzkit.call("configuration: one key at the edge of its range", config.loads, text, SOURCE)
    if isinstance(outcome, ConfigError):
        assert outcome.where == SOURCE, outcome.one_line()
    else:
        _check_usable(outcome)


@settings(max_examples=fuzzkit.examples(100), **FUZZ)
@given(raw=st.binary(max_size=300))
def test_any_configuration_file_loads_or_names_it(raw):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "config.toml"
        path.write_bytes(raw)
        outcome = fuzzkit.call("configuration: random bytes", config.load, path)
        if isinstance(outcome, ConfigError):
            assert outcome.where == str(path)


# ------------------------------------------------------------------------------------------------
# Through the command line: most broken configurations are refused before torch is imported, so
# these calls are cheap; the few that are valid train one step.


@settings(max_examples=fuzzkit.examples(6), **FUZZ)
@given(text=mutated_demo(small_values))
def test_cli_train_accepts_or_exits_2_on_any_configuration(demo_template, text):
    data = tomllib.loads(text)
    # Keep the demo's model and data (other tests break those), with absolute paths.
    for section, key in (("model", "name_or_path"), ("data", "path")):
        if isinstance(data.get(section), dict):
            data[section].pop(key, None)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = fuzzkit.demo_config_file(demo_template, folder)
        base = tomllib.loads(path.read_text())
        for section, values in data.items():
            if isinstance(values, dict) and isinstance(base.get(section), dict):
                base[section].update(values)
            else:
                base[section] = values
        path.write_text(tomli_w.dumps(base))
        run_dir = folder / "run"
        result = fuzzkit.cli("train", path, "--output", run_dir, "--max-steps", "1")
        outcome = fuzzkit.check_cli_outcome(result, run_dir, where=path.name)
        fuzzkit.tally("command line: configuration", outcome)
