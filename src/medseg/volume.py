"""The two types everything speaks: :class:`Volume` and :class:`LabelMap`.

Conventions (the one place they are defined):

* ``array`` is indexed ``(z, y, x)`` — slice, row, column.
* ``spacing`` is ``(z, y, x)`` in millimetres, matching the array axes.
* ``origin`` is the world position of voxel ``(0, 0, 0)`` in **LPS** millimetres, ordered
  ``(x, y, z)`` as world coordinates are (DICOM, ITK).
* ``direction`` is ITK's 3x3 direction matrix: column ``c`` is the LPS unit vector of the ITK
  index axis ``c``, where ITK index axis 0 is our array's **x** (last axis), 1 is y, 2 is z.

So for an array index ``(k, j, i)`` (z, y, x)::

    world_lps = origin + direction @ (spacing_xyz * (i, j, k))

NIfTI stores RAS; the conversion happens only inside the file readers/writers (SimpleITK does it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from medseg.errors import GeometryError, InputError

#: Default tolerances for "same grid": spacing/origin in mm, direction cosines unitless.
GRID_ATOL_MM = 1e-3
GRID_ATOL_DIR = 1e-4


def _as3(value: Any, name: str) -> tuple[float, float, float]:
    arr = np.asarray(value, dtype=float).reshape(-1)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise InputError(f"{name} must be three finite numbers, got {value!r}")
    return (float(arr[0]), float(arr[1]), float(arr[2]))


@dataclass
class Volume:
    """A 3D image on a physical grid.

    Attributes:
        array: voxel values, shape ``(z, y, x)``.
        spacing: voxel size ``(z, y, x)`` in mm.
        origin: LPS world position ``(x, y, z)`` in mm of voxel ``(0, 0, 0)``.
        direction: 3x3 ITK direction matrix (columns = LPS directions of index axes x, y, z).
        meta: free-form metadata (``modality``, ``series_uid``, ``source``, ``warnings`` ...).
    """

    array: np.ndarray
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise InputError(
                f"a volume must be 3D (z, y, x); got an array of shape {self.array.shape}"
            )
        self.spacing = _as3(self.spacing, "spacing")
        if min(self.spacing) <= 0:
            raise InputError(f"spacing must be positive, got {self.spacing}")
        self.origin = _as3(self.origin, "origin")
        d = np.asarray(self.direction, dtype=float)
        if d.shape != (3, 3) or not np.all(np.isfinite(d)):
            raise InputError(f"direction must be a finite 3x3 matrix, got {self.direction!r}")
        self.direction = d

    def __repr__(self) -> str:
        """One line: shape, spacing, orientation code and dtype (never the array)."""
        sp = ", ".join(f"{v:.4g}" for v in self.spacing)
        return (
            f"{type(self).__name__}(shape={self.shape}, spacing=({sp}) mm, "
            f"orientation={orientation_code(self.direction)}, dtype={self.array.dtype}"
            f"{self._repr_extra()})"
        )

    def _repr_extra(self) -> str:
        return ""

    # ----------------------------------------------------------------- geometry
    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape ``(z, y, x)``."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing_xyz(self) -> tuple[float, float, float]:
        """Spacing in ITK order ``(x, y, z)``."""
        return (self.spacing[2], self.spacing[1], self.spacing[0])

    def affine_lps(self) -> np.ndarray:
        """4x4 matrix: homogeneous array index ``(z, y, x, 1)`` -> LPS ``(x, y, z, 1)`` mm."""
        m = np.eye(4)
        scaled = self.direction * np.asarray(self.spacing_xyz)[None, :]  # columns for x, y, z
        m[:3, 0] = scaled[:, 2]  # array axis 0 is z -> ITK column 2
        m[:3, 1] = scaled[:, 1]
        m[:3, 2] = scaled[:, 0]
        m[:3, 3] = self.origin
        return m

    def index_to_world(self, zyx: Any) -> np.ndarray:
        """Array indices ``(..., 3)`` ``(z, y, x)`` → LPS world ``(..., 3)`` ``(x, y, z)`` mm."""
        pts = np.asarray(zyx, dtype=float)
        a = self.affine_lps()
        return pts @ a[:3, :3].T + a[:3, 3]

    def world_to_index(self, xyz: Any) -> np.ndarray:
        """LPS world points ``(..., 3)`` → continuous array indices ``(..., 3)`` ``(z, y, x)``."""
        pts = np.asarray(xyz, dtype=float)
        a = self.affine_lps()
        return (pts - a[:3, 3]) @ np.linalg.inv(a[:3, :3]).T

    def same_grid(
        self, other: Volume, atol_mm: float = GRID_ATOL_MM, atol_dir: float = GRID_ATOL_DIR
    ) -> bool:
        """True when ``other`` has the same shape, spacing, origin and direction (tolerance)."""
        return not grid_differences(self, other, atol_mm, atol_dir)

    def with_array(self, array: np.ndarray, **meta: Any) -> Volume:
        """A volume on this grid holding ``array`` (shape must match)."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise GeometryError(f"array shape {array.shape} does not match grid {self.array.shape}")
        return replace(self, array=array, meta={**self.meta, **meta})

    def copy_geometry(self) -> dict[str, Any]:
        """Keyword arguments that put a new volume on this grid."""
        return {
            "spacing": self.spacing,
            "origin": self.origin,
            "direction": self.direction.copy(),
        }

    # ------------------------------------------------------------ conversions
    def to_sitk(self) -> Any:
        """A ``SimpleITK.Image`` with this geometry (array copied)."""
        import SimpleITK as sitk

        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetSpacing(self.spacing_xyz)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(float(v) for v in self.direction.reshape(-1)))
        return img

    @classmethod
    def from_sitk(cls, img: Any, meta: dict[str, Any] | None = None) -> Volume:
        """Build from a 3D ``SimpleITK.Image`` (its array is already ``(z, y, x)``)."""
        import SimpleITK as sitk

        if img.GetDimension() != 3:
            raise InputError(f"expected a 3D image, got {img.GetDimension()}D")
        sx, sy, sz = img.GetSpacing()
        return cls(
            array=sitk.GetArrayFromImage(img),
            spacing=(sz, sy, sx),
            origin=img.GetOrigin(),
            direction=np.asarray(img.GetDirection(), dtype=float).reshape(3, 3),
            meta=dict(meta or {}),
        )


