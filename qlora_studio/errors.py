"""Errors a person can fix: what went wrong, where, and how to fix it.

A :class:`UserError` is bad input (a missing file, a malformed record, an invalid setting). The
command line prints it as one line and exits with code 2; the GUI shows it in a dialog. Anything
else is an internal error: exit code 1, the traceback goes to the run's log file.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input. ``what`` happened at ``where``; ``fix`` tells the person what to do."""

    kind = "bad_input"

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        if self.fix:
            text = f"{text.rstrip('.')}. {self.fix}"
        return " ".join(text.split())


class ConfigError(UserError):
    kind = "bad_config"


class DataError(UserError):
    kind = "bad_data"


class ModelError(UserError):
    kind = "bad_model"


def lookup_path(path, error: type[UserError]) -> bool:
    """Whether ``path`` exists; a path the system cannot look up (a name too long, a folder on
    the way without search permission) is the person's to fix, reported as ``error``."""
    try:
        return path.exists()
    except OSError as exc:
        raise error(f"cannot look up the file ({exc.strerror or exc})", where=str(path),
                    fix="Check the path and the permissions of its folders.") from None


class StopRequested(Exception):
    """Raised inside the training loop after a graceful stop request has been honoured."""
