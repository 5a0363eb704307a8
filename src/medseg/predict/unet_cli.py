"""``medseg segment IMAGE --model unet-demo|MODEL.pt``: the automatic U-Net path of the CLI.

Outputs (all checked before any work, all written atomically):

* ``--out LABELS``: the label map on the image's grid;
* ``--probabilities PROBS``: softmax probabilities, one vector component per class (class 0 =
  background), float32, on the image's grid (for active learning);
* ``--instances OUT``: lesion instances of the tumour label (connected components, ids 1..N
  largest first) as a label map ``OUT`` plus ``OUT``'s name with ``.csv`` (lesion id, voxels,
  volume mm³, centroid LPS mm, max diameter mm) and a panoptic summary in the JSON report;
* ``--gt GT --json REPORT``: metrics per label (:func:`medseg.metrics.evaluate`).

``--refine-with litemedsam [--refine-label N]`` refines one label (default: the label named
tumour/tumor/lesion) with :func:`medseg.predict.hybrid.refine_with_sam`; the SAM model sees the
U-Net's own intensity window unless ``--window`` says otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from medseg.errors import InputError

_LESION_NAMES = ("tumour", "tumor", "lesion", "cancer", "metastasis", "nodule")


def instance_paths(out: str | Path) -> tuple[Path, Path]:
    """``(label_map_path, csv_path)`` for ``--instances OUT`` (``x.nii.gz`` → ``x.csv``)."""
    from medseg.io.files import image_suffix

    o = Path(out)
    suf = image_suffix(o)
    if suf is None:
        raise InputError(
            f"--instances {o}: give an image file name (.nii.gz, .nrrd, ...); the table is "
            "written beside it as .csv"
        )
    return o, o.with_name(o.name[: -len(suf)] + ".csv")


def lesion_label(labels: dict[int, str], requested: int | None) -> int:
    """The label treated as lesions: ``requested``, else the one named like a tumour.

    Raises:
        InputError: requested value not in the table, or no tumour-like name.
    """
    if requested is not None:
        if int(requested) not in labels:
            raise InputError(
                f"label {requested} is not in the model's table {labels}; pick one of them"
            )
        return int(requested)
    for v, name in sorted(labels.items()):
        if name.strip().lower() in _LESION_NAMES:
            return v
    raise InputError(f"no tumour label in {labels}; name the label with --refine-label N")


def _metrics(pred: Any, gt: Any) -> list[dict[str, Any]]:
    from medseg.metrics import evaluate, rows_to_json

    return rows_to_json(evaluate(pred, gt, labels=pred.labels))


def run(args: argparse.Namespace) -> int:
    """Run the U-Net segmentation described by the parsed ``segment`` arguments."""
    import numpy as np

    from medseg.cli.common import write_json
    from medseg.io.files import check_output_path, read_labels, read_volume, write_labels
    from medseg.models.unet import config_sha256
    from medseg.predict.unet import UNetSegmenter
    from medseg.progress import tqdm_progress

    inputs = [args.image] + ([args.gt] if args.gt else [])
    ow = bool(args.overwrite)
    outs: list[Path] = []
    for path in (args.out, args.probabilities, args.json_out):
        if path:
            outs.append(check_output_path(path, inputs, overwrite=ow))
    inst_paths: tuple[Path, Path] | None = None
    if args.instances:
        inst_paths = instance_paths(args.instances)
        for p in inst_paths:
            outs.append(check_output_path(p, inputs, overwrite=ow))
    if len({p.resolve() for p in outs}) != len(outs):
        raise InputError("two outputs name the same file; give each output its own path")
    if args.refine_with and args.refine_with.startswith("unet"):
        raise InputError(
            "--refine-with takes a SAM-Med model (litemedsam, sam_vit_b, medsam_vit_b)"
        )
    if args.window and not args.refine_with:
        print(
            "medseg segment: note: --window is ignored by the U-Net (its checkpoint fixes the "
            "intensity preprocessing); it only sets the window of --refine-with",
            file=sys.stderr,
        )

    t0 = time.perf_counter()
    vol = read_volume(args.image, series=getattr(args, "series", None))
    gt = read_labels(args.gt, reference=vol) if args.gt else None
    seg = UNetSegmenter.load(
        args.model,
        labels=(gt.labels or None) if gt is not None else None,
        precision=args.precision,
        device=args.device,
    )
    refine_label = None
    if args.refine_with:
        refine_label = lesion_label(seg.labels, args.refine_label)
    quiet = bool(getattr(args, "quiet", False))
    with tqdm_progress("unet", enabled=not quiet) as cb:
        res = seg.segment(
            vol,
            overlap=args.overlap,
            blend=args.blend,
            progress=cb,
            return_probabilities=bool(args.probabilities),
        )
    labels, probs = res if isinstance(res, tuple) else (res, None)
    t_seg = time.perf_counter() - t0
    report: dict[str, Any] = {
        "image": str(args.image),
        "model": args.model,
        "checkpoint": seg.source,
        "config_sha256": config_sha256(seg.config),
        "labels": seg.labels,
        "target_spacing": seg.config["target_spacing"],
        "precision": seg.precision,
        "overlap": args.overlap,
        "blend": args.blend,
        "shape": list(vol.shape),
        "spacing": list(vol.spacing),
        "seconds_segment": round(t_seg, 3),
        "voxels": {seg.labels[v]: int(np.count_nonzero(labels.array == v)) for v in seg.labels},
    }
    if gt is not None:
        report["metrics"] = _metrics(labels, gt)
    if args.refine_with:
        from medseg.predict.hybrid import refine_with_sam

        t1 = time.perf_counter()
        with tqdm_progress("refine", enabled=not quiet) as cb:
            refined = refine_with_sam(
                vol,
                labels,
                refine_label,
                model=args.refine_with,
                progress=cb,
                window=args.window or _unet_window(seg.config),
                precision=args.precision,
                device=args.device,
            )
        report["refine"] = {
            **refined.meta.get("refined", {}),
            "seconds": round(time.perf_counter() - t1, 3),
        }
        if gt is not None:
            report["metrics_unet"] = report.pop("metrics")
            report["metrics"] = _metrics(refined, gt)
        report["voxels_unet"] = report["voxels"]
        report["voxels"] = {
            seg.labels[v]: int(np.count_nonzero(refined.array == v)) for v in seg.labels
        }
        labels = refined
    if args.out:
        write_labels(labels, args.out, reference=vol, inputs=inputs, overwrite=ow)
    if probs is not None:
        _write_probabilities(probs, vol, Path(args.probabilities), inputs, ow)
    if inst_paths is not None:
        report["instances"] = _write_instances(labels, args, inst_paths, inputs, ow)
    report["seconds_total"] = round(time.perf_counter() - t0, 3)
    if args.json_out:
        write_json(report, args.json_out, inputs=inputs, overwrite=True)
    _print_summary(report)
    return 0


def _unet_window(config: dict[str, Any]) -> str:
    """The U-Net's own intensity mapping as a ``--window`` value for the SAM refinement.

    On the phantoms the U-Net's abdomen window let LiteMedSAM see the hypodense tumours; the
    SAM default (wide, -1000..400 HU) made the refinement worse than the U-Net alone.
    """
    it = config.get("intensity") or {}
    if it.get("kind") == "window":
        return f"{float(it['lo']):g},{float(it['hi']):g}"
    return "percentile"


def _write_instances(
    labels: Any, args: argparse.Namespace, paths: tuple[Path, Path], inputs: list[Any], ow: bool
) -> dict[str, Any]:
    from medseg.instances import (
        label_lesions,
        lesion_table,
        semantic_to_panoptic,
        write_lesion_table,
    )
    from medseg.io.files import write_labels
    from medseg.volume import LabelMap

    value = lesion_label(labels.labels, args.refine_label)
    inst = label_lesions(labels.array == value, labels.spacing)
    n = int(inst.max(initial=0))
    names = {k: f"{labels.name(value)}_{k}" for k in range(1, n + 1)}
    lm = LabelMap.like(labels, inst, names)
    rows = lesion_table(inst, labels)
    write_labels(lm, paths[0], inputs=inputs, overwrite=ow)
    write_lesion_table(rows, paths[1], inputs=inputs, overwrite=ow)
    _, pan_table = semantic_to_panoptic(labels, [value])
    return {
        "label": value,
        "lesions": n,
        "map": str(paths[0]),
        "table": str(paths[1]),
        "rows": rows,
        "panoptic": pan_table,
    }


def _write_probabilities(probs: Any, vol: Any, out: Path, inputs: list[Any], ow: bool) -> None:
    import numpy as np
    import SimpleITK as sitk

    from medseg.io.files import atomic_path, check_output_path

    o = check_output_path(out, inputs, overwrite=ow)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(probs, 0, -1)), isVector=True)
    img.SetSpacing(vol.spacing_xyz)
    img.SetOrigin(vol.origin)
    img.SetDirection(tuple(float(v) for v in vol.direction.reshape(-1)))
    with atomic_path(o) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)


def _print_summary(report: dict[str, Any]) -> None:
    lines = [
        f"segmented {report['image']} with {report['model']} in "
        f"{report['seconds_segment']:.1f} s ({report['precision']})"
    ]
    for row in report.get("metrics", []):
        d = row.get("dice")
        lines.append(
            f"  {row['name']:>12}: dice {d:.4f}"
            if d is not None
            else f"  {row['name']:>12}: dice n/a"
        )
    if "instances" in report:
        lines.append(f"  lesions: {report['instances']['lesions']}")
    print("\n".join(lines))
