"""NIfTI / NRRD / MHA through SimpleITK. SimpleITK converts NIfTI's RAS to LPS on read and back
on write (its qform/sform handling is what ITK-SNAP and 3D Slicer use), so this is the one place the
RAS⇄LPS flip happens for files."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError
from medseg.volume import LabelMap, Volume

_LABEL_KEY = "medseg_labels"


def read_image(path: str | os.PathLike[str]) -> Volume:
    """Read a 3D image file into a :class:`Volume` (LPS, ``(z, y, x)``).

    Raises:
        InputError: unreadable/truncated file, not 3D (a 4D NIfTI), or NaN/inf intensities.
    """
    import SimpleITK as sitk

    p = Path(path)
    try:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(p))
        reader.ReadImageInformation()
        dim = reader.GetDimension()
        size = reader.GetSize()
        if dim == 4 and size[3] == 1:
            pass  # a singleton 4th axis is squeezed below
        elif dim != 3:
            raise InputError(
                f"{p}: image is {dim}D with size {size}; a 3D volume is needed "
                "(split a 4D series into its 3D volumes first)"
            )
        img = reader.Execute()
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        msg = next((ln for ln in first if "rror" in ln), first[-1] if first else "")
        raise InputError(f"{p}: cannot read image (truncated or corrupt?): {msg.strip()}") from None
    nifti_labels: dict[int, str] | None = None
    if _fmt(p) == "nifti":
        hdr = _check_nifti_complete(p)  # ITK pads a truncated NIfTI with zeros silently
        nifti_labels = _nifti_label_table(hdr)
    if img.GetDimension() == 4:
        img = img[:, :, :, 0]
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{p}: multi-component (RGB/vector) images are not supported")
    meta: dict[str, object] = {"source": str(p), "format": _fmt(p)}
    for key in reader.GetMetaDataKeys():
        if key == _LABEL_KEY:
            with contextlib.suppress(ValueError, AttributeError):
                meta["labels"] = {int(k): v for k, v in json.loads(reader.GetMetaData(key)).items()}
    if nifti_labels:
        meta["labels"] = nifti_labels
    vol = Volume.from_sitk(img, meta)
    if vol.array.dtype.kind == "f" and not np.all(np.isfinite(vol.array)):
        n = int(np.size(vol.array) - np.count_nonzero(np.isfinite(vol.array)))
        raise InputError(f"{p}: {n} voxels are NaN or infinite; fix or mask the image first")
    return vol


def write_image(vol: Volume, path: str | os.PathLike[str]) -> None:
    """Write ``vol`` to ``path`` (format from the suffix). Not atomic: callers use
    :func:`medseg.io.files.atomic_path`."""
    import SimpleITK as sitk

    img = vol.to_sitk()
    if isinstance(vol, LabelMap) and vol.labels:
        img.SetMetaData(_LABEL_KEY, json.dumps({str(k): v for k, v in vol.labels.items()}))
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(path))
    writer.SetUseCompression(True)
    writer.Execute(img)
    if isinstance(vol, LabelMap) and vol.labels and _fmt(Path(path)) == "nifti":
        _add_nifti_label_table(Path(path), vol.labels)


def _check_nifti_complete(p: Path) -> Any:
    """Raise :class:`InputError` when a NIfTI file holds fewer voxel bytes than its header says;
    return the nibabel header otherwise."""
    import gzip
    import zlib

    import nibabel as nib

    try:
        nimg = nib.load(str(p))
        hdr = nimg.header
        offset = int(getattr(nimg.dataobj, "offset", 0) or hdr.get_data_offset())
        need = offset + int(np.prod(hdr.get_data_shape())) * int(hdr.get_data_dtype().itemsize)
    except Exception as exc:
        raise InputError(f"{p}: cannot read the NIfTI header: {str(exc)[:200]}") from None
    have = 0
    if p.name.lower().endswith(".gz"):
        try:
            with gzip.open(p, "rb") as fh:
                while chunk := fh.read(1 << 16):
                    have += len(chunk)
        except (EOFError, OSError, zlib.error):
            raise InputError(
                f"{p}: the compressed file is truncated or corrupt (stream ends after {have} "
                f"of {need} bytes); re-export or re-copy it"
            ) from None
    else:
        have = p.stat().st_size
    if have < need:
        raise InputError(
            f"{p}: file is truncated ({have} of {need} bytes); re-export or re-copy it"
        )
    return hdr


#: NIfTI extension code 6 ("comment") carries ``{"medseg_labels": {...}}`` (NIfTI has no free keys).
_NIFTI_COMMENT = 6


def _nifti_label_table(hdr: Any) -> dict[int, str] | None:
    for ext in getattr(hdr, "extensions", []):
        if ext.get_code() != _NIFTI_COMMENT:
            continue
        content = ext.get_content()
        raw = content if isinstance(content, bytes) else str(content).encode()
        try:
            table = json.loads(raw.rstrip(b"\x00").decode("utf-8"))[_LABEL_KEY]
            return {int(k): str(v) for k, v in table.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return None


def _add_nifti_label_table(path: Path, labels: dict[int, str]) -> None:
    """Re-save a just-written NIfTI with the label table as a comment extension (same affine)."""
    import nibabel as nib

    img = nib.load(str(path), mmap=False)
    data = np.array(img.dataobj)  # a copy in memory before the file is replaced
    hdr = img.header.copy()
    payload = json.dumps({_LABEL_KEY: {str(k): v for k, v in labels.items()}}).encode()
    hdr.extensions.append(nib.nifti1.Nifti1Extension(_NIFTI_COMMENT, payload))
    out = nib.Nifti1Image(data, img.affine, header=hdr)
    out.set_qform(img.get_qform(), int(hdr["qform_code"]))
    out.set_sform(img.get_sform(), int(hdr["sform_code"]))
    nib.save(out, str(path))


def _fmt(p: Path) -> str:
    n = p.name.lower()
    if n.endswith((".nii", ".nii.gz")):
        return "nifti"
    if n.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    return "metaimage"
