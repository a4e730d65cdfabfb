"""Hypothesis strategies for broken inputs: dataset files, configuration files and model folders.

Each dataset strategy draws a ``DataFile(family, suffix, content)``: the family names the kind of
damage (for the report in docs/reliability.md), the suffix picks the reader.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass

from hypothesis import strategies as st

SUFFIXES = (".jsonl", ".json", ".csv", ".txt", ".parquet")
FORMAT_KEYS = ("instruction", "input", "output", "system", "messages", "conversations", "prompt", "completion", "text")
ROLES = ("system", "user", "assistant", "human", "gpt", "tool", "", "USER")


@dataclass(frozen=True)
class DataFile:
    family: str
    suffix: str
    content: bytes


# ------------------------------------------------------------------------------------------------
# Values

LONE_SURROGATES = st.sampled_from(["\ud800", "\udfff", "a\udc80b"])

texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "\t", "\n\n", "\u3000", "\x00", "\r\n"]),  # empty and whitespace-only
    LONE_SURROGATES,
    st.integers(1_000, 120_000).map(lambda n: "word " * (n // 5)),  # very long fields
)

#: Stands for an integer too long for Python's int parser (over 4300 digits): ``_dumps`` writes it as
#: a bare number, which a JSON reader of another language would accept.
HUGE_INT = "<huge-int>"

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.just(HUGE_INT),
    st.floats(allow_nan=True, allow_infinity=True), texts,
)

json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(FORMAT_KEYS + ("role", "content", "from", "value")) | st.text(max_size=8), inner, max_size=4),
), max_leaves=12)

turn = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(ROLES) | json_values, "content": texts | json_values,
    "from": st.sampled_from(ROLES), "value": texts,
})

#: A record of one of the five formats, its fields of the right type or not.
records = st.one_of(
    st.fixed_dictionaries({"instruction": texts, "output": texts}, optional={"input": texts | st.none(), "system": texts}),
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=5) | json_values}),
    st.fixed_dictionaries({"conversations": st.lists(turn, max_size=5) | json_values}),
    st.fixed_dictionaries({"prompt": texts, "completion": texts}),
    st.fixed_dictionaries({"text": texts}),
    st.dictionaries(st.sampled_from(FORMAT_KEYS) | st.text(max_size=10), json_values, max_size=5),  # wrong types
)

good_records = st.one_of(
    st.fixed_dictionaries({"instruction": st.text(min_size=1, max_size=30).filter(str.strip),
                           "output": st.text(min_size=1, max_size=30).filter(str.strip)}),
    st.fixed_dictionaries({"text": st.text(min_size=1, max_size=60).filter(str.strip)}),
)


# ------------------------------------------------------------------------------------------------
# Serialising records into files


def _dumps(value, ensure_ascii: bool = False) -> str:
    """JSON text as a person's tool might write it: NaN/Infinity allowed, lone surrogates kept."""
    return json.dumps(value, ensure_ascii=ensure_ascii, allow_nan=True).replace(json.dumps(HUGE_INT), "9" * 5000)


def _encode(text: str) -> bytes:
    # Lone surrogates cannot be UTF-8: write them as the invalid bytes a broken tool would.
    return text.encode("utf-8", errors="surrogatepass")


def as_jsonl(rows: list, ensure_ascii: bool) -> bytes:
    return _encode("\n".join(_dumps(r, ensure_ascii) for r in rows) + "\n")


def as_json(rows: list, ensure_ascii: bool, wrap: bool) -> bytes:
    return _encode(_dumps({"data": rows} if wrap else rows, ensure_ascii))


def as_csv(rows: list) -> bytes:
    keys: list[str] = []
    for r in rows:
        for k in (r if isinstance(r, dict) else {}):
            if k not in keys:
                keys.append(k)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(keys)
    for r in rows:
        r = r if isinstance(r, dict) else {}
        writer.writerow([v if isinstance(v, str) else _dumps(v) for v in (r.get(k, "") for k in keys)])
    return _encode(out.getvalue())


def as_txt(rows: list) -> bytes:
    parts = [r.get("text") if isinstance(r, dict) and isinstance(r.get("text"), str) else _dumps(r) for r in rows]
    return _encode("\n\n".join(parts))


