"""``medseg info PATH``: what an image file or DICOM folder holds (geometry, intensities, series,
warnings), as text or ``--json``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medseg.volume import Volume


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="show shape, spacing, origin, direction, intensities and DICOM series of an image",
        description=__doc__,
    )
    p.add_argument("path", help="image file (NIfTI/NRRD/MHA), DICOM file or DICOM folder")
    p.add_argument("--series", help="SeriesInstanceUID when the DICOM folder holds several")
    p.add_argument("--json", action="store_true", help="print JSON to stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def describe(path: str | Path, series: str | None = None, progress: Any = None) -> dict[str, Any]:
    """Read ``path`` and return the report :func:`run` prints (JSON-friendly).

    Keys: ``source``, ``format``, ``modality``, ``shape`` (z, y, x), ``spacing`` (z, y, x) mm,
    ``origin`` LPS (x, y, z) mm, ``direction`` (3x3 ITK, rows), ``dtype``, ``intensity_range``
    ``[min, max]``, ``series_chosen``, ``series`` (all series of a DICOM folder), ``warnings``,
    ``skipped_files``, ``labels`` (label table when the file carries one).

    Raises:
        MedsegError: unreadable input (the message says why).
    """
    from medseg.errors import InputError
    from medseg.io.remote import is_remote_url

    if is_remote_url(str(path)):  # a DICOMweb / DIMSE series: fetched into the cache, then read
        from medseg.io import read_volume

        return {**_report(read_volume(str(path), series=series), []), "provenance": None}
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    series_list: list[dict[str, Any]] = []
    provenance, kind = _provenance(p)
    if kind == "RTSTRUCT":  # contours: no grid of their own until put on their series
        return {"source": str(p), "format": "DICOM RTSTRUCT", "provenance": provenance}
    if kind == "SEG":
        from medseg.io.dicom_seg import read_dicom_seg

        rep = _report(read_dicom_seg(p), series_list)
        rep["format"] = "DICOM-SEG"
        return {**rep, "provenance": provenance}
    if p.is_dir():
        from medseg.io.dicom import read_dicom_series, scan_dicom_folder

        scan = scan_dicom_folder(p, progress=progress)
        series_list = [s.as_dict() for s in scan.series.values()]
        vol = read_dicom_series(p, series=series, scan=scan)
    else:
        from medseg.io import read_volume

        vol = read_volume(p, series=series)
    return {**_report(vol, series_list), "provenance": provenance}


def _provenance(p: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(report, kind)``: the medseg report inside a DICOM-SEG / RTSTRUCT, or beside a label map
    (``pred.nii.gz`` → ``pred.json``); ``kind`` is ``"SEG"``, ``"RTSTRUCT"`` or ``None``."""
    import json

    from medseg.io.dicom import is_dicom_file
    from medseg.io.files import image_suffix
    from medseg.report import report_path_for

    if p.is_file() and is_dicom_file(p):
        from medseg.io.dicom_seg import read_dicom_file, read_provenance

        modality = str(read_dicom_file(p, stop_before_pixels=True).get("Modality", ""))
        if modality in ("SEG", "RTSTRUCT"):
            return read_provenance(p), modality
        return None, None
    if p.is_file() and image_suffix(p) is not None:
        side = report_path_for(p)
        if side.is_file():
            try:
                return json.loads(side.read_text()), None
            except (OSError, ValueError):
                return None, None
    return None, None


def _report(vol: Volume, series_list: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    arr = vol.array
    lo, hi = (arr.min().item(), arr.max().item()) if arr.size else (None, None)
    meta = vol.meta
    return {
        "source": str(meta.get("source", "")),
        "format": meta.get("format", ""),
        "modality": meta.get("modality", ""),
        "shape": list(vol.shape),
        "spacing": [float(v) for v in vol.spacing],
        "origin": [float(v) for v in vol.origin],
        "direction": np.asarray(vol.direction, dtype=float).tolist(),
        "dtype": str(arr.dtype),
        "intensity_range": [lo, hi],
        "series_chosen": meta.get("series_chosen"),
        "series_description": meta.get("series_description"),
        "series": series_list,
        "warnings": list(meta.get("warnings", [])),
        "skipped_files": list(meta.get("skipped_files", [])),
        "labels": {str(k): v for k, v in dict(meta.get("labels", {})).items()},
    }


def _provenance_lines(prov: dict[str, Any] | None) -> list[str]:
    if not prov:
        return []
    model = prov.get("model") or {}
    p = prov.get("provenance") or {}
    sha = model.get("weights_sha256")
    lines = [
        f"made by:         medseg {p.get('medseg_version', '?')} on {p.get('host', '?')} "
        f"at {p.get('created', '?')}",
        f"model:           {model.get('name', '?')} ({prov.get('engine', '?')})"
        + (f", weights sha256 {sha[:12]}" if sha else ""),
    ]
    if p.get("prompts"):
        lines.append(f"prompts:         {len(p['prompts'])}")
    return lines


def _text(rep: dict[str, Any]) -> str:
    def nums(v: list[float]) -> str:
        return ", ".join(f"{x:.6g}" for x in v)

    if "shape" not in rep:  # an RTSTRUCT: provenance only
        return "\n".join(
            [f"source:          {rep['source']}", f"format:          {rep['format']}"]
            + (_provenance_lines(rep.get("provenance")) or ["provenance:      none"])
        )
    lines = [
        f"source:          {rep['source']}",
        f"format:          {rep['format']}"
        + (f"  modality: {rep['modality']}" if rep["modality"] else ""),
        f"shape (z,y,x):   {' x '.join(str(s) for s in rep['shape'])}",
        f"spacing (z,y,x): {nums(rep['spacing'])} mm",
        f"origin LPS:      {nums(rep['origin'])} mm",
        "direction:       " + " | ".join(nums(r) for r in rep["direction"]),
        f"dtype:           {rep['dtype']}",
        f"intensities:     {rep['intensity_range'][0]} .. {rep['intensity_range'][1]}",
    ]
    if rep["series_chosen"]:
        desc = f" '{rep['series_description']}'" if rep.get("series_description") else ""
        lines.append(f"series chosen:   {rep['series_chosen']}{desc}")
    if len(rep["series"]) > 1:
        lines.append(f"series in folder ({len(rep['series'])}):")
        for s in rep["series"]:
            size = "x".join(str(v) for v in s["size"]) if s["size"] else "no image size"
            lines.append(
                f"  {s['uid']}  {s['modality']}  {s['n_files']} files  {size}  {s['description']}"
            )
    if rep["labels"]:
        lines.append("labels:          " + ", ".join(f"{k}={v}" for k, v in rep["labels"].items()))
    if rep["skipped_files"]:
        lines.append(f"skipped files:   {len(rep['skipped_files'])}")
        lines.extend(f"  {f}" for f in rep["skipped_files"][:20])
    lines += _provenance_lines(rep.get("provenance"))
    for w in rep["warnings"]:
        lines.append(f"warning: {w}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from medseg.progress import tqdm_progress

    with tqdm_progress("reading", enabled=not (args.quiet or args.json)) as cb:
        rep = describe(args.path, series=args.series, progress=cb)
    if args.json:
        sys.stdout.write(json.dumps(rep, indent=2) + "\n")
    else:
        print(_text(rep))
    return 0
