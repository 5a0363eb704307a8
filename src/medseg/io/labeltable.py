"""Label tables from ``dataset.json`` (MSD ``{"1": "liver"}`` or nnU-Net ``{"liver": 1}``).

Standard library only; imported by both the readers (:mod:`medseg.io.files`) and the dataset
layouts (:mod:`medseg.io.datasets`), so neither imports the other at module level.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from medseg.errors import InputError

__all__ = ["label_table_from_dataset_json"]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise InputError(
            f"{path}: no dataset.json; expected a Medical Segmentation Decathlon or nnU-Net raw "
            "dataset folder"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}: malformed JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
            "fix the file"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read: {exc}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: dataset.json must hold a JSON object, got {type(data).__name__}")
    return data


def _parse_labels(raw: Any, where: str) -> dict[int, str]:
    """MSD ``{"1": "liver"}`` or nnU-Net ``{"liver": 1}`` → ``{1: "liver"}`` (no background).

    nnU-Net region entries (``"whole_tumor": [1, 2]``) are not single values and are skipped.
    """
    if not isinstance(raw, dict):
        raise InputError(f'{where}: \'labels\' must be an object like {{"1": "liver"}}')
    table: dict[int, str] = {}
    for key, value in raw.items():
        k = str(key).strip()
        if re.fullmatch(r"-?\d+", k):  # MSD: value -> name
            if not isinstance(value, str):
                raise InputError(f"{where}: label {k} must map to a name, got {value!r}")
            num, name = int(k), value
        elif isinstance(value, bool):
            raise InputError(f"{where}: label {k!r} must map to an integer, got {value!r}")
        elif isinstance(value, int):  # nnU-Net: name -> value
            num, name = value, k
        elif isinstance(value, str) and re.fullmatch(r"\d+", value.strip()):
            num, name = int(value), k
        elif isinstance(value, list):
            continue  # nnU-Net region (a set of values): not one label
        else:
            raise InputError(f"{where}: cannot read label entry {key!r}: {value!r}")
        if num < 0:
            raise InputError(f"{where}: label values must be >= 0, got {num} for {name!r}")
        if num != 0:
            table[num] = name
    return dict(sorted(table.items()))


def label_table_from_dataset_json(path: str | os.PathLike[str]) -> dict[int, str]:
    """Label table ``{value: name}`` (background excluded) from an MSD or nnU-Net ``dataset.json``.

    Raises:
        InputError: missing/malformed file or no usable ``labels`` entry.
    """
    p = Path(path)
    data = _read_json(p)
    if "labels" not in data:
        raise InputError(f'{p}: no \'labels\' entry; add e.g. "labels": {{"1": "liver"}}')
    return _parse_labels(data["labels"], str(p))
