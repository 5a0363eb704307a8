"""NIfTI / NRRD / MHA through SimpleITK. SimpleITK converts NIfTI's RAS to LPS on read and back
on write (its qform/sform handling is what ITK-SNAP and 3D Slicer use), so this is the one place the
RAS⇄LPS flip happens for files."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError, OutputError
from medseg.volume import LabelMap, Volume

_LABEL_KEY = "medseg_labels"


#: A header whose voxels need more bytes than this is refused before allocating
#: (``MEDSEG_MAX_IMAGE_BYTES`` overrides; default: half the machine's memory).
def max_image_bytes() -> int:
    """Largest voxel buffer (bytes) a reader may allocate."""
    env = os.environ.get("MEDSEG_MAX_IMAGE_BYTES")
    if env:
        with contextlib.suppress(ValueError):
            return int(float(env))
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2)
    except (ValueError, OSError, AttributeError):
        return 8 << 30


#: Largest ratio of decoded to stored bytes a compressed image may claim (zlib's limit ~1032).
_MAX_COMPRESSION = 1100

_ITK_LOCK = threading.RLock()


@contextlib.contextmanager
def itk_quiet() -> Iterator[list[str]]:
    """Run ITK code with its warning display off and C-level stdout/stderr captured.

    ITK, niftilib and vnl print multi-line diagnostics straight to file descriptor 2
    (``vnl_svd ... suspicious return value``, ``** ERROR: NWAD: wrote only N of M bytes``). Inside
    this block they are captured; the yielded list is filled, on exit, with one line per message
    (to report as warnings or errors). Lines that are not ITK's are passed through to stderr.
    """
    import SimpleITK as sitk

    sitk.ProcessObject_SetGlobalWarningDisplay(False)
    lines: list[str] = []
    texts: dict[int, str] = {}
    with _ITK_LOCK, tempfile.TemporaryFile() as cap1, tempfile.TemporaryFile() as cap2:
        caps = {1: cap1, 2: cap2}
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()
        saved: dict[int, int] = {}
        for fd in list(caps):
            try:
                saved[fd] = os.dup(fd)
            except OSError:  # no such descriptor (a daemon, pythonw): nothing to capture
                del caps[fd]
        for fd, cap in caps.items():
            os.dup2(cap.fileno(), fd)
        try:
            yield lines
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    stream.flush()
            for fd, cap in caps.items():
                os.dup2(saved[fd], fd)
                os.close(saved[fd])
                cap.seek(0)
                texts[fd] = cap.read(1 << 20).decode("utf-8", "replace")
    for fd, text in texts.items():
        other: list[str] = []
        lines.extend(_itk_messages(text, other))
        if other:
            (sys.stdout if fd == 1 else sys.stderr).write("\n".join(other) + "\n")


_ITK_MARKERS = (
    "itk",
    "ITK",
    "vnl_",
    "** ERROR",
    "nifti",
    "NIFTI",
    "WARNING: In",
    "ERROR: In",
    "Uncompress failed",
    "gzip",
    "zlib",
)


def _itk_messages(text: str, other: list[str]) -> list[str]:
    """Condense ITK's multi-line blocks into one line each; collect foreign lines in ``other``."""
    out: list[str] = []
    block: list[str] = []

    def flush() -> None:
        if block:
            msg = " ".join(" ".join(block).split())
            out.append(msg[:300])
            block.clear()

    for raw in text.splitlines():
        ln = raw.strip()
        if not ln:
            flush()
            continue
        if block or any(m in ln for m in _ITK_MARKERS):
            if ln.startswith(("WARNING: In", "ERROR: In", "** ERROR", "vnl_")):
                flush()
            block.append(ln)
        else:
            other.append(raw)
    flush()
    return out


def _is_error(msg: str) -> bool:
    """Whether a captured ITK line reports a failure (not a warning)."""
    low = msg.lower()
    return "error" in low or "failed" in low or "wrote only" in low


