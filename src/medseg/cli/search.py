"""``medseg search URL``: find studies and series on a DICOMweb server (QIDO-RS).

URL is the DICOMweb root (``http(s)://HOST/.../dicom-web``) or a study URL. Prints one line per
series (study date, patient, modality, instance count, description, series URL) or ``--json``."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "search", help="search a DICOMweb server for studies and series", description=__doc__
    )
    p.add_argument("url", help="DICOMweb root URL (or a study URL), or dimse://AET@HOST:PORT")
    p.add_argument("--patient", help="PatientID (wildcards * and ? where the server allows)")
    p.add_argument("--modality", help="series modality, e.g. CT, MR, SEG")
    p.add_argument("--study-date", help="YYYYMMDD or a range YYYYMMDD-YYYYMMDD")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``medseg search``. Returns the exit status (0)."""
    from medseg.io.remote import search

    rows = search(
        args.url, patient=args.patient, modality=args.modality, study_date=args.study_date
    )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        print(
            f"{r['study_date'] or '-'}  {r['patient_id'] or '-'}  {r['modality'] or '-':4s} "
            f"{r['instances'] if r['instances'] is not None else '?':>4} inst  "
            f"{r['series_description'] or '-'}  {r['url']}"
        )
    print(f"{len(rows)} series")
    return 0
