"""Fixtures of the reliability suite: the demo's tokenizer (with and without a chat template)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from . import fuzzkit

#: A Mistral-style template that refuses conversations whose roles do not alternate, as many
#: published templates do (with ``raise_exception``).
STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] != 'system' and (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token if m['role'] == 'assistant' else '' }}"
    "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, demo_template) -> Path:
    """A finished two-step demo run with a checkpoint after each step, trained with a (fake) Hugging
    Face token in the environment. Read-only for the tests that share it."""
    folder = tmp_path_factory.mktemp("finished")
    config = fuzzkit.demo_config_file(demo_template, folder, train={"checkpoint_every": 1})
    run_dir = folder / "run"
    result = fuzzkit.cli("train", config, "--output", run_dir, "--max-steps", "2", env=fuzzkit.TOKEN_ENV)
    assert result.returncode == 0, result.stderr[-2000:]
    assert fuzzkit.FAKE_TOKEN not in result.stdout + result.stderr
    return run_dir


@pytest.fixture(scope="session")
def demo_tokenizer(demo_template):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(demo_template / "model"))


@pytest.fixture(scope="session")
def template_tokenizer(demo_template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_template / "model"))
    tok.chat_template = STRICT_TEMPLATE
    return tok


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("QLORA_FUZZ_REPORT")
    if path and fuzzkit.TALLY:
        fuzzkit.write_tally(path)
