"""Tokenizer metadata details that the tiny fixtures do not cover."""

from __future__ import annotations

import pytest
from jinja2 import Template

from qlora_studio import formats
from qlora_studio.engine.export.gguf_vocab import (
    PRE_TOKENIZER_REGEXES,
    _pre_tokenizer_name,
    default_chat_template,
)


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2"])
def test_split_regex_pre_tokenizers_are_recognised(name):
    from tokenizers import Regex, pre_tokenizers

    regex = next(r for r, n in PRE_TOKENIZER_REGEXES.items() if n == name)
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    import json

    assert _pre_tokenizer_name(json.loads(pre.__getstate__())) == name
    other = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert _pre_tokenizer_name(json.loads(other.__getstate__())) is None


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "Hi?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More."}],
])
def test_default_chat_template_renders_like_training(messages):
    rendered = Template(default_chat_template()).render(messages=messages, add_generation_prompt=True, eos_token="</s>")
    trained = "".join(s.text for s in formats.render_default(messages, eos="</s>"))
    assert rendered == trained + formats.DEFAULT_TEMPLATE["separator"] + formats.DEFAULT_TEMPLATE["assistant"]
    if len(messages) == 1:
        assert rendered == formats.render_prompt_default(messages)
