"""The memory estimate on the Model and Training pages: verdict, a breakdown bar, suggestions.

The estimate itself (``engine/estimate.py``) is torch-free arithmetic; it is computed off the GUI
thread by the main window and handed to :meth:`EstimatePanel.show_estimate`.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QRectF, Qt
from PySide6.QtGui import QColor, QPainter, QPen
from PySide6.QtWidgets import QLabel, QSizePolicy, QToolTip, QVBoxLayout, QWidget

GiB = 1024**3

#: Colours of the breakdown's parts, grouped as a person thinks of them.
GROUPS = (
    ("model weights", "#3b6ea8", ("weights_4bit", "quant_constants", "weights_16bit")),
    ("LoRA and optimizer", "#5aa05a", ("lora", "gradients", "optimizer")),
    ("activations", "#d08a2c", ("activations",)),
    ("logits and loss", "#b5473a", ("loss",)),
    ("working memory", "#8c6bb1", ("work", "graphs")),  # the CUDA graphs' pool holds the passes' temporaries
    ("CUDA and allocator", "#8a8a8a", ("context", "allocator")),
)
VERDICT_COLOURS = {"fits": "#2e7d32", "tight": "#b26a00", "does_not_fit": "#c62828"}
VERDICT_WORDS = {"fits": "Fits", "tight": "Tight", "does_not_fit": "Does not fit"}


def _group_of(key: str) -> int:
    for i, (_, _, keys) in enumerate(GROUPS):
        if key in keys:
            return i
    return len(GROUPS) - 1


class BreakdownBar(QWidget):
    """A stacked bar of the estimate's parts, to scale against the GPU's memory (a line at capacity)."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setObjectName("estimateBar")
        self.setMinimumHeight(22)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.setMouseTracking(True)
        self.parts: list[tuple[str, int, str]] = []  # (label, bytes, colour)
        self.capacity: int | None = None
        self._spans: list[tuple[float, float, str]] = []

    def set_parts(self, items: list[Any], capacity: int | None) -> None:
        totals = [0] * len(GROUPS)
        for item in items:
            totals[_group_of(item.key)] += item.bytes
        self.parts = [(GROUPS[i][0], b, GROUPS[i][1]) for i, b in enumerate(totals) if b > 0]
        self.capacity = capacity
        self.setAccessibleDescription(", ".join(f"{label} {b / GiB:.2f} GiB" for label, b, _ in self.parts))
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt's name
        painter = QPainter(self)
        rect = QRectF(self.rect()).adjusted(1, 3, -1, -3)
        total = sum(b for _, b, _ in self.parts)
        scale_to = max(total, self.capacity or 0) or 1
        x = rect.left()
        self._spans = []
        for label, size, colour in self.parts:
            width = rect.width() * size / scale_to
            painter.fillRect(QRectF(x, rect.top(), width, rect.height()), QColor(colour))
            self._spans.append((x, x + width, f"{label}: {size / GiB:.2f} GiB"))
            x += width
        painter.setPen(QPen(self.palette().mid().color()))
        painter.drawRect(rect)
        if self.capacity:
            cx = rect.left() + rect.width() * self.capacity / scale_to
            painter.setPen(QPen(QColor("#000000"), 2, Qt.PenStyle.DashLine))
            painter.drawLine(int(cx), int(rect.top()) - 3, int(cx), int(rect.bottom()) + 3)
        painter.end()

    def mouseMoveEvent(self, event) -> None:  # noqa: N802
        x = event.position().x()
        for start, end, text in self._spans:
            if start <= x < end:
                QToolTip.showText(event.globalPosition().toPoint(), text, self)
                return
        QToolTip.hideText()


class EstimatePanel(QWidget):
    """Verdict, breakdown bar with a legend, and suggestions for the settings on screen."""

    def __init__(self, parent: QWidget | None = None, name: str = "estimatePanel"):
        super().__init__(parent)
        self.setObjectName(name)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        self.headline = QLabel()
        self.headline.setObjectName(f"{name}Verdict")
        self.headline.setWordWrap(True)
        self.headline.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.bar = BreakdownBar()
        self.legend = QLabel()
        self.legend.setWordWrap(True)
        self.details = QLabel()
        self.details.setObjectName(f"{name}Suggestions")
        self.details.setWordWrap(True)
        self.details.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        for w in (self.headline, self.bar, self.legend, self.details):
            layout.addWidget(w)
        self.result: Any = None  #: the estimate shown, or None while a message is
        self.setToolTip("What a training step of these settings needs on the GPU at its peak, estimated from "
                        "config.json alone, before any weights are loaded.")
        self.show_text("")

    def show_text(self, text: str) -> None:
        """A message instead of an estimate (no model chosen yet, or why there is none)."""
        self.result = None
        self.headline.setText(text)
        self.bar.setVisible(False)
        self.legend.setVisible(False)
        self.details.setText("")

    def show_estimate(self, result: Any, gpu: Any | None) -> None:
        """Show an ``engine.estimate.Estimate`` against ``gpu`` (``vram.GpuMemory`` or None)."""
        self.result = result
        peak = f"{result.peak / GiB:.2f} GiB at the peak ({result.phase})"
        if gpu is not None and result.verdict:
            colour = VERDICT_COLOURS.get(result.verdict, "#000000")
            word = VERDICT_WORDS.get(result.verdict, result.verdict)
            self.headline.setText(f"<b style='color:{colour}'>{word}</b> on {gpu.name}: needs {peak}; "
                                  f"{gpu.free / GiB:.1f} of {gpu.total / GiB:.1f} GiB free. {result.reason}.")
        else:
            self.headline.setText(f"Needs {peak}. No NVIDIA GPU found: this is what the run would need on one.")
        capacity = gpu.total if gpu is not None else None
        self.bar.set_parts(result.items, capacity)
        self.bar.setVisible(True)
        swatch = "<span style='color:{c}'>■</span> {l} {g:.2f}"
        self.legend.setText("  ".join(swatch.format(c=c, l=label, g=b / GiB) for label, b, c in self.bar.parts)
                            + (" GiB;  ┆ the GPU's memory" if capacity else " GiB"))
        self.legend.setVisible(True)
        lines = []
        if result.paged:
            lines.append(f"Plus {result.paged / GiB:.2f} GiB of paged optimizer state in unified memory "
                         "(moves to CPU RAM when the GPU is full).")
        lines += [s.text for s in result.suggestions]
        lines += [f"Note: {note}." for note in result.notes]
        self.details.setText("\n".join(lines))
