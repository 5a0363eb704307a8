"""Conversions between medseg's :class:`Volume`/:class:`LabelMap` and napari layer data.

One place says how a volume becomes a layer and back:

* ``data`` is the ``(z, y, x)`` array; ``scale``/``translate`` come from :func:`layer_geometry`
  (mm, array-axis order).
* ``metadata`` holds the full geometry so that a layer can be turned back into a volume on the
  exact source grid: ``spacing`` (z, y, x), ``origin`` (LPS x, y, z), ``direction`` (3x3 ITK, as
  nested lists), ``source`` (the file or folder read), ``volume_meta`` (the rest of
  ``Volume.meta``, JSON-friendly) and, for label layers, ``labels`` (``{value: name}``) and
  ``image_source`` (the image whose grid they share, when known).
* Labels layers also get a ``features`` table (``index`` = label value, ``name``) so napari's
  status bar shows the label name under the cursor.

Imports numpy and medseg's light core only (no napari, no Qt): layer *data tuples* are plain
``(data, kwargs, layer_type)``; functions that take a layer only read its attributes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.volume import LabelMap, Volume

#: metadata keys that describe the grid (copied from an image layer to labels made on it).
GEOMETRY_KEYS = ("spacing", "origin", "direction", "source")
#: Layer-name fragments that mark an integer file as a label map.
LABEL_HINTS = ("label", "seg", "mask")
#: Folders (MSD / nnU-Net layouts) whose files are label maps.
LABEL_FOLDERS = ("labelstr", "labelsts", "labelsva")

LayerData = tuple[Any, dict[str, Any], str]


def _jsonable(value: Any) -> Any:
    """A copy of ``value`` made of dict/list/str/float/int/bool/None (numpy and paths converted)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def layer_geometry(vol: Volume) -> dict[str, tuple[float, float, float]]:
    """napari layer keywords for a volume's grid: ``scale`` and ``translate``, (z, y, x) mm.

    ``scale`` is the spacing; ``translate`` is the LPS origin ``(x, y, z)`` reversed into array-axis
    order, so image and labels layers built from volumes on one grid overlay exactly and distances
    are in mm. A non-identity direction (oblique or flipped axes) is not rotated into the layer; it
    is recorded in ``metadata`` (:func:`geometry_metadata`).

    Args:
        vol: a :class:`~medseg.volume.Volume` (or :class:`~medseg.volume.LabelMap`).

    Returns:
        ``{"scale": (sz, sy, sx), "translate": (oz, oy, ox)}`` as plain floats.
    """
    return {
        "scale": tuple(float(v) for v in vol.spacing),
        "translate": (float(vol.origin[2]), float(vol.origin[1]), float(vol.origin[0])),
    }


def geometry_metadata(vol: Volume) -> dict[str, Any]:
    """Layer ``metadata`` describing ``vol``'s grid and provenance (see module docstring)."""
    meta = dict(vol.meta)
    source = meta.pop("source", None)
    meta.pop("labels", None)
    return {
        "spacing": [float(v) for v in vol.spacing],
        "origin": [float(v) for v in vol.origin],
        "direction": np.asarray(vol.direction, dtype=float).tolist(),
        "source": None if source is None else str(source),
        "volume_meta": _jsonable(meta),
    }


def label_features(labels: dict[int, str], present: list[int] | None = None) -> dict[str, list]:
    """napari ``features`` table for a label table: columns ``index`` (value) and ``name``.

    Rows: background (0), every value in ``labels`` and every value in ``present``.
    """
    values = sorted({0, *(int(k) for k in labels), *(int(v) for v in present or [])})
    names = ["background" if v == 0 else labels.get(v, f"label_{v}") for v in values]
    return {"index": values, "name": names}


def image_layer_data(vol: Volume, name: str) -> LayerData:
    """``(data, kwargs, "image")`` for a volume: physical scale/translate, full metadata."""
    kwargs: dict[str, Any] = {
        "name": name,
        **layer_geometry(vol),
        "metadata": geometry_metadata(vol),
    }
    lo, hi = float(np.min(vol.array)), float(np.max(vol.array))
    if hi > lo:
        kwargs["contrast_limits"] = [lo, hi]
    return (vol.array, kwargs, "image")


def labels_layer_data(lm: LabelMap, name: str, image_source: str | None = None) -> LayerData:
    """``(data, kwargs, "labels")`` for a label map: geometry, ``labels`` table, ``features``."""
    meta = geometry_metadata(lm)
    meta["labels"] = {int(k): str(v) for k, v in lm.labels.items()}
    if image_source is not None:
        meta["image_source"] = str(image_source)
    kwargs: dict[str, Any] = {
        "name": name,
        **layer_geometry(lm),
        "metadata": meta,
        "features": label_features(lm.labels, lm.present()),
    }
    return (lm.array, kwargs, "labels")


def is_label_file(path: str, array: np.ndarray) -> bool:
    """Whether an image file holds a label map: an integer array and a name/folder hint
    (``label``/``seg``/``mask`` in the file name, or an MSD ``labelsTr``/``labelsTs`` folder)."""
    from pathlib import Path

    if np.asarray(array).dtype.kind not in "iub":
        return False
    p = Path(path)
    name = p.name.lower()
    return any(h in name for h in LABEL_HINTS) or p.parent.name.lower() in LABEL_FOLDERS


