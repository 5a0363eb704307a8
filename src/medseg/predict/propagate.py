"""3D segmentation from key-slice prompts: propagate a SAM-family slice prediction along an axis.

From each key slice the object is segmented (box / points / a given mask), then followed slice by
slice up and down. Each next slice is prompted from the previous result (``carry``: a box around
the previous mask with a margin, points at the previous mask's interior, the previous low-res logits
as a mask prompt, or a combination). The walk stops when the object vanishes or when the new
slice's mask fails the consistency checks of :class:`PropagationConfig` (predicted IoU, stability,
area change, similarity of its mask-pooled embedding to the key slice's object, intensity shift,
distance from the key slice relative to the object's size). Between two key slices the gap is filled
from both ends; a slice reached from two key slices takes the prediction whose mask looks more
like its own key object than like that object's surroundings (the larger embedding ``margin``;
``resolve="nearer"``: the nearer key slice, ``"score"``: the higher predicted IoU).

The defaults were chosen by measurement (``benchmarks/bench_propagation.py``; the results are in
``benchmarks/results/propagation*.json``) on three real cases and on synthetic phantoms.

Shapes: volumes are ``(z, y, x)``; a slice along ``axis`` is ``(rows, cols)`` (axial: ``(y, x)``);
boxes are ``(r0, c0, r1, c1)`` inclusive slice pixels. Importing this module does not import torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import PromptError
from medseg.predict.frame import (
    axis_index,
    check_index,
    set_slice,
    slice_of,
    slice_spacing,
)

if TYPE_CHECKING:
    from medseg.predict.sam import SlicePrediction, VolumePredictor
    from medseg.progress import ProgressCallback
    from medseg.volume import LabelMap, Volume

#: Prompt kinds that can be carried from one slice to the next.
CARRY_KINDS = ("box", "points", "mask")
#: How a slice reached from two key slices picks its prediction (see ``PropagationConfig.resolve``).
RESOLVE_RULES = ("margin", "nearer", "score")


# --------------------------------------------------------------------------- inputs
@dataclass
class KeyPrompt:
    """The user's prompt on one key slice (slice-frame coordinates).

    Attributes:
        index: slice index along the propagation axis.
        box_rc: ``(r0, c0, r1, c1)`` inclusive pixel box (axial: ``(y0, x0, y1, x1)``).
        points_rc: ``(N, 2)`` ``(row, col)`` points.
        point_labels: ``(N,)`` 1 foreground / 0 background (default all 1).
        mask: ``(rows, cols)`` bool: a finished key-slice mask, used as is (no model call).
        bounds: ``(lo, hi)`` inclusive slice range the object lies in (a box's ``z_min``/
            ``z_max``): propagation never leaves it, and inside it only "vanished" stops a walk.
    """

    index: int
    box_rc: tuple[float, float, float, float] | None = None
    points_rc: Any = None
    point_labels: Any = None
    mask: np.ndarray | None = None
    bounds: tuple[int, int] | None = None

    def has_prompt(self) -> bool:
        """Whether any prompt is set."""
        pts = self.points_rc is not None and np.asarray(self.points_rc).size > 0
        return self.box_rc is not None or pts or self.mask is not None

    def to_json(self) -> dict[str, Any]:
        """JSON-safe description (the mask as its pixel count)."""
        out: dict[str, Any] = {"index": int(self.index)}
        if self.box_rc is not None:
            out["box_rc"] = [float(v) for v in self.box_rc]
        if self.points_rc is not None and np.asarray(self.points_rc).size:
            out["points_rc"] = np.asarray(self.points_rc, dtype=float).reshape(-1, 2).tolist()
            labels = self.point_labels
            n = len(out["points_rc"])
            out["point_labels"] = (
                [1] * n if labels is None else [int(v) for v in np.asarray(labels).reshape(-1)]
            )
        if self.mask is not None:
            out["mask_voxels"] = int(np.count_nonzero(self.mask))
        if self.bounds is not None:
            out["bounds"] = [int(v) for v in self.bounds]
        return out


@dataclass
class PropagationConfig:
    """How to carry prompts from slice to slice and when to stop.

    The defaults are the configuration chosen by measurement (:data:`DEFAULT_CONFIG`).

    Carry-over:
        carry: ``'+'``-joined kinds from :data:`CARRY_KINDS` (e.g. ``'box'``, ``'box+mask'``).
        box_margin: margin added around the previous mask's bounding box, as a fraction of its
            size per side.
        box_margin_px: extra margin in pixels per side.
        negative_points: with ``points``, add negatives just outside the margin box (4 corners).
        alternatives: further carry-overs tried on every slice (e.g. ``("box+points",)``);
            together with ``carry`` (and the three masks of each with ``multimask``) they give
            candidate masks, of which one is kept.
        select: how the candidate is chosen: ``'iou'`` (highest predicted IoU) or
            ``'similarity'`` (mask-pooled embedding most similar to the key slice's object;
            predicted IoU breaks ties).
        multimask: ask for three masks per prompt (candidates, see ``select``).
        alternatives_below: try the ``alternatives`` only when the ``carry`` prompt's best
            mask has a similarity to the key slice's object below this (``None``: always try
            them). Each alternative costs one more decoder call per slice. 0.9 (default):
            1.61 instead of 1.93 decoder calls per slice over 3 real cases and 17 phantom
            objects, mean 3D Dice 0.6715 vs 0.6605, no case more than 0.006 lower
            (``benchmarks/bench_speed_decoder.py``, ``results/speed_decoder.json``).

    Stop rule (a slice is rejected, and the walk stops, when any check fails; ``None`` disables a
    check):
        min_area_px: smaller masks mean the object vanished.
        min_iou: minimum predicted IoU.
        min_stability: minimum stability score.
        min_area_ratio / max_area_ratio: area vs the previous slice.
        min_similarity: cosine similarity of the mask-pooled embedding to the key slice's object.
        max_intensity_shift: ``|mean - key mean|`` of the model-input intensity ([0, 1]) inside
            the mask.
        min_overlap: 2D IoU between the new mask and the previous one.
        max_extent: distance from the key slice (mm) over the key object's equivalent diameter.
        min_consistency: minimum of ``similarity - consistency_weight * intensity_shift``: the
            object must look like the key slice's object in the model's features and in
            brightness together.
        consistency_weight: weight of the intensity shift in the consistency.
        min_margin: minimum of ``similarity - bg_similarity``: the new mask must look more like
            the key slice's object than like the key object's surroundings (a ring around it).
        patience: after a slice fails a check (other than "vanished"), look at up to this many
            further slices (prompted from the doubtful one); if one of them passes, the doubtful
            slices are kept and the walk goes on, else the walk stops at the first doubtful one.
        max_slices: most slices to walk from a key slice in each direction.
        between_keys_stop: ``'vanish'`` (only an empty mask stops a walk between two key slices)
            or ``'full'`` (the full stop rule there too).
        resolve: which prediction wins a slice reached from two key slices: ``'margin'`` (the
            larger embedding margin; on brain1 with a second box on slice 11: Dice 0.71 with
            ``'nearer'``, 0.82 with ``'margin'``; on slice 12: 0.82 -> 0.86), ``'nearer'`` or
            ``'score'`` (the higher predicted IoU).
        review_count: length of :attr:`PropagationResult.review`.
    """

    carry: str = "box"
    alternatives: tuple[str, ...] = ("box+points",)
    select: str = "similarity"
    box_margin: float = 0.1
    box_margin_px: float = 2.0
    negative_points: bool = False
    multimask: bool = False
    alternatives_below: float | None = 0.9
    min_area_px: int = 4
    min_iou: float | None = None
    min_stability: float | None = None
    min_area_ratio: float | None = None
    max_area_ratio: float | None = None
    min_similarity: float | None = None
    max_intensity_shift: float | None = 0.15
    min_overlap: float | None = None
    max_extent: float | None = 1.5
    min_consistency: float | None = None
    consistency_weight: float = 2.0
    min_margin: float | None = 0.0
    patience: int = 1
    max_slices: int | None = None
    between_keys_stop: str = "vanish"
    resolve: str = "margin"
    review_count: int = 5

    def __post_init__(self) -> None:
        self.alternatives = tuple(self.alternatives)
        for c in (self.carry, *self.alternatives):
            kinds = _kinds(c)
            if not kinds or any(k not in CARRY_KINDS for k in kinds):
                raise PromptError(
                    f"carry {c!r}: use '+'-joined kinds from {', '.join(CARRY_KINDS)}"
                )
        if self.select not in ("iou", "similarity"):
            raise PromptError("select must be 'iou' or 'similarity'")
        if self.between_keys_stop not in ("vanish", "full"):
            raise PromptError("between_keys_stop must be 'vanish' or 'full'")
        if self.resolve not in RESOLVE_RULES:
            raise PromptError(f"resolve must be one of {', '.join(RESOLVE_RULES)}")

    @property
    def carry_kinds(self) -> tuple[str, ...]:
        """The carry-over kinds of ``carry`` as a tuple."""
        return _kinds(self.carry)

    def to_json(self) -> dict[str, Any]:
        """The configuration as a plain dict."""
        return asdict(self)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -math.inf


def _kinds(carry: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in str(carry).split("+") if k.strip())


#: The default configuration, chosen by ``benchmarks/bench_propagation.py`` on three real cases
#: and ten phantom objects: carry the box (and try box + interior point, keeping the mask most
#: like the key object), stop when the mask looks more like the key object's surroundings than
#: like the object (margin < 0, one slice of patience) or its brightness shifts by > 0.15, and
#: never go further from the key slice than 1.5 x the key object's diameter (a safety net). The
#: box + point alternative is tried only where the box's mask has similarity < 0.9 to the key
#: object (``bench_speed_decoder.py``: 17 % fewer decoder calls, Dice as before or better).
DEFAULT_CONFIG = PropagationConfig()

#: The naive loop the issue started from: box from the previous mask, stop at predicted IoU < 0.5.
NAIVE_CONFIG = PropagationConfig(
    carry="box",
    alternatives=(),
    select="iou",
    min_iou=0.5,
    max_intensity_shift=None,
    min_margin=None,
    max_extent=None,
    patience=0,
)

#: No stop check except "the mask vanished" (used to record whole chains in the benchmark).
NO_STOP = {
    "min_iou": None,
    "min_stability": None,
    "min_area_ratio": None,
    "max_area_ratio": None,
    "min_similarity": None,
    "max_intensity_shift": None,
    "min_overlap": None,
    "max_extent": None,
    "min_consistency": None,
    "min_margin": None,
}


# --------------------------------------------------------------------------- outputs
@dataclass
class SliceRecord:
    """What happened on one slice.

    Attributes:
        index: slice index along the axis.
        source: index of the key slice this prediction came from.
        distance: slices from that key slice (0 on the key slice).
        accepted: whether the mask is part of the result.
        iou_pred: the model's predicted IoU.
        stability: stability score of the mask.
        area_px: mask pixels.
        area_ratio: area / previous slice's area (1 on the key slice).
        similarity: cosine similarity of the mask-pooled embedding to the key object's.
        bg_similarity: the same to the key object's surroundings (a ring around its mask);
            ``similarity - bg_similarity`` is the "margin" of the stop rule.
        intensity: mean model-input intensity ([0, 1]) inside the mask.
        intensity_shift: ``|intensity - key intensity|``.
        overlap: 2D IoU with the previous slice's mask (1 on the key slice).
        extent: distance from the key slice in mm / key object's equivalent diameter in mm.
        stopped: why the walk stopped here (``None`` for an accepted slice).
        review_score: 0 (trustworthy) .. 1 (check this slice); see :func:`review_score`.
    """

    index: int
    source: int
    distance: int
    accepted: bool
    iou_pred: float
    stability: float
    area_px: int
    area_ratio: float
    similarity: float
    intensity: float
    intensity_shift: float
    overlap: float
    extent: float
    bg_similarity: float = 0.0
    stopped: str | None = None
    review_score: float = 0.0

    @property
    def margin(self) -> float:
        """``similarity - bg_similarity``."""
        return self.similarity - self.bg_similarity

    def to_json(self) -> dict[str, Any]:
        """Plain dict with rounded floats (plus ``margin``)."""
        out = asdict(self)
        out["margin"] = self.margin
        for k, v in out.items():
            if isinstance(v, float):
                out[k] = round(v, 4) if math.isfinite(v) else None
        return out


@dataclass
class PropagationResult:
    """A 3D mask from key-slice prompts.

    Attributes:
        mask: ``(z, y, x)`` bool on the volume's grid (assembled along the predictor's axis).
        records: every slice predicted (accepted ones and the slice where a walk stopped), sorted
            by index then source.
        review: accepted slice indices to check first, worst first (by ``review_score``).
        axis: ``'z'``, ``'y'`` or ``'x'``.
        key_slices: indices of the key slices.
        config: the configuration used.
        seconds: wall time.
    """

    mask: np.ndarray
    records: list[SliceRecord]
    review: list[int]
    axis: str
    key_slices: list[int]
    config: PropagationConfig
    seconds: float = 0.0

    @property
    def slices(self) -> list[int]:
        """Accepted (non-empty) slice indices along the axis, sorted."""
        return sorted({r.index for r in self.records if r.accepted})

    def review_scores(self) -> dict[int, float]:
        """``{slice: review_score}`` of the accepted slices."""
        return {r.index: r.review_score for r in self.records if r.accepted}

    def to_labelmap(self, volume: Volume, label: int = 1, name: str = "tumour") -> LabelMap:
        """The mask as a :class:`~medseg.volume.LabelMap` on ``volume``'s grid."""
        from medseg.volume import LabelMap

        arr = self.mask.astype(np.uint8) * np.uint8(label)
        return LabelMap.like(volume, arr, {int(label): name}, source="medseg propagate")

    def to_json(self) -> dict[str, Any]:
        """Summary for reports: config, key slices, records, review list with scores."""
        scores = self.review_scores()
        return {
            "axis": self.axis,
            "key_slices": list(self.key_slices),
            "config": self.config.to_json(),
            "slices": self.slices,
            "voxels": int(np.count_nonzero(self.mask)),
            "records": [r.to_json() for r in self.records],
            "review": [{"index": i, "review_score": round(scores[i], 4)} for i in self.review],
            "seconds": round(self.seconds, 3),
        }


