"""The SEGFM3D interactive protocol: one box, then corrective clicks, scored after every step.

This is the evaluation rule of the CVPR 2025 challenge "Foundation Models for Interactive 3D
Biomedical Image Segmentation" (SEGFM3D), followed from its public evaluation code
(``JunMa11/CVPR-MedSegFMCompetition``: ``CVPR25_iter_eval.py`` for the clicks and the scores,
``get_boxes.py`` for the initial box); nothing here is copied from it.

The rule, for one structure ``gt`` (a boolean ``(z, y, x)`` mask):

* **Initial box** (:func:`challenge_box`): ``z_min``/``z_max`` = the structure's z range;
  the box slice ``z_mid`` = the z of the median foreground voxel in C order
  (``z_indices[n // 2]`` of ``np.nonzero(gt)``; always a slice holding the structure, and the
  middle of its z range for a convex one); the box is the tight 2D bounding box of ``gt`` on that
  slice. The challenge additionally perturbs its stored boxes by 0-5 pixels (at 256 scale) with
  its own random generator; we draw the tight box (a box stored in a ``.npz`` is used as is).
* **Clicks** (:func:`next_click`): the error ``pred != gt``; its largest 26-connected component
  (ties: the component met first in C order); the Euclidean distance transform of that
  component in voxel units, with everything outside the component — including outside the
  array — counting as background; the voxel of maximum distance (ties: index
  ``RandomState(seed).choice(n)`` among the maxima in C order, the generator re-seeded for every
  click as the challenge does with ``seed=42``); a foreground click when that voxel is in ``gt``,
  a background click otherwise. A perfect prediction gets no click (the step still runs).
* **Scores** after each of the ``1 + clicks`` steps: DSC, and NSD at 2 mm tolerance computed by
  :func:`medseg.metrics.surface_dice` (voxel-counted surface Dice, see :mod:`medseg.metrics`;
  the challenge's DeepMind implementation weights surface elements by area, so NSD may differ
  slightly), with NSD := 0 when DSC <= 0.2 as the challenge does.
* **AUC** (:func:`auc`): trapezoid rule over the click steps only (the last ``clicks`` values,
  x = 0 .. clicks - 1), as the challenge does (the box step is optional there); final DSC / NSD =
  the last step's.

Importing this module is cheap (numpy and scipy); the model loads in :func:`simulate_interaction`.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import ndimage

from medseg.errors import InputError

if TYPE_CHECKING:
    from medseg.prompts import Box, Point
    from medseg.volume import LabelMap, Volume

PathLike = str | os.PathLike[str]

#: NSD tolerance of the challenge, mm.
NSD_TOLERANCE_MM = 2.0
#: Below or at this DSC the challenge counts NSD as 0.
NSD_MIN_DSC = 0.2
#: The challenge's number of corrective clicks.
DEFAULT_CLICKS = 5
#: The challenge re-seeds numpy's legacy generator with 42 before every tie-break.
DEFAULT_SEED = 42

_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


# --------------------------------------------------------------------------- the rule
@dataclass(frozen=True)
class ChallengeBox:
    """The challenge's initial prompt for one structure (voxel indices, inclusive).

    Attributes:
        z_mid: the box slice.
        y0, x0, y1, x1: the 2D box on ``z_mid`` (rows y, columns x), inclusive.
        z_min, z_max: the structure's z range (inclusive).
    """

    z_mid: int
    y0: int
    x0: int
    y1: int
    x1: int
    z_min: int
    z_max: int

    def to_json(self) -> dict[str, int]:
        """The challenge's own key names (``z_mid_x_min`` ...)."""
        return {
            "z_min": self.z_min,
            "z_max": self.z_max,
            "z_mid": self.z_mid,
            "z_mid_x_min": self.x0,
            "z_mid_y_min": self.y0,
            "z_mid_x_max": self.x1,
            "z_mid_y_max": self.y1,
        }

    @classmethod
    def from_json(cls, d: Any) -> ChallengeBox:
        """From the challenge's dict (a ``boxes`` entry of its ``.npz``).

        Raises:
            InputError: a key is missing or not a number.
        """
        keys = ("z_mid", "z_mid_y_min", "z_mid_x_min", "z_mid_y_max", "z_mid_x_max")
        try:
            v = [int(d[k]) for k in (*keys, "z_min", "z_max")]
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise InputError(
                f"a challenge box needs the integer keys z_min, z_max, {', '.join(keys)} ({exc!r})"
            ) from None
        return cls(*v)

    def to_prompt(self) -> Box:
        """A :class:`medseg.Box` on ``z_mid`` bounded to ``z_min..z_max``.

        A box one pixel tall or wide is widened by one pixel (``medseg.Box`` needs two distinct
        corners).
        """
        from medseg.prompts import Box

        y0, x0, y1, x1 = float(self.y0), float(self.x0), float(self.y1), float(self.x1)
        if y1 == y0:
            y0, y1 = (y0 - 1, y1) if y0 > 0 else (y0, y1 + 1)
        if x1 == x0:
            x0, x1 = (x0 - 1, x1) if x0 > 0 else (x0, x1 + 1)
        return Box(self.z_mid, y0, x0, y1, x1, z_min=self.z_min, z_max=self.z_max)


