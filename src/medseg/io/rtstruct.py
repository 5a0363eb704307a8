"""RTSTRUCT export and import, written with pydicom, contours through scikit-image.

Library choice: highdicom (0.28) has no RT Structure Set support; rt-utils (last release 2023)
pulls GUI ``opencv-python``, which fights napari's Qt. The structure set is built here with
pydicom: on each slice, ``skimage.measure.find_contours`` traces every label's boundary at level
0.5 (half way between inside and outside voxel centres, holes as their own contours), collinear
points are dropped, and the points go to patient coordinates (LPS mm) through the reference
series' geometry. Reading rasterises each contour on its slice with an even-odd fill
(``skimage.draw.polygon2mask``, XOR per contour), so holes come back as holes.

Provenance: ``StructureSetDescription`` (ST, 1024 characters, standard, no private tag) holds the
report as compact JSON, reduced to fit (dropped keys listed under ``"truncated"``);
``ROIGenerationAlgorithm`` / ``ROIGenerationDescription`` name the algorithm per ROI, and
``ROIDescription`` keeps the label value ("medseg label value 3").

Geometry: as for DICOM-SEG (see :mod:`medseg.io.dicom_seg`): oblique, flipped and non-axial series
work; gantry-tilted series are refused; a label map on another grid is refused.
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import DicomError, GeometryError, InputError
from medseg.io.dicom_seg import (
    RTSTRUCT_SOP_CLASS,
    _algorithm_fields,
    clean_lo,
    colour_for,
    concept_for,
    fit_report_json,
    medseg_version,
    parse_report_json,
    prepare_export,
    read_dicom_file,
)
from medseg.volume import LabelMap, Volume

#: Longest JSON stored in ``StructureSetDescription`` (ST, 1024 characters).
RTSTRUCT_JSON_LIMIT = 1024
_LABEL_VALUE_RE = re.compile(r"medseg label value (\d+)")


def _fmt(v: float) -> str:
    s = f"{v:.4f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


def slice_contours(mask: np.ndarray) -> list[np.ndarray]:
    """Closed boundary polygons of a 2D mask ``(y, x)`` as ``(n, 2)`` (row, column) points.

    Each polygon runs half way between inside and outside pixel centres (outer boundaries and
    holes alike); the closing point is not repeated and collinear points are removed.
    """
    from skimage.measure import find_contours

    padded = np.pad(np.asarray(mask, dtype=np.uint8), 1)
    out = []
    for c in find_contours(padded, 0.5):
        c = c[:-1] - 1.0 if np.allclose(c[0], c[-1]) else c - 1.0
        if len(c) >= 3:
            prev, nxt = np.roll(c, 1, axis=0), np.roll(c, -1, axis=0)
            cross = (c[:, 0] - prev[:, 0]) * (nxt[:, 1] - c[:, 1]) - (c[:, 1] - prev[:, 1]) * (
                nxt[:, 0] - c[:, 0]
            )
            keep = np.abs(cross) > 1e-9
            if keep.sum() >= 3:
                c = c[keep]
        out.append(c)
    return out


def write_rtstruct(
    labels: LabelMap,
    reference_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
    series: str | None = None,
) -> Path:
    """Write ``labels`` as an RT Structure Set on the series in ``reference_dir``.

    One ROI per label value present, named from the label table, coloured from
    :data:`medseg.io.dicom_seg.PALETTE`, coded (SNOMED CT) in ``RTROIIdentificationCodeSequence``;
    closed planar contours in LPS mm on the slices that hold the label, each referencing its
    source image.

    Args:
        labels: label map ``(z, y, x)`` on the reference series' grid.
        reference_dir: the source DICOM series (folder or one of its files).
        out: output ``.dcm`` path; written atomically.
        report: the pipeline report (algorithm name per ROI, JSON in StructureSetDescription).
        overwrite: replace an existing ``out``.
        inputs: further input paths ``out`` must not overwrite.
        series: SeriesInstanceUID when ``reference_dir`` holds several (default: the largest).

    Returns:
        The written path.

    Raises:
        InputError: the label map is empty.
        GeometryError: other grid than the reference, or a gantry-tilted / uneven series.
        OutputError: ``out`` exists (without ``overwrite``), is an input, or cannot be written.
    """
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    from medseg.io.files import atomic_path

    o, ref, lm, present = prepare_export(labels, reference_dir, out, inputs, overwrite, series)
    vol = ref.volume
    h0 = ref.headers[0]
    name, _params, algo_type = _algorithm_fields(report)
    now = _dt.datetime.now(_dt.timezone.utc)
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    sop_uid = generate_uid()
    for_uid = str(h0.get("FrameOfReferenceUID", "") or "")
    study_uid = str(h0.get("StudyInstanceUID", "") or "")
    if not for_uid or not study_uid:
        missing = "FrameOfReferenceUID" if not for_uid else "StudyInstanceUID"
        raise DicomError(
            f"{reference_dir}: the series has no {missing}; an RTSTRUCT must reference it"
        )

    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = pydicom.Dataset()
    ds.file_meta = fm
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    for key in (
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
    ):
        setattr(ds, key, h0.get(key, ""))
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 9002
    ds.SeriesDescription = f"medseg RTSTRUCT ({name or 'label map'})"[:64]
    ds.OperatorsName = ""
    ds.Manufacturer = "medseg"
    ds.ManufacturerModelName = (name or "medseg")[:64]
    ds.SoftwareVersions = medseg_version()
    ds.StructureSetLabel = "medseg"
    ds.StructureSetName = (name or "medseg")[:64]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    text = fit_report_json(report, RTSTRUCT_JSON_LIMIT)
    if text is not None:
        ds.StructureSetDescription = text

    def image_ref(h: Any) -> Dataset:
        r = Dataset()
        r.ReferencedSOPClassUID = h.SOPClassUID
        r.ReferencedSOPInstanceUID = h.SOPInstanceUID
        return r

    rs = Dataset()
    rs.SeriesInstanceUID = vol.meta["series_uid"]
    rs.ContourImageSequence = Sequence([image_ref(h) for h in ref.headers])
    st = Dataset()
    st.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Study Component Management (retired)
    st.ReferencedSOPInstanceUID = study_uid
    st.RTReferencedSeriesSequence = Sequence([rs])
    fr = Dataset()
    fr.FrameOfReferenceUID = for_uid
    fr.RTReferencedStudySequence = Sequence([st])
    ds.ReferencedFrameOfReferenceSequence = Sequence([fr])

    rois, contours_seq, observations = [], [], []
    for number, value in enumerate(present, start=1):
        roi_name = lm.name(value)
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = for_uid
        roi.ROIName = clean_lo(roi_name)
        roi.ROIDescription = f"medseg label value {value}"
        roi.ROIGenerationAlgorithm = algo_type
        roi.ROIGenerationDescription = (f"{name} (medseg {medseg_version()})" if name else "")[:64]
        rois.append(roi)

        items = []
        zs = np.nonzero(np.any(lm.array == value, axis=(1, 2)))[0]
        for k in zs:
            for poly in slice_contours(lm.array[k] == value):
                zyx = np.column_stack([np.full(len(poly), float(k)), poly])
                world = vol.index_to_world(zyx)
                c = Dataset()
                c.ContourImageSequence = Sequence([image_ref(ref.headers[int(k)])])
                c.ContourGeometricType = "CLOSED_PLANAR"
                c.NumberOfContourPoints = len(world)
                c.ContourData = [_fmt(v) for v in world.reshape(-1)]
                items.append(c)
        rc = Dataset()
        rc.ROIDisplayColor = list(colour_for(value))
        rc.ReferencedROINumber = number
        rc.ContourSequence = Sequence(items)
        contours_seq.append(rc)

        category, prop_type, _region = concept_for(roi_name)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = (
            "ORGAN" if category.value == "91723000" else ""
        )  # Anatomical Structure
        obs.ROIInterpreter = ""
        code = Dataset()
        code.CodeValue = prop_type.value
        code.CodingSchemeDesignator = prop_type.scheme_designator
        code.CodeMeaning = prop_type.meaning
        obs.RTROIIdentificationCodeSequence = Sequence([code])
        observations.append(obs)
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours_seq)
    ds.RTROIObservationsSequence = Sequence(observations)
    ds.ApprovalStatus = "UNAPPROVED"
    from medseg.io.dicom_seg import _readable_dicom

    with atomic_path(o, verify=_readable_dicom) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return o


def read_rtstruct(
    path: str | os.PathLike[str], reference: Volume | str | os.PathLike[str] | None = None
) -> LabelMap:
    """Rasterise an RT Structure Set onto its reference series' grid.

    Args:
        path: the RTSTRUCT file.
        reference: the series the contours were drawn on (its folder or its :class:`Volume`).
            Required: contours are points in patient space and carry no voxel grid.

    Returns:
        LabelMap ``(z, y, x)`` on ``reference``'s grid; label values from medseg's
        ``ROIDescription`` ("medseg label value N"), else 1..N in ROI order; names from
        ``ROIName``. Voxel centres inside a contour (even-odd rule) are set. ``meta`` holds
        ``provenance`` and ``warnings`` (skipped contours, overlapping ROIs: later ROI kept).

    Raises:
        InputError: not an RTSTRUCT, or no reference given.
        GeometryError: no contour lies on a slice of the reference grid.
    """
    from skimage.draw import polygon2mask

    p = Path(path)
    ds = read_dicom_file(p)
    if str(ds.get("SOPClassUID", "")) != RTSTRUCT_SOP_CLASS and ds.get("Modality") != "RTSTRUCT":
        raise InputError(f"{p}: not an RTSTRUCT (Modality {ds.get('Modality', '?')})")
    series = ""
    for fr in ds.get("ReferencedFrameOfReferenceSequence", []):
        for st in fr.get("RTReferencedStudySequence", []):
            for rs in st.get("RTReferencedSeriesSequence", []):
                series = series or str(rs.get("SeriesInstanceUID", ""))
    if reference is None:
        raise InputError(
            f"{p}: an RTSTRUCT holds contours, not a voxel grid; pass the DICOM series it was "
            f"drawn on as the reference (series {series or 'not named in the file'})"
        )
    if isinstance(reference, Volume):
        grid = reference
    else:
        from medseg.io.files import read_volume

        grid = read_volume(reference)

    names: dict[int, str] = {}
    values: dict[int, int] = {}
    for i, roi in enumerate(ds.get("StructureSetROISequence", []), start=1):
        m = _LABEL_VALUE_RE.search(str(roi.get("ROIDescription", "")))
        values[int(roi.ROINumber)] = int(m.group(1)) if m else i
        names[values[int(roi.ROINumber)]] = str(roi.get("ROIName", "") or f"roi_{roi.ROINumber}")

    nz, ny, nx = grid.shape
    top = max(values.values(), default=0)
    out = np.zeros(grid.shape, dtype=np.uint16 if top > 255 else np.uint8)
    warnings: list[str] = []
    skipped = placed = overlap = 0
    for rc in ds.get("ROIContourSequence", []):
        number = int(rc.ReferencedROINumber)
        value = values.get(number)
        if value is None:
            continue
        masks: dict[int, np.ndarray] = {}
        for c in rc.get("ContourSequence", []):
            if str(c.get("ContourGeometricType", "")) not in ("CLOSED_PLANAR", ""):
                skipped += 1
                continue
            pts = np.asarray([float(v) for v in c.ContourData], dtype=float).reshape(-1, 3)
            idx = grid.world_to_index(pts)
            k = int(np.round(idx[:, 0].mean()))
            if len(pts) < 3 or np.abs(idx[:, 0] - k).max() > 0.1 or not 0 <= k < nz:
                skipped += 1
                continue
            poly = polygon2mask((ny, nx), idx[:, 1:])
            masks[k] = masks[k] ^ poly if k in masks else poly
            placed += 1
        for k, m in masks.items():
            plane = out[k]
            overlap += int(np.count_nonzero(m & (plane != 0) & (plane != value)))
            plane[m] = value
    if placed == 0 and skipped:
        raise GeometryError(
            f"{p}: none of its {skipped} contour(s) lies on a slice of the reference grid; "
            "pass the series the structure set was drawn on"
        )
    grid_series = str(grid.meta.get("series_uid", "") or "")
    if series and grid_series and grid_series != series:
        warnings.append(
            f"the RTSTRUCT references series {series} but was rasterised on series "
            f"{grid_series}; check that the reference is the right series"
        )
    if skipped:
        warnings.append(
            f"skipped {skipped} contour(s) that are not closed planar polygons on a reference slice"
        )
    if overlap:
        warnings.append(f"ROIs overlap in {overlap} voxel(s); the later ROI was kept")
    meta = {
        "format": "rtstruct",
        "source": str(p),
        "modality": "RTSTRUCT",
        "provenance": parse_report_json(ds.get("StructureSetDescription")),
        "warnings": warnings,
    }
    return LabelMap(array=out, labels=names, meta=meta, **grid.copy_geometry())
