"""The one atomic, verified writer every output in the project goes through.

Files: :func:`atomic_path` yields a temporary path beside the target (``.NAME.<pid>.<rand>.part``
plus the target's suffix, so format-sniffing writers such as SimpleITK still work). When the
``with`` body ends, the helper checks the file (exists, optional ``verify(tmp)``, optional
``expected_size``), fsyncs it, gives it the usual ``0666 & ~umask`` mode and ``os.replace``-s it
onto the target, then fsyncs the folder. Folders: :func:`atomic_dir` does the same for a folder
(a DICOM series, a dataset): it is filled under a temporary name, verified, fsynced and renamed, so
nothing at the target ever claims to be complete when it is not.

On failure nothing is left at the target and the temporary file/folder is removed; an ``OSError``
(or a failed verification) becomes :class:`~medseg.errors.OutputError` naming the target and the
OS reason ("disk full", "file too large", "permission denied", ...). Other exceptions propagate
unchanged. Temporary files of a process killed mid-write (SIGKILL) cannot be removed by it; the
next write to the same target removes them (their name carries the dead writer's pid).

Text outputs: :func:`write_text`, :func:`write_json`, :func:`write_csv` (check the path, write,
verify the size, rename). This module imports only the standard library.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from medseg.errors import OutputError

#: OS error numbers -> the words a user reads.
_REASONS = {
    errno.ENOSPC: "disk full",
    errno.EFBIG: "file too large (file-size limit or quota)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "read-only file system",
    errno.ENOENT: "folder does not exist",
    errno.ENOTDIR: "a path component is not a folder",
    errno.EISDIR: "is a folder",
    errno.EIO: "input/output error",
    errno.ENAMETOOLONG: "file name too long",
}

Verify = Callable[[Path], None]


def os_reason(exc: BaseException) -> str:
    """Short human reason for an ``OSError`` (``"disk full"``, ``"permission denied"``, ...)."""
    if isinstance(exc, OSError):
        if exc.errno in _REASONS:
            return _REASONS[exc.errno]
        if exc.strerror:
            return exc.strerror.lower()
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def output_error(target: str | os.PathLike[str], exc: BaseException) -> OutputError:
    """An :class:`OutputError` ``"TARGET: cannot write: REASON; ..."`` for ``exc``."""
    if isinstance(exc, OutputError):
        return exc
    return OutputError(
        f"{target}: cannot write: {os_reason(exc)}; nothing was written (free space, raise the "
        "limit, or choose another folder)"
    )


def short_write_reason(need: int) -> str:
    """Why a file came out shorter than ``need`` bytes when the writer did not say (ITK prints
    to stderr and returns): the process file-size limit, else a full disk, else unknown."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY and soft < need:
            return _REASONS[errno.EFBIG]
    except (ImportError, OSError, ValueError):
        pass
    return "incomplete write (disk full?)"


