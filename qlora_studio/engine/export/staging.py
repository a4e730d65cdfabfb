"""Atomic output folders: an export is either absent, complete, or (while running) hidden.

Everything is written into a hidden sibling folder ``.NAME.partial-PID-XXXX``, every file and the
folder are fsync'ed, and only then is the folder renamed to ``NAME``. A crash, a kill or an
exception at any point therefore never leaves a folder named ``NAME`` holding half an export. A
partial folder left behind by a killed process is removed by the next export to the same place
once its process is gone.

Replacing an existing export needs ``overwrite=True``. The old folder is first renamed aside, the
new one renamed into place, and the old one deleted: at every moment ``NAME`` is either the old
complete export, briefly missing, or the new complete export.

Torch-free.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ...runs import pid_alive
from .errors import ExportError

#: Headroom added to every size estimate: file-system metadata, the card, rounding.
SPACE_MARGIN = 64 * 1024 * 1024

_PARTIAL = re.compile(r"^\.(?P<name>.+)\.(?:partial|old)-(?P<pid>\d+)-[0-9a-f]+$")


def free_bytes(folder: Path) -> int:
    """Free space for an unprivileged writer in ``folder`` (the nearest existing ancestor)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def check_free_space(folder: Path, needed: int) -> None:
    """Refuse to start an export that cannot fit, before a single byte is written."""
    free = free_bytes(folder)
    if free < needed + SPACE_MARGIN:
        raise ExportError(
            f"not enough free disk space: the export needs about {human_bytes(needed + SPACE_MARGIN)}, "
            f"{human_bytes(free)} is free",
            where=str(folder),
            fix="Free some space or choose another output folder (--out).",
        )


def check_target(out: Path, overwrite: bool) -> None:
    """An existing output is replaced only when asked to."""
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ExportError(
                "the output folder already exists",
                where=str(out),
                fix="Choose another folder (--out), or replace it with --overwrite.",
            )
        if not out.is_dir():
            raise ExportError("the output path exists and is not a folder", where=str(out), fix="Choose another --out.")


def remove_stale_partials(out: Path) -> list[Path]:
    """Delete partial folders of earlier exports to ``out`` whose process is no longer alive."""
    removed = []
    parent = out.parent
    if not parent.is_dir():
        return removed
    for child in parent.iterdir():
        m = _PARTIAL.match(child.name)
        if m and m.group("name") == out.name and child.is_dir() and not pid_alive(int(m.group("pid"))):
            shutil.rmtree(child, ignore_errors=True)
            removed.append(child)
    return removed


def is_partial(path: Path) -> bool:
    """True for the hidden staging folders this module writes (for tests and listings)."""
    return _PARTIAL.match(path.name) is not None


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sibling(out: Path, kind: str) -> Path:
    return out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"


@contextmanager
def staged_folder(out: Path, *, overwrite: bool) -> Iterator[Path]:
    """Yield an empty hidden folder; on normal exit it becomes ``out``, on error it disappears."""
    out = Path(out)
    check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    staging = _sibling(out, "partial")
    staging.mkdir()
    try:
        yield staging
        _fsync_tree(staging)
        # Checked again: another process may have created it while we were writing.
        check_target(out, overwrite)
        old = None
        if out.exists():
            old = _sibling(out, "old")
            out.rename(old)
        try:
            staging.rename(out)
        except BaseException:
            if old is not None:
                old.rename(out)
            raise
        _fsync_dir(out.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        # A full disk, a quota, a folder that went away: the person can act on it, and nothing
        # half-written is left behind.
        shutil.rmtree(staging, ignore_errors=True)
        raise ExportError(
            f"could not write the export ({exc.strerror or exc})",
            where=str(out.parent),
            fix="Free disk space (or pick another --out folder) and export again; nothing half-written was kept.",
        ) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
