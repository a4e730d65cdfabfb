"""Dataset formats: detection, reading with line numbers, and rendering into learned/masked text.

A record becomes a list of :class:`Segment` -- pieces of text, each either learned (the response:
its tokens carry labels) or masked (the prompt: label -100). The engine tokenizes segment by
segment, so the mask lines up with the tokens exactly; the GUI's preview shows the same segments.

Formats
-------
``alpaca``             ``instruction``, optional ``input``, ``output`` (optional ``system``)
``chat``               ``messages``: a list of ``{"role", "content"}`` (OpenAI style; system turns included)
``sharegpt``           ``conversations``: a list of ``{"from", "value"}`` (human/gpt/system)
``prompt_completion``  ``prompt`` and ``completion``: raw text, no template
``text``               ``text``: plain text, all of it learned

Alpaca, chat and ShareGPT records are conversations; they are rendered with the tokenizer's chat
template when it has one, else with :data:`DEFAULT_TEMPLATE` (documented in docs/data.md).

Plain Python: no torch, no Qt.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError, lookup_path

#: The template used when a tokenizer has no chat template of its own. ``{eos}`` is the
#: tokenizer's end-of-sequence token; it is learned after each assistant turn so the model learns
#: to stop. Headers and user/system text are masked.
DEFAULT_TEMPLATE = {
    "system": "### System:\n",
    "user": "### User:\n",
    "assistant": "### Assistant:\n",
    "separator": "\n\n",
}

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

#: The columns each format needs (required) and may use (optional), by role.
FORMAT_COLUMNS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "alpaca": (("instruction", "output"), ("input", "system")),
    "chat": (("messages",), ()),
    "sharegpt": (("conversations",), ()),
    "prompt_completion": (("prompt", "completion"), ()),
    "text": (("text",), ()),
}

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".txt")

TOO_LONG_NUMBER = f"a number has more than {sys.get_int_max_str_digits()} digits, more than can be read"


@dataclass(frozen=True)
class Segment:
    text: str
    learn: bool


@dataclass
class Record:
    """One raw example and where it came from (for error messages)."""

    data: dict[str, Any]
    where: str


# --------------------------------------------------------------------------------------------
# Reading local files with positions


def _read_jsonl(path: Path) -> Iterator[Record]:
    with open(path, "rb") as fh:
        for number, raw in enumerate(fh, start=1):
            where = f"{path}, line {number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError("not UTF-8 text", where=where, fix="Save the file as UTF-8.") from None
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"malformed JSON ({exc.msg} at column {exc.colno})",
                    where=where,
                    fix="Each line of a .jsonl file must be one complete JSON object.",
                ) from None
            except RecursionError:
                raise DataError("JSON nested too deeply", where=where, fix="Flatten the record.") from None
            except ValueError:  # an integer longer than Python reads (sys.get_int_max_str_digits)
                raise DataError(TOO_LONG_NUMBER, where=where, fix="Write such numbers as strings.") from None
            if not isinstance(data, dict):
                raise DataError(
                    f"expected a JSON object, found {type(data).__name__}",
                    where=where,
                    fix='Each line must be an object such as {"instruction": ..., "output": ...}.',
                )
            yield Record(data, where)


def _read_json(path: Path) -> Iterator[Record]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text", where=str(path), fix="Save the file as UTF-8.") from None
    if not text.strip():
        raise DataError("the file is empty", where=str(path), fix="Add examples to it.")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        # A .json file holding JSON lines is common: read it as such.
        if exc.msg == "Extra data":
            yield from _read_jsonl(path)
            return
        raise DataError(
            f"malformed JSON ({exc.msg}) on line {exc.lineno}, column {exc.colno}",
            where=str(path),
            fix="Fix the JSON there, or save one object per line as .jsonl.",
        ) from None
    except RecursionError:
        raise DataError("JSON nested too deeply", where=str(path), fix="Flatten the records.") from None
    except ValueError:
        raise DataError(TOO_LONG_NUMBER, where=str(path), fix="Write such numbers as strings.") from None
    if isinstance(data, dict):
        # {"data": [...]} or {"train": [...]}: take the single list value.
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) == 1:
            data = lists[0]
        else:
            data = [data]
    if not isinstance(data, list):
        raise DataError("expected a list of objects", where=str(path), fix="Use a JSON array of objects, or .jsonl.")
    for index, item in enumerate(data):
        where = f"{path}, record {index + 1}"
        if not isinstance(item, dict):
            raise DataError(f"expected a JSON object, found {type(item).__name__}", where=where)
        yield Record(item, where)


def _read_csv(path: Path) -> Iterator[Record]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text", where=str(path), fix="Save the file as UTF-8 CSV.") from None
    csv.field_size_limit(1 << 30)
    reader = csv.DictReader(text.splitlines(keepends=True))
    try:
        for number, row in enumerate(reader, start=2):
            if None in row:
                raise DataError("more fields than header columns", where=f"{path}, line {number}", fix="Quote fields that contain commas.")
            yield Record({k: v for k, v in row.items()}, f"{path}, line {number}")
    except csv.Error as exc:
        raise DataError(f"malformed CSV ({exc})", where=f"{path}, line {reader.line_num}") from None


def _read_txt(path: Path) -> Iterator[Record]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DataError("not UTF-8 text", where=str(path), fix="Save the file as UTF-8.") from None
    line = 1
    for block in text.split("\n\n"):
        if block.strip():
            yield Record({"text": block.strip("\n")}, f"{path}, line {line}")
        line += block.count("\n") + 2


def read_local(path: str | Path, limit: int | None = None) -> list[Record]:
    """Read a local .jsonl/.json/.csv/.txt file (parquet is read by the engine) with positions."""
    path = Path(path)
    check_local_path(path)
    readers: dict[str, Callable[[Path], Iterator[Record]]] = {
        ".jsonl": _read_jsonl,
        ".json": _read_json,
        ".csv": _read_csv,
        ".txt": _read_txt,
    }
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"cannot read {path.suffix!r} files here", where=str(path), fix="Use .jsonl, .json, .csv or .txt.")
    records: list[Record] = []
    try:
        for record in reader(path):
            records.append(record)
            if limit is not None and len(records) >= limit:
                break
    except OSError as exc:  # no permission to read it, an I/O error
        raise DataError(f"cannot read the file ({exc.strerror or exc})", where=str(path),
                        fix="Check that the file is readable.") from None
    if not records:
        raise DataError("the file holds no examples", where=str(path), fix="Add examples to it (empty and blank lines are skipped).")
    return records


def path_exists(path: Path) -> bool:
    """``path.exists()``, but False rather than an exception for a path the system cannot look up
    (a name longer than the file system allows, a folder without search permission)."""
    try:
        return path.exists()
    except OSError:
        return False


def expand_user(spec: str) -> Path:
    """``~`` expanded when it can be; ``~nosuchuser/...`` stays as written (and is then not found)."""
    try:
        return Path(spec).expanduser()
    except RuntimeError:
        return Path(spec)


def check_local_path(path: Path) -> None:
    if not str(path).strip():
        raise DataError("no dataset file given (the path is blank)", where="data.path",
                        fix="Set it to a dataset file or a hub dataset id.")
    if not lookup_path(path, DataError):
        raise DataError("dataset file not found", where=str(path), fix="Check the path, or give a hub dataset id.")
    if path.is_dir():
        raise DataError("is a folder", where=str(path), fix="Pick a dataset file (.jsonl, .json, .csv, .parquet, .txt).")
    if path.suffix.lower() not in LOCAL_SUFFIXES:
        raise DataError(
            f"unsupported file type {path.suffix or '(none)'!r}",
            where=str(path),
            fix=f"Use one of {', '.join(LOCAL_SUFFIXES)}.",
        )
    if path.stat().st_size == 0:
        raise DataError("the file is empty", where=str(path), fix="Add examples to it.")


#: A hub dataset id: ``name`` or ``namespace/name`` (letters, digits, ``-``, ``_``, ``.``; at most 96 each).
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}(/[A-Za-z0-9][\w.-]{0,95})?")


def looks_local(spec: str) -> bool:
    """A dataset spec is a local path if it exists, looks like one, or cannot be a hub id."""
    p = Path(spec)
    return (path_exists(p) or spec.startswith((".", "/", "~")) or p.suffix.lower() in LOCAL_SUFFIXES
            or HUB_ID.fullmatch(spec) is None)


# --------------------------------------------------------------------------------------------
# Detection and normalisation


def _column(columns: dict[str, str], role: str) -> str:
    return columns.get(role, role)


def detect_format(keys: Iterable[str], columns: dict[str, str] | None = None, where: str = "dataset") -> str:
    """The format whose required columns are all present (after the column mapping)."""
    columns = columns or {}
    keys = list(keys)
    present = set(keys)
    for fmt in ("chat", "sharegpt", "alpaca", "prompt_completion", "text"):
        required, _ = FORMAT_COLUMNS[fmt]
        if all(_column(columns, role) in present for role in required):
            return fmt
    raise DataError(
        f"cannot tell the dataset's format from its columns ({', '.join(map(str, keys)) or 'none'})",
        where=where,
        fix="Set data.format (alpaca, chat, sharegpt, prompt_completion, text) and map columns with data.columns.",
    )


def check_columns(keys: Iterable[str], fmt: str, columns: dict[str, str] | None, where: str) -> None:
    columns = columns or {}
    present = set(keys)
    required, _ = FORMAT_COLUMNS[fmt]
    missing = [_column(columns, role) for role in required if _column(columns, role) not in present]
    if missing:
        raise DataError(
            f"missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)} for format {fmt}; "
            f"columns found: {', '.join(sorted(map(str, present))) or 'none'}",
            where=where,
            fix="Rename the columns, map them with data.columns, or pick another format.",
        )


def _text(value: Any, name: str, where: str, *, allow_empty: bool = False) -> str:
    if value is None and allow_empty:
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise DataError(f"field {name!r} must be text, found {type(value).__name__}", where=where)
    if not allow_empty and not value.strip():
        raise DataError(f"field {name!r} is empty", where=where, fix="Remove the record or fill the field.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON may escape a lone surrogate ("\ud800"); no tokenizer takes one
        raise DataError(
            f"field {name!r} holds invalid Unicode (a lone surrogate {value[exc.start]!r} at character {exc.start + 1})",
            where=where,
            fix="Fix or remove that \\u escape in the file.",
        ) from None
    return value


def to_messages(record: dict[str, Any], fmt: str, columns: dict[str, str] | None, where: str) -> list[dict[str, str]]:
    """An alpaca/chat/sharegpt record as a list of {role, content} messages, validated."""
    columns = columns or {}
    if fmt == "alpaca":
        instruction = _text(record.get(_column(columns, "instruction")), "instruction", where)
        extra = _text(record.get(_column(columns, "input")), "input", where, allow_empty=True)
        output = _text(record.get(_column(columns, "output")), "output", where)
        system = _text(record.get(_column(columns, "system")), "system", where, allow_empty=True)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [{"role": "system", "content": system}] if system.strip() else []
        return messages + [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    if fmt in ("chat", "sharegpt"):
        key = _column(columns, "messages" if fmt == "chat" else "conversations")
        turns = record.get(key)
        if isinstance(turns, str):
            try:
                turns = json.loads(turns)
            except (ValueError, RecursionError):  # not JSON, a number too long, nested too deeply
                pass
        if not isinstance(turns, list) or not turns:
            raise DataError(f"field {key!r} must be a non-empty list of turns", where=where)
        role_key, content_key = ("role", "content") if fmt == "chat" else ("from", "value")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise DataError(f"turn {i + 1} of {key!r} must be an object with {role_key!r} and {content_key!r}", where=where)
            role = turn.get(role_key, turn.get("role"))
            content = turn.get(content_key, turn.get("content"))
            role = SHAREGPT_ROLES.get(role, role) if isinstance(role, str) else role
            if role not in ROLES:
                raise DataError(
                    f"turn {i + 1} has role {role!r}",
                    where=where,
                    fix=f"Roles must be one of {', '.join(ROLES)} (ShareGPT: human, gpt, system).",
                )
            messages.append({"role": role, "content": _text(content, f"{key}[{i}].{content_key}", where, allow_empty=True)})
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError("the conversation has no assistant turn to learn", where=where, fix="Add an assistant reply.")
        return messages
    raise ValueError(f"{fmt} is not a conversation format")


def render_default(messages: list[dict[str, str]], eos: str, train_on_prompt: bool = False) -> list[Segment]:
    """Render with :data:`DEFAULT_TEMPLATE`; only assistant content and its end token are learned."""
    segments: list[Segment] = []
    sep = DEFAULT_TEMPLATE["separator"]
    for i, message in enumerate(messages):
        header = DEFAULT_TEMPLATE[message["role"]]
        if message["role"] == "assistant":
            segments.append(Segment(header, train_on_prompt))
            segments.append(Segment(message["content"] + eos, True))
        else:
            segments.append(Segment(header + message["content"], train_on_prompt))
        if i < len(messages) - 1:
            segments.append(Segment(sep, train_on_prompt))
    return segments


def render_prompt_default(messages: list[dict[str, str]]) -> str:
    """The prompt for generation with :data:`DEFAULT_TEMPLATE`: the conversation, then an assistant header."""
    text = "".join(s.text for s in render_default(messages, eos=""))
    sep = DEFAULT_TEMPLATE["separator"] if messages else ""
    return text + sep + DEFAULT_TEMPLATE["assistant"]


ChatRenderer = Callable[[list[dict[str, str]], bool], str]


def render_with_template(messages: list[dict[str, str]], render: ChatRenderer, train_on_prompt: bool = False) -> list[Segment] | None:
    """Render with a chat template by growing the conversation one turn at a time.

    ``render(messages, add_generation_prompt)`` applies the template. The text each assistant turn
    adds is learned; everything else is masked. Returns None if the template is not prefix-stable
    (a turn changes text rendered before it), in which case the caller uses the default template.
    """
    segments: list[Segment] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            prompt = render(messages[:i], True)
            if not prompt.startswith(done):
                return None
            if len(prompt) > len(done):
                segments.append(Segment(prompt[len(done):], train_on_prompt))
            done = prompt
        full = render(messages[: i + 1], False)
        if not full.startswith(done):
            return None
        if len(full) > len(done):
            segments.append(Segment(full[len(done):], message["role"] == "assistant" or train_on_prompt))
        done = full
    return segments


def record_segments(
    record: dict[str, Any],
    fmt: str,
    columns: dict[str, str] | None,
    where: str,
    eos: str,
    chat_render: ChatRenderer | None = None,
    train_on_prompt: bool = False,
) -> list[Segment]:
    """The learned/masked segments of one record in the given format."""
    columns = columns or {}
    if fmt == "text":
        return [Segment(_text(record.get(_column(columns, "text")), "text", where) + eos, True)]
    if fmt == "prompt_completion":
        prompt = _text(record.get(_column(columns, "prompt")), "prompt", where)
        completion = _text(record.get(_column(columns, "completion")), "completion", where)
        return [Segment(prompt, train_on_prompt), Segment(completion + eos, True)]
    messages = to_messages(record, fmt, columns, where)
    if chat_render is not None:
        segments = render_with_template(messages, chat_render, train_on_prompt)
        if segments is not None:
            return segments
    return render_default(messages, eos, train_on_prompt)
