"""The Dataset page's scan subprocess (qlora_studio.gui.dataset_scan): a chat template that fails
is the same one-line error as in training, not a crash of the scan."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

#: Refuses conversations whose roles do not alternate, as many published templates do.
STRICT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}[{{ m['role'] }}]{{ m['content'] }}"
    "{% endfor %}"
)
BROKEN_TEMPLATE = "{% for m in messages %}{{ m['content'] }"

DATA = ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
        '{"messages": [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')


def _model_with_template(demo_template: Path, folder: Path, template: str) -> Path:
    from transformers import AutoTokenizer

    shutil.copytree(demo_template / "model", folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(folder))
    return folder


def _scan(request: dict) -> dict:
    result = subprocess.run([sys.executable, "-m", "qlora_studio.gui.dataset_scan"], input=json.dumps(request),
                            capture_output=True, text=True, timeout=300, check=False,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


@pytest.mark.parametrize("template, kind", [(STRICT_TEMPLATE, "bad_data"), (BROKEN_TEMPLATE, "bad_model")])
def test_a_chat_template_that_fails_is_the_engines_error(demo_template, tmp_path, template, kind):
    model = _model_with_template(demo_template, tmp_path / "model", template)
    data = tmp_path / "data.jsonl"
    data.write_text(DATA)
    answer = _scan({"path": str(data), "format": "chat", "model": str(model)})
    error = answer["error"]
    assert error is not None and error["kind"] == kind, answer
    if kind == "bad_data":
        assert error["where"] == f"{data}, line 2"
        assert error["what"] == ("the tokenizer's chat template refuses this conversation "
                                 "(Conversation roles must alternate user/assistant/user/assistant/...)")
    else:
        assert error["where"] == str(model)
        assert error["what"].startswith("the tokenizer's chat template is not valid Jinja (unexpected '}'")
    assert error["fix"]


def test_a_chat_template_the_records_satisfy_is_used_for_the_preview(demo_template, tmp_path):
    model = _model_with_template(demo_template, tmp_path / "model", STRICT_TEMPLATE)
    data = tmp_path / "data.jsonl"
    data.write_text(DATA.splitlines(keepends=True)[0])
    answer = _scan({"path": str(data), "format": "chat", "model": str(model)})
    assert answer["error"] is None and answer["template"] == "chat template", answer
    [row] = answer["rows"]
    assert "".join(text for text, _learned in row["segments"]) == "[user]q[assistant]a"
    assert [text for text, learned in row["segments"] if learned] and row["learned_tokens"] > 0
