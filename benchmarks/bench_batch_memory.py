"""Peak and per-study resident memory of a batch worker over many phantom studies.

Writes ``--studies`` seeded phantom studies (NIfTI image + ``_gt`` label map, ``--shape`` and
``--spacing`` (z, y, x)) into a temporary folder, then runs :func:`medseg.batch` with the local
executor and one worker, which is this process: every study goes through ``medseg.segment``,
is saved with its report, and the aggregates and plots are written at the end.

After each study the process's resident set (``VmRSS``) is recorded; ``VmHWM`` (the high-water
mark) is read at the end. ``growth_mb_per_study`` is the least-squares slope of RSS over the
studies after the first ``--warmup`` ones (model load, first-call allocations); a bounded worker
shows a slope near 0. The load average says how busy the shared CPU was.

Usage::

    python benchmarks/bench_batch_memory.py [--studies 24] [--model unet-demo]
        [--shape 32,128,128] [--spacing 4.5,1.5,1.5] [--out benchmarks/results/batch_memory.json]

``--model litemedsam`` runs the SAM path with a box from each study's ground truth (``--label``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def _status_mb(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0  # kB -> MiB
    return float("nan")


def _triple(text: str, kind: type) -> tuple:
    vals = tuple(kind(v) for v in text.split(","))
    if len(vals) != 3:
        raise SystemExit(f"expected three numbers Z,Y,X, got {text!r}")
    return vals


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=24)
    ap.add_argument("--model", default="unet-demo")
    ap.add_argument("--label", type=int, default=2, help="SAM: ground-truth label boxed")
    ap.add_argument("--shape", default="32,128,128")
    ap.add_argument("--spacing", default="4.5,1.5,1.5")
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.studies < args.warmup + 2:
        raise SystemExit("--studies must exceed --warmup by at least 2")

    import numpy as np

    import medseg
    from medseg.io.itk import write_image
    from medseg.phantom import make_phantom

    shape, spacing = _triple(args.shape, int), _triple(args.spacing, float)
    rss_start = _status_mb("VmRSS")
    with tempfile.TemporaryDirectory(prefix="medseg-bench-batch-") as tmp:
        data, out = Path(tmp) / "data", Path(tmp) / "out"
        data.mkdir()
        for i in range(args.studies):
            img, lab = make_phantom(seed=i, shape=shape, spacing=spacing)
            write_image(img, data / f"case{i:03d}.nii.gz")
            write_image(lab, data / f"case{i:03d}_gt.nii.gz")
        del img, lab
        rss_before = _status_mb("VmRSS")
        per_study: list[dict] = []

        def on_study(r: medseg.batches.StudyResult) -> None:
            per_study.append(
                {
                    "study": r.study,
                    "status": r.status,
                    "seconds": r.seconds,
                    "rss_mb": round(_status_mb("VmRSS"), 1),
                }
            )

        kwargs: dict = {}
        if args.model != "unet-demo" and not args.model.endswith(".pt"):
            kwargs = {"prompts_from_gt": True, "label": args.label, "cache_dir": None}
        t0 = time.perf_counter()
        res = medseg.batch(data, args.model, out, on_study=on_study, **kwargs)
        wall = time.perf_counter() - t0
        summary = json.loads(res.summary_json.read_text()) if res.summary_json else {}

    rss = np.array([s["rss_mb"] for s in per_study])
    after = rss[args.warmup :]
    slope = float(np.polyfit(np.arange(after.size), after, 1)[0]) if after.size > 1 else None
    result = {
        "benchmark": "batch_memory",
        "model": args.model,
        "studies": args.studies,
        "shape_zyx": list(shape),
        "spacing_zyx_mm": list(spacing),
        "executor": "local, 1 worker (this process)",
        "failed": [r.study for r in res.failed],
        "rss_start_mb": round(rss_start, 1),
        "rss_before_batch_mb": round(rss_before, 1),
        "rss_after_first_study_mb": float(rss[0]),
        "rss_after_warmup_mb": float(rss[args.warmup - 1]),
        "rss_last_mb": float(rss[-1]),
        "rss_max_over_studies_mb": float(rss.max()),
        "rss_min_after_warmup_mb": float(after.min()),
        "rss_max_after_warmup_mb": float(after.max()),
        "growth_mb_per_study": None if slope is None else round(slope, 3),
        "peak_rss_mb": round(_status_mb("VmHWM"), 1),
        "wall_s": round(wall, 2),
        "seconds_per_study_median": float(np.median([s["seconds"] for s in per_study])),
        "dice_mean_per_label": {e["name"]: e["dice"]["mean"] for e in summary.get("labels", [])},
        "per_study": per_study,
        "loadavg": [round(v, 2) for v in os.getloadavg()],
        "python": sys.version.split()[0],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
