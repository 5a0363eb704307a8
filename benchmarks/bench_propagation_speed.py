"""Propagation speed and fast-path accuracy: medseg's predictor vs a stock re-embedding loop.

For each real case (``../shared/data/pyradiomics``), one key-slice box from the label
(``box_from_gt``, 3 px margin) is propagated with the default configuration twice:

* ``medseg``: :class:`~medseg.predict.sam.VolumePredictor` as shipped (accelerated encoder,
  ``precision='auto'``: bf16 where the CPU has it), each visited slice embedded once;
* ``stock``: the same walk with the stock LiteMedSAM modules in fp32 (``accelerate=False``) and a
  one-slice memory, so every slice is re-embedded whenever the walk comes back to it — the
  ``SamPredictor.set_image``-per-slice loop.

Reports wall time, encoder calls, the 3D Dice of each against the label, and the Dice between
the two 3D masks. Prints JSON (``--out`` also writes it).

    python benchmarks/bench_propagation_speed.py --out benchmarks/results/propagation_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "pyradiomics"


def run_case(case: str, fast: Any, stock: Any) -> dict[str, Any]:
    from medseg.io import read_labels, read_volume
    from medseg.predict.propagate import box_from_gt, dice3d, propagate
    from medseg.predict.sam import VolumePredictor

    image = read_volume(DATA / f"{case}_image.nrrd")
    gt = read_labels(DATA / f"{case}_label.nrrd").array > 0
    key = box_from_gt(gt, "z", 3)
    out: dict[str, Any] = {"gt_slices": int(gt.any(axis=(1, 2)).sum()), "key_slice": key.index}
    masks = {}
    for name, model, memory in (("medseg", fast, 256), ("stock", stock, 1)):
        pred = VolumePredictor(image, model, memory_slices=memory)
        t0 = time.perf_counter()
        res = propagate(pred, [key])
        seconds = time.perf_counter() - t0
        masks[name] = res.mask
        out[name] = {
            "seconds": round(seconds, 3),
            "encoder_calls": pred.encoder_calls,
            "decoder_calls": pred.decoder_calls,
            "slices_visited": len({r.index for r in res.records}),
            "dice_vs_gt": round(dice3d(res.mask, gt), 4),
        }
    out["speedup"] = round(out["stock"]["seconds"] / out["medseg"]["seconds"], 2)
    out["dice_medseg_vs_stock"] = round(dice3d(masks["medseg"], masks["stock"]), 4)
    out["gt_drop"] = round(out["stock"]["dice_vs_gt"] - out["medseg"]["dice_vs_gt"], 4)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", default="lung1,brain1,breast1")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import torch

    from medseg.models.sam import load_sam_model

    torch.set_num_threads(args.threads)
    fast = load_sam_model("litemedsam", precision="auto")
    stock = load_sam_model("litemedsam", precision="fp32", accelerate=False)
    report: dict[str, Any] = {
        "threads": args.threads,
        "fast_precision": fast.precision,
        "load_before": os.getloadavg(),
        "cases": {c: run_case(c, fast, stock) for c in args.cases.split(",")},
    }
    report["load_after"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
