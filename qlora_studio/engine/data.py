"""Datasets: load records, render them (chat template or the default one), tokenize with masks.

Local .jsonl/.json/.csv/.txt files are read by :mod:`qlora_studio.formats` (so errors can name the
line), .parquet files by pyarrow (naming the row), hub dataset ids through ``datasets``. Each example becomes token ids
and labels, where prompt tokens carry the label -100 and only responses are learned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import formats
from ..config import DataConfig
from ..errors import DataError, ModelError

log = logging.getLogger(__name__)

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


@dataclass
class Dataset:
    format: str
    train: list[Example]
    val: list[Example]
    truncated: int = 0
    dropped: int = 0
    template: str = "default"
    lengths: list[int] = field(default_factory=list)

    def summary(self, max_seq_len: int) -> dict[str, Any]:
        return {
            "format": self.format,
            "train_examples": len(self.train),
            "val_examples": len(self.val),
            "truncated": self.truncated,
            "dropped": self.dropped,
            "max_seq_len": max_seq_len,
            "template": self.template,
            "tokens": int(sum(len(e.input_ids) for e in self.train)),
        }


def resolve_data_path(spec: str, base_dir: Path | None) -> str:
    p = formats.expand_user(spec)
    if not p.is_absolute() and base_dir is not None and formats.path_exists(base_dir / p):
        return str((base_dir / p).resolve())
    if formats.looks_local(spec) and base_dir is not None and not p.is_absolute() and not formats.path_exists(p):
        return str(base_dir / p)
    return str(p) if formats.path_exists(p) else spec


def load_records(spec: str, split: str = "train", limit: int | None = None) -> list[formats.Record]:
    """Raw records of a local file or a hub dataset, with positions for error messages."""
    if formats.looks_local(spec):
        path = Path(spec)
        formats.check_local_path(path)
        if path.suffix.lower() == ".parquet":
            return _read_parquet(path, limit)
        return formats.read_local(path, limit)
    return _read_hub(spec, split, limit)


def _read_parquet(path: Path, limit: int | None) -> list[formats.Record]:
    """Rows of a parquet file through pyarrow: no copy in a cache, no log lines of its own."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(str(path))
        if limit is None:
            rows = parquet.read().to_pylist()
        else:
            rows = next(parquet.iter_batches(batch_size=max(1, limit)), None)
            rows = rows.to_pylist()[:limit] if rows is not None else []
    except Exception as exc:  # noqa: BLE001 - pyarrow raises many kinds for a broken file
        raise DataError(f"cannot read the parquet file ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})",
                        where=str(path), fix="Write the file again, or save the dataset as .jsonl.") from None
    if not rows:
        raise DataError("the file holds no examples", where=str(path), fix="Add examples to it.")
    return [formats.Record(row, f"{path}, row {i + 1}") for i, row in enumerate(rows)]


def _read_hub(spec: str, split: str, limit: int | None) -> list[formats.Record]:
    import datasets

    try:
        ds = datasets.load_dataset(spec, split=split)
    except FileNotFoundError:
        raise DataError("dataset not found (not a local file, and not a hub dataset in the cache)", where=spec,
                        fix="Check the path, or connect once to download the hub dataset.") from None
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot load the hub dataset ({msg})", where=spec, fix="Check the id and the split name (data.split).") from None
    n = len(ds) if limit is None else min(limit, len(ds))
    return [formats.Record(dict(ds[i]), f"{spec} [{split}], row {i + 1}") for i in range(n)]


def detect(records: list[formats.Record], cfg: DataConfig, where: str) -> str:
    """The dataset's format (``data.format``, or detected from the columns), once every record has
    been checked in it: an empty field, a value of the wrong type or a conversation without an
    assistant turn is reported here, with its line. The command line calls this before it creates
    the run folder, so such a file is refused with one line and leaves nothing behind.
    """
    keys: list[str] = []
    for r in records[:100]:
        for k in r.data:
            if k not in keys:
                keys.append(k)
    if cfg.format != "auto":
        formats.check_columns(keys, cfg.format, cfg.columns, where)
        fmt = cfg.format
    else:
        fmt = formats.detect_format(keys, cfg.columns, where)
    for record in records:
        formats.record_segments(record.data, fmt, cfg.columns, record.where, eos="")
    return fmt


