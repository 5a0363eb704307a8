"""Mask decoder: time per call (stock vs fast) and decoder calls per slice vs 3D Dice.

Two sections, both with LiteMedSAM's real weights:

* ``per_call``: one box (and box + point) prompt on a real lung1 embedding, interleaved repeats
  of the stock segment-anything decoder (fp32), the previous fast path (SDPA + channels-last
  upscaling, ``--no-memo`` style: ``predict_masks`` unpatched) and the current fast path
  (first-block image side memoised per embedding, ...). Medians of wall and thread-CPU ms, and
  the largest logit difference / differing mask pixels against stock.
* ``calls``: :func:`medseg.predict.propagate.propagate` from the standard key box
  (``box_from_gt``, 3 px) on the real cases and the objects of seeded phantoms, default
  configuration with ``alternatives_below`` = each value of ``--below`` (``none`` = always try
  the alternative, as before): 3D Dice against the truth and decoder calls per visited slice.
  The embeddings are computed once per case and shared by every setting.

    python benchmarks/bench_speed_decoder.py --out benchmarks/results/speed_decoder.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def per_call(model: Any, reps: int) -> dict[str, Any]:
    import torch
    from bench_propagation import real_cases

    from medseg.models import accelerated as fast
    from medseg.predict.sam import VolumePredictor

    case = real_cases(["lung1"])[0]
    pred = VolumePredictor(case["volume"], model)
    emb = pred.embed(33)
    box = torch.tensor([[171.0, 100.0, 186.0, 117.0]])
    pts = (torch.tensor([[[178.0, 108.0]]]), torch.tensor([[1]]))
    variants = {
        "stock": lambda: fast.restore(model, keep_cache=True),
        "fast_before": lambda: (
            fast.accelerate(model, model.precision),
            model.mask_decoder.__dict__.pop("predict_masks"),
        ),
        "fast": lambda: fast.accelerate(model, model.precision),
    }
    out: dict[str, Any] = {}
    for pname, kw in {"box": {"points": None}, "box+point": {"points": pts}}.items():
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        logits: dict[str, Any] = {}
        for _ in range(reps):
            for name, setup in variants.items():
                setup()
                with torch.inference_mode():
                    sparse, dense = model.prompt_encoder(boxes=box, masks=None, **kw)
                    pe = model.prompt_encoder.get_dense_pe()
                    t0, c0 = time.perf_counter(), time.thread_time()
                    low, _ = model.mask_decoder(
                        image_embeddings=torch.from_numpy(emb.numpy()),
                        image_pe=pe,
                        sparse_prompt_embeddings=sparse,
                        dense_prompt_embeddings=dense,
                        multimask_output=False,
                    )
                    times[name].append((time.perf_counter() - t0, time.thread_time() - c0))
                logits[name] = low
        fast.accelerate(model, model.precision)
        res = {}
        for name, ts in times.items():
            ts = ts[1:]  # the first round warms up
            res[name] = {
                "wall_ms": round(1000 * statistics.median(t[0] for t in ts), 1),
                "cpu_ms": round(1000 * statistics.median(t[1] for t in ts), 1),
                "max_abs_logit_vs_stock": float((logits[name] - logits["stock"]).abs().max()),
                "mask_px_differing_vs_stock": int(
                    ((logits[name] > 0) != (logits["stock"] > 0)).sum()
                ),
            }
        out[pname] = res
    return out


def calls(model: Any, below: list[float | None], phantoms: list[int]) -> dict[str, Any]:
    from bench_propagation import phantom_cases, real_cases

    from medseg.predict.propagate import DEFAULT_CONFIG, box_from_gt, dice3d, propagate
    from medseg.predict.sam import VolumePredictor

    cases = real_cases(["lung1", "brain1", "breast1"])
    cases += phantom_cases(phantoms, {2: "tumour", 3: "kidney", 4: "spleen"})
    out: dict[str, Any] = {}
    preds: dict[int, Any] = {}
    for case in cases:
        vid = id(case["volume"])
        if vid not in preds:
            preds[vid] = VolumePredictor(case["volume"], model)
        pred = preds[vid]
        key = box_from_gt(case["gt"], "z", 3.0)
        row: dict[str, Any] = {}
        for b in below:
            cfg = replace(DEFAULT_CONFIG, alternatives_below=b)
            d0 = pred.decoder_calls
            t0 = time.perf_counter()
            res = propagate(pred, [key], cfg)
            secs = time.perf_counter() - t0
            visited = len(res.records)
            n = pred.decoder_calls - d0
            row[str(b).lower()] = {
                "dice": round(dice3d(res.mask, case["gt"]), 4),
                "decoder_calls": n,
                "slices_visited": visited,
                "calls_per_slice": round(n / max(1, visited), 3),
                "seconds": round(secs, 2),
            }
        out[case["name"]] = row
        print(case["name"], json.dumps(row), file=sys.stderr, flush=True)
    summary: dict[str, Any] = {}
    for b in below:
        k = str(b).lower()
        dices = [r[k]["dice"] for r in out.values()]
        base = (
            [r["none"]["dice"] for r in out.values()]
            if "none" in next(iter(out.values()))
            else dices
        )
        summary[k] = {
            "mean_dice": round(float(np.mean(dices)), 4),
            "max_drop_vs_first": round(max(b0 - d for b0, d in zip(base, dices, strict=True)), 4),
            "decoder_calls": sum(r[k]["decoder_calls"] for r in out.values()),
            "slices_visited": sum(r[k]["slices_visited"] for r in out.values()),
        }
    return {"cases": out, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--below", default="none,0.95,0.9,0.85,0.8")
    ap.add_argument("--phantoms", default="0,1,2")
    ap.add_argument("--skip", default="", help="per_call and/or calls")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)

    import torch

    from medseg.models.sam import load_sam_model

    torch.set_num_threads(args.threads)
    model = load_sam_model("litemedsam", precision="auto")
    report: dict[str, Any] = {
        "threads": args.threads,
        "precision": model.precision,
        "load_before": os.getloadavg(),
    }
    if "per_call" not in args.skip:
        report["per_call"] = per_call(model, args.reps)
    if "calls" not in args.skip:
        below = [None if b == "none" else float(b) for b in args.below.split(",")]
        seeds = [int(s) for s in args.phantoms.split(",") if s.strip()]
        report["calls"] = calls(model, below, seeds)
    report["load_after"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
