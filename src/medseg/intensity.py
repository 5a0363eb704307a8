"""Intensity conventions: CT window presets (HU) and MR percentile normalisation.

The one place that says how raw intensities become the ``[0, 1]`` range models see:

* CT (values in HU after rescale): clip to a window ``(lo, hi)`` HU, map linearly to ``[0, 1]``.
* MR and anything else: the 0.5 and 99.5 percentiles of the **whole volume** (not per slice, so
  slices stay comparable during propagation) map to 0 and 1, clipped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from medseg.errors import InputError
from medseg.volume import Volume

#: CT window presets in HU as ``(lo, hi)`` (= level ∓ width / 2).
WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (-160.0, 240.0),  # W400 L40
    "liver": (-45.0, 105.0),  # W150 L30
    "lung": (-1350.0, 150.0),  # W1500 L-600
    "brain": (0.0, 80.0),  # W80 L40
    "bone": (-500.0, 1300.0),  # W1800 L400
    "wide": (-1000.0, 400.0),  # LiteMedSAM/MedSAM's published CT recipe; our SAM default for CT
}

#: MR (non-CT) percentile range.
MR_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Intensity:
    """A resolved intensity mapping ``raw -> clip((raw - lo) / (hi - lo), 0, 1)``.

    Attributes:
        lo: raw value mapped to 0.
        hi: raw value mapped to 1.
        name: how it was chosen (``"window:wide"``, ``"window:-100,300"``,
            ``"percentile:0.5-99.5"``);
            part of the embedding-cache key.
    """

    lo: float
    hi: float
    name: str

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Map ``array`` (any shape) to float32 in ``[0, 1]``."""
        out = (np.asarray(array, dtype=np.float32) - np.float32(self.lo)) / np.float32(
            max(self.hi - self.lo, 1e-6)
        )
        return np.clip(out, 0.0, 1.0, out=out)

    @property
    def key(self) -> str:
        """Stable text for cache keys."""
        return f"{self.name}[{self.lo:.4f},{self.hi:.4f}]"


def guess_modality(vol: Volume) -> str:
    """``meta['modality']`` if known (``CT``, ``MR``, ...), else ``CT`` when values look like HU.

    HU heuristic: integer-valued, minimum ≤ -500 (air) and maximum ≤ 4000.
    """
    mod = str(vol.meta.get("modality") or "").upper()
    if mod:
        return mod
    a = vol.array
    sample = a[:: max(1, a.shape[0] // 8)]
    lo, hi = float(sample.min()), float(sample.max())
    integral = a.dtype.kind in "iu" or bool(np.all(sample == np.round(sample)))
    return "CT" if integral and lo <= -500 and hi <= 4000 else "MR"


def parse_window(text: str) -> tuple[str, tuple[float, float]]:
    """A preset name or ``"LO,HI"`` -> ``(name, (lo, hi))``.

    Raises:
        InputError: unknown preset or malformed numbers.
    """
    t = text.strip().lower()
    if t in WINDOWS:
        return t, WINDOWS[t]
    parts = t.split(",")
    try:
        lo, hi = (float(v) for v in parts)
    except ValueError:
        raise InputError(
            f"unknown window {text!r}; use one of {', '.join(WINDOWS)} or LO,HI in HU"
        ) from None
    if not hi > lo:
        raise InputError(f"window {text!r}: HI must be greater than LO")
    return f"{lo:g},{hi:g}", (lo, hi)


def resolve_intensity(vol: Volume, window: str | None = None) -> Intensity:
    """Choose the intensity mapping for ``vol``.

    Args:
        vol: the image.
        window: a preset name / ``"LO,HI"`` (CT), ``"percentile"`` to force MR-style, or ``None``
            for the default (``wide`` for CT, percentiles otherwise).
    """
    if window and window.strip().lower() != "percentile":
        name, (lo, hi) = parse_window(window)
        return Intensity(lo, hi, f"window:{name}")
    if window is None and guess_modality(vol) == "CT":
        lo, hi = WINDOWS["wide"]
        return Intensity(lo, hi, "window:wide")
    lo, hi = np.percentile(vol.array, MR_PERCENTILES)
    if hi <= lo:  # constant image
        hi = lo + 1.0
    return Intensity(float(lo), float(hi), f"percentile:{MR_PERCENTILES[0]}-{MR_PERCENTILES[1]}")
