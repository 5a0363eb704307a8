"""``medseg evaluate --pred P --gt G``: per-label Dice, IoU, HD95, HD, mean surface distance and
surface Dice (distances in mm, on the ground truth's voxel grid), optionally lesion-wise detection
and panoptic quality for one label.

Both files must lie on one voxel grid; with ``--resample`` the prediction is resampled onto the
ground truth's grid (nearest neighbour, physical space) first. Label names come from ``--labels``,
else from the files' label tables (a ``dataset.json`` beside them or their metadata).
Empty rule: both masks empty -> Dice 1 and distances 0; only one empty -> Dice 0 and distances
infinite (``null`` in the JSON report, with a note).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from medseg.volume import LabelMap


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="compare a predicted label map with the ground truth (Dice, HD95, surface Dice, ...)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pred", required=True, help="predicted label map (NIfTI/NRRD/MHA or DICOM)")
    p.add_argument("--gt", required=True, help="ground-truth label map on the same grid")
    p.add_argument(
        "--labels",
        metavar="1=liver,2=tumor",
        help="labels to score and their names (default: all labels present)",
    )
    p.add_argument("--json", dest="json_out", metavar="REPORT.json", help="write a JSON report")
    p.add_argument("--overwrite", action="store_true", help="replace an existing JSON report")
    p.add_argument(
        "--resample",
        action="store_true",
        help="resample the prediction onto the ground truth's grid (nearest neighbour) "
        "when the grids differ",
    )
    p.add_argument(
        "--tolerance",
        type=float,
        default=1.0,
        metavar="MM",
        help="surface Dice tolerance in mm (default 1.0)",
    )
    g = p.add_argument_group("lesions")
    g.add_argument(
        "--lesions",
        metavar="LABEL",
        help="also score lesion-wise detection and panoptic quality for this label (value or name)",
    )
    g.add_argument(
        "--lesion-iou",
        type=float,
        default=0.1,
        metavar="IOU",
        help="IoU a predicted component needs to detect a lesion (default 0.1)",
    )
    g.add_argument(
        "--min-lesion-mm3",
        type=float,
        default=0.0,
        metavar="MM3",
        help="ignore connected components smaller than this (mm3)",
    )
    p.set_defaults(func=run)


def _read(path: str, table: dict[int, str]) -> LabelMap:
    from medseg.errors import InputError
    from medseg.io import read_labels

    try:
        return read_labels(path, labels=table or None)
    except InputError as exc:
        msg = str(exc)
        if path in msg:
            raise
        raise InputError(f"{path}: {msg}") from None


def _lesion_value(text: str, gt: LabelMap, pred: LabelMap) -> int:
    from medseg.errors import InputError

    try:
        value = int(text)
    except ValueError:
        names = {**pred.labels, **gt.labels}
        hits = [v for v, n in names.items() if n.lower() == text.lower()]
        if not hits:
            known = ", ".join(f"{v}={n}" for v, n in sorted(names.items())) or "none"
            raise InputError(
                f"--lesions {text!r} is not a label value or a known label name ({known})"
            ) from None
        value = hits[0]
    if value <= 0:
        raise InputError(f"--lesions must name a foreground label (> 0), got {value}")
    return value


def evaluate_files(
    pred_path: str,
    gt_path: str,
    labels: dict[int, str] | None = None,
    tolerance_mm: float = 1.0,
    resample: bool = False,
    lesion_label: str | None = None,
    lesion_iou: float = 0.1,
    min_lesion_mm3: float = 0.0,
) -> dict[str, Any]:
    """Read two label files and return the report :func:`run` prints / writes (JSON-safe).

    Raises:
        MedsegError: unreadable/non-integer files, grids that differ (without ``resample``),
            bad options.
    """
    from medseg.errors import InputError
    from medseg.metrics import evaluate, lesion_detection, panoptic_quality, rows_to_json
    from medseg.volume import check_same_grid, grid_differences, resample_labels_to

    if not (tolerance_mm >= 0 and math.isfinite(tolerance_mm)):
        raise InputError(f"--tolerance must be a finite number >= 0 mm, got {tolerance_mm}")
    if not 0 < lesion_iou <= 1:
        raise InputError(f"--lesion-iou must be in (0, 1], got {lesion_iou}")
    table = dict(labels or {})
    gt = _read(gt_path, table)
    pred = _read(pred_path, table)
    diffs = grid_differences(pred, gt)
    notes: list[str] = []
    if diffs and resample:
        pred = resample_labels_to(pred, gt)
        notes.append(
            "prediction resampled onto the ground truth's grid (nearest neighbour): "
            + "; ".join(diffs)
        )
    else:
        check_same_grid(pred, gt, what="prediction", against="ground truth")
    rows = evaluate(pred, gt, labels=table or None, tolerance_mm=tolerance_mm)
    report: dict[str, Any] = {
        "pred": str(pred_path),
        "gt": str(gt_path),
        "resampled": bool(diffs and resample),
        "notes": notes,
        "spacing": [float(v) for v in gt.spacing],
        "tolerance_mm": float(tolerance_mm),
        "empty_rule": (
            "both empty: dice=iou=surface_dice=1, distances 0; exactly one empty: "
            "dice=iou=surface_dice=0, distances infinite (null here)"
        ),
        "labels": rows_to_json(rows),
    }
    if lesion_label is not None:
        value = _lesion_value(lesion_label, gt, pred)
        det = lesion_detection(
            pred.array == value,
            gt.array == value,
            gt.spacing,
            iou_threshold=lesion_iou,
            min_volume_mm3=min_lesion_mm3,
        )
        det["label"] = value
        det["name"] = gt.name(value) if value in gt.labels else pred.name(value)
        report["lesions"] = det
        stuff = sorted(
            ({r["label"] for r in rows} | set(gt.present()) | set(pred.present())) - {value}
        )
        pq = panoptic_quality(pred.array, gt.array, stuff_labels=stuff, thing_labels=[value])
        pq["per_class"] = {str(k): v for k, v in pq["per_class"].items()}
        report["panoptic"] = pq
    return report


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "inf"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def format_table(report: dict[str, Any]) -> str:
    """The per-label table (and lesion summary) as printed by the command."""
    tol = report["tolerance_mm"]
    head = [
        "label",
        "name",
        "dice",
        "iou",
        "hd95_mm",
        "hd_mm",
        "msd_mm",
        f"nsd@{tol:g}mm",
        "vox_gt",
        "vox_pred",
    ]
    lines = [head]
    for r in report["labels"]:
        lines.append(
            [
                str(r["label"]),
                str(r["name"]),
                _fmt(r["dice"]),
                _fmt(r["iou"]),
                _fmt(r["hd95"], 2),
                _fmt(r["hd"], 2),
                _fmt(r["msd"], 2),
                _fmt(r["surface_dice"]),
                str(r["voxels_gt"]),
                str(r["voxels_pred"]),
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    out = [
        "  ".join(
            c.ljust(w) if i < 2 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in lines
    ]
    if any(r.get("note") for r in report["labels"]):
        out.append("inf: the label is empty in exactly one of prediction / ground truth")
    les = report.get("lesions")
    if les:
        out.append(
            f"lesions (label {les['label']} {les['name']}, 26-connected, IoU >= "
            f"{les['iou_threshold']:g}): gt {les['n_gt']}, pred {les['n_pred']}, TP {les['tp']}, "
            f"FP {les['fp']}, FN {les['fn']}, precision {les['precision']:.3f}, recall "
            f"{les['recall']:.3f}, F1 {les['f1']:.3f}"
        )
        pq = report["panoptic"]
        if pq["pq"] is not None:
            out.append(f"panoptic quality: PQ {pq['pq']:.4f}  SQ {pq['sq']:.4f}  RQ {pq['rq']:.4f}")
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from medseg.cli.common import parse_label_table
    from medseg.io.files import check_output_path, write_json

    table = parse_label_table(args.labels)
    if args.json_out:  # fail on a bad output path before any work
        check_output_path(args.json_out, [args.pred, args.gt], overwrite=args.overwrite)
    report = evaluate_files(
        args.pred,
        args.gt,
        labels=table,
        tolerance_mm=args.tolerance,
        resample=args.resample,
        lesion_label=args.lesions,
        lesion_iou=args.lesion_iou,
        min_lesion_mm3=args.min_lesion_mm3,
    )
    for note in report["notes"]:
        print(f"medseg evaluate: note: {note}", file=sys.stderr)
    print(format_table(report))
    if args.json_out:
        out = write_json(
            report, args.json_out, inputs=[args.pred, args.gt], overwrite=args.overwrite
        )
        print(f"report written to {Path(out)}", file=sys.stderr)
    return 0
