import json

import pytest

from qlora_studio import formats
from qlora_studio.config import DataConfig
from qlora_studio.errors import DataError

CHAT = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And Japan?"},
    {"role": "assistant", "content": "Tokyo."},
]}

# A small ChatML-style template, like many hub tokenizers carry.
CHATML = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.mark.parametrize(
    "record, fmt",
    [
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        (CHAT, "chat"),
        ({"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}, "sharegpt"),
        ({"prompt": "p", "completion": "c"}, "prompt_completion"),
        ({"text": "t"}, "text"),
    ],
)
def test_detects_each_format(record, fmt):
    assert formats.detect_format(record.keys()) == fmt


def test_column_mapping_and_override():
    assert formats.detect_format(["question", "answer"], {"instruction": "question", "output": "answer"}) == "alpaca"
    with pytest.raises(DataError) as info:
        formats.detect_format(["question", "answer"], where="f.jsonl")
    assert "question, answer" in str(info.value) and "data.format" in str(info.value)


def test_missing_columns_are_named_with_columns_found():
    with pytest.raises(DataError) as info:
        formats.check_columns(["instruction", "extra"], "alpaca", {}, "f.jsonl")
    text = str(info.value)
    assert "missing column output" in text and "columns found: extra, instruction" in text


@pytest.fixture(scope="module")
def tokenizer(demo_template):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_template / "model")


def _labels_for(tokenizer, record, fmt):
    from qlora_studio.engine.data import build_examples

    examples, *_ = build_examples([formats.Record(record, "r")], fmt, DataConfig(max_seq_len=512), tokenizer)
    return examples[0]


def test_chat_labels_exact_with_default_template(tokenizer):
    ex = _labels_for(tokenizer, CHAT, "chat")
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    masked = lambda s: [-100] * len(enc(s))
    sep = "\n\n"
    expected_ids = [tokenizer.bos_token_id]
    expected_labels = [-100]
    pieces = [
        ("### System:\nBe brief.", False), (sep, False), ("### User:\nCapital of France?", False), (sep, False),
        ("### Assistant:\n", False), ("Paris.</s>", True), (sep, False), ("### User:\nAnd Japan?", False), (sep, False),
        ("### Assistant:\n", False), ("Tokyo.</s>", True),
    ]
    for text, learn in pieces:
        expected_ids += enc(text)
        expected_labels += enc(text) if learn else masked(text)
    assert ex.input_ids == expected_ids
    assert ex.labels == expected_labels
    learned = tokenizer.decode([t for t in ex.labels if t != -100])
    assert learned == "Paris.</s>Tokyo.</s>"


def test_chat_labels_with_the_tokenizers_chat_template(tokenizer):
    tokenizer = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = CHATML
    ex = _labels_for(tokenizer, CHAT, "chat")
    full = tokenizer.apply_chat_template(CHAT["messages"], tokenize=False)
    assert tokenizer.decode(ex.input_ids[1:]) == full
    learned = tokenizer.decode([t for t in ex.labels if t != -100])
    assert learned == "Paris.</s>\nTokyo.</s>\n"


def test_alpaca_input_and_sharegpt_system_turns():
    msgs = formats.to_messages({"instruction": "Sum", "input": "1 2", "output": "3", "system": "S"}, "alpaca", {}, "r")
    assert msgs == [{"role": "system", "content": "S"}, {"role": "user", "content": "Sum\n\n1 2"}, {"role": "assistant", "content": "3"}]
    sg = {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    assert [m["role"] for m in formats.to_messages(sg, "sharegpt", {}, "r")] == ["system", "user", "assistant"]


def test_prompt_completion_and_text_segments():
    segs = formats.record_segments({"prompt": "Q: 1+1?", "completion": " 2"}, "prompt_completion", {}, "r", "</s>")
    assert segs == [formats.Segment("Q: 1+1?", False), formats.Segment(" 2</s>", True)]
    assert formats.record_segments({"text": "hello"}, "text", {}, "r", "</s>") == [formats.Segment("hello</s>", True)]


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n\n" + '{"text": "b"\n')
    with pytest.raises(DataError) as info:
        formats.read_local(path)
    assert f"{path}, line 3" in str(info.value) and "malformed JSON" in str(info.value)


@pytest.mark.parametrize(
    "content, needle",
    [(b"", "empty"), (b"\xff\xfe\x00bad", "not UTF-8"), (b"\n  \n", "no examples"), (b"[1, 2]\n", "expected a JSON object")],
)
def test_bad_files(tmp_path, content, needle):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=needle):
        formats.read_local(path)


def test_csv_and_txt(tmp_path):
    (tmp_path / "d.csv").write_text('instruction,output\n"a, with comma",b\n')
    assert formats.read_local(tmp_path / "d.csv")[0].data == {"instruction": "a, with comma", "output": "b"}
    (tmp_path / "d.txt").write_text("first doc\nline two\n\n\nsecond doc\n")
    texts = [r.data["text"] for r in formats.read_local(tmp_path / "d.txt")]
    assert texts == ["first doc\nline two", "second doc"]
