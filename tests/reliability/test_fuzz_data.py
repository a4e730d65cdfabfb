"""Fuzzing the dataset readers: any file either loads or is refused with a DataError naming the file.

In process (fast, many examples): ``formats.read_local``, ``engine.data.load_records``, ``detect`` and
``build_examples`` with the demo's tokenizer and with a tokenizer whose chat template refuses some
conversations. Through the command line (slow: each call imports torch): a few files per run.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_studio import formats
from qlora_studio.config import DATA_FORMATS, DataConfig
from qlora_studio.engine.data import build_examples, detect, load_records
from qlora_studio.errors import UserError

from . import fuzzkit
from .strategies import FORMAT_KEYS, DataFile, data_files

FUZZ = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large]}

column_maps = st.dictionaries(st.sampled_from(["instruction", "output", "text", "messages", "prompt", "completion"]),
                              st.sampled_from(FORMAT_KEYS + ("answer", "question")), max_size=2)


def _write(folder: Path, data: DataFile) -> Path:
    path = folder / f"data{data.suffix}"
    path.write_bytes(data.content)
    return path


def _check_where(err, path: Path) -> None:
    """The error names the file, and a line, record or row when it is about one."""
    assert err.where.startswith(str(path)), err.one_line()
    rest = err.where[len(str(path)):]
    assert rest == "" or re.fullmatch(r", (line|record|row) \d+", rest), err.where


def _load_and_build(path: Path, cfg: DataConfig, tokenizer, limit: int | None):
    records = load_records(str(path), limit=limit)
    fmt = detect(records, cfg, str(path))
    return build_examples(records, fmt, cfg, tokenizer)


@settings(max_examples=fuzzkit.examples(250), **FUZZ)
@given(data=data_files, fmt=st.just("auto") | st.sampled_from(DATA_FORMATS), columns=st.just({}) | column_maps,
       limit=st.sampled_from([None, 20]),
       max_seq_len=st.sampled_from([1, 8, 128]), train_on_prompt=st.booleans(), use_template=st.booleans())
def test_any_dataset_file_loads_or_names_the_problem(demo_tokenizer, template_tokenizer, data, fmt, columns, limit,
                                                     max_seq_len, train_on_prompt, use_template):
    cfg = DataConfig(path="x", format=fmt, columns=columns, max_seq_len=max_seq_len, train_on_prompt=train_on_prompt)
    tokenizer = template_tokenizer if use_template else demo_tokenizer
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), data)
        outcome = fuzzkit.call(f"dataset: {data.family}", _load_and_build, path, cfg, tokenizer, limit)
        if isinstance(outcome, UserError):
            _check_where(outcome, path)
        else:
            examples, _truncated, dropped, lengths, _template = outcome
            assert len(examples) + dropped == len(lengths)
            for e in examples:
                assert len(e.input_ids) == len(e.labels) <= max_seq_len
                assert any(label != -100 for label in e.labels[1:])


@settings(max_examples=fuzzkit.examples(150), **FUZZ)
@given(data=data_files.filter(lambda d: d.suffix != ".parquet"), limit=st.sampled_from([None, 1, 20]))
def test_read_local_returns_records_with_positions_or_a_data_error(data, limit):
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), data)
        outcome = fuzzkit.call(f"dataset: {data.family}", formats.read_local, path, limit)
        if isinstance(outcome, UserError):
            _check_where(outcome, path)
        else:
            assert outcome and (limit is None or len(outcome) <= limit)
            for record in outcome:
                assert isinstance(record.data, dict)
                _check_where_text(record.where, path)


def _check_where_text(where: str, path: Path) -> None:
    assert re.fullmatch(re.escape(str(path)) + r", (line|record|row) \d+", where), where


bad_paths = st.one_of(
    st.builds(lambda t, s: t + s, st.text(min_size=1, max_size=30), st.sampled_from([".jsonl", ".csv", ".parquet", ""])),
    st.sampled_from(["a\x00b.jsonl", "x" * 5000 + ".jsonl", "/" + "d/" * 3000 + "f.json", "./missing.txt",
                     "/proc/self/mem.jsonl", "~/nope.parquet", "/", "."]),
)


@settings(max_examples=fuzzkit.examples(100), **FUZZ)
@given(spec=bad_paths)
def test_odd_dataset_paths_are_refused_cleanly(spec):
    if not formats.looks_local(spec):
        return  # a hub id: the hub reader is exercised by the command line tests
    outcome = fuzzkit.call("dataset: odd paths", load_records, spec)
    assert isinstance(outcome, UserError), spec


# ------------------------------------------------------------------------------------------------
# Through the command line


@settings(max_examples=fuzzkit.examples(3), **FUZZ)
@given(data=data_files.filter(lambda d: len(d.content) < 200_000))
def test_cli_train_accepts_or_exits_2_on_any_dataset(demo_template, data):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        path = _write(folder, data)
        config = fuzzkit.demo_config_file(demo_template, folder, data={"path": str(path)})
        run_dir = folder / "run"
        result = fuzzkit.cli("train", config, "--output", run_dir, "--max-steps", "1")
        outcome = fuzzkit.check_cli_outcome(result, run_dir, where=path.name)
        fuzzkit.tally(f"command line: dataset: {data.family}", outcome)
