"""``medseg push FILE... --to URL``: store DICOM files (a DICOM-SEG, an RTSTRUCT, a series) on a
DICOMweb server (STOW-RS)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("push", help="store DICOM files on a DICOMweb server", description=__doc__)
    p.add_argument("files", nargs="+", help="DICOM files or folders of DICOM files")
    p.add_argument(
        "--to",
        required=True,
        help="DICOMweb root URL (or a study/series URL), or dimse://AET@HOST:PORT",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``medseg push``. Returns the exit status (0)."""
    from medseg.errors import InputError
    from medseg.io.remote import is_dicomweb_url, push_files, server_root

    if is_dicomweb_url(args.to):
        server_root(args.to)
    else:
        from medseg.io.remote_dimse import parse_dimse_url

        parse_dimse_url(args.to)
    files: list[Path] = []
    for f in map(Path, args.files):
        if f.is_dir():
            files += sorted(p for p in f.rglob("*") if p.is_file())
        elif f.is_file():
            files.append(f)
        else:
            raise InputError(f"{f}: no such file or folder")
    stored = push_files(files, args.to)
    where = server_root(args.to) if is_dicomweb_url(args.to) else args.to
    print(f"stored {len(stored)} instances on {where}")
    return 0
