"""Start-up benchmark: interpreter start → LiteMedSAM ready to embed, as a whole new process.

Each run is a fresh ``python -c`` that imports medseg, loads the model the way ``medseg segment``
does (``get_sam_model("litemedsam", precision="auto")``) and prints where the time went, with the
heavy modules it imported. ``--src`` names one or more source trees to compare (e.g. the tree
before a change, unpacked with ``git archive``); runs are interleaved (A B A B ...) and summarised
by their median, with the load average before and after, because the machine may be shared.
Each process gets a fresh ``MEDSEG_HOME`` except in the ``warm`` rows, which reuse one (so the
weights digest cache, when there is one, is warm).

Run: ``.venv/bin/python benchmarks/bench_startup.py [--src SRC ...] [--reps 5] [--out X.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import time, sys
t_import = time.perf_counter()
import medseg
from medseg.models.sam import get_sam_model
t_load = time.perf_counter()
m = get_sam_model("litemedsam", precision="auto")
t_ready = time.perf_counter()
import json
print(json.dumps({
    "import_s": t_load - t_import,
    "load_s": t_ready - t_load,
    "heavy": [k for k in ("torchvision", "torch._dynamo", "timm.layers._fx") if k in sys.modules],
}))
"""


def _run(src: Path, home: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(src), "MEDSEG_HOME": str(home), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True
    )
    wall = time.perf_counter() - t0
    row = json.loads(out.stdout.strip().splitlines()[-1])
    row["wall_s"] = wall
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", nargs="+", type=Path, default=[REPO / "src"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    load_before = [round(v, 2) for v in os.getloadavg()]
    rows: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        warm_homes = {}
        for i, src in enumerate(args.src):
            warm_homes[i] = Path(tmp) / f"warm{i}"
            _run(src, warm_homes[i])  # fills the warm home (digest cache) and the OS page cache
        for r in range(args.reps):
            for i, src in enumerate(args.src):
                cold = Path(tmp) / f"cold{i}_{r}"
                rows.setdefault(f"{src}:cold", []).append(_run(src, cold))
                rows.setdefault(f"{src}:warm", []).append(_run(src, warm_homes[i]))
    summary = {
        key: {
            **{
                k: round(statistics.median(r[k] for r in runs), 3)
                for k in ("wall_s", "import_s", "load_s")
            },
            "heavy_modules": runs[0]["heavy"],
        }
        for key, runs in rows.items()
    }
    doc = {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "reps": args.reps,
        "load_before": load_before,
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "results": summary,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
