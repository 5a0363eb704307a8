"""Prompts from napari layers → slice-pixel prompts for :class:`medseg.predict.sam.VolumePredictor`.

Points and shapes may live on layers with their own scale/translate: every vertex goes
layer data → world → image data, so prompts land on the right pixel whatever the layers' geometry.
Only prompts on the requested slice (axis 0, ``z``) are used; 2D prompt layers count as being on
every slice.

Point polarity: a ``point_type`` feature (``"positive"``/``"negative"``, or 1/0, True/False) when
present, else the layer's role (the positive or the negative points layer of the widget).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

#: Feature column that marks a point as positive (foreground) or negative (background).
POINT_TYPE = "point_type"


@dataclass
class SlicePrompts:
    """Prompts on one slice in that slice's pixels.

    Attributes:
        index: slice index (axis 0).
        points_rc: ``(N, 2)`` ``(row, col)`` = ``(y, x)`` or ``None``.
        point_labels: ``(N,)`` 1 foreground / 0 background or ``None``.
        box_rc: ``(r0, c0, r1, c1)`` inclusive pixel bounds or ``None``.
    """

    index: int
    points_rc: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    box_rc: tuple[float, float, float, float] | None = None

    def empty(self) -> bool:
        """No point and no box."""
        return self.points_rc is None and self.box_rc is None


def _to_image_data(layer: Any, coords: np.ndarray, image_layer: Any) -> np.ndarray:
    """``(N, D)`` data coordinates of ``layer`` → ``(N, 3)`` image data coordinates (z, y, x).

    A 2D layer (``D == 2``) has no z: its rows get ``z = NaN`` ("any slice").
    """
    out = []
    for c in np.asarray(coords, dtype=float):
        if c.shape[0] == 2:
            wy, wx = np.asarray(layer.data_to_world(c), dtype=float)[-2:]
            wz = float(np.asarray(image_layer.translate)[-3])  # any z: y/x do not depend on it
            zyx = np.asarray(image_layer.world_to_data([wz, wy, wx]), dtype=float)
            out.append([np.nan, zyx[-2], zyx[-1]])
        else:
            world = np.asarray(layer.data_to_world(c[-3:]), dtype=float)
            out.append(np.asarray(image_layer.world_to_data(world), dtype=float)[-3:])
    return np.asarray(out, dtype=float).reshape(-1, 3)


def _on_slice(zyx: np.ndarray, index: int) -> np.ndarray:
    z = zyx[:, 0]
    return np.isnan(z) | (np.abs(z - index) < 0.5)


def _polarity(layer: Any, n: int, default: int) -> np.ndarray:
    feats = getattr(layer, "features", None)
    if feats is not None and POINT_TYPE in getattr(feats, "columns", ()) and len(feats) == n:
        vals = []
        for v in feats[POINT_TYPE]:
            s = str(v).strip().lower()
            vals.append(0 if s in ("negative", "neg", "0", "false", "background", "-") else 1)
        return np.asarray(vals, dtype=np.int64)
    return np.full(n, default, dtype=np.int64)


def slice_prompts(
    image_layer: Any,
    index: int,
    points_layer: Any = None,
    negative_layer: Any = None,
    shapes_layer: Any = None,
) -> SlicePrompts:
    """Collect the prompts on slice ``index`` of ``image_layer``.

    Args:
        image_layer: the 3D image layer (its data frame defines rows/cols).
        index: slice index along z (axis 0).
        points_layer: points, positive unless their ``point_type`` feature says negative.
        negative_layer: points that are all negative (unless ``point_type`` says otherwise).
        shapes_layer: rectangles (or any shape: its bounding box); the last one on the slice wins.

    Returns:
        :class:`SlicePrompts`; points/box clipped to the slice.
    """
    h, w = image_layer.data.shape[-2:]
    pts, labs = [], []
    for layer, default in ((points_layer, 1), (negative_layer, 0)):
        if layer is None or len(layer.data) == 0:
            continue
        zyx = _to_image_data(layer, layer.data, image_layer)
        pol = _polarity(layer, len(zyx), default)
        keep = _on_slice(zyx, index)
        pts.append(zyx[keep][:, 1:])
        labs.append(pol[keep])
    points = labels = None
    if pts and sum(len(p) for p in pts):
        points = np.concatenate(pts)
        points[:, 0] = np.clip(points[:, 0], 0, h - 1)
        points[:, 1] = np.clip(points[:, 1], 0, w - 1)
        labels = np.concatenate(labs)
    box = None
    if shapes_layer is not None:
        for verts in shapes_layer.data:
            zyx = _to_image_data(shapes_layer, verts, image_layer)
            if not np.all(_on_slice(zyx, index)):
                continue
            r0, c0 = np.min(zyx[:, 1:], axis=0)
            r1, c1 = np.max(zyx[:, 1:], axis=0)
            r0, r1 = float(np.clip(r0, 0, h - 1)), float(np.clip(r1, 0, h - 1))
            c0, c1 = float(np.clip(c0, 0, w - 1)), float(np.clip(c1, 0, w - 1))
            if r1 > r0 and c1 > c0:
                box = (r0, c0, r1, c1)
    return SlicePrompts(index=int(index), points_rc=points, point_labels=labels, box_rc=box)


def prompt_slices(
    image_layer: Any,
    points_layer: Any = None,
    negative_layer: Any = None,
    shapes_layer: Any = None,
) -> list[int]:
    """Sorted slice indices (axis 0) of ``image_layer`` that hold a point or a whole shape from
    the given 3D layers (2D layers do not name a slice and are ignored)."""
    n = image_layer.data.shape[0]
    found: set[int] = set()
    for layer in (points_layer, negative_layer):
        if layer is None or len(layer.data) == 0:
            continue
        z = _to_image_data(layer, layer.data, image_layer)[:, 0]
        found.update(round(float(v)) for v in z if np.isfinite(v))
    if shapes_layer is not None:
        for verts in shapes_layer.data:
            z = _to_image_data(shapes_layer, verts, image_layer)[:, 0]
            if np.all(np.isfinite(z)) and np.ptp(z) < 0.5:
                found.add(round(float(z[0])))
    return sorted(i for i in found if 0 <= i < n)
