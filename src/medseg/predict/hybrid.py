"""Hybrid refinement: a U-Net (or any coarse) label becomes per-slice prompts for a SAM-Med model.

For each axial slice holding the label, each 3D connected component of the label contributes its
in-slice part as a prompt: its bounding box (plus ``margin`` pixels) and, optionally, the mask
itself as a mask prompt (:meth:`medseg.predict.sam.VolumePredictor.mask_prompt`). The SAM mask,
kept inside the prompt box grown by ``margin`` pixels, replaces that component's voxels on the
slice. Voxels the refinement removes from the label take the most common *other* label around the
component (e.g. liver around a liver tumour), so the rest of the label map stays consistent.
SAM only reshapes what the coarse mask found: it adds no slices and no components.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import InputError
from medseg.volume import LabelMap, Volume, check_same_grid

if TYPE_CHECKING:
    from medseg.progress import ProgressCallback


def _bbox2d(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def _fill_value(labels: np.ndarray, comp: np.ndarray, label: int) -> int:
    """Most common label other than ``label`` in a 2-voxel shell around ``comp`` (0 if none)."""
    from scipy import ndimage

    shell = ndimage.binary_dilation(comp, iterations=2) & ~comp
    vals = labels[shell]
    vals = vals[vals != label]
    if vals.size == 0:
        return 0
    return int(np.bincount(vals.astype(np.int64)).argmax())


def refine_with_sam(
    volume: Volume,
    labelmap: LabelMap,
    label: int,
    model: str | Any = "litemedsam",
    progress: ProgressCallback | None = None,
    *,
    window: str | None = None,
    use_mask_prompt: bool = True,
    margin: int = 2,
    predictor: Any = None,
    **predictor_kwargs: Any,
) -> LabelMap:
    """Refine one label of ``labelmap`` slice by slice with a SAM-Med model.

    Args:
        volume: the image ``(z, y, x)``.
        labelmap: coarse label map on ``volume``'s grid (e.g. :class:`UNetSegmenter` output).
        label: label value to refine.
        model: SAM-Med registry name (``litemedsam``, ``sam_vit_b``, ``medsam_vit_b``).
        progress: ``progress(done, total)`` over prompts.
        window: intensity mapping for the SAM model (:func:`medseg.intensity.resolve_intensity`).
        use_mask_prompt: give the coarse slice mask as a mask prompt besides the box.
        margin: pixels added around each box, and allowed around it for the SAM mask.
        predictor: an existing :class:`~medseg.predict.sam.VolumePredictor` on ``volume`` (axis
            ``z``) to reuse its embeddings; else one is made.
        **predictor_kwargs: extra keywords for :class:`VolumePredictor` (precision, cache_dir...).

    Returns:
        A new :class:`LabelMap` on the same grid and with the same table; ``meta['refined']``
        records the model and prompt counts.

    Raises:
        GeometryError: label map not on the image's grid. InputError: bad label value.
    """
    from medseg.instances import label_lesions

    check_same_grid(labelmap, volume)
    label = int(label)
    if label <= 0:
        raise InputError(f"the label to refine must be a positive value, got {label}")
    arr = labelmap.array
    out = arr.copy()
    target = arr == label
    comps = label_lesions(target, labelmap.spacing)
    n_comp = int(comps.max(initial=0))
    jobs: list[tuple[int, int]] = []  # (component, slice)
    for c in range(1, n_comp + 1):
        zs = np.flatnonzero((comps == c).any(axis=(1, 2)))
        jobs += [(c, int(z)) for z in zs]
    keep_meta = {k: v for k, v in labelmap.meta.items() if k not in {"labels", "refined"}}
    meta = {
        "model": str(model),
        "label": label,
        "components": n_comp,
        "prompts": len(jobs),
        "mask_prompt": bool(use_mask_prompt),
    }
    if not jobs:
        return LabelMap.like(labelmap, out, labelmap.labels, **keep_meta, refined=meta)
    if predictor is None:
        from medseg.predict.sam import VolumePredictor

        predictor = VolumePredictor(volume, model, axis="z", window=window, **predictor_kwargs)
    h, w = arr.shape[1:]
    fills = {c: _fill_value(arr, comps == c, label) for c in range(1, n_comp + 1)}
    for i, (c, z) in enumerate(jobs):
        cm = comps[z] == c
        r0, c0, r1, c1 = _bbox2d(cm)
        box = (
            max(r0 - margin, 0),
            max(c0 - margin, 0),
            min(r1 + margin, h - 1),
            min(c1 + margin, w - 1),
        )
        kw: dict[str, Any] = {"box_rc": box}
        if use_mask_prompt:
            kw["mask_logits"] = predictor.mask_prompt(cm)
        pred = predictor.predict(z, **kw)
        sam = pred.masks[pred.best()]
        keep = np.zeros_like(cm)
        keep[
            max(box[0] - margin, 0) : box[2] + margin + 1,
            max(box[1] - margin, 0) : box[3] + margin + 1,
        ] = True
        sam = sam & keep
        sl = out[z]
        sl[cm & ~sam] = fills[c]
        sl[sam] = label
        if progress is not None:
            progress(i + 1, len(jobs))
    return LabelMap.like(labelmap, out, labelmap.labels, **keep_meta, refined=meta)
