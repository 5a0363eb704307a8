"""``medseg train-unet``: train a MONAI 3D U-Net on an MSD / nnU-Net raw dataset.

Writes ``OUT`` (best checkpoint by mean validation Dice), ``OUT.last.pt`` (latest epoch, for
``--resume``) and ``OUT.log.jsonl``; prints one JSON line per epoch (loss, validation Dice per
label). The checkpoint records the architecture, label table, target spacing, patch size,
intensity preprocessing, modality, split and history, and a SHA-256 of its config.
"""

from __future__ import annotations

import argparse
import json

from medseg.cli.common import parse_triple


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train-unet",
        help="train a MONAI 3D U-Net on an MSD / nnU-Net dataset",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, metavar="DATASET", help="dataset folder (dataset.json)")
    p.add_argument("--out", required=True, metavar="MODEL.pt", help="best checkpoint to write")
    p.add_argument("--epochs", type=int, default=50, help="total epochs (default 50)")
    p.add_argument("--resume", metavar="CKPT", help="continue from a checkpoint (OUT.last.pt)")
    p.add_argument(
        "--patch",
        default="32,64,64",
        metavar="Z,Y,X",
        help="patch / window size in model voxels (default 32,64,64)",
    )
    p.add_argument(
        "--spacing", default="3,2,2", metavar="Z,Y,X", help="target spacing in mm (default 3,2,2)"
    )
    p.add_argument(
        "--channels", default="16,32,64,128", help="U-Net channels per level (default 16,32,64,128)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument(
        "--window", default="abdomen", help="CT window preset or LO,HI (default abdomen)"
    )
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument(
        "--lr-schedule",
        choices=["poly", "constant"],
        default="poly",
        help="poly: lr * (1 - (epoch-1)/epochs)^0.9 (default); constant",
    )
    p.add_argument("--flip", action="store_true", help="random flips (off: breaks left/right)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from medseg.errors import InputError
    from medseg.progress import tqdm_progress
    from medseg.train.unet import train_unet

    try:
        channels = tuple(int(c) for c in args.channels.split(","))
    except ValueError:
        raise InputError(
            f"--channels must be integers like 16,32,64,128, got {args.channels!r}"
        ) from None
    with tqdm_progress("train", enabled=not args.quiet) as cb:
        summary = train_unet(
            args.data,
            args.out,
            epochs=args.epochs,
            patch_size=parse_triple(args.patch, "--patch", int),
            target_spacing=parse_triple(args.spacing, "--spacing", float),
            channels=channels,
            seed=args.seed,
            val_fraction=args.val_fraction,
            resume=args.resume,
            progress=cb,
            window=args.window,
            lr=args.lr,
            flip=args.flip,
            lr_schedule=args.lr_schedule,
            overwrite=args.overwrite,
            on_epoch=lambda r: print(json.dumps(r), flush=True),
        )
    keys = ("out", "last", "log", "best_epoch", "best_metric", "split", "config_sha256")
    print(json.dumps({k: summary[k] for k in keys}))
    return 0
