"""Embedding cache: an in-memory LRU plus an optional folder of ``.npy`` files.

A disk entry's name is the SHA-256 of everything that determines the embedding: the volume's
content (array bytes, shape, dtype), the model name and weights digest, the slicing axis and
index, the intensity mapping (:attr:`medseg.intensity.Intensity.key`) and the encoder precision.
Writes go through :func:`medseg.io.atomic.atomic_path` (temporary file, size check, rename); an
unreadable entry, or one of the wrong shape or dtype, is deleted and recomputed. A cache folder that
cannot be created or written (read-only ``MEDSEG_HOME``, full disk) turns the disk tier off with one
warning; the job still runs from memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

CACHE_VERSION = 1

#: Default size budget of a disk cache folder (MiB); ``MEDSEG_CACHE_MAX_MB`` overrides it.
DEFAULT_MAX_MB = 4096


def default_cache_dir() -> Path:
    """``medseg_home()/embeddings``: the disk cache folder when one is asked for without a path."""
    from medseg.models.weights import medseg_home

    return medseg_home() / "embeddings"


def disk_budget_bytes() -> int:
    """Disk cache budget in bytes: ``$MEDSEG_CACHE_MAX_MB`` (MiB) or :data:`DEFAULT_MAX_MB`."""
    try:
        mb = float(os.environ.get("MEDSEG_CACHE_MAX_MB", DEFAULT_MAX_MB))
    except ValueError:
        mb = DEFAULT_MAX_MB
    return int(max(mb, 0) * 2**20)


def prune_disk_cache(folder: str | os.PathLike[str], max_bytes: int) -> int:
    """Delete the least recently written ``.npy`` entries until the folder holds ``max_bytes``.

    Returns:
        Number of files removed.
    """
    root = Path(folder)
    if not root.is_dir():
        return 0
    entries = []
    for f in root.glob("*/*.npy"):
        try:
            st = f.stat()
        except OSError:
            continue
        entries.append((st.st_mtime_ns, st.st_size, f))
    total = sum(e[1] for e in entries)
    removed = 0
    for _, size, f in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        with contextlib.suppress(OSError):
            f.unlink()
            removed += 1
            total -= size
    return removed


def array_digest(array: np.ndarray) -> str:
    """SHA-256 of an array's bytes (C order), shape and dtype."""
    a = np.ascontiguousarray(array)
    h = hashlib.sha256()
    h.update(f"{a.shape}|{a.dtype.str}|".encode())
    h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def entry_key(**parts: Any) -> str:
    """A stable SHA-256 hex key of named parts (sorted JSON)."""
    text = json.dumps({"v": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class EmbeddingCache:
    """Memory LRU of ``(1, C, h, w)`` float32 embeddings by slice index, backed by an optional
    disk folder.

    Args:
        memory_items: most slices kept in memory (``0`` disables the memory tier).
        disk_dir: folder for ``.npy`` entries, or ``None`` for memory only.
        base_key: the parts that are the same for every slice of one predictor (volume digest,
            model, weights, axis, spacing, intensity, precision) as a dict; each slice's disk key
            adds its index.
        entry_shape: the shape every entry must have, e.g. ``(1, 256, 64, 64)``; a disk entry of
            another shape (or not float32, or not finite) is a miss. ``None``: any 4D shape.
    """

    def __init__(
        self,
        memory_items: int = 256,
        disk_dir: str | os.PathLike[str] | None = None,
        base_key: dict[str, Any] | None = None,
        entry_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.memory_items = max(0, int(memory_items))
        self.entry_shape = tuple(int(v) for v in entry_shape) if entry_shape else None
        self.warning: str | None = None
        self.disk_dir = Path(disk_dir).expanduser() if disk_dir is not None else None
        if self.disk_dir is not None:
            self.disk_dir = self._usable(self.disk_dir)
        self.base_key = dict(base_key or {})
        self._mem: OrderedDict[int, np.ndarray] = OrderedDict()
        self._lock = threading.RLock()
        self.stats = {
            "memory_hits": 0,
            "disk_hits": 0,
            "misses": 0,
            "disk_writes": 0,
            "disk_errors": 0,
        }

    def _usable(self, folder: Path) -> Path | None:
        """``folder`` when it can be created and written, else ``None`` with one warning."""
        from medseg.io.atomic import os_reason

        try:
            folder.mkdir(parents=True, exist_ok=True)
            ok = os.access(folder, os.W_OK | os.X_OK)
            reason = "permission denied"
        except OSError as exc:
            ok, reason = False, os_reason(exc)
        if not ok:
            self._disable(f"embedding cache folder {folder} cannot be written ({reason})")
            return None
        return folder

    def _disable(self, why: str) -> None:
        """Turn the disk tier off, warning once."""
        self.disk_dir = None
        if self.warning is None:
            self.warning = f"{why}; running without a disk cache (set MEDSEG_HOME or --cache-dir)"
            warnings.warn(self.warning, RuntimeWarning, stacklevel=3)

    def valid(self, arr: np.ndarray) -> bool:
        """Whether ``arr`` can be an entry: float32, 4D (:attr:`entry_shape` if set), finite."""
        if not isinstance(arr, np.ndarray) or arr.dtype != np.float32 or arr.ndim != 4:
            return False
        if self.entry_shape is not None and tuple(arr.shape) != self.entry_shape:
            return False
        return bool(np.all(np.isfinite(arr)))

    # ----------------------------------------------------------------- keys
    def key(self, index: int) -> str:
        """Disk key of slice ``index``."""
        return entry_key(index=int(index), **self.base_key)

    def path(self, index: int) -> Path | None:
        """Disk file of slice ``index`` (``None`` without a disk folder)."""
        if self.disk_dir is None:
            return None
        k = self.key(index)
        return self.disk_dir / k[:2] / f"{k}.npy"

    # ----------------------------------------------------------------- access
    def in_memory(self, index: int) -> bool:
        with self._lock:
            return int(index) in self._mem

    def on_disk(self, index: int) -> bool:
        p = self.path(index)
        return p is not None and p.is_file()

    def get(self, index: int) -> np.ndarray | None:
        """The embedding of slice ``index`` from memory, then disk; ``None`` when absent."""
        i = int(index)
        with self._lock:
            hit = self._mem.get(i)
            if hit is not None:
                self._mem.move_to_end(i)
                self.stats["memory_hits"] += 1
                return hit
        p = self.path(i)
        if p is not None and p.is_file():
            try:
                arr = np.load(p, allow_pickle=False)
                if not self.valid(arr):
                    raise ValueError("bad entry")
            except (OSError, ValueError, EOFError):
                self.stats["disk_errors"] += 1
                with contextlib.suppress(OSError):
                    p.unlink()
            else:
                self.stats["disk_hits"] += 1
                with contextlib.suppress(OSError):
                    os.utime(p)  # recently used entries survive pruning
                self._remember(i, arr)
                return arr
        self.stats["misses"] += 1
        return None

    def put(self, index: int, embedding: np.ndarray) -> None:
        """Store ``embedding`` ``(1, C, h, w)`` float32 for slice ``index`` (memory + disk)."""
        arr = np.ascontiguousarray(embedding, dtype=np.float32)
        i = int(index)
        self._remember(i, arr)
        p = self.path(i)
        if p is None or p.is_file():
            return
        from medseg.errors import OutputError
        from medseg.io.atomic import atomic_path

        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(p, verify=_check_npy) as tmp, open(tmp, "wb") as fh:
                np.save(fh, arr, allow_pickle=False)
            self.stats["disk_writes"] += 1
        except (OSError, OutputError) as exc:  # a full or read-only folder must not stop the job
            self.stats["disk_errors"] += 1
            self._disable(f"cannot write the embedding cache: {exc}")

    def _remember(self, index: int, arr: np.ndarray) -> None:
        if self.memory_items == 0:
            return
        with self._lock:
            self._mem[index] = arr
            self._mem.move_to_end(index)
            while len(self._mem) > self.memory_items:
                self._mem.popitem(last=False)

    def clear_memory(self) -> None:
        with self._lock:
            self._mem.clear()

    def info(self) -> dict[str, Any]:
        """Counts: memory items/bytes, hits, misses, disk writes/errors, disk folder."""
        with self._lock:
            nbytes = int(sum(a.nbytes for a in self._mem.values()))
            n = len(self._mem)
        return {
            "memory_items": n,
            "memory_bytes": nbytes,
            "memory_limit_items": self.memory_items,
            "disk_dir": str(self.disk_dir) if self.disk_dir is not None else None,
            "warning": self.warning,
            **self.stats,
        }


def _check_npy(path: Path) -> None:
    """Raise when a just-written ``.npy`` does not hold its whole array (header + data length)."""
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    need = int(arr.nbytes) + int(arr.offset)
    if path.stat().st_size < need:
        raise OSError(f"{path.name}: short write")
