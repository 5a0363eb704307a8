"""``medseg export LABELS --reference DICOM_DIR --format dicom-seg|rtstruct --out FILE``.

Writes a label map that lies on a DICOM series' grid as a DICOM-SEG (one segment per label, names,
colours and SNOMED CT codes from the label table, frames placed at the source slices' positions)
or an RT Structure Set (contours in patient LPS mm), referencing that series. The label map's
report (``LABELS``'s sidecar ``.json``, or ``--report``) travels inside the file as provenance;
``medseg info FILE`` shows it. A label map on another grid than the series is refused.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write a label map as DICOM-SEG or RTSTRUCT referencing its DICOM series",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("labels", help="label map (NIfTI/NRRD/MHA) on the reference series' grid")
    p.add_argument("--reference", required=True, help="the DICOM series folder it was made on")
    p.add_argument("--series", help="SeriesInstanceUID when the folder holds several")
    p.add_argument("--format", choices=["dicom-seg", "rtstruct"], default="dicom-seg")
    p.add_argument("--out", required=True, help="the DICOM file to write")
    p.add_argument("--report", help="the run's report JSON (default: the label map's sidecar)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import medseg
    from medseg.errors import InputError
    from medseg.report import report_path_for

    report_path = Path(args.report) if args.report else report_path_for(args.labels)
    report = None
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"{report_path}: not a readable JSON report ({exc})") from None
    elif args.report:
        raise InputError(f"{report_path}: no such report file")
    out = medseg.export(
        args.labels,
        args.reference,
        args.format,
        args.out,
        report=report,
        overwrite=args.overwrite,
        series=args.series,
    )
    print(f"wrote {out} ({args.format}{', with provenance' if report else ''})")
    return 0
