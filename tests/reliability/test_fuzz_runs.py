"""Fuzzing run folders: whatever a killed worker, a full disk or a person left in one, reading it
(the Runs page, ``train --resume``, the monitor) never fails.

``events.jsonl`` gets torn lines, lines of other programs, events with fields of the wrong type or
missing; ``checkpoints/`` gets unfinished and misnamed folders and damaged ``trainer_state.json``
files; ``worker.pid`` gets anything.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qlora_studio import events as ev
from qlora_studio import runs

from . import fuzzkit

FUZZ = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}

values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
FIELDS = sorted({f for fields in ev.EVENT_FIELDS.values() for f in fields} | {"type", "time", "v"})

good = {"step": st.integers(0, 10**6), "loss": st.floats(allow_nan=True), "time": st.floats(0, 2e9),
        "plan": st.fixed_dictionaries({"max_steps": st.integers(0, 10**6)}),
        "config": st.fixed_dictionaries({"model": st.fixed_dictionaries({"name_or_path": st.text(max_size=5)})})}


MISSING = object()


def _event(type_: str) -> st.SearchStrategy:
    """An event of ``type_`` whose fields have the right type, any other, or are missing."""
    names = (*ev.EVENT_FIELDS[type_], "time", "step", "loss", "message", "reason")
    fields = {f: st.one_of(good.get(f, values), values, st.just(MISSING)) for f in names}
    return st.fixed_dictionaries(fields).map(
        lambda d: {"v": 1, "type": type_, **{k: v for k, v in d.items() if v is not MISSING}})


typed = st.sampled_from(["run_started", "step", "eval", "finished", "stopped", "failed", *sorted(ev.EVENT_FIELDS)]).flatmap(_event)
events = st.one_of(typed, typed, typed, st.dictionaries(st.sampled_from(FIELDS), values, max_size=5))
lines = st.one_of(
    events.map(lambda e: json.dumps(e)),
    events.map(lambda e: json.dumps(e)).flatmap(lambda s: st.integers(0, len(s)).map(lambda n: s[:n])),  # torn
    st.text(max_size=40),
    st.just("{not json"),
    st.just("[1, 2]"),
)
checkpoint_entries = st.lists(st.tuples(
    st.one_of(st.integers(0, 10**9).map(runs.checkpoint_name), st.sampled_from([".tmp-step-00000009", "step-x", "step-", "STEP-1"])),
    st.sampled_from(["complete", "no state", "state is a folder", "damaged state", "a file"]),
    values,
), max_size=4)


def _build(folder: Path, event_lines: list[str], entries, pid: str | None) -> None:
    (folder / runs.EVENTS).write_text("\n".join(event_lines), encoding="utf-8", errors="surrogatepass")
    root = folder / runs.CHECKPOINTS
    root.mkdir()
    for name, kind, state in entries:
        path = root / name
        if path.exists():
            continue
        if kind == "a file":
            path.write_text("x")
            continue
        path.mkdir()
        if kind == "complete":
            (path / runs.STATE).write_text(json.dumps(state))
        elif kind == "state is a folder":
            (path / runs.STATE).mkdir()
        elif kind == "damaged state":
            (path / runs.STATE).write_bytes(b"\x00{")
    if pid is not None:
        (folder / runs.PID).write_text(pid)


@settings(max_examples=fuzzkit.examples(200), **FUZZ)
@given(event_lines=st.lists(lines, max_size=12), entries=checkpoint_entries,
       pid=st.none() | st.text(max_size=8) | st.integers(-5, 2**40).map(str))
def test_any_run_folder_can_be_summarised(event_lines, entries, pid):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        folder.mkdir()
        _build(folder, event_lines, entries, pid)
        summary = fuzzkit.call("run folder", runs.summarize, folder)
        assert isinstance(summary, runs.RunSummary), summary
        assert summary.status in ("created", "running", "finished", "stopped", "failed", "interrupted")
        assert isinstance(summary.step, int) and isinstance(summary.max_steps, int)
        assert all(isinstance(s, int) and isinstance(v, float) for s, v in summary.losses)
        listed = runs.list_checkpoints(folder)
        assert [s for s, _ in listed] == sorted(s for s, _ in listed)
        assert all(p.name.startswith("step-") for _, p in listed)
        assert isinstance(summary.resumable, bool)
        assert [r.path for r in runs.list_runs(folder.parent)] == [folder]
