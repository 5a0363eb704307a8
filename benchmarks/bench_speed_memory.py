"""Big-volume propagation: wall time and peak RSS of ``medseg segment`` on a 400x512x512 CT.

Issue 14's memory goal: the liver of a synthetic 400x512x512 CT (``medseg phantom --shape
400,512,512``, label 1) propagated from one box (``--box-from-gt``, no ``--gt``: no oracle, no
metrics), peak RSS <= 2 GB. The phantom is made once (``--phantom-dir``; ~6 min and 5.5 GB here)
and reused. Each run is a fresh process; ``cold`` starts from an empty embedding cache, ``warm``
runs again on the cache it left. Peak RSS is the child's ``ru_maxrss``.

    python benchmarks/bench_speed_memory.py --phantom-dir /tmp/big_phantom \\
        --out benchmarks/results/speed_memory.json
    # the same with another checkout's source (before/after):
    python benchmarks/bench_speed_memory.py --phantom-dir /tmp/big_phantom --src OLD/src
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
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _run(cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` in a child (through a one-shot wrapper so its own ru_maxrss is reported)."""
    wrapper = (
        "import resource, subprocess, sys, json, time; t = time.perf_counter(); "
        "rc = subprocess.run(sys.argv[1:]).returncode; "
        "u = resource.getrusage(resource.RUSAGE_CHILDREN); "
        "print(json.dumps({'rc': rc, 'wall_s': time.perf_counter() - t, "
        "'peak_rss_mb': u.ru_maxrss / 1024}))"
    )
    load = os.getloadavg()[0]
    out = subprocess.run(
        [sys.executable, "-c", wrapper, *cmd], env=env, capture_output=True, text=True
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(out.stderr[-2000:])
    res["load"] = [load, os.getloadavg()[0]]
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--phantom-dir", type=Path, required=True, help="made here when missing")
    ap.add_argument("--threads", default="1")
    ap.add_argument("--src", type=Path, default=REPO / "src", help="medseg source tree to run")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    env = dict(os.environ)
    src = str(args.src)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MEDSEG_THREADS"] = env["OMP_NUM_THREADS"] = str(args.threads)
    py = sys.executable
    image = args.phantom_dir / "imagesTr" / "phantom_000.nii.gz"
    labels = args.phantom_dir / "labelsTr" / "phantom_000.nii.gz"
    report: dict[str, Any] = {
        "threads": args.threads,
        "src": str(args.src),
        "load_before": os.getloadavg(),
    }
    if not image.exists():
        t0 = time.perf_counter()
        cmd = [py, "-m", "medseg", "phantom", str(args.phantom_dir), "--shape", "400,512,512"]
        subprocess.run([*cmd, "--quiet"], env=env, check=True)
        report["phantom_s"] = round(time.perf_counter() - t0, 1)
    with tempfile.TemporaryDirectory(prefix="medseg-mem-") as tmp:
        env["MEDSEG_HOME"] = tmp
        rep = Path(tmp) / "report.json"
        cmd = [py, "-m", "medseg", "segment", str(image), "--box-from-gt", str(labels)]
        cmd += ["--label", "1", "--json", str(rep), "--overwrite", "--quiet"]
        for kind in ("cold", "warm"):
            res = _run(cmd, env)
            r = json.loads(rep.read_text())
            res["timings"] = r["timings"]
            res["encoder_calls"] = r["sam"]["cache"]["encoder_calls"]
            res["decoder_calls"] = r["sam"]["cache"]["decoder_calls"]
            res["slices"] = len(r["sam"]["propagation"]["slices"])
            res["voxels"] = r["labels"][0]["voxels"]
            report[kind] = res
            print(kind, json.dumps(res), file=sys.stderr, flush=True)
    report["load_after"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