# --------------------------------------------------------------------------- helpers
def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive bounding box ``(r0, c0, r1, c1)`` of a 2D mask, ``None`` when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def expand_box(
    box: Sequence[float], shape: tuple[int, int], frac: float = 0.0, px: float = 0.0
) -> tuple[float, float, float, float]:
    """Grow ``(r0, c0, r1, c1)`` by ``frac`` of its size plus ``px`` per side, clipped to
    ``shape``."""
    r0, c0, r1, c1 = (float(v) for v in box)
    dr = frac * (r1 - r0 + 1) + px
    dc = frac * (c1 - c0 + 1) + px
    h, w = shape
    r0, r1 = max(0.0, r0 - dr), min(h - 1.0, r1 + dr)
    c0, c1 = max(0.0, c0 - dc), min(w - 1.0, c1 + dc)
    if r1 <= r0 and c1 <= c0:  # one pixel: give the model a non-degenerate box
        r1, c1 = min(h - 1.0, r0 + 1), min(w - 1.0, c0 + 1)
    return r0, c0, r1, c1


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """``(row, col)`` of the mask pixel farthest from the background (distance-transform max)."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(r), float(c)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a 2D mask."""
    from scipy import ndimage

    lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask
    sizes = np.bincount(lab.ravel())[1:]
    return lab == (int(np.argmax(sizes)) + 1)


