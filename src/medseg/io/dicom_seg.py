"""DICOM-SEG export and import (through highdicom), plus what RTSTRUCT shares with it.

Writing (:func:`write_dicom_seg`): the label map must lie on the reference series' grid as
:func:`medseg.io.dicom.read_dicom_series` reads it (slices ascending along the slice normal). Each
label value present becomes one segment (numbered 1..N in label order, as the standard requires);
its name comes from the label table, its colour from :data:`PALETTE`, its coded concept (SNOMED
CT) from the name through :data:`ORGANS` / :data:`ABNORMAL` (:func:`concept_for`; unknown names
are "Tissue"). Frames reference the source instances and are placed at the source slices'
``ImagePositionPatient``; empty frames are omitted. Oblique, flipped (negative cosines) and
non-axial series work; a gantry-tilted (sheared) series is refused, because its slices do not lie
on one regular grid; so is a series with gaps.

Provenance: ``ContentDescription`` (64 characters) names the model; the algorithm identification
of every segment carries the model name, ``medseg <version>`` and the weights hashes; the full
report travels as compact JSON in ``ImageComments`` (0020,4000), a standard LT attribute of the
General Image module (10240 characters; when a report is longer its bulkiest keys are dropped and
listed under ``"truncated"``). No private tags. The label value of each segment is kept in the
standard ``SegmentDescription`` ("medseg label value 3") so non-consecutive labels read back.

Reading (:func:`read_dicom_seg`, BINARY, FRACTIONAL and LABELMAP SEGs): frames are placed by
their own ``ImagePositionPatient`` on the reference grid (or, without a reference, on a grid built
from the SEG's plane positions).

pydicom and highdicom are imported inside functions only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import DicomError, GeometryError, InputError
from medseg.volume import LabelMap, Volume, check_same_grid, grid_differences

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: SOP Class UIDs we read.
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
RTSTRUCT_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"

#: Longest JSON stored in ``ImageComments`` (LT, 10240 characters).
SEG_JSON_LIMIT = 10240

#: Display colours (RGB) by label value: label ``v`` gets ``PALETTE[(v - 1) % len(PALETTE)]``.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (255, 225, 25),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (170, 110, 40),
)

#: Name words -> SNOMED CT concept keyword (``pydicom.sr.codedict.codes.SCT.<keyword>``).
#: Abnormal structures are listed first: "liver tumour" is a neoplasm in the liver.
ABNORMAL: tuple[tuple[tuple[str, ...], str], ...] = (
    (("tumour", "tumor", "tumours", "tumors", "neoplasm", "cancer", "malignancy"), "Neoplasm"),
    (("carcinoma",), "Carcinoma"),
    (("lesion", "lesions", "metastasis", "metastases", "met", "mets"), "Lesion"),
    (("mass",), "Mass"),
    (("nodule", "nodules"), "Nodule"),
    (("cyst", "cysts"), "Cyst"),
    (("edema", "oedema"), "Edema"),
    (("necrosis",), "Necrosis"),
)
ORGANS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("liver", "hepatic"), "Liver"),
    (("kidney", "kidneys", "renal"), "Kidney"),
    (("spleen",), "Spleen"),
    (("pancreas",), "Pancreas"),
    (("lung", "lungs", "pulmonary"), "Lung"),
    (("brain",), "Brain"),
    (("heart",), "Heart"),
    (("prostate",), "Prostate"),
    (("stomach",), "Stomach"),
    (("aorta",), "Aorta"),
    (("bladder",), "Bladder"),
    (("gallbladder",), "Gallbladder"),
    (("esophagus", "oesophagus"), "Esophagus"),
    (("colon",), "Colon"),
    (("duodenum",), "Duodenum"),
    (("adrenal",), "AdrenalGland"),
    (("trachea",), "Trachea"),
    (("breast",), "Breast"),
    (("bone", "bones"), "Bone"),
    (("vertebra", "vertebrae"), "Vertebra"),
    (("muscle", "muscles"), "Muscle"),
    (("lymph", "node"), "LymphNode"),
)

_LABEL_VALUE_RE = re.compile(r"medseg label value (\d+)")
_TILT_TOL_DEG = 0.05
#: Largest distance (in voxels) of a slice or frame position from its grid position.
MAX_OFF_GRID = 0.1
#: Along the slice normal, a frame read back may sit this far (voxels) from a grid slice.
MAX_OFF_SLICE = 0.25


# --------------------------------------------------------------------------- shared helpers
def concept_for(name: str) -> tuple[Any, Any, Any | None]:
    """SNOMED CT ``(category, type, anatomic_region)`` codes for a label name.

    ``"liver"`` -> (Anatomical Structure, Liver, None); ``"liver tumour"`` -> (Morphologically
    Abnormal Structure, Neoplasm, Liver); unknown names -> (Tissue, Tissue, None).
    """
    from pydicom.sr.codedict import codes

    words = set(re.findall(r"[a-z]+", name.lower()))
    organ = next((kw for keys, kw in ORGANS if words & set(keys)), None)
    abnormal = next((kw for keys, kw in ABNORMAL if words & set(keys)), None)
    if abnormal is not None:
        region = getattr(codes.SCT, organ) if organ else None
        return codes.SCT.MorphologicallyAbnormalStructure, getattr(codes.SCT, abnormal), region
    if organ is not None:
        return codes.SCT.AnatomicalStructure, getattr(codes.SCT, organ), None
    return codes.SCT.Tissue, codes.SCT.Tissue, None


def clean_lo(text: str) -> str:
    """``text`` as a DICOM LO value: no backslash or control characters, at most 64."""
    s = re.sub(r"[\x00-\x1f\\]", " ", str(text)).strip()
    return (s or "unnamed")[:64]


def colour_for(value: int) -> tuple[int, int, int]:
    """Display colour (RGB 0..255) of label ``value`` from :data:`PALETTE`."""
    return PALETTE[(int(value) - 1) % len(PALETTE)]


def medseg_version() -> str:
    """The installed medseg version string."""
    from medseg import __version__

    return str(__version__)


def fit_report_json(report: dict[str, Any] | None, limit: int) -> str | None:
    """Compact JSON of ``report`` no longer than ``limit`` characters.

    Bulky keys are dropped in order (``provenance.prompts``, ``provenance.settings``,
    ``timings``, ``metrics``, ``labels``, ``image``, ``provenance.host``) until it fits; the
    dropped keys are listed under ``"truncated"``. ``None`` when no report is given (or not
    even the model hash fits).
    """
    if not report:
        return None
    rep = json.loads(json.dumps(report, default=str))  # deep copy, JSON-safe
    dropped: list[str] = []

    def dump() -> str:
        body = dict(rep)
        if dropped:
            body["truncated"] = list(dropped)
        return json.dumps(body, separators=(",", ":"), sort_keys=True, ensure_ascii=False)

    order = [
        ("provenance", "prompts"),
        ("provenance", "settings"),
        ("timings",),
        ("metrics",),
        ("labels",),
        ("image",),
        ("provenance", "host"),
    ]
    text = dump()
    for path in order:
        if len(text) <= limit:
            break
        parent = rep
        for key in path[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if isinstance(parent, dict) and path[-1] in parent:
            del parent[path[-1]]
            dropped.append(".".join(path))
            text = dump()
    if len(text) > limit:  # still too long: keep only what identifies the result
        model = rep.get("model") if isinstance(rep.get("model"), dict) else {}
        prov = rep.get("provenance") if isinstance(rep.get("provenance"), dict) else {}
        dropped[:] = ["all but schema, engine, model name and hash, version, created"]
        rep = {
            "schema": rep.get("schema"),
            "engine": rep.get("engine"),
            "model": {k: model.get(k) for k in ("name", "weights_sha256") if k in model},
            "provenance": {k: prov.get(k) for k in ("medseg_version", "created") if k in prov},
        }
        text = dump()
        for key in ("engine", "provenance", "schema", "model"):
            if len(text) <= limit:
                break
            rep.pop(key, None)
            text = dump()
    return text if len(text) <= limit else None


def parse_report_json(text: Any) -> dict[str, Any] | None:
    """The report dict stored by :func:`fit_report_json`, or ``None`` when ``text`` is not one."""
    s = str(text or "").strip()
    if not s.startswith("{"):
        return None
    try:
        obj = json.loads(s)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def read_dicom_file(path: str | os.PathLike[str], stop_before_pixels: bool = False) -> Dataset:
    """One DICOM file (Part 10 or preamble-less) through the project's reader.

    Raises:
        InputError: missing file, or not DICOM / unreadable (a :class:`DicomError`).
    """
    from medseg.io.dicom import _dcmread, is_dicom_file

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    if not is_dicom_file(p):
        raise DicomError(f"{p}: not a DICOM file")
    try:
        return _dcmread(p, stop_before_pixels=stop_before_pixels)
    except Exception as exc:
        raise DicomError(f"{p}: not a readable DICOM file ({type(exc).__name__})") from None


@dataclass
class ReferenceSeries:
    """A DICOM series ready to be referenced by a derived object.

    Attributes:
        volume: the series as :func:`medseg.io.dicom.read_dicom_series` reads it.
        headers: one pydicom header (no pixels) per volume slice, in array z order.
    """

    volume: Volume
    headers: list[Dataset]


def load_reference_series(
    reference_dir: str | os.PathLike[str], series: str | None = None
) -> ReferenceSeries:
    """Read a DICOM series and its per-slice headers in the volume's slice order.

    ``series`` picks a SeriesInstanceUID when the folder holds several (default: the largest).

    Raises:
        DicomError: not a readable series.
        GeometryError: gantry-tilted (sheared) series, or slices not on one regular grid (gaps,
            uneven spacing): a derived object's frames could not be placed on the volume's grid.
    """
    from medseg.io.dicom import _dcmread, read_dicom_series, scan_dicom_folder

    path = Path(reference_dir)
    if not path.exists():
        raise InputError(f"{path}: reference DICOM series not found; pass the series folder")
    folder = path if path.is_dir() else path.parent
    scan = scan_dicom_folder(folder)
    vol = read_dicom_series(path, series=series, scan=scan if path.is_dir() else None)
    info = scan.get(vol.meta["series_uid"])
    headers = [_dcmread(f, stop_before_pixels=True) for f in info.files]
    if any(int(h.get("NumberOfFrames", 1) or 1) > 1 for h in headers):
        raise DicomError(
            f"{path}: a multi-frame (enhanced) series cannot be referenced yet; export it as "
            "single-frame images (e.g. dcmodify/emf2sf) and use that series"
        )
    iop_ref = np.r_[vol.direction[:, 0], vol.direction[:, 1]]
    headers = [  # the slices the reader stacked: same orientation and size (no localizers)
        h
        for h in headers
        if "ImagePositionPatient" in h
        and "SOPInstanceUID" in h
        and "ImageOrientationPatient" in h
        and np.abs(np.array([float(v) for v in h.ImageOrientationPatient]) - iop_ref).max() < 1e-3
        and (int(h.get("Rows", 0)), int(h.get("Columns", 0))) == vol.shape[1:]
    ]
    n = vol.direction[:, 2]
    pos = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
    if len(headers) > 1:
        order = np.lexsort(
            ([int(h.get("InstanceNumber", 0) or 0) for h in headers], np.round(pos @ n, 3))
        )
        headers = [headers[i] for i in order]
        pos = pos[order]
        keep = [0] + [i for i in range(1, len(pos)) if abs((pos[i] - pos[i - 1]) @ n) >= 1e-3]
        headers, pos = [headers[i] for i in keep], pos[keep]
        span = pos[-1] - pos[0]
        length = float(np.linalg.norm(span))
        if length > 1e-6:
            angle = float(np.degrees(np.arccos(min(1.0, abs(float(span @ n)) / length))))
            if angle > _TILT_TOL_DEG:
                raise GeometryError(
                    f"{path}: gantry-tilted series (slices advance at {angle:.2f} degrees to "
                    "their normal); DICOM-SEG/RTSTRUCT export needs an unsheared series: "
                    "resample it (e.g. dcm2niix tilt correction) and segment that"
                )
    if len(headers) != vol.shape[0]:
        raise GeometryError(
            f"{path}: {len(headers)} slice headers for {vol.shape[0]} volume slices; "
            "the series cannot be referenced slice by slice"
        )
    expected = vol.index_to_world(
        np.stack([np.arange(vol.shape[0]), np.zeros(vol.shape[0]), np.zeros(vol.shape[0])], 1)
    )
    # each frame is placed at its own source slice's position; the label map's slice k must
    # still be that slice: allow position jitter (a quarter voxel along the normal, a tenth
    # in-plane, as read_dicom_seg does), not gaps
    dev = np.abs(vol.world_to_index(pos) - vol.world_to_index(expected))
    err = np.maximum(dev[:, 0] * (MAX_OFF_GRID / MAX_OFF_SLICE), dev[:, 1:].max(axis=1))
    if err.max() > MAX_OFF_GRID:
        k = int(np.argmax(err))
        raise GeometryError(
            f"{path}: slice {k} lies {dev[k].max():.2f} voxel off the series' regular grid (gap "
            "or uneven spacing); resample the series to even spacing before exporting"
        )
    return ReferenceSeries(volume=vol, headers=headers)


def prepare_export(
    labels: LabelMap,
    reference_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    inputs: Any,
    overwrite: bool,
    series: str | None,
) -> tuple[Path, ReferenceSeries, LabelMap, list[int]]:
    """What every DICOM export checks first: ``(output path, reference series, label map on the
    series' slice order, label values present)``.

    Raises:
        OutputError: bad output path. InputError: an empty label map. GeometryError: not on the
            series' grid, or a tilted / uneven series.
    """
    from medseg.io.files import check_output_path

    o = check_output_path(out, [reference_dir, *inputs], overwrite)
    present = labels.present()
    if not present:
        raise InputError("the label map is empty (all background); there is nothing to export")
    ref = load_reference_series(reference_dir, series)
    return o, ref, align_to_reference(labels, ref.volume), present


def align_to_reference(labels: LabelMap, ref: Volume) -> LabelMap:
    """``labels`` on ``ref``'s grid: as is, or with its slice order reversed when it is the same
    physical grid stored left-handed (z axis flipped).

    Raises:
        GeometryError: naming the differences (shape, spacing, origin, direction).
    """
    if not grid_differences(labels, ref):
        return labels
    nz = labels.shape[0]
    flipped_dir = labels.direction.copy()
    flipped_dir[:, 2] *= -1
    flipped = Volume(  # the same voxels, slice order reversed (the array is only a view)
        labels.array[::-1],
        spacing=labels.spacing,
        origin=tuple(labels.index_to_world((nz - 1, 0, 0))),
        direction=flipped_dir,
    )
    if not grid_differences(flipped, ref):
        return LabelMap(
            array=np.ascontiguousarray(labels.array[::-1]),
            labels=dict(labels.labels),
            meta=dict(labels.meta),
            **ref.copy_geometry(),
        )
    check_same_grid(labels, ref, what="label map", against="reference DICOM series")
    raise AssertionError("unreachable: check_same_grid raised")


def _algorithm_fields(report: dict[str, Any] | None) -> tuple[str, dict[str, str], str]:
    """(algorithm name, parameters, algorithm type) from a report."""
    model = (report or {}).get("model") or {}
    name = str(model.get("name") or "")
    params = {
        k: str(model[k])
        for k in ("weights_sha256", "decoder_sha256", "precision", "device")
        if model.get(k)
    }
    if not report or not name:
        return name, params, "MANUAL"
    prompts = ((report.get("provenance") or {}).get("prompts")) or None
    return name, params, "SEMIAUTOMATIC" if prompts else "AUTOMATIC"


# --------------------------------------------------------------------------- writing
def write_dicom_seg(
    labels: LabelMap,
    reference_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    report: dict[str, Any] | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | os.PathLike[str]] = (),
    series: str | None = None,
) -> Path:
    """Write ``labels`` as a binary DICOM-SEG referencing the series in ``reference_dir``.

    Args:
        labels: label map ``(z, y, x)`` on the reference series' grid (as
            :func:`medseg.io.read_volume` reads the folder); a left-handed copy of that grid
            (slice order reversed) is accepted too.
        reference_dir: the source DICOM series (folder, or one of its files).
        out: output ``.dcm`` path; written atomically.
        report: the pipeline report; its ``model`` fills the algorithm identification and the
            whole report travels in ``ImageComments`` as JSON. Without a report the segments are
            marked ``MANUAL`` (origin unknown).
        overwrite: replace an existing ``out``.
        inputs: further input paths ``out`` must not overwrite.
        series: SeriesInstanceUID when ``reference_dir`` holds several (default: the largest).

    Returns:
        The written path.

    Raises:
        InputError: the label map is empty.
        GeometryError: other grid than the reference (the differences are named), or a
            gantry-tilted / unevenly spaced reference series (refused).
        OutputError: ``out`` exists (without ``overwrite``), is an input, or cannot be written.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medseg.io.files import atomic_path

    o, ref, lm, present = prepare_export(labels, reference_dir, out, inputs, overwrite, series)

    name, params, algo_type = _algorithm_fields(report)
    version = medseg_version()
    algo = None
    if algo_type != "MANUAL":
        algo = hd.AlgorithmIdentificationSequence(
            name=name[:64],
            family=codes.cid7162.ArtificialIntelligence,
            version=f"medseg {version}"[:64],
            source="medseg",
            parameters=params or None,
        )
    descriptions = []
    for number, value in enumerate(present, start=1):
        seg_name = lm.name(value)
        category, prop_type, region = concept_for(seg_name)
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=clean_lo(seg_name),
            segmented_property_category=category,
            segmented_property_type=prop_type,
            algorithm_type=algo_type,
            algorithm_identification=algo,
            anatomic_regions=[region] if region is not None else None,
            display_color=hd.color.CIELabColor.from_rgb(*colour_for(value)),
        )
        desc.SegmentDescription = f"medseg label value {value}"
        descriptions.append(desc)

    # label values -> segment numbers 1..N (0 stays background)
    pixels = np.searchsorted(np.array([0, *present]), lm.array)
    pixels = pixels.astype(np.uint8 if len(present) <= 255 else np.uint16)

    model_name = name or "label map"
    try:
        seg = hd.seg.Segmentation(
            source_images=ref.headers,
            pixel_array=pixels,
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=hd.UID(),
            series_number=9001,
            sop_instance_uid=hd.UID(),
            instance_number=1,
            manufacturer="medseg",
            manufacturer_model_name=(name or "medseg")[:64],
            software_versions=version,
            device_serial_number="0",
            content_description=f"medseg: {model_name}"[:64],
            content_label="MEDSEG",
            series_description=f"medseg SEG ({model_name})"[:64],
        )
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        # highdicom checks the source headers (patient/study attributes, geometry)
        raise DicomError(
            f"{reference_dir}: highdicom cannot derive a DICOM-SEG from this series "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "the series' headers must hold FrameOfReferenceUID, StudyInstanceUID, PixelSpacing"
        ) from None
    text = fit_report_json(report, SEG_JSON_LIMIT)
    if text is not None:
        seg.ImageComments = text
    with atomic_path(o, verify=_readable_dicom) as tmp:
        seg.save_as(tmp)
    return o


