"""Runtime choice for the LiteMedSAM image encoder (issue 14): torch vs OpenVINO.

In one process, with a fresh ``MEDSEG_HOME`` (so the conversion is timed) and ``--threads``
intra-op threads for both runtimes:

* conversion: seconds to convert + cache the encoder (``openvino_encoder``, first call), the
  entry's size on disk, seconds to load a verified entry (digest check + compile);
* encoder s/call, interleaved rounds on real slices: torch bf16 (accelerated), OpenVINO bf16,
  OpenVINO fp32, torch fp32 (accelerated);
* decoder ms/call: the torch decoder (``accelerated._predict_masks_fast``) vs the mask decoder
  converted to OpenVINO here for the measurement (fp32 and bf16; box prompt, 1 and 2 sparse
  tokens), with the mask pixels that differ from the stock fp32 decoder;
* agreement: per-slice Dice between the torch and OpenVINO predictors' box masks on every
  tumour slice (box from the label + 3 px), and the 3D Dice of ``medseg.segment`` with
  ``box_from_gt`` under each runtime (against the label and against each other).

    python benchmarks/bench_runtime.py --out benchmarks/results/runtime_openvino.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "pyradiomics"
MARGIN = 3


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.count_nonzero(a & b)) / s


def _case(name: str) -> tuple[Any, Any]:
    from medseg.io import read_labels, read_volume

    img = read_volume(DATA / f"{name}_image.nrrd")
    gt = read_labels(DATA / f"{name}_label.nrrd", img)
    return img, gt


def conversion(threads: int) -> dict[str, Any]:
    from medseg.models.ov_encoder import openvino_encoder
    from medseg.models.sam import load_sam_model

    m = load_sam_model("litemedsam", precision="bf16")
    out: dict[str, Any] = {}
    for prec in ("bf16", "fp32"):
        enc = openvino_encoder(m, prec, threads=threads)
        again = openvino_encoder(m, prec, threads=threads)
        size = sum(f.stat().st_size for f in enc.path.iterdir())
        out[prec] = {
            "first": enc.source,
            "convert_s": round(enc.convert_s, 2),
            "load_after_convert_s": round(enc.load_s, 3),
            "second": again.source,
            "load_verified_s": round(again.load_s, 3),
            "entry_mb": round(size / 2**20, 1),
        }
    return out


def encoder_speed(threads: int, rounds: int) -> dict[str, Any]:
    import torch

    from medseg.models.sam import load_sam_model
    from medseg.predict.sam import VolumePredictor

    img, _ = _case("lung1")
    models = {
        "torch_bf16": load_sam_model("litemedsam", precision="bf16"),
        "openvino_bf16": load_sam_model("litemedsam", precision="bf16", runtime="openvino"),
        "openvino_fp32": load_sam_model("litemedsam", precision="fp32", runtime="openvino"),
        "torch_fp32": load_sam_model("litemedsam", precision="fp32"),
    }
    pred = VolumePredictor(img, models["torch_bf16"], cache_dir=None)
    xs = [torch.from_numpy(pred.model_input(z))[None] for z in (20, 24, 28)]
    times: dict[str, list[float]] = {k: [] for k in models}
    for m in models.values():  # warm-up
        m.encode(xs[0])
    for _ in range(rounds):
        for k, m in models.items():
            for x in xs:
                t = time.perf_counter()
                m.encode(x)
                times[k].append(time.perf_counter() - t)
    return {k: {"median_s": round(statistics.median(v), 4), "n": len(v)} for k, v in times.items()}


def decoder_speed(threads: int, reps: int) -> dict[str, Any]:
    import openvino as ov
    import torch

    from medseg.models.sam import load_sam_model

    torch.set_grad_enabled(False)
    fast = load_sam_model("litemedsam", precision="bf16")
    stock = load_sam_model("litemedsam", precision="fp32", accelerate=False)
    img, _ = _case("lung1")
    from medseg.predict.sam import VolumePredictor

    emb = VolumePredictor(img, fast, cache_dir=None).embed(24)
    pe = stock.prompt_encoder.get_dense_pe()
    box = torch.tensor([[90.0, 100.0, 140.0, 150.0]])
    pts = (torch.tensor([[[115.0, 125.0]]]), torch.tensor([[1]]))

    class Dec(torch.nn.Module):
        def __init__(self, md: Any) -> None:
            super().__init__()
            self.md = md

        def forward(self, e: Any, p: Any, s: Any, d: Any) -> Any:
            return self.md.predict_masks(e, p, s, d)

    sp, de = stock.prompt_encoder(points=None, boxes=box, masks=None)
    t0 = time.perf_counter()
    ovm = ov.convert_model(
        Dec(stock.mask_decoder),
        example_input=(emb, pe, sp, de),
        input=[(1, 256, 64, 64), (1, 256, 64, 64), (1, -1, 256), (1, 256, 64, 64)],
    )
    convert_s = time.perf_counter() - t0
    core = ov.Core()
    out: dict[str, Any] = {"convert_s": round(convert_s, 2)}
    cfg = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    compiled = {
        h: core.compile_model(
            ovm, "CPU", {**cfg, "INFERENCE_PRECISION_HINT": h}
        ).create_infer_request()
        for h in ("f32", "bf16")
    }
    for prompt, (points, boxes) in {"box": (None, box), "box+point": (pts, box)}.items():
        sp, de = stock.prompt_encoder(points=points, boxes=boxes, masks=None)
        ref = stock.mask_decoder.predict_masks(emb, pe, sp, de)[0][:, :1].numpy()
        rows: dict[str, Any] = {}
        tt: dict[str, list[float]] = {"torch_fast": [], "openvino_f32": [], "openvino_bf16": []}
        diffs: dict[str, int] = {}
        for _ in range(reps):
            t = time.perf_counter()
            low, _ = fast.decode(
                emb,
                None if points is None else points[0],
                None if points is None else points[1],
                boxes,
            )
            tt["torch_fast"].append(time.perf_counter() - t)
            diffs["torch_fast"] = int(np.count_nonzero((low.numpy() > 0) != (ref > 0)))
            for h, req in compiled.items():
                t = time.perf_counter()
                # prompt encoding stays in torch (as the product would do)
                sp2, de2 = stock.prompt_encoder(points=points, boxes=boxes, masks=None)
                res = req.infer([emb.numpy(), pe.numpy(), sp2.numpy(), de2.numpy()])
                tt[f"openvino_{h}"].append(time.perf_counter() - t)
                diffs[f"openvino_{h}"] = int(np.count_nonzero((res[0][:, :1] > 0) != (ref > 0)))
        for k, v in tt.items():
            rows[k] = {
                "median_ms": round(1000 * statistics.median(v[1:]), 1),
                "mask_px_diff": diffs[k],
            }
        out[prompt] = rows
    return out


def agreement(cases: list[str]) -> dict[str, Any]:
    import medseg
    from medseg.models.sam import load_sam_model
    from medseg.predict.sam import VolumePredictor
    from medseg.prompts import box_from_gt

    out: dict[str, Any] = {}
    models = {
        "torch_bf16": load_sam_model("litemedsam", precision="bf16"),
        "torch_fp32": load_sam_model("litemedsam", precision="fp32"),
        "openvino_bf16": load_sam_model("litemedsam", precision="bf16", runtime="openvino"),
        "openvino_fp32": load_sam_model("litemedsam", precision="fp32", runtime="openvino"),
    }
    #: each pair: (compared, reference)
    pairs = {
        "openvino_bf16_vs_torch_bf16": ("openvino_bf16", "torch_bf16"),
        "openvino_fp32_vs_torch_fp32": ("openvino_fp32", "torch_fp32"),
        "torch_bf16_vs_torch_fp32": ("torch_bf16", "torch_fp32"),
        "openvino_bf16_vs_torch_fp32": ("openvino_bf16", "torch_fp32"),
    }
    for case in cases:
        img, gt = _case(case)
        mask = gt.array > 0
        preds = {k: VolumePredictor(img, m, cache_dir=None) for k, m in models.items()}
        per: dict[str, list[float]] = {k: [] for k in pairs}
        h, w = mask.shape[1:]
        for z in np.nonzero(mask.any(axis=(1, 2)))[0]:
            rows = np.nonzero(mask[z].any(axis=1))[0]
            cols = np.nonzero(mask[z].any(axis=0))[0]
            box = (
                max(0, rows[0] - MARGIN),
                max(0, cols[0] - MARGIN),
                min(h - 1, rows[-1] + MARGIN),
                min(w - 1, cols[-1] + MARGIN),
            )
            got = {k: p.predict(int(z), box_rc=box).masks[0] for k, p in preds.items()}
            for k, (a, b) in pairs.items():
                per[k].append(_dice(got[a], got[b]))
        seg = {}
        prompt = box_from_gt(gt, axis="z")
        for rt in ("torch", "openvino"):
            s = medseg.segment(img, "litemedsam", prompt, gt=gt, runtime=rt, cache_dir=None)
            seg[rt] = s
        lt, lo = seg["torch"].labels.array > 0, seg["openvino"].labels.array > 0
        out[case] = {
            "slices": len(per["torch_bf16_vs_torch_fp32"]),
            "per_slice_dice": {
                k: {"min": round(min(v), 5), "mean": round(float(np.mean(v)), 5)}
                for k, v in per.items()
            },
            "segment_3d": {
                "dice_torch_vs_gt": round(_dice(lt, mask), 4),
                "dice_openvino_vs_gt": round(_dice(lo, mask), 4),
                "dice_torch_vs_openvino": round(_dice(lt, lo), 5),
            },
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--cases", default="lung1,brain1")
    ap.add_argument("--parts", default="encoder,decoder,agreement")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="medseg-rt-") as tmp:
        os.environ["MEDSEG_HOME"] = tmp
        weights = Path.home() / ".cache" / "medseg" / "weights"
        if weights.is_dir():
            os.symlink(weights, Path(tmp) / "weights")
        import openvino

        report: dict[str, Any] = {
            "threads": args.threads,
            "openvino": openvino.__version__,
            "torch": torch.__version__,
            "python": sys.version.split()[0],
            "load_before": os.getloadavg(),
            "conversion": conversion(args.threads),
        }
        parts = args.parts.split(",")
        if "encoder" in parts:
            report["encoder"] = encoder_speed(args.threads, args.rounds)
            report["load_mid"] = os.getloadavg()
        if "decoder" in parts:
            report["decoder"] = decoder_speed(args.threads, 8)
        if "agreement" in parts:
            report["agreement"] = agreement(args.cases.split(","))
        report["load_after"] = os.getloadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
