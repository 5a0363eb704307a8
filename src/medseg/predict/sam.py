"""Promptable slice segmentation of a volume with a SAM-family model.

:class:`VolumePredictor` embeds a slice once (intensity mapping from :mod:`medseg.intensity`,
resize/pad from :class:`~medseg.predict.frame.ModelFrame`), caches the embedding (memory LRU +
optional disk) and answers any number of prompts on it. Prompts and masks are in the slice's own
pixel frame: ``(row, col)`` — for an axial slice ``(y, x)`` of the ``(z, y, x)`` volume.

Importing this module is cheap (no torch); the model loads when a predictor is created.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import PromptError
from medseg.predict.frame import (
    ModelFrame,
    axis_index,
    check_index,
    slice_of,
    slice_spacing,
)

if TYPE_CHECKING:
    import torch

    from medseg.intensity import Intensity
    from medseg.models.sam import SamModel
    from medseg.progress import ProgressCallback
    from medseg.volume import Volume


#: Prompts may lie up to half a pixel outside the slice (pixel edges, as napari draws them);
#: they are clipped onto the border pixels. Further out is an error.
_EDGE = 0.5


@dataclass
class SlicePrediction:
    """Masks for one prompt on one slice.

    Attributes:
        masks: ``(K, H, W)`` bool in the slice frame (``K = 3`` with multimask, else 1).
        iou_pred: ``(K,)`` the model's predicted IoU of each mask.
        stability: ``(K,)`` IoU between the mask thresholded at logit +1 and at -1.
        low_res_logits: ``(K, 256, 256)`` float32 decoder logits; pass one as ``mask_logits``.
    """

    masks: np.ndarray
    iou_pred: np.ndarray
    stability: np.ndarray
    low_res_logits: np.ndarray

    def best(self) -> int:
        """Index of the mask with the highest predicted IoU."""
        return int(np.argmax(self.iou_pred))


class VolumePredictor:
    """Embed-once, prompt-many predictor over the slices of a volume along one axis.

    Args:
        volume: the image (``(z, y, x)`` array, spacing in mm).
        model: registry name (``litemedsam``, ``sam_vit_b``, ``medsam_vit_b``), loaded through
            :func:`medseg.models.sam.get_sam_model` (shared per process), or a loaded
            :class:`~medseg.models.sam.SamModel` (then ``weights``/``precision``/``device`` are
            the model's).
        axis: ``'z'`` (axial, slices ``(y, x)``), ``'y'`` (``(z, x)``) or ``'x'`` (``(z, y)``).
        window: CT window preset / ``"LO,HI"`` / ``"percentile"`` / ``None`` (default mapping),
            see :func:`medseg.intensity.resolve_intensity`.
        weights: checkpoint path (else the weights cache / packaged copy).
        cache_dir: folder for the disk embedding cache; ``None`` keeps embeddings in memory only
            (:func:`medseg.predict.cache.default_cache_dir` is the conventional folder). The
            folder is pruned to ``$MEDSEG_CACHE_MAX_MB`` (default 4096 MiB) when a predictor
            opens it, least recently used entries first. A model without a weights digest
            (random weights, not loaded from a file) never uses the disk cache.
        precision: ``'auto'`` | ``'fp32'`` | ``'bf16'`` for the image encoder.
        device: ``'auto'`` | ``'cpu'`` | ``'cuda'``.
        runtime: ``'auto'`` | ``'torch'`` | ``'openvino'`` for the image encoder
            (:func:`medseg.runtime.resolve_runtime`).
        memory_slices: embeddings kept in the memory LRU (4 MiB each); default 64 with a disk
            cache (evicted slices come back from disk in milliseconds; 256 cost 1 GiB of RSS on
            a 400-slice CT), 256 without one.

    Raises:
        WeightsError: weights missing/corrupted/mismatched.
        PromptError: unknown axis.
    """

    def __init__(
        self,
        volume: Volume,
        model: str | SamModel = "litemedsam",
        *,
        axis: str = "z",
        window: str | None = None,
        weights: str | Path | None = None,
        cache_dir: str | Path | None = None,
        precision: str = "auto",
        device: str = "auto",
        memory_slices: int | None = None,
        runtime: str = "auto",
    ) -> None:
        from medseg.intensity import resolve_intensity
        from medseg.models.sam import SamModel, get_sam_model
        from medseg.predict.cache import (
            EmbeddingCache,
            array_digest,
            disk_budget_bytes,
            prune_disk_cache,
        )

        self.volume = volume
        self.axis = str(axis).strip().lower()
        self._ax = axis_index(self.axis)
        self.axis = "zyx"[self._ax]
        if isinstance(model, SamModel):
            self.model = model
        else:
            self.model = get_sam_model(
                model, weights=weights, device=device, precision=precision, runtime=runtime
            )
        self.spec = self.model.spec
        self.intensity: Intensity = resolve_intensity(volume, window)
        shape = volume.array.shape
        self.n_slices = int(shape[self._ax])
        rest = [int(s) for i, s in enumerate(shape) if i != self._ax]
        self.slice_shape: tuple[int, int] = (rest[0], rest[1])
        self.frame = ModelFrame(
            self.slice_shape,
            self.spec.input_size,
            slice_spacing(volume.spacing, self._ax),
            lowres_size=self.spec.lowres_size,
        )
        base_key: dict[str, Any] = {}
        if self.model.weights_sha256 is None:
            cache_dir = None  # random/unsaved weights: nothing identifies them on disk
        if cache_dir is not None:
            base_key = {
                "volume": array_digest(volume.array),
                "model": self.spec.name,
                "weights": self.model.weights_sha256,
                "axis": self.axis,
                "intensity": self.intensity.key,
                "precision": self.model.precision,
                "input_size": self.spec.input_size,
                "spacing": [round(float(s), 6) for s in volume.spacing],
            }
            rt = getattr(self.model, "runtime", "torch")
            if rt != "torch":  # another runtime's embeddings differ by roundings
                base_key["runtime"] = rt
        if memory_slices is None:
            memory_slices = 64 if cache_dir is not None else 256
        e = int(self.spec.embedding_size)
        self.cache = EmbeddingCache(memory_slices, cache_dir, base_key, entry_shape=(1, 256, e, e))
        if self.cache.disk_dir is not None:  # keep it within budget (oldest entries go first)
            prune_disk_cache(self.cache.disk_dir, disk_budget_bytes())
        self.encoder_calls = 0  # number of slices run through the image encoder
        self.decoder_calls = 0
        self._lock = threading.RLock()  # one encoder run at a time (GUI worker threads)

    # ------------------------------------------------------------------ embeddings
    def _check(self, index: int) -> int:
        return check_index(index, self.n_slices, self.axis)

    def model_input(self, index: int) -> np.ndarray:
        """Model-ready input ``(3, S, S)`` float32 of slice ``index``."""
        idx = self._check(index)
        sl = self.intensity.apply(slice_of(self.volume.array, self._ax, idx))
        return self.frame.image_to_model(sl, self.spec.normalisation)

    def is_cached(self, index: int) -> bool:
        """Whether slice ``index``'s embedding is in memory or on disk."""
        idx = self._check(index)
        return self.cache.in_memory(idx) or self.cache.on_disk(idx)

    def embed(self, index: int) -> torch.Tensor:
        """Embedding ``(1, 256, 64, 64)`` float32 of slice ``index`` (cached; the tensor shares
        memory with the cache entry, so do not modify it in place).

        Raises:
            PromptError: index out of range.
        """
        import torch

        idx = self._check(index)
        hit = self.cache.get(idx)
        if hit is None:
            with self._lock:
                hit = self.cache.get(idx) if self.cache.in_memory(idx) else None
                if hit is None:
                    hit = self._encode_batch([idx])[0]
        return torch.from_numpy(hit)

    def _encode_batch(self, indices: list[int]) -> list[np.ndarray]:
        import torch

        with self._lock:
            batch = torch.from_numpy(np.stack([self.model_input(i) for i in indices]))
            emb = self.model.encode(batch).detach().cpu().numpy().astype(np.float32, copy=False)
            self.encoder_calls += len(indices)
            out = [emb[j : j + 1].copy() for j in range(len(indices))]
            for i, e in zip(indices, out, strict=True):
                self.cache.put(i, e)
        return out

    def precompute(
        self,
        indices: Iterable[int] | None = None,
        progress: ProgressCallback | None = None,
        batch_size: int = 4,
    ) -> None:
        """Embed the given slices (default: all) in batches, skipping cached ones.

        ``progress(done, total)`` is called after each batch; raising inside it cancels.
        """
        wanted = range(self.n_slices) if indices is None else indices
        todo: list[int] = []
        seen: set[int] = set()
        for i in wanted:
            idx = self._check(i)
            if idx not in seen and not self.is_cached(idx):
                todo.append(idx)
                seen.add(idx)
        total = len(todo)
        if progress is not None:
            progress(0, total)
        bs = max(1, int(batch_size))
        for start in range(0, total, bs):
            chunk = todo[start : start + bs]
            self._encode_batch(chunk)
            if progress is not None:
                progress(min(start + bs, total), total)

    # ------------------------------------------------------------------ prompts
    def _validate_prompts(
        self, points_rc: Any, point_labels: Any, box_rc: Any, mask_logits: Any
    ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
        pts, lab, box = check_slice_prompts(points_rc, point_labels, box_rc, self.slice_shape)
        mlog = None
        if mask_logits is not None:
            m = _as_numpy(mask_logits).astype(np.float32)
            m = m.reshape(m.shape[-2:]) if m.ndim > 2 and m.size == m.shape[-1] ** 2 else m
            low = self.spec.lowres_size
            if m.shape != (low, low):
                raise PromptError(
                    f"mask_logits must be ({low}, {low}) low-res logits from a previous "
                    f"prediction (use ModelFrame.mask_to_lowres for a slice mask), got {m.shape}"
                )
            mlog = m
        if pts is None and box is None and mlog is None:
            raise PromptError("no prompt: give at least one point, a box or mask_logits")
        return pts, lab, box, mlog

    def predict(
        self,
        index: int,
        *,
        points_rc: Any = None,
        point_labels: Any = None,
        box_rc: Any = None,
        mask_logits: Any = None,
        multimask: bool = False,
    ) -> SlicePrediction:
        """Segment slice ``index`` from prompts in slice pixels.

        Args:
            index: slice index along the predictor's axis.
            points_rc: ``(N, 2)`` ``(row, col)`` points (axial: ``(y, x)``).
            point_labels: ``(N,)`` 1 foreground / 0 background (default all 1).
            box_rc: ``(r0, c0, r1, c1)`` inclusive pixel bounds (axial: ``(y0, x0, y1, x1)``).
            mask_logits: ``(256, 256)`` ``low_res_logits[k]`` of an earlier prediction.
            multimask: return three candidate masks.

        Returns:
            :class:`SlicePrediction` with ``K = 3`` (multimask) or 1 masks of shape ``(H, W)``.

        Raises:
            PromptError: index out of range, point/box outside the slice, degenerate box,
                no prompt.
        """
        import torch

        idx = self._check(index)
        pts, lab, box, mlog = self._validate_prompts(points_rc, point_labels, box_rc, mask_logits)
        emb = self.embed(idx)
        t_pts = t_lab = t_box = t_mask = None
        if pts is not None:
            t_pts = torch.from_numpy(self.frame.points_to_model(pts))[None]
            t_lab = torch.from_numpy(lab)[None]
        if box is not None:
            t_box = torch.from_numpy(self.frame.box_to_model(box))[None]
        if mlog is not None:
            t_mask = torch.from_numpy(mlog)[None, None]
        low, iou = self.model.decode(emb, t_pts, t_lab, t_box, t_mask, multimask=multimask)
        self.decoder_calls += 1
        low_np = low[0].detach().cpu().numpy().astype(np.float32)
        logits = self.frame.logits_to_slice(low_np)
        masks = logits > 0
        hi = np.count_nonzero(logits > 1.0, axis=(1, 2))
        lo = np.count_nonzero(logits > -1.0, axis=(1, 2))
        stability = np.where(lo > 0, hi / np.maximum(lo, 1), 1.0).astype(np.float32)
        return SlicePrediction(
            masks=masks,
            iou_pred=iou[0].detach().cpu().numpy().astype(np.float32),
            stability=stability,
            low_res_logits=low_np,
        )

    def mask_prompt(self, mask: np.ndarray) -> np.ndarray:
        """A slice mask ``(H, W)`` → ``(256, 256)`` logits usable as ``mask_logits``."""
        return self.frame.mask_to_lowres(mask)

    def object_embedding(self, index: int, mask: np.ndarray) -> np.ndarray:
        """Mask-pooled embedding ``(256,)`` of an object on slice ``index``, L2-normalised.

        Each of the 64x64 embedding cells is weighted by the fraction of it covered by ``mask``
        ``(H, W)``. An empty mask gives a zero vector.
        """
        idx = self._check(index)
        wgt = self.frame.mask_to_grid(np.asarray(mask, dtype=bool), self.spec.embedding_size)
        total = float(wgt.sum())
        if total <= 0:
            return np.zeros(256, dtype=np.float32)
        emb = self.embed(idx)[0].numpy()  # (C, 64, 64)
        vec = np.tensordot(emb, wgt, axes=([1, 2], [0, 1])) / total
        norm = float(np.linalg.norm(vec))
        return (vec / norm if norm > 0 else vec).astype(np.float32)

    def cache_info(self) -> dict[str, Any]:
        """Cache statistics plus ``encoder_calls``, ``decoder_calls``, model and precision."""
        return {
            **self.cache.info(),
            "encoder_calls": self.encoder_calls,
            "decoder_calls": self.decoder_calls,
            "model": self.spec.name,
            "precision": self.model.precision,
            "runtime": getattr(self.model, "runtime", "torch"),
            "axis": self.axis,
            "intensity": self.intensity.key,
        }


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def check_slice_prompts(
    points_rc: Any, point_labels: Any, box_rc: Any, slice_shape: tuple[int, int]
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Check point and box prompts against a ``(rows, cols)`` slice and clip them into it.

    Args:
        points_rc: ``(N, 2)`` or ``(2,)`` (row, col) pixel coordinates, or ``None``/empty.
        point_labels: ``N`` values of 1 (foreground) / 0 (background); ``None`` = all 1.
        box_rc: ``(r0, c0, r1, c1)`` or ``None``.
        slice_shape: ``(rows, cols)`` of the slice.

    Returns:
        ``(points (N, 2) float, labels (N,) int64, box (4,) float)``, each ``None`` when absent.
        Coordinates up to half a pixel outside the slice are clipped onto its edge.

    Raises:
        PromptError: malformed, degenerate or outside the slice.
    """
    h, w = slice_shape
    pts = lab = box = None
    if points_rc is not None:
        pts = np.asarray(points_rc, dtype=np.float64)
        if pts.size == 0:
            pts = None
        else:
            if pts.ndim == 1 and pts.shape == (2,):
                pts = pts[None]
            if pts.ndim != 2 or pts.shape[1] != 2 or not np.all(np.isfinite(pts)):
                raise PromptError(f"points must be (N, 2) (row, col) numbers, got {points_rc!r}")
            bad = (
                (pts[:, 0] < -_EDGE)
                | (pts[:, 0] > h - 1 + _EDGE)
                | (pts[:, 1] < -_EDGE)
                | (pts[:, 1] > w - 1 + _EDGE)
            )
            if np.any(bad):
                r, c = pts[int(np.argmax(bad))]
                raise PromptError(
                    f"point (row {r:g}, col {c:g}) is outside the {h}x{w} slice; "
                    f"rows 0..{h - 1}, cols 0..{w - 1}"
                )
            pts = np.stack([np.clip(pts[:, 0], 0, h - 1), np.clip(pts[:, 1], 0, w - 1)], 1)
            if point_labels is None:
                lab = np.ones(len(pts), dtype=np.int64)
            else:
                lab = np.asarray(point_labels).reshape(-1)
                if lab.shape[0] != pts.shape[0] or not np.all(np.isin(lab, (0, 1))):
                    raise PromptError(
                        f"point_labels must be {pts.shape[0]} values of 1 (foreground) or "
                        f"0 (background), got {point_labels!r}"
                    )
                lab = lab.astype(np.int64)
    if box_rc is not None:
        b = np.asarray(box_rc, dtype=np.float64).reshape(-1)
        if b.shape != (4,) or not np.all(np.isfinite(b)):
            raise PromptError(f"box must be four numbers (r0, c0, r1, c1), got {box_rc!r}")
        r0, c0, r1, c1 = b
        if r1 < r0 or c1 < c0 or (r1 == r0 and c1 == c0):
            raise PromptError(
                f"degenerate box (r0 {r0:g}, c0 {c0:g}, r1 {r1:g}, c1 {c1:g}): need r0 <= r1, "
                "c0 <= c1 and a non-zero extent"
            )
        if r0 < -_EDGE or c0 < -_EDGE or r1 > h - 1 + _EDGE or c1 > w - 1 + _EDGE:
            raise PromptError(
                f"box (r0 {r0:g}, c0 {c0:g}, r1 {r1:g}, c1 {c1:g}) is outside the {h}x{w} "
                f"slice; rows 0..{h - 1}, cols 0..{w - 1}"
            )
        box = np.array(
            [
                np.clip(r0, 0, h - 1),
                np.clip(c0, 0, w - 1),
                np.clip(r1, 0, h - 1),
                np.clip(c1, 0, w - 1),
            ]
        )
    return pts, lab, box


def check_predictor_fits(predictor: Any, image: Volume, axis: str | int, model_name: str) -> None:
    """Refuse a prebuilt predictor (slice-loop or SAM 2) that does not fit a request.

    Args:
        predictor: has ``volume`` (:class:`~medseg.volume.Volume`), ``axis`` (``"z"``, ``"y"`` or
            ``"x"``) and ``spec.name``.
        image: the volume asked for (same object, or same grid and voxels).
        axis: the slicing axis asked for.
        model_name: the registry name asked for.

    Raises:
        InputError: another image, axis or model.
    """
    from medseg.errors import InputError

    if predictor.volume is not image and not (
        predictor.volume.same_grid(image) and np.array_equal(predictor.volume.array, image.array)
    ):
        raise InputError("the predictor was built on another image; build one on this image")
    if predictor.axis != "zyx"[axis_index(axis)]:
        raise InputError(
            f"the predictor slices along {predictor.axis} but axis={axis!r} was asked for"
        )
    if predictor.spec.name != model_name:
        raise InputError(
            f"the predictor runs {predictor.spec.name}, not the requested {model_name}"
        )


def predictor_cache_dir(cache_dir: str | os.PathLike[str] | bool | None) -> Path | None:
    """``True`` → the default folder, a path → that folder, ``None``/``False`` → no disk cache."""
    if cache_dir is None or cache_dir is False:
        return None
    if cache_dir is True:
        from medseg.predict.cache import default_cache_dir

        return default_cache_dir()
    return Path(cache_dir)
