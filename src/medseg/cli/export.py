"""``medseg export LABELS --reference DICOM_DIR --format dicom-seg|rtstruct --out FILE``.

Writes a label map that lies on a DICOM series' grid as a DICOM-SEG (one segment per label, names,
colours and SNOMED CT codes from the label table, frames placed at the source slices' positions)
or an RT Structure Set (contours in patient LPS mm), referencing that series. The label map's
report (``LABELS``'s sidecar ``.json``, or ``--report``) travels inside the file as provenance;
``medseg info FILE`` shows it. A label map on another grid than the series is refused.

``--reference`` may be a DICOMweb (or ``dimse://``) series URL. ``--push`` stores the written
file as a new series of the reference's study on the server it came from (``--to URL`` for a
local reference, or another server), by STOW-RS or C-STORE.
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
    p.add_argument(
        "--reference", required=True, help="the DICOM series folder (or series URL) it was made on"
    )
    p.add_argument("--series", help="SeriesInstanceUID when the folder holds several")
    p.add_argument("--format", choices=["dicom-seg", "rtstruct"], default="dicom-seg")
    p.add_argument("--out", required=True, help="the DICOM file to write")
    p.add_argument("--report", help="the run's report JSON (default: the label map's sidecar)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument(
        "--push",
        action="store_true",
        help="store the file on the server the reference came from (or --to)",
    )
    p.add_argument("--to", metavar="URL", help="the server to push to (DICOMweb root or dimse://)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import medseg
    from medseg.errors import InputError
    from medseg.io.remote import push_result, push_target
    from medseg.report import report_path_for

    if args.to and not args.push:
        raise InputError("--to names the server to push to; add --push")
    if args.push:
        push_target(args.reference, args.to)  # a local reference needs --to: fail before work
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
    if args.push:
        rec = push_result(out, source=args.reference, to=args.to)
        print(f"pushed {out} to {rec.to} (study {rec.study}, series {rec.series})")
    return 0
