"""One report for every engine: what was segmented, with what, how well, and how to redo it.

Every entry point (``medseg.segment``, ``medseg segment --json``, the napari panels through the
pipeline) produces the same versioned JSON, validated against ``schemas/report.schema.json``
(shipped in the package). Top-level keys:

* ``schema`` — :data:`SCHEMA_VERSION`;
* ``engine`` — ``"sam"``, ``"sam2"`` or ``"unet"``;
* ``image`` — path, shape ``(z, y, x)``, spacing ``(z, y, x)`` mm, origin (LPS ``x, y, z`` mm),
  direction (ITK, row-major 9), orientation code, modality, content sha256;
* ``model`` — name, engine, weights path and sha256, decoder path and sha256 (``None`` unless a
  fine-tuned decoder is used), precision, device;
* ``labels`` — ``[{"value", "name", "voxels", "volume_mm3"}]`` of the output label map;
* ``metrics`` — per-label rows of :func:`medseg.metrics.evaluate` when ground truth was given,
  else ``None``;
* ``timings`` — seconds per stage (``read_s``, ``model_load_s``, ``segment_s``, ..., ``total_s``);
* ``provenance`` — medseg version, UTC time, host, Python and platform, every setting and every
  prompt needed to redo the run;
* ``sam`` / ``sam2`` / ``unet`` — engine-specific detail (propagation records, oracle; U-Net config,
  refinement, lesions);
* ``outputs`` — files written by :meth:`medseg.pipeline.Segmentation.save` (added when saved).

Importing this module is cheap (numpy only).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import sys
from collections.abc import Iterable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import InputError

if TYPE_CHECKING:
    from medseg.volume import LabelMap, Volume

#: Version of the report layout (bump when a key changes meaning or moves).
SCHEMA_VERSION = 1
#: The JSON Schema file shipped in the package.
SCHEMA_FILE = Path(__file__).resolve().parent / "schemas" / "report.schema.json"
#: Report keys every engine writes.
TOP_LEVEL_KEYS = (
    "schema",
    "engine",
    "image",
    "model",
    "labels",
    "metrics",
    "timings",
    "provenance",
)


def image_info(image: Volume, path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The report's ``image`` entry (the content digest makes two runs comparable)."""
    from medseg.predict.cache import array_digest
    from medseg.volume import orientation_code

    src = path if path is not None else image.meta.get("source")
    return {
        "path": str(src) if src is not None else None,
        "shape": [int(s) for s in image.shape],
        "spacing": [float(s) for s in image.spacing],
        "origin": [float(v) for v in image.origin],
        "direction": [float(v) for v in np.asarray(image.direction).reshape(-1)],
        "orientation": orientation_code(image.direction),
        "modality": image.meta.get("modality"),
        "dtype": str(image.array.dtype),
        "sha256": array_digest(image.array),
    }


#: Voxels per ``np.bincount`` call in :func:`labels_info` (bounds its temporary memory).
_COUNT_CHUNK = 1 << 24


def labels_info(labels: LabelMap) -> list[dict[str, Any]]:
    """The report's ``labels`` entry: every value of the table or present in the map."""
    voxel_mm3 = float(np.prod(labels.spacing))
    # counted in chunks: bincount casts to int64, a full-volume copy (800 MB on 400x512x512)
    flat = labels.array.reshape(-1)
    counts = np.zeros(1, dtype=np.int64)
    for i in range(0, flat.size, _COUNT_CHUNK):
        c = np.bincount(flat[i : i + _COUNT_CHUNK])
        if c.size > counts.size:
            counts = np.pad(counts, (0, c.size - counts.size))
        counts[: c.size] += c
    present = {int(v) for v in np.flatnonzero(counts) if v != 0}
    values = sorted(set(labels.labels) | present)
    out = []
    for v in values:
        n = int(counts[v]) if v < len(counts) else 0
        out.append(
            {"value": int(v), "name": labels.name(v), "voxels": n, "volume_mm3": n * voxel_mm3}
        )
    return out


def label_table(report: Mapping[str, Any]) -> dict[int, str]:
    """``{value: name}`` from a report's ``labels`` entry."""
    return {int(e["value"]): str(e["name"]) for e in report.get("labels") or []}


def provenance(
    settings: Mapping[str, Any],
    prompts: Iterable[Mapping[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The report's ``provenance`` entry: who ran what, where and when, with every setting."""
    from medseg import __version__

    out: dict[str, Any] = {
        "medseg_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "packages": _package_versions(),
        "settings": _jsonable(dict(settings)),
        "prompts": _jsonable(list(prompts)),
    }
    if extra:
        out.update(_jsonable(dict(extra)))
    return out


def _package_versions() -> dict[str, str]:
    """Versions of the numerical packages already imported (importing none)."""
    out = {}
    for name in ("numpy", "torch", "monai", "segment_anything", "SimpleITK", "pydicom"):
        mod = sys.modules.get(name)
        ver = getattr(mod, "__version__", None) or getattr(mod, "Version", lambda: None)()
        if ver:
            out[name] = str(ver)
    return out


def new_report(
    engine: str,
    *,
    image: dict[str, Any],
    model: dict[str, Any],
    labels: LabelMap,
    metrics: list[dict[str, Any]] | None,
    timings: Mapping[str, float],
    provenance: dict[str, Any],
    detail: dict[str, Any],
) -> dict[str, Any]:
    """Assemble a report (JSON-safe; numpy scalars and arrays converted)."""
    rep = {
        "schema": SCHEMA_VERSION,
        "engine": engine,
        "image": image,
        "model": model,
        "labels": labels_info(labels),
        "metrics": metrics,
        "timings": {k: round(float(v), 4) for k, v in timings.items()},
        "provenance": provenance,
        engine: detail,
    }
    return _jsonable(rep)


def report_path_for(labels_path: str | os.PathLike[str]) -> Path:
    """The sidecar report of a label map: ``pred.nii.gz`` → ``pred.json`` (same folder)."""
    from medseg.io.files import image_suffix

    p = Path(labels_path)
    suf = image_suffix(p) or p.suffix
    stem = p.name[: -len(suf)] if suf else p.name
    return p.with_name(stem + ".json")


@lru_cache(maxsize=1)
def schema() -> dict[str, Any]:
    """The report's JSON Schema (draft 2020-12), as shipped in the package."""
    return json.loads(SCHEMA_FILE.read_text())


def validate_report(report: Mapping[str, Any]) -> None:
    """Check a report against :func:`schema`.

    Raises:
        InputError: the report does not follow the schema (the first problem, with its path).
        ModuleNotFoundError: ``jsonschema`` is not installed (it comes with the ``dev`` extra).
    """
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema())
    errors = sorted(validator.iter_errors(report), key=lambda e: list(e.absolute_path))
    if errors:
        err = errors[0]
        where = "/".join(str(p) for p in err.absolute_path) or "(top level)"
        raise InputError(
            f"report does not follow schema {SCHEMA_VERSION} at {where}: {err.message}"
        )


def _jsonable(obj: Any) -> Any:
    """Recursively convert numpy scalars/arrays, paths and tuples; non-finite floats → ``None``."""
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj
