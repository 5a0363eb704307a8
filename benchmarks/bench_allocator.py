"""glibc allocator tuning (:func:`medseg.runtime.tune_allocator`) on the LiteMedSAM encoder.

The setting is process-wide, so each measurement is a fresh process: ``MEDSEG_MALLOC_TUNE=0``
(glibc defaults) and ``=1`` (tuned), interleaved (A B A B ...). Each process loads LiteMedSAM
(packaged weights, ``precision="auto"``, the accelerated forward), embeds ``--calls`` random
256x256 slices one at a time, and reports the median seconds per call after two warm-up calls
and its peak RSS. Summaries are medians over ``--reps`` processes; load average before/after.

Run: ``.venv/bin/python benchmarks/bench_allocator.py [--reps 3] [--calls 8] [--out X.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

CHILD = r"""
import json, resource, statistics, sys, time
import torch
from medseg.runtime import tune_allocator
tuned = tune_allocator()
from medseg.models.sam import get_sam_model
m = get_sam_model("litemedsam", precision="auto")
g = torch.Generator().manual_seed(0)
x = torch.randn(int(sys.argv[1]) + 2, 1, 3, 256, 256, generator=g)
times = []
for i in range(x.shape[0]):
    t = time.perf_counter()
    m.encode(x[i])
    times.append(time.perf_counter() - t)
print(json.dumps({"tuned": tuned, "precision": m.precision, "threads": torch.get_num_threads(),
                  "s_per_call": statistics.median(times[2:]),
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def _run(tune: str, calls: int) -> dict[str, Any]:
    env = {**os.environ, "MEDSEG_MALLOC_TUNE": tune}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(calls)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--calls", type=int, default=8)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    load_before = [round(v, 2) for v in os.getloadavg()]
    runs: dict[str, list[dict[str, Any]]] = {"glibc_default": [], "tuned": []}
    for _ in range(args.reps):
        runs["glibc_default"].append(_run("0", args.calls))
        runs["tuned"].append(_run("1", args.calls))
    summary = {
        k: {
            "s_per_call": round(statistics.median(r["s_per_call"] for r in v), 4),
            "peak_rss_mb": round(statistics.median(r["peak_rss_mb"] for r in v), 1),
            "all_s_per_call": [round(r["s_per_call"], 4) for r in v],
            "tuned": v[0]["tuned"],
            "precision": v[0]["precision"],
            "threads": v[0]["threads"],
        }
        for k, v in runs.items()
    }
    doc = {
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "reps": args.reps,
        "calls": args.calls,
        "load_before": load_before,
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "results": summary,
        "speedup": round(
            summary["glibc_default"]["s_per_call"] / summary["tuned"]["s_per_call"], 3
        ),
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
