"""Shared widget plumbing: background jobs with napari progress + cancel, layer pickers, errors.

Widget modules import this; it imports napari/Qt/magicgui (never torch at module import).
"""

from __future__ import annotations

import contextlib
import logging
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from medseg.errors import InputError, MedsegError

if TYPE_CHECKING:
    import napari

log = logging.getLogger(__name__)


def guard_triton() -> bool:
    """Keep torch from importing triton once an LLVM-based OpenGL driver is loaded.

    Mesa's llvmpipe/radeonsi drivers map their own ``libLLVM`` into the process when napari opens
    its canvas; triton bundles another LLVM and importing it afterwards crashes the process
    (segmentation fault inside ``import triton``, reached from ``import torchvision``). medseg never
    uses triton (no ``torch.compile``), so when such a library is mapped and triton is not yet
    imported, ``sys.modules['triton']`` is set to ``None``: torch then treats triton as absent.

    Returns:
        True when triton was blocked.
    """
    import sys

    if "triton" in sys.modules or not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            maps = fh.read()
    except OSError:
        return False
    if "libLLVM" not in maps:
        return False
    sys.modules["triton"] = None  # type: ignore[assignment]
    return True


class Cancelled(Exception):
    """Raised inside a core progress callback when the user pressed Cancel."""


def show_error(message: str) -> None:
    """A napari error notification (the core's one-line message)."""
    from napari.utils.notifications import show_error as _show_error

    _show_error(message)


def show_info(message: str) -> None:
    """A napari info notification."""
    from napari.utils.notifications import show_info as _show_info

    _show_info(message)


def chosen_path(value: Any) -> str | None:
    """A magicgui file/folder box's value, or ``None`` when nothing is chosen (an empty box
    reads ``.``)."""
    if value is None or str(value) in ("", "."):
        return None
    return str(value)


def unet_model_source(model: str, checkpoint: Any, demo: str = "unet-demo") -> str:
    """The U-Net to run: the shipped ``demo`` or the chosen checkpoint file.

    Raises:
        InputError: a checkpoint is asked for but none is chosen.
    """
    if model == demo:
        return demo
    path = chosen_path(checkpoint)
    if path is None:
        raise InputError(f"choose a checkpoint file (.pt) or the {demo} model")
    return path


