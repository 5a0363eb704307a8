"""Does SAM refinement of a coarse mask help? Dice with vs without :func:`refine_with_sam`.

* Phantoms (held-out seeds, never used to train the demo model): the demo U-Net's tumour label,
  refined with LiteMedSAM (box + mask prompt, and box only), against the phantom's truth.
* Real cases (pyradiomics lung1 / brain1 / breast1): the demo U-Net is a CT-phantom model and does
  not apply, so the coarse mask is **simulated** from the ground truth: dilated by 2 voxels in
  plane, eroded by 1 voxel in plane, or shifted by 3 voxels in x. Each is refined and scored.

Prints one JSON document; timings are wall seconds on the shared CPU.

Usage::

    python benchmarks/bench_hybrid.py [--seeds 0,1,2,3,4] [--cases lung1,brain1,breast1]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "pyradiomics"


def _dice(a, b) -> float:
    import numpy as np

    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else round(2.0 * int(np.logical_and(a, b).sum()) / s, 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--cases", default="lung1,brain1,breast1")
    ap.add_argument("--model", default="litemedsam")
    args = ap.parse_args()

    import numpy as np
    from scipy import ndimage

    from medseg.io import read_labels, read_volume
    from medseg.phantom import make_phantom
    from medseg.predict.hybrid import refine_with_sam
    from medseg.predict.sam import VolumePredictor
    from medseg.predict.unet import UNetSegmenter
    from medseg.volume import LabelMap

    out: dict = {"sam_model": args.model, "phantoms": [], "real": []}
    seeds = [int(v) for v in args.seeds.split(",") if v]
    seg = UNetSegmenter.load("unet-demo") if seeds else None
    for s in seeds:
        img, gt = make_phantom(s)
        lm = seg.segment(img)
        row = {
            "seed": s,
            "unet_tumour": _dice(lm.array == 2, gt.array == 2),
            "unet_liver": _dice(lm.array == 1, gt.array == 1),
        }
        for window in ("abdomen", None):
            pred = VolumePredictor(img, args.model, window=window)
            for use_mask in (True, False):
                t = time.perf_counter()
                ref = refine_with_sam(img, lm, 2, predictor=pred, use_mask_prompt=use_mask)
                key = f"{'box+mask' if use_mask else 'box'}@{window or 'default'}"
                row[key] = _dice(ref.array == 2, gt.array == 2)
                row[key + "_s"] = round(time.perf_counter() - t, 1)
        out["phantoms"].append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)

    ball = ndimage.generate_binary_structure(3, 1)
    ball[0] = ball[2] = False  # in-plane (y, x) structuring element
    for case in (c for c in args.cases.split(",") if c):
        img = read_volume(REAL / f"{case}_image.nrrd")
        gt = read_labels(REAL / f"{case}_label.nrrd", reference=img)
        g = gt.array == 1
        coarse = {
            "dilated2": ndimage.binary_dilation(g, ball, iterations=2),
            "eroded1": ndimage.binary_erosion(g, ball, iterations=1),
            "shifted3x": np.roll(g, 3, axis=2),
        }
        pred = VolumePredictor(img, args.model)
        for name, m in coarse.items():
            lm = LabelMap.like(img, m.astype(np.uint8), {1: "tumour"})
            row = {"case": case, "coarse": name, "coarse_dice": _dice(m, g)}
            for use_mask in (True, False):
                t = time.perf_counter()
                ref = refine_with_sam(img, lm, 1, predictor=pred, use_mask_prompt=use_mask)
                key = "box+mask" if use_mask else "box"
                row[key] = _dice(ref.array == 1, g)
                row[key + "_s"] = round(time.perf_counter() - t, 1)
            out["real"].append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