def surroundings(mask: np.ndarray) -> np.ndarray:
    """A ring around a 2D mask: dilated by half its equivalent radius (at least 3 px) minus
    the mask itself."""
    from scipy import ndimage

    area = int(np.count_nonzero(mask))
    if area == 0:
        return mask.copy()
    r = max(3, round(0.5 * math.sqrt(area / math.pi)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = yy**2 + xx**2 <= r * r
    return ndimage.binary_dilation(mask, structure=disk) & ~mask


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def _iou2d(a: np.ndarray, b: np.ndarray) -> float:
    inter = int(np.count_nonzero(a & b))
    union = int(np.count_nonzero(a | b))
    return inter / union if union else 1.0


def stop_reason(rec: SliceRecord, cfg: PropagationConfig, full: bool = True) -> str | None:
    """The first failed check of the stop rule for a candidate slice, or ``None`` to accept it.

    Args:
        rec: the candidate slice's record (``distance >= 1``).
        cfg: thresholds.
        full: apply every check (``False``: only "vanished", used between two key slices).
    """
    if rec.area_px < max(1, cfg.min_area_px):
        return "vanished"
    if cfg.max_slices is not None and rec.distance > cfg.max_slices:
        return f"distance>{cfg.max_slices}"
    if not full:
        return None
    checks: list[tuple[float | None, float, str, bool]] = [
        (cfg.min_iou, rec.iou_pred, "iou_pred", True),
        (cfg.min_stability, rec.stability, "stability", True),
        (cfg.min_area_ratio, rec.area_ratio, "area_ratio", True),
        (cfg.max_area_ratio, rec.area_ratio, "area_ratio", False),
        (cfg.min_similarity, rec.similarity, "similarity", True),
        (cfg.max_intensity_shift, rec.intensity_shift, "intensity_shift", False),
        (cfg.min_overlap, rec.overlap, "overlap", True),
        (cfg.max_extent, rec.extent, "extent", False),
        (
            cfg.min_consistency,
            rec.similarity - cfg.consistency_weight * rec.intensity_shift,
            "consistency",
            True,
        ),
        (cfg.min_margin, rec.margin, "margin", True),
    ]
    for thr, val, name, is_min in checks:
        if thr is None:
            continue
        if is_min and val < thr:
            return f"{name}<{thr:g}"
        if not is_min and val > thr:
            return f"{name}>{thr:g}"
    return None


def review_score(rec: SliceRecord) -> float:
    """How much a slice needs a human look: 0 (trustworthy) .. 1.

    The mean of four shortfalls, each clipped to [0, 1]: ``1 - iou_pred``, ``1 - stability``,
    ``(1 - similarity) * 2`` and ``|log2(area_ratio)| / 2``; the key slices' own prompts count as
    trusted for the last two. Slices far from their key slice get a small extra (``0.02`` per
    slice).
    """
    parts = [
        1.0 - rec.iou_pred,
        1.0 - rec.stability,
        (1.0 - rec.similarity) * 2.0,
        abs(math.log2(max(rec.area_ratio, 1e-6))) / 2.0,
    ]
    s = float(np.mean([min(1.0, max(0.0, p)) for p in parts])) + 0.02 * rec.distance
    return min(1.0, max(0.0, s))


# --------------------------------------------------------------------------- the walk
@dataclass
class _Ref:
    """What the key slice's object looks like."""

    index: int
    embedding: np.ndarray
    background: np.ndarray
    intensity: float
    diameter_mm: float


@dataclass
class _Step:
    record: SliceRecord
    mask: np.ndarray
    logits: np.ndarray


class _Walker:
    def __init__(self, predictor: VolumePredictor, cfg: PropagationConfig) -> None:
        self.p = predictor
        self.cfg = cfg
        self.ax = axis_index(predictor.axis)
        self.spacing_mm = float(predictor.volume.spacing[self.ax])
        row_mm, col_mm = slice_spacing(predictor.volume.spacing, self.ax)
        self.pixel_mm2 = row_mm * col_mm
        self.intensity_cache: dict[int, np.ndarray] = {}

    def slice_intensity(self, index: int) -> np.ndarray:
        hit = self.intensity_cache.get(index)
        if hit is None:
            hit = self.p.intensity.apply(slice_of(self.p.volume.array, self.ax, index))
            self.intensity_cache[index] = hit
        return hit

    def mean_intensity(self, index: int, mask: np.ndarray) -> float:
        if not mask.any():
            return float("nan")
        return float(self.slice_intensity(index)[mask].mean())

    def pick(self, pred: SlicePrediction) -> tuple[np.ndarray, np.ndarray, float, float]:
        k = pred.best() if pred.masks.shape[0] > 1 else 0
        return (
            pred.masks[k],
            pred.low_res_logits[k],
            float(pred.iou_pred[k]),
            float(pred.stability[k]),
        )

    def key_step(self, kp: KeyPrompt) -> tuple[_Step, _Ref]:
        idx = kp.index
        if kp.mask is not None:
            mask = np.asarray(kp.mask, dtype=bool)
            if mask.shape != tuple(self.p.slice_shape):
                raise PromptError(
                    f"key mask on slice {idx} has shape {mask.shape}; the slice is "
                    f"{tuple(self.p.slice_shape)}"
                )
            logits = self.p.mask_prompt(mask)
            iou, stab = 1.0, 1.0
        else:
            n_pts = 0 if kp.points_rc is None else int(np.asarray(kp.points_rc).size // 2)
            multimask = kp.box_rc is None and n_pts <= 1  # one click is ambiguous
            pred = self.p.predict(
                idx,
                points_rc=kp.points_rc,
                point_labels=kp.point_labels,
                box_rc=kp.box_rc,
                multimask=multimask,
            )
            mask, logits, iou, stab = self.pick(pred)
        area = int(np.count_nonzero(mask))
        emb = self.p.object_embedding(idx, mask)
        inten = self.mean_intensity(idx, mask)
        diameter = 2.0 * math.sqrt(area * self.pixel_mm2 / math.pi) if area else 0.0
        bg = self.p.object_embedding(idx, surroundings(mask))
        ref = _Ref(idx, emb, bg, inten, diameter)
        rec = SliceRecord(
            index=idx,
            source=idx,
            distance=0,
            accepted=area > 0,
            iou_pred=iou,
            stability=stab,
            area_px=area,
            area_ratio=1.0,
            similarity=1.0,
            intensity=inten,
            intensity_shift=0.0,
            overlap=1.0,
            extent=0.0,
            bg_similarity=_cos(emb, bg),
            stopped=None if area > 0 else "vanished",
        )
        rec.review_score = review_score(rec)
        return _Step(rec, mask, logits), ref

    def prompts_from(self, prev: _Step, carry: str) -> dict[str, Any]:
        cfg = self.cfg
        kinds = _kinds(carry)
        out: dict[str, Any] = {}
        bbox = mask_box(prev.mask)
        assert bbox is not None
        box = expand_box(bbox, self.p.slice_shape, cfg.box_margin, cfg.box_margin_px)
        if "box" in kinds:
            out["box_rc"] = box
        if "points" in kinds:
            pts = [interior_point(largest_component(prev.mask))]
            labels = [1]
            if cfg.negative_points:
                r0, c0, r1, c1 = expand_box(
                    bbox, self.p.slice_shape, cfg.box_margin * 2, cfg.box_margin_px * 2 + 2
                )
                for r, c in ((r0, c0), (r0, c1), (r1, c0), (r1, c1)):
                    if not prev.mask[int(r), int(c)]:
                        pts.append((r, c))
                        labels.append(0)
            out["points_rc"] = np.asarray(pts, dtype=float)
            out["point_labels"] = np.asarray(labels)
        if "mask" in kinds:
            out["mask_logits"] = prev.logits
        return out

    def candidates(
        self, index: int, prev: _Step, ref: _Ref
    ) -> tuple[np.ndarray, np.ndarray, float, float, float, float]:
        """``(mask, logits, iou_pred, stability, similarity, bg_similarity)`` of the chosen
        candidate."""
        cfg = self.cfg
        best: tuple[Any, ...] | None = None
        for n, carry in enumerate((cfg.carry, *cfg.alternatives)):
            if (
                n > 0
                and cfg.alternatives_below is not None
                and best is not None
                and math.isfinite(best[5])
                and best[5] >= cfg.alternatives_below
            ):
                break  # the carry's mask already looks like the key object: no alternatives
            pred = self.p.predict(index, multimask=cfg.multimask, **self.prompts_from(prev, carry))
            ks = range(pred.masks.shape[0])
            if cfg.select == "iou":
                ks = [pred.best()]
            for k in ks:
                mask = pred.masks[k]
                iou = float(pred.iou_pred[k])
                if cfg.select == "similarity" or len(cfg.alternatives) == 0:
                    sim = (
                        _cos(self.p.object_embedding(index, mask), ref.embedding)
                        if mask.any()
                        else 0.0
                    )
                else:
                    sim = float("nan")
                score = (sim, iou) if cfg.select == "similarity" else (iou, 0.0)
                if best is None or score > best[0]:
                    best = (score, mask, pred.low_res_logits[k], iou, float(pred.stability[k]), sim)
        assert best is not None
        _, mask, logits, iou, stab, sim = best
        bg_sim = 0.0
        if mask.any():
            vec = self.p.object_embedding(index, mask)
            sim = _cos(vec, ref.embedding)
            bg_sim = _cos(vec, ref.background)
        else:
            sim = 0.0
        return mask, logits, iou, stab, sim, bg_sim

    def step(self, index: int, prev: _Step, ref: _Ref, distance: int) -> _Step:
        mask, logits, iou, stab, sim, bg_sim = self.candidates(index, prev, ref)
        area = int(np.count_nonzero(mask))
        inten = self.mean_intensity(index, mask)
        shift = abs(inten - ref.intensity) if area and math.isfinite(ref.intensity) else 1.0
        extent = (
            distance * self.spacing_mm / ref.diameter_mm if ref.diameter_mm > 0 else float("inf")
        )
        prev_area = max(1, prev.record.area_px)
        rec = SliceRecord(
            index=index,
            source=ref.index,
            distance=distance,
            accepted=True,
            iou_pred=iou,
            stability=stab,
            area_px=area,
            area_ratio=area / prev_area,
            similarity=sim,
            intensity=inten,
            intensity_shift=shift,
            overlap=_iou2d(mask, prev.mask),
            extent=extent,
            bg_similarity=bg_sim,
        )
        return _Step(rec, mask, logits)

    def walk(
        self, start: _Step, ref: _Ref, direction: int, limit: int, full: bool, tick: Any
    ) -> list[_Step]:
        """Walk from ``start`` towards ``limit`` (inclusive); the last step may be a rejection."""
        out: list[_Step] = []
        pending: list[tuple[_Step, str]] = []  # doubtful steps waiting for a passing one
        prev = start
        idx = start.record.index + direction
        dist = 1
        while (direction > 0 and idx <= limit) or (direction < 0 and idx >= limit):
            if self.cfg.max_slices is not None and dist > self.cfg.max_slices:
                break
            st = self.step(idx, prev, ref, dist)
            tick()
            reason = stop_reason(st.record, self.cfg, full=full)
            if reason is None:
                for p, _ in pending:
                    p.record.review_score = review_score(p.record)
                    out.append(p)
                pending = []
                st.record.review_score = review_score(st.record)
                out.append(st)
            else:
                hard = reason == "vanished" or reason.startswith("distance")
                if hard or len(pending) >= max(0, self.cfg.patience):
                    pending.append((st, reason))
                    for p, why in pending:
                        p.record.accepted = False
                        p.record.stopped = why
                        out.append(p)
                    return out
                pending.append((st, reason))
            prev = st
            idx += direction
            dist += 1
        for p, why in pending:  # ran out of slices while in doubt
            p.record.accepted = False
            p.record.stopped = why
            out.append(p)
        return out


def _merge_keys(keys: Sequence[KeyPrompt]) -> list[KeyPrompt]:
    """One prompt per slice: boxes must be unique per slice; points are concatenated."""
    by: dict[int, KeyPrompt] = {}
    for kp in keys:
        idx = int(kp.index)
        if idx not in by:
            by[idx] = replace(kp, index=idx)
            continue
        cur = by[idx]
        if kp.box_rc is not None and cur.box_rc is not None:
            raise PromptError(f"two boxes on key slice {idx}; give one box per slice")
        if kp.mask is not None and cur.mask is not None:
            raise PromptError(f"two masks on key slice {idx}; give one mask per slice")
        pts = [
            np.asarray(x.points_rc, float).reshape(-1, 2)
            for x in (cur, kp)
            if x.points_rc is not None
        ]
        labs = [
            np.ones(len(np.asarray(x.points_rc).reshape(-1, 2)), int)
            if x.point_labels is None
            else np.asarray(x.point_labels, int).reshape(-1)
            for x in (cur, kp)
            if x.points_rc is not None
        ]
        by[idx] = KeyPrompt(
            idx,
            box_rc=cur.box_rc if cur.box_rc is not None else kp.box_rc,
            points_rc=np.concatenate(pts) if pts else None,
            point_labels=np.concatenate(labs) if labs else None,
            mask=cur.mask if cur.mask is not None else kp.mask,
            bounds=_union_bounds([cur.bounds, kp.bounds]),
        )
    return [by[i] for i in sorted(by)]


def _union_bounds(bounds: Sequence[tuple[int, int] | None]) -> tuple[int, int] | None:
    """The smallest range holding every given ``(lo, hi)`` (``None`` when none is given)."""
    given = [b for b in bounds if b is not None]
    if not given:
        return None
    return min(int(b[0]) for b in given), max(int(b[1]) for b in given)


def propagate(
    predictor: VolumePredictor,
    key_prompts: Sequence[KeyPrompt],
    config: PropagationConfig | None = None,
    progress: ProgressCallback | None = None,
) -> PropagationResult:
    """Segment an object in 3D from prompts on one or more key slices.

    Args:
        predictor: a :class:`~medseg.predict.sam.VolumePredictor` built for the propagation axis.
        key_prompts: prompts in slice pixels; several on one slice are merged (points joined).
        config: carry-over and stop rule (default :class:`PropagationConfig`).
        progress: ``progress(done, total)`` after each slice (``total`` is an upper bound until
            the end); raising inside it cancels.

    Returns:
        :class:`PropagationResult` with the ``(z, y, x)`` mask on the volume's grid.

    Raises:
        PromptError: no prompt, a prompt outside the slice, a slice index out of range.
    """
    cfg = config or DEFAULT_CONFIG
    t0 = time.perf_counter()
    if not key_prompts:
        raise PromptError("no key-slice prompt: give at least one box, point or mask")
    for kp in key_prompts:
        check_index(kp.index, predictor.n_slices, predictor.axis)
        if not kp.has_prompt():
            raise PromptError(f"key slice {kp.index} has no prompt (box, points or mask)")
    keys = _merge_keys(key_prompts)
    n = predictor.n_slices
    walker = _Walker(predictor, cfg)
    bounds = _union_bounds([kp.bounds for kp in keys])
    b_lo, b_hi = bounds if bounds is not None else (0, n - 1)
    b_lo, b_hi = max(0, b_lo), min(n - 1, b_hi)

    done = [0]
    reach = cfg.max_slices if cfg.max_slices is not None else n
    lo_lim = max(b_lo, keys[0].index - reach)
    hi_lim = min(b_hi, keys[-1].index + reach)
    total = hi_lim - lo_lim + 1

    def tick() -> None:
        done[0] += 1
        if progress is not None:
            progress(min(done[0], total), total)

    if progress is not None:
        progress(0, total)
    starts: list[tuple[_Step, _Ref]] = []
    for kp in keys:
        starts.append(walker.key_step(kp))
        tick()

    chains: dict[int, list[_Step]] = {kp.index: [] for kp in keys}
    for j, (st, ref) in enumerate(starts):
        if st.record.area_px == 0:
            continue
        below = keys[j - 1].index + 1 if j > 0 else b_lo
        above = keys[j + 1].index - 1 if j + 1 < len(keys) else b_hi
        # inside a given range the object is known to be there: only "vanished" stops
        outer = bounds is None or cfg.between_keys_stop == "full"
        chains[st.record.index] += walker.walk(
            st,
            ref,
            -1,
            below,
            full=(j == 0 and outer) or cfg.between_keys_stop == "full",
            tick=tick,
        )
        chains[st.record.index] += walker.walk(
            st,
            ref,
            +1,
            above,
            full=(j + 1 == len(keys) and outer) or cfg.between_keys_stop == "full",
            tick=tick,
        )

    # resolve: every slice gets at most one accepted prediction
    winners: dict[int, _Step] = {st.record.index: st for st, _ in starts if st.record.accepted}
    candidates: dict[int, list[_Step]] = {}
    for steps in chains.values():
        for st in steps:
            if st.record.accepted and st.record.index not in winners:
                candidates.setdefault(st.record.index, []).append(st)
    for idx, cands in candidates.items():
        if cfg.resolve == "score":
            best = max(cands, key=lambda s: (s.record.iou_pred, -s.record.distance))
        elif cfg.resolve == "margin":
            best = max(cands, key=lambda s: (_finite(s.record.margin), -s.record.distance))
        else:
            best = min(cands, key=lambda s: (s.record.distance, -s.record.iou_pred))
        winners[idx] = best
    records: list[SliceRecord] = [st.record for st, _ in starts]
    for steps in chains.values():
        for st in steps:
            if st.record.accepted and winners.get(st.record.index) is not st:
                st.record.accepted = False
                st.record.stopped = "superseded"
            records.append(st.record)
    records.sort(key=lambda r: (r.index, r.distance, r.source))

    mask = np.zeros(predictor.volume.shape, dtype=bool)
    for idx, st in winners.items():
        set_slice(mask, walker.ax, idx, st.mask)
    key_set = {kp.index for kp in keys}
    scored = [(st.record.review_score, idx) for idx, st in winners.items() if idx not in key_set]
    scored.sort(key=lambda t: (-t[0], t[1]))
    review = [idx for _, idx in scored[: max(0, cfg.review_count)]]
    if progress is not None:
        progress(total, total)
    return PropagationResult(
        mask=mask,
        records=records,
        review=review,
        axis=predictor.axis,
        key_slices=sorted(key_set),
        config=cfg,
        seconds=time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- local re-propagation
#: With ``region``: apply the local change even where the new slice result is within ``settle``
#: of the current one (the walk then stops only where no changed piece overlaps).
LOCAL_PAST_SETTLE = True


@dataclass
class LocalResult:
    """A 3D mask after one slice was corrected and the change carried outward.

    Attributes:
        mask: ``(z, y, x)`` bool: the updated mask (a new array; the input is not modified).
        changed: slice indices (along the axis) whose mask was rewritten, the start slice first.
        records: the engine's record of every slice predicted (rewritten or where a walk ended).
        stopped: ``{"-1": why, "+1": why}``: why each walk ended (``"settled"``: the new result
            equalled the current one; ``"kept"``: the current one should stay (``change``);
            ``"anchor"``: a slice the user prompted; ``"range"``: the
            bound or the volume's end; ``"cleared"``: the end of a run of slices cleared; or the
            stop rule's reason).
        seconds: wall time.
    """

    mask: np.ndarray
    changed: list[int]
    records: list[SliceRecord]
    stopped: dict[str, str]
    seconds: float = 0.0


def repropagate(
    predictor: VolumePredictor,
    current: np.ndarray,
    index: int,
    slice_mask: np.ndarray,
    *,
    directions: Sequence[int] = (-1, 1),
    bounds: tuple[int, int] | None = None,
    anchors: Sequence[int] = (),
    config: PropagationConfig | None = None,
    settle: float = 0.9,
    change: str | None = None,
    region: np.ndarray | None = None,
) -> LocalResult:
    """Set slice ``index`` to ``slice_mask`` and re-propagate outward only while the result changes.

    The same walk as :func:`propagate` (carry-over, candidates and stop rule of ``config``), but
    starting from a corrected slice of an existing mask: each next slice is predicted from the
    previous new one and compared with the current mask there; the walk stops (leaving that slice
    and everything beyond it as it was) once they agree (2D Dice ``>= settle``), once the current
    mask should stay (see ``change``), at a slice in ``anchors``,
    at the end of ``bounds``, or when the stop rule rejects the slice. An empty
    ``slice_mask`` carries nothing: the walks then clear the run of non-empty slices next to
    ``index`` in ``directions`` (up to an anchor or an empty slice).

    Args:
        predictor: built for the propagation axis (embeddings cached in it are reused).
        current: ``(z, y, x)`` bool mask on the volume's grid.
        index: the corrected slice along ``predictor.axis``.
        slice_mask: ``(rows, cols)`` bool: its new mask.
        directions: ``-1`` (towards lower indices) and/or ``+1``.
        bounds: ``(lo, hi)`` inclusive slice range to stay in (inside it only "vanished" stops).
        anchors: slices never rewritten (the user's prompted slices).
        config: carry-over and stop rule (default :data:`DEFAULT_CONFIG`).
        settle: 2D Dice between new and current result at which a walk stops.
        change: what the correction did, and so what a carried change may do on a non-empty
            slice: ``"grow"`` (a foreground click: only grow it), ``"shrink"`` (a background
            click: only shrink it) or ``None`` (replace it when the new mask looks more like the
            corrected slice's object).
        region: with ``change``: ``(rows, cols)`` bool, the pixels the correction changed on
            ``index``. A carried change is then local too: on a non-empty slice only the
            8-connected pieces of the difference (new minus current for ``"grow"``, current
            minus new for ``"shrink"``) that overlap the previous slice's changed pixels are
            applied (a shrink keeping at least half of the slice's mask), and the walk stops
            (``"kept"``) where none does.

    Returns:
        :class:`LocalResult`.

    Raises:
        PromptError: slice index out of range, a mask of the wrong shape.
    """
    cfg = config or DEFAULT_CONFIG
    t0 = time.perf_counter()
    n = predictor.n_slices
    index = check_index(index, n, predictor.axis)
    cur = np.asarray(current, dtype=bool)
    if cur.shape != tuple(predictor.volume.shape):
        raise PromptError(
            f"current mask shape {cur.shape} is not the image's {predictor.volume.shape}"
        )
    sm = np.asarray(slice_mask, dtype=bool)
    if sm.shape != tuple(predictor.slice_shape):
        raise PromptError(
            f"slice mask shape {sm.shape}; slices along {predictor.axis} are "
            f"{tuple(predictor.slice_shape)}"
        )
    walker = _Walker(predictor, cfg)
    ax = walker.ax
    lo, hi = (0, n - 1) if bounds is None else (max(0, bounds[0]), min(n - 1, bounds[1]))
    fixed = {int(a) for a in anchors} - {index}
    out = cur.copy()
    set_slice(out, ax, index, sm)
    changed = [index]
    records: list[SliceRecord] = []
    stopped: dict[str, str] = {}
    start: _Step | None = None
    ref: _Ref | None = None
    if sm.any():
        start, ref = walker.key_step(KeyPrompt(index, mask=sm))
        records.append(start.record)
    for d in directions:
        d = 1 if d > 0 else -1
        idx, dist, prev = index + d, 1, start
        reg = None if region is None else np.asarray(region, dtype=bool)
        why = "range"
        while lo <= idx <= hi:
            if idx in fixed:
                why = "anchor"
                break
            now = slice_of(out, ax, idx)
            if prev is None or ref is None:  # nothing to carry: clear the run next to index
                if not now.any():
                    why = "cleared"
                    break
                set_slice(out, ax, idx, np.zeros_like(now))
                changed.append(idx)
            else:
                st = walker.step(idx, prev, ref, dist)
                reason = stop_reason(st.record, cfg, full=bounds is None)
                records.append(st.record)
                if reason is not None:
                    st.record.accepted, st.record.stopped = False, reason
                    why = reason
                    break
                local_mode = region is not None and change in ("grow", "shrink") and now.any()
                if not (local_mode and LOCAL_PAST_SETTLE) and dice3d(st.mask, now) >= settle:
                    st.record.accepted, st.record.stopped = False, "settled"
                    why = "settled"
                    break
                if local_mode:
                    local = _local_change(now, st.mask, reg, change)
                    if local is None:
                        st.record.accepted, st.record.stopped = False, "kept"
                        why = "kept"
                        break
                    reg = local ^ now
                    st = _Step(st.record, local, st.logits)
                elif (
                    now.any()
                    and st.mask.any()
                    and not _better(predictor, idx, st, now, ref, change)
                ):
                    st.record.accepted, st.record.stopped = False, "kept"
                    why = "kept"
                    break
                else:
                    reg = st.mask ^ now
                st.record.review_score = review_score(st.record)
                set_slice(out, ax, idx, st.mask)
                changed.append(idx)
                prev = st
            idx += d
            dist += 1
        stopped[f"{d:+d}"] = why
    return LocalResult(out, changed, records, stopped, time.perf_counter() - t0)


def _local_change(
    current: np.ndarray, new: np.ndarray, region: np.ndarray | None, change: str
) -> np.ndarray | None:
    """``current`` (``(rows, cols)``) with the 8-connected pieces of its difference from ``new``
    that overlap ``region`` added (``change="grow"``) or removed (``"shrink"``); ``None`` when no
    piece overlaps or a shrink would keep less than half of ``current``."""
    from scipy import ndimage

    if region is None or not region.any():
        return None
    diff = (new & ~current) if change == "grow" else (current & ~new)
    comp, _ = ndimage.label(diff, structure=np.ones((3, 3), bool))
    hit = np.unique(comp[region & diff])
    hit = hit[hit > 0]
    if hit.size == 0:
        return None
    piece = np.isin(comp, hit)
    if change == "grow":
        return current | piece
    out = current & ~piece
    if 2 * int(np.count_nonzero(out)) < int(np.count_nonzero(current)):
        return None
    return out


def _better(
    predictor: VolumePredictor,
    index: int,
    new: _Step,
    current: np.ndarray,
    ref: _Ref,
    change: str | None,
) -> bool:
    """Whether a re-propagated slice mask should replace the current one.

    ``change="grow"`` (a foreground click): the new mask must be larger (on brain1 the carried
    masks were right but in another place than the current ones: a containment test refused
    them); ``"shrink"`` (a background click): smaller, but at least half as large and 80 %
    inside the current one (a slice emptied by a click must not empty its neighbours);
    ``None``: it must look more like the corrected slice's object than the current one does
    (the stop rule's embedding margin).
    """
    a_new, a_cur = int(np.count_nonzero(new.mask)), int(np.count_nonzero(current))
    if change == "grow":
        return a_new > a_cur
    if change == "shrink":
        inside = int(np.count_nonzero(new.mask & current))
        return 2 * a_new >= a_cur > a_new and inside >= 0.8 * a_new
    vec = predictor.object_embedding(index, current)
    return new.record.margin > _cos(vec, ref.embedding) - _cos(vec, ref.background)


# --------------------------------------------------------------------------- protocols
def box_from_gt(gt_mask: np.ndarray, axis: str | int = "z", margin_px: float = 3.0) -> KeyPrompt:
    """The standard interactive protocol: one box around the ground truth on its largest slice.

    Args:
        gt_mask: ``(z, y, x)`` bool ground truth of one object.
        axis: slicing axis.
        margin_px: pixels added on each side (clipped to the slice).

    Returns:
        A :class:`KeyPrompt` with ``box_rc`` on the slice of largest GT area (lowest index on ties).

    Raises:
        PromptError: the ground truth is empty.
    """
    gt = np.asarray(gt_mask, dtype=bool)
    ax = axis_index(axis)
    other = tuple(i for i in range(3) if i != ax)
    areas = gt.sum(axis=other)
    if not areas.any():
        raise PromptError("the ground-truth mask is empty: no box can be drawn from it")
    idx = int(np.argmax(areas))
    sl = slice_of(gt, ax, idx)
    bbox = mask_box(sl)
    assert bbox is not None
    box = expand_box(bbox, sl.shape, 0.0, margin_px)
    return KeyPrompt(idx, box_rc=box)


@dataclass
class OracleResult:
    """Per-slice oracle-box segmentation: one box from the ground truth on every GT slice.

    Attributes:
        mask: ``(z, y, x)`` bool.
        dice: 3D Dice against the ground truth.
        per_slice: ``[{index, dice, iou_pred}]`` for each GT slice.
        margin_px: the box margin.
    """

    mask: np.ndarray
    dice: float
    per_slice: list[dict[str, float]]
    margin_px: float

    def to_json(self) -> dict[str, Any]:
        """Summary without the mask."""
        return {
            "dice": round(self.dice, 4),
            "margin_px": self.margin_px,
            "per_slice": self.per_slice,
        }


def dice3d(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean ``(z, y, x)`` or ``(rows, cols)`` masks (:func:`medseg.metrics.dice`:
    1.0 when both are empty)."""
    from medseg.metrics import dice

    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if a.ndim == 2:
        a, b = a[None], b[None]
    return dice(a, b)


def oracle_dice(
    predictor: VolumePredictor,
    gt_mask: np.ndarray,
    margin_px: float = 3.0,
    progress: ProgressCallback | None = None,
) -> OracleResult:
    """The oracle protocol: a box from the ground truth (plus ``margin_px``) on every GT slice.

    Args:
        predictor: built on the image, for the axis to slice along.
        gt_mask: ``(z, y, x)`` bool ground truth on the image grid.
        margin_px: box margin per side.
        progress: ``progress(done, total)`` per slice.

    Returns:
        :class:`OracleResult`.
    """
    gt = np.asarray(gt_mask, dtype=bool)
    if gt.shape != predictor.volume.shape:
        raise PromptError(
            f"ground truth shape {gt.shape} is not the image's {predictor.volume.shape}"
        )
    ax = axis_index(predictor.axis)
    other = tuple(i for i in range(3) if i != ax)
    idxs = [int(i) for i in np.flatnonzero(gt.any(axis=other))]
    out = np.zeros_like(gt)
    per: list[dict[str, float]] = []
    for j, idx in enumerate(idxs):
        sl = slice_of(gt, ax, idx)
        bbox = mask_box(sl)
        assert bbox is not None
        pred = predictor.predict(idx, box_rc=expand_box(bbox, sl.shape, 0.0, margin_px))
        m = pred.masks[0]
        set_slice(out, ax, idx, m)
        per.append(
            {
                "index": idx,
                "dice": round(dice3d(m, sl), 4),
                "iou_pred": round(float(pred.iou_pred[0]), 4),
            }
        )
        if progress is not None:
            progress(j + 1, len(idxs))
    return OracleResult(out, dice3d(out, gt), per, float(margin_px))
