"""The exact script that made ``src/medseg/assets/unet_demo.pt`` (the demonstration U-Net).

1. writes an MSD dataset of synthetic CT phantoms (:func:`medseg.phantom.make_phantom`,
   seeds ``TRAIN_SEEDS``, default shape/spacing) into ``WORK/phantoms``;
2. trains :func:`medseg.train.unet.train_unet` with ``SETTINGS`` (log ``WORK/demo.log.jsonl``);
3. evaluates the best checkpoint on held-out phantoms (seeds ``TEST_SEEDS``, never used for
   training or validation) on their original grids with :func:`medseg.metrics.evaluate`;
4. copies the best checkpoint without the optimizer state to ``--ship`` (if given) and prints a
   JSON summary.

Usage::

    python benchmarks/train_demo.py WORK [--epochs 120] [--ship src/medseg/assets/unet_demo.pt]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

TRAIN_SEEDS = list(range(1000, 1018))  # 18 cases: 16 train + 2 validation (val_fraction 0.1)
TEST_SEEDS = [0, 1, 2, 3, 4]
SETTINGS = {
    "patch_size": (32, 64, 64),
    "target_spacing": (3.0, 2.0, 2.0),
    "channels": (8, 16, 32, 64),
    "num_res_units": 1,
    "seed": 0,
    "val_fraction": 0.1,
    "window": "abdomen",
    "lr": 2e-3,
    "batch_cases": 2,
    "samples_per_case": 2,
    "threads": 1,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--epochs", type=int, default=120)
    ap.add_argument("--ship", type=Path, help="where to write the shipped checkpoint")
    ap.add_argument("--resume", type=Path, help="continue from WORK/demo.last.pt")
    args = ap.parse_args()

    import torch

    from medseg.io.datasets import write_msd_dataset
    from medseg.metrics import evaluate
    from medseg.models.unet import save_checkpoint
    from medseg.phantom import PHANTOM_LABELS, make_phantom
    from medseg.predict.unet import UNetSegmenter
    from medseg.train.unet import train_unet

    args.work.mkdir(parents=True, exist_ok=True)
    ds_root = args.work / "phantoms"
    if not (ds_root / "dataset.json").is_file():
        cases = ((f"phantom_{s}", *make_phantom(s)) for s in TRAIN_SEEDS)
        write_msd_dataset(
            ds_root,
            cases,
            name="medseg-phantom-demo",
            description="synthetic abdominal CT phantoms",
            labels=PHANTOM_LABELS,
        )
    t0 = time.perf_counter()
    summary = train_unet(
        ds_root,
        args.work / "demo.pt",
        epochs=args.epochs,
        resume=args.resume,
        overwrite=True,
        on_epoch=lambda r: print(json.dumps(r), flush=True),
        **SETTINGS,
    )
    train_s = time.perf_counter() - t0

    seg = UNetSegmenter.load(args.work / "demo.pt")
    results = []
    for s in TEST_SEEDS:
        img, gt = make_phantom(s)
        pred = seg.segment(img)
        rows = evaluate(pred, gt, PHANTOM_LABELS)
        results.append({"seed": s, **{r["name"]: round(r["dice"], 4) for r in rows}})
    out = {
        "train_seconds": round(train_s, 1),
        "best_epoch": summary["best_epoch"],
        "best_val_mean_dice": summary["best_metric"],
        "split": summary["split"],
        "settings": SETTINGS,
        "train_seeds": TRAIN_SEEDS,
        "test": results,
        "test_mean": {
            n: round(sum(r[n] for r in results) / len(results), 4) for n in PHANTOM_LABELS.values()
        },
    }
    if args.ship:
        ck = torch.load(args.work / "demo.pt", map_location="cpu", weights_only=True)
        ck.pop("optimizer", None)
        ck["note"] = (
            "demonstration model trained on synthetic CT phantoms only "
            "(benchmarks/train_demo.py); not for clinical or research use on real scans"
        )
        save_checkpoint(ck, args.ship)
        out["shipped"] = str(args.ship)
        out["shipped_bytes"] = args.ship.stat().st_size
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