def grid_kwargs_from_layer(layer: Any) -> dict[str, Any]:
    """``spacing``/``origin``/``direction`` of a layer's grid.

    From its ``metadata`` when it was made by this plugin (exact source geometry); otherwise from
    the layer's ``scale``/``translate`` with an identity direction (what napari shows).
    """
    md = getattr(layer, "metadata", None) or {}
    if all(k in md for k in ("spacing", "origin", "direction")):
        return {
            "spacing": tuple(float(v) for v in md["spacing"]),
            "origin": tuple(float(v) for v in md["origin"]),
            "direction": np.asarray(md["direction"], dtype=float),
        }
    scale = np.asarray(layer.scale, dtype=float)[-3:]
    translate = np.asarray(layer.translate, dtype=float)[-3:]
    return {
        "spacing": tuple(float(v) for v in scale),
        "origin": (float(translate[2]), float(translate[1]), float(translate[0])),
        "direction": np.eye(3),
    }


def _layer_array(layer: Any, what: str) -> np.ndarray:
    data = layer.data
    if isinstance(data, (list, tuple)):  # multiscale: full resolution first
        data = data[0]
    arr = np.asarray(data)
    if arr.ndim != 3:
        raise InputError(
            f"layer {layer.name!r} is {arr.ndim}D with shape {arr.shape}; {what} needs a 3D "
            "(z, y, x) volume"
        )
    return arr


def volume_from_layer(layer: Any) -> Volume:
    """A :class:`Volume` from an Image layer (array ``(z, y, x)``, geometry as
    :func:`grid_kwargs_from_layer`, ``meta`` from ``metadata['volume_meta']`` + ``source``).

    Raises:
        InputError: the layer is not 3D (e.g. RGB or 2D).
    """
    arr = _layer_array(layer, "segmentation")
    md = getattr(layer, "metadata", None) or {}
    meta = dict(md.get("volume_meta") or {})
    if md.get("source"):
        meta["source"] = md["source"]
    return Volume(array=arr, meta=meta, **grid_kwargs_from_layer(layer))


def label_table_from_layer(layer: Any) -> dict[int, str]:
    """``{value: name}`` from ``metadata['labels']``, else from the ``features`` ``name`` column."""
    md = getattr(layer, "metadata", None) or {}
    table = {int(k): str(v) for k, v in (md.get("labels") or {}).items() if int(k) != 0}
    if table:
        return table
    feats = getattr(layer, "features", None)
    if feats is not None and "name" in getattr(feats, "columns", ()):
        idx = feats["index"] if "index" in feats.columns else range(len(feats))
        for value, name in zip(idx, feats["name"], strict=False):
            if int(value) != 0 and name is not None and str(name) != "nan":
                table[int(value)] = str(name)
    return table


def labelmap_from_layer(layer: Any, data: Any = None) -> LabelMap:
    """A :class:`LabelMap` from a Labels layer (or from ``data`` with the layer's geometry).

    Raises:
        InputError: not 3D, or values that are not non-negative whole numbers.
    """
    arr = _layer_array(layer, "a label map") if data is None else np.asarray(data)
    md = getattr(layer, "metadata", None) or {}
    meta = dict(md.get("volume_meta") or {})
    for key in ("source", "image_source"):
        if md.get(key):
            meta[key] = md[key]
    return LabelMap(
        array=arr, labels=label_table_from_layer(layer), meta=meta, **grid_kwargs_from_layer(layer)
    )


def labels_kwargs_like(image_layer: Any, name: str, labels: dict[int, str] | None = None) -> dict:
    """Keyword arguments for a new Labels layer on an image layer's grid (geometry metadata
    copied, ``image_source`` set)."""
    md = dict(getattr(image_layer, "metadata", None) or {})
    meta = {k: md[k] for k in (*GEOMETRY_KEYS, "volume_meta") if k in md}
    if "spacing" not in meta:
        g = grid_kwargs_from_layer(image_layer)
        meta.update(
            spacing=list(g["spacing"]),
            origin=list(g["origin"]),
            direction=np.asarray(g["direction"]).tolist(),
        )
    meta["source"] = None  # a new layer has no file yet; the writer must not take it for one
    meta["image_source"] = md.get("source")
    meta["labels"] = dict(labels or {})
    return {
        "name": name,
        "scale": tuple(image_layer.scale),
        "translate": tuple(image_layer.translate),
        "metadata": meta,
        "features": label_features(dict(labels or {})),
    }


def has_geometry(layer: Any) -> bool:
    """Whether the layer's metadata records its exact grid (spacing, origin, direction)."""
    md = getattr(layer, "metadata", None) or {}
    return all(k in md for k in ("spacing", "origin", "direction"))


def labelmaps_from_layers(a: Any, b: Any) -> tuple[LabelMap, LabelMap]:
    """Two Labels layers as label maps on one grid where napari shows them on one grid.

    A layer painted by hand in napari has no recorded geometry (only ``scale``/``translate``,
    no direction); when the other layer has one and both have the same shape, scale and translate,
    it is taken for both (otherwise each keeps its own, and a comparison reports the difference).
    """
    la, lb = labelmap_from_layer(a), labelmap_from_layer(b)
    same_view = (
        tuple(np.shape(a.data)) == tuple(np.shape(b.data))
        and np.allclose(a.scale, b.scale)
        and np.allclose(a.translate, b.translate)
    )
    if same_view and has_geometry(a) != has_geometry(b):
        ref = la if has_geometry(a) else lb
        other = lb if ref is la else la
        fixed = LabelMap.like(ref, other.array, other.labels, **other.meta)
        return (la, fixed) if ref is la else (fixed, lb)
    return la, lb
