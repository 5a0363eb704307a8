"""DICOM series discovery and reading into a :class:`~medseg.volume.Volume`.

A folder is scanned recursively (headers only); files are grouped by ``SeriesInstanceUID``. A series
is stacked by the position of each slice along the slice normal
``n = row_cosines x column_cosines`` (never by file name or ``InstanceNumber``), rescaled with
``RescaleSlope``/``RescaleIntercept`` (CT in HU), and given the geometry::

    spacing   = (median step along n, PixelSpacing[0] (row pitch), PixelSpacing[1] (column pitch))
    origin    = ImagePositionPatient of the first slice (smallest position along n), LPS mm
    direction = [row cosines | column cosines | n] as columns (ITK convention, see medseg.volume)

Problems that do not prevent a volume (gaps, uneven spacing, gantry tilt, duplicate positions,
mixed slice sizes or orientations, files without pixel data, non-DICOM files) are listed in
``meta['warnings']``; problems that do (no DICOM, no pixel data, truncated pixel data, slices that
cannot be stacked) raise :class:`~medseg.errors.DicomError` with one line saying what to do.

pydicom is imported inside functions only.
"""

from __future__ import annotations

import contextlib
import os
import warnings as _warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import DicomError
from medseg.volume import Volume

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from medseg.progress import ProgressCallback

#: Media Storage SOP Class UID of a DICOMDIR (Media Storage Directory Storage).
_DICOMDIR_SOP = "1.2.840.10008.1.3.10"
#: Two orientations are "the same" when their cosines agree to this tolerance.
_ORIENT_TOL = 1e-3
#: A step is uneven when it differs from the median by more than this fraction (plus 0.01 mm).
_STEP_RTOL = 0.1
#: Gantry tilt (degrees) below which it is ignored.
_TILT_TOL_DEG = 0.05


# --------------------------------------------------------------------------- detection
def _dcmread(path: Path, stop_before_pixels: bool = False) -> Dataset:
    """``pydicom.dcmread(force=True)`` without pydicom's per-value warnings (non-conformant
    values are common in the wild; problems that matter are reported by this module)."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    with _warnings.catch_warnings():
        _warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=True)
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        # a raw dataset without file meta (no preamble): record the encoding it was read with
        implicit, little = ds.original_encoding
        if meta is None:
            meta = ds.file_meta = FileMetaDataset()
        meta.TransferSyntaxUID = (
            ImplicitVRLittleEndian
            if implicit
            else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
        )
    return ds


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """Cheap check whether ``path`` is a DICOM file.

    True when the file has the ``DICM`` prefix at byte 128 (Part 10 file), or, for preamble-less
    files, when it starts with a group 0x0002/0x0008 tag and parses (headers only) into a dataset
    holding a SOP Class UID, a Series Instance UID or a Modality.
    """
    p = Path(path)
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    group = int.from_bytes(head[0:2], "little")
    if group not in (0x0002, 0x0008):
        return False

    try:
        ds = _dcmread(p, stop_before_pixels=True)
        return any(k in ds for k in ("SOPClassUID", "SeriesInstanceUID", "Modality"))
    except Exception:
        return False


# --------------------------------------------------------------------------- scanning
@dataclass
class SeriesInfo:
    """One series found by :func:`scan_dicom_folder`.

    Attributes:
        uid: SeriesInstanceUID.
        modality: e.g. ``CT``, ``MR``.
        description: SeriesDescription ('' when absent).
        study_uid: StudyInstanceUID.
        files: the series' files (unsorted).
        sizes: count of files per ``(rows, columns)`` (``None`` for files without Rows/Columns);
            :attr:`size` is the most common one.
    """

    uid: str
    modality: str = ""
    description: str = ""
    study_uid: str = ""
    files: list[Path] = field(default_factory=list)
    sizes: Counter = field(default_factory=Counter)

    @property
    def n_files(self) -> int:
        """Number of files in the series."""
        return len(self.files)

    @property
    def size(self) -> tuple[int, int] | None:
        """Most common ``(rows, columns)`` over the files, ``None`` when no file has a size."""
        known = [(s, c) for s, c in self.sizes.most_common() if s is not None]
        return known[0][0] if known else None

    def summary(self) -> str:
        """One line: uid, modality, description, file count, size."""
        size = "x".join(str(v) for v in self.size) if self.size else "no image size"
        desc = f" '{self.description}'" if self.description else ""
        return f"{self.uid} ({self.modality or '?'}{desc}, {self.n_files} files, {size})"

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly description."""
        return {
            "uid": self.uid,
            "modality": self.modality,
            "description": self.description,
            "study_uid": self.study_uid,
            "n_files": self.n_files,
            "size": list(self.size) if self.size else None,
        }