def _readable_dicom(path: Path) -> None:
    """Verify a written DICOM file: it parses whole, pixel data included (else a short write)."""
    import pydicom

    ds = pydicom.dcmread(path)
    if "PixelData" in ds:
        _ = len(ds.PixelData)


# --------------------------------------------------------------------------- reading
def _frame_item(ds: Any, i: int, seq: str) -> Any | None:
    per = ds.get("PerFrameFunctionalGroupsSequence")
    if per is not None and i < len(per) and seq in per[i]:
        return per[i][seq][0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared and seq in shared[0]:
        return shared[0][seq][0]
    return None


def _grid_from_frames(
    positions: np.ndarray,
    iop: np.ndarray,
    pixel_spacing: tuple[float, float],
    shape_yx: tuple,
    thickness: float | None,
) -> Volume:
    """A grid that holds every frame position (slices ascending along the normal)."""
    row, col = iop[:3], iop[3:]
    n = np.cross(row, col)
    dist = positions @ n
    uniq = np.unique(np.round(dist, 3))
    if len(uniq) > 1:
        steps = np.diff(uniq)
        sz = float(thickness) if thickness else float(steps.min())
        if np.any(np.abs(steps / sz - np.round(steps / sz)) > 0.05):
            sz = float(steps.min())
    else:
        sz = float(thickness) if thickness else 1.0
    first = positions[int(np.argmin(dist))]
    nz = int(np.round((uniq[-1] - uniq[0]) / sz)) + 1
    return Volume(
        np.zeros((nz, *shape_yx), np.uint8),
        spacing=(sz, pixel_spacing[0], pixel_spacing[1]),
        origin=tuple(first),
        direction=np.column_stack([row, col, n]),
    )


def read_dicom_seg(
    path: str | os.PathLike[str], reference: Volume | str | os.PathLike[str] | None = None
) -> LabelMap:
    """Read a DICOM-SEG into a :class:`LabelMap`, frames placed by their plane positions.

    Args:
        path: the SEG file (BINARY, FRACTIONAL (> 50 %) or LABELMAP).
        reference: the referenced series (its folder or its :class:`Volume`): the label map is
            returned on that grid. Without it, the grid is built from the SEG's own plane
            positions (from its first to its last frame along the slice normal).

    Returns:
        LabelMap ``(z, y, x)``; label values restored from medseg's ``SegmentDescription``
        ("medseg label value N"), else the segment numbers; names from ``SegmentLabel``.
        ``meta`` holds ``format``, ``source``, ``referenced_series_uid``, ``provenance`` (the
        report when present) and ``warnings`` (e.g. overlapping segments: higher number kept).

    Raises:
        InputError: not a DICOM-SEG / unreadable.
        GeometryError: frames whose orientation, spacing or position do not fit the reference.
    """
    p = Path(path)
    ds = read_dicom_file(p)
    if str(ds.get("SOPClassUID", "")) != SEG_SOP_CLASS and ds.get("Modality") != "SEG":
        raise InputError(f"{p}: not a DICOM-SEG (Modality {ds.get('Modality', '?')})")
    seg_type = str(ds.get("SegmentationType", "BINARY")).upper()
    try:
        frames = np.asarray(ds.pixel_array)
    except Exception as exc:
        raise DicomError(f"{p}: cannot decode the SEG frames: {exc}") from None
    nframes = int(ds.get("NumberOfFrames", 1) or 1)
    frames = frames.reshape(nframes, int(ds.Rows), int(ds.Columns))

    values: dict[int, int] = {}
    names: dict[int, str] = {}
    for item in ds.get("SegmentSequence", []):
        number = int(item.SegmentNumber)
        m = _LABEL_VALUE_RE.search(str(item.get("SegmentDescription", "")))
        values[number] = int(m.group(1)) if m else number
        names[values[number]] = str(item.get("SegmentLabel", "") or f"segment_{number}")

    positions, seg_numbers = [], []
    iop = None
    pix = None
    thickness = None
    for i in range(nframes):
        pp = _frame_item(ds, i, "PlanePositionSequence")
        po = _frame_item(ds, i, "PlaneOrientationSequence")
        pm = _frame_item(ds, i, "PixelMeasuresSequence")
        if pp is None or po is None or pm is None:
            raise DicomError(
                f"{p}: frame {i + 1} has no plane position/orientation/pixel spacing; "
                "the SEG cannot be placed in space"
            )
        positions.append([float(v) for v in pp.ImagePositionPatient])
        f_iop = np.array([float(v) for v in po.ImageOrientationPatient])
        f_pix = tuple(float(v) for v in pm.PixelSpacing)
        if iop is None:
            iop, pix = f_iop, f_pix
            sb = pm.get("SpacingBetweenSlices") or pm.get("SliceThickness")
            thickness = float(sb) if sb else None
        elif np.abs(f_iop - iop).max() > 1e-3 or np.abs(np.subtract(f_pix, pix)).max() > 1e-3:
            raise GeometryError(f"{p}: frames differ in orientation or pixel spacing")
        sid = _frame_item(ds, i, "SegmentIdentificationSequence")
        seg_numbers.append(int(sid.ReferencedSegmentNumber) if sid is not None else 0)
    pos = np.asarray(positions, dtype=float)
    if iop is None or pix is None:
        raise DicomError(f"{p}: the SEG holds no frames; nothing to read")

    warnings: list[str] = []
    if reference is None:
        grid = _grid_from_frames(pos, iop, pix, frames.shape[1:], thickness)
    elif isinstance(reference, Volume):
        grid = reference
    else:
        from medseg.io.files import read_volume

        grid = read_volume(reference)
    diffs = []
    if (
        np.abs(iop[:3] - grid.direction[:, 0]).max() > 1e-3
        or np.abs(iop[3:] - grid.direction[:, 1]).max() > 1e-3
    ):
        diffs.append(
            f"orientation {np.round(iop, 4).tolist()} vs "
            f"{np.round(np.r_[grid.direction[:, 0], grid.direction[:, 1]], 4).tolist()}"
        )
    if np.abs(np.subtract(pix, grid.spacing[1:])).max() > 1e-3:
        diffs.append(f"pixel spacing {pix} vs {grid.spacing[1:]} mm")
    if frames.shape[1:] != grid.shape[1:]:
        diffs.append(f"frame size {frames.shape[1:]} vs {grid.shape[1:]}")
    if diffs:
        raise GeometryError(
            f"{p}: the SEG does not lie on the reference series' grid ({'; '.join(diffs)}); "
            "pass the series it was made from"
        )
    idx = grid.world_to_index(pos)
    kz = np.round(idx[:, 0]).astype(int)
    off_z = np.abs(idx[:, 0] - kz)
    off_yx = np.abs(idx[:, 1:]).max(axis=1)
    bad = np.nonzero(
        (off_z > MAX_OFF_SLICE) | (off_yx > MAX_OFF_GRID) | (kz < 0) | (kz >= grid.shape[0])
    )[0]
    if bad.size:
        i = int(bad[0])
        raise GeometryError(
            f"{p}: frame {i + 1} at {np.round(pos[i], 3).tolist()} mm does not fall on a slice "
            f"of the reference grid (index {np.round(idx[i], 3).tolist()}); pass the series "
            "the SEG was made from"
        )

    out = np.zeros(
        grid.shape, dtype=np.uint16 if max(values.values(), default=0) > 255 else np.uint8
    )
    overlap = 0
    for i in range(nframes):
        f = frames[i]
        if seg_type == "LABELMAP":
            lut = np.zeros(int(f.max()) + 1, dtype=out.dtype)
            for number, value in values.items():
                if number < lut.size:
                    lut[number] = value
            mask = f > 0
            out[kz[i]][mask] = lut[f[mask]]
            continue
        if seg_type == "FRACTIONAL":
            mask = f > float(ds.get("MaximumFractionalValue", 255)) / 2
        else:
            mask = f > 0
        value = values.get(seg_numbers[i], seg_numbers[i])
        plane = out[kz[i]]
        overlap += int(np.count_nonzero(mask & (plane != 0) & (plane != value)))
        plane[mask] = value
    if overlap:
        warnings.append(
            f"segments overlap in {overlap} voxel(s); a label map holds one label per voxel: "
            "the higher segment number was kept"
        )
    ref_series = ""
    rss = ds.get("ReferencedSeriesSequence")
    if rss:
        ref_series = str(rss[0].get("SeriesInstanceUID", ""))
    grid_series = str(grid.meta.get("series_uid", "") or "")
    if ref_series and grid_series and grid_series != ref_series:
        warnings.append(
            f"the SEG references series {ref_series} but was placed on series {grid_series} "
            "by position; check that the reference is the right series"
        )
    meta = {
        "format": "dicom-seg",
        "source": str(p),
        "modality": "SEG",
        "referenced_series_uid": ref_series,
        "provenance": parse_report_json(ds.get("ImageComments")),
        "warnings": warnings,
    }
    return LabelMap(array=out, labels=names, meta=meta, **grid.copy_geometry())


def read_provenance(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The report stored in a DICOM-SEG (``ImageComments``) or RTSTRUCT
    (``StructureSetDescription``) written by medseg.

    Returns:
        The report dict (an RTSTRUCT's may be reduced: see its ``"truncated"`` key); ``None``
        when the file holds none or is not DICOM (e.g. a NIfTI label map).

    Raises:
        InputError: the file does not exist; DicomError: a damaged DICOM file.
    """
    from medseg.io.dicom import is_dicom_file

    p = Path(path)
    if p.is_file() and not is_dicom_file(p):
        return None
    ds = read_dicom_file(p, stop_before_pixels=True)
    sop = str(ds.get("SOPClassUID", ""))
    if sop == SEG_SOP_CLASS or ds.get("Modality") == "SEG":
        return parse_report_json(ds.get("ImageComments"))
    if sop == RTSTRUCT_SOP_CLASS or ds.get("Modality") == "RTSTRUCT":
        return parse_report_json(ds.get("StructureSetDescription"))
    return None
