"""``medseg convert IN OUT``: DICOM folder / NIfTI / NRRD / MHA to NIfTI / NRRD / MHA, on the
exact grid (LPS kept; NIfTI written in RAS by the writer). The output is written atomically, never
replaces an input, and an existing output is kept unless ``--overwrite``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from medseg.progress import ProgressCallback
    from medseg.volume import Volume


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a DICOM series or image file to NIfTI / NRRD / MHA",
        description=__doc__,
    )
    p.add_argument("input", help="DICOM folder, DICOM file, or image file (NIfTI/NRRD/MHA)")
    p.add_argument("output", help="output file (.nii.gz, .nii, .nrrd, .mha, ...)")
    p.add_argument("--series", help="SeriesInstanceUID when the DICOM folder holds several")
    p.add_argument(
        "--labels",
        action="store_true",
        help="the input is a label map: check whole-number labels, keep the label table",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medseg.errors import InputError, OutputError
    from medseg.io import check_output_path, image_suffix, write_labels, write_volume
    from medseg.progress import tqdm_progress

    src = Path(args.input)
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    if image_suffix(args.output) is None:
        raise OutputError(
            f"{args.output}: unknown output type; use .nii.gz, .nii, .nrrd, .nhdr, .mha or .mhd"
        )
    inputs = [src] if src.is_dir() or image_suffix(src) else [src, src.parent]
    # fail before the (possibly long) read when the output is unusable
    check_output_path(args.output, inputs, overwrite=args.overwrite)

    if args.labels:
        from medseg.io import read_labels

        if src.is_dir():
            raise InputError(f"{src}: --labels needs a label-map file, not a DICOM folder")
        vol = read_labels(src)
        out = write_labels(vol, args.output, inputs=inputs, overwrite=args.overwrite)
    else:
        with tqdm_progress("reading", enabled=not args.quiet) as cb:
            vol = _read(src, args.series, cb)
        out = write_volume(vol, args.output, inputs=inputs, overwrite=args.overwrite)
    for w in vol.meta.get("warnings", []):
        print(f"medseg convert: warning: {w}", file=sys.stderr)
    if not args.quiet:
        shape = " x ".join(str(s) for s in vol.shape)
        spacing = ", ".join(f"{s:.4g}" for s in vol.spacing)
        print(f"wrote {out} ({shape} voxels (z, y, x), spacing {spacing} mm, {vol.array.dtype})")
    return 0


def _read(src: Path, series: str | None, progress: ProgressCallback) -> Volume:
    if src.is_dir():
        from medseg.io.dicom import read_dicom_series

        return read_dicom_series(src, series=series, progress=progress)
    from medseg.io import read_volume

    return read_volume(src, series=series)
