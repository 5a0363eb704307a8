"""Prompt objects for promptable (SAM-family) segmentation: :class:`Box`, :class:`Point`,
:class:`MaskPrompt`, the prompts file format and the ground-truth box protocol.

Coordinates are voxel indices of the image array ``(z, y, x)`` — array space, so a flipped
direction matrix (brain1) does not change them. A :class:`Box` lies on one slice along the
propagation axis (axial by default); a :class:`Point` is a volume point and lands on the slice
through it. Everything here is plain data (numpy only); :func:`key_prompts` turns prompts into the
propagation engine's per-slice :class:`~medseg.predict.propagate.KeyPrompt` list after checking
them against the image.

The prompts file (``medseg segment --prompts FILE.json``, ``medseg.load_prompts``)::

    {"axis": "z",
     "boxes": [{"slice": 12, "box": [R0, C0, R1, C1]}],
     "points": [{"zyx": [12, 140, 96], "label": 1}],
     "masks": [{"slice": 12, "file": "key_mask.npy"}]}

``axis`` is optional; a box is ``[R0, C0, R1, C1]`` inclusive in the slice's ``(row, col)`` frame
(axial: ``(y, x)``), optionally with ``"z_range": [Z_MIN, Z_MAX]`` (the slices it may propagate
over, as :class:`Box` ``z_min``/``z_max``); a point's ``label`` is 1 (foreground, default) or 0
(background); a mask is a ``.npy`` file (relative to the prompts file) holding a 2D
``(rows, cols)`` boolean array.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

from medseg.errors import InputError, PromptError

if TYPE_CHECKING:
    from medseg.predict.propagate import KeyPrompt
    from medseg.volume import LabelMap

#: The slicing axes, in array order.
AXES = ("z", "y", "x")
#: Default margin (pixels per side) of a box drawn around the ground truth.
DEFAULT_BOX_MARGIN = 3.0
#: One-line description of the prompts file, for error messages and help texts.
PROMPTS_FILE_FORMAT = (
    '{"axis": "z" (optional), "boxes": [{"slice": I, "box": [R0, C0, R1, C1]}], '
    '"points": [{"zyx": [Z, Y, X], "label": 1|0}], "masks": [{"slice": I, "file": "m.npy"}]}'
)


def _axis(axis: str) -> str:
    a = str(axis).strip().lower()
    if a not in AXES:
        raise PromptError(
            f"unknown slicing axis {axis!r}; use z (axial), y (coronal) or x (sagittal)"
        )
    return a


def _finite(values: Sequence[float], what: str) -> None:
    if not all(np.isfinite(float(v)) for v in values):
        raise PromptError(f"{what} has a non-finite coordinate: {tuple(values)}")


@dataclass(frozen=True)
class Box:
    """A box on one slice: the standard SAM prompt.

    For the default axial axis the fields read as their names: slice ``z`` and the inclusive pixel
    box ``(y0, x0)``-``(y1, x1)``. With ``axis="y"`` (coronal) or ``"x"`` (sagittal), ``z`` is the
    slice index along that axis and ``(y0, x0, y1, x1)`` are ``(row0, col0, row1, col1)`` in that
    slice (coronal rows are z and columns x; sagittal rows are z and columns y).

    ``z_min``/``z_max`` (optional, inclusive slice indices along the axis) give the object's
    extent, as the interactive challenge's 3D box does: propagation stays inside it.

    Raises:
        PromptError: non-integer slice, non-finite corners, ``y1 < y0`` / ``x1 < x0``, a box of
            zero height or width, or a z range that does not hold the box's slice.
    """

    z: int
    y0: float
    x0: float
    y1: float
    x1: float
    axis: str = "z"
    z_min: int | None = None
    z_max: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "axis", _axis(self.axis))
        if float(self.z) != round(float(self.z)):
            raise PromptError(f"box slice index {self.z!r} is not an integer")
        object.__setattr__(self, "z", round(float(self.z)))
        for name in ("z_min", "z_max"):
            v = getattr(self, name)
            if v is None:
                continue
            if not np.isfinite(float(v)) or float(v) != round(float(v)):
                raise PromptError(f"box {name} {v!r} is not an integer slice index")
            object.__setattr__(self, name, round(float(v)))
        lo = self.z if self.z_min is None else self.z_min
        hi = self.z if self.z_max is None else self.z_max
        if not lo <= self.z <= hi:
            raise PromptError(
                f"box on slice {self.z} with z range {self.z_min}..{self.z_max}: the range must "
                "hold the box's slice (z_min <= z <= z_max)"
            )
        corners = (self.y0, self.x0, self.y1, self.x1)
        _finite(corners, "box")
        for name in ("y0", "x0", "y1", "x1"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.y1 < self.y0 or self.x1 < self.x0:
            raise PromptError(
                f"box {self.rc} on slice {self.z}: need R0 <= R1 and C0 <= C1 (Y0 <= Y1, X0 <= X1)"
            )
        if self.y1 == self.y0 or self.x1 == self.x0:
            raise PromptError(
                f"box {self.rc} on slice {self.z} has zero height or width; give two corners "
                "that differ in both rows and columns"
            )

    @property
    def rc(self) -> tuple[float, float, float, float]:
        """``(r0, c0, r1, c1)`` in the slice frame."""
        return (self.y0, self.x0, self.y1, self.x1)

    @property
    def bounds(self) -> tuple[int, int] | None:
        """``(z_min, z_max)`` (a missing end is the volume's end, ``None`` for "unknown");
        ``None`` when no z range was given."""
        if self.z_min is None and self.z_max is None:
            return None
        return (
            0 if self.z_min is None else self.z_min,
            np.iinfo(np.int32).max if self.z_max is None else self.z_max,
        )

    def to_json(self) -> dict[str, Any]:
        """``{"kind": "box", "axis", "slice", "box": [R0, C0, R1, C1]}`` plus ``"z_range":
        [z_min, z_max]`` (either may be ``null``) when a z range was given."""
        out: dict[str, Any] = {
            "kind": "box",
            "axis": self.axis,
            "slice": self.z,
            "box": list(self.rc),
        }
        if self.z_min is not None or self.z_max is not None:
            out["z_range"] = [self.z_min, self.z_max]
        return out


@dataclass(frozen=True)
class Point:
    """A click at voxel ``(z, y, x)``; ``positive=False`` marks background."""

    z: float
    y: float
    x: float
    positive: bool = True

    def __post_init__(self) -> None:
        _finite((self.z, self.y, self.x), "point")
        for name in ("z", "y", "x"):
            object.__setattr__(self, name, float(getattr(self, name)))
        object.__setattr__(self, "positive", bool(self.positive))

    @property
    def zyx(self) -> tuple[float, float, float]:
        """``(z, y, x)`` voxel coordinates."""
        return (self.z, self.y, self.x)

    def to_json(self) -> dict[str, Any]:
        """``{"kind": "point", "zyx": [Z, Y, X], "label": 1|0}``."""
        return {"kind": "point", "zyx": list(self.zyx), "label": int(self.positive)}


@dataclass(frozen=True)
class MaskPrompt:
    """A finished mask on one slice, used as is on its key slice (no model call) and carried on.

    Attributes:
        mask: ``(rows, cols)`` boolean mask of slice ``z`` along ``axis``.
        z: slice index along ``axis``.
        axis: ``'z'`` (default), ``'y'`` or ``'x'``.
    """

    mask: np.ndarray = field(repr=False)
    z: int = 0
    axis: str = "z"

    def __post_init__(self) -> None:
        object.__setattr__(self, "axis", _axis(self.axis))
        m = np.asarray(self.mask)
        if m.ndim != 2:
            raise PromptError(f"a mask prompt is one 2D slice (rows, cols); got shape {m.shape}")
        object.__setattr__(self, "mask", m.astype(bool))
        if float(self.z) != round(float(self.z)):
            raise PromptError(f"mask slice index {self.z!r} is not an integer")
        object.__setattr__(self, "z", round(float(self.z)))

    def to_json(self) -> dict[str, Any]:
        """``{"kind": "mask", "axis", "slice", "voxels", "sha256"}`` (no pixels inlined)."""
        import hashlib

        digest = hashlib.sha256(np.packbits(self.mask).tobytes()).hexdigest()
        return {
            "kind": "mask",
            "axis": self.axis,
            "slice": self.z,
            "shape": list(self.mask.shape),
            "voxels": int(self.mask.sum()),
            "sha256": digest,
        }


Prompt = Union[Box, Point, MaskPrompt]  # noqa: UP007 - a runtime alias (isinstance) on py3.10


def as_prompt_list(prompts: Prompt | Iterable[Prompt] | None) -> list[Prompt]:
    """One prompt or an iterable of prompts → a list (``None`` → empty).

    Raises:
        PromptError: an element is not a :class:`Box`, :class:`Point` or :class:`MaskPrompt`.
    """
    if prompts is None:
        return []
    items = [prompts] if isinstance(prompts, (Box, Point, MaskPrompt)) else list(prompts)
    for p in items:
        if not isinstance(p, (Box, Point, MaskPrompt)):
            raise PromptError(
                f"a prompt must be medseg.Box, medseg.Point or medseg.MaskPrompt, got "
                f"{type(p).__name__}; parse strings with the command line or load_prompts()"
            )
    return items


def prompts_to_json(prompts: Iterable[Prompt]) -> list[dict[str, Any]]:
    """JSON-safe list describing ``prompts`` (what the report's provenance records)."""
    return [p.to_json() for p in prompts]


def key_prompts(
    prompts: Iterable[Prompt], shape_zyx: Sequence[int], axis: str = "z"
) -> list[KeyPrompt]:
    """Check prompts against the image and turn them into per-slice key prompts along ``axis``.

    Args:
        prompts: boxes, points and masks (several may share a slice; they are merged later).
        shape_zyx: the image shape ``(z, y, x)``.
        axis: the propagation axis; boxes and masks must be drawn on slices along it.

    Returns:
        One :class:`~medseg.predict.propagate.KeyPrompt` per prompt, in the given order.

    Raises:
        PromptError: a slice index out of range, a box or point outside the image, a box or mask
            for another axis, a mask of the wrong slice shape.
    """
    from medseg.predict.frame import axis_index, check_index, split_point
    from medseg.predict.propagate import KeyPrompt

    ax_name = _axis(axis)
    ax = axis_index(ax_name)
    shape = tuple(int(s) for s in shape_zyx)
    n = shape[ax]
    h, w = (s for i, s in enumerate(shape) if i != ax)
    names = [c for i, c in enumerate("zyx") if i != ax]
    out: list[KeyPrompt] = []
    for p in as_prompt_list(list(prompts)):
        if isinstance(p, Point):
            for i, (v, size) in enumerate(zip(p.zyx, shape, strict=True)):
                if not 0 <= v <= size - 1:
                    raise PromptError(
                        f"point (z {p.z:g}, y {p.y:g}, x {p.x:g}) is outside the image: "
                        f"{'zyx'[i]} must be in 0..{size - 1}"
                    )
            idx, rc = split_point(p.zyx, ax_name)
            out.append(
                KeyPrompt(
                    idx, points_rc=np.asarray([rc]), point_labels=np.asarray([int(p.positive)])
                )
            )
            continue
        if p.axis != ax_name:
            raise PromptError(
                f"a {type(p).__name__} drawn on a slice along {p.axis} cannot start a propagation "
                f"along {ax_name}; use axis={p.axis!r} or redraw it"
            )
        check_index(p.z, n, ax_name)
        if isinstance(p, Box):
            r0, c0, r1, c1 = p.rc
            if min(r0, c0) < 0 or r1 > h - 1 or c1 > w - 1:
                raise PromptError(
                    f"box ({r0:g}, {c0:g}, {r1:g}, {c1:g}) on slice {p.z} is outside the image: "
                    f"{names[0]} must be in 0..{h - 1} and {names[1]} in 0..{w - 1}"
                )
            bounds = None
            if p.bounds is not None:
                for v in (p.z_min, p.z_max):
                    if v is not None and not 0 <= v <= n - 1:
                        raise PromptError(
                            f"box z range {p.z_min}..{p.z_max} is outside the image: slices "
                            f"along {ax_name} are 0..{n - 1}"
                        )
                bounds = (p.bounds[0], min(p.bounds[1], n - 1))
            out.append(KeyPrompt(p.z, box_rc=p.rc, bounds=bounds))
        else:
            if p.mask.shape != (h, w):
                raise PromptError(
                    f"mask prompt on slice {p.z} has shape {p.mask.shape}; slices along {ax_name} "
                    f"are {(h, w)}"
                )
            if not p.mask.any():
                raise PromptError(f"mask prompt on slice {p.z} is empty")
            out.append(KeyPrompt(p.z, mask=p.mask))
    return out


# --------------------------------------------------------------------------- protocol
def gt_object(gt: LabelMap, label: int | None = None) -> tuple[np.ndarray, int, str]:
    """The ground-truth object a protocol works on: ``(mask, label value, name)``.

    ``label`` given: that value (its name from the label table, else ``"object"``). Not given:
    the single label present, or every non-zero voxel as value 1 ``"foreground"`` when there are
    several.

    Raises:
        InputError: the label is absent or the ground truth is empty.
    """
    if label is not None:
        mask = gt.array == int(label)
        if not mask.any():
            raise InputError(
                f"label {label} is not in the ground truth (present: {gt.present() or 'none'}); "
                "choose a label from those"
            )
        return mask, int(label), gt.labels.get(int(label), "object")
    mask = gt.array > 0
    if not mask.any():
        raise InputError("the ground truth is empty: nothing to segment or score")
    present = gt.present()
    if len(present) == 1:
        return mask, present[0], gt.labels.get(present[0], "tumour")
    return mask, 1, "foreground"


def box_from_gt(
    gt: LabelMap | np.ndarray,
    label: int | None = None,
    axis: str = "z",
    margin: float = DEFAULT_BOX_MARGIN,
) -> Box:
    """The standard interactive protocol: one box around the ground truth on its largest slice.

    Args:
        gt: label map (or a ``(z, y, x)`` boolean mask) on the image's grid.
        label: the label value to box (see :func:`gt_object`); ignored for a boolean mask.
        axis: slicing axis of the box.
        margin: pixels added on each side (clipped to the slice).

    Returns:
        A :class:`Box` on the slice of largest ground-truth area (lowest index on ties).

    Raises:
        InputError: empty ground truth or absent label.
    """
    from medseg.predict.propagate import box_from_gt as _engine_box

    if isinstance(gt, np.ndarray):
        mask = gt.astype(bool)
        if not mask.any():
            raise InputError("the ground truth is empty: no box can be drawn from it")
    else:
        mask, _, _ = gt_object(gt, label)
    kp = _engine_box(mask, _axis(axis), float(margin))
    assert kp.box_rc is not None
    r0, c0, r1, c1 = kp.box_rc
    return Box(kp.index, r0, c0, r1, c1, axis=_axis(axis))


# --------------------------------------------------------------------------- file
def load_prompts(path: str | Path, axis: str | None = None) -> list[Prompt]:
    """Read a prompts JSON file (format in the module docstring).

    Args:
        path: the JSON file.
        axis: the propagation axis the caller will use; the file's ``axis`` must agree.

    Returns:
        The prompts in file order: boxes, then points, then masks.

    Raises:
        InputError: unreadable JSON, a wrong structure, an axis that disagrees, no prompts.
        PromptError: a malformed box or point.
    """
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise InputError(f"{p}: no such prompts file") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"{p}: not a readable JSON prompts file ({exc})") from None
    return prompts_from_json(data, axis=axis, where=str(p), base_dir=p.parent)


def prompts_from_json(
    data: Any, axis: str | None = None, *, where: str = "prompts", base_dir: str | Path = "."
) -> list[Prompt]:
    """Prompts from an object in the prompts-file format (the parsed JSON of one file).

    Args:
        data: ``{"axis", "boxes", "points", "masks"}`` as in the module docstring.
        axis: the propagation axis the caller will use; the object's ``axis`` must agree.
        where: what to name in error messages (a file, or a file and a key).
        base_dir: folder that ``masks[].file`` paths are relative to.

    Returns:
        The prompts in order: boxes, then points, then masks.

    Raises:
        InputError: a wrong structure, an axis that disagrees, no prompts.
        PromptError: a malformed box or point.
    """
    p = where
    if not isinstance(data, dict):
        raise InputError(f"{p}: prompts file must be a JSON object: {PROMPTS_FILE_FORMAT}")
    unknown = set(data) - {"axis", "boxes", "points", "masks", "comment"}
    if unknown:
        raise InputError(f"{p}: unknown keys {sorted(unknown)}; format: {PROMPTS_FILE_FORMAT}")
    file_axis = str(data.get("axis", axis or "z")).lower()
    if axis is not None and file_axis != str(axis).lower():
        raise InputError(
            f"{p}: prompts are for axis {data['axis']!r} but the axis is {axis!r}; make them agree"
        )
    out: list[Prompt] = []
    for i, b in enumerate(data.get("boxes") or []):
        try:
            idx = b["slice"]
            r0, c0, r1, c1 = (float(v) for v in b["box"])
            z_lo, z_hi = b.get("z_range") or (None, None)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise InputError(
                f'{p}: boxes[{i}] must be {{"slice": I, "box": [R0, C0, R1, C1]}} (optional '
                '"z_range": [Z_MIN, Z_MAX])'
            ) from None
        out.append(Box(idx, r0, c0, r1, c1, axis=file_axis, z_min=z_lo, z_max=z_hi))
    for i, q in enumerate(data.get("points") or []):
        try:
            z, y, x = (float(v) for v in q["zyx"])
            lab = q.get("label", 1)
        except (KeyError, TypeError, ValueError, AttributeError):
            raise InputError(
                f'{p}: points[{i}] must be {{"zyx": [Z, Y, X], "label": 1|0}}'
            ) from None
        if lab not in (0, 1):
            raise PromptError(f"{p}: points[{i}]: the label must be 1 or 0")
        out.append(Point(z, y, x, positive=bool(lab)))
    for i, m in enumerate(data.get("masks") or []):
        try:
            idx, rel = m["slice"], m["file"]
        except (KeyError, TypeError):
            raise InputError(
                f'{p}: masks[{i}] must be {{"slice": I, "file": "mask.npy"}}'
            ) from None
        mpath = (Path(base_dir) / str(rel)).resolve()
        try:
            arr = np.load(mpath, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"{p}: masks[{i}]: cannot read {mpath} as .npy ({exc})") from None
        out.append(MaskPrompt(arr, z=idx, axis=file_axis))
    if not out:
        raise InputError(f"{p}: no prompts in the file; format: {PROMPTS_FILE_FORMAT}")
    return out
