"""A workaround for a reference-count bug of PySide6 6.12.0 on Python 3.11 that crashes the app.

PySide6 6.12.0 returns ``None`` from every void method (``setText``, ``setValue``, ``update``, a
painter's ``save``...) and bools from ``SignalInstance.emit``/``disconnect`` without taking a
reference to them. From Python 3.12 on, ``None``, ``True`` and ``False`` are immortal and that is
harmless; on Python 3.11 each call takes one reference away, and after some hundred thousand
calls the count reaches zero and Python aborts ("Fatal Python error: none_dealloc" or
"bool_dealloc"). A window streaming a training run gets there within minutes. PySide6 6.11.3 does
not have the bug.

The workaround does on Python 3.11 what Python 3.12 does for these three objects: it gives them a
reference count so large that no realistic number of lost references can bring it to zero. They
are never deallocated in any case (the interpreter holds them for its whole life), so nothing
else changes. It is applied only when a probe shows references being lost, so a fixed PySide6 (or
Python 3.12+) is left untouched. It runs when ``qlora_studio.gui`` is imported, before any widget.
"""

from __future__ import annotations

import ctypes
import sys

from PySide6.QtCore import QObject, QRectF, Signal

PROBES = 64
#: References added to each singleton: 2**48 lost references at a million per second take 9 years.
RESERVE = 1 << 48

applied = False


class _Probe(QObject):
    signal = Signal(object)


def lost_references() -> dict[str, int]:
    """References to None and True that ``PROBES`` void calls and emits fail to take."""
    rect = QRectF()
    probe = _Probe()
    none_before = sys.getrefcount(None)
    for _ in range(PROBES):
        rect.setHeight(1.0)  # a void method: returns None
    none_lost = none_before - sys.getrefcount(None)
    true_before = sys.getrefcount(True)
    for _ in range(PROBES):
        probe.signal.emit(0)  # returns True
    true_lost = true_before - sys.getrefcount(True)
    probe.deleteLater()
    return {"None": none_lost, "True": true_lost}


def apply() -> bool:
    """Give None, True and False a reserve of references if this PySide6 loses them."""
    global applied
    if applied or sys.version_info >= (3, 12):
        return applied
    lost = lost_references()
    if max(lost.values()) < PROBES // 2:
        return False
    for singleton in (None, True, False):
        refcount = ctypes.c_ssize_t.from_address(id(singleton))  # ob_refcnt, the object's first field
        refcount.value += RESERVE
    applied = True
    return True
