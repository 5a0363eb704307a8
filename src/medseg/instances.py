"""Semantic → instance → panoptic: connected lesions, their measurements, a panoptic encoding.

Conventions:

* Arrays are ``(z, y, x)``, spacing ``(z, y, x)`` mm, world coordinates LPS ``(x, y, z)`` mm.
* Instances are **26-connected** components (voxels touching by a face, an edge or a corner
  belong to one lesion). Ids are ``1..N`` ordered by **size, largest first**; equal sizes are
  ordered by the position of their first voxel in C (z, then y, then x) order. 0 is background.
* Panoptic encoding (:func:`semantic_to_panoptic`): a *stuff* class keeps its value ``c``; the
  ``k``-th instance (``k = 1..999``, same order as above) of a *thing* class ``c`` gets
  ``c * 1000 + k``. So ``id // 1000`` is the class of a thing and ``id % 1000`` its instance; ids
  below 1000 are stuff. Stuff values must therefore be below 1000.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from medseg.errors import InputError
from medseg.volume import LabelMap, Volume

#: panoptic id = class * PANOPTIC_DIVISOR + instance (instance 1..PANOPTIC_DIVISOR-1)
PANOPTIC_DIVISOR = 1000

_CONN26 = np.ones((3, 3, 3), dtype=bool)
_FACE = ndimage.generate_binary_structure(3, 1)


def label_lesions(
    mask: Any, spacing: Sequence[float] = (1.0, 1.0, 1.0), min_volume_mm3: float = 0.0
) -> np.ndarray:
    """Connected components (26-connectivity) of a binary mask.

    Args:
        mask: binary mask ``(z, y, x)`` (non-zero = foreground).
        spacing: voxel size ``(z, y, x)`` in mm (for ``min_volume_mm3``).
        min_volume_mm3: components with a smaller volume are removed.

    Returns:
        ``int32`` array ``(z, y, x)``: 0 background, lesions ``1..N`` largest first (ties by first
        voxel in C order).
    """
    m = np.asarray(mask).astype(bool, copy=False)
    if m.ndim != 3:
        raise InputError(f"a lesion mask must be 3D (z, y, x), got shape {m.shape}")
    lab, n = ndimage.label(m, structure=_CONN26)
    if n == 0:
        return lab.astype(np.int32, copy=False)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)
    voxel_mm3 = float(np.prod(np.asarray(spacing, dtype=float)))
    ids = np.arange(1, n + 1)
    # ndimage.label numbers components by their first voxel in C order, so a stable sort on
    # size keeps the positional order for ties
    keep = ids[sizes[1:] * voxel_mm3 >= min_volume_mm3]
    order = keep[np.argsort(-sizes[keep], kind="stable")]
    lut = np.zeros(n + 1, dtype=np.int32)
    lut[order] = np.arange(1, order.size + 1, dtype=np.int32)
    return lut[lab]


def _max_diameter(points_mm: np.ndarray) -> float:
    """Largest distance between two of ``points_mm`` ``(n, 3)`` (via the convex hull)."""
    n = points_mm.shape[0]
    if n < 2:
        return 0.0
    pts = points_mm
    if n > 64:
        from scipy.spatial import ConvexHull

        try:
            # QJ joggles degenerate (flat / collinear) sets; the extreme points of the original
            # set remain hull vertices, and distances are taken on the original coordinates
            pts = points_mm[ConvexHull(points_mm, qhull_options="QJ").vertices]
        except Exception:  # pragma: no cover - qhull failure: fall back to all points
            pts = points_mm
    best = 0.0
    for start in range(0, pts.shape[0], 2048):
        chunk = pts[start : start + 2048]
        d2 = ((chunk[:, None, :] - pts[None, :, :]) ** 2).sum(-1)
        best = max(best, float(d2.max()))
    return float(np.sqrt(best))


def lesion_table(instances: Any, volume: Volume) -> list[dict[str, Any]]:
    """Measurements of each instance.

    Args:
        instances: instance ids ``(z, y, x)`` (0 = background), e.g. from :func:`label_lesions`,
            on ``volume``'s grid.
        volume: the grid (spacing, origin, direction) — an image or a label map.

    Returns:
        One dict per id (ascending): ``id``, ``voxels``, ``volume_mm3``, ``centroid_lps`` (x, y, z)
        mm of the mean voxel centre, ``centroid_zyx`` (continuous voxel indices), and
        ``max_diameter_mm``: the largest centre-to-centre distance between two surface voxels
        (face-connected border), in physical mm (direction and spacing applied). A single voxel
        has diameter 0.
    """
    inst = np.asarray(instances)
    if inst.shape != volume.shape:
        raise InputError(f"instance map shape {inst.shape} does not match the grid {volume.shape}")
    rows: list[dict[str, Any]] = []
    voxel_mm3 = float(np.prod(volume.spacing))
    objects = ndimage.find_objects(inst.astype(np.int64, copy=False))
    for idx, sl in enumerate(objects, start=1):
        if sl is None:
            continue
        sub = inst[sl] == idx
        offset = np.array([s.start for s in sl], dtype=float)
        coords = np.argwhere(sub).astype(float) + offset
        centroid_zyx = coords.mean(axis=0)
        border = sub & ~ndimage.binary_erosion(sub, structure=_FACE, border_value=0)
        surf_mm = volume.index_to_world(np.argwhere(border).astype(float) + offset)
        rows.append(
            {
                "id": idx,
                "voxels": int(coords.shape[0]),
                "volume_mm3": coords.shape[0] * voxel_mm3,
                "centroid_lps": tuple(float(v) for v in volume.index_to_world(centroid_zyx)),
                "centroid_zyx": tuple(float(v) for v in centroid_zyx),
                "max_diameter_mm": _max_diameter(surf_mm),
            }
        )
    return rows


def semantic_to_panoptic(
    semantic: LabelMap,
    thing_labels: Iterable[int],
    min_volume_mm3: float = 0.0,
) -> tuple[LabelMap, list[dict[str, Any]]]:
    """Split thing classes of a semantic map into instances; keep stuff classes as they are.

    Args:
        semantic: label map ``(z, y, x)``.
        thing_labels: class values whose connected components become instances (e.g. tumour).
        min_volume_mm3: thing components smaller than this are dropped (set to background).

    Returns:
        ``(panoptic, table)``: a label map on the same grid with ids encoded as in the module
        docstring (stuff ``c``; thing ``c*1000 + k``) and a label table naming them, and one row
        per id: ``id``, ``class``, ``class_name``, ``instance`` (0 for stuff), ``kind``
        (``"stuff"``/``"thing"``), ``voxels``.

    Raises:
        InputError: a stuff value ≥ 1000 or more than 999 instances of one class.
    """
    things = sorted({int(t) for t in thing_labels})
    sem = semantic.array
    out = np.zeros(sem.shape, dtype=np.uint32)
    table: list[dict[str, Any]] = []
    names: dict[int, str] = {}
    present = semantic.present()
    for cls in present:
        if cls in things:
            continue
        if cls >= PANOPTIC_DIVISOR:
            raise InputError(
                f"stuff label {cls} is >= {PANOPTIC_DIVISOR} and would collide with instance ids; "
                "renumber the labels"
            )
        m = sem == cls
        out[m] = cls
        names[cls] = semantic.name(cls)
        table.append(
            {
                "id": cls,
                "class": cls,
                "class_name": semantic.name(cls),
                "instance": 0,
                "kind": "stuff",
                "voxels": int(np.count_nonzero(m)),
            }
        )
    for cls in things:
        inst = label_lesions(sem == cls, semantic.spacing, min_volume_mm3)
        n = int(inst.max(initial=0))
        if n >= PANOPTIC_DIVISOR:
            raise InputError(
                f"class {cls} has {n} instances; at most {PANOPTIC_DIVISOR - 1} fit the encoding "
                "(raise min_volume_mm3 to drop specks)"
            )
        sizes = np.bincount(inst.ravel(), minlength=n + 1)
        sel = inst > 0
        out[sel] = cls * PANOPTIC_DIVISOR + inst[sel].astype(np.uint32)
        for k in range(1, n + 1):
            pid = cls * PANOPTIC_DIVISOR + k
            names[pid] = f"{semantic.name(cls)}_{k}"
            table.append(
                {
                    "id": pid,
                    "class": cls,
                    "class_name": semantic.name(cls),
                    "instance": k,
                    "kind": "thing",
                    "voxels": int(sizes[k]),
                }
            )
    pan = LabelMap(array=out, labels=names, meta=dict(semantic.meta), **semantic.copy_geometry())
    table.sort(key=lambda r: r["id"])
    return pan, table


def panoptic_to_semantic(panoptic: Any) -> tuple[np.ndarray, np.ndarray]:
    """Decode panoptic ids ``(z, y, x)`` → ``(semantic, instance)`` arrays (0 instance = stuff)."""
    p = np.asarray(panoptic).astype(np.int64, copy=False)
    thing = p >= PANOPTIC_DIVISOR
    sem = np.where(thing, p // PANOPTIC_DIVISOR, p)
    inst = np.where(thing, p % PANOPTIC_DIVISOR, 0)
    return sem, inst


def _flatten(row: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in row.items():
        if k == "centroid_lps" and v is not None:
            out.update({"centroid_x_mm": v[0], "centroid_y_mm": v[1], "centroid_z_mm": v[2]})
        elif k == "centroid_zyx" and v is not None:
            out.update({"centroid_z_vox": v[0], "centroid_y_vox": v[1], "centroid_x_vox": v[2]})
        elif isinstance(v, np.generic):
            out[k] = v.item()
        else:
            out[k] = v
    return out


def write_lesion_table(
    rows: Iterable[Mapping[str, Any]],
    path_csv: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """Write lesion rows (e.g. :func:`lesion_table`) to a CSV file atomically.

    Tuple columns are split: ``centroid_lps`` → ``centroid_x_mm, centroid_y_mm, centroid_z_mm``
    (LPS) and ``centroid_zyx`` → ``centroid_z_vox, centroid_y_vox, centroid_x_vox``.

    Raises:
        OutputError: the path names an input, exists (without ``overwrite``) or is not writable.
    """
    from medseg.io.atomic import write_csv

    flat = [_flatten(r) for r in rows]
    cols: list[str] = []
    for r in flat:
        cols.extend(k for k in r if k not in cols)
    if not cols:
        cols = [
            "id",
            "voxels",
            "volume_mm3",
            "centroid_x_mm",
            "centroid_y_mm",
            "centroid_z_mm",
            "centroid_z_vox",
            "centroid_y_vox",
            "centroid_x_vox",
            "max_diameter_mm",
        ]
    return write_csv(flat, path_csv, columns=cols, inputs=inputs, overwrite=overwrite)


#: Label names that mean "lesion" (the label whose components are instances).
LESION_NAMES = ("tumour", "tumor", "lesion", "cancer", "metastasis", "nodule")


def lesion_label(labels: Mapping[int, str], requested: int | None = None) -> int:
    """The label treated as lesions: ``requested``, else the one named like a tumour.

    Args:
        labels: the label table ``{value: name}``.
        requested: an explicit value (must be in the table).

    Raises:
        InputError: requested value not in the table, or no tumour-like name.
    """
    if requested is not None:
        if int(requested) not in labels:
            raise InputError(
                f"label {requested} is not in the label table {dict(labels)}; pick one of them"
            )
        return int(requested)
    for v, name in sorted(labels.items()):
        if name.strip().lower() in LESION_NAMES:
            return int(v)
    if len(labels) == 1:
        return int(next(iter(labels)))
    raise InputError(f"no tumour label in {dict(labels)}; name the lesion label's value")
