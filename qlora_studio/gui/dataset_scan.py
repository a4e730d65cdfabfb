"""The Dataset page's scan, run as a subprocess: ``python -m qlora_studio.gui.dataset_scan``.

It needs the model's tokenizer (transformers, and through it torch), which the GUI process must
not import, so the page starts this module with a JSON request on standard input and reads one JSON
answer from standard output. It renders and tokenizes exactly as the training worker does, with
the engine's own functions (``engine.data``), so the preview and the token lengths are what the model
will see.

Request: ``{"path", "format", "columns", "split", "max_seq_len", "train_on_prompt", "model",
"revision", "trust_remote_code", "preview_rows", "limit"}``.

Answer: ``{"format", "template", "columns", "examples", "limited", "rows": [{"where", "segments":
[[text, learned], ...], "tokens", "learned_tokens"}], "lengths": [...], "tokenizer_error", "error"}``
where ``error`` is ``{"what", "where", "fix"}`` for a dataset a person must fix (exit code 0);
any other failure exits 1 with the traceback on standard error.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from ..config import DataConfig, ModelConfig, RunConfig
from ..errors import UserError

#: Records tokenized for the histogram; larger datasets are sampled from their start.
DEFAULT_LIMIT = 20000
DEFAULT_PREVIEW = 20
#: The end-of-sequence marker shown when the tokenizer cannot be loaded.
EOS_MARKER = "</s>"


def _error(exc: UserError) -> dict[str, Any]:
    return {"what": exc.what, "where": exc.where, "fix": exc.fix, "kind": exc.kind}


def _tokenizer(request: dict[str, Any]):
    from ..engine.data import chat_renderer
    from ..engine.model import load_tokenizer, resolve_source

    model = ModelConfig(
        name_or_path=request.get("model", ""),
        revision=request.get("revision", "main") or "main",
        trust_remote_code=bool(request.get("trust_remote_code", False)),
    )
    cfg = RunConfig(model=model)
    tokenizer = load_tokenizer(resolve_source(model.name_or_path), cfg)
    return tokenizer, chat_renderer(tokenizer)


def scan(request: dict[str, Any]) -> dict[str, Any]:
    from ..engine.data import detect, load_records, record_segments, tokenize_segments

    data_cfg = DataConfig(
        path=request["path"],
        format=request.get("format", "auto"),
        columns=dict(request.get("columns") or {}),
        split=request.get("split", "train") or "train",
        max_seq_len=int(request.get("max_seq_len", 1024)),
        train_on_prompt=bool(request.get("train_on_prompt", False)),
    )
    limit = int(request.get("limit", DEFAULT_LIMIT))
    preview_rows = int(request.get("preview_rows", DEFAULT_PREVIEW))
    answer: dict[str, Any] = {"error": None, "tokenizer_error": None, "rows": [], "lengths": []}

    try:
        records = load_records(data_cfg.path, data_cfg.split, limit + 1)
    except UserError as exc:
        answer["error"] = _error(exc)
        return answer
    answer["limited"] = len(records) > limit
    records = records[:limit]
    columns: list[str] = []
    for record in records[:100]:
        columns.extend(k for k in record.data if k not in columns)
    answer.update(columns=columns, examples=len(records))
    try:
        fmt = detect(records, data_cfg, data_cfg.path)
    except UserError as exc:
        answer["error"] = _error(exc)  # with the columns found, so they can be mapped
        return answer
    answer["format"] = fmt

    tokenizer = render = None
    if request.get("model"):
        try:
            tokenizer, render = _tokenizer(request)
        except UserError as exc:
            answer["tokenizer_error"] = exc.one_line()
    else:
        answer["tokenizer_error"] = "no model chosen, so no tokenizer"
    answer["template"] = "chat template" if render else "default template"
    eos = (tokenizer.eos_token or "") if tokenizer is not None else EOS_MARKER

    for index, record in enumerate(records):
        try:  # the engine's own: a chat template that fails is the DataError/ModelError training would give
            segments = record_segments(record, fmt, data_cfg, eos, render)
        except UserError as exc:
            answer["error"] = _error(exc)
            return answer
        row: dict[str, Any] | None = None
        if index < preview_rows:
            row = {"where": record.where, "segments": [[s.text, s.learn] for s in segments]}
            answer["rows"].append(row)
        if tokenizer is not None:
            ids, labels = tokenize_segments(tokenizer, segments)
            answer["lengths"].append(len(ids))
            if row is not None:
                row["tokens"] = len(ids)
                row["learned_tokens"] = sum(1 for label in labels if label != -100)
        elif index >= preview_rows:
            break
    return answer


def main() -> int:
    request = json.loads(sys.stdin.read() or "{}")
    out = sys.stdout
    sys.stdout = sys.stderr  # a library's stray print must not corrupt the answer
    answer = scan(request)
    out.write(json.dumps(answer))
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
