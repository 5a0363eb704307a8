"""``medseg evaluate-interactive IMAGE --gt GT``: the SEGFM3D protocol (CVPR 2025 interactive 3D
challenge) on one study: the challenge's box, then corrective clicks at the centre of the largest
error, DSC and NSD (2 mm) after every step, their AUC over the clicks, final DSC / NSD.

IMAGE may be a challenge ``.npz`` (``imgs``, ``gts``, ``spacing``); without ``--gt`` its ``gts``
are the ground truth. Without ``--label`` every label of the ground truth is run in turn.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate-interactive",
        help="simulate the challenge's box + 5 clicks and score every step (DSC, NSD, AUC)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", metavar="IMAGE", help="image (NIfTI/NRRD/MHA, DICOM folder, .npz)")
    p.add_argument("--gt", help="ground-truth label map (default: the .npz image's gts)")
    p.add_argument("--label", type=int, help="the label to run (default: every label in turn)")
    p.add_argument("--clicks", type=int, default=5, help="corrective clicks after the box (5)")
    p.add_argument("--model", default="litemedsam", help="SAM-family model (default litemedsam)")
    p.add_argument("--weights", help="checkpoint file for the model (overrides the cache)")
    p.add_argument("--window", help="CT window preset or LO,HI (default: by modality)")
    p.add_argument("--seed", type=int, default=42, help="click tie-break seed (challenge: 42)")
    p.add_argument(
        "--trust-npz-boxes",
        action="store_true",
        help="start from the boxes stored in the .npz (a pickle: only for files you trust)",
    )
    p.add_argument("--json", dest="json_out", metavar="OUT.json", help="write the results")
    p.add_argument("--out", metavar="LABELS", help="write the final label map (NIfTI/NRRD/MHA)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--precision", help="auto | fp32 | bf16")
    p.add_argument("--cache-dir", help="embedding disk cache folder")
    p.add_argument("--quiet", action="store_true", help="print only the summary line per label")
    p.set_defaults(func=run)


def _table(r: Any) -> str:
    lines = [
        f"label {r.label} ({r.name})",
        "  step  prompt                          DSC     NSD      s",
    ]
    for i, (pj, d, n, s) in enumerate(zip(r.prompts, r.dsc, r.nsd, r.seconds, strict=True)):
        if pj is None:
            what = "(no error left)"
        elif pj["kind"] == "box":
            b = pj["challenge_box"]
            what = f"box z{b['z_mid']} [{b['z_min']}..{b['z_max']}]"
        else:
            z, y, x = (int(v) for v in pj["zyx"])
            what = f"{'+' if pj['label'] else '-'} click ({z}, {y}, {x})"
        lines.append(f"  {i:>4}  {what:<28} {d:6.4f}  {n:6.4f} {s:6.2f}")
    lines.append(_summary(r))
    return "\n".join(lines)


def _summary(r: Any) -> str:
    return (
        f"  label {r.label}: DSC_AUC {r.dsc_auc:.4f}  NSD_AUC {r.nsd_auc:.4f}  "
        f"final DSC {r.final_dsc:.4f}  final NSD {r.final_nsd:.4f}  "
        f"{sum(r.seconds) / len(r.seconds):.2f} s/step"
    )


def run(args: argparse.Namespace) -> int:
    from medseg.errors import InputError
    from medseg.io import check_output_path, write_json
    from medseg.protocol import evaluate_interactive

    if args.clicks < 0:
        raise InputError(f"--clicks must be >= 0, got {args.clicks}")
    inputs = [args.image] + ([args.gt] if args.gt else [])
    outs = [o for o in (args.json_out, args.out) if o]
    for o in outs:
        check_output_path(o, inputs, args.overwrite)
    kwargs = {
        k: v
        for k, v in (
            ("weights", args.weights),
            ("window", args.window),
            ("device", args.device),
            ("precision", args.precision),
            ("cache_dir", args.cache_dir),
        )
        if v is not None
    }
    results, final = evaluate_interactive(
        args.image,
        args.gt,
        labels=[args.label] if args.label is not None else None,
        clicks=args.clicks,
        model=args.model,
        seed=args.seed,
        trust_npz=args.trust_npz_boxes,
        **kwargs,
    )
    for r in results:
        print(_summary(r) if args.quiet else _table(r))
    if args.out:
        from medseg.pipeline import write_labels

        write_labels(final, args.out, overwrite=args.overwrite, inputs=inputs)
    if args.json_out:
        doc = {
            "protocol": "segfm3d",
            "image": str(args.image),
            "gt": str(args.gt) if args.gt else None,
            "model": args.model,
            "clicks": args.clicks,
            "seed": args.seed,
            "labels": [r.to_json() for r in results],
            "labels_out": str(args.out) if args.out else None,
            "argv": ["medseg", *sys.argv[1:]],
        }
        write_json(doc, args.json_out, inputs=inputs, overwrite=args.overwrite)
    return 0
