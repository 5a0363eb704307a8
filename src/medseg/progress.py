"""Progress reporting without GUI types: core functions take ``progress(done, total)``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

#: ``progress(done, total)``; called from the working thread. Raising inside it (e.g. a
#: napari cancel) aborts the work.
ProgressCallback = Callable[[int, int], None]


def null_progress(done: int, total: int) -> None:
    """A progress callback that does nothing."""


@contextmanager
def tqdm_progress(desc: str, enabled: bool = True) -> Iterator[ProgressCallback]:
    """A callback driving a tqdm bar on stderr (for the CLI); silent when not a TTY."""
    if not enabled:
        yield null_progress
        return
    from tqdm import tqdm

    bar = tqdm(desc=desc, unit="step", leave=False, dynamic_ncols=True, disable=None)
    try:

        def cb(done: int, total: int) -> None:
            if bar.total != total:
                bar.total = total
            bar.n = done
            bar.refresh()

        yield cb
    finally:
        bar.close()