@dataclass
class DicomScan:
    """What :func:`scan_dicom_folder` found.

    Attributes:
        folder: the scanned folder.
        series: series by UID, largest (most files) first.
        skipped: files that are not DICOM (skipped).
        dicomdirs: DICOMDIR index files (skipped; the images are read directly).
        unreadable: DICOM-looking files whose header could not be parsed, with the reason.
    """

    folder: Path
    series: dict[str, SeriesInfo] = field(default_factory=dict)
    skipped: list[Path] = field(default_factory=list)
    dicomdirs: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    @property
    def n_files(self) -> int:
        """All files looked at."""
        n = sum(s.n_files for s in self.series.values())
        return n + len(self.skipped) + len(self.dicomdirs) + len(self.unreadable)

    def largest(self) -> SeriesInfo:
        """The series with the most files, preferring series whose files have an image size.

        Raises:
            DicomError: no series at all.
        """
        if not self.series:
            raise DicomError(self._nothing_found())
        imaging = [s for s in self.series.values() if s.size is not None]
        pool = imaging or list(self.series.values())
        return max(pool, key=lambda s: (s.n_files, s.uid))

    def get(self, uid: str) -> SeriesInfo:
        """The series with this UID.

        Raises:
            DicomError: unknown UID (the message lists the available ones).
        """
        if uid in self.series:
            return self.series[uid]
        if not self.series:
            raise DicomError(self._nothing_found())
        avail = "; ".join(s.summary() for s in self.series.values())
        raise DicomError(f"{self.folder}: no series with UID {uid}; available: {avail}")

    def skipped_paths(self) -> list[str]:
        """Non-DICOM, DICOMDIR and unreadable files as strings (for ``meta['skipped_files']``)."""
        return [str(p) for p in (*self.skipped, *self.dicomdirs, *(p for p, _ in self.unreadable))]

    def _nothing_found(self) -> str:
        if self.n_files == 0:
            return f"{self.folder}: the folder is empty; point to a folder holding DICOM files"
        parts = []
        if self.skipped:
            parts.append(f"{len(self.skipped)} non-DICOM")
        if self.dicomdirs:
            parts.append(f"{len(self.dicomdirs)} DICOMDIR")
        if self.unreadable:
            first, why = self.unreadable[0]
            parts.append(f"{len(self.unreadable)} unreadable DICOM (e.g. {first.name}: {why})")
        return (
            f"{self.folder}: no readable DICOM image files found ({', '.join(parts)} file(s)); "
            "point to the folder holding the series"
        )


def _list_files(folder: Path) -> list[Path]:
    out: list[Path] = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        out.extend(Path(root) / f for f in sorted(files))
    return out


def scan_dicom_folder(
    folder: str | os.PathLike[str], progress: ProgressCallback | None = None
) -> DicomScan:
    """Find the DICOM series in ``folder`` (recursively), reading headers only.

    Args:
        folder: folder to scan.
        progress: ``progress(done, total)`` called once per file.

    Returns:
        A :class:`DicomScan` (may hold no series: check ``scan.series``).

    Raises:
        DicomError: ``folder`` is not a folder.
    """

    root = Path(folder)
    if not root.is_dir():
        raise DicomError(f"{root}: not a folder")
    files = _list_files(root)
    scan = DicomScan(folder=root)
    for i, f in enumerate(files):
        if f.name.upper() == "DICOMDIR":
            scan.dicomdirs.append(f)
        elif not is_dicom_file(f):
            scan.skipped.append(f)
        else:
            try:
                ds = _dcmread(f, stop_before_pixels=True)
                _add_header(scan, f, ds)
            except Exception as exc:  # a damaged header must not stop the scan
                scan.unreadable.append((f, _one_line(exc)))
        if progress is not None:
            progress(i + 1, len(files))
    scan.series = dict(sorted(scan.series.items(), key=lambda kv: (-kv[1].n_files, kv[0])))
    return scan


