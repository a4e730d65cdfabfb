"""The main window's memory estimate: on the Model and Training pages, computed off the GUI thread,
and only the latest request's answer shown."""

from __future__ import annotations

import threading

from PySide6.QtWidgets import QLabel, QSpinBox

from qlora_studio.gui import vram
from qlora_studio.gui.estimate_panel import EstimatePanel


def _panels(window) -> dict[str, EstimatePanel]:
    return {"model": window.model_page.estimate, "training": window.training_page.estimate}


def test_both_pages_show_the_estimate_of_the_demo(window, qtbot):
    panels = _panels(window)
    assert window.findChild(EstimatePanel, "modelEstimate") is panels["model"]
    assert window.findChild(EstimatePanel, "vramEstimate") is panels["training"]
    qtbot.waitUntil(lambda: all(p.result is not None for p in panels.values()), timeout=15_000)
    result = panels["model"].result
    assert panels["training"].result is result  # one computation feeds both pages
    assert window.monitor_page._estimated_peak == result.peak
    for name, page in (("model", window.model_page), ("training", window.training_page)):
        window.tabs.setCurrentWidget(page)
        panel = panels[name]
        headline = window.findChild(QLabel, f"{panel.objectName()}Verdict").text()
        assert "No NVIDIA GPU found" in headline or any(w in headline for w in ("Fits", "Tight", "Does not fit"))
        assert f"{result.peak / 2**30:.2f} GiB" in headline
        assert panel.bar.isVisible() and panel.bar.parts
        assert sum(size for _, size, _ in panel.bar.parts) == sum(item.bytes for item in result.items)


def test_changing_the_micro_batch_re_estimates_in_the_background(window, qtbot):
    panel = window.training_page.estimate
    qtbot.waitUntil(lambda: panel.result is not None, timeout=15_000)
    before = panel.headline.text()
    box = window.findChild(QSpinBox, "train_micro_batch_size")
    assert panel.result.settings["micro_batch_size"] == box.value()
    bigger = box.value() * 4  # needs more activation memory: the peak and the headline change
    box.setValue(bigger)
    qtbot.waitUntil(lambda: panel.headline.text() != before, timeout=15_000)
    assert panel.result.settings["micro_batch_size"] == bigger
    assert window.model_page.estimate.result is panel.result
    assert window.monitor_page._estimated_peak == panel.result.peak


def test_requests_are_coalesced_and_computed_off_the_gui_thread(window, qtbot, monkeypatch):
    panel = window.training_page.estimate
    qtbot.waitUntil(lambda: panel.result is not None and not window._estimates.busy(), timeout=15_000)
    computed: list[int] = []
    threads: list[int] = []
    gate = threading.Event()
    real = vram.compute

    def slow(info, cfg, gpu):
        threads.append(threading.get_ident())
        computed.append(cfg.train.micro_batch_size)
        gate.wait(10)  # held until the test has made its requests
        return real(info, cfg, gpu)

    monkeypatch.setattr(vram, "compute", slow)
    box = window.findChild(QSpinBox, "train_micro_batch_size")
    shown = box.value()
    for batch in (2, 3, 4, 5):
        box.setValue(batch)
        window.update_estimate()  # at once, without the typing pause
        qtbot.waitUntil(lambda: bool(computed), timeout=5_000)
    window._estimate_timer.stop()  # the spin box's own (debounced) request is not part of this check
    # The first request is computing (held by the gate); the GUI thread went on with the others.
    assert computed == [2] and panel.result.settings["micro_batch_size"] == shown
    gate.set()
    qtbot.waitUntil(lambda: panel.result.settings["micro_batch_size"] == 5, timeout=15_000)
    qtbot.waitUntil(lambda: not window._estimates.busy(), timeout=5_000)
    assert computed == [2, 5]  # 3 and 4 were superseded before they started
    assert threading.get_ident() not in threads
