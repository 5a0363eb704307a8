"""Path dispatch, atomic writes and the output-path rules shared by every writer."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from medseg.errors import InputError, OutputError
from medseg.volume import LabelMap, Volume, check_same_grid

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
        path: folder with DICOM files (searched recursively) or an image file.
        series: SeriesInstanceUID to pick when a folder holds several series.

    Returns:
        A :class:`Volume` with ``(z, y, x)`` array; CT in HU. ``meta['warnings']`` lists any
        problems found (gaps, tilt, skipped files).

    Raises:
        InputError: missing/unreadable path, not 3D, NaN intensities, no DICOM found, ...
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_dir():
        from medseg.io.dicom import read_dicom_series

        return read_dicom_series(p, series=series)
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

    Raises:
        InputError: fractional/negative/NaN values or not 3D.
        GeometryError: ``reference`` given and grids differ.
    """
    vol = read_volume(path)
    table = dict(labels or {}) or _label_table_near(Path(path)) or vol.meta.get("labels", {})
    lm = LabelMap(
        array=vol.array,
        labels=table,
        meta=vol.meta,
        spacing=vol.spacing,
        origin=vol.origin,
        direction=vol.direction,
    )
    if reference is not None:
        check_same_grid(lm, reference)
    return lm


def _label_table_near(path: Path) -> dict[int, str]:
    for folder in (path.parent, path.parent.parent):
        ds = folder / "dataset.json"
        if ds.is_file():
            from medseg.io.datasets import label_table_from_dataset_json

            try:
                return label_table_from_dataset_json(ds)
            except Exception:  # a malformed neighbour must not stop reading the labels
                return {}
    return {}


def check_output_path(
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """Validate an output path before any work is done.

    Raises:
        OutputError: it names an input, exists (without ``overwrite``), or its folder is not
            writable / cannot be created.
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
        raise OutputError(f"{o}: cannot create folder {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{o}: folder {parent} is not writable")
    return o


@contextlib.contextmanager
def atomic_path(out: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``out`` (same suffix); rename it onto ``out`` on success.

    On any exception the temporary file is removed and ``out`` is left untouched.
    """
    o = Path(out)
    suffix = image_suffix(o) or "".join(o.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{o.name}.", suffix=f".part{suffix}", dir=o.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.is_file():  # mkstemp makes 0600 files; give the usual umask-based mode
            os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, o)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_volume(
    vol: Volume,
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """Write ``vol`` atomically to a NIfTI/NRRD/MHA file on its exact grid.

    Raises:
        OutputError: bad/unwritable output path or it equals an input.
    """
    o = check_output_path(out, inputs, overwrite)
    if image_suffix(o) is None:
        raise OutputError(f"{o}: unknown output type; use one of {', '.join(IMAGE_SUFFIXES)}")
    from medseg.io.itk import write_image

    with atomic_path(o) as tmp:
        write_image(vol, tmp)
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


def write_json(
    data: Any,
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """Write ``data`` as indented JSON atomically (temp file + rename).

    Raises:
        OutputError: bad/unwritable output path, an input, or existing without ``overwrite``.
    """
    import json

    o = check_output_path(out, inputs, overwrite=overwrite)
    with atomic_path(o) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    return o


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
