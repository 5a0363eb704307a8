"""Time U-Net sliding-window inference on a large CT-sized volume and measure its peak memory.

The volume is synthetic (int16 HU: air, a body ellipse of soft tissue with a liver-like and a
hypodense blob, Gaussian noise), ``--shape`` 300 x 512 x 512 (z, y, x) by default with a typical
abdominal CT spacing ``--spacing 1,0.75,0.75`` mm. The whole path is timed:
``UNetSegmenter.segment`` = intensity mapping + resampling to the model's spacing + sliding window
(Gaussian blending, overlap 0.25) + probabilities back to the image grid + argmax.

Peak memory: the process's high-water mark (``VmHWM``) is reset after the volume and the model are
in memory (``/proc/self/clear_refs``), so ``peak_rss_gb`` is the peak during segmentation with
the input already held, and ``segment_extra_gb`` is that peak minus the RSS before it.
Interleaved repeats report every run; the load average says how busy the shared CPU was.

Usage::

    python benchmarks/bench_unet.py [--model unet-demo] [--repeat 2] [--precision auto]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def _status(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 2**20  # kB -> GB
    return float("nan")


def synthetic_ct(shape: tuple[int, int, int], spacing: tuple[float, float, float]):
    """A cheap CT-like int16 volume (z, y, x) in HU."""
    import numpy as np

    from medseg.volume import Volume

    nz, ny, nx = shape
    rng = np.random.default_rng(0)
    y = (np.arange(ny) - ny / 2)[:, None] * spacing[1]
    x = (np.arange(nx) - nx / 2)[None, :] * spacing[2]
    body = (x / 170.0) ** 2 + (y / 120.0) ** 2 <= 1.0
    liver = ((x + 60) / 80.0) ** 2 + ((y + 10) / 60.0) ** 2 <= 1.0
    arr = np.full(shape, -1000, dtype=np.int16)
    for k in range(nz):
        sl = arr[k]
        sl[body] = 35
        if 0.2 < k / nz < 0.8:
            sl[liver] = 60
            r = ((x + 60) / 15.0) ** 2 + ((y + 10) / 15.0) ** 2 <= 1.0
            sl[r] = 20
        sl += rng.normal(0, 12, size=sl.shape).astype(np.int16)
    return Volume(arr, spacing=spacing, origin=(0.0, 0.0, 0.0), meta={"modality": "CT"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="unet-demo")
    ap.add_argument("--shape", default="300,512,512", help="Z,Y,X voxels")
    ap.add_argument("--spacing", default="1,0.75,0.75", help="Z,Y,X mm")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--precision", default="auto", help="auto | fp32 | bf16")
    ap.add_argument("--overlap", type=float, default=0.25)
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    args = ap.parse_args()

    import torch

    from medseg.predict.unet import UNetSegmenter
    from medseg.preprocess import model_grid_shape
    from medseg.runtime import configure_threads

    if args.threads:
        configure_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split(","))
    spacing = tuple(float(v) for v in args.spacing.split(","))
    t0 = time.perf_counter()
    vol = synthetic_ct(shape, spacing)  # type: ignore[arg-type]
    make_s = time.perf_counter() - t0
    seg = UNetSegmenter.load(args.model, precision=args.precision)
    grid = model_grid_shape(shape, spacing, tuple(seg.config["target_spacing"]))
    runs = []
    for _ in range(args.repeat):
        rss0 = _status("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")  # reset the high-water mark
        except OSError:
            pass
        load0 = os.getloadavg()[0]
        t = time.perf_counter()
        lm = seg.segment(vol, overlap=args.overlap)
        dt = time.perf_counter() - t
        runs.append(
            {
                "seconds": round(dt, 2),
                "rss_before_gb": round(rss0, 3),
                "peak_rss_gb": round(_status("VmHWM"), 3),
                "segment_extra_gb": round(_status("VmHWM") - rss0, 3),
                "loadavg_1min_before": round(load0, 2),
            }
        )
        del lm
    print(
        json.dumps(
            {
                "shape_zyx": shape,
                "spacing_zyx_mm": spacing,
                "model": args.model,
                "model_spacing": seg.config["target_spacing"],
                "model_grid": grid,
                "patch": seg.config["patch_size"],
                "precision": seg.precision,
                "threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count(),
                "overlap": args.overlap,
                "input_gb": round(vol.array.nbytes / 2**30, 3),
                "make_volume_s": round(make_s, 1),
                "runs": runs,
                "best_seconds": min(r["seconds"] for r in runs),
                "max_peak_rss_gb": max(r["peak_rss_gb"] for r in runs),
                "ru_maxrss_gb_whole_process": round(
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3
                ),
                "loadavg_after": [round(v, 2) for v in os.getloadavg()],
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
