"""One fine-tuning epoch on cached embeddings vs one that re-embeds every slice at every step.

Same data (phantom kidney slices), same prompts, same decoder steps, real LiteMedSAM; the only
difference is that the second epoch runs the frozen image encoder for every sample, as a
fine-tuner without the embedding cache would.

    PYTHONPATH=src python benchmarks/bench_finetune.py [--slices 12] [--batch-size 4]
        [--model sam_vit_b --out benchmarks/results/finetune_epoch_vit_b.json]

Prints JSON and writes ``benchmarks/results/finetune_epoch.json``. The ratio is
``1 + encoder time / decoder training step``: LiteMedSAM's TinyViT encoder costs only a few
decoder forward+backward passes, the ViT-B encoder (SAM, MedSAM) tens of them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slices", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--precision", default="auto")
    ap.add_argument(
        "--model",
        default="litemedsam",
        choices=["litemedsam", "sam_vit_b"],
        help="sam_vit_b: the full ViT-B architecture with random weights (timing only)",
    )
    ap.add_argument("--out", default="benchmarks/results/finetune_epoch.json")
    args = ap.parse_args()

    import torch

    from medseg.models.sam import get_sam_model
    from medseg.phantom import make_phantom
    from medseg.predict.sam import VolumePredictor
    from medseg.train.decoder import _Sample, _Trainer

    img, lab = make_phantom(0)
    mask = lab.array == 3  # kidney
    idxs = [int(i) for i in np.flatnonzero(mask.any(axis=(1, 2)))][: args.slices]
    if args.model == "litemedsam":
        base = get_sam_model("litemedsam", precision=args.precision)
    else:  # no official ViT-B file offline: same architecture, random weights, same cost
        import tempfile

        from medseg.models.sam import build_sam_model, load_sam_model

        wfile = Path(tempfile.mkdtemp()) / "random_vit_b.pth"
        torch.manual_seed(0)
        torch.save(build_sam_model("sam_vit_b").state_dict(), wfile)
        base = load_sam_model("sam_vit_b", weights=wfile, precision=args.precision)
    pred = VolumePredictor(img, base, cache_dir=None)
    samples = []
    for i in idxs:
        prev = [mask[j] for j in (i - 1, i + 1) if 0 <= j < mask.shape[0] and mask[j].any()]
        samples.append(_Sample(0, i, mask[i], prev))

    class Reembed(_Trainer):
        """Runs the frozen encoder for every sample (no cache)."""

        def _forward(self, sid, epoch):
            s = self.samples[sid]
            p = self.predictors[s.case]
            p._encode_batch([s.index])  # the encoder run a cache-less fine-tuner pays
            return super()._forward(sid, epoch)

    def epoch(cls) -> tuple[float, int]:
        torch.manual_seed(0)
        tr = cls(
            base,
            [pred],
            samples,
            lr=1e-4,
            weight_decay=0.01,
            batch_size=args.batch_size,
            seed=0,
            rank=0,
            world=1,
            device=torch.device("cpu"),
        )
        calls = pred.encoder_calls
        t = time.perf_counter()
        for step in range(tr.steps_per_epoch):
            tr.step(1, step)
        return time.perf_counter() - t, pred.encoder_calls - calls

    t_embed = time.perf_counter()
    pred.precompute(idxs)  # embed each slice once (what finetune does first)
    t_embed = time.perf_counter() - t_embed
    cached, calls_cached = epoch(_Trainer)
    reembed, calls_reembed = epoch(Reembed)
    out = {
        "model": args.model if args.model == "litemedsam" else "sam_vit_b (random weights)",
        "precision": base.precision,
        "slices": len(idxs),
        "batch_size": args.batch_size,
        "embed_once_s": round(t_embed, 3),
        "epoch_cached_s": round(cached, 3),
        "epoch_reembed_s": round(reembed, 3),
        "encoder_calls_cached_epoch": calls_cached,
        "encoder_calls_reembed_epoch": calls_reembed,
        "speedup": round(reembed / cached, 2),
        "threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpu": platform.processor() or platform.machine(),
        "note": "shared 2-core machine: ratios, not absolutes",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
