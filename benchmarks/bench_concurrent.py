"""Several ``medseg segment`` runs at once on one machine: wall time per run.

Starts ``--procs`` copies of ``medseg segment IMAGE --box-from-gt LABEL`` together (each with its
own embedding cache and output, one shared ``MEDSEG_HOME`` as for one user), for each ``--src``
tree in turn, and reports each run's wall seconds, with the load average before and after.
``MEDSEG_THREADS`` and ``OMP_NUM_THREADS`` are removed from the children's environment so the
default thread choice is what is measured.

Run: ``.venv/bin/python benchmarks/bench_concurrent.py IMAGE LABEL [--src SRC ...] [--procs 4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _batch(src: Path, image: Path, label: Path, procs: int, tmp: Path) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in {"MEDSEG_THREADS", "OMP_NUM_THREADS"}}
    env.update(PYTHONPATH=str(src), MEDSEG_HOME=str(tmp / "home"))
    runs = []
    t0 = time.perf_counter()
    for i in range(procs):
        out = tmp / f"p{i}.nii.gz"
        cmd = [sys.executable, "-m", "medseg", "segment", str(image), "--box-from-gt", str(label)]
        cmd += ["--out", str(out), "--overwrite", "--cache-dir", str(tmp / f"c{i}"), "--quiet"]
        runs.append(
            (subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL), out, time.perf_counter())
        )
    walls = []
    for p, _out, start in runs:
        if p.wait() != 0:
            raise SystemExit(f"medseg segment failed under {src}")
        walls.append(round(time.perf_counter() - start, 2))
    return {"wall_s": walls, "batch_s": round(time.perf_counter() - t0, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("image", type=Path)
    ap.add_argument("label", type=Path)
    ap.add_argument("--src", nargs="+", type=Path, default=[REPO / "src"])
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    doc: dict[str, object] = {"cpus": os.cpu_count(), "procs": args.procs}
    doc["load_before"] = [round(v, 2) for v in os.getloadavg()]
    for src in args.src:
        with tempfile.TemporaryDirectory() as tmp:
            doc[str(src)] = _batch(src, args.image, args.label, args.procs, Path(tmp))
    doc["load_after"] = [round(v, 2) for v in os.getloadavg()]
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
