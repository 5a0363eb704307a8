"""Propagation quality: key-slice box → 3D mask, against the per-slice oracle box.

For each case (the three real pyradiomics studies, and objects of seeded synthetic phantoms) and
each prompt carry-over configuration, one unstopped walk is recorded from the standard key-slice
box (``box_from_gt``) up and down (stopped only when the mask vanishes, or a few slices past the
truth's ends). Every stop rule of a grid is then applied to the recorded walk: a stop rule only
truncates a walk, so truncating the recorded one gives what the online rule would produce
within the recorded horizon (an online walk may go further past the truth's ends than the
recorded one; the ``online`` and ``summary`` entries are the end-to-end numbers). The default
configuration (:data:`medseg.predict.propagate.DEFAULT_CONFIG`) and the naive baseline
(:data:`~medseg.predict.propagate.NAIVE_CONFIG`) are run online through
:func:`medseg.predict.propagate.propagate` and timed.

The default was chosen with this script; ``benchmarks/results/propagation*.json`` hold the sweeps
(``propagation.json``: the final one; the others: the earlier carry-over sweeps).

Prints JSON; with ``--out`` also writes it. The walks can be cached (``--walks``) so that a new
stop-rule grid needs no model calls; ``--threads 1`` is much faster on a loaded machine.

    python benchmarks/bench_propagation.py --cache-dir /tmp/prop_cache \
        --carries "box,box|box+points_sim" --walks /tmp/walks.json \
        --out benchmarks/results/propagation.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "pyradiomics"

#: Carry-over configurations tried (name -> PropagationConfig keywords).
CARRIES: dict[str, dict[str, Any]] = {
    "box": {"carry": "box"},
    "box_tight": {"carry": "box", "box_margin": 0.0, "box_margin_px": 1.0},
    "box_wide": {"carry": "box", "box_margin": 0.2, "box_margin_px": 3.0},
    "mask": {"carry": "mask"},
    "box+mask": {"carry": "box+mask"},
    "points": {"carry": "points", "multimask": True},
    "points+neg": {"carry": "points", "negative_points": True},
    "box+points": {"carry": "box+points"},
    "box+points+mask": {"carry": "box+points+mask"},
    "box_mm_iou": {"carry": "box", "multimask": True},
    "box_mm_sim": {"carry": "box", "multimask": True, "select": "similarity"},
    "box|box+points_sim": {"carry": "box", "alternatives": ("box+points",), "select": "similarity"},
    "box|box+points|box+mask_sim": {
        "carry": "box",
        "alternatives": ("box+points", "box+mask"),
        "select": "similarity",
    },
}

#: Stop-rule grid (every combination is evaluated offline).
GRID: dict[str, list[Any]] = {
    "min_iou": [None, 0.5, 0.7, 0.8],
    "min_stability": [None, 0.8],
    "min_similarity": [None, 0.5, 0.6, 0.7, 0.8],
    "max_intensity_shift": [None, 0.1, 0.15, 0.2],
    "area": [None, (0.5, 1.5), (0.33, 3.0)],
    "max_extent": [None, 1.0, 1.5],
    "min_margin": [None, -0.05, 0.0, 0.02, 0.05],
    "patience": [0, 1],
    "consistency": [
        None,
        (0.2, 2.0),
        (0.3, 2.0),
        (0.4, 2.0),
        (0.2, 1.0),
        (0.3, 1.0),
        (0.4, 1.0),
        (0.2, 3.0),
        (0.3, 3.0),
    ],
}

#: Named stop rules reported explicitly (PropagationConfig keywords).
NAMED: dict[str, dict[str, Any]] = {
    "naive_iou0.5": {"min_iou": 0.5},
    "iou0.8": {"min_iou": 0.8},
    "intensity0.1": {"max_intensity_shift": 0.1},
    "similarity0.8": {"min_similarity": 0.8},
    "iou0.8+intensity0.1": {"min_iou": 0.8, "max_intensity_shift": 0.1},
    "iou0.8+similarity0.8": {"min_iou": 0.8, "min_similarity": 0.8},
    "similarity0.6": {"min_similarity": 0.6},
    "consistency0.3w2": {"min_consistency": 0.3, "consistency_weight": 2.0},
    "consistency0.3w2+sim0.5": {"min_consistency": 0.3, "min_similarity": 0.5},
    "default(margin0+shift0.15+extent1.5,patience1)": {
        "min_margin": 0.0,
        "max_intensity_shift": 0.15,
        "max_extent": 1.5,
        "patience": 1,
    },
    "margin0+patience1": {"min_margin": 0.0, "patience": 1},
    "margin0": {"min_margin": 0.0},
    "margin0.05": {"min_margin": 0.05},
    "margin0.05+consistency0.3": {"min_margin": 0.05, "min_consistency": 0.3},
}


def _log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


def real_cases(names: list[str]) -> list[dict[str, Any]]:
    from medseg.io.files import read_labels, read_volume

    out = []
    for c in names:
        vol = read_volume(DATA / f"{c}_image.nrrd")
        gt = read_labels(DATA / f"{c}_label.nrrd", reference=vol)
        out.append({"name": c, "kind": "real", "volume": vol, "gt": gt.array > 0})
    return out


def phantom_cases(seeds: list[int], labels: dict[int, str]) -> list[dict[str, Any]]:
    from scipy import ndimage

    from medseg.phantom import make_phantom

    out = []
    for seed in seeds:
        vol, lm = make_phantom(seed)
        for value, name in labels.items():
            cc, n = ndimage.label(lm.array == value)
            for i in range(1, n + 1):
                obj = cc == i
                if np.count_nonzero(obj.any(axis=(1, 2))) < 2:
                    continue
                out.append(
                    {
                        "name": f"phantom{seed}_{name}{i}",
                        "kind": "phantom",
                        "volume": vol,
                        "gt": obj,
                    }
                )
    return out


def record_walk(pred: Any, gt: np.ndarray, key: Any, carry: dict[str, Any]) -> dict[str, Any]:
    """One unstopped walk: per-slice signals + the intersection/area sums needed for Dice."""
    from medseg.predict.propagate import NO_STOP, PropagationConfig, propagate

    zs = np.flatnonzero(gt.any(axis=(1, 2)))
    horizon = int(max(key.index - zs.min(), zs.max() - key.index)) + 4
    base = {"alternatives": (), "select": "iou", "multimask": False, "patience": 0}
    cfg = PropagationConfig(**{**base, **carry, **NO_STOP, "max_slices": horizon})
    t0 = time.perf_counter()
    res = propagate(pred, [key], cfg)
    secs = time.perf_counter() - t0
    steps = []
    for r in res.records:
        m = res.mask[r.index] if r.accepted else None
        inter = int(np.count_nonzero(m & gt[r.index])) if m is not None else 0
        steps.append(
            {
                **r.to_json(),
                "inter": inter,
                "pred_px": int(np.count_nonzero(m)) if m is not None else 0,
            }
        )
    return {
        "steps": steps,
        "gt_voxels": int(gt.sum()),
        "seconds": secs,
        "visited": len(res.records),
    }


_MIN_DIMS = {
    "min_iou": "iou_pred",
    "min_stability": "stability",
    "min_area_ratio": "area_ratio",
    "min_similarity": "similarity",
    "min_overlap": "overlap",
    "min_margin": "margin",
}
_MAX_DIMS = {
    "max_area_ratio": "area_ratio",
    "max_intensity_shift": "intensity_shift",
    "max_extent": "extent",
}


def dice_for_rules(
    walk: dict[str, Any], rules: list[dict[str, Any]]
) -> tuple[np.ndarray, np.ndarray]:
    """Dice and accepted-slice count of a recorded walk truncated by each rule (vectorised).

    A rule (PropagationConfig stop keywords) cuts each direction at the first step that fails
    one of its checks, as :func:`medseg.predict.propagate.stop_reason` does.
    """
    n = len(rules)
    thr = {
        k: np.array([np.nan if r.get(k) is None else r[k] for r in rules], float)
        for k in (*_MIN_DIMS, *_MAX_DIMS)
    }
    thr_c = np.array(
        [np.nan if r.get("min_consistency") is None else r["min_consistency"] for r in rules], float
    )
    w_c = np.array([r.get("consistency_weight", 2.0) for r in rules], float)
    inter = np.zeros(n)
    pred = np.zeros(n)
    count = np.zeros(n)
    for st in walk["steps"]:
        if st["distance"] == 0 and st["accepted"]:
            inter += st["inter"]
            pred += st["pred_px"]
            count += 1
    patience = np.array([int(r.get("patience") or 0) for r in rules])
    for d in (-1, 1):
        steps = sorted(
            (
                s
                for s in walk["steps"]
                if s["distance"] > 0 and (s["index"] > s["source"]) == (d > 0)
            ),
            key=lambda s: s["distance"],
        )
        alive = np.ones(n, bool)
        p_inter = np.zeros(n)  # doubtful slices waiting for a passing one (patience)
        p_pred = np.zeros(n)
        p_count = np.zeros(n)
        for st in steps:
            hard = not st["accepted"]
            fail = np.full(n, hard)
            for k, sig in _MIN_DIMS.items():
                v = st[sig]
                if v is not None:
                    fail |= ~np.isnan(thr[k]) & (v < np.nan_to_num(thr[k], nan=-np.inf))
            for k, sig in _MAX_DIMS.items():
                v = st[sig] if st[sig] is not None else np.inf
                fail |= ~np.isnan(thr[k]) & (v > np.nan_to_num(thr[k], nan=np.inf))
            fail |= ~np.isnan(thr_c) & (
                (st["similarity"] or 0.0)
                - w_c * (st["intensity_shift"] if st["intensity_shift"] is not None else 1.0)
                < np.nan_to_num(thr_c, nan=-np.inf)
            )
            stop = alive & fail & (hard | (p_count >= patience))
            wait = alive & fail & ~stop
            ok = alive & ~fail
            alive &= ~stop
            p_inter += wait * st["inter"]
            p_pred += wait * st["pred_px"]
            p_count += wait
            inter += ok * (p_inter + st["inter"])
            pred += ok * (p_pred + st["pred_px"])
            count += ok * (p_count + 1)
            p_inter[ok | stop] = 0
            p_pred[ok | stop] = 0
            p_count[ok | stop] = 0
    den = pred + walk["gt_voxels"]
    dice = np.where(den > 0, 2 * inter / np.maximum(den, 1), 1.0)
    return dice, count


def grid_rules() -> list[dict[str, Any]]:
    keys = list(GRID)
    out = []
    for combo in itertools.product(*(GRID[k] for k in keys)):
        rule: dict[str, Any] = {}
        for k, v in zip(keys, combo, strict=True):
            if k == "area":
                rule["min_area_ratio"], rule["max_area_ratio"] = v if v else (None, None)
            elif k == "consistency":
                if v:
                    rule["min_consistency"], rule["consistency_weight"] = v
            else:
                rule[k] = v
        out.append(rule)
    return out


def rule_name(rule: dict[str, Any]) -> str:
    parts = [
        f"{k}={v:g}"
        for k, v in rule.items()
        if v is not None and k not in ("max_slices", "consistency_weight")
    ]
    if rule.get("min_consistency") is not None:
        parts.append(f"consistency_weight={rule.get('consistency_weight', 2.0):g}")
    return ",".join(parts) or "vanish_only"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="lung1,brain1,breast1")
    ap.add_argument("--phantoms", default="0,1,2", help="phantom seeds ('' for none)")
    ap.add_argument("--phantom-labels", default="2=tumour,3=kidney,4=spleen")
    ap.add_argument("--carries", default=",".join(CARRIES))
    ap.add_argument("--margin", type=float, default=3.0, help="box margin px (key and oracle)")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--top", type=int, default=25, help="grid rules listed in the output")
    ap.add_argument(
        "--walks",
        default=None,
        help="JSON file caching recorded walks: reused when present, else written",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 is much faster on a shared, loaded machine)",
    )
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(max(1, args.threads))

    from medseg.predict.propagate import (
        DEFAULT_CONFIG,
        NAIVE_CONFIG,
        box_from_gt,
        dice3d,
        oracle_dice,
        propagate,
    )
    from medseg.predict.sam import VolumePredictor

    labels = {int(k): v for k, v in (p.split("=") for p in args.phantom_labels.split(","))}
    cases = real_cases([c for c in args.cases.split(",") if c])
    seeds = [int(s) for s in args.phantoms.split(",") if s.strip()]
    cases += phantom_cases(seeds, labels)
    carries = [c for c in args.carries.split(",") if c]

    report: dict[str, Any] = {
        "margin_px": args.margin,
        "precision": args.precision,
        "threads": args.threads,
        "cases": {},
        "grid_size": 0,
    }
    walks: dict[str, dict[str, Any]] = {}
    predictors: dict[int, Any] = {}
    saved: dict[str, Any] = {"cases": {}, "walks": {}}
    if args.walks and Path(args.walks).is_file():
        saved = json.loads(Path(args.walks).read_text())
    from medseg.models.sam import get_sam_model

    model = get_sam_model("litemedsam", precision=args.precision)
    report["model"] = {
        "name": "litemedsam",
        "precision": model.precision,
        "weights_sha256": model.weights_sha256,
    }
    for case in cases:
        vol, gt = case["volume"], case["gt"]
        vid = id(vol)
        if vid not in predictors:
            predictors = {vid: VolumePredictor(vol, model, cache_dir=args.cache_dir)}
        pred = predictors[vid]
        t0 = time.perf_counter()
        key = box_from_gt(gt, "z", args.margin)
        cached = case["name"] in saved["cases"] and all(
            f"{case['name']}|{c}" in saved["walks"] for c in carries
        )
        if cached:
            entry = dict(saved["cases"][case["name"]])
            entry["walks"] = {c: entry["walks"][c] for c in carries if c in entry["walks"]}
            for c in carries:
                walks[f"{case['name']}|{c}"] = saved["walks"][f"{case['name']}|{c}"]
            orc_dice = entry["oracle_dice"]
        else:
            orc = oracle_dice(pred, gt, margin_px=args.margin)
            orc_dice = round(orc.dice, 4)
            entry = {
                "kind": case["kind"],
                "gt_slices": [int(i) for i in np.flatnonzero(gt.any((1, 2)))],
                "key_slice": key.index,
                "oracle_dice": orc_dice,
                "oracle_per_slice": orc.per_slice,
                "walks": {},
            }
            for cname in carries:
                w = record_walk(pred, gt, key, CARRIES[cname])
                walks[f"{case['name']}|{cname}"] = w
                entry["walks"][cname] = {
                    "seconds": round(w["seconds"], 3),
                    "visited": w["visited"],
                    "steps": [
                        {
                            k: s[k]
                            for k in (
                                "index",
                                "distance",
                                "accepted",
                                "iou_pred",
                                "stability",
                                "area_px",
                                "area_ratio",
                                "similarity",
                                "intensity_shift",
                                "overlap",
                                "extent",
                                "bg_similarity",
                                "margin",
                                "inter",
                                "pred_px",
                                "stopped",
                            )
                        }
                        for s in w["steps"]
                    ],
                }
        # online runs: the default config and the naive baseline, end to end
        entry["online"] = {}
        for oname, cfg in (("default", DEFAULT_CONFIG), ("naive", NAIVE_CONFIG)):
            t1 = time.perf_counter()
            res = propagate(pred, [key], cfg)
            d = dice3d(res.mask, gt)
            entry["online"][oname] = {
                "dice": round(d, 4),
                "ratio": round(d / orc_dice, 4) if orc_dice else None,
                "slices": res.slices,
                "visited": len(res.records),
                "seconds": round(time.perf_counter() - t1, 3),
                "stopped": [r.stopped for r in res.records if r.stopped],
            }
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        report["cases"][case["name"]] = entry
        _log(case["name"], "oracle", orc_dice, {k: v["dice"] for k, v in entry["online"].items()})

    if args.walks:
        saved["cases"].update(report["cases"])
        saved["walks"].update(walks)
        Path(args.walks).write_text(json.dumps(saved))

    # ---------------------------------------------------------------- offline stop-rule grid
    rules = grid_rules()
    report["grid_size"] = len(rules) * len(carries)
    names = [c["name"] for c in cases]
    real = [c["name"] for c in cases if c["kind"] == "real"]
    phan = [c["name"] for c in cases if c["kind"] == "phantom"]
    table = []
    for cname in carries:
        ratios_all = {}
        for n in names:
            d, _ = dice_for_rules(walks[f"{n}|{cname}"], rules)
            o = report["cases"][n]["oracle_dice"]
            ratios_all[n] = d / o if o else np.zeros_like(d)
        mat = np.stack([ratios_all[n] for n in names])  # (cases, rules)
        ri = [names.index(n) for n in real]
        pi = [names.index(n) for n in phan]
        for j, rule in enumerate(rules):
            table.append(
                {
                    "carry": cname,
                    "rule": rule_name(rule),
                    "real_min": float(mat[ri, j].min()) if ri else None,
                    "real_mean": float(mat[ri, j].mean()) if ri else None,
                    "phantom_mean": float(mat[pi, j].mean()) if pi else None,
                    "phantom_min": float(mat[pi, j].min()) if pi else None,
                    "ratios": {n: round(float(mat[i, j]), 4) for i, n in enumerate(names)},
                }
            )

    def score(row: dict[str, Any]) -> tuple[float, float]:
        rm = row["real_min"] if row["real_min"] is not None else 1.0
        pm = row["phantom_mean"] if row["phantom_mean"] is not None else 1.0
        return (min(rm, 0.8) + min(pm, 0.8), (rm + pm))

    table.sort(key=score, reverse=True)
    report["grid_top"] = [
        {
            **r,
            "real_min": _r(r["real_min"]),
            "real_mean": _r(r["real_mean"]),
            "phantom_mean": _r(r["phantom_mean"]),
            "phantom_min": _r(r["phantom_min"]),
        }
        for r in table[: args.top]
    ]
    # named rules × carries
    named = {}
    named_rules = list(NAMED.values())
    for cname in carries:
        per = {n: dice_for_rules(walks[f"{n}|{cname}"], named_rules) for n in names}
        for j, rname in enumerate(NAMED):
            row = {}
            for n in names:
                d, k = per[n][0][j], per[n][1][j]
                o = report["cases"][n]["oracle_dice"]
                row[n] = {
                    "dice": round(float(d), 4),
                    "ratio": round(float(d / o), 4) if o else None,
                    "slices": int(k),
                }
            named[f"{cname}|{rname}"] = row
    report["named"] = named
    # best rule per carry (same scoring)
    best: dict[str, Any] = {}
    for row in table:
        if row["carry"] not in best:
            best[row["carry"]] = {k: row[k] for k in ("rule", "ratios")} | {
                "real_min": _r(row["real_min"]),
                "phantom_mean": _r(row["phantom_mean"]),
            }
    report["best_per_carry"] = best
    report["default_config"] = DEFAULT_CONFIG.to_json()
    report["summary"] = summarise(report)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    _ = replace
    return 0


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """Per case: oracle Dice, default and naive 3D Dice and ratio; means per kind."""
    rows = {}
    for name, c in report["cases"].items():
        on = c["online"]
        rows[name] = {
            "kind": c["kind"],
            "oracle_dice": c["oracle_dice"],
            "default_dice": on["default"]["dice"],
            "default_ratio": on["default"]["ratio"],
            "default_slices": on["default"]["slices"],
            "gt_slices": c["gt_slices"],
            "naive_dice": on["naive"]["dice"],
            "naive_ratio": on["naive"]["ratio"],
            "default_seconds": on["default"]["seconds"],
        }
    out: dict[str, Any] = {"cases": rows}
    for kind in ("real", "phantom"):
        rs = [r for r in rows.values() if r["kind"] == kind]
        if rs:
            out[f"{kind}_default_ratio_min"] = min(r["default_ratio"] for r in rs)
            out[f"{kind}_default_ratio_mean"] = round(
                float(np.mean([r["default_ratio"] for r in rs])), 4
            )
            out[f"{kind}_naive_ratio_mean"] = round(
                float(np.mean([r["naive_ratio"] for r in rs])), 4
            )
    out["bar_met"] = all(r["default_ratio"] >= 0.8 for r in rows.values() if r["kind"] == "real")
    return out


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


if __name__ == "__main__":
    sys.exit(main())
