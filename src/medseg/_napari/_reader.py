"""napari reader: DICOM folders, NIfTI, NRRD and MHA/MHD files.

``napari_get_reader(path)`` is a cheap check (suffix, or a DICOM file in a folder's first few
entries) and returns ``None`` for anything else. The returned function reads through
:func:`medseg.io.read_volume` and gives ``[(data, kwargs, "image" | "labels")]`` with physical
``scale``/``translate`` and the full geometry on ``metadata`` (see :mod:`medseg._napari._layers`).

Integer files whose name says ``label``/``seg``/``mask`` (or that sit in an MSD ``labelsTr``
folder) open as Labels layers named from the label table (``dataset.json`` beside or above the
file, else the file's own table). A DICOM folder with several series opens its largest series;
the others are listed in ``metadata['dicom_series']`` and a notification says so.

Importing this module is cheap: numpy and medseg's core only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from medseg.io.files import image_suffix

PathLike = str | os.PathLike[str]
ReaderFunction = Callable[[PathLike | Sequence[PathLike]], list[tuple[Any, dict, str]]]

#: How many folder entries the cheap DICOM check looks at.
_PEEK_FILES = 64


def _looks_like_dicom_folder(folder: Path) -> bool:
    from medseg.io.dicom import is_dicom_file

    seen = 0
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in sorted(files):
            if f.upper() == "DICOMDIR" or is_dicom_file(Path(root) / f):
                return True
            seen += 1
            if seen >= _PEEK_FILES:
                return False
    return False


def _can_read(path: PathLike) -> bool:
    p = Path(path)
    if p.is_dir():
        return _looks_like_dicom_folder(p)
    if image_suffix(p) is not None:
        return p.is_file()
    if p.is_file():
        from medseg.io.dicom import is_dicom_file

        return is_dicom_file(p)
    return False


def napari_get_reader(path: PathLike | Sequence[PathLike]) -> ReaderFunction | None:
    """Return :func:`read_layers` when ``path`` (or every path of a list) is readable, else None."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_can_read(p) for p in paths):
        return None
    return read_layers


def _layer_name(p: Path) -> str:
    suf = image_suffix(p)
    return p.name[: -len(suf)] if suf else p.name


def _notify(message: str) -> None:
    try:
        from napari.utils.notifications import show_info
    except ImportError:  # used outside napari
        return
    show_info(message)


def read_path(path: PathLike, series: str | None = None) -> list[tuple[Any, dict, str]]:
    """Read one file or DICOM folder into napari layer data.

    Args:
        path: NIfTI/NRRD/MHA file, one DICOM file (its series is read from its folder) or a
            DICOM folder.
        series: SeriesInstanceUID to read from a DICOM folder (default: the largest series).

    Returns:
        ``[(array (z, y, x), kwargs, "image" | "labels")]``.

    Raises:
        MedsegError: the core's error for unreadable input (napari shows its message).
    """
    from medseg._napari._layers import image_layer_data, is_label_file, labels_layer_data

    p = Path(path)
    if p.is_dir():
        from medseg.io.dicom import read_dicom_series, scan_dicom_folder

        scan = scan_dicom_folder(p)
        chosen = scan.get(series) if series else scan.largest()
        vol = read_dicom_series(p, series=chosen.uid, scan=scan)
        data, kwargs, kind = image_layer_data(vol, chosen.description or p.name)
        kwargs["metadata"]["dicom_series"] = [s.as_dict() for s in scan.series.values()]
        kwargs["metadata"]["dicom_series_uid"] = chosen.uid
        if len(scan.series) > 1 and not series:
            _notify(
                f"{p.name}: {len(scan.series)} DICOM series found; opened the largest, "
                f"{chosen.summary()}. Use the 'DICOM series' widget (Plugins > medseg) to open "
                "another."
            )
        for w in vol.meta.get("warnings", []) or []:
            _notify(f"{p.name}: {w}")
        return [(data, kwargs, kind)]

    from medseg.io import read_volume
    from medseg.io.files import dicom_object_kind

    kind = dicom_object_kind(p)
    if kind == "SEG":  # a DICOM-SEG opens as labels on the grid of its frames (world-placed)
        from medseg.io.dicom_seg import read_dicom_seg

        return [labels_layer_data(read_dicom_seg(p), _layer_name(p))]
    if kind == "RTSTRUCT":
        from medseg.errors import InputError

        raise InputError(
            f"{p.name}: an RT Structure Set holds contours of another series; rasterise it with "
            "medseg.read_labels(path, reference=image) or medseg export"
        )
    vol = read_volume(p)
    name = _layer_name(p)
    if is_label_file(str(p), vol.array):
        from medseg.io.files import _label_table_near
        from medseg.volume import LabelMap

        table = _label_table_near(p) or vol.meta.get("labels") or {}
        lm = LabelMap(array=vol.array, labels=table, meta=vol.meta, **vol.copy_geometry())
        return [labels_layer_data(lm, name)]
    return [image_layer_data(vol, name)]


def read_layers(path: PathLike | Sequence[PathLike]) -> list[tuple[Any, dict, str]]:
    """napari reader function: every path through :func:`read_path`, layers concatenated."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    out: list[tuple[Any, dict, str]] = []
    for p in paths:
        out.extend(read_path(p))
    return out