def _add_header(scan: DicomScan, f: Path, ds: Dataset) -> None:
    sop = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
    if sop == _DICOMDIR_SOP or "DirectoryRecordSequence" in ds:
        scan.dicomdirs.append(f)
        return
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    if not uid:
        scan.unreadable.append((f, "no SeriesInstanceUID"))
        return
    info = scan.series.get(uid)
    if info is None:
        info = scan.series[uid] = SeriesInfo(
            uid=uid,
            modality=str(ds.get("Modality", "") or ""),
            description=str(ds.get("SeriesDescription", "") or ""),
            study_uid=str(ds.get("StudyInstanceUID", "") or ""),
        )
    info.files.append(f)
    rows, cols = ds.get("Rows"), ds.get("Columns")
    info.sizes[(int(rows), int(cols)) if rows and cols else None] += 1


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


# --------------------------------------------------------------------------- reading
@dataclass
class _Slice:
    path: Path
    ds: Any
    position: np.ndarray  # IPP (x, y, z) LPS
    orientation: np.ndarray  # IOP (6,)
    spacing: tuple[float, float]  # PixelSpacing (row, col)
    size: tuple[int, int]
    instance: int
    dist: float = 0.0  # along the normal


def read_dicom_series(
    folder: str | os.PathLike[str],
    series: str | None = None,
    progress: ProgressCallback | None = None,
    scan: DicomScan | None = None,
) -> Volume:
    """Read one DICOM series into a :class:`Volume`.

    Args:
        folder: folder searched recursively, or one DICOM file: then that file's series in its
            folder is read (unless ``series`` is given), and when the series' slices differ in
            size or orientation, the slices matching that file are used.
        series: SeriesInstanceUID; default: the largest series (named in ``meta['series_chosen']``
            and, when there are others, in a warning line).
        progress: ``progress(done, total)`` called once per file (scan, then read).
        scan: a :func:`scan_dicom_folder` result to reuse (skips the scan).

    Returns:
        Volume with array ``(z, y, x)`` (z along the slice normal, ascending), spacing ``(z, y, x)``
        mm, LPS origin of the first slice, ITK direction. CT values are HU (``int16`` when the
        rescaled values are whole numbers that fit, else ``float32``). ``meta`` holds ``modality``,
        ``series_uid``, ``study_uid``, ``series_description``, ``patient_position``, ``source``,
        ``n_files``, ``skipped_files``, ``warnings``, ``series_chosen``.

    Raises:
        DicomError: empty folder / no DICOM, unknown series UID, no pixel data, truncated or
            undecodable pixel data, slices that cannot be stacked, or any failure of pydicom or
            numpy on a damaged file (one line naming the file).
    """

    path = Path(folder)
    if not path.exists():
        raise DicomError(f"{path}: no such file or folder")
    one_file: Path | None = None
    series_from_file = False
    if path.is_file():
        one_file, path = path, path.parent
        if series is None:
            series = _series_of_file(one_file)
            series_from_file = series is not None
    n_scan = 0
    if scan is None:
        n_scan = sum(1 for _ in _list_files(path)) if path.is_dir() else 0

        def scan_progress(done: int, total: int) -> None:
            if progress is not None:
                progress(done, 2 * max(total, 1))

        scan = scan_dicom_folder(path, progress=scan_progress if progress else None)
    info, warnings = _choose_series(scan, series)
    slices, no_geometry = _read_slices(path, info, warnings, progress, n_scan)
    try:
        prefer = one_file if series_from_file else None
        array, spacing, origin, direction, stacked = _assemble(
            path, info, slices, no_geometry, warnings, prefer
        )
        meta = _series_meta(stacked[0].ds, info, scan, one_file or path, len(stacked), warnings)
    except DicomError:
        raise
    except Exception as exc:  # a damaged header value that pydicom parses lazily
        raise DicomError(
            f"{path}: series {info.uid} cannot be read ({type(exc).__name__}: {_one_line(exc)}); "
            "a file is damaged — remove it or re-export the series"
        ) from None
    return Volume(array=array, spacing=spacing, origin=origin, direction=direction, meta=meta)


