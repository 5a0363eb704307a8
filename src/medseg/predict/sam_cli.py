"""The SAM-Med branch of ``medseg segment``: prompts → key slice(s) → 3D propagation → label map.

Prompt coordinates are voxel indices of the image array ``(z, y, x)`` (array space: a flipped
direction matrix, as in brain1, does not change them):

* ``--box I,R0,C0,R1,C1``: a box on slice ``I`` along ``--axis``; for the default axial axis
  that is ``Z,Y0,X0,Y1,X1`` (inclusive). Repeat it for several key slices.
* ``--point Z,Y,X[,L]``: a volume point; ``L`` = 1 foreground (default) or 0 background. It
  lands on the slice through it along ``--axis``.
* ``--prompts FILE.json``: the same in a file (:data:`PROMPTS_SCHEMA_DOC`)::

      {"axis": "z",
       "boxes": [{"slice": 12, "box": [Y0, X0, Y1, X1]}],
       "points": [{"zyx": [12, 140, 96], "label": 1}]}

  ``axis`` is optional (it must match ``--axis`` when given); a box is ``[R0, C0, R1, C1]`` in
  the slice's ``(row, col)`` frame (axial: ``(y, x)``).
* ``--box-from-gt GT``: the standard interactive protocol: one box (``--box-margin`` pixels,
  default 3) around the ground truth on its slice of largest area (``--label`` selects a value).

Exit status 2 with one line for bad input (:class:`~medseg.errors.MedsegError`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import InputError, PromptError, WeightsError

if TYPE_CHECKING:
    from medseg.predict.propagate import KeyPrompt
    from medseg.volume import LabelMap, Volume

PROMPTS_SCHEMA_DOC = (
    '{"axis": "z" (optional), "boxes": [{"slice": I, "box": [R0, C0, R1, C1]}], '
    '"points": [{"zyx": [Z, Y, X], "label": 1|0}]}'
)

#: Default box margin (pixels per side) for --box-from-gt and the oracle.
DEFAULT_BOX_MARGIN = 3.0


# --------------------------------------------------------------------------- parsing
def _numbers(text: str, what: str, usage: str) -> list[float]:
    try:
        vals = [float(v) for v in str(text).split(",")]
    except ValueError:
        raise PromptError(f"malformed {what} {text!r}; expected {usage}") from None
    if not all(np.isfinite(vals)):
        raise PromptError(f"malformed {what} {text!r}; expected {usage}")
    return vals


def parse_box(text: str) -> tuple[int, tuple[float, float, float, float]]:
    """``"I,R0,C0,R1,C1"`` → ``(slice index, (r0, c0, r1, c1))``.

    Raises:
        PromptError: not five numbers, a fractional slice index or ``R1 < R0`` / ``C1 < C0``.
    """
    usage = "I,R0,C0,R1,C1 (axial: Z,Y0,X0,Y1,X1) in voxels"
    vals = _numbers(text, "--box", usage)
    if len(vals) != 5 or vals[0] != round(vals[0]):
        raise PromptError(f"malformed --box {text!r}; expected {usage}")
    r0, c0, r1, c1 = vals[1:]
    if r1 < r0 or c1 < c0:
        raise PromptError(f"--box {text!r}: need R0 <= R1 and C0 <= C1 (Y0 <= Y1, X0 <= X1)")
    return int(vals[0]), (r0, c0, r1, c1)


def parse_point(text: str) -> tuple[tuple[float, float, float], int]:
    """``"Z,Y,X[,L]"`` → ``((z, y, x), label)`` with label 1 (foreground) or 0.

    Raises:
        PromptError: not 3 or 4 numbers, or a label other than 0/1.
    """
    usage = "Z,Y,X or Z,Y,X,L with L = 1 (foreground) or 0 (background)"
    vals = _numbers(text, "--point", usage)
    if len(vals) not in (3, 4):
        raise PromptError(f"malformed --point {text!r}; expected {usage}")
    label = int(vals[3]) if len(vals) == 4 else 1
    if len(vals) == 4 and vals[3] not in (0.0, 1.0):
        raise PromptError(f"--point {text!r}: the label must be 1 or 0")
    return (vals[0], vals[1], vals[2]), label


def load_prompts_file(
    path: str | Path, axis: str
) -> tuple[list[tuple[int, tuple[float, float, float, float]]], list[tuple[Any, int]]]:
    """Read a prompts JSON file (schema in the module docstring).

    Returns:
        ``(boxes, points)`` as from :func:`parse_box` / :func:`parse_point`.

    Raises:
        InputError: unreadable JSON or a wrong structure.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"{p}: no such prompts file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{p}: not a readable JSON prompts file ({exc})") from None
    if not isinstance(data, dict):
        raise InputError(f"{p}: prompts file must be a JSON object: {PROMPTS_SCHEMA_DOC}")
    unknown = set(data) - {"axis", "boxes", "points", "comment"}
    if unknown:
        raise InputError(f"{p}: unknown keys {sorted(unknown)}; schema: {PROMPTS_SCHEMA_DOC}")
    if "axis" in data and str(data["axis"]).lower() != axis:
        raise InputError(
            f"{p}: prompts are for axis {data['axis']!r} but --axis is {axis!r}; make them agree"
        )
    boxes = []
    for i, b in enumerate(data.get("boxes") or []):
        try:
            idx = b["slice"]
            r0, c0, r1, c1 = (float(v) for v in b["box"])
        except (KeyError, TypeError, ValueError):
            raise InputError(
                f'{p}: boxes[{i}] must be {{"slice": I, "box": [R0, C0, R1, C1]}}'
            ) from None
        boxes.append(parse_box(f"{idx},{r0},{c0},{r1},{c1}"))
    points = []
    for i, q in enumerate(data.get("points") or []):
        try:
            z, y, x = (float(v) for v in q["zyx"])
            lab = q.get("label", 1)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise InputError(
                f'{p}: points[{i}] must be {{"zyx": [Z, Y, X], "label": 1|0}}'
            ) from None
        points.append(parse_point(f"{z},{y},{x},{lab}"))
    if not boxes and not points:
        raise InputError(f"{p}: no prompts in the file; schema: {PROMPTS_SCHEMA_DOC}")
    return boxes, points


