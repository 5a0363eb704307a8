"""``medseg pull URL OUTDIR``: download a DICOMweb series (WADO-RS) into a folder, nothing else.

The URL is ``http(s)://HOST/.../studies/<StudyUID>/series/<SeriesUID>`` (``medseg search``
prints them). Credentials come from MEDSEG_DICOMWEB_USER/PASSWORD, MEDSEG_DICOMWEB_TOKEN or a
netrc file, never from the URL. A DIMSE archive is addressed as
``dimse://AET@HOST:PORT/studies/<StudyUID>/series/<SeriesUID>`` (C-FIND + C-GET). The folder
appears whole or not at all."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pull", help="download a DICOMweb series into a folder", description=__doc__)
    p.add_argument(
        "url",
        help="DICOMweb series URL .../studies/<StudyUID>/series/<SeriesUID> (or "
        "dimse://AET@HOST:PORT/studies/<StudyUID>/series/<SeriesUID>)",
    )
    p.add_argument("outdir", help="folder to create with one .dcm per instance")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTDIR")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``medseg pull``. Returns the exit status (0)."""
    from medseg.io.remote import parse_remote_series, pull_series
    from medseg.progress import tqdm_progress

    parse_remote_series(args.url)  # a malformed URL fails before anything is created
    with tqdm_progress("pull", enabled=not args.quiet) as cb:
        files = pull_series(args.url, args.outdir, overwrite=args.overwrite, progress=cb)
    print(f"pulled {len(files)} instances into {args.outdir}")
    return 0
