"""A private X display for scripts that need a real window (screenshots, launch benchmarks).

``xvfb-run -a`` can hand two concurrent callers the same display number, and the display then
vanishes when the other caller finishes. :func:`start_xvfb` lets the X server pick a free number
itself (``-displayfd``), so several of these scripts can run side by side.
"""

from __future__ import annotations

import os
import shutil
import subprocess


def start_xvfb(screen: str = "1920x1200x24") -> subprocess.Popen[bytes]:
    """Start Xvfb on a free display, set ``DISPLAY`` for this process and its children, return it."""
    if shutil.which("Xvfb") is None:
        raise SystemExit("Xvfb is not installed (Debian/Ubuntu: apt-get install xvfb)")
    read_fd, write_fd = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", screen, "-nolisten", "tcp"],
        pass_fds=(write_fd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_fd)
    with os.fdopen(read_fd) as pipe:
        number = pipe.readline().strip()
    if not number:
        server.kill()
        raise SystemExit("Xvfb did not start")
    os.environ["DISPLAY"] = f":{number}"
    os.environ.pop("QT_QPA_PLATFORM", None)
    return server
