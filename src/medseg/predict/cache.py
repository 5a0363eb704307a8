"""Embedding cache: an in-memory LRU plus an optional folder of ``.npy`` files.

A disk entry's name is the SHA-256 of everything that determines the embedding: the volume's
content (array bytes, shape, dtype), the model name and weights digest, the slicing axis and
index, the intensity mapping (:attr:`medseg.intensity.Intensity.key`) and the encoder precision.
Writes are atomic (temporary file + rename); an unreadable entry is deleted and recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
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
            model, weights, axis, intensity, precision) as a dict; each slice's disk key adds its
            index.
    """

    def __init__(
        self,
        memory_items: int = 256,
        disk_dir: str | os.PathLike[str] | None = None,
        base_key: dict[str, Any] | None = None,
    ) -> None:
        self.memory_items = max(0, int(memory_items))
        self.disk_dir = Path(disk_dir).expanduser() if disk_dir is not None else None
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
                if arr.dtype != np.float32 or arr.ndim != 4 or not np.all(np.isfinite(arr)):
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
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{p.stem[:16]}.", suffix=".npy.part", dir=p.parent)
            try:
                with os.fdopen(fd, "wb") as fh:
                    np.save(fh, arr, allow_pickle=False)
                os.replace(tmp, p)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            self.stats["disk_writes"] += 1
        except OSError:  # a full or read-only cache folder must not stop the segmentation
            self.stats["disk_errors"] += 1

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
            **self.stats,
        }
