"""Helpers shared by the sub-commands: parsing and atomic JSON output."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from medseg.errors import InputError


def parse_label_table(text: str | None) -> dict[int, str]:
    """``"1=liver,2=tumor"`` -> ``{1: "liver", 2: "tumor"}``.

    Raises:
        InputError: malformed entries.
    """
    if not text:
        return {}
    table: dict[int, str] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        key, sep, name = part.partition("=")
        try:
            value = int(key)
        except ValueError:
            value = -1
        if not sep or value <= 0 or not name.strip():
            raise InputError(f"bad label entry {part!r}; expected VALUE=NAME like 1=liver")
        table[value] = name.strip()
    return table


def parse_triple(text: str, option: str, kind: type = float) -> tuple[Any, Any, Any]:
    """``"48,160,160"`` (or ``"48x160x160"``) -> three positive numbers ``(z, y, x)``.

    Raises:
        InputError: not three positive numbers of ``kind``; the message names ``option``.
    """
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        vals = tuple(kind(p) for p in parts)
    except ValueError:
        vals = ()
    if len(vals) != 3 or min(vals) <= 0:
        raise InputError(f"{option} must be three positive numbers Z,Y,X, got {text!r}")
    return vals  # type: ignore[return-value]


def write_json(
    data: Any,
    out: str | os.PathLike[str],
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = True,
) -> Path:
    """Write ``data`` as indented JSON atomically: :func:`medseg.io.atomic.write_json`."""
    from medseg.io.atomic import write_json as _write_json

    return _write_json(data, out, inputs=inputs, overwrite=overwrite)
