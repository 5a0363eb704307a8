"""A simulated active-learning loop on phantoms: entropy-ranked selection against random selection.

A pool of seeded phantom studies (their ground truth hidden) and a held-out test set are made.
Each strategy starts from the same ``--initial`` labelled studies; each round a small U-Net is
trained from scratch on the labelled set (:func:`medseg.train.unet.train_unet`, same seed and
recipe), scored on the test set through :func:`medseg.segment` (mean Dice over the labels), and
``--step`` more studies are "labelled": the most uncertain ones by :func:`medseg.rank`
(``entropy``: mean normalised softmax entropy) or random ones (seeded). Both strategies see the
same budgets. Prints JSON (and writes it with ``--out``); ``--plot`` saves Dice against budget.

This is small and noisy by construction (a few studies, a few epochs, one seed): read it as a
sanity check of the loop, not as evidence that one strategy wins.

Usage::

    python benchmarks/bench_active_learning.py [--pool 12] [--test 4] [--initial 2] [--step 2]
        [--rounds 3] [--epochs 12] [--out benchmarks/results/active_learning.json]
        [--plot benchmarks/results/active_learning.png]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

SHAPE = (24, 96, 96)
SPACING = (6.0, 2.0, 2.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool", type=int, default=12)
    ap.add_argument("--test", type=int, default=4)
    ap.add_argument("--initial", type=int, default=2)
    ap.add_argument("--step", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out")
    ap.add_argument("--plot")
    args = ap.parse_args(argv)

    import numpy as np

    import medseg
    from medseg.io.datasets import write_msd_dataset
    from medseg.io.itk import write_image
    from medseg.phantom import PHANTOM_LABELS, make_phantom
    from medseg.train.unet import train_unet

    rng = np.random.default_rng(args.seed)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="medseg-bench-al-") as tmp:
        root = Path(tmp)
        pool: dict[str, tuple] = {}
        for i in range(args.pool):
            pool[f"pool{i:02d}"] = make_phantom(seed=100 + i, shape=SHAPE, spacing=SPACING)
        test = [make_phantom(seed=500 + i, shape=SHAPE, spacing=SPACING) for i in range(args.test)]
        initial = sorted(rng.choice(sorted(pool), size=args.initial, replace=False).tolist())

        def train_and_score(labelled: list[str], tag: str) -> dict:
            ds = root / f"ds_{tag}"
            write_msd_dataset(
                ds,
                ((cid, *pool[cid]) for cid in labelled),
                name=tag,
                description="active-learning simulation",
                labels=dict(PHANTOM_LABELS),
            )
            ckpt = root / f"{tag}.pt"
            t = time.perf_counter()
            train_unet(
                ds,
                ckpt,
                epochs=args.epochs,
                patch_size=(16, 48, 48),
                target_spacing=(6.0, 3.0, 3.0),
                channels=(8, 16, 32),
                seed=args.seed,
                val_fraction=0.0,  # every labelled study trains (equal budgets)
                threads=1,
            )
            train_s = time.perf_counter() - t
            dice = []
            for img, lab in test:
                seg = medseg.segment(img, model=ckpt, gt=lab)
                dice.append(np.mean([r["dice"] for r in seg.report["metrics"]]))
            return {
                "ckpt": ckpt,
                "dice": float(np.mean(dice)),
                "per_test_case": [round(float(d), 6) for d in dice],
                "train_s": round(train_s, 1),
            }

        def unlabelled_folder(labelled: list[str], tag: str) -> Path:
            d = root / f"pool_{tag}"
            d.mkdir()
            for cid, (img, _) in pool.items():
                if cid not in labelled:
                    write_image(img, d / f"{cid}.nii.gz")
            return d

        curves: dict[str, list[dict]] = {"entropy": [], "random": []}
        for strategy in curves:
            labelled = list(initial)
            srng = np.random.default_rng(args.seed + 1)
            for rnd in range(args.rounds + 1):
                tag = f"{strategy}_{rnd}"
                res = train_and_score(labelled, tag)
                curves[strategy].append(
                    {
                        "budget": len(labelled),
                        "labelled": list(labelled),
                        "test_dice": round(res["dice"], 6),
                        "test_dice_per_case": res["per_test_case"],
                        "train_s": res["train_s"],
                    }
                )
                print(json.dumps({strategy: curves[strategy][-1]}), file=sys.stderr)
                if rnd == args.rounds:
                    break
                if strategy == "entropy":
                    folder = unlabelled_folder(labelled, tag)
                    top = medseg.rank(folder, res["ckpt"], k=args.step, strategy="entropy")
                    picked = [r.study for r in top]
                else:
                    rest = sorted(set(pool) - set(labelled))
                    picked = srng.choice(rest, size=args.step, replace=False).tolist()
                labelled += sorted(picked)

    result = {
        "benchmark": "active_learning",
        "pool": args.pool,
        "test": args.test,
        "initial": args.initial,
        "step": args.step,
        "rounds": args.rounds,
        "epochs": args.epochs,
        "phantom_shape_zyx": list(SHAPE),
        "phantom_spacing_zyx_mm": list(SPACING),
        "metric": "mean Dice over the 4 phantom labels on the held-out test studies",
        "curves": curves,
        "entropy_minus_random_per_budget": [
            round(e["test_dice"] - r["test_dice"], 6)
            for e, r in zip(curves["entropy"], curves["random"], strict=True)
        ],
        "wall_s": round(time.perf_counter() - t_start, 1),
        "loadavg": [round(v, 2) for v in os.getloadavg()],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
        for name, pts in curves.items():
            ax.plot([p["budget"] for p in pts], [p["test_dice"] for p in pts], "o-", label=name)
        ax.set_xlabel("labelled studies")
        ax.set_ylabel("test Dice (mean over labels)")
        ax.set_title("active learning on phantoms (one seed)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, metadata={"Software": None})
        plt.close(fig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
