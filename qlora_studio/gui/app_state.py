"""Where the app keeps its files, and what it remembers between launches.

The data folder holds the demo (``demo/``), the runs (``runs/``) and per-run staging files. It is
``$QLORA_STUDIO_HOME`` when set (handy for tests and for several independent setups), else the
platform's per-user data folder plus ``qlora-studio`` (``~/.local/share/qlora-studio`` on Linux).

Settings (last configuration, window layout, recent models and datasets, preferences) go to a
QSettings INI file: ``settings.ini`` in ``$QLORA_STUDIO_HOME`` when set, else the platform's
per-user config folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PySide6.QtCore import QByteArray, QSettings, QStandardPaths

APP_NAME = "qlora-studio"
DISPLAY_NAME = "QLoRA Studio"
HOME_ENV = "QLORA_STUDIO_HOME"
RECENT_LIMIT = 10


def default_home() -> Path:
    override = os.environ.get(HOME_ENV)
    if override:
        return Path(override).expanduser()
    base = QStandardPaths.writableLocation(QStandardPaths.StandardLocation.GenericDataLocation)
    return Path(base or Path.home() / ".local" / "share") / APP_NAME


@dataclass
class AppState:
    """The data folder and the settings store of one app instance."""

    home: Path
    settings: QSettings

    @classmethod
    def create(cls, home: Path | None = None) -> AppState:
        explicit = home is not None or bool(os.environ.get(HOME_ENV))
        home = Path(home) if home is not None else default_home()
        home.mkdir(parents=True, exist_ok=True)
        if explicit:
            settings = QSettings(str(home / "settings.ini"), QSettings.Format.IniFormat)
        else:
            settings = QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, APP_NAME, APP_NAME)
        return cls(home, settings)

    # ------------------------------------------------------------------ folders

    @property
    def demo_dir(self) -> Path:
        return self.home / "demo"

    @property
    def runs_dir(self) -> Path:
        stored = self.settings.value("paths/runs_dir", "", type=str)
        return Path(stored) if stored else self.home / "runs"

    def set_runs_dir(self, path: Path) -> None:
        self.settings.setValue("paths/runs_dir", str(path))

    @property
    def staging_dir(self) -> Path:
        return self.home / "staging"

    # ------------------------------------------------------------------ values

    def get(self, key: str, default: Any, type_: type) -> Any:
        return self.settings.value(key, default, type=type_)

    def set(self, key: str, value: Any) -> None:
        self.settings.setValue(key, value)

    def recent(self, kind: str) -> list[str]:
        value = self.settings.value(f"recent/{kind}", [])
        if isinstance(value, str):  # an INI list of one item reads back as a string
            value = [value] if value else []
        return [str(v) for v in (value or [])]

    def add_recent(self, kind: str, item: str) -> list[str]:
        item = item.strip()
        if not item:
            return self.recent(kind)
        items = [item] + [v for v in self.recent(kind) if v != item]
        items = items[:RECENT_LIMIT]
        self.settings.setValue(f"recent/{kind}", items)
        return items

    def last_config_toml(self) -> str:
        return self.settings.value("session/last_config", "", type=str)

    def set_last_config_toml(self, text: str) -> None:
        self.settings.setValue("session/last_config", text)

    def geometry(self, key: str) -> QByteArray | None:
        value = self.settings.value(f"window/{key}")
        return value if isinstance(value, QByteArray) and not value.isEmpty() else None

    def set_geometry(self, key: str, value: QByteArray) -> None:
        self.settings.setValue(f"window/{key}", value)

    def sync(self) -> None:
        self.settings.sync()
