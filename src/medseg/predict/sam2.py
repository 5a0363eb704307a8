"""3D segmentation with SAM 2 / MedSAM2: the slices of a volume as video frames, memory attention.

:class:`Sam2Propagator` drives ``sam2``'s own ``SAM2VideoPredictor`` (``add_new_points_or_box``,
``add_new_mask``, ``propagate_in_video``) on frames made from our :class:`~medseg.volume.Volume`
in memory, one at a time when the model asks for them (:class:`Sam2Frames`): the slice is mapped
to ``[0, 1]`` by the project's intensity module (:mod:`medseg.intensity`: CT window / MR
percentiles), made physically square and fitted into the ``S x S`` input by
:class:`~medseg.predict.frame.ModelFrame` (long side ``S``, padding at the bottom/right), and
normalised with ImageNet mean/std as SAM 2 is (the padding is normalised black). No 8-bit JPEG
dump and no frame folder: the only difference from ``sam2``'s demo path is how frames are made.

Propagation follows ``sam2``: prompts on one or more key slices become conditioning frames; the
object is tracked forward from the lowest key slice through the volume, then backward from it.
A walk stops where the model's object score says the object is gone (``object_score <= 0``, or a
mask under ``min_area_px``) beyond the outermost key slices (between key slices a vanished slice
is left empty and the walk goes on). Memory: the model's per-frame state (memory features,
low-res masks, object pointers) is dropped for frames the memory attention can no longer reach
(more than ``max(num_maskmem, max_obj_ptrs_in_encoder)`` frames behind), so a long volume holds
a window of ~33 frames of state whatever its length; frames are never stored.

Shapes: volumes ``(z, y, x)``; slices along ``axis`` are ``(rows, cols)``; boxes
``(r0, c0, r1, c1)`` inclusive slice pixels. Importing this module does not import torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import PromptError
from medseg.predict.frame import (
    ModelFrame,
    axis_index,
    check_index,
    set_slice,
    slice_of,
    slice_spacing,
)
from medseg.predict.propagate import (
    KeyPrompt,
    PropagationResult,
    SliceRecord,
    _iou2d,
    _merge_keys,
)

if TYPE_CHECKING:
    import torch

    from medseg.intensity import Intensity
    from medseg.models.registry import ModelSpec
    from medseg.models.sam2 import Sam2Model
    from medseg.progress import ProgressCallback
    from medseg.volume import Volume

#: The one object id used in ``sam2``'s inference state.
_OBJ_ID = 1


@dataclass
class Sam2Config:
    """When a SAM 2 walk stops, and how long the review list is.

    Attributes:
        min_object_score: a slice whose object-score logit is at or below this has lost the
            object (``sam2`` itself blanks such masks at 0).
        min_area_px: a mask smaller than this counts as gone too.
        patience: consecutive "gone" slices tolerated beyond the outermost key slices before
            the walk stops (the object may come back; SAM 2 models occlusion).
        max_slices: most slices to track beyond the outermost key slices in each direction
            (``0``: the key slices only; ``None``: the whole volume).
        review_count: length of :attr:`PropagationResult.review`.
    """

    min_object_score: float = 0.0
    min_area_px: int = 4
    patience: int = 0
    max_slices: int | None = None
    review_count: int = 5

    def to_json(self) -> dict[str, Any]:
        """The configuration as a plain dict."""
        return asdict(self)


@dataclass
class Sam2SliceRecord(SliceRecord):
    """A :class:`~medseg.predict.propagate.SliceRecord` plus SAM 2's object score.

    ``similarity``/``bg_similarity`` are not computed by this engine (NaN, ``null`` in JSON).

    Attributes:
        object_score: the model's object-presence logit (> 0: the object is there).
    """

    object_score: float = 0.0


def review_score(rec: Sam2SliceRecord) -> float:
    """How much a slice needs a human look: 0 (trustworthy) .. 1.

    The mean of four shortfalls clipped to [0, 1]: ``1 - iou_pred``, ``1 - stability``,
    ``1 - sigmoid(object_score)`` and ``|log2(area_ratio)| / 2``, plus ``0.02`` per slice from
    the key slice.
    """
    presence = 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, rec.object_score))))
    parts = [
        1.0 - rec.iou_pred,
        1.0 - rec.stability,
        1.0 - presence,
        abs(math.log2(max(rec.area_ratio, 1e-6))) / 2.0,
    ]
    s = float(np.mean([min(1.0, max(0.0, p)) for p in parts])) + 0.02 * rec.distance
    return min(1.0, max(0.0, s))


class Sam2Frames:
    """The volume's slices as SAM 2 input frames, made when asked for (nothing is stored).

    ``frames[i]`` is a ``(3, S, S)`` float32 tensor: slice ``i`` along ``axis`` mapped by
    ``intensity`` to ``[0, 1]``, resized/padded by ``frame`` (square physical pixels), then
    ``(x - mean) / std`` per channel (the padding is normalised 0, i.e. black).

    Args:
        volume: the image ``(z, y, x)``.
        axis: ``'z'``, ``'y'`` or ``'x'``.
        intensity: the intensity mapping (:func:`medseg.intensity.resolve_intensity`).
        frame: the slice ↔ model-input geometry.
        mean: per-channel mean on ``[0, 1]`` (ImageNet's for SAM 2).
        std: per-channel standard deviation on ``[0, 1]``.
    """

    def __init__(
        self,
        volume: Volume,
        axis: str | int,
        intensity: Intensity,
        frame: ModelFrame,
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        self.volume = volume
        self._ax = axis_index(axis)
        self.intensity = intensity
        self.frame = frame
        self.mean = np.asarray(mean, np.float32)[:, None, None]
        self.std = np.asarray(std, np.float32)[:, None, None]
        self.made = 0  # frames made so far (each one is an image-encoder run in sam2)

    def __len__(self) -> int:
        return int(self.volume.shape[self._ax])

    def array(self, index: int) -> np.ndarray:
        """Frame ``index`` as a ``(3, S, S)`` float32 array."""
        idx = check_index(index, len(self), "zyx"[self._ax])
        sl = self.intensity.apply(slice_of(self.volume.array, self._ax, idx))
        out = self.frame.image_to_model(sl, "unit")  # [0, 1] inside, 0 in the padding
        return ((out - self.mean) / self.std).astype(np.float32, copy=False)

    def __getitem__(self, index: int) -> torch.Tensor:
        import torch

        self.made += 1
        return torch.from_numpy(self.array(int(index)))


class Sam2Propagator:
    """SAM 2 memory-attention propagation over the slices of one volume along one axis.

    Args:
        volume: the image (``(z, y, x)``, spacing in mm).
        model: a SAM 2 registry name / spec (loaded through
            :func:`medseg.models.sam2.get_sam2_model`) or a loaded
            :class:`~medseg.models.sam2.Sam2Model`.
        axis: ``'z'`` (axial frames ``(y, x)``), ``'y'`` (``(z, x)``) or ``'x'`` (``(z, y)``).
        window: CT window preset / ``"LO,HI"`` / ``"percentile"`` / ``None`` (by modality).
        weights: checkpoint file (else ``$MEDSEG_HOME/weights`` / verified download).
        precision: ``'auto'`` | ``'fp32'`` | ``'bf16'`` (autocast).
        device: ``'auto'`` | ``'cpu'`` | ``'cuda'``.

    Raises:
        WeightsError: ``sam2`` missing, weights missing/unreadable/mismatched.
        PromptError: unknown axis.
    """

    def __init__(
        self,
        volume: Volume,
        model: str | ModelSpec | Sam2Model = "sam2.1_hiera_tiny",
        *,
        axis: str = "z",
        window: str | None = None,
        weights: Any = None,
        precision: str = "auto",
        device: str = "auto",
    ) -> None:
        from medseg.intensity import resolve_intensity
        from medseg.models.registry import IMAGENET_MEAN, IMAGENET_STD
        from medseg.models.sam2 import Sam2Model, get_sam2_model

        self.volume = volume
        self._ax = axis_index(axis)
        self.axis = "zyx"[self._ax]
        if isinstance(model, Sam2Model):
            self.model = model
        else:
            self.model = get_sam2_model(model, weights=weights, device=device, precision=precision)
        self.spec = self.model.spec
        self.intensity: Intensity = resolve_intensity(volume, window)
        shape = volume.array.shape
        self.n_slices = int(shape[self._ax])
        rest = [int(s) for i, s in enumerate(shape) if i != self._ax]
        self.slice_shape: tuple[int, int] = (rest[0], rest[1])
        size = self.model.image_size
        self.frame = ModelFrame(
            self.slice_shape, size, slice_spacing(volume.spacing, self._ax), lowres_size=size // 4
        )
        self.frames = Sam2Frames(
            volume, self._ax, self.intensity, self.frame, IMAGENET_MEAN, IMAGENET_STD
        )
        self.decoder_calls = 0
        self.peak_state_frames = 0  # most frames of model state held at once (last run)
        self.trim_state = True  # drop model state the memory can no longer reach (checks: off)

    # ------------------------------------------------------------------ sam2 state
    def new_state(self) -> dict[str, Any]:
        """An empty ``sam2`` inference state over :attr:`frames`.

        The same entries as ``SAM2VideoPredictor.init_state`` (sam2 1.1.0), with the frames from
        memory and the "video" size set to the model-input square ``S x S`` (prompts and masks
        are mapped by :attr:`frame`); frame 0 is not encoded in advance.
        """
        import collections

        import torch

        dev = torch.device(self.model.device)
        s = self.model.image_size
        return {
            "images": self.frames,
            "num_frames": len(self.frames),
            "offload_video_to_cpu": True,
            "offload_state_to_cpu": False,
            "video_height": s,
            "video_width": s,
            "device": dev,
            "storage_device": dev,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": {},
            "constants": {},
            "obj_id_to_idx": collections.OrderedDict(),
            "obj_idx_to_id": collections.OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
        }

    def add_prompt(self, state: dict[str, Any], kp: KeyPrompt) -> Any:
        """Put one key slice's prompt into ``state`` (a mask wins over points/box on that slice).

        Returns:
            the ``(1, 1, S, S)`` mask logits ``sam2`` returns for the key frame.

        Raises:
            PromptError: a box or point outside the slice, a degenerate box.
        """
        import torch

        net = self.model.net
        h, w = self.slice_shape
        if kp.mask is not None:
            m = np.asarray(kp.mask, dtype=bool)
            if m.shape != (h, w):
                raise PromptError(f"mask shape {m.shape} does not match the {h}x{w} slice")
            full = self.frame._mask_to_input(m) >= 0.5
            _, _, logits = net.add_new_mask(state, kp.index, _OBJ_ID, torch.from_numpy(full))
            return logits
        from medseg.predict.sam import check_slice_prompts

        rc, lab, box_rc = check_slice_prompts(
            kp.points_rc, kp.point_labels, kp.box_rc, self.slice_shape
        )
        box = pts = labels = None
        if box_rc is not None:
            box = torch.from_numpy(self.frame.box_to_model(tuple(box_rc)))
        if rc is not None:
            pts = torch.from_numpy(self.frame.points_to_model(rc))
            labels = torch.as_tensor(lab.astype(np.int32))
        _, _, logits = net.add_new_points_or_box(
            state, kp.index, _OBJ_ID, points=pts, labels=labels, box=box
        )
        return logits

    # ------------------------------------------------------------------ propagation
    def propagate(
        self,
        key_prompts: Sequence[KeyPrompt],
        config: Sam2Config | None = None,
        progress: ProgressCallback | None = None,
        keep_logits: bool = False,
    ) -> PropagationResult:
        """Segment the object in 3D from prompts on one or more key slices.

        Args:
            key_prompts: prompts in slice pixels (several on one slice are merged).
            config: stop rule (default :class:`Sam2Config`).
            progress: ``progress(done, total)`` after each slice; raising inside it cancels.
            keep_logits: keep each predicted slice's ``(rows, cols)`` float32 logits in
                :attr:`last_logits` (for checks; costs memory).

        Returns:
            :class:`~medseg.predict.propagate.PropagationResult` (records are
            :class:`Sam2SliceRecord`), the ``(z, y, x)`` mask on the volume's grid.

        Raises:
            PromptError: no prompt, a slice index out of range, a prompt outside its slice.
        """
        import torch

        cfg = config or Sam2Config()
        t0 = time.perf_counter()
        if not key_prompts:
            raise PromptError("no key-slice prompt: give at least one box, point or mask")
        for kp in key_prompts:
            check_index(kp.index, self.n_slices, self.axis)
            if not kp.has_prompt():
                raise PromptError(f"key slice {kp.index} has no prompt (box, points or mask)")
        keys = _merge_keys(key_prompts)
        key_idx = [k.index for k in keys]
        lo_key, hi_key = key_idx[0], key_idx[-1]
        n = self.n_slices
        reach = n if cfg.max_slices is None else max(0, int(cfg.max_slices))
        top, bottom = min(n - 1, hi_key + reach), max(0, lo_key - reach)
        total = top - bottom + 1
        self.last_logits: dict[int, np.ndarray] = {}
        net = self.model.net
        ious: list[float] = []

        def hook(_mod: Any, _inp: Any, out: Any) -> None:
            ious.append(float(out[1].detach().float().max()))

        done = [0]

        def tick() -> None:
            done[0] += 1
            if progress is not None:
                progress(min(done[0], total), total)

        if progress is not None:
            progress(0, total)
        records: list[Sam2SliceRecord] = []
        masks: dict[int, np.ndarray] = {}
        dev_type = torch.device(self.model.device).type
        bf16 = self.model.precision == "bf16"
        with (
            self.model.lock,
            torch.inference_mode(),
            torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16),
        ):
            handle = net.sam_mask_decoder.register_forward_hook(hook)
            try:
                state = self.new_state()
                key_iou: dict[int, float] = {}
                for kp in keys:
                    ious.clear()
                    self.add_prompt(state, kp)
                    key_iou[kp.index] = 1.0 if kp.mask is not None or not ious else ious[-1]
                window = max(int(net.num_maskmem), int(net.max_obj_ptrs_in_encoder)) + 1
                walk = _Walk(self, cfg, key_idx, key_iou, records, masks, keep_logits)
                # forward from the lowest key slice, then backward from it (as sam2 does)
                for reverse, last in ((False, top), (True, bottom)):
                    gen = net.propagate_in_video(
                        state,
                        start_frame_idx=lo_key,
                        max_frame_num_to_track=abs(last - lo_key),
                        reverse=reverse,
                    )
                    walk.start(reverse)
                    try:
                        ious.clear()
                        for idx, _, logits in gen:
                            out = _frame_output(state, idx)
                            iou = key_iou[idx] if idx in key_iou else (ious[-1] if ious else 1.0)
                            ious.clear()
                            if walk.seen(idx):
                                continue
                            stop = walk.step(idx, logits, out, float(iou))
                            self.decoder_calls += idx not in key_iou
                            if self.trim_state:
                                _trim_state(state, idx, window, key_idx, lo_key, reverse)
                            self.peak_state_frames = max(self.peak_state_frames, _held(state))
                            tick()
                            if stop:
                                break
                    finally:
                        gen.close()
            finally:
                handle.remove()

        mask = np.zeros(self.volume.shape, dtype=bool)
        for idx, m in masks.items():
            set_slice(mask, self._ax, idx, m)
        records.sort(key=lambda r: (r.index, r.distance, r.source))
        key_set = set(key_idx)
        scored = [
            (r.review_score, r.index) for r in records if r.accepted and r.index not in key_set
        ]
        scored.sort(key=lambda t: (-t[0], t[1]))
        review = [idx for _, idx in scored[: max(0, cfg.review_count)]]
        if progress is not None:
            progress(total, total)
        return PropagationResult(
            mask=mask,
            records=list(records),
            review=review,
            axis=self.axis,
            key_slices=sorted(key_set),
            config=cfg,  # type: ignore[arg-type]  (same to_json() contract)
            seconds=time.perf_counter() - t0,
        )

    def cache_info(self) -> dict[str, Any]:
        """Frame and model counters of the last run (the report's ``cache`` entry)."""
        return {
            "frames_made": self.frames.made,
            "decoder_calls": self.decoder_calls,
            "peak_state_frames": self.peak_state_frames,
            "model": self.spec.name,
            "image_size": self.model.image_size,
            "precision": self.model.precision,
            "axis": self.axis,
            "intensity": self.intensity.key,
        }


class _Walk:
    """Bookkeeping of one propagation: records, masks, the stop rule."""

    def __init__(
        self,
        p: Sam2Propagator,
        cfg: Sam2Config,
        keys: list[int],
        key_iou: dict[int, float],
        records: list[Sam2SliceRecord],
        masks: dict[int, np.ndarray],
        keep_logits: bool,
    ) -> None:
        self.p, self.cfg, self.keys, self.key_iou = p, cfg, keys, key_iou
        self.records, self.masks, self.keep = records, masks, keep_logits
        self.done: set[int] = set()
        self.key_intensity: dict[int, float] = {}
        self.key_diam: dict[int, float] = {}
        self.reverse = False
        self.source = keys[0]
        self.prev_area = 0
        self.prev_mask: np.ndarray | None = None
        self.misses = 0
        row_mm, col_mm = slice_spacing(p.volume.spacing, p._ax)
        self.pixel_mm2 = row_mm * col_mm
        self.step_mm = float(p.volume.spacing[p._ax])

    def start(self, reverse: bool) -> None:
        self.reverse = reverse
        self.source = self.keys[0]
        self.misses = 0
        self.prev_mask = self.masks.get(self.keys[0])
        self.prev_area = int(np.count_nonzero(self.prev_mask)) if self.prev_mask is not None else 0

    def seen(self, idx: int) -> bool:
        return idx in self.done  # the lowest key slice opens both passes

    def step(self, idx: int, video_logits: Any, out: dict[str, Any], iou: float) -> bool:
        """Record slice ``idx``; ``True`` when the walk must stop here."""
        self.done.add(idx)
        arr = video_logits[0].detach().float().cpu().numpy()  # (1, S, S)
        logits = self.p.frame.logits_to_slice(arr)[0]
        if self.keep:
            self.p.last_logits[idx] = logits
        mask = logits > 0
        area = int(np.count_nonzero(mask))
        hi = np.count_nonzero(logits > 1.0)
        lo = np.count_nonzero(logits > -1.0)
        stability = float(hi / lo) if lo else 1.0
        score = float(out["object_score_logits"].float().max())
        inten = self._intensity(idx, mask)
        is_key = idx in self.key_iou
        if is_key:
            self.source = idx
            self.key_intensity[idx] = inten
            self.key_diam[idx] = 2.0 * math.sqrt(area * self.pixel_mm2 / math.pi)
        dist = abs(idx - self.source)
        ref_int = self.key_intensity.get(self.source, float("nan"))
        diam = self.key_diam.get(self.source, 0.0)
        rec = Sam2SliceRecord(
            index=idx,
            source=self.source,
            distance=dist,
            accepted=True,
            iou_pred=iou,
            stability=stability,
            area_px=area,
            area_ratio=1.0 if is_key else area / max(1, self.prev_area),
            similarity=float("nan"),
            intensity=inten,
            intensity_shift=abs(inten - ref_int) if area and math.isfinite(ref_int) else 0.0,
            overlap=(
                1.0 if is_key else 0.0 if self.prev_mask is None else _iou2d(mask, self.prev_mask)
            ),
            extent=dist * self.step_mm / diam if diam > 0 else (float("inf") if dist else 0.0),
            bg_similarity=float("nan"),
            object_score=score,
        )
        gone = score <= self.cfg.min_object_score or area < max(1, self.cfg.min_area_px)
        beyond = idx > self.keys[-1] if not self.reverse else idx < self.keys[0]
        stop = False
        if gone:
            rec.accepted = False
            rec.stopped = "object gone" if score <= self.cfg.min_object_score else "vanished"
            if beyond:
                self.misses += 1
                stop = self.misses > max(0, self.cfg.patience)
        else:
            self.misses = 0
            rec.review_score = review_score(rec)
            self.masks[idx] = mask
        self.records.append(rec)
        self.prev_mask, self.prev_area = mask, area
        return stop

    def _intensity(self, idx: int, mask: np.ndarray) -> float:
        if not mask.any():
            return float("nan")
        sl = self.p.intensity.apply(slice_of(self.p.volume.array, self.p._ax, idx))
        return float(sl[mask].mean())


def _frame_output(state: dict[str, Any], idx: int) -> dict[str, Any]:
    """``sam2``'s stored output of frame ``idx`` for our one object."""
    od = state["output_dict_per_obj"][0]
    out = od["cond_frame_outputs"].get(idx)
    return out if out is not None else od["non_cond_frame_outputs"][idx]


def _trim_state(
    state: dict[str, Any], idx: int, window: int, keys: list[int], lo_key: int, reverse: bool
) -> None:
    """Drop the model state of the frame ``window`` slices behind ``idx`` when nothing can read
    it any more: memory attention looks back at most ``num_maskmem`` frames and the object
    pointers ``max_obj_ptrs_in_encoder`` frames; the backward pass reads the frames just above the
    lowest key slice, so those are kept until it ends."""
    od = state["output_dict_per_obj"][0]["non_cond_frame_outputs"]
    old = idx - window if not reverse else idx + window
    if old in keys:
        return
    if not reverse and old <= lo_key + window:
        return
    if reverse and old >= lo_key:
        return
    od.pop(old, None)


def _held(state: dict[str, Any]) -> int:
    od = state["output_dict_per_obj"][0]
    return len(od["non_cond_frame_outputs"]) + len(od["cond_frame_outputs"])


def sam2_config(config: Any = None, propagate: bool = True) -> Sam2Config:
    """The :class:`Sam2Config` for :func:`medseg.segment`'s ``config``/``propagate``.

    A :class:`Sam2Config` is used as is; a slice-loop
    :class:`~medseg.predict.propagate.PropagationConfig` gives its ``max_slices``,
    ``min_area_px`` and ``review_count`` (its other checks belong to the slice loop); ``None``
    the defaults. ``propagate=False`` keeps the key slices only.
    """
    if isinstance(config, Sam2Config):
        cfg = Sam2Config(**config.to_json())
    elif config is None:
        cfg = Sam2Config()
    else:
        cfg = Sam2Config(
            max_slices=config.max_slices,
            min_area_px=config.min_area_px,
            review_count=config.review_count,
        )
    if not propagate:
        cfg.max_slices = 0
    return cfg


def sam2_predictor(
    ref: Any,
    image: Volume,
    predictor: Any = None,
    *,
    axis: str = "z",
    window: str | None = None,
    weights: Any = None,
    precision: str = "auto",
    device: str = "auto",
) -> Sam2Propagator:
    """The given :class:`Sam2Propagator` (checked to fit ``image``/``axis``/model) or a new one.

    Raises:
        InputError: a predictor of another kind, image, axis or model.
    """
    from medseg.errors import InputError

    if predictor is None:
        return Sam2Propagator(
            image,
            ref.spec,
            axis=axis,
            window=window,
            weights=weights,
            precision=precision,
            device=device,
        )
    if not isinstance(predictor, Sam2Propagator):
        raise InputError(
            f"{ref.name} propagates with SAM 2; the given predictor is for another engine"
        )
    from medseg.predict.sam import check_predictor_fits

    check_predictor_fits(predictor, image, axis, ref.spec.name)
    return predictor
