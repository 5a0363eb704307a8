"""Slice ↔ model-input geometry (ModelFrame), slice indexing along an axis, point splitting.

Slices: a volume ``(z, y, x)`` is cut along ``axis`` (``'z'`` axial, ``'y'`` coronal, ``'x'``
sagittal); the 2D slice keeps the remaining axes in order, so an axial slice is ``(y, x)``, a
coronal one ``(z, x)`` and a sagittal one ``(z, y)``. In the slice, coordinates are ``(row, col)``.

Model frame (:class:`ModelFrame`): the slice is resized so that its pixels are physically square
(rows stretched when the row spacing is larger, e.g. 5 mm slices seen from the side), then so that
its long side equals the model input size ``S`` (bilinear, ``align_corners=False``), and padded at
the bottom/right to ``S x S``. Model coordinates are pixel ``(x, y)`` scaled per axis by
``new_size / old_size`` (segment-anything's ``ResizeLongestSide`` convention); the mask decoder's
``256 x 256`` low-res logits cover the padded square.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import PromptError

if TYPE_CHECKING:
    import torch

#: Array axis of each slicing direction in a ``(z, y, x)`` volume.
AXES: dict[str, int] = {"z": 0, "y": 1, "x": 2}

#: Logit magnitude used when turning a binary mask into a mask prompt (sigmoid = 1 - 1e-3).
MASK_PROMPT_LOGIT = float(np.log((1 - 1e-3) / 1e-3))


def axis_index(axis: str | int) -> int:
    """``'z'|'y'|'x'`` (or 0/1/2) → array axis.

    Raises:
        PromptError: unknown axis.
    """
    if isinstance(axis, (int, np.integer)) and int(axis) in (0, 1, 2):
        return int(axis)
    key = str(axis).strip().lower()
    if key not in AXES:
        raise PromptError(
            f"unknown slicing axis {axis!r}; use z (axial), y (coronal) or x (sagittal)"
        )
    return AXES[key]


def slice_of(array: np.ndarray, axis: str | int, index: int) -> np.ndarray:
    """The 2D ``(rows, cols)`` slice ``index`` of a ``(z, y, x)`` array along ``axis`` (a view).

    Raises:
        PromptError: index out of range.
    """
    ax = axis_index(axis)
    n = array.shape[ax]
    idx = check_index(index, n, axis)
    return array[(slice(None),) * ax + (idx,)]


def set_slice(array: np.ndarray, axis: str | int, index: int, value: Any) -> None:
    """Write ``value`` (scalar or ``(rows, cols)``) into slice ``index`` along ``axis`` in place."""
    ax = axis_index(axis)
    idx = check_index(index, array.shape[ax], axis)
    array[(slice(None),) * ax + (idx,)] = value


def check_index(index: Any, n: int, axis: str | int = "z") -> int:
    """Validate a slice index against ``n`` slices.

    Raises:
        PromptError: not an integer or outside ``[0, n - 1]``.
    """
    try:
        idx = int(index)
    except (TypeError, ValueError):
        raise PromptError(f"slice index {index!r} is not an integer") from None
    if idx != index or not 0 <= idx < n:
        raise PromptError(
            f"slice index {index} along {_axis_name(axis)} is out of range; valid: 0..{n - 1}"
        )
    return idx


def slice_spacing(spacing_zyx: Sequence[float], axis: str | int) -> tuple[float, float]:
    """``(row_mm, col_mm)`` pixel spacing of a slice along ``axis``."""
    ax = axis_index(axis)
    rest = [float(s) for i, s in enumerate(spacing_zyx) if i != ax]
    return (rest[0], rest[1])


def split_point(zyx: Sequence[float], axis: str | int) -> tuple[int, tuple[float, float]]:
    """A volume point ``(z, y, x)`` → ``(slice index along axis, (row, col) in that slice)``."""
    ax = axis_index(axis)
    vals = [float(v) for v in zyx]
    if len(vals) != 3:
        raise PromptError(f"a point needs three coordinates (z, y, x), got {zyx!r}")
    rest = [v for i, v in enumerate(vals) if i != ax]
    return round(vals[ax]), (rest[0], rest[1])


def join_point(index: int, rc: Sequence[float], axis: str | int) -> tuple[float, float, float]:
    """Inverse of :func:`split_point`: slice index + ``(row, col)`` → ``(z, y, x)``."""
    ax = axis_index(axis)
    rest = [float(rc[0]), float(rc[1])]
    rest.insert(ax, float(index))
    return (rest[0], rest[1], rest[2])


def _axis_name(axis: str | int) -> str:
    if isinstance(axis, str):
        return axis
    return "zyx"[int(axis)]


def _resize_bilinear(images: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``(K, h, w)`` float → ``(K, H, W)`` float32 by torch bilinear (``align_corners=False``)."""
    import torch
    import torch.nn.functional as F

    arr = np.ascontiguousarray(images, dtype=np.float32)
    if arr.shape[-2:] == tuple(size):
        return arr.copy()
    t = torch.from_numpy(arr)[:, None]
    out = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return out[:, 0].numpy()


