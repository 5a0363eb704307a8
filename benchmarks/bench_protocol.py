"""The SEGFM3D protocol (``medseg.simulate_interaction``) on the three shared real cases.

For each of brain1, breast1 and lung1 (label 1): the challenge's box (median-voxel slice, tight,
with the z range), then 5 clicks at the centre of the largest 26-connected error; DSC and NSD
(2 mm) after each step, DSC_AUC / NSD_AUC over the clicks, final DSC / NSD, seconds per step
(the first step includes embedding the slices it visits). The engine is
``medseg.InteractiveSession``. Beside it, on the same predictor, the
plain stock loop with the same box and z range and the per-slice oracle-box Dice (the functions of
``bench_interactive.py``: one place). The load average is recorded because
others share the CPU.

    PYTHONPATH=src python benchmarks/bench_protocol.py --out benchmarks/results/protocol.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "pyradiomics"
CASES = ("brain1", "breast1", "lung1")


def _references(predictor, gt) -> dict:
    """Stock loop (challenge box + z range) and oracle-box Dice on the session's predictor."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_interactive import challenge_box, dice, stock_loop

    from medseg.predict.propagate import oracle_dice

    mid, box, z0, z1 = challenge_box(gt)
    return {
        "stock_loop_dice": round(dice(stock_loop(predictor, mid, box, z0, z1), gt), 4),
        "oracle_dice_margin0": round(oracle_dice(predictor, gt, margin_px=0.0).dice, 4),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--clicks", type=int, default=5)
    ap.add_argument("--model", default="litemedsam")
    ap.add_argument("--cache-dir", help="embedding cache (default: a fresh temporary folder)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args(argv)

    import medseg

    cache = args.cache_dir or tempfile.mkdtemp(prefix="bench_protocol_")
    out: dict = {
        "what": "SEGFM3D protocol: challenge box + clicks, DSC/NSD(2 mm) per step",
        "python": platform.python_version(),
        "threads_env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MEDSEG_THREADS")},
        "load_avg_before": os.getloadavg(),
        "model": args.model,
        "clicks": args.clicks,
        "cases": {},
    }
    for case in args.cases.split(","):
        img = medseg.read_volume(Path(args.data) / f"{case}_image.nrrd")
        gt = medseg.read_labels(Path(args.data) / f"{case}_label.nrrd", reference=img)
        t0 = time.perf_counter()
        r = medseg.simulate_interaction(
            img, gt, label=1, clicks=args.clicks, model=args.model, cache_dir=cache
        )
        j = r.to_json()
        j.update(_references(r.predictor, gt.array == 1))
        j["wall_s"] = time.perf_counter() - t0
        j["load_avg_after"] = os.getloadavg()
        out["cases"][case] = j
        print(
            f"{case}: dsc {[round(v, 4) for v in r.dsc]} nsd {[round(v, 4) for v in r.nsd]} "
            f"s {[round(v, 2) for v in r.seconds]} AUC {r.dsc_auc:.4f}/{r.nsd_auc:.4f} "
            f"({r.engine}) stock loop {j['stock_loop_dice']} oracle {j['oracle_dice_margin0']}",
            file=sys.stderr,
        )
    cs = out["cases"].values()
    n = len(out["cases"])
    out["mean"] = {
        k: sum(c[k] for c in cs) / n for k in ("dsc_auc", "nsd_auc", "final_dsc", "final_nsd")
    }
    out["mean"]["dsc_0"] = sum(c["dsc"][0] for c in cs) / n
    out["load_avg_end"] = os.getloadavg()
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
