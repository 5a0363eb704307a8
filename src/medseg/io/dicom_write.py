"""Write a :class:`~medseg.volume.Volume` as a DICOM series: one CT or MR image file per slice.

Geometry (see :mod:`medseg.volume`)::

    ImageOrientationPatient = direction[:, 0] (row cosines: along columns, array x)
                              + direction[:, 1] (column cosines: down rows, array y)
    ImagePositionPatient[k] = vol.index_to_world((k, 0, 0))        LPS mm
    PixelSpacing            = [spacing_y (between rows), spacing_x (between columns)]
    SliceThickness = SpacingBetweenSlices = spacing_z

DICOM frames are right-handed: readers order slices along ``row x column``. A volume whose
direction is left-handed (``direction[:, 2] == -(row x column)``) is written faithfully (each
slice at its true position) and reads back as the same physical image with the slice order
reversed and a right-handed direction.

Pixels are stored as 16-bit integers with ``RescaleSlope``/``RescaleIntercept``: integer data
that fit are stored exactly (unsigned with intercept -1024 for the usual CT range, else signed
with intercept 0); float data are quantised linearly to 16 bits (not exact; the step is
``RescaleSlope``). pydicom is imported inside functions only.
"""

from __future__ import annotations

import datetime as _dt
import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import InputError
from medseg.io.atomic import atomic_dir, prepare_output_dir
from medseg.volume import Volume

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from medseg.progress import ProgressCallback

#: SOP Class UIDs of the single-frame image storage classes we write.
SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "MR": "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
}


def _pixel_encoding(arr: np.ndarray) -> tuple[np.ndarray, float, float, int]:
    """Stored 16-bit pixels ``(z, y, x)``, slope, intercept, PixelRepresentation (0/1)."""
    if arr.size == 0:
        raise InputError("cannot write an empty volume as DICOM")
    if arr.dtype.kind == "b":
        arr = arr.astype(np.uint8)
    if arr.dtype.kind in "iu":
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 65535:
            return arr.astype(np.uint16), 1.0, 0.0, 0
        if lo >= -1024 and hi - (-1024) <= 65535:
            return (arr.astype(np.int32) + 1024).astype(np.uint16), 1.0, -1024.0, 0
        if lo >= -32768 and hi <= 32767:
            return arr.astype(np.int16), 1.0, 0.0, 1
        # wider integers: fall through to linear quantisation
    if arr.dtype.kind not in "iuf":
        raise InputError(f"cannot write voxel type {arr.dtype} as DICOM; convert to numbers first")
    a = arr.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise InputError("the volume holds NaN or infinite values; DICOM cannot store them")
    lo_f, hi_f = float(a.min()), float(a.max())
    slope = (hi_f - lo_f) / 65535.0 if hi_f > lo_f else 1.0
    stored = np.clip(np.rint((a - lo_f) / slope), 0, 65535).astype(np.uint16)
    return stored, float(slope), lo_f, 0


def _ds_str(value: float) -> str:
    """A DICOM decimal string (at most 16 characters) for ``value``."""
    for digits in range(15, 5, -1):
        s = f"{value:.{digits}g}"
        if len(s) <= 16:
            return s
    return f"{value:.6g}"


def _uid(seed: str | None, *parts: Any) -> str:
    from pydicom.uid import generate_uid

    if seed is None:
        return str(generate_uid())
    return str(generate_uid(entropy_srcs=[seed, *[str(p) for p in parts]]))


