"""``medseg segment``: one command for both engines.

* SAM-Med models (``litemedsam`` default, ``sam_vit_b``, ``medsam_vit_b``): prompts (box / points /
  prompt file / box from ground truth) on a key slice, then 3D propagation.
  Implemented in :func:`medseg.predict.sam_cli.run`.
* U-Net (``unet-demo`` or a ``.pt`` checkpoint): whole-volume automatic segmentation, optional
  refinement with a SAM-Med model. Implemented in :func:`medseg.predict.unet_cli.run`.
"""

from __future__ import annotations

import argparse


def is_unet_model(name: str) -> bool:
    """True for the U-Net engine (``unet-demo``, ``unet-*`` or a ``.pt`` checkpoint path)."""
    return name.startswith("unet") or name.endswith(".pt")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment an image (SAM-Med prompts + 3D propagation, or automatic U-Net)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image", help="image file (NIfTI/NRRD/MHA) or DICOM folder")
    p.add_argument("--series", help="SeriesInstanceUID when the DICOM folder holds several")
    p.add_argument(
        "--model",
        default="litemedsam",
        help="litemedsam (default) | sam_vit_b | medsam_vit_b | unet-demo | PATH.pt",
    )
    p.add_argument("--weights", help="checkpoint file for a SAM-Med model (overrides the cache)")
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
        "--label", type=int, help="label value in GT used by --box-from-gt (default: 1 / all)"
    )
    g.add_argument(
        "--box-margin",
        type=float,
        default=3.0,
        metavar="PX",
        help="margin in pixels of the --box-from-gt and oracle boxes (default 3)",
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
    o.add_argument("--out", help="label map to write (.nii.gz, .nrrd, ...)")
    o.add_argument("--json", dest="json_out", metavar="REPORT.json", help="write a JSON report")
    o.add_argument("--overwrite", action="store_true", help="replace existing output files")
    o.add_argument("--device", default="auto", help="auto | cpu | cuda")
    o.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="auto: bf16 where the CPU has native bf16, else fp32",
    )
    o.add_argument("--cache-dir", help="embedding disk cache folder (default: $MEDSEG_HOME/cache)")
    o.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if is_unet_model(args.model):
        from medseg.predict.unet_cli import run as run_unet

        return run_unet(args)
    from medseg.predict.sam_cli import run as run_sam

    return run_sam(args)