def _series_of_file(one_file: Path) -> str | None:
    """The SeriesInstanceUID of one DICOM file (``None`` when it has none)."""
    if not is_dicom_file(one_file):
        raise DicomError(f"{one_file}: not a DICOM file")
    with _file_errors(one_file):
        ds = _dcmread(one_file, stop_before_pixels=True)
        return str(ds.get("SeriesInstanceUID", "") or "") or None


@contextlib.contextmanager
def _file_errors(f: Path) -> Iterator[None]:
    """Turn any pydicom/numpy failure on ``f``'s bytes into one :class:`DicomError` line."""
    try:
        yield
    except DicomError:
        raise
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as exc:
        raise DicomError(
            f"{f}: cannot read DICOM file (truncated or damaged?): {type(exc).__name__}: "
            f"{_one_line(exc)}; remove it or re-export the series"
        ) from None


def _choose_series(scan: DicomScan, series: str | None) -> tuple[SeriesInfo, list[str]]:
    """The series to read (``series`` or the largest) and the scan's warning lines."""
    if not scan.series:
        raise DicomError(scan._nothing_found())
    warnings: list[str] = []
    if series is not None:
        info = scan.get(series)
    else:
        info = scan.largest()
        others = [s for s in scan.series.values() if s.uid != info.uid]
        if others:
            warnings.append(
                f"the folder holds {len(scan.series)} series; read the largest, {info.summary()}; "
                f"others: {'; '.join(s.summary() for s in others)} (choose one with --series UID)"
            )
    if scan.skipped:
        names = ", ".join(p.name for p in scan.skipped[:5])
        more = f" and {len(scan.skipped) - 5} more" if len(scan.skipped) > 5 else ""
        warnings.append(f"skipped {len(scan.skipped)} non-DICOM file(s): {names}{more}")
    for p, why in scan.unreadable:
        warnings.append(f"skipped unreadable DICOM file {p.name}: {why}")
    return info, warnings


def _read_slices(
    path: Path,
    info: SeriesInfo,
    warnings: list[str],
    progress: ProgressCallback | None,
    n_scan: int,
) -> tuple[list[_Slice], list[Path]]:
    """Read the series' files (with pixels); files without pixel data are skipped with a
    warning. Returns the slices and the files lacking position/orientation."""
    total = n_scan + info.n_files
    slices: list[_Slice] = []
    no_pixels: list[Path] = []
    no_geometry: list[Path] = []
    for i, f in enumerate(info.files):
        with _file_errors(f):
            ds = _dcmread(f)
            if progress is not None:
                progress(n_scan + i + 1, total)
            if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
                no_pixels.append(f)
                continue
            slices.append(_make_slice(f, ds, no_geometry))
    if not slices:
        raise DicomError(
            f"{path}: series {info.uid} has {info.n_files} file(s) but none holds pixel data "
            "(headers only, e.g. a DICOMDIR test set or a structure set); point to image files"
        )
    if no_pixels:
        warnings.append(
            f"skipped {len(no_pixels)} file(s) without pixel data: "
            + ", ".join(p.name for p in no_pixels[:5])
        )
    return slices, no_geometry


def _assemble(
    path: Path,
    info: SeriesInfo,
    slices: list[_Slice],
    no_geometry: list[Path],
    warnings: list[str],
    prefer: Path | None,
) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray, np.ndarray, list[_Slice]]:
    """Stack the slices (or read the one multi-frame file): ``(array, spacing, origin,
    direction, slices used)``."""
    multi = [s for s in slices if _int(s.ds.get("NumberOfFrames", 1), 1) > 1]
    if multi:
        if len(slices) > 1:
            raise DicomError(
                f"{path}: series {info.uid} mixes multi-frame and single-frame files; "
                "read them as separate series"
            )
        with _file_errors(slices[0].path):
            array, spacing, origin, direction = _read_multiframe(slices[0], warnings)
        return array, spacing, origin, direction, slices
    if no_geometry and len(slices) > 1:
        raise DicomError(
            f"{path}: {len(no_geometry)} file(s) of series {info.uid} lack "
            "ImagePositionPatient/ImageOrientationPatient (e.g. "
            f"{no_geometry[0].name}); the slices cannot be ordered in space"
        )
    stacked = _select_slices(slices, warnings, f"{path}: series {info.uid}", prefer)
    array, spacing, origin, direction = _stack(stacked, warnings)
    if no_geometry:
        warnings.append(
            f"{no_geometry[0].name} has no ImagePositionPatient/ImageOrientationPatient; "
            "origin 0 and identity direction assumed"
        )
    return array, spacing, origin, direction, stacked