def write_dicom_series(
    vol: Volume,
    folder: str | os.PathLike[str],
    *,
    modality: str = "CT",
    series_uid: str | None = None,
    study_uid: str | None = None,
    patient_id: str = "PHANTOM",
    series_description: str = "",
    patient_name: str | None = None,
    overwrite: bool = False,
    frame_of_reference_uid: str | None = None,
    uid_seed: str | None = None,
    series_number: int = 1,
    progress: ProgressCallback | None = None,
) -> list[Path]:
    """Write ``vol`` as a DICOM series, one file per z slice, atomically.

    The files are written into a temporary folder beside ``folder`` (:func:`medseg.io.atomic.
    atomic_dir`), each checked to hold its pixel data, and renamed onto it at the end, so
    ``folder`` is either complete or untouched.

    Args:
        vol: the volume; ``array`` ``(z, y, x)`` (CT in HU), geometry in LPS.
        folder: output folder (created); must not exist or be empty unless ``overwrite``.
        modality: ``"CT"`` (CT Image Storage) or ``"MR"`` (MR Image Storage).
        series_uid: SeriesInstanceUID; default a new UID.
        study_uid: StudyInstanceUID; default ``vol.meta['study_uid']`` or a new UID.
        patient_id: PatientID.
        patient_name: PatientName (DICOM ``Family^Given``); default ``"<patient_id>^"``.
        series_description: SeriesDescription.
        overwrite: replace an existing non-empty ``folder``.
        frame_of_reference_uid: FrameOfReferenceUID; default ``vol.meta`` or a new UID.
        uid_seed: when given, every generated UID is derived from it (reproducible files).
        series_number: SeriesNumber.
        progress: ``progress(done, total)`` called after each slice.

    Returns:
        Paths of the written files in slice order (``slice_0000.dcm`` is array slice 0).

    Raises:
        InputError: unknown modality, NaN values, unsupported voxel type.
        OutputError: the folder exists (without ``overwrite``) or cannot be written (disk full,
            file-size limit, permission denied: nothing is left at ``folder``).
    """
    mod = modality.upper()
    if mod not in SOP_CLASSES:
        raise InputError(
            f"modality {modality!r} cannot be written; use one of {sorted(SOP_CLASSES)}"
        )
    out = prepare_output_dir(folder, overwrite)
    stored, slope, intercept, pixel_rep = _pixel_encoding(vol.array)
    le_dtype = np.dtype("<i2") if pixel_rep else np.dtype("<u2")
    series_uid = series_uid or _uid(uid_seed, "series")
    common = _series_header(
        vol,
        mod,
        series_uid=series_uid,
        study_uid=study_uid or str(vol.meta.get("study_uid") or "") or _uid(uid_seed, "study"),
        for_uid=frame_of_reference_uid
        or str(vol.meta.get("frame_of_reference_uid") or "")
        or _uid(uid_seed, "frame_of_reference"),
        patient_id=patient_id,
        patient_name=patient_name,
        series_description=series_description,
        series_number=series_number,
    )
    common.RescaleIntercept = _ds_str(intercept)
    common.RescaleSlope = _ds_str(slope)
    common.PixelRepresentation = pixel_rep
    nz = vol.shape[0]
    positions = vol.index_to_world(np.stack([np.arange(nz), np.zeros(nz), np.zeros(nz)], axis=1))
    normal = np.cross(vol.direction[:, 0], vol.direction[:, 1])
    names = [f"slice_{k:04d}.dcm" for k in range(nz)]
    plane_bytes = int(stored[0].nbytes)

    def verify(tmp: Path) -> None:
        for n in names:
            if (tmp / n).stat().st_size < plane_bytes:
                raise OSError(errno.EIO, f"{n} is shorter than its pixel data")

    with atomic_dir(out, verify=verify, overwrite=overwrite) as tmp:
        for k in range(nz):
            ds = _slice_dataset(common, k, positions[k], normal, uid_seed)
            ds.PixelData = np.ascontiguousarray(stored[k], dtype=le_dtype).tobytes()
            ds.save_as(tmp / names[k], enforce_file_format=True)
            if progress is not None:
                progress(k + 1, nz)
    return [out / n for n in names]


def _series_header(
    vol: Volume,
    mod: str,
    *,
    series_uid: str,
    study_uid: str,
    for_uid: str,
    patient_id: str,
    patient_name: str | None,
    series_description: str,
    series_number: int,
) -> Dataset:
    """The attributes every slice of the series shares (patient, study, series, plane, pixels)."""
    import pydicom

    now = _dt.datetime.now(_dt.timezone.utc)
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds = pydicom.Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SOP_CLASSES[mod]
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.InstanceCreationDate = date
    ds.InstanceCreationTime = time
    # patient / study / series / equipment
    ds.PatientName = patient_name if patient_name is not None else f"{patient_id}^"
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = date
    ds.StudyTime = time
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.Modality = mod
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = series_description
    ds.PatientPosition = str(vol.meta.get("patient_position") or "HFS")
    ds.SeriesDate = date
    ds.SeriesTime = time
    ds.ContentDate = date
    ds.ContentTime = time
    ds.Manufacturer = "medseg"
    ds.FrameOfReferenceUID = for_uid
    ds.PositionReferenceIndicator = ""
    # image plane (the per-slice position is set by _slice_dataset)
    d = vol.direction
    ds.ImageOrientationPatient = [_ds_str(float(v)) for v in (*d[:, 0], *d[:, 1])]
    ds.PixelSpacing = [_ds_str(vol.spacing[1]), _ds_str(vol.spacing[2])]
    ds.SliceThickness = _ds_str(vol.spacing[0])
    ds.SpacingBetweenSlices = _ds_str(vol.spacing[0])
    ds.AcquisitionNumber = 1
    # pixels
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = vol.shape[1]
    ds.Columns = vol.shape[2]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    if mod == "CT":
        ds.RescaleType = "HU"
        ds.KVP = ""
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
    else:
        ds.RescaleType = "US"
        ds.ScanningSequence = "RM"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.EchoTime = ""
        ds.RepetitionTime = ""
        ds.EchoTrainLength = ""
        ds.MagneticFieldStrength = ""
    return ds


def _slice_dataset(
    common: Dataset, k: int, position: np.ndarray, normal: np.ndarray, uid_seed: str | None
) -> Dataset:
    """Slice ``k``: a copy of the shared header with its own SOP instance, file meta and position
    (``position`` LPS mm of voxel ``(k, 0, 0)``; ``SliceLocation`` is its distance along
    ``normal``)."""
    import copy

    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

    ds = copy.deepcopy(common)
    sop_uid = _uid(uid_seed, "sop", str(common.SeriesInstanceUID), k)
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = common.SOPClassUID
    fm.MediaStorageSOPInstanceUID = sop_uid
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    fm.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = fm
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [_ds_str(float(v)) for v in position]
    ds.SliceLocation = _ds_str(float(np.dot(position, normal)))
    return ds