def _itk_warning(msg: str) -> str:
    """A captured ITK diagnostic as a warning line for ``meta['warnings']``."""
    low = msg.lower()
    if "sform" in low or "qform" in low:
        return "the NIfTI sform/qform is inconsistent with the voxel sizes (ITK used the qform)"
    if "vnl_svd" in low:
        return "the image direction matrix is degenerate or not orthogonal (ITK's SVD complained)"
    return "ITK: " + msg


def read_image(path: str | os.PathLike[str]) -> Volume:
    """Read a 3D image file into a :class:`Volume` (LPS, ``(z, y, x)``).

    ITK's diagnostics do not reach stderr; they become one-line entries in ``meta['warnings']``.

    Raises:
        InputError: unreadable/truncated file, not 3D (a 4D NIfTI), a header that claims more
            voxels than the file can hold or memory allows, or NaN/inf intensities.
    """
    import SimpleITK as sitk

    from medseg.io.headers import check_text_header

    p = Path(path)
    check_text_header(p)  # ITK's NRRD/MetaIO parsers crash on some malformed headers
    hdr = _check_nifti_complete(p) if _fmt(p) == "nifti" else None
    with itk_quiet() as diag:
        try:
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(p))
            reader.ReadImageInformation()
            dim = reader.GetDimension()
            size = reader.GetSize()
            if dim == 4 and size[3] == 1:
                pass  # a singleton 4th axis is squeezed below
            elif dim != 3:
                raise InputError(
                    f"{p}: image is {dim}D with size {size}; a 3D volume is needed "
                    "(split a 4D series into its 3D volumes first)"
                )
            _check_allocation(p, reader)
            img = reader.Execute()
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()
            msg = next((ln for ln in first if "rror" in ln), first[-1] if first else "")
            raise InputError(
                f"{p}: cannot read image (truncated or corrupt?): {msg.strip()[:200]}"
            ) from None
    failed = [m for m in diag if _is_error(m)]
    if failed:
        raise InputError(f"{p}: cannot read image (truncated or corrupt?): {failed[0][:200]}")
    nifti_labels: dict[int, str] | None = None
    if _fmt(p) == "nifti":
        nifti_labels = _nifti_label_table(hdr)
    if img.GetDimension() == 4:
        img = img[:, :, :, 0]
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{p}: multi-component (RGB/vector) images are not supported")
    warnings = list(dict.fromkeys(_itk_warning(m) for m in diag))
    meta: dict[str, object] = {"source": str(p), "format": _fmt(p), "warnings": warnings}
    for key in reader.GetMetaDataKeys():
        if key == _LABEL_KEY:
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                meta["labels"] = {int(k): v for k, v in json.loads(reader.GetMetaData(key)).items()}
    if nifti_labels:
        meta["labels"] = nifti_labels
    vol = Volume.from_sitk(img, meta)
    _check_geometry(p, vol, warnings)
    if hdr is not None:
        _check_sform(hdr, warnings)
    if vol.array.dtype.kind == "f" and not np.all(np.isfinite(vol.array)):
        n = int(np.size(vol.array) - np.count_nonzero(np.isfinite(vol.array)))
        raise InputError(f"{p}: {n} voxels are NaN or infinite; fix or mask the image first")
    return vol


def _check_allocation(p: Path, reader: Any) -> None:
    """Refuse a header whose voxel buffer is larger than memory allows, or (uncompressed) larger
    than the file, or (compressed) more than zlib's maximum ratio over the file size."""
    import SimpleITK as sitk

    n = 1
    for s in reader.GetSize():
        n *= int(s)
    comps = int(reader.GetNumberOfComponents() or 1)
    try:
        item = int(sitk.Image([1, 1], reader.GetPixelID()).GetSizeOfPixelComponent())
    except (RuntimeError, TypeError):
        item = 8
    need = n * comps * item
    if need > max_image_bytes():
        raise InputError(
            f"{p}: the header claims {need / 2**30:.1f} GiB of voxels ({reader.GetSize()}), more "
            "than this machine can hold; the file is corrupt or needs a bigger machine"
        )
    stored = _data_file_size(p)
    if stored is None:
        return
    ratio = 1 if not _maybe_compressed(p) else _MAX_COMPRESSION
    if need > ratio * stored + 4096:
        raise InputError(
            f"{p}: the header claims {need} bytes of voxels but the file holds {stored} bytes; "
            "the file is truncated or its header is corrupt"
        )