def build_key_prompts(
    shape_zyx: tuple[int, int, int],
    axis: str,
    boxes: list[tuple[int, tuple[float, float, float, float]]],
    points: list[tuple[Any, int]],
) -> list[KeyPrompt]:
    """Check prompts against the image and group them by key slice along ``axis``.

    Raises:
        PromptError: a slice index out of range, a box or point outside the image.
    """
    from medseg.predict.frame import axis_index, check_index, split_point
    from medseg.predict.propagate import KeyPrompt

    ax = axis_index(axis)
    n = shape_zyx[ax]
    h, w = (s for i, s in enumerate(shape_zyx) if i != ax)
    names = [c for i, c in enumerate("zyx") if i != ax]
    out: list[KeyPrompt] = []
    for idx, (r0, c0, r1, c1) in boxes:
        check_index(idx, n, axis)
        if min(r0, c0) < 0 or r1 > h - 1 or c1 > w - 1:
            raise PromptError(
                f"box ({r0:g}, {c0:g}, {r1:g}, {c1:g}) on slice {idx} is outside the image: "
                f"{names[0]} must be in 0..{h - 1} and {names[1]} in 0..{w - 1}"
            )
        if r0 == r1 and c0 == c1:
            raise PromptError(f"box on slice {idx} has zero size; give two different corners")
        out.append(KeyPrompt(idx, box_rc=(r0, c0, r1, c1)))
    for zyx, label in points:
        for i, (v, size) in enumerate(zip(zyx, shape_zyx, strict=True)):
            if not 0 <= v <= size - 1:
                raise PromptError(
                    f"point (z {zyx[0]:g}, y {zyx[1]:g}, x {zyx[2]:g}) is outside the image: "
                    f"{'zyx'[i]} must be in 0..{size - 1}"
                )
        idx, rc = split_point(zyx, axis)
        out.append(KeyPrompt(idx, points_rc=np.asarray([rc]), point_labels=np.asarray([label])))
    return out


