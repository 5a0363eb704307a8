"""Surface-distance metrics on a liver-sized pair in a 400x512x512 CT grid.

Two overlapping ellipsoids (~5.6 M voxels each, spacing 1.0 x 0.78 x 0.78 mm) as prediction and
ground truth label maps; times :func:`medseg.metrics.evaluate` (what ``medseg segment --gt`` and
``medseg evaluate`` run) and, for the same cropped box, the previous method: two Euclidean
distance transforms over the box (``ndimage.distance_transform_edt``). Reports the largest
difference between the two methods' distances. Load average before/after is recorded.

Run: ``.venv/bin/python benchmarks/bench_metrics.py [--out benchmarks/results/metrics.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg import metrics
from medseg.volume import LabelMap, Volume


def _ellipsoid(shape: tuple[int, int, int], c: tuple[int, ...], r: tuple[float, ...]) -> np.ndarray:
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return (
        ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2 <= 1
    ).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    shape, sp = (400, 512, 512), (1.0, 0.78, 0.78)
    g = _ellipsoid(shape, (200, 260, 250), (80, 120, 140))
    p = _ellipsoid(shape, (204, 255, 252), (78, 124, 137))
    ref = Volume(np.broadcast_to(np.float32(0), shape), spacing=sp)
    load_before = [round(v, 2) for v in os.getloadavg()]
    t = time.perf_counter()
    rows = metrics.evaluate(LabelMap.like(ref, p, {1: "liver"}), LabelMap.like(ref, g))
    evaluate_s = time.perf_counter() - t
    t = time.perf_counter()
    sd = metrics.surface_distances(p, g, sp)
    new_s = time.perf_counter() - t
    box = metrics.bounding_box(p.astype(bool) | g.astype(bool), margin=1)
    assert box is not None
    sp_p, sp_g = metrics.surface(p[box].astype(bool)), metrics.surface(g[box].astype(bool))
    t = time.perf_counter()
    old_pg = ndimage.distance_transform_edt(~sp_g, sampling=sp)[sp_p]
    old_gp = ndimage.distance_transform_edt(~sp_p, sampling=sp)[sp_g]
    old_s = time.perf_counter() - t
    diff = max(
        float(np.abs(sd.pred_to_gt - old_pg).max()), float(np.abs(sd.gt_to_pred - old_gp).max())
    )
    doc = {
        "shape": shape,
        "spacing": sp,
        "box": [[s.start, s.stop] for s in box],
        "surface_voxels": [int(sp_p.sum()), int(sp_g.sum())],
        "evaluate_s": round(evaluate_s, 3),
        "evaluate_row": rows[0],
        "surface_distances_s": round(new_s, 3),
        "edt_over_box_s": round(old_s, 3),
        "max_abs_diff_mm": diff,
        "bitwise_equal_fraction": float(
            (np.count_nonzero(sd.pred_to_gt == old_pg) + np.count_nonzero(sd.gt_to_pred == old_gp))
            / (old_pg.size + old_gp.size)
        ),
        "hd95": [sd.hausdorff(95.0), metrics.SurfaceDistances(old_pg, old_gp).hausdorff(95.0)],
        "msd": [sd.mean(), metrics.SurfaceDistances(old_pg, old_gp).mean()],
        "load_before": load_before,
        "load_after": [round(v, 2) for v in os.getloadavg()],
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
