"""Export errors a person can fix (exit code 2 on the command line, a dialog in the GUI)."""

from __future__ import annotations

from ...errors import UserError


class ExportError(UserError):
    kind = "bad_export"