def as_parquet(rows: list) -> bytes:
    """A parquet file of ``rows``; values that pyarrow cannot type consistently are written as JSON text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dicts = [r if isinstance(r, dict) else {"value": r} for r in rows]
    sink = io.BytesIO()
    try:
        pq.write_table(pa.Table.from_pylist(dicts), sink)
    except (pa.ArrowException, OverflowError, TypeError, ValueError):  # types parquet cannot hold
        keys = sorted({k for d in dicts for k in d})
        sink = io.BytesIO()
        pq.write_table(pa.table({k: [None if k not in d else d[k] if isinstance(d[k], str) else _dumps(d[k]) for d in dicts]
                                 for k in keys}), sink)
    return sink.getvalue()


def _safe_for_arrow(value) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
        return False
    if isinstance(value, float) and not math.isfinite(value):
        return True
    if isinstance(value, list):
        return all(_safe_for_arrow(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _safe_for_arrow(v) for k, v in value.items())
    return True


@st.composite
def serialised(draw, rows_strategy, family: str) -> DataFile:
    rows = draw(st.lists(rows_strategy, min_size=0, max_size=6))
    suffix = draw(st.sampled_from(SUFFIXES))
    if suffix == ".jsonl":
        content = as_jsonl(rows, draw(st.booleans()))
    elif suffix == ".json":
        content = as_json(rows, draw(st.booleans()), draw(st.booleans()))
    elif suffix == ".csv":
        content = as_csv(rows)
    elif suffix == ".txt":
        content = as_txt(rows)
    else:
        content = as_parquet([r if _safe_for_arrow(r) else {"text": "replaced"} for r in rows])
    return DataFile(family, suffix, content)


@st.composite
def truncated(draw) -> DataFile:
    """Valid JSON or JSON lines cut at a random byte (a copy interrupted, a download cut short)."""
    rows = draw(st.lists(good_records, min_size=1, max_size=5))
    suffix = draw(st.sampled_from([".jsonl", ".json"]))
    full = as_jsonl(rows, True) if suffix == ".jsonl" else as_json(rows, True, draw(st.booleans()))
    cut = draw(st.integers(1, max(1, len(full) - 2)))
    return DataFile("truncated JSON", suffix, full[:cut])


@st.composite
def deeply_nested(draw) -> DataFile:
    depth = draw(st.integers(50, 200_000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
    nested = opener * depth + "1" + closer * depth
    key = draw(st.sampled_from(["instruction", "messages", "text", "output"]))
    line = f'{{"{key}": {nested}, "output": "x"}}'
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv", ".txt"]))
    if suffix == ".csv":
        content = f"{key},output\n\"{nested}\",x\n"
    elif suffix == ".json":
        content = f"[{line}]"
    else:
        content = line + "\n"
    return DataFile("deeply nested values", suffix, content.encode())


@st.composite
def long_lines(draw) -> DataFile:
    n = draw(st.integers(10_000, 600_000))
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv", ".txt"]))
    body = draw(st.sampled_from(["a", "word ", "\u00e9", "{", '"', ",", "\\"])) * (n // 5)
    if suffix == ".jsonl":
        content = _dumps({"instruction": "q", "output": body}) + "\n" + body
    elif suffix == ".json":
        content = _dumps([{"text": body}])
    elif suffix == ".csv":
        content = "instruction,output\nq," + body
    else:
        content = body
    return DataFile("very long fields and lines", suffix, content.encode())


@st.composite
def mixed_formats(draw) -> DataFile:
    """Lines of different formats in one file: JSON objects of several formats, arrays, CSV, prose."""
    pieces = st.one_of(
        records.map(lambda r: _dumps(r)),
        st.lists(good_records, max_size=2).map(_dumps),
        st.just("instruction,output"), st.just("q,a"), st.just("plain prose, not a record"),
        st.just(""), st.just("   "), st.just("[1, 2"), st.just("null"), st.just('"text"'),
    )
    lines = draw(st.lists(pieces, min_size=1, max_size=8))
    suffix = draw(st.sampled_from([".jsonl", ".json", ".csv", ".txt"]))
    return DataFile("mixed formats in one file", suffix, _encode("\n".join(lines)))


@st.composite
def empty_records(draw) -> DataFile:
    blank = st.sampled_from(["", " ", "\t", "\u00a0", "\n"])
    rows = draw(st.lists(st.one_of(
        st.just({}),
        st.fixed_dictionaries({"instruction": blank, "output": blank}),
        st.fixed_dictionaries({"text": blank}),
        st.fixed_dictionaries({"messages": st.just([])}),
        st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": blank}), max_size=3)}),
        st.fixed_dictionaries({"prompt": blank, "completion": blank}),
    ), max_size=5))
    suffix = draw(st.sampled_from(SUFFIXES))
    if suffix == ".jsonl":
        content = b"\n".join([as_jsonl(rows, True), draw(blank).encode()])
    elif suffix == ".json":
        content = as_json(rows, True, False)
    elif suffix == ".csv":
        content = as_csv(rows)
    elif suffix == ".txt":
        content = draw(st.sampled_from([b"", b"\n\n\n", b"   \n\t\n"]))
    else:
        content = as_parquet(rows or [{"text": ""}])
    return DataFile("empty and whitespace-only records", suffix, content)


@st.composite
def escaped_surrogates(draw) -> DataFile:
    """Valid JSON whose strings hold a lone surrogate escape (``"\\ud800"``): legal JSON, not text."""
    rows = draw(st.lists(good_records, min_size=1, max_size=3))
    row = dict(rows[draw(st.integers(0, len(rows) - 1))])
    key = draw(st.sampled_from(sorted(row)))
    row[key] = row[key] + draw(LONE_SURROGATES)
    rows.append(row)
    suffix = draw(st.sampled_from([".jsonl", ".json"]))
    content = as_jsonl(rows, True) if suffix == ".jsonl" else as_json(rows, True, False)
    return DataFile("invalid Unicode in valid JSON", suffix, content)


@st.composite
def odd_conversations(draw) -> DataFile:
    """Chat and ShareGPT records with turns in any order: many chat templates refuse some orders."""
    roles = st.sampled_from(["system", "user", "assistant"])
    rows = []
    for _ in range(draw(st.integers(1, 4))):
        turns = [{"role": r, "content": draw(st.text(min_size=1, max_size=10))}
                 for r in draw(st.lists(roles, min_size=1, max_size=5))]
        if draw(st.booleans()):
            rows.append({"messages": turns})
        else:
            rows.append({"conversations": [{"from": {"user": "human", "assistant": "gpt"}.get(t["role"], t["role"]),
                                            "value": t["content"]} for t in turns]})
    return DataFile("conversations in any order", ".jsonl", as_jsonl(rows, False))


random_bytes = st.builds(lambda b, s: DataFile("random bytes", s, b), st.binary(max_size=2000), st.sampled_from(SUFFIXES))

data_files = st.one_of(
    random_bytes,
    truncated(),
    serialised(records, "wrong types"),
    deeply_nested(),
    long_lines(),
    mixed_formats(),
    empty_records(),
    escaped_surrogates(),
    odd_conversations(),
    serialised(good_records, "valid records"),
)