def chat_renderer(tokenizer):
    """A function rendering messages with the tokenizer's chat template, or None if it has none."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    render.source = getattr(tokenizer, "name_or_path", "") or "the tokenizer"  # for error messages
    return render


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    """The text a model sees before it answers: chat template if any, else the default template."""
    render = chat_renderer(tokenizer)
    if render is not None:
        return render(messages, True)
    bos = tokenizer.bos_token or ""
    return bos + formats.render_prompt_default(messages)


def tokenize_segments(tokenizer, segments: list[formats.Segment]) -> tuple[list[int], list[int]]:
    ids: list[int] = []
    labels: list[int] = []
    bos_id = tokenizer.bos_token_id
    first = segments[0].text if segments else ""
    if bos_id is not None and not (tokenizer.bos_token and first.startswith(tokenizer.bos_token)):
        ids.append(bos_id)
        labels.append(IGNORE)
    for seg in segments:
        piece = tokenizer(seg.text, add_special_tokens=False)["input_ids"]
        ids.extend(piece)
        labels.extend(piece if seg.learn else [IGNORE] * len(piece))
    return ids, labels


def record_segments(record: formats.Record, fmt: str, cfg: DataConfig, eos: str, render) -> list[formats.Segment]:
    """A record's segments (``formats.record_segments``). A chat template that refuses the
    conversation is a DataError naming the record, one that does not parse a ModelError naming the
    tokenizer, rather than jinja2's exceptions."""
    from jinja2.exceptions import TemplateError, TemplateSyntaxError

    try:
        return formats.record_segments(record.data, fmt, cfg.columns, record.where, eos, render, cfg.train_on_prompt)
    except TemplateSyntaxError as exc:
        raise ModelError(
            f"the tokenizer's chat template is not valid Jinja ({exc.message}, line {exc.lineno} of the template)",
            where=getattr(render, "source", None) or "the tokenizer",
            fix="Fix chat_template in the model's tokenizer files, or remove it to use the default template.",
        ) from None
    except TemplateError as exc:  # templates call raise_exception(), e.g. on turns that do not alternate
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(
            f"the tokenizer's chat template refuses this conversation ({message})",
            where=record.where,
            fix="Fix the order of the turns (many templates need user and assistant to alternate), or remove the record.",
        ) from None


def build_examples(
    records: list[formats.Record], fmt: str, cfg: DataConfig, tokenizer
) -> tuple[list[Example], int, int, list[int], str]:
    render = chat_renderer(tokenizer)
    eos = tokenizer.eos_token or ""
    examples: list[Example] = []
    truncated = dropped = 0
    lengths: list[int] = []
    for record in records:
        segments = record_segments(record, fmt, cfg, eos, render)
        ids, labels = tokenize_segments(tokenizer, segments)
        lengths.append(len(ids))
        if len(ids) > cfg.max_seq_len:
            truncated += 1
            ids, labels = ids[: cfg.max_seq_len], labels[: cfg.max_seq_len]
        if sum(1 for x in labels[1:] if x != IGNORE) == 0:
            dropped += 1
            continue
        examples.append(Example(ids, labels))
    return examples, truncated, dropped, lengths, "chat_template" if render else "default"


def _setting_records(setting: str, spec: str, split: str, source: str | None) -> list[formats.Record]:
    """``load_records`` for the dataset a setting names. A hub dataset that cannot be loaded is
    reported against ``source``, the configuration file the setting comes from, naming the setting:
    the id may be a typo there (a local file's own errors name the file)."""
    try:
        return load_records(spec, split)
    except DataError as exc:
        if source is None or formats.looks_local(spec) or exc.where != spec:
            raise
        raise DataError(f"{setting} = {spec!r}: {exc.what}", where=source, fix=exc.fix) from None


def load_dataset(cfg: DataConfig, tokenizer, base_dir: Path | None = None, source: str | None = None) -> Dataset:
    """The training (and validation) examples of ``cfg``; ``source``: the configuration file it
    comes from, for errors about the datasets it names."""
    spec = resolve_data_path(cfg.path, base_dir)
    records = _setting_records("data.path", spec, cfg.split, source)
    fmt = detect(records, cfg, spec)
    train, truncated, dropped, lengths, template = build_examples(records, fmt, cfg, tokenizer)
    val: list[Example] = []
    if cfg.val_path:
        vspec = resolve_data_path(cfg.val_path, base_dir)
        vrecords = _setting_records("data.val_path", vspec, cfg.split, source)
        vfmt = detect(vrecords, cfg, vspec)
        val, vt, vd, _, _ = build_examples(vrecords, vfmt, cfg, tokenizer)
        truncated += vt
        dropped += vd
    elif cfg.val_fraction > 0 and len(train) > 1:
        order = np.random.RandomState(cfg.shuffle_seed).permutation(len(train))
        n_val = max(1, int(round(len(train) * cfg.val_fraction)))
        val_idx = set(order[:n_val].tolist())
        val = [e for i, e in enumerate(train) if i in val_idx]
        train = [e for i, e in enumerate(train) if i not in val_idx]
    if not train:
        raise DataError(
            "no training example has a learnable response within max_seq_len",
            where=spec,
            fix="Raise data.max_seq_len or check that the examples have responses.",
        )
    return Dataset(fmt, train, val, truncated, dropped, template, lengths)


class Batcher:
    """Deterministic micro-batches: each epoch is a permutation seeded by (seed, epoch).

    The position (epoch, index within the epoch) is all that a checkpoint needs to resume the data
    stream exactly.
    """

    def __init__(self, examples: list[Example], batch_size: int, seed: int, epoch: int = 0, index: int = 0):
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.index = index
        self._order = self._permutation(epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.RandomState((self.seed * 1_000_003 + epoch) % (2**32)).permutation(len(self.examples))

    def position(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @property
    def epoch_float(self) -> float:
        return self.epoch + self.index / max(1, len(self.examples))

    def next(self) -> list[Example]:
        return self.take(self.batch_size)

    def take(self, n: int) -> list[Example]:
        """The next ``n`` examples of the stream (crossing into the next epoch as needed)."""
        batch: list[Example] = []
        while len(batch) < n:
            if self.index >= len(self._order):
                self.epoch += 1
                self.index = 0
                self._order = self._permutation(self.epoch)
            batch.append(self.examples[self._order[self.index]])
            self.index += 1
        return batch


def collate(batch: list[Example], pad_id: int):
    """Right-padded tensors: input_ids, attention_mask, labels (padding is -100)."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
