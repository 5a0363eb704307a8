"""A virtual X display for napari's GUI tests and the screenshot script (Linux).

napari renders with OpenGL through Qt's xcb platform, which needs an X server: Qt's ``offscreen``
platform crashes napari's OpenGL canvas and ``Viewer(show=False)`` screenshots come out black. When
``DISPLAY`` is unset, :func:`ensure_display` starts ``Xvfb`` on a free display number (chosen by
Xvfb itself through ``-displayfd``, so parallel runs do not collide) and sets ``DISPLAY``.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys

#: Screen geometry of the virtual display (width x height x depth).
SCREEN = "1280x1024x24"

_proc: subprocess.Popen | None = None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to terminate Xvfb when the process that started it dies (even by a crash)."""
    import contextlib
    import ctypes
    import signal

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def ensure_display(timeout_s: float = 20.0) -> str | None:
    """Make sure Qt can open a window: return the ``DISPLAY`` in use (or ``None`` off Linux).

    Starts ``Xvfb`` (once per process, stopped at exit) when ``DISPLAY`` is unset on Linux.

    Raises:
        RuntimeError: no ``DISPLAY`` and ``Xvfb`` is not installed or does not start.
    """
    global _proc
    if not sys.platform.startswith("linux"):
        return None
    if os.environ.get("DISPLAY"):
        return os.environ["DISPLAY"]
    exe = shutil.which("Xvfb")
    if exe is None:
        raise RuntimeError(
            "napari needs an X server: set DISPLAY or install Xvfb (Debian: apt-get install xvfb)"
        )
    rfd, wfd = os.pipe()
    proc = subprocess.Popen(
        [exe, "-displayfd", str(wfd), "-screen", "0", SCREEN, "-nolisten", "tcp", "-noreset"],
        pass_fds=(wfd,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    os.close(wfd)
    import select

    number = b""
    ready, _, _ = select.select([rfd], [], [], timeout_s)
    if ready:
        while not number.endswith(b"\n"):
            chunk = os.read(rfd, 16)
            if not chunk:
                break
            number += chunk
    os.close(rfd)
    if not number.strip():
        proc.kill()
        raise RuntimeError(f"Xvfb did not start within {timeout_s:g} s")
    _proc = proc
    os.environ["DISPLAY"] = f":{number.decode().strip()}"
    atexit.register(stop_display)
    return os.environ["DISPLAY"]


def stop_display() -> None:
    """Stop the Xvfb started by :func:`ensure_display` (if any) and unset ``DISPLAY``."""
    global _proc
    if _proc is None:
        return
    _proc.terminate()
    try:
        _proc.wait(5)
    except subprocess.TimeoutExpired:
        _proc.kill()
    _proc = None
    os.environ.pop("DISPLAY", None)
