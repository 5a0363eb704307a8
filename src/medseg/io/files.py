"""Path dispatch for reading and writing volumes and label maps.

The atomic writer and the output-path rules live in :mod:`medseg.io.atomic` (re-exported here);
``read_volume`` / ``read_labels`` turn every failure of the underlying libraries on untrusted bytes
into one-line :class:`~medseg.errors.InputError` messages.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medseg.errors import InputError, MedsegError, OutputError
from medseg.io.atomic import (
    atomic_dir,
    atomic_path,
    check_output_path,
    output_error,
    write_csv,
    write_json,
    write_text,
)
from medseg.volume import LabelMap, Volume, check_same_grid

__all__ = [
    "IMAGE_SUFFIXES",
    "atomic_dir",
    "atomic_path",
    "check_output_path",
    "image_suffix",
    "read_labels",
    "read_volume",
    "write_csv",
    "write_json",
    "write_labels",
    "write_sitk_image",
    "write_text",
    "write_volume",
]

#: File suffixes we read/write through SimpleITK (longest first so ``.nii.gz`` wins over ``.gz``).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


def image_suffix(path: str | os.PathLike[str]) -> str | None:
    """The recognised image suffix of ``path`` (lower case) or ``None``."""
    name = str(path).lower()
    for suf in IMAGE_SUFFIXES:
        if name.endswith(suf):
            return suf
    return None


def read_volume(path: str | os.PathLike[str], series: str | None = None) -> Volume:
    """Read a 3D image: a DICOM folder (or one DICOM file's folder) or a NIfTI/NRRD/MHA file.

    Args:
        path: folder with DICOM files (searched recursively), an image file, or a DICOMweb
            series URL ``http(s)://HOST/.../studies/<StudyUID>/series/<SeriesUID>`` (or the
            ``dimse://AET@HOST:PORT/studies/...`` form for a DIMSE archive).
        series: SeriesInstanceUID to pick when a folder holds several series.

    Returns:
        A :class:`Volume` with ``(z, y, x)`` array; CT in HU. ``meta['warnings']`` lists any
        problems found (gaps, tilt, skipped files).

    Raises:
        InputError: missing/unreadable path, not 3D, NaN intensities, no DICOM found, a header
            that claims more voxels than the file holds or memory allows... Every failure of
            pydicom, nibabel, SimpleITK or numpy on the file's bytes becomes a one-line
            :class:`InputError` (or :class:`~medseg.errors.DicomError`) naming the file.
    """
    from medseg.io.remote import is_remote_url

    remote = is_remote_url(path)  # a DICOMweb/DIMSE series: fetched into the cache, then read
    p: Any = str(path) if remote else Path(path)  # (Path would fold the URL's "//")
    try:
        if remote:
            from medseg.io.remote import read_remote_volume

            return read_remote_volume(p, series=series)
        return _read_volume(p, series)
    except MedsegError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except MemoryError:
        raise InputError(
            f"{p}: not enough memory to read it (a corrupt header claiming a huge image?)"
        ) from None
    except RecursionError:
        raise InputError(f"{p}: cannot read: nesting too deep (corrupt file?)") from None
    except Exception as exc:  # untrusted bytes: no library error escapes as a traceback
        raise InputError(
            f"{p}: cannot read ({_one_line(exc)}); the file is damaged or not an image"
        ) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _read_volume(p: Path, series: str | None) -> Volume:
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_dir():
        from medseg.io.dicom import read_dicom_series

        return read_dicom_series(p, series=series)
    if p.name.lower().endswith(".npz"):  # the SEGFM3D challenge layout: its 'imgs'
        from medseg.io.npz import read_npz

        return read_npz(p).image
    if image_suffix(p) is None:
        from medseg.io.dicom import is_dicom_file

        if is_dicom_file(p):
            from medseg.io.dicom import read_dicom_series

            return read_dicom_series(p, series=series)  # the file's series, from its folder
        raise InputError(
            f"{p}: unknown file type; expected a DICOM folder or one of {', '.join(IMAGE_SUFFIXES)}"
        )
    from medseg.io.itk import read_image

    return read_image(p)


def read_labels(
    path: str | os.PathLike[str],
    reference: Volume | None = None,
    labels: dict[int, str] | None = None,
) -> LabelMap:
    """Read a label map; optionally check it lies on ``reference``'s grid.

    The label table comes from ``labels``, else from a ``dataset.json`` found beside or one level
    above the file (Medical Segmentation Decathlon layout), else from the file's metadata.

    A DICOM-SEG opens on ``reference``'s grid (its referenced series; without one, on the grid
    of its own frames) and an RT Structure Set is rasterised onto ``reference`` (required).

    Raises:
        InputError: fractional/negative/NaN values or not 3D; an RTSTRUCT without ``reference``.
        GeometryError: ``reference`` given and grids differ.
    """
    kind = dicom_object_kind(Path(path))
    if kind is not None:
        return _read_dicom_labels(Path(path), kind, reference, labels)
    if str(path).lower().endswith(".npz"):  # the SEGFM3D challenge layout: its 'gts'
        from medseg.io.npz import read_npz_labels

        return read_npz_labels(path, reference=reference, labels=labels)
    vol = read_volume(path)
    table = dict(labels or {}) or _label_table_near(Path(path)) or vol.meta.get("labels", {})
    try:
        lm = LabelMap(
            array=vol.array,
            labels=table,
            meta=vol.meta,
            spacing=vol.spacing,
            origin=vol.origin,
            direction=vol.direction,
        )
    except MedsegError:
        raise
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a corrupt label-table entry
        raise InputError(f"{path}: not a usable label map ({_one_line(exc)})") from None
    if reference is not None:
        check_same_grid(lm, reference)
    return lm


def dicom_object_kind(path: Path) -> str | None:
    """``"SEG"`` / ``"RTSTRUCT"`` for such a DICOM file, else ``None`` (cheap header peek)."""
    if not path.is_file() or image_suffix(path) is not None:
        return None
    from medseg.io.dicom import is_dicom_file

    if not is_dicom_file(path):
        return None
    from medseg.io.dicom_seg import read_dicom_file

    modality = str(read_dicom_file(path, stop_before_pixels=True).get("Modality", ""))
    return modality if modality in ("SEG", "RTSTRUCT") else None


def _read_dicom_labels(
    path: Path, kind: str, reference: Volume | None, labels: dict[int, str] | None
) -> LabelMap:
    if kind == "SEG":
        from medseg.io.dicom_seg import read_dicom_seg

        lm = read_dicom_seg(path, reference=reference)
    else:
        if reference is None:
            raise InputError(
                f"{path}: an RT Structure Set holds contours, not voxels; give the image it was "
                "drawn on as reference to rasterise it"
            )
        from medseg.io.rtstruct import read_rtstruct

        lm = read_rtstruct(path, reference=reference)
    if labels:
        lm.labels = {int(k): str(v) for k, v in labels.items() if int(k) != 0}
    if reference is not None:
        check_same_grid(lm, reference)
    return lm


def _label_table_near(path: Path) -> dict[int, str]:
    for folder in (path.parent, path.parent.parent):
        ds = folder / "dataset.json"
        if ds.is_file():
            from medseg.io.labeltable import label_table_from_dataset_json

            try:
                return label_table_from_dataset_json(ds)
            except Exception:  # a malformed neighbour must not stop reading the labels
                return {}
    return {}


def write_volume(
    vol: Volume,
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """Write ``vol`` atomically to a NIfTI/NRRD/MHA file on its exact grid.

    The file is written beside ``out`` under a temporary name, verified (every voxel byte is
    there and the header reads back) and renamed; ``.mhd``/``.nhdr`` (header + data file) are
    written in a temporary folder and the data file is moved before the header.

    Raises:
        OutputError: bad/unwritable output path, it equals an input, or the write failed (the
            message names ``out`` and the reason, e.g. "disk full"); nothing is left at ``out``.
    """
    o = check_output_path(out, inputs, overwrite)
    suf = image_suffix(o)
    if suf is None:
        raise OutputError(f"{o}: unknown output type; use one of {', '.join(IMAGE_SUFFIXES)}")
    from medseg.io.itk import write_image

    if suf in (".mhd", ".nhdr"):
        _write_detached(vol, o)
        return o
    with atomic_path(o) as tmp:
        write_image(vol, tmp, target=o)
    return o


def _write_detached(vol: Volume, o: Path) -> None:
    """A header + data file pair: write both in a temporary folder, then move data, then header."""
    import contextlib
    import os as _os
    import shutil
    import tempfile

    from medseg.io.atomic import _prefix
    from medseg.io.itk import write_image

    tmp = Path(tempfile.mkdtemp(prefix=_prefix(o), suffix=".part", dir=o.parent))
    try:
        try:
            write_image(vol, tmp / o.name, target=o)
            for f in sorted(tmp.iterdir()):
                if f.name != o.name:
                    _os.replace(f, o.parent / f.name)
            _os.replace(tmp / o.name, o)
        except OSError as exc:
            raise output_error(o, exc) from None
    finally:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)


def write_sitk_image(
    img: Any,
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """Write a SimpleITK image (e.g. a vector image of class probabilities) atomically and
    verified, like :func:`write_volume` (NIfTI / NRRD / MHA; its geometry is the image's own).

    Raises:
        OutputError: bad output path or the write failed (nothing is left at ``out``).
    """
    o = check_output_path(out, inputs, overwrite)
    suf = image_suffix(o)
    if suf is None or suf in (".mhd", ".nhdr"):
        raise OutputError(f"{o}: unknown output type; use .nii.gz, .nii, .nrrd or .mha")
    from medseg.io.itk import write_sitk

    with atomic_path(o) as tmp:
        write_sitk(img, tmp, target=o)
    return o


def write_labels(
    labels: LabelMap,
    out: str | os.PathLike[str],
    reference: Volume | None = None,
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """Write a label map atomically on its grid (checked against ``reference`` if given).

    The file's affine equals the image's, so it opens aligned in ITK-SNAP / 3D Slicer. The label
    table is stored in the file's metadata (NRRD/NIfTI description keys) where the format allows.
    """
    if reference is not None:
        check_same_grid(labels, reference)
    if labels.array.dtype.kind not in "iu":
        raise InputError("labels must be integer")
    return write_volume(labels, out, inputs=inputs, overwrite=overwrite)
