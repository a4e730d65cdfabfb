"""The Model, Dataset and Runs pages on real files."""

from __future__ import annotations

import json

import pyqtgraph as pg
from PySide6.QtWidgets import QLabel, QSpinBox, QTableWidget

from qlora_studio.gui.pages.dataset_page import LEARNED_STYLE, MASKED_STYLE

from .helpers import write_run


def test_dataset_preview_masks_the_prompt_and_histogram_counts_truncation(window, qtbot):
    page = window.dataset_page
    window.tabs.setCurrentWidget(page)
    qtbot.waitUntil(lambda: page.lengths.size > 0 and page.preview.rowCount() > 0, timeout=60_000)
    assert page.detected_format == "alpaca"
    label = page.preview.cellWidget(0, 1)
    assert isinstance(label, QLabel)
    assert MASKED_STYLE in label.text() and LEARNED_STYLE in label.text()
    assert "### Assistant:" in label.property("plainText")  # the demo tokenizer has no chat template
    assert "learned" in page.preview.item(0, 2).text()

    lengths = page.lengths
    limit = int(sorted(lengths)[len(lengths) // 2])  # about half the examples are longer
    window.findChild(QSpinBox, "maxSeqLen").setValue(limit)
    expected = int((lengths > limit).sum())
    assert expected > 0
    assert page.truncated_count() == expected
    assert f"{expected:,} of {len(lengths):,} examples are longer than {limit:,} tokens" in page.truncated_label.text()
    line = next(item for item in page.histogram.getPlotItem().items if isinstance(item, pg.InfiniteLine))
    assert line.value() == limit


def test_column_mapping_reads_a_dataset_with_other_column_names(window, qtbot, tmp_path):
    data = tmp_path / "renamed.jsonl"
    data.write_text("".join(json.dumps({"question": f"What is {i}+{i}?", "answer": str(2 * i)}) + "\n" for i in range(5)))
    page = window.dataset_page
    page.set_source(str(data))
    qtbot.waitUntil(lambda: page.error is not None, timeout=10_000)
    assert "cannot tell the dataset's format" in page.error
    page.format.setCurrentIndex(page.format.findData("prompt_completion"))
    page._column_boxes["prompt"].setCurrentText("question")
    page._column_boxes["completion"].setCurrentText("answer")
    qtbot.waitUntil(lambda: page.error is None and page.preview.rowCount() == 5, timeout=60_000)
    assert window.collect_config().data.columns == {"prompt": "question", "completion": "answer"}
    assert "What is 0+0?" in page.preview.cellWidget(0, 1).property("plainText")


def test_runs_page_lists_overlays_and_deletes(window, qtbot):
    runs_dir = window.state.runs_dir
    write_run(runs_dir, "a-finished", "finished", [3.0, 2.0, 1.0])
    stopped = write_run(runs_dir, "b-stopped", "stopped", [4.0, 3.5], checkpoint_step=2)
    page = window.runs_page
    window.tabs.setCurrentWidget(page)
    table = window.findChild(QTableWidget, "runsTable")
    qtbot.waitUntil(lambda: table.rowCount() == 2, timeout=10_000)
    rows = {table.item(r, 1).text(): [table.item(r, c).text() for c in range(table.columnCount())] for r in range(2)}
    assert rows["a-finished"][0] == "finished" and rows["a-finished"][4] == "3 / 100" and rows["a-finished"][5] == "1.0000"
    assert rows["b-stopped"][0] == "stopped" and rows["b-stopped"][2] == "tiny" and rows["b-stopped"][3] == "qa.jsonl"

    table.selectAll()
    assert page.overlay_curve_count() == 2
    page.select_run(stopped)
    table.clearSelection()
    page.select_run(stopped)
    assert page.resume_button.isEnabled()
    charts = page.open_charts()
    assert charts.charts.point_count("loss") == 2
    charts.close()

    page.confirm = lambda title, text: False
    assert page.delete_selected() == [] and stopped.exists()
    page.confirm = lambda title, text: "b-stopped" in text
    assert page.delete_selected() == [stopped] and not stopped.exists()
    qtbot.waitUntil(lambda: table.rowCount() == 1, timeout=10_000)


def test_model_page_shows_config_facts_targets_and_an_estimate(window, qtbot, tmp_path):
    page = window.model_page
    window.tabs.setCurrentWidget(page)
    qtbot.waitUntil(lambda: page.facts is not None and bool(page._module_boxes), timeout=10_000)
    facts = {page.facts_form.itemAt(r, page.facts_form.ItemRole.LabelRole).widget().text():
             page.facts_form.itemAt(r, page.facts_form.ItemRole.FieldRole).widget().text()
             for r in range(page.facts_form.rowCount())
             if page.facts_form.itemAt(r, page.facts_form.ItemRole.LabelRole) is not None}
    assert facts["Architecture:"] == "LlamaForCausalLM" and facts["Layers:"] == "4" and facts["Hidden size:"] == "256"
    assert page.facts_status.text() == "Local folder."
    assert set(page._module_boxes) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    qtbot.waitUntil(lambda: page.estimate.result is not None, timeout=10_000)

    assert window.collect_config().lora.target_modules == ["all-linear"]
    page.all_linear.setChecked(False)
    for name, box in page._module_boxes.items():
        box.setChecked(name in ("q_proj", "v_proj"))
    assert sorted(window.collect_config().lora.target_modules) == ["q_proj", "v_proj"]

    page.set_source(str(tmp_path / "no-such-model"))
    qtbot.waitUntil(lambda: "model folder not found" in page.facts_status.text(), timeout=10_000)
    assert page.facts_form.rowCount() == 0


def test_a_runs_folder_that_cannot_be_read_is_said_beside_it_and_the_list_stays(window, qtbot, monkeypatch):
    from qlora_studio import runs

    write_run(window.state.runs_dir, "a-finished", "finished", [3.0, 2.0, 1.0])
    page = window.runs_page
    window.tabs.setCurrentWidget(page)
    table = window.findChild(QTableWidget, "runsTable")
    qtbot.waitUntil(lambda: table.rowCount() == 1, timeout=10_000)

    def unreadable(folder):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(runs, "list_runs", unreadable)
    with qtbot.waitSignal(page.listed, timeout=10_000):
        page.refresh()
    assert "could not be read" in page.folder_label.text() and "Permission denied" in page.folder_label.text()
    assert table.rowCount() == 1  # what was listed stays
    monkeypatch.undo()
    with qtbot.waitSignal(page.listed, timeout=10_000):
        page.refresh()
    assert page.folder_label.text() == f"Runs folder: {page.runs_dir}"
