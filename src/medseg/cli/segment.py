"""``medseg segment``: one command for every engine; parses, calls :func:`medseg.segment`, prints.

* SAM-Med models (``litemedsam`` default, ``sam_vit_b``, ``medsam_vit_b``): prompts on one or more
  key slices, then 3D propagation. Prompt coordinates are voxel indices of the image array
  ``(z, y, x)`` (a flipped direction matrix, as in brain1, does not change them):

  * ``--box I,R0,C0,R1,C1``: a box on slice ``I`` along ``--axis``; axial: ``Z,Y0,X0,Y1,X1``
    (inclusive). Repeat it for several key slices.
  * ``--point Z,Y,X[,L]``: a volume point; ``L`` = 1 foreground (default) or 0 background.
  * ``--prompts FILE.json``: ``{"axis": "z", "boxes": [{"slice": I, "box": [R0, C0, R1, C1]}],
    "points": [{"zyx": [Z, Y, X], "label": 1}], "masks": [{"slice": I, "file": "m.npy"}]}``.
  * ``--box-from-gt GT``: the interactive protocol: one box (``--box-margin`` pixels, default 3)
    around the ground truth on its slice of largest area (``--label`` selects a value); the
    per-slice oracle is reported too.

* U-Net (``unet-demo`` or a checkpoint path): whole-volume automatic segmentation, optional
  refinement of the tumour label with a SAM-Med model (``--refine-with``), lesion instances
  (``--instances OUT``: label map + ``.csv``) and probabilities (``--probabilities OUT``).

``--out LABELS`` writes the label map and its report beside it (``pred.nii.gz`` → ``pred.json``,
or ``--json PATH``). Every output is checked before any work and written atomically. Bad input:
one line, exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError, PromptError
from medseg.prompts import DEFAULT_BOX_MARGIN

BOX_USAGE = "I,R0,C0,R1,C1 (axial: Z,Y0,X0,Y1,X1) in voxels"
POINT_USAGE = "Z,Y,X or Z,Y,X,L with L = 1 (foreground) or 0 (background)"


def register(sub: argparse._SubParsersAction) -> None:
    from medseg.models.registry import known_models

    p = sub.add_parser(
        "segment",
        help="segment an image (SAM-Med prompts + 3D propagation, or automatic U-Net)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "image", help="image file (NIfTI/NRRD/MHA), DICOM folder, DICOMweb or dimse:// series URL"
    )
    p.add_argument("--series", help="SeriesInstanceUID when the DICOM folder holds several")
    p.add_argument(
        "--model", default="litemedsam", help=f"{' | '.join(known_models())} | CHECKPOINT.pt"
    )
    p.add_argument("--weights", help="checkpoint file for a SAM-Med model (overrides the cache)")
    p.add_argument(
        "--decoder",
        metavar="DECODER.pt",
        help="fine-tuned SAM-Med mask decoder from medseg finetune (same base model)",
    )
    p.add_argument("--window", help="CT window preset (abdomen, liver, lung, brain, bone) or LO,HI")
    g = p.add_argument_group("prompts (SAM-Med models)")
    g.add_argument(
        "--box",
        action="append",
        default=[],
        metavar="Z,Y0,X0,Y1,X1",
        help="box on slice Z in voxel coordinates (repeatable: several key slices)",
    )
    g.add_argument(
        "--point",
        action="append",
        default=[],
        metavar="Z,Y,X[,0|1]",
        help="point prompt in voxels; last value 1 = positive (default), 0 = negative",
    )
    g.add_argument("--prompts", metavar="FILE.json", help="prompts from a JSON file")
    g.add_argument(
        "--box-from-gt",
        metavar="GT",
        help="simulate the interactive protocol: one box from GT on its largest slice",
    )
    g.add_argument(
        "--label",
        type=int,
        help="label value in GT used by --box-from-gt and scored (default: 1 / all)",
    )
    g.add_argument(
        "--box-margin",
        type=float,
        default=DEFAULT_BOX_MARGIN,
        metavar="PX",
        help=f"box margin (pixels) for --box-from-gt and oracle (default {DEFAULT_BOX_MARGIN:g})",
    )
    g.add_argument(
        "--axis", choices=["z", "y", "x"], default="z", help="propagation axis (default z: axial)"
    )
    g.add_argument("--no-propagate", action="store_true", help="segment the key slice(s) only")
    g.add_argument(
        "--oracle",
        action="store_true",
        help="with --gt: also report per-slice oracle-box Dice (default with --box-from-gt)",
    )
    u = p.add_argument_group("U-Net")
    u.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (0-0.9)")
    u.add_argument("--blend", choices=["gaussian", "constant"], default="gaussian")
    u.add_argument("--probabilities", metavar="OUT.nii.gz", help="also save softmax probabilities")
    u.add_argument("--refine-with", metavar="MODEL", help="refine a label with a SAM-Med model")
    u.add_argument("--refine-label", type=int, help="label value to refine (default: tumour)")
    u.add_argument("--instances", metavar="OUT", help="write lesion instances (label map + .csv)")
    o = p.add_argument_group("output")
    o.add_argument("--gt", help="ground-truth label map: add metrics to the report")
    o.add_argument(
        "--out", help="label map (.nii.gz, .nrrd, ... or .dcm: a DICOM-SEG); its report beside it"
    )
    o.add_argument(
        "--push",
        action="store_true",
        help="store the DICOM-SEG (--out x.dcm) on the server the image URL names (or --to), "
        "as a new series of the same study",
    )
    o.add_argument(
        "--to",
        metavar="URL",
        help="with --push: the server to store on (a DICOMweb root or dimse://AET@HOST:PORT); "
        "needed when the image is local",
    )
    o.add_argument(
        "--json",
        dest="json_out",
        metavar="REPORT.json",
        help="the report's path (default: beside --out)",
    )
    o.add_argument("--overwrite", action="store_true", help="replace existing output files")
    o.add_argument("--device", default="auto", help="auto | cpu | cuda")
    o.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 where the CPU has native bf16, else fp32",
    )
    o.add_argument(
        "--runtime",
        choices=["auto", "torch", "openvino"],
        default="auto",
        help="SAM image encoder runtime: torch, or openvino (CPU; pip install openvino; the "
        "converted model is cached in $MEDSEG_HOME/openvino); auto: torch",
    )
    o.add_argument("--cache-dir", help="embedding disk cache folder (default: $MEDSEG_HOME/cache)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- parsing
def _numbers(text: str, option: str, usage: str) -> list[float]:
    try:
        vals = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise PromptError(f"malformed {option} {text!r}; expected {usage}") from None
    if not all(np.isfinite(vals)):
        raise PromptError(f"malformed {option} {text!r}; expected {usage}")
    return vals


def parse_box(text: str, axis: str = "z") -> Any:
    """``"I,R0,C0,R1,C1"`` → :class:`medseg.Box` on slice ``I`` along ``axis``.

    Raises:
        PromptError: not five numbers, a fractional slice, reversed or zero-size corners.
    """
    from medseg.prompts import Box

    vals = _numbers(text, "--box", BOX_USAGE)
    if len(vals) != 5 or vals[0] != round(vals[0]):
        raise PromptError(f"malformed --box {text!r}; expected {BOX_USAGE}")
    try:
        return Box(int(vals[0]), *vals[1:], axis=axis)
    except PromptError as exc:
        raise PromptError(f"--box {text!r}: {exc}") from None


def parse_point(text: str) -> Any:
    """``"Z,Y,X[,L]"`` → :class:`medseg.Point` (``L`` 1 foreground, 0 background).

    Raises:
        PromptError: not 3 or 4 numbers, or a label other than 0/1.
    """
    from medseg.prompts import Point

    vals = _numbers(text, "--point", POINT_USAGE)
    if len(vals) not in (3, 4):
        raise PromptError(f"malformed --point {text!r}; expected {POINT_USAGE}")
    if len(vals) == 4 and vals[3] not in (0.0, 1.0):
        raise PromptError(f"--point {text!r}: the label must be 1 or 0")
    return Point(vals[0], vals[1], vals[2], positive=len(vals) == 3 or vals[3] == 1.0)


def _prompts(args: argparse.Namespace, image: Any) -> list[Any]:
    """Every prompt the options give, in order: boxes, points, the file, the GT box."""
    from medseg.prompts import box_from_gt, load_prompts

    prompts = [parse_box(b, args.axis) for b in args.box]
    prompts += [parse_point(q) for q in args.point]
    if args.prompts:
        prompts += load_prompts(args.prompts, axis=args.axis)
    if args.box_from_gt:
        from medseg.io.files import read_labels

        gt = read_labels(args.box_from_gt, reference=image)
        prompts.append(box_from_gt(gt, label=args.label, axis=args.axis, margin=args.box_margin))
    return prompts


# --------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    """Run ``medseg segment``. Returns the exit status (0)."""
    import medseg
    from medseg.io.files import check_output_path, image_suffix
    from medseg.models.registry import resolve_model
    from medseg.pipeline import instance_paths
    from medseg.progress import tqdm_progress
    from medseg.report import report_path_for

    engine = resolve_model(args.model).engine
    inputs = [
        p
        for p in (args.image, args.gt, args.box_from_gt, args.prompts, args.weights, args.decoder)
        if p
    ]
    if args.to and not args.push:
        raise InputError("--to names the server to push to; add --push")
    if args.push:
        if not str(args.out or "").lower().endswith(".dcm"):
            raise InputError(
                "--push stores the DICOM-SEG on the server the image came from (or --to URL): "
                "give --out NAME.dcm"
            )
        from medseg.io.remote import push_target

        push_target(args.image, args.to)  # a local image needs --to: fail before any work
    # outputs first: fail before any slow work
    outs: list[Path] = []
    if args.out:
        if image_suffix(args.out) is None and not str(args.out).lower().endswith(".dcm"):
            raise InputError(
                f"{args.out}: unknown label-map type; use .nii.gz, .nii, .nrrd, .mha, .mhd or "
                ".dcm (a DICOM-SEG of a DICOM series)"
            )
        outs += [Path(args.out), Path(args.json_out or report_path_for(args.out))]
    elif args.json_out:
        outs.append(Path(args.json_out))
    if args.probabilities:
        outs.append(Path(args.probabilities))
    if args.instances:
        outs += list(instance_paths(args.instances))
    if len({p.resolve() for p in outs}) != len(outs):
        raise InputError(
            "--out, --json and the other outputs name the same file; give each its own"
        )
    for o in outs:
        check_output_path(o, inputs, overwrite=args.overwrite)

    prompts: list[Any] = []
    image: Any = args.image
    if engine in ("sam", "sam2"):
        if args.oracle and not args.gt:
            raise InputError("--oracle needs --gt (the oracle boxes come from the ground truth)")
        if args.box_from_gt:  # the GT box needs the image's grid before the model loads
            from medseg.io.files import read_volume

            image = read_volume(args.image, series=args.series)
            image.meta.setdefault("source", str(args.image))
        prompts = _prompts(args, image)
    elif args.box or args.point or args.prompts or args.box_from_gt:
        raise InputError(f"{args.model} is an automatic U-Net: prompts are for SAM-Med models")
    elif args.window and not args.refine_with:
        print(
            "medseg segment: note: --window is ignored by the U-Net (its checkpoint fixes the "
            "intensity preprocessing); it only sets the window of --refine-with",
            file=sys.stderr,
        )
    oracle = engine == "sam" and bool(args.gt) and (args.oracle or bool(args.box_from_gt))
    with tqdm_progress("segment", enabled=not args.quiet) as cb:
        seg = medseg.segment(
            image,
            model=args.model,
            prompts=prompts or None,
            gt=args.gt,
            label=args.label,
            weights=args.weights,
            decoder=args.decoder,
            series=args.series,
            axis=args.axis,
            window=args.window,
            propagate=not args.no_propagate,
            oracle=oracle,
            box_margin=args.box_margin,
            refine_with=args.refine_with,
            refine_label=args.refine_label,
            overlap=args.overlap,
            blend=args.blend,
            probabilities=bool(args.probabilities),
            instances=bool(args.instances),
            precision=args.precision,
            device=args.device,
            runtime=args.runtime,
            cache_dir=args.cache_dir or True,
            provenance={"argv": sys.argv[1:]},
            progress=cb,
        )
    written: dict[str, Path] = {}
    if args.out:
        written = seg.save(
            args.out,
            report=args.json_out,
            probabilities=args.probabilities,
            instances=args.instances,
            overwrite=args.overwrite,
            inputs=inputs,
        )
    else:
        if args.probabilities or args.instances:
            raise InputError("--probabilities and --instances need --out (the label map)")
        if args.json_out:
            written["report"] = seg.save_report(args.json_out, overwrite=args.overwrite)
    lines = [*summary(seg.report), *(f"wrote {p}" for p in written.values())]
    if args.push:
        from medseg.io.remote import push_result

        rec = push_result(written["labels"], source=args.image, to=args.to)
        lines.append(f"pushed {written['labels']} to {rec.to} (study {rec.study})")
    print("\n".join(lines))
    return 0


def summary(report: dict[str, Any]) -> list[str]:
    """A few lines a person reads after a run (from the report alone)."""
    fmt = lambda v, nd=4: "n/a" if v is None else f"{v:.{nd}f}"  # noqa: E731
    t = report["timings"]
    lines: list[str] = []
    if report["engine"] in ("sam", "sam2"):
        sam = report[report["engine"]]
        prop = sam["propagation"]
        voxels = sum(e["voxels"] for e in report["labels"])
        lines.append(
            f"segmented {voxels} voxels on {len(prop['slices'])} slice(s) along {sam['axis']} "
            f"(key slice(s) {prop['key_slices']}) in {t.get('segment_s', 0):.1f} s"
        )
        if prop["review"]:
            worst = ", ".join(f"{r['index']} ({r['review_score']:.2f})" for r in prop["review"][:3])
            lines.append(f"review first: slice {worst}")
        if sam["dice"] is not None:
            line = f"Dice {sam['dice']:.4f}"
            if sam["oracle"] is not None:
                orc = sam["oracle"]
                line += (
                    f"   (per-slice oracle-box Dice {fmt(orc['dice'])}, ratio "
                    f"{fmt(orc['ratio'], 3)})"
                )
            lines.append(line)
    else:
        m = report["model"]
        lines.append(
            f"segmented {report['image']['path']} with {m['name']} in "
            f"{t.get('segment_s', 0):.1f} s ({m['precision']})"
        )
        for row in report.get("metrics") or []:
            lines.append(f"  {row['name']:>12}: dice {fmt(row.get('dice'))}")
        inst = report["unet"].get("instances")
        if inst:
            lines.append(f"  lesions: {inst['lesions']}")
    return lines
