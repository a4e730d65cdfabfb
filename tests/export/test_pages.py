"""The Export and Playground pages (offscreen Qt) on the tiny runs, with their real worker processes."""

from __future__ import annotations

import os

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # before Qt is imported

import subprocess
import sys

import pytest

from qlora_studio.engine.export import staging

pytest.importorskip("pytestqt")

from qlora_studio.gui.pages.export_page import ExportPage
from qlora_studio.gui.pages.playground_page import PlaygroundPage, example_prompts


def test_the_pages_import_no_torch():
    code = ("import sys; import qlora_studio.gui.pages.export_page, qlora_studio.gui.pages.playground_page; "
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]; "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=60,
                          env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert proc.returncode == 0, proc.stderr


@pytest.fixture
def export_page(qtbot):
    page = ExportPage()
    qtbot.addWidget(page)
    page.show()
    yield page
    page.shutdown()


def test_export_page_exports_a_checkpoint_as_merged_model(export_page, llama_run, tmp_path, qtbot):
    page = export_page
    page.set_run(llama_run.run)
    assert [kind for kind, _ in page.artifacts()] == ["Final adapter", "Checkpoint"]
    page.tree.setCurrentItem(page.tree.topLevelItem(1))
    page.select_format("merged")
    assert page.out_edit.text() == str(llama_run.run / "exports" / "merged-step10")
    assert page.merge_base.isEnabled() and not page.gguf_dtype.isEnabled()
    page.out_edit.setText(str(tmp_path / "merged"))
    with qtbot.waitSignal(page.exported, timeout=120_000) as signal:
        assert page.start_export()
        assert not page.export_button.isEnabled() and page.cancel_button.isEnabled()  # the GUI is not blocked
    assert signal.args == [tmp_path / "merged"]
    assert (tmp_path / "merged" / "model.safetensors").is_file()
    assert page.progress.value() == 1000 and "Exported to" in page.status.text()
    assert page.export_button.isEnabled()


def test_export_page_asks_before_replacing_a_folder(export_page, llama_run, tmp_path, qtbot):
    page = export_page
    page.set_run(llama_run.run)
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "old.txt").write_text("old")
    page.out_edit.setText(str(out))
    asked = []
    page.confirm = lambda title, text: asked.append(text) or False
    assert not page.start_export()
    assert asked and (out / "old.txt").exists() and "folder exists" in page.status.text()
    page.confirm = lambda title, text: True
    with qtbot.waitSignal(page.exported, timeout=120_000):
        assert page.start_export()
    assert not (out / "old.txt").exists() and (out / "adapter_config.json").is_file()


def test_export_page_reports_errors_and_cancels_cleanly(export_page, llama_run, tmp_path, qtbot):
    page = export_page
    page.set_run(llama_run.run)
    page.select_format("gguf")
    page.gguf_dtype.setCurrentIndex(page.gguf_dtype.findData("q8_0"))
    assert page.out_edit.text().endswith("gguf-q8_0")
    # A run whose base model is gone: the worker's one-line error reaches the page.
    (tmp_path / "broken").mkdir()
    broken = tmp_path / "broken" / "run"
    import shutil

    shutil.copytree(llama_run.run, broken)
    (broken / "config.toml").write_text((broken / "config.toml").read_text().replace(str(llama_run.model), str(tmp_path / "gone")))
    page.set_run(broken)
    page.out_edit.setText(str(tmp_path / "out"))
    with qtbot.waitSignal(page.failed, timeout=120_000) as signal:
        page.start_export()
    assert "no longer exists" in signal.args[0] and not (tmp_path / "out").exists()

    # Cancel right after the start: the worker ends and leaves nothing behind.
    page.set_run(llama_run.run)
    page.out_edit.setText(str(tmp_path / "cancelled"))
    with qtbot.waitSignal(page.failed, timeout=120_000) as signal:
        page.start_export()
        page.cancel()
    assert "cancelled" in signal.args[0]
    assert not (tmp_path / "cancelled").exists()
    assert [p for p in tmp_path.iterdir() if staging.is_partial(p)] == []


def test_main_window_placeholder_signature_still_works(llama_run):
    page = ExportPage(llama_run.run.parent)
    try:
        page.refresh(select=llama_run.run)
        assert page.current_run() == llama_run.run
    finally:
        page.deleteLater()


@pytest.fixture
def playground(qtbot):
    page = PlaygroundPage()
    qtbot.addWidget(page)
    page.show()
    yield page
    page.shutdown()


def test_playground_streams_base_and_fine_tuned_answers(playground, llama_run, qtbot):
    page = playground
    page.set_run(llama_run.run)
    assert page.checkpoint_combo.count() == 2 and page.generate_button.isEnabled()
    page.prompt.setPlainText("What is the capital of France?")
    page.max_tokens.setValue(12)
    tokens = []
    with qtbot.waitSignal(page.generation_finished, timeout=180_000):
        page.generate()
        page.worker.event.connect(lambda e: tokens.append(e) if e.get("type") == "token" else None)
        assert page.stop_button.isEnabled() and not page.generate_button.isEnabled()
    answers = page.answers()
    assert answers["base"] and answers["tuned"] and answers["base"] != answers["tuned"]
    assert {e["side"] for e in tokens} == {"base", "tuned"}
    assert set(page.last_done) == {"base", "tuned"}
    assert page.generate_button.isEnabled()

    # Same settings again: same answers (greedy), and the model is not loaded twice.
    worker = page.worker
    with qtbot.waitSignal(page.generation_finished, timeout=120_000):
        page.generate()
    assert page.worker is worker and page.answers() == answers


def test_playground_stop_and_errors(playground, llama_run, tmp_path, qtbot):
    page = playground
    page.set_run(llama_run.run)
    page.prompt.setPlainText("Tell me a long story.")
    page.max_tokens.setValue(4096)
    seen = []
    with qtbot.waitSignal(page.generation_finished, timeout=180_000):
        page.generate()
        page.worker.event.connect(lambda e: seen.append(e) if e.get("type") == "token" else None)
        qtbot.waitUntil(lambda: len(seen) >= 4, timeout=120_000)
        page.stop()
    assert {e["reason"] for e in page.last_done.values()} <= {"stopped", "eos"}
    assert any(e["reason"] == "stopped" for e in page.last_done.values())

    page.set_adapter_folder(tmp_path / "not-an-adapter")
    (tmp_path / "not-an-adapter").mkdir()
    with qtbot.waitSignal(page.failed, timeout=60_000) as signal:
        page.generate()
    assert "not a run folder" in signal.args[0]
    assert page.generate_button.isEnabled()


def test_example_prompts_come_from_the_training_data(tmp_path):
    import json

    from qlora_studio import config as config_mod

    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"Question {i}?", "output": "Answer."}) for i in range(3)))
    run = tmp_path / "run"
    run.mkdir()
    config_mod.from_dict({"model": {"name_or_path": "x"}, "data": {"path": str(data)}}).save(run / "config.toml")
    assert example_prompts(run) == ["Question 0?", "Question 1?", "Question 2?"]
    assert example_prompts(tmp_path) == []