def _maybe_compressed(p: Path) -> bool:
    name = p.name.lower()
    if name.endswith(".gz"):
        return True
    if name.endswith(".nii"):
        return False
    try:
        with open(p, "rb") as fh:
            head = fh.read(4096).lower()
    except OSError:
        return True
    return any(k in head for k in (b"gzip", b"gz\n", b"bzip", b"compresseddata = true", b"zraw"))


def _data_file_size(p: Path) -> int | None:
    """Size of the file holding the voxels (``None`` for a detached header we do not follow)."""
    if p.name.lower().endswith((".nhdr", ".mhd")):
        return None
    try:
        return p.stat().st_size
    except OSError:
        return None


def _check_geometry(p: Path, vol: Volume, warnings: list[str]) -> None:
    """Our own check of what ITK's suppressed diagnostics would say: a direction that is not a
    rotation (degenerate or non-orthogonal axes)."""
    d = np.asarray(vol.direction, dtype=float)
    if not np.all(np.isfinite(d)) or not np.allclose(d.T @ d, np.eye(3), atol=1e-3):
        msg = "the image direction matrix is degenerate or not orthogonal (ITK's SVD complained)"
        if msg not in warnings:
            warnings.append(msg)


_SFORM_WARNING = (
    "the NIfTI sform's scales {scales} disagree with the voxel sizes {pix} in the header "
    "(ITK then uses the qform); check the file's geometry"
)


def _check_sform(hdr: Any, warnings: list[str]) -> None:
    """Our check of what ITK's suppressed "unexpected scales in sform" warning says."""
    try:
        if int(hdr["sform_code"]) <= 0:
            return
        scales = np.linalg.norm(np.asarray(hdr.get_sform())[:3, :3], axis=0)
        pix = np.abs(np.asarray(hdr["pixdim"][1:4], dtype=float))
    except (ValueError, TypeError, KeyError, IndexError):
        return
    if np.all(np.isfinite(scales)) and not np.allclose(scales, pix, rtol=1e-3, atol=1e-5):
        msg = _SFORM_WARNING.format(
            scales=tuple(round(float(v), 4) for v in scales),
            pix=tuple(round(float(v), 4) for v in pix),
        )
        text = "the NIfTI sform/qform is inconsistent with the voxel sizes (ITK used the qform)"
        warnings[:] = [w for w in warnings if w != text]
        warnings.append(msg)


def write_image(
    vol: Volume, path: str | os.PathLike[str], target: str | os.PathLike[str] | None = None
) -> None:
    """Write ``vol`` to ``path`` (format from the suffix) and verify what was written.

    Not atomic: callers use :func:`medseg.io.atomic.atomic_path` (as
    :func:`medseg.io.files.write_volume` does) or write inside :func:`~medseg.io.atomic.atomic_dir`.

    Args:
        vol: the volume (label table kept for a :class:`LabelMap`).
        path: the file to create.
        target: the name to give in error messages (the final destination of a temporary file).

    Raises:
        OutputError: the writer failed (its OS reason) or the file does not hold every voxel
            (ITK's NIfTI writer only prints ``NWAD`` to stderr and returns).
    """
    p = Path(path)
    name = Path(target) if target is not None else p
    img = vol.to_sitk()
    if isinstance(vol, LabelMap) and vol.labels:
        img.SetMetaData(_LABEL_KEY, json.dumps({str(k): v for k, v in vol.labels.items()}))
    write_sitk(img, p, target=name)
    if isinstance(vol, LabelMap) and vol.labels and _fmt(p) == "nifti":
        from medseg.io.atomic import output_error

        try:
            _add_nifti_label_table(p, vol.labels)
        except OSError as exc:
            raise output_error(name, exc) from None
        verify_image(p, vol, target=name)


