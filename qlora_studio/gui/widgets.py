"""Small widgets the pages share: a path field with a picker and a recent list, a busy indicator,
and form helpers that attach the same tooltip to a setting's label and its editor."""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import QStringListModel, Qt, Signal
from PySide6.QtWidgets import (
    QCompleter,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMenu,
    QProgressBar,
    QPushButton,
    QToolButton,
    QWidget,
)

from .help_texts import tip


class PathField(QWidget):
    """A line edit for a path or hub id, a Browse button and a Recent menu.

    ``committed(str)`` fires when the text is final: Return, focus leaving a changed field, a
    picked file or a recent entry. Programmatic :meth:`set_text` does not fire it.
    """

    committed = Signal(str)

    def __init__(
        self,
        object_name: str,
        placeholder: str,
        browse: Callable[[QWidget, str], str],
        parent: QWidget | None = None,
    ):
        super().__init__(parent)
        self.edit = QLineEdit()
        self.edit.setObjectName(object_name)
        self.edit.setPlaceholderText(placeholder)
        self.edit.setClearButtonEnabled(True)
        self._browse = browse
        self._last = ""
        self.browse_button = QPushButton("Browse…")
        self.browse_button.setObjectName(f"{object_name}Browse")
        self.recent_button = QToolButton()
        self.recent_button.setText("Recent")
        self.recent_button.setObjectName(f"{object_name}Recent")
        self.recent_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        self.recent_button.setMenu(QMenu(self.recent_button))
        self._completer_model = QStringListModel()
        completer = QCompleter(self._completer_model, self.edit)
        completer.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        self.edit.setCompleter(completer)

        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.edit, 1)
        row.addWidget(self.browse_button)
        row.addWidget(self.recent_button)

        self.edit.editingFinished.connect(self._commit)
        self.browse_button.clicked.connect(self._pick)
        self.set_recent([])

    def text(self) -> str:
        return self.edit.text().strip()

    def set_text(self, text: str) -> None:
        self.edit.setText(text)
        self._last = text.strip()

    def set_recent(self, items: list[str]) -> None:
        menu = self.recent_button.menu()
        menu.clear()
        for item in items:
            action = menu.addAction(item)
            action.triggered.connect(lambda _=False, value=item: self._choose(value))
        self.recent_button.setEnabled(bool(items))
        self._completer_model.setStringList(items)

    def _choose(self, value: str) -> None:
        self.edit.setText(value)
        self._commit(force=True)

    def _pick(self) -> None:
        chosen = self._browse(self, self.text())
        if chosen:
            self._choose(chosen)

    def _commit(self, force: bool = False) -> None:
        text = self.text()
        if force or text != self._last:
            self._last = text
            self.committed.emit(text)


def pick_file(filter_: str) -> Callable[[QWidget, str], str]:
    def browse(parent: QWidget, current: str) -> str:
        path, _ = QFileDialog.getOpenFileName(parent, "Choose a file", current, filter_)
        return path

    return browse


def pick_folder(parent: QWidget, current: str) -> str:
    return QFileDialog.getExistingDirectory(parent, "Choose a folder", current)


class BusyIndicator(QWidget):
    """An indeterminate progress bar with a label, shown while a background job runs."""

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.bar = QProgressBar()
        self.bar.setRange(0, 0)
        self.bar.setMaximumWidth(120)
        self.bar.setTextVisible(False)
        self.label = QLabel()
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.bar)
        row.addWidget(self.label, 1)
        self.hide()

    def start(self, text: str) -> None:
        self.label.setText(text)
        self.show()

    def stop(self) -> None:
        self.hide()


def add_row(form: QFormLayout, label: str, widget: QWidget, key: str | None = None) -> QLabel:
    """Add ``widget`` to ``form`` with a label that is its buddy (Alt+letter focuses it) and a tooltip."""
    caption = QLabel(label)
    caption.setBuddy(widget)
    if key is not None:
        widget.setToolTip(tip(key))
        caption.setToolTip(tip(key))
    form.addRow(caption, widget)
    return caption


def wrap_label(text: str = "", object_name: str | None = None) -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    if object_name:
        label.setObjectName(object_name)
    return label
