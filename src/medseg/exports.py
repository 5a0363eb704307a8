"""Clinical export: one call for the CLI, the API facade, napari and batch.

``export(labels, reference, "dicom-seg" | "rtstruct", out)`` writes a label map that lies on a
DICOM series' grid as a DICOM-SEG (:mod:`medseg.io.dicom_seg`) or an RT Structure Set
(:mod:`medseg.io.rtstruct`) referencing that series, with the pipeline report inside. The
series may be a DICOMweb / DIMSE series URL (fetched into the cache first);
:func:`medseg.io.remote.push_result` then stores the file on that server.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from medseg.errors import InputError
from medseg.volume import LabelMap

#: Export formats and the function writing each.
FORMATS = ("dicom-seg", "rtstruct")

ExportFormat = Literal["dicom-seg", "rtstruct"]


def export(
    labels: LabelMap | str | os.PathLike[str],
    reference: str | os.PathLike[str],
    format: ExportFormat,
    out: str | os.PathLike[str],
    *,
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
    series: str | None = None,
) -> Path:
    """Write ``labels`` as a DICOM-SEG or RTSTRUCT referencing the series ``reference``.

    Args:
        labels: a :class:`LabelMap` ``(z, y, x)`` or a label file (NIfTI/NRRD/...; its label table
            from ``dataset.json`` or the file's metadata), on the reference series' grid.
        reference: the source DICOM series folder (or one of its files), or its series URL.
        format: ``"dicom-seg"`` or ``"rtstruct"``.
        out: output file (``.dcm``); written atomically; never an input.
        report: the pipeline report (provenance and algorithm identification travel inside).
        overwrite: replace an existing ``out``.
        series: SeriesInstanceUID when ``reference`` holds several series (default: the
            largest, as :func:`medseg.io.read_volume` picks).

    Returns:
        The written path.

    Raises:
        InputError: unknown format, unreadable or empty label map.
        GeometryError: the label map is not on the series' grid (differences named), or the
            series is gantry-tilted or unevenly spaced.
        OutputError: bad output path.
    """
    fmt = str(format).lower().replace("_", "-")
    if fmt in ("seg", "dicomseg"):
        fmt = "dicom-seg"
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {format!r}; use one of {', '.join(FORMATS)}")
    _require("highdicom" if fmt == "dicom-seg" else "skimage", fmt)
    from medseg.io.remote import is_remote_url

    if is_remote_url(str(reference)):
        from medseg.io.remote import fetch_series

        reference = fetch_series(str(reference))
    inputs: list[str | os.PathLike[str]] = [reference]
    if isinstance(labels, LabelMap):
        lm = labels
    else:
        from medseg.io.files import read_labels

        inputs.append(labels)
        lm = read_labels(labels)
    if fmt == "dicom-seg":
        from medseg.io.dicom_seg import write_dicom_seg

        return write_dicom_seg(
            lm, reference, out, report=report, overwrite=overwrite, inputs=inputs, series=series
        )
    from medseg.io.rtstruct import write_rtstruct

    return write_rtstruct(
        lm, reference, out, report=report, overwrite=overwrite, inputs=inputs, series=series
    )


def _require(module: str, fmt: str) -> None:
    """Refuse with the install hint when the export extra is missing."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise InputError(f"{fmt} export needs the '{module}' package: pip install 'medseg[export]'")