def write_sitk(
    img: Any, path: str | os.PathLike[str], target: str | os.PathLike[str] | None = None
) -> None:
    """Write a SimpleITK image (any pixel type, vector images too) to ``path`` with compression,
    ITK's diagnostics captured, and verify the file (every voxel byte present, reads back).

    Not atomic by itself: wrap it in :func:`medseg.io.atomic.atomic_path`, e.g.::

        with atomic_path(out) as tmp:
            write_sitk(img, tmp, target=out)

    Raises:
        OutputError: naming ``target`` (default ``path``) and the reason ("disk full", "file too
            large", ...).
    """
    import SimpleITK as sitk

    p = Path(path)
    name = Path(target) if target is not None else p
    nbytes = _nbytes(img)
    with itk_quiet() as diag:
        try:
            writer = sitk.ImageFileWriter()
            writer.SetFileName(str(p))
            writer.SetUseCompression(True)
            writer.Execute(img)
        except RuntimeError as exc:
            reason = _write_reason(nbytes, str(exc), diag)
            raise OutputError(f"{name}: cannot write: {reason}") from None
    errors = [m for m in diag if _is_error(m)]
    if errors:
        raise OutputError(f"{name}: cannot write: {_write_reason(nbytes, errors[0], diag)}")
    _verify_file(p, tuple(int(v) for v in img.GetSize()), nbytes, name)


def _nbytes(img: Any) -> int:
    n = int(img.GetNumberOfPixels()) * int(img.GetNumberOfComponentsPerPixel())
    return n * int(img.GetSizeOfPixelComponent())


def _write_reason(nbytes: int, detail: str, diag: list[str]) -> str:
    from medseg.io.atomic import short_write_reason

    text = " ".join([detail, *diag]).lower()
    if "no space" in text:
        return "disk full"
    if "permission" in text:
        return "permission denied"
    if "wrote only" in text or "expected" in text or "write" in text:
        return short_write_reason(nbytes + 352)
    return " ".join(detail.split())[:200]


def verify_image(
    path: str | os.PathLike[str], vol: Volume, target: str | os.PathLike[str] | None = None
) -> None:
    """Check that the image file at ``path`` holds ``vol``'s grid and every voxel byte.

    ``.nii``: file size = header + voxels; ``.nii.gz``: decompressed length; NRRD/MHA: read back
    with SimpleITK (size, no decompression error).

    Raises:
        OutputError: the file is short, unreadable, or of another size.
    """
    size = tuple(int(v) for v in reversed(vol.shape))
    _verify_file(Path(path), size, int(vol.array.nbytes), target)


def _verify_file(
    p: Path, size_xyz: tuple[int, ...], nbytes: int, target: str | os.PathLike[str] | None
) -> None:
    from medseg.io.atomic import short_write_reason

    name = Path(target) if target is not None else p
    if not p.is_file():
        raise OutputError(f"{name}: cannot write: the writer produced no file")
    if _fmt(p) == "nifti":
        try:
            _check_nifti_complete(p)
        except InputError:
            raise OutputError(
                f"{name}: cannot write: {short_write_reason(nbytes)} (the written file is "
                "incomplete); nothing was written"
            ) from None
        return
    import SimpleITK as sitk

    with itk_quiet() as diag:
        try:
            back = sitk.ReadImage(str(p))
        except RuntimeError:
            back = None
    if back is None or any(_is_error(m) for m in diag):
        raise OutputError(
            f"{name}: cannot write: {short_write_reason(nbytes)} (the written file does not "
            "read back); nothing was written"
        )
    if tuple(int(v) for v in back.GetSize())[: len(size_xyz)] != size_xyz[: back.GetDimension()]:
        raise OutputError(
            f"{name}: cannot write: the written file has another size; nothing was written"
        )