def check_output_path(
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """Validate an output file path before any work is done (creates its folder).

    Raises:
        OutputError: it names an input, exists (without ``overwrite``), is a folder, or its folder
            is not writable / cannot be created.
    """
    o = Path(out)
    ro = o.resolve()
    for inp in inputs:
        ri = Path(inp).resolve()
        if ro == ri or (ri.is_dir() and ri in ro.parents):
            raise OutputError(f"{o}: output path is an input ({inp}); choose another output")
    if o.is_dir():
        raise OutputError(f"{o}: is a folder; give a file name")
    if o.exists() and not overwrite:
        raise OutputError(f"{o}: already exists; pass --overwrite to replace it")
    parent = o.parent if str(o.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{o}: cannot create folder {parent}: {os_reason(exc)}") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{o}: folder {parent} is not writable (permission denied)")
    return o


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _suffix(name: str) -> str:
    low = name.lower()
    for double in (".nii.gz", ".tar.gz"):
        if low.endswith(double):
            return name[-len(double) :]
    return Path(name).suffix


def _prefix(target: Path) -> str:
    """Temporary names: ``.NAME.<pid>.<random>.part...`` (the pid lets a later write clean up)."""
    return f".{target.name}.{os.getpid()}."


_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.part")


def _remove_own_parts(target: Path) -> None:
    """Remove this process's temporary entries for ``target`` — also one whose name ``mkstemp``
    or ``mkdtemp`` had not returned yet when an interrupt (Ctrl-C) arrived."""
    folder = target.parent if str(target.parent) else Path(".")
    prefix = _prefix(target)
    with contextlib.suppress(OSError):
        for e in folder.iterdir():
            if e.name.startswith(prefix) and ".part" in e.name:
                with contextlib.suppress(OSError):
                    if e.is_dir() and not e.is_symlink():
                        shutil.rmtree(e)
                    else:
                        e.unlink()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale_parts(target: Path) -> int:
    """Remove temporary files/folders of ``target`` left by writers that were killed.

    Returns:
        Number of entries removed.
    """
    removed = 0
    folder = target.parent if str(target.parent) else Path(".")
    try:
        entries = list(folder.iterdir())
    except OSError:
        return 0
    for e in entries:
        m = _STALE.match(e.name)
        if m is None or m.group("name") != target.name or _pid_alive(int(m.group("pid"))):
            continue
        with contextlib.suppress(OSError):
            if e.is_dir() and not e.is_symlink():
                shutil.rmtree(e)
            else:
                e.unlink()
            removed += 1
    return removed


def _fsync_path(path: Path, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.EROFS):
            raise
    finally:
        os.close(fd)


def _remove_tmp_file(tmp: Path) -> None:
    """Remove ``tmp`` and any sibling a multi-file writer made from its stem (``.mhd``+``.raw``)."""
    with contextlib.suppress(OSError):
        tmp.unlink()
    stem = tmp.name.split(".part")[0] + ".part"
    with contextlib.suppress(OSError):
        for sib in tmp.parent.iterdir():
            if sib.name.startswith(stem):
                with contextlib.suppress(OSError):
                    sib.unlink()


@contextlib.contextmanager
def atomic_path(
    out: str | os.PathLike[str],
    verify: Verify | None = None,
    expected_size: int | None = None,
) -> Iterator[Path]:
    """Yield a temporary path beside ``out`` (same suffix); verify it and rename it onto ``out``.

    Usage::

        with atomic_path(target, verify=check) as tmp:
            writer(tmp)              # anything that creates the file ``tmp``

    Args:
        out: the destination file; its folder must exist (see :func:`check_output_path`).
        verify: ``verify(tmp)`` raises (any exception) when the written file is not whole.
        expected_size: the exact size in bytes the file must have (checked before ``verify``).

    Raises:
        OutputError: an ``OSError`` in the body or in the rename, a missing/short file, or a
            failed verification; the message names ``out`` and the reason. ``out`` is untouched
            and the temporary file is removed. Other exceptions from the body propagate as is.
    """
    o = Path(out)
    folder = o.parent if str(o.parent) else Path(".")
    remove_stale_parts(o)
    try:
        try:
            fd, name = tempfile.mkstemp(
                prefix=_prefix(o), suffix=f".part{_suffix(o.name)}", dir=folder
            )
        except OSError as exc:
            raise output_error(o, exc) from None
        os.close(fd)
    except BaseException:  # an interrupt between creating the file and knowing its name
        _remove_own_parts(o)
        raise
    tmp = Path(name)
    try:
        try:
            yield tmp
            _finish_file(o, tmp, verify, expected_size)
        except OSError as exc:
            raise output_error(o, exc) from None
        except OutputError as exc:  # a nested writer named the temporary path: name the target
            raise _renamed(exc, tmp, o) from None
    except BaseException:
        _remove_tmp_file(tmp)
        raise


def _finish_file(o: Path, tmp: Path, verify: Verify | None, expected_size: int | None) -> None:
    if not tmp.is_file():
        raise OutputError(f"{o}: cannot write: the writer produced no file; nothing was written")
    size = tmp.stat().st_size
    if expected_size is not None and size != expected_size:
        reason = short_write_reason(expected_size) if size < expected_size else "size mismatch"
        raise OutputError(
            f"{o}: cannot write: {reason} (wrote {size} of {expected_size} bytes); "
            "nothing was written"
        )
    if verify is not None:
        try:
            verify(tmp)
        except OutputError:
            raise
        except Exception as exc:
            raise OutputError(
                f"{o}: cannot write: the written file does not read back ({os_reason(exc)}); "
                "nothing was written"
            ) from None
    _fsync_path(tmp)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
    os.replace(tmp, o)
    _fsync_path(o.parent if str(o.parent) else Path("."), directory=True)


def _renamed(exc: OutputError, tmp: Path, target: Path) -> OutputError:
    text = str(exc)
    for t in (str(tmp), tmp.name):
        text = text.replace(t, str(target) if t == str(tmp) else target.name)
    return OutputError(text)


def prepare_output_dir(folder: str | os.PathLike[str], overwrite: bool = False) -> Path:
    """Validate an output folder before any work: it must not exist or be empty (unless
    ``overwrite``); its parent is created and must be writable.

    Raises:
        OutputError: a file is in the way, the folder is not empty, or the parent is unusable.
    """
    out = Path(folder)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out}: exists and is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputError(
            f"{out}: folder exists and is not empty; choose another folder or pass --overwrite"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{out}: cannot create folder {out.parent}: {os_reason(exc)}") from None
    if not os.access(out.parent, os.W_OK):
        raise OutputError(f"{out}: folder {out.parent} is not writable (permission denied)")
    return out


@contextlib.contextmanager
def atomic_dir(
    out: str | os.PathLike[str],
    verify: Verify | None = None,
    overwrite: bool = False,
) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; verify, fsync and rename it onto ``out``.

    An existing empty ``out`` is replaced; a non-empty one only with ``overwrite`` (it is moved
    aside, the new folder renamed in, then the old one removed; on failure it is put back).

    Args:
        out: the destination folder.
        verify: ``verify(tmp_folder)`` raises when the written folder is not whole.
        overwrite: replace a non-empty ``out``.

    Raises:
        OutputError: as :func:`atomic_path`; the temporary folder is removed, ``out`` untouched.
    """
    o = prepare_output_dir(out, overwrite)
    remove_stale_parts(o)
    try:
        try:
            tmp = Path(tempfile.mkdtemp(prefix=_prefix(o), suffix=".part", dir=o.parent))
            os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700 folders
        except OSError as exc:
            raise output_error(o, exc) from None
    except BaseException:  # an interrupt between creating the folder and knowing its name
        _remove_own_parts(o)
        raise
    try:
        try:
            yield tmp
            if verify is not None:
                try:
                    verify(tmp)
                except OutputError:
                    raise
                except Exception as exc:
                    raise OutputError(
                        f"{o}: cannot write: the written folder does not read back "
                        f"({os_reason(exc)}); nothing was written"
                    ) from None
            for root, _dirs, files in os.walk(tmp):
                for f in files:
                    _fsync_path(Path(root) / f)
                _fsync_path(Path(root), directory=True)
            _swap_dir(tmp, o)
            _fsync_path(o.parent, directory=True)
        except OSError as exc:
            raise output_error(o, exc) from None
        except OutputError as exc:  # a writer inside named its temporary path: name the target
            raise _renamed(exc, tmp, o) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_own_parts(o)
        raise


def _swap_dir(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` onto ``out``; an existing ``out`` is moved aside first and removed after."""
    old: Path | None = None
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():
        old = Path(tempfile.mkdtemp(prefix=_prefix(out), suffix=".part", dir=out.parent))
        old.rmdir()
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            with contextlib.suppress(OSError):
                os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- text outputs
def write_bytes(
    data: bytes,
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """Write ``data`` atomically to ``out`` (size verified before the rename).

    Raises:
        OutputError: bad output path (see :func:`check_output_path`) or the write failed.
    """
    o = check_output_path(out, inputs, overwrite)
    with atomic_path(o, expected_size=len(data)) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
    return o


def write_text(
    text: str,
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
    encoding: str = "utf-8",
) -> Path:
    """Write ``text`` atomically to ``out`` (``encoding``, no newline translation)."""
    return write_bytes(text.encode(encoding), out, inputs, overwrite)


def json_default(obj: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars/arrays and paths."""
    if isinstance(obj, Path):
        return str(obj)
    tolist = getattr(obj, "tolist", None)  # numpy scalars and arrays, without importing numpy
    if callable(tolist) and type(obj).__module__ == "numpy":
        return tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(
    data: Any,
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """Write ``data`` as indented UTF-8 JSON (numpy values and paths converted) atomically.

    Raises:
        OutputError: bad output path or the write failed.
        TypeError: ``data`` holds something JSON cannot represent.
    """
    text = json.dumps(data, indent=2, default=json_default, ensure_ascii=False) + "\n"
    return write_text(text, out, inputs, overwrite)


def write_csv(
    rows: Iterable[Mapping[str, Any]],
    out: str | os.PathLike[str],
    columns: Sequence[str] | None = None,
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """Write dict rows as CSV atomically.

    Args:
        rows: one mapping per row; missing keys are written empty.
        columns: column order; default: keys in order of first appearance.

    Raises:
        OutputError: bad output path or the write failed.
    """
    rows = list(rows)
    cols = list(columns) if columns is not None else []
    if columns is None:
        for r in rows:
            cols.extend(k for k in r if k not in cols)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(dict(r))
    return write_text(buf.getvalue(), out, inputs, overwrite)
