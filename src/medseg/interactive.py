"""Interactive 3D correction: a box, then clicks on any slice, each acting locally.

::

    s = medseg.InteractiveSession("ct.nii.gz", model="litemedsam", label=1)
    s.add(medseg.Box(z=30, y0=100, x0=120, y1=160, x1=190, z_min=22, z_max=38))
    s.add(medseg.Point(z=35, y=150, x=170, positive=False))   # fix slice 35 and what follows it
    s.undo()                                                  # exactly the mask before the click
    s.labels.array, s.review, s.report

The first prompt seeds the 3D mask through :func:`medseg.segment` (the same propagation, the
same report; the session's config adds the previous slice's mask as a carry candidate,
:data:`SESSION_ALTERNATIVES`). A later prompt on slice ``i`` (along the session's axis)
re-segments slice ``i`` with every prompt that applies there: the user's box on that slice, else
a box around the current mask there (or on the nearest non-empty slice), grown to hold its
foreground clicks, and all the clicks on that slice; of the model's candidates the one honouring
the most clicks and, among those, closest to the current slice mask is taken, and the slice
changes only at the connected piece under the click (or, where that would take most of the mask
or the model does not reach the click, by a disk around the click: one click never empties a
slice). Then :func:`medseg.predict.propagate.repropagate` carries the change outward in both
directions, only the pieces overlapping what changed on the slice before, never past a slice the
user prompted (their clicks stay in force) nor past the box's z range; the embeddings cached in
:attr:`predictor` are reused. Arrays are ``(z, y, x)``; prompt coordinates are voxel indices.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import InputError, PromptError
from medseg.prompts import Box, MaskPrompt, Point, Prompt, as_prompt_list, key_prompts

if TYPE_CHECKING:
    from medseg.predict.propagate import PropagationConfig
    from medseg.predict.sam import VolumePredictor
    from medseg.progress import ProgressCallback
    from medseg.volume import LabelMap, Volume

#: 2D Dice between a slice's new and current result at which re-propagation stops.
SETTLE_DICE = 0.9
#: Carry-overs the session tries on every slice besides the box (:class:`PropagationConfig`
#: ``alternatives``): the pipeline's ``box+points`` plus the previous slice's mask as the mask
#: prompt (brain1, challenge box: DSC after the box 0.661 -> 0.700; breast1 0.479 -> 0.475, lung1
#: 0.837 both; the plain stock loop 0.692 / 0.422 / 0.843).
SESSION_ALTERNATIVES = ("box+points", "box+mask")
#: Carry-overs tried besides the box when a click's change is carried to the next slices: the
#: previous slice's (corrected) mask as the mask prompt only (one decoder call per slice fewer
#: than :data:`SESSION_ALTERNATIVES`; breast1's clicks then never lower DSC (worst -0.021 before),
#: final 0.661 -> 0.665, brain1 0.694 both, lung1 0.849 -> 0.846).
WALK_ALTERNATIVES = ("box+mask",)
#: Carry a click's change to the next slices only where it overlaps what changed on the slice
#: before (see ``region`` of :func:`~medseg.predict.propagate.repropagate`).
LOCAL_CARRY = True
#: How many slices :attr:`InteractiveSession.review` lists.
REVIEW_COUNT = 10


@dataclass
class Step:
    """One :meth:`InteractiveSession.add`.

    Attributes:
        prompt: the prompt as JSON (``Box.to_json`` etc.).
        seconds: wall time of the step.
        slice: the slice the prompt acted on (along the axis).
        changed: slices whose mask was rewritten.
        stopped: why each walk ended (see :class:`~medseg.predict.propagate.LocalResult`).
        voxels: mask voxels after the step.
    """

    prompt: dict[str, Any]
    seconds: float
    slice: int
    changed: list[int]
    stopped: dict[str, str] = field(default_factory=dict)
    voxels: int = 0

    def to_json(self) -> dict[str, Any]:
        """Plain dict (seconds rounded to ms)."""
        return {
            "prompt": self.prompt,
            "seconds": round(self.seconds, 4),
            "slice": self.slice,
            "changed": list(self.changed),
            "stopped": dict(self.stopped),
            "voxels": self.voxels,
        }


@dataclass
class _State:
    mask: np.ndarray
    prompts: list[Prompt]
    scores: dict[int, float]
    bounds: tuple[int, int] | None = None


class InteractiveSession:
    """A box, then corrective clicks, on one image with one SAM-family model.

    Args:
        image: anything :func:`medseg.segment` accepts (a :class:`~medseg.volume.Volume`, a file
            or DICOM folder path, a DICOMweb URL).
        model: a SAM-family registry name (``litemedsam``, ...).
        label: the output label value.
        name: the label's name (default ``"object"``).
        weights: SAM checkpoint file (else the weights cache / packaged copy).
        axis: slicing axis: ``'z'`` axial (default), ``'y'``, ``'x'``.
        window: CT window preset / ``"LO,HI"`` / ``"percentile"``; ``None`` chooses by modality.
        device: ``"auto"`` (default), ``"cpu"`` or ``"cuda"``.
        precision: ``"auto"`` (default), ``"fp32"`` or ``"bf16"``.
        cache_dir: embedding disk cache: ``None``/``True`` the default folder, a path, or
            ``False`` for memory only.
        predictor: a :class:`~medseg.predict.sam.VolumePredictor` already built on this image and
            axis (its cached embeddings are reused).
        progress: ``progress(done, total)`` during the seeding propagation.
        config: the propagation's carry-over and stop rule (default: the pipeline's defaults with
            :data:`SESSION_ALTERNATIVES`).

    Raises:
        MedsegError: a bad image, model (a U-Net takes no prompts) or settings.
    """

    def __init__(
        self,
        image: Volume | str | Any,
        model: str = "litemedsam",
        label: int = 1,
        *,
        name: str | None = None,
        weights: str | None = None,
        axis: str = "z",
        window: str | None = None,
        device: str | None = None,
        precision: str | None = None,
        cache_dir: Any = None,
        predictor: VolumePredictor | None = None,
        progress: ProgressCallback | None = None,
        config: PropagationConfig | None = None,
    ) -> None:
        from medseg.models.registry import resolve_model
        from medseg.pipeline import read_volume
        from medseg.predict.frame import axis_index
        from medseg.volume import Volume

        ref = resolve_model(model)
        if ref.engine != "sam":
            raise InputError(
                f"{ref.name} is an automatic U-Net; interactive correction needs a promptable "
                "model (litemedsam, sam_vit_b, medsam_vit_b)"
            )
        if int(label) < 1:
            raise InputError(f"label {label} must be a positive integer (0 is background)")
        self._image_path: str | None = None
        if not isinstance(image, Volume):
            self._image_path = str(image)
            image = read_volume(image)
        self.image: Volume = image
        self.model = str(model)
        self.label = int(label)
        self.name = str(name) if name else "object"
        self.axis = "zyx"[axis_index(axis)]
        self._ax = axis_index(self.axis)
        self._options: dict[str, Any] = {
            "weights": weights,
            "window": window,
            "device": device or "auto",
            "precision": precision or "auto",
            "cache_dir": True if cache_dir is None else cache_dir,
        }
        if config is None:
            import dataclasses

            from medseg.predict.propagate import DEFAULT_CONFIG

            config = dataclasses.replace(DEFAULT_CONFIG, alternatives=SESSION_ALTERNATIVES)
        self._config: PropagationConfig = config
        self._predictor = predictor
        self._progress = progress
        self._state = _State(np.zeros(image.shape, dtype=bool), [], {})
        self._history: list[_State] = []
        self._steps: list[Step] = []
        self._base_report: dict[str, Any] | None = None
        self._key: int | None = None

    # ------------------------------------------------------------------ views
    @property
    def predictor(self) -> VolumePredictor:
        """The SAM predictor with the slices embedded so far (built on first use)."""
        if self._predictor is None:
            from medseg.models.registry import resolve_model
            from medseg.pipeline import _sam_predictor

            o = self._options
            self._predictor = _sam_predictor(
                resolve_model(self.model),
                self.image,
                None,
                axis=self.axis,
                window=o["window"],
                weights=o["weights"],
                decoder=None,
                cache_dir=o["cache_dir"],
                precision=o["precision"],
                device=o["device"],
            )
        return self._predictor

    @property
    def config(self) -> PropagationConfig:
        """The carry-over and stop rule of the seeding propagation and of every re-propagation
        (pass it to :func:`medseg.segment` to reproduce the seeding step)."""
        return self._config

    @property
    def labels(self) -> LabelMap:
        """The current mask as a :class:`~medseg.volume.LabelMap` on the image grid."""
        from medseg.volume import LabelMap

        arr = self._state.mask.astype(np.uint8) * np.uint8(self.label)
        return LabelMap.like(
            self.image, arr, {self.label: self.name}, source="medseg InteractiveSession"
        )

    @property
    def mask(self) -> np.ndarray:
        """The current ``(z, y, x)`` boolean mask (a copy)."""
        return self._state.mask.copy()

    @property
    def prompts(self) -> list[Prompt]:
        """Every prompt in force, in the order given."""
        return list(self._state.prompts)

    @property
    def steps(self) -> list[Step]:
        """One :class:`Step` per prompt in force (undone steps removed)."""
        return list(self._steps)

    @property
    def review(self) -> list[int]:
        """Non-empty slices (along the axis) to check next, most doubtful first; slices the user
        prompted are left out (up to :data:`REVIEW_COUNT`)."""
        prompted = self._prompted_slices()
        present = set(self._nonempty())
        scored = [
            (s, i) for i, s in self._state.scores.items() if i in present and i not in prompted
        ]
        scored.sort(key=lambda t: (-t[0], t[1]))
        return [i for _, i in scored[:REVIEW_COUNT]]

    @property
    def report(self) -> dict[str, Any]:
        """The pipeline's report (schema 1) of the seeding step, brought up to date: current
        labels, every prompt in order, and ``interactive``: each step's prompt, seconds and the
        slices it changed, plus the review list."""
        from medseg import report as rep
        from medseg.prompts import prompts_to_json

        if self._base_report is None:
            raise InputError("no prompt yet: add a Box (or Point) first, then read the report")
        out = copy.deepcopy(self._base_report)
        out["labels"] = rep.labels_info(self.labels)
        out["provenance"]["prompts"] = prompts_to_json(self._state.prompts)
        steps = [s.to_json() for s in self._steps]
        out["timings"]["interactive_s"] = round(sum(s["seconds"] for s in steps), 4)
        out["interactive"] = {
            "steps": steps,
            "review": self.review,
            "z_range": list(self._state.bounds) if self._state.bounds is not None else None,
            "settle_dice": SETTLE_DICE,
        }
        return out

    # ------------------------------------------------------------------ actions
    def add(self, prompt: Prompt) -> LabelMap:
        """Apply one prompt and return the updated label map.

        The first prompt seeds the mask through :func:`medseg.segment`; each later one corrects
        its slice and carries the change outward while it changes anything (see the module).

        Args:
            prompt: a :class:`~medseg.prompts.Box`, :class:`~medseg.prompts.Point` or
                :class:`~medseg.prompts.MaskPrompt` in voxel coordinates ``(z, y, x)``.

        Raises:
            PromptError: not a prompt, outside the image, on another axis, or a z range after
                the first box.
        """
        items = as_prompt_list([prompt])
        if len(items) != 1:
            raise PromptError("add() takes one prompt; call it once per prompt")
        p = items[0]
        (kp,) = key_prompts([p], self.image.shape, self.axis)  # checked before any work
        t0 = time.perf_counter()
        st = self._state
        before = _State(st.mask, list(st.prompts), dict(st.scores), st.bounds)
        if self._base_report is None:
            step = self._seed(p)
        else:
            if isinstance(p, Box) and p.bounds is not None:
                raise PromptError(
                    "a z range is given with the first box only; draw later boxes without it"
                )
            step = self._correct(p, kp)
        step.seconds = time.perf_counter() - t0
        step.voxels = int(np.count_nonzero(self._state.mask))
        self._history.append(before)
        self._steps.append(step)
        return self.labels

    def start_from(self, mask: np.ndarray, scores: dict[int, float] | None = None) -> LabelMap:
        """Begin from an existing 3D mask (one shown in napari, a saved result) instead of a box.

        The report is the pipeline's for a :class:`~medseg.prompts.MaskPrompt` of the mask's
        largest slice (no propagation); the session's mask is then ``mask`` as given.

        Args:
            mask: ``(z, y, x)`` boolean (or label) array on the image grid; non-zero = object.
            scores: ``{slice: review score}`` of the mask's slices (e.g. the propagation's
                ``review_scores()``) for :attr:`review`; none: nothing to review yet.

        Raises:
            InputError: a prompt was already added, a wrong shape or an empty mask.
        """
        from medseg.predict.frame import slice_of

        m = np.asarray(mask) != 0
        if self._base_report is not None:
            raise InputError("the session already has prompts; start from a mask in a new one")
        if m.shape != tuple(self.image.shape):
            raise InputError(f"mask shape {m.shape} is not the image's {tuple(self.image.shape)}")
        other = tuple(i for i in range(3) if i != self._ax)
        areas = m.sum(axis=other)
        if not areas.any():
            raise InputError("the mask is empty: draw a box instead")
        key = int(np.argmax(areas))
        t0 = time.perf_counter()
        before = _State(self._state.mask, [], {}, None)
        p = MaskPrompt(slice_of(m, self._ax, key), z=key, axis=self.axis)
        step = self._seed(p, propagate=False)
        self._state = _State(m.copy(), [p], {int(k): float(v) for k, v in (scores or {}).items()})
        step.changed = [int(i) for i in np.flatnonzero(areas)]
        step.seconds = time.perf_counter() - t0
        step.voxels = int(np.count_nonzero(m))
        self._history.append(before)
        self._steps.append(step)
        return self.labels

    def undo(self) -> LabelMap:
        """Take back the last prompt: the label map is exactly what it was before it.

        Raises:
            InputError: nothing to undo.
        """
        if not self._history:
            raise InputError("nothing to undo: no prompt has been added")
        self._state = self._history.pop()
        self._steps.pop()
        if not self._steps:
            self._base_report, self._key = None, None
        return self.labels

    # ------------------------------------------------------------------ internals
    def _seed(self, p: Prompt, propagate: bool = True) -> Step:
        from medseg.pipeline import segment

        seg = segment(
            self.image,
            self.model,
            p,
            label=self.label,
            name=self.name,
            weights=self._options["weights"],
            axis=self.axis,
            window=self._options["window"],
            config=self._config,
            propagate=propagate,
            precision=self._options["precision"],
            device=self._options["device"],
            cache_dir=self._options["cache_dir"],
            predictor=self._predictor,
            progress=self._progress,
        )
        self._predictor = seg.predictor
        report = seg.report
        if self._image_path is not None:
            report["image"]["path"] = self._image_path
        self._base_report = report
        assert seg.propagation is not None
        self._key = int(seg.propagation.key_slices[0])
        (kp,) = key_prompts([p], self.image.shape, self.axis)
        mask = seg.labels.array == self.label
        self._state = _State(mask, [p], dict(seg.propagation.review_scores()), kp.bounds)
        return Step(p.to_json(), 0.0, self._key, list(seg.propagation.slices), {}, 0)

    def _correct(self, p: Prompt, kp: Any) -> Step:
        from medseg.predict.frame import slice_of
        from medseg.predict.propagate import repropagate

        idx = int(kp.index)
        prompts = [*self._state.prompts, p]
        cur = slice_of(self._state.mask, self._ax, idx)
        if isinstance(p, MaskPrompt):
            new = np.asarray(p.mask, dtype=bool)
        else:
            new = self._resegment(idx, prompts, cur)
        if new.any():
            directions: tuple[int, ...] = (-1, 1)
        else:  # nothing left on this slice: clear what was carried through it, away from the key
            key = self._key if self._key is not None else idx
            directions = (-1, 1) if idx == key else ((1,) if idx > key else (-1,))
        bounds = self._state.bounds
        if bounds is not None and isinstance(p, Point) and p.positive:
            bounds = (min(bounds[0], idx), max(bounds[1], idx))  # a click outside widens it
        prompted = self._prompted_slices(prompts)
        if self._key is not None:
            prompted.add(self._key)
        res = repropagate(
            self.predictor,
            self._state.mask,
            idx,
            new,
            directions=directions,
            bounds=bounds,
            anchors=sorted(prompted - {idx}),
            config=self._walk_config(),
            settle=SETTLE_DICE,
            change=None if not isinstance(p, Point) else ("grow" if p.positive else "shrink"),
            region=(new ^ cur) if LOCAL_CARRY else None,
        )
        scores = dict(self._state.scores)
        for r in res.records:
            if r.accepted and r.index != idx:
                scores[r.index] = r.review_score
        scores.pop(idx, None)
        self._state = _State(res.mask, prompts, scores, bounds)
        return Step(p.to_json(), 0.0, idx, res.changed, res.stopped, 0)

    def _walk_config(self) -> PropagationConfig:
        """The config of a click's walk: the session's, with :data:`WALK_ALTERNATIVES`."""
        import dataclasses

        return dataclasses.replace(self._config, alternatives=WALK_ALTERNATIVES)

    def _resegment(self, idx: int, prompts: list[Prompt], cur: np.ndarray) -> np.ndarray:
        """Slice ``idx`` segmented with every prompt that applies there (``(rows, cols)``)."""
        from medseg.predict.frame import split_point
        from medseg.predict.propagate import expand_box, mask_box

        cfg = self._config
        if cfg is None:
            from medseg.predict.propagate import DEFAULT_CONFIG

            cfg = DEFAULT_CONFIG
        pred = self.predictor
        shape = tuple(pred.slice_shape)
        box_rc = None
        pts: list[tuple[float, float]] = []
        labs: list[int] = []
        for q in prompts:
            if isinstance(q, Box) and q.z == idx:
                box_rc = q.rc
            elif isinstance(q, Point):
                i, rc = split_point(q.zyx, self.axis)
                if int(i) == idx:
                    pts.append((float(rc[0]), float(rc[1])))
                    labs.append(int(q.positive))
        if box_rc is None:
            kept = _cut_negatives(cur, pts, labs)  # the box leaves out what was clicked away
            src = kept if kept.any() else (cur if cur.any() else self._nearest_mask(idx))
            bb = mask_box(src) if src is not None else None
            if bb is not None:
                box_rc = expand_box(bb, shape, cfg.box_margin, cfg.box_margin_px)
        if box_rc is not None and pts:
            fg = [pt for pt, lab in zip(pts, labs, strict=True) if lab == 1]
            box_rc = _box_holding(box_rc, fg, shape, cfg.box_margin, cfg.box_margin_px)
        if box_rc is None and not pts:
            return cur.copy()
        kw: dict[str, Any] = {
            "points_rc": np.asarray(pts, float) if pts else None,
            "point_labels": np.asarray(labs, int) if pts else None,
            "box_rc": box_rc,
        }
        out = pred.predict(idx, multimask=box_rc is None, **kw)
        masks, iou = out.masks, out.iou_pred
        if cur.any() and pts:  # the current mask as the mask prompt
            mp = pred.predict(idx, mask_logits=pred.mask_prompt(cur), **kw)
            masks = np.concatenate([mp.masks, masks])
            iou = np.concatenate([mp.iou_pred, iou])
        if box_rc is not None and pts and _agreeing(masks, pts, labs).max() < len(pts):
            more = pred.predict(idx, multimask=True, **kw)  # no click honoured by all: 3 more
            masks = np.concatenate([masks, more.masks])
            iou = np.concatenate([iou, more.iou_pred])
        mask = np.asarray(masks[_closest_honouring(masks, iou, cur, pts, labs)], dtype=bool)
        mask = _main_pieces(_cut_negatives(mask, pts, labs), pts, labs)
        last = prompts[-1]
        if isinstance(last, Point) and cur.any():
            _, rc = split_point(last.zyx, self.axis)
            return _local_edit(cur, mask, (float(rc[0]), float(rc[1])), last.positive)
        return mask

    def _nearest_mask(self, idx: int) -> np.ndarray | None:
        """The current mask on the nearest non-empty slice (the lower one on ties), if any."""
        from medseg.predict.frame import slice_of

        cands = self._nonempty()
        if not cands:
            return None
        j = min(cands, key=lambda i: (abs(i - idx), i))
        return slice_of(self._state.mask, self._ax, j)

    def _nonempty(self) -> list[int]:
        other = tuple(i for i in range(3) if i != self._ax)
        return [int(i) for i in np.flatnonzero(self._state.mask.any(axis=other))]

    def _prompted_slices(self, prompts: list[Prompt] | None = None) -> set[int]:
        from medseg.predict.frame import split_point

        out: set[int] = set()
        for q in self._state.prompts if prompts is None else prompts:
            if isinstance(q, Point):
                out.add(int(split_point(q.zyx, self.axis)[0]))
            else:
                out.add(int(q.z))
        return out


def _box_holding(
    box: tuple[float, float, float, float],
    pts: list[tuple[float, float]],
    shape: tuple[int, ...],
    frac: float,
    px: float,
) -> tuple[float, float, float, float]:
    """``box`` grown to hold every foreground point outside it, with the carry-over margin
    (``frac`` of the grown box's size plus ``px`` per side) on the sides that moved."""
    r0, c0, r1, c1 = box
    n0, m0, n1, m1 = r0, c0, r1, c1
    for r, c in pts:
        n0, m0, n1, m1 = min(n0, r), min(m0, c), max(n1, r), max(m1, c)
    dr, dc = frac * (n1 - n0 + 1) + px, frac * (m1 - m0 + 1) + px
    if n0 < r0:
        r0 = max(0.0, n0 - dr)
    if m0 < c0:
        c0 = max(0.0, m0 - dc)
    if n1 > r1:
        r1 = min(shape[0] - 1.0, n1 + dr)
    if m1 > c1:
        c1 = min(shape[1] - 1.0, m1 + dc)
    return r0, c0, r1, c1


def _local_edit(
    cur: np.ndarray,
    new: np.ndarray,
    click: tuple[float, float],
    positive: bool,
) -> np.ndarray:
    """The current slice mask ``cur`` changed only where the click says (``(rows, cols)``).

    A foreground click adds the 8-connected piece of ``new & ~cur`` under it; a background click
    removes the piece of ``cur & ~new`` under it when that is at most half of ``cur`` (one
    click never empties a slice: breast1 slice 10 and lung1 slice 33 lost a right mask that
    way). Otherwise (the model's change does not reach the click, or would take most of the
    mask) the click takes a *bite*: a background click removes the disk of
    ``cur`` around it reaching the nearest edge of ``cur``; a foreground click adds the disk
    around it reaching the nearest pixel of ``cur`` (so the mask always changes at the click and
    the same click is not needed twice). ``new`` is returned when ``cur`` is empty.
    """
    from scipy import ndimage

    if not cur.any():
        return new
    r, c = round(click[0]), round(click[1])
    diff = (new & ~cur) if positive else (cur & ~new)
    comp, _ = ndimage.label(diff, structure=np.ones((3, 3), bool))
    lab = int(comp[r, c])
    piece = comp == lab if lab else None
    if piece is not None and positive:
        return cur | piece
    if piece is not None and 2 * int(np.count_nonzero(piece)) <= int(np.count_nonzero(cur)):
        return cur & ~piece
    return _bite(cur, (r, c), positive)


def _bite(cur: np.ndarray, click: tuple[int, int], positive: bool) -> np.ndarray:
    """``cur`` with the disk around ``click`` that reaches the nearest pixel of the other kind
    (``cur`` for a foreground click, background for a background click) added / removed."""
    from scipy import ndimage

    r, c = click
    if bool(cur[r, c]) != (not positive):  # already as the click says
        return cur
    other = cur if positive else ~cur
    dist = ndimage.distance_transform_edt(~np.pad(other, 1, constant_values=not positive))
    radius = float(dist[r + 1, c + 1])
    rr, cc = np.ogrid[: cur.shape[0], : cur.shape[1]]
    disk = (rr - r) ** 2 + (cc - c) ** 2 <= radius**2
    return (cur | disk) if positive else (cur & ~disk)


def _agreeing(masks: np.ndarray, pts: list[tuple[float, float]], labs: list[int]) -> np.ndarray:
    """How many clicks each mask honours (foreground inside, background outside).

    Args:
        masks: ``(rows, cols)`` or ``(n, rows, cols)`` boolean.

    Returns:
        ``(n,)`` int counts (``(1,)`` for one mask).
    """
    m = np.asarray(masks, dtype=bool).reshape((-1, *np.shape(masks)[-2:]))
    out = np.zeros(m.shape[0], dtype=int)
    for (r, c), lab in zip(pts, labs, strict=True):
        out += m[:, round(r), round(c)] == bool(lab)
    return out


def _closest_honouring(
    masks: np.ndarray,
    iou: np.ndarray,
    cur: np.ndarray,
    pts: list[tuple[float, float]],
    labs: list[int],
) -> int:
    """Index of the candidate honouring the most clicks and, among those, the closest to the
    current slice mask ``cur`` (2D Dice; the smallest change that does what the clicks say);
    the predicted IoU breaks ties (and decides alone when ``cur`` is empty)."""
    from medseg.predict.propagate import dice3d

    agree = _agreeing(masks, pts, labs)
    best, key = 0, (-1, -np.inf, -np.inf)
    for k in range(masks.shape[0]):
        near = dice3d(masks[k], cur) if cur.any() else 0.0
        cand = (int(agree[k]), near, float(iou[k]))
        if cand > key:
            best, key = k, cand
    return best


def _cut_negatives(mask: np.ndarray, pts: list[tuple[float, float]], labs: list[int]) -> np.ndarray:
    """``mask`` without the 8-connected pieces that hold a background click but no foreground
    click."""
    from scipy import ndimage

    neg = [(round(r), round(c)) for (r, c), lab in zip(pts, labs, strict=True) if lab == 0]
    if not neg or not mask.any():
        return mask
    comp, _ = ndimage.label(mask, structure=np.ones((3, 3), bool))
    pos = {int(comp[round(r), round(c)]) for (r, c), lab in zip(pts, labs, strict=True) if lab == 1}
    out = mask.copy()
    for r, c in neg:
        lab = int(comp[r, c])
        if lab and lab not in pos:
            out[comp == lab] = False
    return out


def _main_pieces(mask: np.ndarray, pts: list[tuple[float, float]], labs: list[int]) -> np.ndarray:
    """With a background click on the slice: only the largest 8-connected piece of ``mask`` and
    those holding a foreground click (fragments left beside a removed region go too)."""
    from scipy import ndimage

    if 0 not in labs or not mask.any():
        return mask
    comp, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n <= 1:
        return mask
    keep = {int(np.argmax(np.bincount(comp.ravel())[1:])) + 1}
    keep |= {int(comp[round(r), round(c)]) for (r, c), lab in zip(pts, labs, strict=True) if lab}
    keep.discard(0)
    return np.isin(comp, sorted(keep))


__all__: list[str] = [
    "LOCAL_CARRY",
    "REVIEW_COUNT",
    "SESSION_ALTERNATIVES",
    "SETTLE_DICE",
    "WALK_ALTERNATIVES",
    "InteractiveSession",
    "Step",
]