@contextlib.contextmanager
def _nibabel_silent() -> Iterator[None]:
    import logging

    import nibabel as nib

    log = nib.imageglobals.logger
    level = log.level
    log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(level)


def _check_nifti_complete(p: Path) -> Any:
    """Raise :class:`InputError` when a NIfTI file holds fewer voxel bytes than its header says;
    return the nibabel header otherwise."""
    import gzip
    import zlib

    import nibabel as nib

    try:
        with _nibabel_silent():  # no header-fix chatter ("vox offset 0 too low ...")
            nimg = nib.load(str(p))
        hdr = nimg.header
        offset = int(getattr(nimg.dataobj, "offset", 0) or hdr.get_data_offset())
        shape = [int(v) for v in hdr.get_data_shape()]
        voxels = 1
        for v in shape:
            voxels *= v
        need = offset + voxels * int(hdr.get_data_dtype().itemsize)
    except Exception as exc:
        msg = " ".join(str(exc).split())[:200]
        raise InputError(f"{p}: cannot read the NIfTI header: {msg}") from None
    if not shape or min(shape) < 1 or offset < 0:
        raise InputError(f"{p}: corrupt NIfTI header (image shape {shape}, data offset {offset})")
    if need - offset > max_image_bytes():
        raise InputError(
            f"{p}: the header claims {(need - offset) / 2**30:.1f} GiB of voxels {shape}, more "
            "than this machine can hold; the file is corrupt or needs a bigger machine"
        )
    have = 0
    if p.name.lower().endswith(".gz"):
        try:
            with gzip.open(p, "rb") as fh:
                while have < need and (chunk := fh.read(1 << 16)):
                    have += len(chunk)
        except (EOFError, OSError, zlib.error):
            raise InputError(
                f"{p}: the compressed file is truncated or corrupt (stream ends after {have} "
                f"of {need} bytes); re-export or re-copy it"
            ) from None
    else:
        have = p.stat().st_size
    if have < need:
        raise InputError(
            f"{p}: file is truncated ({have} of {need} bytes); re-export or re-copy it"
        )
    return hdr


#: NIfTI extension code 6 ("comment") carries ``{"medseg_labels": {...}}`` (NIfTI has no free keys).
_NIFTI_COMMENT = 6


def _nifti_label_table(hdr: Any) -> dict[int, str] | None:
    for ext in getattr(hdr, "extensions", []):
        if ext.get_code() != _NIFTI_COMMENT:
            continue
        content = ext.get_content()
        raw = content if isinstance(content, bytes) else str(content).encode()
        try:
            table = json.loads(raw.rstrip(b"\x00").decode("utf-8"))[_LABEL_KEY]
            return {int(k): str(v) for k, v in table.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return None


def _add_nifti_label_table(path: Path, labels: dict[int, str]) -> None:
    """Re-save a just-written NIfTI with the label table as a comment extension (same affine)."""
    import nibabel as nib

    img = nib.load(str(path), mmap=False)
    data = np.array(img.dataobj)  # a copy in memory before the file is replaced
    hdr = img.header.copy()
    payload = json.dumps({_LABEL_KEY: {str(k): v for k, v in labels.items()}}).encode()
    hdr.extensions.append(nib.nifti1.Nifti1Extension(_NIFTI_COMMENT, payload))
    out = nib.Nifti1Image(data, img.affine, header=hdr)
    out.set_qform(img.get_qform(), int(hdr["qform_code"]))
    out.set_sform(img.get_sform(), int(hdr["sform_code"]))
    nib.save(out, str(path))


def _fmt(p: Path) -> str:
    n = p.name.lower()
    if n.endswith((".nii", ".nii.gz")):
        return "nifti"
    if n.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    return "metaimage"
