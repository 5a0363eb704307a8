"""The issue's protocol on a phantom: fine-tune on slabs of one volume, score an unseen slab.

A noisy phantom CT (liver tumour, thin slices) is cut along z into four slabs of the tumour's
slices; three slabs form the training dataset (``medseg finetune`` holds one out for
validation), the fourth is scored with a box on every slice through the command line, zero-shot
and with the decoder::

    medseg segment SLAB --box-from-gt GT --gt GT --oracle --json R.json [--decoder D.pt]

    PYTHONPATH=src python benchmarks/finetune_slabs.py [--epochs 10] [--noise-sigma 40]

Prints JSON and writes ``benchmarks/results/finetune_slabs.json``.
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

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--noise-sigma", type=float, default=40.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/finetune_slabs.json")
    args = ap.parse_args()

    from medseg.io.datasets import write_msd_dataset
    from medseg.io.files import write_labels, write_volume
    from medseg.phantom import make_phantom
    from medseg.volume import LabelMap, Volume

    img, lab = make_phantom(
        args.seed,
        shape=(80, 160, 160),
        spacing=(1.5, 1.2, 1.2),
        n_tumours=(1, 1),
        noise_sigma=args.noise_sigma,
    )
    mask = lab.array == 2
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    parts = np.array_split(np.arange(zs[0], zs[-1] + 1), 4)

    def slab(part: np.ndarray) -> tuple[Volume, LabelMap]:
        sl = slice(int(part[0]), int(part[-1]) + 1)
        v = Volume(
            np.ascontiguousarray(img.array[sl]), spacing=img.spacing, meta={"modality": "CT"}
        )
        return v, LabelMap.like(v, mask[sl].astype(np.uint8), {1: "tumour"})

    tmp = Path(tempfile.mkdtemp(prefix="medseg_slabs_"))
    test_k = 2  # a middle slab: neighbours on both sides are in the training data
    train = [(f"slab{k}", *slab(p)) for k, p in enumerate(parts) if k != test_k]
    write_msd_dataset(
        tmp / "ds", train, name="slabs", description="phantom slabs", labels={1: "tumour"}
    )
    tv, tg = slab(parts[test_k])
    write_volume(tv, tmp / "test.nii.gz")
    write_labels(tg, tmp / "gt.nii.gz")

    env = {**os.environ, "MEDSEG_HOME": str(tmp / "home")}
    cli = [sys.executable, "-m", "medseg"]

    def segment(report: Path, decoder: Path | None = None) -> dict:
        cmd = [*cli, "segment", str(tmp / "test.nii.gz"), "--box-from-gt", str(tmp / "gt.nii.gz")]
        cmd += ["--gt", str(tmp / "gt.nii.gz"), "--oracle", "--json", str(report), "--quiet"]
        if decoder is not None:
            cmd += ["--decoder", str(decoder)]
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        r = json.loads(report.read_text())
        per = [s["dice"] for s in r["sam"]["oracle"]["per_slice"]]
        return {
            "oracle_dice": r["sam"]["oracle"]["dice"],
            "per_slice_box_dice": round(float(np.mean(per)), 4),
            "propagated_dice": r["sam"]["dice"],
            "decoder_sha256": r["model"]["decoder_sha256"],
        }

    before = segment(tmp / "zero_shot.json")
    t = time.perf_counter()
    cmd = [*cli, "finetune", "--data", str(tmp / "ds"), "--label", "tumour"]
    cmd += ["--out", str(tmp / "d.pt"), "--epochs", str(args.epochs), "--quiet"]
    ft = subprocess.run(
        cmd,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    secs = time.perf_counter() - t
    after = segment(tmp / "tuned.json", tmp / "d.pt")
    curve = json.loads((tmp / "d.curve.json").read_text())
    out = {
        "structure": f"phantom liver tumour, noise {args.noise_sigma} HU, 1.5 mm slices",
        "slabs": [[int(p[0]), int(p[-1])] for p in parts],
        "test_slab": test_k,
        "zero_shot": before,
        "fine_tuned": after,
        "gain_oracle_dice": round(after["oracle_dice"] - before["oracle_dice"], 4),
        "finetune_stdout": ft.stdout.strip().splitlines(),
        "finetune_seconds": round(secs, 1),
        "history": curve["history"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