def _mask3(mask: Any, what: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 3:
        raise InputError(f"{what} must be a 3D (z, y, x) mask, got shape {m.shape}")
    return m.astype(bool, copy=False)


def challenge_box(gt: Any) -> ChallengeBox:
    """The challenge's initial box for the structure ``gt`` (see the module docstring).

    Args:
        gt: boolean (or 0/1) mask ``(z, y, x)`` of one structure.

    Returns:
        :class:`ChallengeBox` (tight box, no perturbation).

    Raises:
        InputError: ``gt`` is empty or not 3D.
    """
    g = _mask3(gt, "the ground truth")
    zi = np.nonzero(g)[0]
    if zi.size == 0:
        raise InputError("the ground truth is empty: no box can be drawn from it")
    z_mid = int(zi[zi.size // 2])
    ys, xs = np.nonzero(g[z_mid])
    return ChallengeBox(
        z_mid=z_mid,
        y0=int(ys.min()),
        x0=int(xs.min()),
        y1=int(ys.max()),
        x1=int(xs.max()),
        z_min=int(zi.min()),
        z_max=int(zi.max()),
    )


def largest_error_component(pred: Any, gt: Any) -> np.ndarray | None:
    """The largest 26-connected component of ``pred != gt`` (boolean ``(z, y, x)``), or ``None``.

    Ties go to the component whose first voxel comes first in C order (the components are
    numbered in that order, as ``cc3d`` numbers them in the challenge's code).
    """
    p, g = _mask3(pred, "the prediction"), _mask3(gt, "the ground truth")
    if p.shape != g.shape:
        raise InputError(f"prediction and ground truth shapes differ: {p.shape} vs {g.shape}")
    err = p != g
    if not err.any():
        return None
    lab, _ = ndimage.label(err, structure=_FULL)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return lab == int(np.argmax(sizes))


def component_edt(component: np.ndarray) -> np.ndarray:
    """Euclidean distance (voxel units) of each voxel of ``component`` to the nearest voxel
    outside it, where outside the array counts as outside; 0 elsewhere. Shape ``(z, y, x)``.

    Computed on the component's bounding box padded by one background voxel on every side
    (the challenge pads by 25 %, which gives the same distances).
    """
    c = np.asarray(component, dtype=bool)
    box = ndimage.find_objects(c.astype(np.uint8))[0]
    crop = np.pad(c[box], 1)
    d = ndimage.distance_transform_edt(crop)[1:-1, 1:-1, 1:-1]
    out = np.zeros(c.shape, dtype=np.float64)
    out[box] = d
    return out


def next_click(pred: Any, gt: Any, seed: int = DEFAULT_SEED) -> Point | None:
    """The challenge's next corrective click for ``pred`` against ``gt``, or ``None`` if equal.

    Args:
        pred: current prediction, boolean ``(z, y, x)``.
        gt: ground truth of the structure, same shape.
        seed: seed of the tie-break among voxels of equal maximum distance
            (``np.random.RandomState(seed).choice(n)`` over the maxima in C order).

    Returns:
        :class:`medseg.Point` at integer ``(z, y, x)``; ``positive`` when the voxel is in ``gt``
        (missed foreground), else a background click (over-segmentation).
    """
    from medseg.prompts import Point

    comp = largest_error_component(pred, gt)
    if comp is None:
        return None
    edt = component_edt(comp)
    maxima = np.argwhere(edt == edt.max())
    z, y, x = (int(v) for v in maxima[np.random.RandomState(seed).choice(len(maxima))])
    return Point(z, y, x, positive=bool(np.asarray(gt)[z, y, x]))


def step_scores(
    pred: Any, gt: Any, spacing: Sequence[float] | None, tolerance_mm: float = NSD_TOLERANCE_MM
) -> tuple[float, float]:
    """``(DSC, NSD)`` of one step; NSD is 0 when DSC <= 0.2 (the challenge's rule).

    Args:
        pred, gt: boolean masks ``(z, y, x)``.
        spacing: voxel size ``(z, y, x)`` mm.
        tolerance_mm: NSD tolerance.
    """
    from medseg import metrics

    d = metrics.dice(pred, gt)
    if d <= NSD_MIN_DSC:
        return d, 0.0
    return d, metrics.surface_dice(pred, gt, spacing, tolerance_mm=tolerance_mm)


def auc(values: Sequence[float], clicks: int = DEFAULT_CLICKS) -> float:
    """Trapezoid-rule area under the last ``clicks`` values at x = 0 .. clicks - 1.

    With the challenge's 6 values (box + 5 clicks) that is the area over the 5 click steps; the
    box step is not counted. 0 when fewer than two click steps exist.
    """
    v = [float(x) for x in values][-clicks:] if clicks > 0 else []
    if len(v) < 2:
        return 0.0
    return float(sum((a + b) / 2.0 for a, b in itertools.pairwise(v)))


# --------------------------------------------------------------------------- result
@dataclass
class InteractionResult:
    """The protocol's outcome for one structure.

    Attributes:
        label: the ground-truth label value scored.
        name: its name.
        dsc, nsd: one value per step (box, then each click): ``1 + clicks`` values.
        seconds: wall time of each step's model call.
        prompts: each step's prompt as JSON (``None`` for a click step with nothing to correct).
        clicks: the number of click steps.
        spacing: voxel size ``(z, y, x)`` mm used for NSD.
        labels: the final label map (not in :meth:`to_json`).
        steps: each step's prediction mask ``(z, y, x)`` when kept (not in :meth:`to_json`).
        predictor: the session's SAM predictor (its embeddings; reuse it on the same image).
    """

    label: int
    name: str
    dsc: list[float]
    nsd: list[float]
    seconds: list[float]
    prompts: list[dict[str, Any] | None]
    clicks: int
    spacing: tuple[float, float, float]
    engine: str = ""
    labels: LabelMap | None = field(default=None, repr=False)
    steps: list[np.ndarray] | None = field(default=None, repr=False)
    predictor: Any = field(default=None, repr=False)

    @property
    def dsc_auc(self) -> float:
        """Trapezoid AUC of DSC over the click steps (x = 0 .. clicks - 1)."""
        return auc(self.dsc, self.clicks)

    @property
    def nsd_auc(self) -> float:
        """Trapezoid AUC of NSD over the click steps."""
        return auc(self.nsd, self.clicks)

    @property
    def final_dsc(self) -> float:
        """DSC after the last step."""
        return self.dsc[-1]

    @property
    def final_nsd(self) -> float:
        """NSD after the last step."""
        return self.nsd[-1]

    def row(self) -> dict[str, Any]:
        """Flat row: ``label, name, dsc_0..dsc_N, nsd_0..nsd_N, dsc_auc, nsd_auc, final_dsc,
        final_nsd, seconds`` (total seconds of all steps)."""
        r: dict[str, Any] = {"label": self.label, "name": self.name}
        r.update({f"dsc_{i}": v for i, v in enumerate(self.dsc)})
        r.update({f"nsd_{i}": v for i, v in enumerate(self.nsd)})
        r.update(
            dsc_auc=self.dsc_auc,
            nsd_auc=self.nsd_auc,
            final_dsc=self.final_dsc,
            final_nsd=self.final_nsd,
            seconds=float(sum(self.seconds)),
        )
        return r

    def to_json(self) -> dict[str, Any]:
        """Everything but the arrays, JSON-ready."""
        return {
            "protocol": "segfm3d",
            "label": self.label,
            "name": self.name,
            "clicks": self.clicks,
            "spacing": list(self.spacing),
            "nsd_tolerance_mm": NSD_TOLERANCE_MM,
            "engine": self.engine,
            "steps": [
                {"step": i, "prompt": p, "dsc": d, "nsd": n, "seconds": s}
                for i, (p, d, n, s) in enumerate(
                    zip(self.prompts, self.dsc, self.nsd, self.seconds, strict=True)
                )
            ],
            "dsc": list(self.dsc),
            "nsd": list(self.nsd),
            "seconds": list(self.seconds),
            "dsc_auc": self.dsc_auc,
            "nsd_auc": self.nsd_auc,
            "final_dsc": self.final_dsc,
            "final_nsd": self.final_nsd,
        }


# --------------------------------------------------------------------------- driver
def run_protocol(
    add: Callable[[Any], np.ndarray],
    gt: Any,
    spacing: Sequence[float] | None,
    *,
    box: ChallengeBox | None = None,
    clicks: int = DEFAULT_CLICKS,
    seed: int = DEFAULT_SEED,
    keep_steps: bool = False,
) -> tuple[list[float], list[float], list[float], list[dict[str, Any] | None], list[np.ndarray]]:
    """Drive any interactive segmenter through the protocol.

    Args:
        add: ``add(prompt) -> mask``: takes a :class:`medseg.Box` or :class:`medseg.Point` (all
            earlier prompts stay in force) and returns the new prediction ``(z, y, x)``
            (non-zero = the structure).
        gt: ground-truth mask ``(z, y, x)`` of the structure.
        spacing: voxel size ``(z, y, x)`` mm (NSD).
        box: the initial box (default: :func:`challenge_box` of ``gt``).
        clicks: corrective clicks after the box.
        seed: tie-break seed (see :func:`next_click`).
        keep_steps: keep every step's mask.

    Returns:
        ``(dsc, nsd, seconds, prompts, steps)``, one entry per step (``steps`` empty unless kept).
    """
    if clicks < 0:
        raise InputError(f"clicks must be >= 0, got {clicks}")
    g = _mask3(gt, "the ground truth")
    if not g.any():
        raise InputError("the ground truth is empty: nothing to segment or score")
    b = box if box is not None else challenge_box(g)
    dsc: list[float] = []
    nsd: list[float] = []
    secs: list[float] = []
    prompts: list[dict[str, Any] | None] = []
    steps: list[np.ndarray] = []
    pred = np.zeros_like(g)
    for step in range(clicks + 1):
        prompt: Any = b.to_prompt() if step == 0 else next_click(pred, g, seed)
        t0 = time.perf_counter()
        if prompt is not None:
            out = np.asarray(add(prompt))
            if out.shape != g.shape:
                raise InputError(f"the segmenter returned shape {out.shape}, expected {g.shape}")
            pred = out != 0
        secs.append(time.perf_counter() - t0)
        d, n = step_scores(pred, g, spacing)
        dsc.append(d)
        nsd.append(n)
        pj = None if prompt is None else prompt.to_json()
        if step == 0 and pj is not None:
            pj["challenge_box"] = b.to_json()
        prompts.append(pj)
        if keep_steps:
            steps.append(pred.copy())
    return dsc, nsd, secs, prompts, steps


def _gt_mask(gt: LabelMap, label: int | None) -> tuple[np.ndarray, int, str]:
    present = gt.present()
    if label is None:
        if len(present) != 1:
            raise InputError(
                f"the ground truth holds labels {present or 'none'}; choose one with label="
            )
        label = present[0]
    mask = gt.array == int(label)
    if not mask.any():
        raise InputError(
            f"label {label} is not in the ground truth (present: {present or 'none'}); "
            "choose a label from those"
        )
    return mask, int(label), gt.labels.get(int(label), f"label {label}")


def load_study(
    image: Volume | PathLike, gt: LabelMap | PathLike | None, *, trust_npz: bool = False
) -> tuple[Volume, LabelMap, dict[int, ChallengeBox]]:
    """Image, ground truth (on the image's grid) and any stored challenge boxes.

    ``gt=None`` takes the ``gts`` of a challenge ``.npz`` image, and its stored ``boxes`` when
    ``trust_npz`` (they are a pickle: see :func:`medseg.io.npz.read_npz`).

    Raises:
        InputError: unreadable inputs, no ground truth. GeometryError: grids differ.
    """
    from medseg.io.npz import is_npz, read_npz
    from medseg.pipeline import read_labels, read_volume
    from medseg.volume import LabelMap, Volume, check_same_grid

    boxes: dict[int, ChallengeBox] = {}
    if isinstance(image, Volume):
        img = image
    elif is_npz(image):
        study = read_npz(image, allow_pickle=trust_npz)
        img = study.image
        if gt is None:
            if study.gt is None:
                raise InputError(f"{image}: the .npz has no 'gts'; give the ground truth")
            gt, boxes = study.gt, study.boxes
    else:
        img = read_volume(image)
    if gt is None:
        raise InputError("give the ground truth (gt= / --gt) to simulate the clicks against")
    g = gt if isinstance(gt, LabelMap) else read_labels(gt, reference=img)
    check_same_grid(g, img, what="ground truth")
    return img, g, boxes


def simulate_interaction(
    image: Volume | PathLike,
    gt: LabelMap | PathLike | None = None,
    *,
    label: int | None = 1,
    clicks: int = DEFAULT_CLICKS,
    model: str = "litemedsam",
    seed: int = DEFAULT_SEED,
    box: ChallengeBox | None = None,
    keep_steps: bool = False,
    **session_kwargs: Any,
) -> InteractionResult:
    """Run the SEGFM3D protocol (box + ``clicks`` corrective clicks) on one structure.

    Args:
        image: a :class:`~medseg.volume.Volume` or a path (also a challenge ``.npz``).
        gt: ground truth (label map or path) on the image's grid; ``None`` takes the ``gts`` of
            an ``.npz`` image.
        label: the ground-truth label to segment and score (``None``: the single label present).
        clicks: corrective clicks after the box (the challenge: 5).
        model: the SAM-family model (registry name or checkpoint).
        seed: tie-break seed of the click rule (the challenge's is 42).
        box: the initial box (default: the challenge's rule on ``gt``; an ``.npz`` with ``boxes``
            gives its own).
        keep_steps: keep every step's prediction mask in the result.
        **session_kwargs: passed to :class:`medseg.InteractiveSession` (``weights``, ``window``,
            ``device``, ``precision``, ``cache_dir``, ``predictor``, ...).

    Returns:
        :class:`InteractionResult`; its ``labels`` is the final label map.

    Raises:
        InputError: unreadable inputs, grids that differ, an absent label, ``clicks < 0``.
    """
    img, g, npz_boxes = load_study(image, gt)
    mask, value, name = _gt_mask(g, label)
    if box is None:
        box = npz_boxes.get(value)
    from medseg.interactive import InteractiveSession

    session = InteractiveSession(img, model, value, name=name, **session_kwargs)
    dsc, nsd, secs, prompts, steps = run_protocol(
        lambda p: session.add(p).array,
        mask,
        img.spacing,
        box=box,
        clicks=clicks,
        seed=seed,
        keep_steps=keep_steps,
    )
    return InteractionResult(
        label=value,
        name=name,
        dsc=dsc,
        nsd=nsd,
        seconds=secs,
        prompts=prompts,
        clicks=clicks,
        spacing=tuple(float(s) for s in img.spacing),  # type: ignore[arg-type]
        engine="InteractiveSession",
        labels=session.labels,
        steps=steps or None,
        predictor=session.predictor,
    )


def evaluate_interactive(
    image: Volume | PathLike,
    gt: LabelMap | PathLike | None = None,
    *,
    labels: Sequence[int] | None = None,
    clicks: int = DEFAULT_CLICKS,
    model: str = "litemedsam",
    seed: int = DEFAULT_SEED,
    progress: Callable[[int, int], None] | None = None,
    trust_npz: bool = False,
    **session_kwargs: Any,
) -> tuple[list[InteractionResult], LabelMap]:
    """Run the protocol on every label of ``gt`` (or those in ``labels``), one after another.

    The image is read once and the model's embeddings are shared between the labels (the
    predictor of one label's session is handed to the next).

    Args:
        image: a :class:`~medseg.volume.Volume` or a path (also a challenge ``.npz``).
        gt: the ground truth; ``None`` takes an ``.npz`` image's ``gts``.
        labels: label values to run (default: every label present, ascending).
        clicks, model, seed, **session_kwargs: as :func:`simulate_interaction`.
        progress: ``progress(done, total)`` once per label.
        trust_npz: use the boxes stored (pickled) in an ``.npz`` image for the first step.

    Returns:
        ``(results, final)``: one :class:`InteractionResult` per label, and the final label maps
        combined on the image's grid (each label's own value; a later label wins an overlap).

    Raises:
        InputError: as :func:`simulate_interaction`; a requested label absent from ``gt``.
    """
    from medseg.volume import LabelMap

    img, g, boxes = load_study(image, gt, trust_npz=trust_npz)
    values = [int(v) for v in labels] if labels else g.present()
    if not values:
        raise InputError("the ground truth is empty: nothing to segment or score")
    final = np.zeros(img.shape, dtype=np.uint16 if max(values) > 255 else np.uint8)
    results: list[InteractionResult] = []
    kwargs = dict(session_kwargs)
    for i, value in enumerate(values):
        if progress is not None:
            progress(i, len(values))
        r = simulate_interaction(
            img,
            g,
            label=value,
            clicks=clicks,
            model=model,
            seed=seed,
            box=boxes.get(value),
            **kwargs,
        )
        results.append(r)
        if r.labels is not None:
            final[r.labels.array != 0] = value
        if r.predictor is not None:
            kwargs["predictor"] = r.predictor
    if progress is not None:
        progress(len(values), len(values))
    table = {v: g.labels[v] for v in values if v in g.labels}
    return results, LabelMap(final, labels=table, meta=dict(img.meta), **img.copy_geometry())


# --------------------------------------------------------------------------- batch
#: Value of ``medseg batch --protocol`` that runs this protocol per study.
BATCH_PROTOCOL = "interactive"
#: Per-label scores summarised in the interactive batch's ``summary.json``.
BATCH_SUMMARY = ("dsc_auc", "nsd_auc", "final_dsc", "final_nsd", "dsc_0", "seconds")


def batch_columns(clicks: int = DEFAULT_CLICKS) -> tuple[str, ...]:
    """Columns of ``metrics.csv`` for ``medseg batch --protocol interactive``: one row per study
    and label."""
    steps = range(clicks + 1)
    return (
        "study",
        "label",
        "name",
        *(f"dsc_{i}" for i in steps),
        *(f"nsd_{i}" for i in steps),
        "dsc_auc",
        "nsd_auc",
        "final_dsc",
        "final_nsd",
        "seconds",
        "status",
        "error",
    )


def check_batch_study(study: Any, out: PathLike, fingerprint: str | None = None) -> str | None:
    """Why a study's protocol outputs in ``out`` are not complete and valid, or ``None``.

    Checks the results JSON (this study, these settings, the image and ground-truth digests of
    now) and that the final label map reads back on the image's grid with the recorded counts.
    """
    import json

    from medseg.batches import study_paths
    from medseg.errors import MedsegError
    from medseg.io.files import read_labels, read_volume
    from medseg.predict.cache import array_digest

    lab_path, rep_path = study_paths(out, study.id)
    if not rep_path.is_file() or not lab_path.is_file():
        return "missing"
    try:
        doc = json.loads(rep_path.read_text(encoding="utf-8"))
        if doc.get("protocol") != "segfm3d" or not isinstance(doc.get("labels"), list):
            return "not a protocol result"
    except (OSError, ValueError) as exc:
        return f"results unreadable ({str(exc).splitlines()[0]})"
    if doc.get("study") != study.id:
        return "results are for another study"
    if fingerprint is not None and doc.get("fingerprint") != fingerprint:
        return "made with other settings"
    try:
        image = read_volume(study.image)
        if array_digest(image.array) != doc.get("image_sha256"):
            return "the image changed"
        if study.gt is None or array_digest(read_labels(study.gt).array) != doc.get("gt_sha256"):
            return "the ground truth changed"
        lm = read_labels(lab_path)
    except MedsegError as exc:
        return f"unreadable ({str(exc).splitlines()[0]})"
    if not lm.same_grid(image):
        return "label map is not on the image grid"
    counts = {str(v): int(np.count_nonzero(lm.array == v)) for v in lm.present()}
    if counts != doc.get("voxels"):
        return "label map does not match its results"
    return None


def run_batch_study(task: Any) -> Any:
    """One study of ``medseg batch --protocol interactive`` (a ``batches._Task``): the protocol
    on every label (or ``label=``), the final label map and a results JSON; never raises."""
    import json

    from medseg.batches import StudyResult, _one_line, _worker_id, study_paths
    from medseg.errors import MedsegError
    from medseg.io.files import read_labels, read_volume, write_json
    from medseg.pipeline import write_labels
    from medseg.predict.cache import array_digest

    t0 = time.perf_counter()
    study = task.study
    lab_path, rep_path = study_paths(task.out, study.id)
    res = StudyResult(study.id, "ok", labels=lab_path, report=rep_path, worker=_worker_id())
    try:
        if not task.overwrite and check_batch_study(study, task.out, task.fingerprint) is None:
            res.status = "skipped"
            return res
        if study.gt is None:
            raise InputError(f"study {study.id}: no ground truth to simulate the clicks against")
        kwargs = dict(task.kwargs)
        label = kwargs.pop("label", None)
        image = read_volume(study.image)
        gt = read_labels(study.gt, reference=image)
        results, final = evaluate_interactive(
            image,
            gt,
            labels=[label] if label is not None else None,
            clicks=task.clicks,
            model=task.model,
            **kwargs,
        )
        inputs = [study.image, study.gt]
        write_labels(final, lab_path, overwrite=True, inputs=inputs)
        doc = {
            "protocol": "segfm3d",
            "study": study.id,
            "fingerprint": task.fingerprint,
            "image": str(study.image),
            "gt": str(study.gt),
            "image_sha256": array_digest(image.array),
            "gt_sha256": array_digest(gt.array),
            "labels_file": lab_path.name,
            "voxels": {str(v): int(np.count_nonzero(final.array == v)) for v in final.present()},
            "labels": [r.to_json() for r in results],
        }
        write_json(json.loads(json.dumps(doc)), rep_path, overwrite=True, inputs=inputs)
    except MedsegError as exc:
        res.status, res.error = "failed", _one_line(str(exc))
    except Exception as exc:  # one bad study must not stop the batch
        res.status, res.error = "failed", _one_line(f"{type(exc).__name__}: {exc}")
    res.seconds = round(time.perf_counter() - t0, 4)
    return res


def batch_rows(study_id: str, result: Any, clicks: int) -> list[dict[str, Any]]:
    """The ``metrics.csv`` rows of one study (columns :func:`batch_columns`)."""
    import json
    from pathlib import Path

    cols = batch_columns(clicks)
    if result.status == "failed":
        return [
            {**dict.fromkeys(cols), "study": study_id, "status": "failed", "error": result.error}
        ]
    doc = json.loads(Path(result.report).read_text(encoding="utf-8"))
    rows = []
    for e in doc["labels"]:
        r: dict[str, Any] = {"study": study_id, "label": e["label"], "name": e["name"]}
        r.update({f"dsc_{i}": v for i, v in enumerate(e["dsc"])})
        r.update({f"nsd_{i}": v for i, v in enumerate(e["nsd"])})
        r.update({k: e[k] for k in ("dsc_auc", "nsd_auc", "final_dsc", "final_nsd")})
        r.update(seconds=float(sum(e["seconds"])), status="ok", error="")
        rows.append(r)
    return rows


def write_batch_aggregates(result: Any, studies: Sequence[Any], clicks: int) -> Any:
    """``metrics.csv`` (one row per study and label, :func:`batch_columns`) and ``summary.json``
    (per label: mean / median / std / count of :data:`BATCH_SUMMARY`; ``dice`` = final DSC)."""
    from medseg.batches import _stats
    from medseg.io.files import write_csv, write_json

    by_id = {r.study: r for r in result.studies}
    rows = [row for s in studies for row in batch_rows(s.id, by_id[s.id], clicks)]
    result.metrics_csv = write_csv(
        rows, result.out / "metrics.csv", columns=batch_columns(clicks), overwrite=True
    )
    labels = []
    for value in sorted({int(r["label"]) for r in rows if r["status"] == "ok"}):
        rs = [r for r in rows if r["status"] == "ok" and int(r["label"]) == value]
        entry: dict[str, Any] = {"label": value, "name": rs[0]["name"], "studies": len(rs)}
        entry.update({k: _stats(r[k] for r in rs) for k in BATCH_SUMMARY})
        entry["dice"] = entry["final_dsc"]
        labels.append(entry)
    failed = [{"study": r["study"], "error": r["error"]} for r in rows if r["status"] == "failed"]
    summary = {
        "model": result.model,
        "protocol": "segfm3d",
        "clicks": clicks,
        "studies": len(studies),
        "succeeded": len(studies) - len(failed),
        "failed": failed,
        "labels": labels,
    }
    result.summary_json = write_json(summary, result.out / "summary.json", overwrite=True)
    result.plots = []
    return result
