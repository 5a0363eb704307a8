"""The SEGFM3D challenge's ``.npz`` layout, read as an image + ground-truth study.

One case per file (CVPR 2025 "Foundation Models for Interactive 3D Biomedical Image
Segmentation"; the layout of its ``CVPR25_iter_eval.py`` and ``get_boxes.py``):

* ``imgs``: the image ``(z, y, x)`` (the challenge ships it already scaled to 0..255);
* ``gts``: the labels ``(z, y, x)``, 0 = background (absent in the hidden test inputs);
* ``spacing``: three voxel sizes in mm, stored **(x, y, z)**: the challenge's data were written
  by MedSAM's preprocessing with ``spacing=sitk_image.GetSpacing()`` (SimpleITK order) beside
  ``imgs = GetArrayFromImage(...)`` (array order); ``spacing_order="zyx"`` reads files written
  the other way;
* ``boxes`` (optional): a pickled list with one dict per label (sorted label values) with
  ``z_min, z_max, z_mid, z_mid_x_min, z_mid_y_min, z_mid_x_max, z_mid_y_max``. Being a pickle it
  is read only with ``allow_pickle=True`` (a pickle can run code: trust the file first);
  otherwise it is skipped with a warning in ``image.meta['warnings']`` and the protocol draws the
  box from ``gts``.

The study lies on an identity direction with origin 0 (the format stores no geometry).
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import InputError

if TYPE_CHECKING:
    from medseg.protocol import ChallengeBox
    from medseg.volume import LabelMap, Volume

PathLike = str | os.PathLike[str]

#: Keys every challenge ``.npz`` holds (``gts`` may be absent in test inputs).
REQUIRED_KEYS = ("imgs", "spacing")


@dataclass
class NpzStudy:
    """One challenge case.

    Attributes:
        image: the image (identity direction, origin 0, spacing ``(z, y, x)`` mm).
        gt: the labels on the same grid, or ``None`` when the file has no ``gts``.
        boxes: the stored initial boxes by label value (empty when absent or not trusted).
    """

    image: Volume
    gt: LabelMap | None
    boxes: dict[int, ChallengeBox] = field(default_factory=dict)


def is_npz(path: Any) -> bool:
    """True when ``path`` names a ``.npz`` file (by suffix)."""
    return isinstance(path, (str, os.PathLike)) and str(path).lower().endswith(".npz")


def read_npz(path: PathLike, *, spacing_order: str = "xyz", allow_pickle: bool = False) -> NpzStudy:
    """Read a challenge ``.npz`` as a study.

    Args:
        path: the ``.npz`` file.
        spacing_order: the order of the stored ``spacing``: ``"xyz"`` (the challenge's) or
            ``"zyx"``.
        allow_pickle: read the pickled ``boxes`` (only for files you trust).

    Returns:
        :class:`NpzStudy`.

    Raises:
        InputError: missing file, not an npz, a missing key, ``imgs``/``gts`` not 3D or of
            different shapes, a bad spacing, fractional or negative labels, malformed boxes.
    """
    from medseg.volume import LabelMap, Volume

    p = Path(path)
    if spacing_order not in ("xyz", "zyx"):
        raise InputError(f"spacing_order must be 'xyz' or 'zyx', got {spacing_order!r}")
    if not p.is_file():
        raise InputError(f"{p}: no such file")
    try:
        npz = np.load(p, allow_pickle=allow_pickle)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{p}: not a readable .npz ({type(exc).__name__}: {exc})") from None
    with npz:
        keys = set(npz.files)
        missing = [k for k in REQUIRED_KEYS if k not in keys]
        if missing:
            raise InputError(
                f"{p}: missing key {', '.join(repr(k) for k in missing)}; a challenge .npz holds "
                "'imgs' (z, y, x), 'spacing' (3 numbers), optional 'gts' and 'boxes'"
            )
        imgs = _array(npz, "imgs", p)
        if imgs.ndim != 3:
            raise InputError(f"{p}: 'imgs' must be 3D (z, y, x), got shape {imgs.shape}")
        if imgs.dtype.kind not in "iufb":
            raise InputError(f"{p}: 'imgs' must be numeric, got dtype {imgs.dtype}")
        sp = np.asarray(_array(npz, "spacing", p), dtype=float).reshape(-1)
        if sp.shape != (3,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise InputError(f"{p}: 'spacing' must be three positive numbers, got {sp.tolist()}")
        spacing = tuple(float(v) for v in (sp[::-1] if spacing_order == "xyz" else sp))
        gts = None
        if "gts" in keys:
            gts = _array(npz, "gts", p)
            if gts.shape != imgs.shape:
                raise InputError(
                    f"{p}: 'gts' has shape {gts.shape} but 'imgs' {imgs.shape}; they must match"
                )
        warnings: list[str] = []
        raw_boxes = None
        if "boxes" in keys:
            try:
                raw_boxes = npz["boxes"]
            except ValueError:  # an object array without allow_pickle
                warnings.append(
                    "the stored 'boxes' were skipped (a pickle; read with allow_pickle=True only "
                    "for a trusted file); boxes are drawn from 'gts'"
                )
    meta = {"source": str(p), "format": "segfm3d-npz", "spacing_order": spacing_order}
    if warnings:
        meta["warnings"] = warnings
    geometry = {"spacing": spacing, "origin": (0.0, 0.0, 0.0), "direction": np.eye(3)}
    if imgs.dtype.kind == "f" and not np.all(np.isfinite(imgs)):
        raise InputError(f"{p}: 'imgs' holds NaN or infinite values")
    image = Volume(imgs, meta=dict(meta), **geometry)
    gt = None
    if gts is not None:
        try:
            gt = LabelMap(gts, meta=dict(meta), **geometry)
        except InputError as exc:
            raise InputError(f"{p}: 'gts': {exc}") from None
    boxes = _boxes(raw_boxes, gt, p) if raw_boxes is not None else {}
    return NpzStudy(image=image, gt=gt, boxes=boxes)


def _array(npz: Any, key: str, p: Path) -> np.ndarray:
    try:
        return np.asarray(npz[key])
    except ValueError:
        raise InputError(
            f"{p}: '{key}' is stored as pickled objects; expected a numeric array"
        ) from None
    except (OSError, zipfile.BadZipFile, EOFError) as exc:
        raise InputError(f"{p}: '{key}' cannot be read ({type(exc).__name__})") from None


def _boxes(raw: Any, gt: LabelMap | None, p: Path) -> dict[int, ChallengeBox]:
    from medseg.protocol import ChallengeBox

    entries = list(np.asarray(raw, dtype=object).reshape(-1))
    values = gt.present() if gt is not None else list(range(1, len(entries) + 1))
    if len(entries) != len(values):
        raise InputError(
            f"{p}: 'boxes' has {len(entries)} entries but the labels are {values}; "
            "one box per label (sorted) is expected"
        )
    try:
        return {v: ChallengeBox.from_json(e) for v, e in zip(values, entries, strict=True)}
    except InputError as exc:
        raise InputError(f"{p}: 'boxes': {exc}") from None


def write_npz(
    path: PathLike,
    image: Volume,
    gt: LabelMap | None = None,
    *,
    boxes: list[dict[str, int]] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a study in the challenge layout (``spacing`` stored ``(x, y, z)``), atomically.

    Args:
        path: the ``.npz`` to write.
        image: the image ``(z, y, x)``; its direction and origin are not stored.
        gt: labels on the image's grid.
        boxes: challenge box dicts, one per label (stored pickled, as the challenge does).
        overwrite: replace an existing file.

    Raises:
        OutputError: bad output path or the write failed.
        GeometryError: ``gt`` is not on the image's grid.
    """
    from medseg.io.atomic import atomic_path, check_output_path
    from medseg.volume import check_same_grid

    out = check_output_path(path, overwrite=overwrite)
    arrays: dict[str, Any] = {
        "imgs": image.array,
        "spacing": np.asarray(image.spacing[::-1], dtype=float),
    }
    if gt is not None:
        check_same_grid(gt, image, what="ground truth")
        arrays["gts"] = gt.array
    if boxes is not None:
        arrays["boxes"] = np.asarray(list(boxes), dtype=object)
    verify = lambda t: np.load(t, allow_pickle=True).close()  # noqa: E731
    with atomic_path(out, verify=verify) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    return out


def read_npz_labels(
    path: PathLike,
    reference: Volume | None = None,
    labels: dict[int, str] | None = None,
) -> LabelMap:
    """The ``gts`` of a challenge ``.npz`` (``medseg.read_labels("case.npz")``).

    Raises:
        InputError: the file has no ``gts`` (or any :func:`read_npz` error).
        GeometryError: ``reference`` given and the grids differ.
    """
    from medseg.volume import check_same_grid

    study = read_npz(path)
    if study.gt is None:
        raise InputError(f"{path}: the .npz has no 'gts' (ground truth); give a label file")
    gt = study.gt
    if labels:
        gt.labels = {int(k): str(v) for k, v in labels.items() if int(k) != 0}
    if reference is not None:
        check_same_grid(gt, reference)
    return gt