@dataclass(frozen=True)
class ModelFrame:
    """Mapping between one slice shape and a square model input.

    Attributes:
        slice_shape: ``(H, W)`` slice rows and columns.
        input_size: model input side ``S`` (256 LiteMedSAM, 1024 ViT-B).
        pixel_spacing: ``(row_mm, col_mm)``; pixels are made physically square first.
        lowres_size: side of the decoder's low-res logits (256).
    """

    slice_shape: tuple[int, int]
    input_size: int
    pixel_spacing: tuple[float, float] = (1.0, 1.0)
    lowres_size: int = 256

    def __post_init__(self) -> None:
        h, w = (int(v) for v in self.slice_shape)
        if h < 1 or w < 1:
            raise PromptError(f"empty slice shape {self.slice_shape}")
        object.__setattr__(self, "slice_shape", (h, w))
        r, c = (float(v) for v in self.pixel_spacing)
        if not (r > 0 and c > 0):
            raise PromptError(f"pixel spacing must be positive, got {self.pixel_spacing}")
        object.__setattr__(self, "pixel_spacing", (r, c))

    # ------------------------------------------------------------------ geometry
    @property
    def resized_shape(self) -> tuple[int, int]:
        """``(new_h, new_w)``: the slice's size inside the model input (before padding)."""
        h, w = self.slice_shape
        ph, pw = h * self.pixel_spacing[0], w * self.pixel_spacing[1]
        scale = self.input_size / max(ph, pw)
        new_h = min(self.input_size, max(1, int(ph * scale + 0.5)))
        new_w = min(self.input_size, max(1, int(pw * scale + 0.5)))
        return new_h, new_w

    @property
    def scale_rc(self) -> tuple[float, float]:
        """Model pixels per slice pixel along rows (y) and columns (x)."""
        nh, nw = self.resized_shape
        return nh / self.slice_shape[0], nw / self.slice_shape[1]

    # ------------------------------------------------------------------ images
    def image_to_model(self, slice2d: np.ndarray, normalisation: str = "unit") -> np.ndarray:
        """A ``(H, W)`` slice in ``[0, 1]`` → model input ``(3, S, S)`` float32.

        ``'unit'`` keeps ``[0, 1]`` (LiteMedSAM, MedSAM); ``'sam_rgb'`` maps to 0-255 and applies
        SAM's pixel mean/std. Normalisation happens before zero padding (as segment-anything does).
        """
        from medseg.models.registry import SAM_PIXEL_MEAN, SAM_PIXEL_STD

        img = np.asarray(slice2d, dtype=np.float32)
        if img.shape != self.slice_shape:
            raise PromptError(f"slice shape {img.shape} does not match frame {self.slice_shape}")
        nh, nw = self.resized_shape
        small = _resize_bilinear(img[None], (nh, nw))[0]
        s = self.input_size
        out = np.zeros((3, s, s), dtype=np.float32)
        if normalisation == "unit":
            out[:, :nh, :nw] = small[None]
        elif normalisation == "sam_rgb":
            mean = np.asarray(SAM_PIXEL_MEAN, np.float32)[:, None, None]
            std = np.asarray(SAM_PIXEL_STD, np.float32)[:, None, None]
            out[:, :nh, :nw] = (small[None] * 255.0 - mean) / std
        else:
            raise ValueError(f"unknown normalisation {normalisation!r}")
        return out

    # ------------------------------------------------------------------ prompts
    def points_to_model(self, rc: Any) -> np.ndarray:
        """Slice points ``(N, 2)`` ``(row, col)`` → model ``(N, 2)`` ``(x, y)`` float32."""
        pts = np.asarray(rc, dtype=np.float64).reshape(-1, 2)
        sy, sx = self.scale_rc
        return np.stack([pts[:, 1] * sx, pts[:, 0] * sy], axis=1).astype(np.float32)

    def points_from_model(self, xy: Any) -> np.ndarray:
        """Inverse of :meth:`points_to_model`: model ``(x, y)`` → slice ``(row, col)``."""
        pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
        sy, sx = self.scale_rc
        return np.stack([pts[:, 1] / sy, pts[:, 0] / sx], axis=1)

    def box_to_model(self, box_rc: Sequence[float]) -> np.ndarray:
        """Slice box ``(r0, c0, r1, c1)`` → model ``(x0, y0, x1, y1)`` float32."""
        r0, c0, r1, c1 = (float(v) for v in box_rc)
        (x0, y0), (x1, y1) = self.points_to_model([[r0, c0], [r1, c1]])
        return np.array([x0, y0, x1, y1], dtype=np.float32)

    def box_from_model(self, box_xyxy: Sequence[float]) -> tuple[float, float, float, float]:
        """Inverse of :meth:`box_to_model`."""
        x0, y0, x1, y1 = (float(v) for v in box_xyxy)
        (r0, c0), (r1, c1) = self.points_from_model([[x0, y0], [x1, y1]])
        return (float(r0), float(c0), float(r1), float(c1))

    # ------------------------------------------------------------------ masks
    def logits_to_slice(self, lowres: Any) -> np.ndarray:
        """Low-res logits ``(K, L, L)`` → slice logits ``(K, H, W)`` float32 (threshold at 0).

        Upsample to ``S x S`` (a no-op when ``L == S``), crop the padding, resize to ``(H, W)``;
        bilinear throughout.
        """
        arr = _to_numpy(lowres).astype(np.float32, copy=False)
        if arr.ndim == 2:
            arr = arr[None]
        s = self.input_size
        nh, nw = self.resized_shape
        if arr.shape[-1] != s:
            arr = _resize_bilinear(arr, (s, s))
        return _resize_bilinear(arr[:, :nh, :nw], self.slice_shape)

    def _mask_to_input(self, mask: Any) -> np.ndarray:
        """A slice mask ``(H, W)`` resized like the image into the padded ``(S, S)`` input frame."""
        m = np.asarray(mask, dtype=np.float32)
        if m.shape != self.slice_shape:
            raise PromptError(f"mask shape {m.shape} does not match slice shape {self.slice_shape}")
        nh, nw = self.resized_shape
        full = np.zeros((self.input_size, self.input_size), dtype=np.float32)
        full[:nh, :nw] = _resize_bilinear(m[None], (nh, nw))[0]
        return full

    def mask_to_lowres(self, mask: Any) -> np.ndarray:
        """A slice mask ``(H, W)`` (bool or probabilities) → ``(L, L)`` float32 mask-prompt logits.

        The mask is resized/padded like the image, brought to ``L x L`` and turned into logits of
        the probability clipped to ``[1e-3, 1 - 1e-3]`` (``±MASK_PROMPT_LOGIT`` for a binary mask;
        the padding is background).
        """
        full = self._mask_to_input(mask)
        low = _resize_bilinear(full[None], (self.lowres_size, self.lowres_size))[0]
        p = np.clip(low, 1e-3, 1 - 1e-3)
        return np.log(p / (1 - p)).astype(np.float32)

    def mask_to_grid(self, mask: Any, grid: int = 64) -> np.ndarray:
        """Fraction of each ``grid x grid`` embedding cell covered by a slice mask ``(H, W)``."""
        full = self._mask_to_input(mask)
        k = self.input_size // grid
        return full.reshape(grid, k, grid, k).mean(axis=(1, 3))


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def as_tensor(x: np.ndarray) -> torch.Tensor:
    """numpy → torch tensor (helper for callers that feed :meth:`ModelFrame.image_to_model`)."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(x))