def _series_meta(
    ds0: Any, info: SeriesInfo, scan: DicomScan, source: Path, n: int, warnings: list[str]
) -> dict[str, Any]:
    """``Volume.meta`` of a series read from ``source`` (``ds0``: the first slice's header)."""
    return {
        "modality": str(ds0.get("Modality", "") or info.modality),
        "series_uid": info.uid,
        "study_uid": str(ds0.get("StudyInstanceUID", "") or info.study_uid),
        "series_description": str(ds0.get("SeriesDescription", "") or info.description),
        "patient_position": str(ds0.get("PatientPosition", "") or ""),
        "source": str(source),
        "format": "dicom",
        "n_files": n,
        "skipped_files": scan.skipped_paths(),
        "warnings": warnings,
        "series_chosen": info.uid,
        "series_available": [s.uid for s in scan.series.values()],
    }


def _int(value: Any, default: int) -> int:
    try:
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _floats(value: Any, n: int) -> np.ndarray | None:
    if value is None:
        return None
    try:
        arr = np.asarray([float(v) for v in value], dtype=float)
    except (TypeError, ValueError):
        return None
    return arr if arr.shape == (n,) and np.all(np.isfinite(arr)) else None


def _make_slice(f: Path, ds: Any, no_geometry: list[Path]) -> _Slice:
    ipp = _floats(ds.get("ImagePositionPatient"), 3)
    iop = _floats(ds.get("ImageOrientationPatient"), 6)
    if ipp is None or iop is None:
        no_geometry.append(f)
        ipp = np.zeros(3) if ipp is None else ipp
        iop = np.array([1.0, 0, 0, 0, 1.0, 0]) if iop is None else iop
    ps = _floats(ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing"), 2)
    if ps is None or np.any(ps <= 0):
        ps = np.array([1.0, 1.0])
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    inst = ds.get("InstanceNumber")
    try:
        inst_n = int(inst) if inst is not None else 0
    except (TypeError, ValueError):
        inst_n = 0
    return _Slice(f, ds, ipp, iop, (float(ps[0]), float(ps[1])), (rows, cols), inst_n)


def _normal(iop: np.ndarray) -> np.ndarray:
    n = np.cross(iop[:3], iop[3:])
    norm = np.linalg.norm(n)
    if norm < 1e-6:
        raise DicomError(
            f"ImageOrientationPatient {list(iop)} is degenerate (rows parallel to columns)"
        )
    return n / norm


def _majority(
    slices: list[_Slice],
    key: Any,
    what: str,
    warnings: list[str],
    describe: Any,
    where: str,
    prefer: Path | None,
) -> list[_Slice]:
    """Keep the slices whose ``key`` is the most common (or that of the file ``prefer``); warn
    about the rest; error when there is no majority and no preferred file."""
    groups: dict[Any, list[_Slice]] = {}
    for s in slices:
        groups.setdefault(key(s), []).append(s)
    if len(groups) == 1:
        return slices
    ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    counts = ", ".join(f"{len(v)} x {describe(k)}" for k, v in ranked[:3])
    if len(ranked) > 3:
        counts += ", ..."
    target = prefer.resolve() if prefer is not None else None
    chosen = next((v for _, v in ranked if any(s.path.resolve() == target for s in v)), None)
    if chosen is None:
        if len(ranked[0][1]) == len(ranked[1][1]):
            raise DicomError(
                f"{where} mixes {len(groups)} {what}s with no majority ({counts}); it cannot be "
                "stacked into one volume (a localizer or radial series?); choose another series "
                "with --series, or point to one file to read its slices only"
            )
        chosen = ranked[0][1]
        why = f"the most common {what}"
    else:
        why = f"the {what} of {prefer.name if prefer else ''}"
    dropped = [s.path.name for s in slices if all(s is not c for c in chosen)]
    warnings.append(
        f"mixed {what}s in the series ({counts}); used the {len(chosen)} slice(s) with {why} "
        f"and skipped {len(dropped)}: {', '.join(dropped[:5])}"
        + (" ..." if len(dropped) > 5 else "")
    )
    return chosen


def _select_slices(
    slices: list[_Slice], warnings: list[str], where: str, prefer: Path | None
) -> list[_Slice]:
    slices = _majority(
        slices,
        lambda s: s.size,
        "slice size",
        warnings,
        lambda k: f"{k[0]}x{k[1]}",
        where,
        prefer,
    )
    slices = _majority(
        slices,
        lambda s: tuple(np.round(s.orientation / _ORIENT_TOL).astype(int)),
        "orientation",
        warnings,
        lambda k: "(" + ", ".join(f"{v * _ORIENT_TOL:.3f}" for v in k) + ")",
        where,
        prefer,
    )
    spacings = Counter(s.spacing for s in slices)
    if len(spacings) > 1:
        warnings.append(
            f"pixel spacing differs between slices ({dict(spacings)}); used the first slice's"
        )
    return slices


def _stack(
    slices: list[_Slice], warnings: list[str]
) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray, np.ndarray]:
    iop = slices[0].orientation
    row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    n = _normal(iop)
    for s in slices:
        s.dist = float(np.dot(n, s.position))
    slices.sort(key=lambda s: (s.dist, s.instance, s.path.name))

    # duplicate positions: keep the first (lowest InstanceNumber) of each position
    unique: list[_Slice] = [slices[0]]
    dups: list[_Slice] = []
    for s in slices[1:]:
        if abs(s.dist - unique[-1].dist) < 1e-3:
            dups.append(s)
        else:
            unique.append(s)
    if dups:
        per_pos = Counter(round(s.dist, 3) for s in slices)
        if len(set(per_pos.values())) == 1:
            note = (
                f"every position holds {next(iter(per_pos.values()))} images "
                "(multi-echo or dynamic series?)"
            )
        else:
            note = f"e.g. at {dups[0].dist:.2f} mm: {dups[0].path.name}"
        warnings.append(
            f"{len(dups)} slice(s) duplicate another slice's position ({note}); kept the one "
            "with the lowest InstanceNumber at each position"
        )
    slices = unique

    sy, sx = slices[0].spacing
    if len(slices) > 1:
        steps = np.diff([s.dist for s in slices])
        sz = float(np.median(steps))
        _check_steps(slices, steps, sz, warnings)
        _check_tilt(slices, n, warnings)
    else:
        thick = _floats(
            [slices[0].ds.get("SpacingBetweenSlices") or slices[0].ds.get("SliceThickness") or 1.0],
            1,
        )
        sz = float(thick[0]) if thick is not None and thick[0] > 0 else 1.0
        warnings.append(f"single slice: z spacing {sz:g} mm taken from the slice thickness")

    planes = [_pixels(s) for s in slices]
    array = _rescale_stack(slices, planes)
    if str(slices[0].ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        warnings.append(
            "MONOCHROME1 images: low values display bright; values kept as stored (not inverted)"
        )
    direction = np.column_stack([row, col, n])
    origin = slices[0].position.copy()
    return array, (sz, sy, sx), origin, direction


def _check_steps(slices: list[_Slice], steps: np.ndarray, sz: float, warnings: list[str]) -> None:
    tol = _STEP_RTOL * sz + 0.01
    bad = np.nonzero(np.abs(steps - sz) > tol)[0]
    gaps = [i for i in bad if steps[i] > sz]
    for i in gaps[:3]:
        a, b = slices[i], slices[i + 1]
        missing = round(steps[i] / sz) - 1
        warnings.append(
            f"gap in the series between slice positions {a.dist:.2f} mm ({a.path.name}) and "
            f"{b.dist:.2f} mm ({b.path.name}) along the slice normal: {steps[i]:.2f} mm vs "
            f"{sz:.2f} mm expected (about {missing} missing slice(s)); the volume is stacked "
            f"with {sz:.2f} mm spacing, so distances across the gap are wrong"
        )
    if len(gaps) > 3:
        warnings.append(f"... and {len(gaps) - 3} more gap(s)")
    uneven = [i for i in bad if steps[i] <= sz]
    if uneven:
        warnings.append(
            f"uneven slice spacing: steps range {steps.min():.3f}..{steps.max():.3f} mm "
            f"(median {sz:.3f} mm used)"
        )


def _check_tilt(slices: list[_Slice], n: np.ndarray, warnings: list[str]) -> None:
    span = slices[-1].position - slices[0].position
    length = float(np.linalg.norm(span))
    if length < 1e-6:
        return
    cosang = min(1.0, abs(float(np.dot(span, n))) / length)
    angle = float(np.degrees(np.arccos(cosang)))
    if angle > _TILT_TOL_DEG:
        shift = length * np.sin(np.radians(angle)) / max(len(slices) - 1, 1)
        warnings.append(
            f"gantry tilt / sheared stack: slice positions advance at {angle:.2f} degrees to the "
            f"slice normal ({shift:.3f} mm in-plane shift per slice); the volume uses the normal "
            "as z, so anatomy is sheared — resample (e.g. dcm2niix tilt correction) for accurate "
            "3D geometry"
        )


def _pixels(s: _Slice) -> np.ndarray:
    with _file_errors(s.path):
        return _pixels_of(s)


def _pixels_of(s: _Slice) -> np.ndarray:
    ds = s.ds
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise DicomError(
            f"{s.path}: colour DICOM ({ds.get('PhotometricInterpretation')}) is not supported; "
            "a greyscale series is needed"
        )
    _check_length(s)
    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except Exception as exc:
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise DicomError(
            f"{s.path}: cannot decode pixel data (transfer syntax {ts}): {_one_line(exc)}; "
            "the file may be truncated, or a decoder (pylibjpeg / gdcm) is missing"
        ) from None
    return np.asarray(arr)


def _check_length(s: _Slice) -> None:
    """Raise when native (uncompressed) pixel data is shorter than Rows x Columns x bits."""
    from medseg.io.itk import max_image_bytes

    ds = s.ds
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    need = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * max(frames, 1)
    need = (need * max(bits, 1) * int(ds.get("SamplesPerPixel", 1) or 1) + 7) // 8
    if need > max_image_bytes() or frames < 0 or bits < 0:
        raise DicomError(
            f"{s.path}: the header claims {need} bytes of pixels (Rows x Columns x frames); "
            "the file is corrupt or needs a bigger machine"
        )
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if ts is not None and getattr(ts, "is_compressed", False):
        return
    if "PixelData" not in ds:
        return
    have = len(ds.PixelData)
    if have < need:
        raise DicomError(
            f"{s.path}: pixel data is truncated ({have} of {need} bytes); the file is damaged — "
            "remove it or re-export the series"
        )


def _rescale(ds: Any) -> tuple[float, float]:
    slope = _floats([ds.get("RescaleSlope", 1.0) or 1.0], 1)
    inter = _floats([ds.get("RescaleIntercept", 0.0) or 0.0], 1)
    return (
        float(slope[0]) if slope is not None else 1.0,
        float(inter[0]) if inter is not None else 0.0,
    )


def _rescale_stack(slices: list[_Slice], planes: list[np.ndarray]) -> np.ndarray:
    """Apply each slice's slope/intercept into a ``(z, y, x)`` array: ``int16`` when all results
    are whole numbers that fit (``int32``/``int64`` when wider), else ``float32``."""
    params = [_rescale(s.ds) for s in slices]
    shape = (len(planes), *planes[0].shape)
    whole = all(float(a).is_integer() and float(b).is_integer() for a, b in params)
    if whole and all(p.dtype.kind in "iu" for p in planes):
        # output range from each plane's raw range (a linear map), without a wide temporary
        lo = hi = 0
        for k, (p, (a, b)) in enumerate(zip(planes, params, strict=True)):
            ends = (int(p.min()) * int(a) + int(b), int(p.max()) * int(a) + int(b))
            lo, hi = (min(ends), max(ends)) if k == 0 else (min(lo, *ends), max(hi, *ends))
        dt: type = np.int64
        for cand in (np.int16, np.int32):
            if np.iinfo(cand).min <= lo and hi <= np.iinfo(cand).max:
                dt = cand
                break
        out = np.empty(shape, dtype=dt)
        for k, (p, (a, b)) in enumerate(zip(planes, params, strict=True)):
            if (a, b) == (1.0, 0.0):
                out[k] = p
            else:
                out[k] = p.astype(np.int64) * int(a) + int(b)
        return out
    out_f = np.empty(shape, dtype=np.float32)
    for k, (p, (a, b)) in enumerate(zip(planes, params, strict=True)):
        np.multiply(p, np.float32(a), out=out_f[k], casting="unsafe")
        out_f[k] += np.float32(b)
    return out_f


def _read_multiframe(
    s: _Slice, warnings: list[str]
) -> tuple[np.ndarray, tuple[float, float, float], np.ndarray, np.ndarray]:
    """Enhanced (multi-frame) single-file volume with per-frame plane positions."""
    ds = s.ds
    per = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    if not per:
        raise DicomError(
            f"{s.path}: multi-frame DICOM without per-frame positions is not supported; "
            "convert it to single-frame slices (e.g. dcm2niix) first"
        )

    def group(i: int, name: str) -> Any:
        for src in (per[i], shared[0] if shared else None):
            if src is not None and name in src and len(src[name].value):
                return src[name].value[0]
        return None

    frames = len(per)
    pos, iop, ps, resc = [], None, None, []
    for i in range(frames):
        pp = group(i, "PlanePositionSequence")
        po = group(i, "PlaneOrientationSequence")
        pm = group(i, "PixelMeasuresSequence")
        pv = group(i, "PixelValueTransformationSequence")
        p = _floats(pp.get("ImagePositionPatient") if pp else None, 3)
        if p is None:
            raise DicomError(f"{s.path}: frame {i + 1} has no ImagePositionPatient")
        pos.append(p)
        o = _floats(po.get("ImageOrientationPatient") if po else None, 6)
        if o is None:
            raise DicomError(f"{s.path}: frame {i + 1} has no ImageOrientationPatient")
        if iop is None:
            iop = o
        elif np.max(np.abs(o - iop)) > _ORIENT_TOL:
            raise DicomError(f"{s.path}: frames have different orientations; cannot stack")
        if ps is None and pm is not None:
            ps = _floats(pm.get("PixelSpacing"), 2)
        resc.append(_rescale(pv) if pv is not None else _rescale(ds))
    assert iop is not None
    ps = ps if ps is not None else np.array([1.0, 1.0])
    fake = [
        _Slice(s.path, _RescaleOnly(a, b), p, iop, (float(ps[0]), float(ps[1])), s.size, i)
        for i, (p, (a, b)) in enumerate(zip(pos, resc, strict=True))
    ]
    _check_length(s)
    try:
        pix = np.asarray(ds.pixel_array)
    except Exception as exc:
        raise DicomError(f"{s.path}: cannot decode pixel data: {_one_line(exc)}") from None
    if pix.ndim == 2:
        pix = pix[None]
    n = _normal(iop)
    order = sorted(range(frames), key=lambda i: float(np.dot(n, pos[i])))
    fake = [fake[i] for i in order]
    planes = [pix[i] for i in order]
    for f in fake:
        f.dist = float(np.dot(n, f.position))
    if frames > 1:
        steps = np.diff([f.dist for f in fake])
        if np.any(steps < 1e-3):
            raise DicomError(f"{s.path}: frames share positions (a 4D multi-frame?); not supported")
        sz = float(np.median(steps))
        _check_steps(fake, steps, sz, warnings)
        _check_tilt(fake, n, warnings)
    else:
        sz = 1.0
    array = _rescale_stack(fake, planes)
    row, col = iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:])
    return (
        array,
        (sz, float(ps[0]), float(ps[1])),
        fake[0].position.copy(),
        np.column_stack([row, col, n]),
    )


class _RescaleOnly(dict):
    """A stand-in header carrying only a frame's slope/intercept (for :func:`_rescale_stack`)."""

    def __init__(self, slope: float, intercept: float) -> None:
        super().__init__(RescaleSlope=slope, RescaleIntercept=intercept)