@dataclass(repr=False)
class LabelMap(Volume):
    """An integer label volume on an image's grid.

    Attributes:
        labels: label table ``{value: name}``; 0 is background and is not listed.
    """

    labels: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        arr = self.array
        if arr.dtype.kind == "b":
            arr = arr.astype(np.uint8)
        elif arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise InputError(
                    "a label map must hold whole numbers; this one holds fractional or NaN values "
                    "(is it a probability map or an image?)"
                )
            arr = arr.astype(np.int64)
        elif arr.dtype.kind not in "iu":
            raise InputError(f"a label map must be integer, got dtype {arr.dtype}")
        if arr.size and arr.min() < 0:
            raise InputError(f"label values must be >= 0, found {int(arr.min())}")
        self.array = _smallest_uint(arr)
        self.labels = {int(k): str(v) for k, v in self.labels.items() if int(k) != 0}

    def _repr_extra(self) -> str:
        table = ", ".join(f"{k}: {v}" for k, v in sorted(self.labels.items()))
        return f", labels={{{table}}}"

    def present(self) -> list[int]:
        """Sorted non-zero label values present in the array."""
        return [int(v) for v in np.unique(self.array) if v != 0]

    def name(self, value: int) -> str:
        """Name of a label value from the table, or ``label_<value>``."""
        return self.labels.get(int(value), f"label_{int(value)}")

    @classmethod
    def like(
        cls, ref: Volume, array: np.ndarray, labels: dict[int, str] | None = None, **meta: Any
    ) -> LabelMap:
        """A label map on ``ref``'s grid."""
        array = np.asarray(array)
        if array.shape != ref.shape:
            raise GeometryError(f"label array shape {array.shape} does not match grid {ref.shape}")
        return cls(array=array, labels=dict(labels or {}), meta=dict(meta), **ref.copy_geometry())


def orientation_code(direction: Any) -> str:
    """Three letters naming where the array's x, y and z index axes point in the patient.

    Each letter is the LPS pole the axis is closest to: ``L``/``R`` (x), ``P``/``A`` (y),
    ``S``/``I`` (z), as in nibabel's axis codes. The identity direction gives ``"LPS"``; brain1's
    flipped y axis gives ``"LAS"``. Oblique axes take their dominant component.
    """
    d = np.asarray(direction, dtype=float).reshape(3, 3)
    poles = (("L", "R"), ("P", "A"), ("S", "I"))
    out = []
    for col in range(3):  # ITK index axes x, y, z
        v = d[:, col]
        k = int(np.argmax(np.abs(v)))
        out.append(poles[k][0] if v[k] > 0 else poles[k][1])
    return "".join(out)


def _smallest_uint(arr: np.ndarray) -> np.ndarray:
    top = int(arr.max()) if arr.size else 0
    for dt in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(dt).max:
            return arr.astype(dt, copy=False)
    return arr.astype(np.int64, copy=False)


def grid_differences(
    a: Volume, b: Volume, atol_mm: float = GRID_ATOL_MM, atol_dir: float = GRID_ATOL_DIR
) -> list[str]:
    """Human-readable list of how two grids differ (empty when they match)."""
    out: list[str] = []
    if a.shape != b.shape:
        out.append(f"shape {a.shape} vs {b.shape}")
    if not np.allclose(a.spacing, b.spacing, atol=atol_mm, rtol=0):
        out.append(f"spacing {_fmt(a.spacing)} vs {_fmt(b.spacing)} mm")
    if not np.allclose(a.origin, b.origin, atol=atol_mm * 10, rtol=0):
        out.append(f"origin {_fmt(a.origin)} vs {_fmt(b.origin)} mm")
    if not np.allclose(a.direction, b.direction, atol=atol_dir, rtol=0):
        out.append("direction differs")
    return out


def check_same_grid(a: Volume, b: Volume, what: str = "label map", against: str = "image") -> None:
    """Raise :class:`GeometryError` naming the differences when ``a`` and ``b`` are not one grid."""
    diffs = grid_differences(a, b)
    if diffs:
        raise GeometryError(
            f"the {what} is not on the {against}'s grid ({'; '.join(diffs)}); "
            "resample it first (e.g. `medseg evaluate --resample`)"
        )


def resample_labels_to(labels: LabelMap, ref: Volume) -> LabelMap:
    """Nearest-neighbour resample of ``labels`` onto ``ref``'s grid (physical space, LPS)."""
    import SimpleITK as sitk

    out = sitk.Resample(
        labels.to_sitk(), ref.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0
    )
    arr = sitk.GetArrayFromImage(out)
    # meta passed whole (not as **kwargs): a file's meta may hold its own "labels" key
    return LabelMap(
        array=arr, labels=dict(labels.labels), meta=dict(labels.meta), **ref.copy_geometry()
    )


def _fmt(v: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in v) + ")"
