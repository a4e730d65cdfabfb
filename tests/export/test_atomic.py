"""Exports never overwrite without being asked, check the disk first, and an interrupted export
(an exception, or a kill that no code can catch) never leaves a folder that looks complete."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from qlora_studio.engine.export import ExportError, export, staging
from qlora_studio.engine.export.merge import MergePlan


def _hidden(folder):
    return sorted(p.name for p in folder.iterdir() if staging.is_partial(p))


def test_no_overwrite_without_the_flag(llama_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(ExportError, match="already exists.*--overwrite"):
        export(llama_run.run, "adapter", out=out)
    assert (out / "mine.txt").read_text() == "keep me"
    export(llama_run.run, "adapter", out=out, overwrite=True)
    assert not (out / "mine.txt").exists() and (out / "adapter_model.safetensors").is_file()
    assert _hidden(tmp_path) == []


def test_not_enough_disk_space_is_refused_before_writing(llama_run, tmp_path, monkeypatch):
    monkeypatch.setattr(staging, "free_bytes", lambda folder: 10 * 1024 * 1024)
    with pytest.raises(ExportError, match="not enough free disk space.*needs about") as info:
        export(llama_run.run, "merged", out=tmp_path / "merged")
    assert info.value.where == str(tmp_path) and "--out" in info.value.fix
    assert list(tmp_path.iterdir()) == []


def test_an_exception_midway_leaves_nothing(llama_run, tmp_path, monkeypatch):
    real = MergePlan.merge_one
    seen = []

    def failing(self, name, tensor, apply_adapter=True):
        seen.append(name)
        if len(seen) == 5:
            raise RuntimeError("simulated failure")
        return real(self, name, tensor, apply_adapter)

    monkeypatch.setattr(MergePlan, "merge_one", failing)
    for fmt in ("merged", "gguf"):
        seen.clear()
        with pytest.raises(RuntimeError, match="simulated"):
            export(llama_run.run, fmt, out=tmp_path / fmt)
        assert list(tmp_path.iterdir()) == []


def test_a_failed_overwrite_keeps_the_old_export(llama_run, tmp_path, monkeypatch):
    out = export(llama_run.run, "merged", out=tmp_path / "merged")
    before = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr(MergePlan, "merge_one", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        export(llama_run.run, "merged", out=out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before
    assert _hidden(tmp_path) == []


KILLER = textwrap.dedent("""
    import os, signal, sys
    from qlora_studio.engine.export import export

    def progress(fraction, message):
        if message.startswith("{phase}") and fraction > 0.3:
            os.kill(os.getpid(), signal.SIGKILL)   # nothing after this runs: no cleanup, no rename

    export(sys.argv[1], "{fmt}", out=sys.argv[2], progress=progress)
""")


@pytest.mark.parametrize("fmt, phase", [("merged", "merging"), ("gguf", "writing")])
def test_a_kill_midway_leaves_nothing_that_looks_complete(fmt, phase, llama_run, tmp_path):
    out = tmp_path / "exports" / fmt
    script = KILLER.format(fmt=fmt, phase=phase)
    proc = subprocess.run([sys.executable, "-c", script, str(llama_run.run), str(out)], capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()
    partial = _hidden(out.parent)
    assert len(partial) == 1 and any((out.parent / partial[0]).iterdir())  # it was killed while writing
    # The next export to the same place finishes and removes the dead process's partial folder.
    export(llama_run.run, fmt, out=out)
    assert out.is_dir() and _hidden(out.parent) == []


def test_a_partial_folder_of_a_live_process_is_left_alone(tmp_path):
    out = tmp_path / "merged"
    live = tmp_path / f".merged.partial-{os.getpid()}-0123abcd"
    dead = tmp_path / ".merged.partial-999999999-0123abcd"
    live.mkdir()
    dead.mkdir()
    assert staging.remove_stale_partials(out) == [dead]
    assert live.exists() and not dead.exists()
