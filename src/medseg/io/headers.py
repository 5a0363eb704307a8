"""Check the text headers of NRRD and MetaImage files before ITK parses them.

ITK's NRRD (teem) and MetaIO parsers trust the header: a ``space origin`` with more components
than ``space dimension`` overflows a fixed buffer and crashes the process (found by
``tests/test_fuzz.py``), huge ``sizes`` allocate before reading, ``data file: /etc/passwd`` reads
another file. :func:`check_text_header` parses the header with plain Python and refuses anything
outside what ITK handles safely, with one :class:`~medseg.errors.InputError` line. Standard
library only.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from medseg.errors import InputError

#: Most header bytes read (a header larger than this is refused).
MAX_HEADER_BYTES = 1 << 16
_MAX_LINE = 4096

_NRRD_TYPES = {
    "signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t",
    "short", "short int", "signed short", "signed short int", "int16", "int16_t",
    "ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t",
    "int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
    "longlong", "long long", "long long int", "signed long long", "signed long long int",
    "int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int",
    "uint64", "uint64_t", "float", "double",
}  # fmt: skip
_NRRD_ENCODINGS = {"raw", "txt", "text", "ascii", "hex", "gz", "gzip", "bz2", "bzip2"}
_NRRD_SPACES = {
    "right-anterior-superior": 3, "ras": 3, "left-anterior-superior": 3, "las": 3,
    "left-posterior-superior": 3, "lps": 3, "right-anterior-superior-time": 4, "rast": 4,
    "left-anterior-superior-time": 4, "last": 4, "left-posterior-superior-time": 4, "lpst": 4,
    "scanner-xyz": 3, "scanner-xyz-time": 4, "3d-right-handed": 3, "3d-left-handed": 3,
    "3d-right-handed-time": 4, "3d-left-handed-time": 4,
}  # fmt: skip
#: NRRD per-axis fields: one entry per axis.
_NRRD_PER_AXIS = {"spacings", "thicknesses", "axis mins", "axismins", "axis maxs", "axismaxs",
                  "centers", "centerings", "kinds", "labels", "units"}  # fmt: skip

_META_TYPES = {
    "MET_CHAR", "MET_UCHAR", "MET_SHORT", "MET_USHORT", "MET_INT", "MET_UINT", "MET_LONG",
    "MET_ULONG", "MET_LONG_LONG", "MET_ULONG_LONG", "MET_FLOAT", "MET_DOUBLE",
}  # fmt: skip


def check_text_header(path: str | Path) -> None:
    """Validate the header of a ``.nrrd``/``.nhdr``/``.mha``/``.mhd`` file (other suffixes pass).

    Raises:
        InputError: the header is malformed, inconsistent, or points outside the file's folder.
    """
    p = Path(path)
    name = p.name.lower()
    if name.endswith((".nrrd", ".nhdr")):
        _check_nrrd(p)
    elif name.endswith((".mha", ".mhd")):
        _check_meta(p)


def _bad(p: Path, what: str) -> InputError:
    return InputError(f"{p}: corrupt header ({what}); the file is damaged or not supported")


def _header_lines(p: Path, stop_at_blank: bool, last_key: str | None) -> list[str]:
    try:
        with open(p, "rb") as fh:
            head = fh.read(MAX_HEADER_BYTES + 1)
    except OSError as exc:
        raise InputError(f"{p}: cannot read: {exc.strerror or exc}") from None
    lines: list[str] = []
    pos = 0
    while True:
        nl = head.find(b"\n", pos)
        if nl < 0:
            if len(head) > MAX_HEADER_BYTES:
                raise _bad(p, "header longer than 64 KiB")
            raw = head[pos:]
            end = True
        else:
            raw, end = head[pos:nl], False
        pos = nl + 1
        line = raw.rstrip(b"\r")
        if stop_at_blank and not line:
            break
        if len(line) > _MAX_LINE:
            raise _bad(p, "a header line is too long")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(p, "non-text bytes in the header") from None
        if any(ord(c) < 32 and c != "\t" for c in text):
            raise _bad(p, "control characters in the header")
        lines.append(text)
        if end or (last_key and text.split("=")[0].strip() == last_key):
            break
    return lines


def _vector(text: str) -> list[float] | None:
    """``(a,b,c)`` -> floats; ``none`` -> None."""
    t = text.strip()
    if t.lower() == "none":
        return None
    if not (t.startswith("(") and t.endswith(")")):
        raise ValueError(t)
    vals = [float(v) for v in t[1:-1].split(",")]
    if not all(math.isfinite(v) for v in vals):
        raise ValueError(t)
    return vals


def _safe_data_file(p: Path, value: str) -> None:
    v = value.strip()
    if not v or v.upper().startswith("LIST") or "%" in v or " " in v:
        raise _bad(p, f"unsupported data file {v[:40]!r}")
    target = Path(v)
    if target.is_absolute() or ".." in target.parts:
        raise _bad(p, f"data file {v[:40]!r} points outside the file's folder")
    if not (p.parent / target).is_file():
        raise InputError(f"{p}: its data file {v[:60]} is missing; copy it next to the header")


def _check_nrrd(p: Path) -> None:
    lines = _header_lines(p, stop_at_blank=True, last_key=None)
    if not lines or not re.fullmatch(r"NRRD000[1-5]", lines[0].strip()):
        raise _bad(p, "no NRRD magic line")
    fields: dict[str, str] = {}
    for ln in lines[1:]:
        if ln.startswith("#"):
            continue
        if ":=" in ln:
            continue  # key/value pair (free text)
        key, sep, value = ln.partition(": ")
        if not sep:
            raise _bad(p, f"line {ln[:40]!r}")
        k = key.strip().lower()
        if k in fields:
            raise _bad(p, f"field {k!r} given twice")
        fields[k] = value.strip()
    try:
        dim = int(fields["dimension"])
        sizes = [int(v) for v in fields["sizes"].split()]
    except (KeyError, ValueError):
        raise _bad(p, "missing or malformed dimension/sizes") from None
    if not 1 <= dim <= 4 or len(sizes) != dim or min(sizes) < 1:
        raise _bad(p, f"dimension {dim} with sizes {fields['sizes'][:60]}")
    if fields.get("type", "").lower() not in _NRRD_TYPES:
        raise _bad(p, f"type {fields.get('type', '')[:30]!r}")
    if fields.get("encoding", "").lower() not in _NRRD_ENCODINGS:
        raise _bad(p, f"encoding {fields.get('encoding', '')[:30]!r}")
    if fields.get("endian", "little").lower() not in ("little", "big"):
        raise _bad(p, "endian")
    sdim: int | None = None
    if "space" in fields:
        sdim = _NRRD_SPACES.get(fields["space"].lower())
        if sdim is None:
            raise _bad(p, f"space {fields['space'][:40]!r}")
    if "space dimension" in fields:
        try:
            sd = int(fields["space dimension"])
        except ValueError:
            raise _bad(p, "space dimension") from None
        if sdim is not None or not 1 <= sd <= 4:
            raise _bad(p, "space dimension")
        sdim = sd
    try:
        if "space origin" in fields:
            o = _vector(fields["space origin"])
            if sdim is None or o is None or len(o) != sdim:
                raise ValueError
        if "space directions" in fields:
            vecs = fields["space directions"].split()
            if sdim is None or len(vecs) != dim:
                raise ValueError
            for v in vecs:
                d = _vector(v)
                if d is not None and len(d) != sdim:
                    raise ValueError
        if "measurement frame" in fields:
            vecs = fields["measurement frame"].split()
            if sdim is None or len(vecs) != sdim:
                raise ValueError
            for v in vecs:
                d = _vector(v)
                if d is None or len(d) != sdim:
                    raise ValueError
    except ValueError:
        raise _bad(p, "space origin/directions do not match the dimensions") from None
    for k in _NRRD_PER_AXIS & fields.keys():
        n = len(re.findall(r'"[^"]*"', fields[k])) if k in ("labels", "units") else None
        if n is None:
            n = len(fields[k].split())
        if n != dim:
            raise _bad(p, f"{k} has {n} entries for {dim} axes")
    for k in ("byte skip", "byteskip", "line skip", "lineskip"):
        if k in fields:
            try:
                skip = int(fields[k])
            except ValueError:
                raise _bad(p, k) from None
            if skip < -1 or skip > MAX_HEADER_BYTES * 1024:
                raise _bad(p, f"{k} {skip}")
    for k in ("data file", "datafile"):
        if k in fields:
            _safe_data_file(p, fields[k])
    enc = fields["encoding"].lower()
    if enc in ("txt", "text", "ascii", "hex") and not any(
        k in fields for k in ("data file", "datafile")
    ):
        _check_text_data(p, hex_data=enc == "hex")


_ASCII_DATA = re.compile(rb"[0-9eE+\-.,\s]*")
_HEX_DATA = re.compile(rb"[0-9a-fA-F\s]*")


def _check_text_data(p: Path, hex_data: bool) -> None:
    """Text-encoded voxels must be numbers and white space (teem crashes on other bytes)."""
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(f"{p}: cannot read: {exc.strerror or exc}") from None
    start = data.find(b"\n\n")
    body = data[start + 2 :] if start >= 0 else b""
    if not (_HEX_DATA if hex_data else _ASCII_DATA).fullmatch(body):
        raise _bad(p, "text-encoded voxel data holds other characters")


def _check_meta(p: Path) -> None:
    lines = _header_lines(p, stop_at_blank=False, last_key="ElementDataFile")
    fields: dict[str, str] = {}
    for ln in lines:
        if not ln.strip():
            continue
        key, sep, value = ln.partition("=")
        if not sep:
            raise _bad(p, f"line {ln[:40]!r}")
        fields[key.strip()] = value.strip()
    if "ElementDataFile" not in fields:
        raise _bad(p, "no ElementDataFile")
    try:
        nd = int(fields["NDims"])
        sizes = [int(v) for v in fields["DimSize"].split()]
    except (KeyError, ValueError):
        raise _bad(p, "missing or malformed NDims/DimSize") from None
    if not 1 <= nd <= 4 or len(sizes) != nd or min(sizes) < 1:
        raise _bad(p, f"NDims {nd} with DimSize {fields['DimSize'][:60]}")
    if fields.get("ElementType", "") not in _META_TYPES:
        raise _bad(p, f"ElementType {fields.get('ElementType', '')[:30]!r}")
    counts = {
        "ElementSpacing": nd,
        "ElementSize": nd,
        "Offset": nd,
        "Origin": nd,
        "Position": nd,
        "CenterOfRotation": nd,
        "TransformMatrix": nd * nd,
        "Rotation": nd * nd,
        "Orientation": nd * nd,
    }
    for k, n in counts.items():
        if k in fields:
            try:
                vals = [float(v) for v in fields[k].split()]
            except ValueError:
                raise _bad(p, k) from None
            if len(vals) != n or not all(math.isfinite(v) for v in vals):
                raise _bad(p, f"{k} needs {n} finite numbers")
    try:
        ch = int(fields.get("ElementNumberOfChannels", "1"))
        hs = int(fields.get("HeaderSize", "0"))
        csize = int(fields.get("CompressedDataSize", "0"))
    except ValueError:
        raise _bad(p, "ElementNumberOfChannels/HeaderSize/CompressedDataSize") from None
    if not 1 <= ch <= 64 or hs < -1 or hs > MAX_HEADER_BYTES * 1024 or csize < 0:
        raise _bad(p, "ElementNumberOfChannels/HeaderSize/CompressedDataSize")
    if fields.get("CompressedData", "False").lower() not in ("true", "false"):
        raise _bad(p, "CompressedData")
    if fields.get("BinaryDataByteOrderMSB", "False").lower() not in ("true", "false"):
        raise _bad(p, "BinaryDataByteOrderMSB")
    edf = fields["ElementDataFile"]
    if edf.upper() != "LOCAL":
        if p.name.lower().endswith(".mha"):
            raise _bad(p, "a .mha file must hold its data (ElementDataFile = LOCAL)")
        _safe_data_file(p, edf)
