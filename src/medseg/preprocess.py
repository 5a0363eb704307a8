"""Preprocessing shared by U-Net training and inference: orientation, intensity, resampling.

Training (:mod:`medseg.train.unet`) and inference (:mod:`medseg.predict.unet`) both put an image
on the *model grid* with :func:`preprocess` (labels with :func:`preprocess_labels`), so a
checkpoint is always applied exactly as it was trained:

1. *orientation*: the array is viewed in one convention, the closest axis-aligned LPS
   orientation (array ``x`` → patient left, ``y`` → posterior, ``z`` → superior) by permuting and
   flipping axes according to the direction matrix (no interpolation, undone exactly afterwards;
   :class:`Canonical`);
2. *intensity*: the checkpoint's mapping to ``[0, 1]`` from :mod:`medseg.intensity` (a CT window
   in HU, or MR percentiles of the whole volume; :func:`resolve_config_intensity`);
3. *spacing*: separable linear resampling to the model's target spacing on the *model grid*,
   which shares voxel ``(0, 0, 0)`` with the image and has ``floor((n - 1) * s / t) + 1`` voxels
   per axis (``n`` voxels of spacing ``s``, target ``t``; :func:`model_grid_shape`); labels use
   nearest neighbour.

Arrays are ``(z, y, x)`` and spacings ``(z, y, x)`` mm throughout. torch is imported lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import CheckpointConfigError
from medseg.volume import LabelMap, Volume

if TYPE_CHECKING:
    import torch

    from medseg.intensity import Intensity

#: Orientation convention of the model grid (see module docstring).
ORIENTATION = "LPS-axis-aligned"


# --------------------------------------------------------------------------- intensity
def modality_family(modality: str | None) -> str:
    """``"CT"`` for CT-like names, ``"MR"`` for everything else (MRI, T1, T2, FLAIR, ADC ...)."""
    return "CT" if str(modality or "").strip().upper().startswith("CT") else "MR"


def intensity_config(modality: str, window: str | None = "abdomen") -> dict[str, Any]:
    """The intensity-preprocessing entry of a config, resolved through :mod:`medseg.intensity`.

    Args:
        modality: dataset modality; CT gets a window, anything else MR percentiles.
        window: CT window preset name or ``"LO,HI"`` (ignored for MR).
    """
    from medseg.intensity import MR_PERCENTILES, parse_window

    if modality_family(modality) == "CT":
        name, (lo, hi) = parse_window(window or "abdomen")
        return {"kind": "window", "name": name, "lo": float(lo), "hi": float(hi)}
    return {"kind": "percentile", "lo_pct": MR_PERCENTILES[0], "hi_pct": MR_PERCENTILES[1]}


def resolve_config_intensity(volume: Volume, config: dict[str, Any]) -> Intensity:
    """The :class:`~medseg.intensity.Intensity` a config prescribes for ``volume``.

    Raises:
        CheckpointConfigError: an intensity entry this version cannot reproduce.
    """
    from medseg.intensity import MR_PERCENTILES, resolve_intensity

    it = config.get("intensity") or {}
    if it.get("kind") == "window":
        return resolve_intensity(volume, f"{float(it['lo'])},{float(it['hi'])}")
    if it.get("kind") == "percentile" and (
        float(it.get("lo_pct", -1)),
        float(it.get("hi_pct", -1)),
    ) == tuple(float(p) for p in MR_PERCENTILES):
        return resolve_intensity(volume, "percentile")
    raise CheckpointConfigError(f"the checkpoint's intensity preprocessing {it!r} is not supported")


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Canonical:
    """Axis permutation + flips taking an array to the canonical orientation.

    ``canonical = flip(transpose(array, perm), flips)``; ``perm[new_axis] = old_axis``.
    """

    perm: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[int, ...] = ()

    @classmethod
    def of(cls, direction: np.ndarray) -> Canonical:
        """From an ITK direction matrix (columns: LPS directions of index axes x, y, z)."""
        d = np.asarray(direction, dtype=float)
        perm = [0, 1, 2]
        flips: list[int] = []
        world_of = []
        for a in range(3):  # array axis a (0=z, 1=y, 2=x) -> ITK column 2 - a
            v = d[:, 2 - a]
            w = int(np.argmax(np.abs(v)))
            world_of.append((w, float(np.sign(v[w])) or 1.0))
        if sorted(w for w, _ in world_of) != [0, 1, 2]:  # degenerate (e.g. 45 degrees): keep
            return cls()
        for a, (w, _) in enumerate(world_of):
            perm[2 - w] = a
        for new in range(3):
            if world_of[perm[new]][1] < 0:
                flips.append(new)
        return cls(tuple(perm), tuple(flips))  # type: ignore[arg-type]

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Canonical view of ``array`` (z, y, x) (no copy)."""
        out = np.transpose(array, self.perm)
        return np.flip(out, self.flips) if self.flips else out

    def undo(self, array: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`apply` (a view)."""
        out = np.flip(array, self.flips) if self.flips else array
        return np.transpose(out, np.argsort(self.perm))

    def spacing(self, spacing: tuple[float, float, float]) -> tuple[float, float, float]:
        """Spacing ``(z, y, x)`` of the canonical array."""
        return tuple(float(spacing[p]) for p in self.perm)  # type: ignore[return-value]


def model_grid_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]
) -> tuple[int, int, int]:
    """Model-grid shape covering an image of ``shape``/``spacing`` at ``target`` spacing."""
    return tuple(  # type: ignore[return-value]
        int(np.floor((n - 1) * s / t + 1e-6)) + 1
        for n, s, t in zip(shape, spacing, target, strict=True)
    )


def axis_weights(n_out: int, ratio: float, n_in: int) -> tuple[Any, Any, Any]:
    """Linear interpolation indices/weights: output ``k`` samples input position ``k * ratio``."""
    import torch

    pos = torch.clamp(torch.arange(n_out, dtype=torch.float64) * ratio, 0, n_in - 1)
    i0 = torch.floor(pos).long()
    i1 = torch.clamp(i0 + 1, max=n_in - 1)
    w = (pos - i0).float()
    return i0, i1, w


def _lerp(t: torch.Tensor, dim: int, n_out: int, ratio: float) -> torch.Tensor:
    """Linear resampling of ``t`` along ``dim`` to ``n_out`` samples at positions ``k * ratio``."""
    i0, i1, w = axis_weights(n_out, ratio, t.shape[dim])
    shape = [1] * t.ndim
    shape[dim] = n_out
    w = w.reshape(shape)
    a = t.index_select(dim, i0)
    b = t.index_select(dim, i1)
    return a.mul_(1 - w).add_(b.mul_(w))


def resample_image(
    array: np.ndarray,
    spacing: tuple[float, float, float],
    target: tuple[float, float, float],
    intensity: Intensity | None = None,
    slab: int = 16,
) -> torch.Tensor:
    """Intensity-map then linearly resample an image to the model grid.

    Args:
        array: image ``(z, y, x)`` (any dtype; may be a non-contiguous view).
        spacing: its voxel size ``(z, y, x)`` mm.
        target: model spacing ``(z, y, x)`` mm.
        intensity: mapping to ``[0, 1]`` applied before interpolation (``None``: raw values).
        slab: output slices computed at a time (bounds the temporary memory).

    Returns:
        float32 tensor ``(Z, Y, X)`` of :func:`model_grid_shape`.
    """
    import torch

    out_shape = model_grid_shape(array.shape, spacing, target)
    rz, ry, rx = (t / s for t, s in zip(target, spacing, strict=True))
    out = torch.empty(out_shape, dtype=torch.float32)
    i0, i1, w = axis_weights(out_shape[0], rz, array.shape[0])
    for k0 in range(0, out_shape[0], slab):
        k1 = min(k0 + slab, out_shape[0])
        need = np.unique(np.concatenate([i0[k0:k1].numpy(), i1[k0:k1].numpy()]))
        src = np.asarray(array[need], dtype=np.float32)
        if intensity is not None:
            src = intensity.apply(src)
        src_t = torch.from_numpy(np.ascontiguousarray(src))
        pos = {int(v): j for j, v in enumerate(need)}
        a = src_t[[pos[int(v)] for v in i0[k0:k1]]]
        b = src_t[[pos[int(v)] for v in i1[k0:k1]]]
        ww = w[k0:k1].reshape(-1, 1, 1)
        z = a.mul_(1 - ww).add_(b.mul_(ww))
        z = _lerp(z, 1, out_shape[1], ry)
        out[k0:k1] = _lerp(z, 2, out_shape[2], rx)
    return out


def resample_labels_nearest(
    array: np.ndarray, spacing: tuple[float, float, float], target: tuple[float, float, float]
) -> np.ndarray:
    """Nearest-neighbour resampling of a label array ``(z, y, x)`` to the model grid."""
    out_shape = model_grid_shape(array.shape, spacing, target)
    idx = [
        np.clip(np.rint(np.arange(n) * t / s).astype(np.int64), 0, m - 1)
        for n, t, s, m in zip(out_shape, target, spacing, array.shape, strict=True)
    ]
    return np.asarray(array)[np.ix_(*idx)]


def preprocess(volume: Volume, config: dict[str, Any]) -> tuple[torch.Tensor, Canonical]:
    """Volume → model-grid float32 tensor ``(Z, Y, X)`` in ``[0, 1]`` + the orientation used."""
    can = Canonical.of(volume.direction)
    arr = can.apply(volume.array)
    intensity = resolve_config_intensity(volume, config)
    target = tuple(float(s) for s in config["target_spacing"])
    return resample_image(arr, can.spacing(volume.spacing), target, intensity), can  # type: ignore[arg-type]


def preprocess_labels(labels: LabelMap, config: dict[str, Any]) -> np.ndarray:
    """Label map → model-grid label array (nearest neighbour, canonical orientation)."""
    can = Canonical.of(labels.direction)
    target = tuple(float(s) for s in config["target_spacing"])
    return resample_labels_nearest(can.apply(labels.array), can.spacing(labels.spacing), target)  # type: ignore[arg-type]
