"""napari SAM panel: seconds from the user's first box to the first mask (under Xvfb).

Each mode runs in a fresh process (no model loaded, empty embedding cache): open a real case
(``--case``, default lung1) in a viewer, dock the Interactive SAM panel, add its prompt layers,
leave the panel open ``--idle`` seconds, then draw one box on the tumour's largest slice and

* ``click_now``: press "Segment slice" at once;
* ``click_after``: press it ``--think`` seconds after the box (a user checking the box first).

The panel loads the model and embeds the current slice in the background when its prompt layers
are added (and embeds again when a box is drawn on a slice not embedded yet); before that
(``--src`` on an older checkout) the model load + embedding + decoder all ran after the click.

Reported per mode: seconds from the box to the mask on screen (the proposal layer), whether the
background embedding ran, the encoder calls. Prints JSON (``--out`` also writes it).

    python benchmarks/bench_speed_napari.py --out benchmarks/results/speed_napari.json
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
DATA = REPO.parent / "shared" / "data" / "pyradiomics"


def worker(case: str, mode: str, idle: float, think: float) -> dict[str, Any]:
    """One GUI session (runs in its own process)."""
    import numpy as np

    from medseg._napari._xvfb import ensure_display

    ensure_display()
    import napari
    from qtpy.QtWidgets import QApplication

    from medseg._napari._common import goto_slice

    def pump(seconds: float, until: Any = None) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            QApplication.processEvents()
            if until is not None and until():
                return
            time.sleep(0.005)

    viewer = napari.Viewer(show=True)
    [img] = viewer.open(str(DATA / f"{case}_image.nrrd"), plugin="medseg")
    [gt_layer] = viewer.open(str(DATA / f"{case}_label.nrrd"), plugin="medseg")
    gt = np.asarray(gt_layer.data) > 0
    z = int(np.argmax(gt.reshape(gt.shape[0], -1).sum(1)))
    _, sam = viewer.window.add_plugin_dock_widget("medseg", "Interactive SAM")
    sam.reset_choices()
    sam._image.value = img
    goto_slice(viewer, img, z)
    sam.add_prompt_layers()
    pump(idle)
    rr, cc = np.nonzero(gt[z])
    rect = np.array(
        [[z, rr.min(), cc.min()], [z, rr.min(), cc.max()], [z, rr.max(), cc.max()],
         [z, rr.max(), cc.min()]],
        dtype=float,
    )  # fmt: skip
    t0 = time.perf_counter()
    sam._shapes.value.add_rectangles(rect)
    prefetch = getattr(sam, "prefetch", None)  # absent before issue 14's background embedding
    prefetch_started = bool(prefetch is not None and prefetch.busy)
    if mode == "click_after":
        pump(think)
    sam.segment_slice()
    if not sam.job.busy and sam.proposal is None:
        raise RuntimeError(f"segment_slice did not start: {sam.job.last_error}")
    pump(600, until=lambda: not sam.job.busy and sam.proposal is not None)
    seconds = time.perf_counter() - t0
    out = {
        "mode": mode,
        "box_to_mask_s": round(seconds, 3),
        "prefetch_started": prefetch_started,
        "encoder_calls": sam.predictor.encoder_calls,
        "mask_px": int(sam.proposal.mask[z].sum()),
        "error": sam.job.last_error,
    }
    viewer.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="lung1")
    ap.add_argument("--idle", type=float, default=3.0, help="panel open this long before the box")
    ap.add_argument("--think", type=float, default=1.0, help="click_after: box to button")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", default="1")
    ap.add_argument("--src", type=Path, default=REPO / "src", help="medseg source tree to run")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.case, args.worker, args.idle, args.think)))
        return 0
    env = dict(os.environ)
    src = str(args.src)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["MEDSEG_THREADS"] = env["OMP_NUM_THREADS"] = str(args.threads)
    runs: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        for mode in ("click_now", "click_after"):
            with tempfile.TemporaryDirectory(prefix="medseg-napari-") as home:
                env["MEDSEG_HOME"] = home
                load = os.getloadavg()[0]
                cmd = [sys.executable, __file__, "--worker", mode, "--case", args.case]
                cmd += ["--idle", str(args.idle), "--think", str(args.think)]
                p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
                if p.returncode != 0:
                    raise RuntimeError(p.stderr[-3000:])
                res = json.loads(p.stdout.strip().splitlines()[-1])
                res["load"] = [load, os.getloadavg()[0]]
                runs.append(res)
                print(json.dumps(res), file=sys.stderr, flush=True)
    report = {
        "case": args.case,
        "src": str(args.src),
        "idle_s": args.idle,
        "think_s": args.think,
        "runs": runs,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
