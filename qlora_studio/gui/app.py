"""Start the desktop app: ``qlora-studio`` (or ``qlora-studio gui``, ``python -m qlora_studio.gui``).

Kept small so the window appears quickly: PySide6 and pyqtgraph are imported here, torch never is.
"""

from __future__ import annotations

import os
import sys

from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QApplication

from . import jobs
from .app_state import APP_NAME, DISPLAY_NAME


def make_application(argv: list[str] | None = None) -> QApplication:
    """The QApplication (created once), named so settings and data folders are per app."""
    app = QApplication.instance()
    if app is None:
        # Fractional scaling (125%, 150%) renders at its real size instead of rounding to 100% or 200%.
        QGuiApplication.setHighDpiScaleFactorRoundingPolicy(Qt.HighDpiScaleFactorRoundingPolicy.PassThrough)
        app = QApplication([sys.argv[0] if sys.argv else APP_NAME, *(argv or [])])
    app.setOrganizationName(APP_NAME)
    app.setApplicationName(APP_NAME)
    app.setApplicationDisplayName(DISPLAY_NAME)
    return app  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    app = make_application(argv)
    from .main_window import MainWindow

    window = MainWindow()
    window.show()
    code = app.exec()
    if jobs.running_jobs():
        # A background read that is still blocked (a hub download on a dead network) would make
        # Qt abort when its thread object is destroyed at exit. Settings are saved by now.
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
