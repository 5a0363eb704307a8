"""``medseg rank``: which unlabelled studies to label next; parses, calls :func:`medseg.rank`
(module :mod:`medseg.active`), prints.

``--data DIR`` as for ``medseg batch`` (a dataset or a folder of studies; a study is labelled when
it has ground truth, ``NAME_gt.<ext>`` in a folder). Each unlabelled study is segmented with the
U-Net through the pipeline and scored: ``entropy`` = mean voxel softmax entropy (normalised to
[0, 1]); ``disagreement`` = 1 - Dice between the U-Net's lesion and its refinement with a SAM-Med
model (``--refine-with``). ``--out RANK.csv`` gets every study (rank, study, score, strategy,
slices, image, status, error); the ``--k`` most uncertain are printed with the slices to look at.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "rank",
        help="rank unlabelled studies by model uncertainty (active learning)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, metavar="DIR", help="dataset or folder of studies")
    p.add_argument("--model", default="unet-demo", help="unet-demo | CHECKPOINT.pt")
    p.add_argument("--k", type=int, default=10, help="how many studies to list (default 10)")
    p.add_argument("--strategy", choices=["entropy", "disagreement"], default="entropy")
    p.add_argument("--refine-with", default="litemedsam", help="SAM-Med model (disagreement)")
    p.add_argument("--slices", type=int, default=3, help="slices to name per study (default 3)")
    p.add_argument("--include-labelled", action="store_true", help="also score labelled studies")
    p.add_argument("--out", metavar="RANK.csv", help="write the full ranking as CSV")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``medseg rank``. Returns 0."""
    from medseg.active import rank
    from medseg.progress import tqdm_progress

    with tqdm_progress("rank", enabled=not args.quiet) as cb:
        top = rank(
            args.data,
            args.model,
            k=args.k,
            strategy=args.strategy,
            out=args.out,
            slices=args.slices,
            include_labelled=args.include_labelled,
            refine_with=args.refine_with,
            overwrite=args.overwrite,
            progress=cb,
            precision=args.precision,
            device=args.device,
        )
    for i, r in enumerate(top, start=1):
        z = ", ".join(str(v) for v in r.slices) or "-"
        print(f"{i:3}  {r.study}  {args.strategy} {r.score:.4f}  slices {z}")
    if args.out:
        print(f"wrote {args.out}")
    return 0
