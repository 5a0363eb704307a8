"""SAM 2 speed on this CPU: seconds per slice of hiera-tiny propagation (fp32, bf16) vs LiteMedSAM.

No SAM 2 weights can be downloaded here, so hiera-tiny is built at its real size (1024x1024
frames, the official configuration) with seeded random weights, saved in Meta's checkpoint layout
and loaded through medseg's path; its object-score head is biased so the walk never stops early
(speed does not depend on the weight values). On the real MR brain1 (25 x 256 x 256) one box from
the label on its largest slice (14) is propagated ``--max-slices`` (default 4) slices up and down
with ``medseg.segment`` (9 slices; SAM 2's memory holds 7 frames, so the last slices run at the
steady-state cost):

* ``sam2.1_hiera_tiny`` fp32 and bf16 (memory attention, one image-encoder run per slice);
* ``litemedsam`` (the slice loop, default configuration; its own default precision and fp32).

Each run is a fresh subprocess (peak RSS per run from ``getrusage``). ``--ct-slices N`` adds a
synthetic 512 x 512 x N CT run (hiera-tiny fp32, same walk length) to measure memory with a
CT-sized volume in memory (the model state is bounded to a window of frames, so a longer walk
adds at most that window, see the README).
Records the load average before/after (other engineers share the CPU). Prints JSON.

    python benchmarks/bench_sam2.py --out benchmarks/results/sam2.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "pyradiomics"


def make_checkpoint(path: Path) -> None:
    """Seeded random hiera-tiny weights in Meta's layout (``{"model": state_dict}``)."""
    import torch

    from medseg.models.sam2 import build_sam2_model

    torch.manual_seed(0)
    net = build_sam2_model("sam2.1_hiera_tiny")
    state = {k: v.clone() for k, v in net.state_dict().items()}
    state["sam_mask_decoder.pred_obj_score_head.layers.2.bias"].fill_(10.0)
    torch.save({"model": state}, path)


def one_run(
    model: str, precision: str, weights: str | None, threads: int, ct: int, reach: int
) -> dict:
    """One segmentation in this process (called in a child)."""
    import resource
    import time

    import numpy as np
    import torch

    import medseg
    from medseg.io import read_labels, read_volume
    from medseg.predict.propagate import box_from_gt
    from medseg.volume import Volume

    torch.set_num_threads(threads)
    if ct:
        rng = np.random.default_rng(0)
        arr = rng.normal(40, 20, (ct, 512, 512)).astype(np.int16)
        arr[:, :, :60] = -1000
        arr[:, 200:300, 220:330] += 80
        image = Volume(arr, spacing=(1.5, 0.8, 0.8), meta={"modality": "CT"})
        box = medseg.Box(z=ct // 2, y0=195, x0=215, y1=305, x1=335)
    else:
        image = read_volume(DATA / "brain1_image.nrrd")
        gt = read_labels(DATA / "brain1_label.nrrd").array > 0
        kp = box_from_gt(gt, "z", 3)
        r0, c0, r1, c1 = kp.box_rc
        box = medseg.Box(z=kp.index, y0=r0, x0=c0, y1=r1, x1=c1)
    from medseg.predict.propagate import PropagationConfig
    from medseg.predict.sam2 import Sam2Config

    # both engines walk the whole volume (no early stop) so seconds per slice compare
    if model == "litemedsam":
        cfg: Any = PropagationConfig(
            max_intensity_shift=None, max_extent=None, min_margin=None, max_slices=reach
        )
    else:
        cfg = Sam2Config(max_slices=reach)
    t0 = time.perf_counter()
    seg = medseg.segment(
        image,
        model=model,
        prompts=box,
        weights=weights,
        precision=precision,
        device="cpu",
        config=cfg,
        cache_dir=None,
    )
    seconds = time.perf_counter() - t0
    detail = seg.report[seg.report["engine"]]
    visited = len({r["index"] for r in detail["propagation"]["records"]})
    return {
        "model": model,
        "precision": seg.report["model"]["precision"],
        "image": list(image.shape),
        "slices_visited": visited,
        "seconds": round(seconds, 2),
        "segment_s": seg.report["timings"]["segment_s"],
        "model_load_s": seg.report["timings"]["model_load_s"],
        "s_per_slice": round(seg.report["timings"]["segment_s"] / max(1, visited), 3),
        "voxels": int(seg.labels.array.astype(bool).sum()),
        "cache": detail["cache"],
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ct-slices", type=int, default=0)
    ap.add_argument("--max-slices", type=int, default=4)
    ap.add_argument(
        "--runs",
        default="sam2-fp32,sam2-bf16,lite-auto,lite-fp32",
        help="comma-separated runs in order (repeat runs to interleave: sam2-bf16,sam2-fp32)",
    )
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        model, precision, weights, ct = json.loads(args.child)
        rec = one_run(model, precision, weights, args.threads, ct, args.max_slices)
        print(json.dumps(rec))
        return 0

    report: dict[str, Any] = {"threads": args.threads, "max_slices": args.max_slices}
    report.update(load_before=os.getloadavg(), runs=[])
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "sam2.1_hiera_tiny.pt"
        make_checkpoint(ckpt)
        known = {
            "sam2-fp32": ("sam2.1_hiera_tiny", "fp32", str(ckpt), 0),
            "sam2-bf16": ("sam2.1_hiera_tiny", "bf16", str(ckpt), 0),
            "lite-auto": ("litemedsam", "auto", None, 0),
            "lite-fp32": ("litemedsam", "fp32", None, 0),
        }
        runs = [known[r.strip()] for r in args.runs.split(",") if r.strip()]
        if args.ct_slices:
            runs.append(("sam2.1_hiera_tiny", "fp32", str(ckpt), args.ct_slices))
        for run in runs:
            cmd = [sys.executable, __file__, "--threads", str(args.threads)]
            cmd += ["--max-slices", str(args.max_slices)]
            cmd += ["--child", json.dumps(run)]
            env = {**os.environ, "TQDM_DISABLE": "1"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            rec["load_after"] = os.getloadavg()
            print(json.dumps(rec), file=sys.stderr)
            report["runs"].append(rec)
    report["load_after"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