# --------------------------------------------------------------------------- helpers
def _label_selection(gt: LabelMap, label: int | None) -> tuple[np.ndarray, int, str]:
    """``(mask, output value, name)`` of the GT object to use."""
    if label is not None:
        mask = gt.array == label
        if not mask.any():
            present = gt.present()
            raise InputError(
                f"label {label} is not in the ground truth (present: {present or 'none'}); "
                "choose --label from those"
            )
        return mask, int(label), gt.labels.get(int(label), "object")
    mask = gt.array > 0
    if not mask.any():
        raise InputError("the ground truth is empty: nothing to segment or score")
    present = gt.present()
    value = present[0] if len(present) == 1 else 1
    name = gt.labels.get(value, "tumour") if len(present) == 1 else "foreground"
    return mask, int(value), name


def _read_gt(path: str, image: Volume) -> LabelMap:
    from medseg.io.files import read_labels

    return read_labels(path, reference=image)


def _fmt(v: Any, nd: int = 4) -> str:
    return "n/a" if v is None else f"{v:.{nd}f}"


# --------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> int:
    """Run ``medseg segment`` with a SAM-family model. Returns the exit status (0)."""
    from medseg.io.files import check_output_path, read_volume

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    axis = str(getattr(args, "axis", "z") or "z")
    margin = float(getattr(args, "box_margin", None) or DEFAULT_BOX_MARGIN)
    inputs = [
        p
        for p in (
            args.image,
            args.gt,
            args.box_from_gt,
            args.prompts,
            getattr(args, "weights", None),
        )
        if p
    ]

    # 1. outputs and prompt strings first: fail before any slow work
    out_path = json_path = None
    if args.out:
        from medseg.io.files import image_suffix

        if image_suffix(args.out) is None:
            raise InputError(
                f"{args.out}: unknown label-map type; use .nii.gz, .nii, .nrrd, .mha or .mhd"
            )
        out_path = check_output_path(args.out, inputs, overwrite=args.overwrite)
    if args.json_out:
        json_path = check_output_path(args.json_out, inputs, overwrite=args.overwrite)
        if out_path is not None and json_path.resolve() == out_path.resolve():
            raise InputError("--out and --json name the same file; choose two paths")
    boxes = [parse_box(b) for b in args.box]
    points = [parse_point(q) for q in args.point]
    source = []
    if boxes or points:
        source.append("command line")
    if args.prompts:
        fb, fp = load_prompts_file(args.prompts, axis)
        boxes += fb
        points += fp
        source.append(str(args.prompts))
    if getattr(args, "weights", None) and not Path(args.weights).is_file():
        raise WeightsError(f"weights file {args.weights} does not exist; check --weights")
    if not (boxes or points or args.box_from_gt):
        raise PromptError(
            "no prompt: give --box I,R0,C0,R1,C1, --point Z,Y,X[,0|1], --prompts FILE.json "
            "or --box-from-gt GT"
        )
    if args.oracle and not (args.gt or args.box_from_gt):
        raise InputError("--oracle needs --gt (the oracle boxes come from the ground truth)")

    # 2. image and ground truth
    t = time.perf_counter()
    image = read_volume(args.image, series=getattr(args, "series", None))
    gt = _read_gt(args.gt, image) if args.gt else None
    sel_gt = gt
    if args.box_from_gt:
        same = args.gt and Path(args.gt).resolve() == Path(args.box_from_gt).resolve()
        sel_gt = gt if same and gt is not None else _read_gt(args.box_from_gt, image)
    timings["read_s"] = time.perf_counter() - t

    from medseg.predict.propagate import (
        DEFAULT_CONFIG,
        PropagationConfig,
        box_from_gt,
        oracle_dice,
        propagate,
    )

    label_value, label_name = (int(args.label) if args.label is not None else 1), "tumour"
    if sel_gt is not None:
        _, label_value, label_name = _label_selection(sel_gt, args.label)
    keys = build_key_prompts(image.shape, axis, boxes, points)
    if args.box_from_gt:
        assert sel_gt is not None
        mask, _, _ = _label_selection(sel_gt, args.label)
        keys.append(box_from_gt(mask, axis, margin))
        source.append(f"box from {args.box_from_gt}")

    # 3. model
    from medseg.predict.sam import VolumePredictor, predictor_cache_dir

    t = time.perf_counter()
    cache_dir = predictor_cache_dir(args.cache_dir if args.cache_dir else True)
    predictor = VolumePredictor(
        image,
        args.model,
        axis=axis,
        window=args.window,
        weights=args.weights,
        cache_dir=cache_dir,
        precision=args.precision,
        device=args.device,
    )
    timings["model_load_s"] = time.perf_counter() - t

    # 4. propagate
    from medseg.progress import tqdm_progress

    cfg = DEFAULT_CONFIG
    if args.no_propagate:
        cfg = PropagationConfig(**{**DEFAULT_CONFIG.to_json(), "max_slices": 0})
    t = time.perf_counter()
    with tqdm_progress("segment", enabled=not args.quiet) as cb:
        result = propagate(predictor, keys, cfg, progress=cb)
    timings["propagate_s"] = time.perf_counter() - t
    pred_lm = result.to_labelmap(image, label=label_value, name=label_name)

    # 5. write the label map
    if out_path is not None:
        from medseg.io.files import write_labels

        t = time.perf_counter()
        write_labels(pred_lm, out_path, reference=image, inputs=inputs, overwrite=args.overwrite)
        timings["write_s"] = time.perf_counter() - t

    # 6. metrics and the oracle
    metrics = None
    oracle = None
    dice = None
    if gt is not None:
        from medseg.metrics import evaluate, rows_to_json
        from medseg.volume import LabelMap

        gmask, _, _ = _label_selection(gt, args.label)
        gt_bin = LabelMap.like(
            image, gmask.astype(np.uint8) * np.uint8(label_value), {label_value: label_name}
        )
        t = time.perf_counter()
        rows = evaluate(pred_lm, gt_bin, labels={label_value: label_name})
        timings["metrics_s"] = time.perf_counter() - t
        metrics = rows_to_json(rows)
        dice = float(rows[0]["dice"])
        if args.oracle or args.box_from_gt:
            t = time.perf_counter()
            orc = oracle_dice(predictor, gmask, margin_px=margin)
            timings["oracle_s"] = time.perf_counter() - t
            oracle = orc.to_json()
            oracle["ratio"] = round(dice / orc.dice, 4) if orc.dice > 0 else None
    timings["total_s"] = time.perf_counter() - t_start

    # 7. summary and report
    n_sl = len(result.slices)
    lines = [
        f"segmented {int(result.mask.sum())} voxels on {n_sl} slice(s) along {axis} "
        f"(key slice(s) {result.key_slices}) in {timings['propagate_s']:.1f} s",
    ]
    if result.review:
        scores = result.review_scores()
        worst = ", ".join(f"{i} ({scores[i]:.2f})" for i in result.review[:3])
        lines.append(f"review first: slice {worst}")
    if dice is not None:
        line = f"Dice {dice:.4f}"
        if oracle is not None:
            line += (
                f"   (per-slice oracle-box Dice {_fmt(oracle['dice'])}, ratio "
                f"{_fmt(oracle['ratio'], 3)})"
            )
        lines.append(line)
    if out_path is not None:
        lines.append(f"wrote {out_path}")
    if json_path is not None:
        from medseg.cli.common import write_json

        model = predictor.model
        report = {
            "command": "segment",
            "image": str(args.image),
            "shape_zyx": list(image.shape),
            "spacing_zyx": list(image.spacing),
            "model": {
                "name": predictor.spec.name,
                "weights": str(model.weights_path) if model.weights_path else None,
                "weights_sha256": model.weights_sha256,
                "precision": model.precision,
                "device": str(model.device),
                "intensity": predictor.intensity.key,
            },
            "axis": axis,
            "label": {"value": label_value, "name": label_name},
            "prompt_source": source,
            "prompts": [k.to_json() for k in keys],
            "config": result.config.to_json(),
            "propagation": result.to_json(),
            "metrics": metrics,
            "dice": dice,
            "oracle": oracle,
            "gt": str(args.gt) if args.gt else None,
            "out": str(out_path) if out_path else None,
            "cache": predictor.cache_info(),
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }
        write_json(report, json_path, inputs=inputs, overwrite=args.overwrite)
        lines.append(f"wrote {json_path}")
    print("\n".join(lines), file=sys.stdout)
    return 0