def error_message(exc: BaseException) -> str:
    """The text shown for an exception: a MedsegError's own message, else type + message."""
    if isinstance(exc, MedsegError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


class Job:
    """Runs ``fn(progress)`` in a napari thread worker, one at a time per owner.

    ``progress(done, total)`` (the core's callback) moves a napari progress bar (updated on the
    main thread) and raises :class:`Cancelled` once :meth:`cancel` was called, which aborts the
    core function. Results come back on the main thread through ``on_done``; errors become napari
    notifications with the core's message.

    Attributes:
        busy: a job is running.
        last_error: message of the last failed job (``None`` after a success), for status/tests.
        cancelled: the last job ended by a cancel.
    """

    def __init__(self, status: Callable[[str], None] | None = None) -> None:
        self.busy = False
        self.last_error: str | None = None
        self.cancelled = False
        self.worker: Any = None
        self._cancel_requested = False
        self._pbar: Any = None
        self._status = status or (lambda _msg: None)
        guard_triton()
        from superqt.utils import ensure_main_thread

        self._set_progress = ensure_main_thread(self._set_progress_main)

    # -- main thread
    def _set_progress_main(self, done: int, total: int) -> None:
        if self._pbar is None:
            return
        if total and self._pbar.total != total:
            self._pbar.total = total
        if done != self._pbar.n:
            self._pbar.update(done - self._pbar.n)

    def _progress(self, done: int, total: int) -> None:  # worker thread
        if self._cancel_requested:
            raise Cancelled("cancelled")
        self._set_progress(int(done), int(total))

    def start(
        self,
        fn: Callable[[Callable[[int, int], None]], Any],
        desc: str,
        on_done: Callable[[Any], None],
    ) -> bool:
        """Start ``fn(progress)`` in a worker; ``on_done(result)`` runs on the main thread.

        Returns:
            False (and a notification) when a job is already running.
        """
        if self.busy:
            show_info("medseg: a job is already running; wait for it or press Cancel")
            return False
        from napari.qt.threading import create_worker
        from napari.utils import progress

        self.busy = True
        self.cancelled = False
        self.last_error = None
        self._cancel_requested = False
        self._pbar = progress(total=0, desc=desc)
        self._status(f"{desc}…")

        def returned(result: Any) -> None:
            try:
                on_done(result)
            except Exception as exc:  # showing the result failed: still report it clearly
                self._fail(exc)

        # errors are ours to report (one notification with the core message), not napari's
        worker = create_worker(fn, self._progress, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(returned)
        worker.errored.connect(self._errored)
        worker.finished.connect(self._finished)
        self.worker = worker
        worker.start()
        return True

    def cancel(self) -> None:
        """Ask the running job to stop at its next progress call."""
        if self.busy:
            self._cancel_requested = True
            self._status("cancelling…")

    def _fail(self, exc: BaseException) -> None:
        msg = error_message(exc)
        self.last_error = msg
        if not isinstance(exc, MedsegError):
            log.error("medseg job failed:\n%s", "".join(traceback.format_exception(exc)))
        self._status(f"error: {msg}")
        show_error(msg)

    def _errored(self, exc: BaseException) -> None:
        if isinstance(exc, Cancelled):
            self.cancelled = True
            self._status("cancelled")
            show_info("medseg: cancelled")
            return
        self._fail(exc)

    def _finished(self) -> None:
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        self.busy = False
        self.worker = None


def status_label(text: str = "") -> Any:
    """A magicgui Label that wraps long messages instead of widening the dock."""
    from magicgui.widgets import Label

    label = Label(value=text)
    label.native.setWordWrap(True)
    return label


def layer_choices(viewer: napari.Viewer, kind: str) -> Callable[[Any], list[tuple[str, Any]]]:
    """A magicgui ``choices`` callable listing the viewer's layers of one kind
    (``"image"``, ``"labels"``, ``"points"``, ``"shapes"``) as ``(name, layer)``."""
    import napari.layers

    cls = {
        "image": napari.layers.Image,
        "labels": napari.layers.Labels,
        "points": napari.layers.Points,
        "shapes": napari.layers.Shapes,
    }[kind]

    def choices(_widget: Any = None) -> list[tuple[str, Any]]:
        return [(layer.name, layer) for layer in viewer.layers if isinstance(layer, cls)]

    return choices


def keep_choices_fresh(viewer: napari.Viewer, container: Any) -> None:
    """Refresh the container's layer pickers when layers are added, removed or renamed."""

    def refresh(*_args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # widget already deleted
            container.reset_choices()

    viewer.layers.events.inserted.connect(refresh)
    viewer.layers.events.removed.connect(refresh)
    viewer.layers.events.reordered.connect(refresh)


def slice_index(viewer: napari.Viewer, layer: Any, axis: int = 0) -> int:
    """The data index along ``axis`` of ``layer`` at the viewer's current position
    (world position → layer data coordinates, rounded and clipped)."""
    import numpy as np

    ndim = layer.ndim
    point = np.asarray(viewer.dims.point, dtype=float)[-ndim:]
    data = np.asarray(layer.world_to_data(point), dtype=float)
    n = layer.data.shape[axis]
    return int(np.clip(round(float(data[axis])), 0, n - 1))


def goto_slice(viewer: napari.Viewer, layer: Any, index: int, axis: int = 0) -> None:
    """Move the viewer to data slice ``index`` along ``axis`` of ``layer``."""
    import numpy as np

    ndim = layer.ndim
    point = np.asarray(viewer.dims.point, dtype=float)[-ndim:].copy()
    data = np.asarray(layer.world_to_data(point), dtype=float)
    data[axis] = index
    world = np.asarray(layer.data_to_world(data), dtype=float)
    offset = len(viewer.dims.point) - ndim
    viewer.dims.set_point(offset + axis, float(world[axis]))
