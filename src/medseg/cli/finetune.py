"""``medseg finetune``: fine-tune a SAM-Med mask decoder on a labelled dataset (encoder frozen).

DATASET is a Medical Segmentation Decathlon folder, an nnU-Net raw folder or a folder of
image/label pairs. Whole volumes (``--val-fraction``) are held out for validation: per-slice box
Dice and 3D Dice through propagation, epoch 0 being the zero-shot model; the best epoch is saved
to ``--out`` (decoder weights + base model, weights sha256, preprocessing, label, provenance).
Beside it: ``D.resume.pt`` (resumable: Ctrl-C writes it too), ``D.curve.json`` and
``D.curve.png``. Use the decoder with ``medseg segment --model M --decoder D.pt``.
Several processes: ``torchrun --nproc_per_node N -m medseg finetune ...``.
"""

from __future__ import annotations

import argparse
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune",
        help="fine-tune a SAM-Med mask decoder on a labelled dataset (image encoder frozen)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, metavar="DATASET", help="dataset folder")
    p.add_argument(
        "--model",
        default="litemedsam",
        choices=["litemedsam", "sam_vit_b", "medsam_vit_b"],
        help="base SAM-Med model (default litemedsam)",
    )
    p.add_argument("--weights", metavar="PATH", help="base checkpoint (overrides the cache)")
    p.add_argument("--label", required=True, metavar="NAME|VALUE", help="structure to learn")
    p.add_argument("--out", required=True, metavar="DECODER.pt", help="decoder file to write")
    p.add_argument("--epochs", type=int, default=10, help="epochs in total (default 10)")
    p.add_argument(
        "--val-fraction",
        type=float,
        default=None,
        metavar="F",
        help="fraction of volumes held out for validation (default 0.2, none with one volume)",
    )
    p.add_argument("--resume", metavar="CKPT", help="continue from a .resume.pt checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of split, prompts and order")
    p.add_argument("--batch-size", type=int, default=4, help="slices per step (default 4)")
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    p.add_argument("--window", help="CT window preset or LO,HI (saved with the decoder)")
    p.add_argument("--axis", choices=["z", "y", "x"], default="z", help="slicing axis")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--cache-dir", help="embedding disk cache folder (default: $MEDSEG_HOME)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``medseg finetune``. Returns the exit status (0)."""
    from medseg.progress import tqdm_progress
    from medseg.train.decoder import finetune, resume_path_for

    try:
        with tqdm_progress("finetune", enabled=not args.quiet) as cb:
            res = finetune(
                args.data,
                args.model,
                weights=args.weights,
                label=args.label,
                out=args.out,
                epochs=args.epochs,
                val_fraction=args.val_fraction,
                resume=args.resume,
                seed=args.seed,
                batch_size=args.batch_size,
                lr=args.lr,
                axis=args.axis,
                window=args.window,
                precision=args.precision,
                device=args.device,
                cache_dir=args.cache_dir or True,
                overwrite=args.overwrite,
                progress=cb,
            )
    except KeyboardInterrupt:
        ck = resume_path_for(args.out)
        if ck.is_file():
            print(f"medseg finetune: checkpoint {ck}; continue with --resume {ck}", file=sys.stderr)
        raise
    if res.sha256 == "":  # a torchrun rank other than 0 writes nothing
        return 0
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [
        f"trained the {args.model} mask decoder on {res.train_slices} slices of "
        f"{len(res.train_cases)} volume(s); validated on {len(res.val_cases)} held-out volume(s)"
    ]
    if res.extra.get("note"):
        lines.append(f"note: {res.extra['note']}")
    base, best = res.baseline, res.best
    if base is not None and best is not None:
        lines.append(
            f"box Dice {fmt(base['val_box_dice'])} (zero-shot) -> {fmt(best['val_box_dice'])}; "
            f"3D Dice {fmt(base['val_dice_3d'])} -> {fmt(best['val_dice_3d'])} "
            f"(best epoch {res.best_epoch})"
        )
    lines.append(f"wrote {res.path} (sha256 {res.sha256})")
    lines += [f"wrote {p}" for p in (res.curve_json, res.curve_png, res.checkpoint) if p]
    print("\n".join(lines))
    return 0
