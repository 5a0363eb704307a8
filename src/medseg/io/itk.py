"""NIfTI / NRRD / MHA through SimpleITK. SimpleITK converts NIfTI's RAS to LPS on read and back
on write (its qform/sform handling is what ITK-SNAP and 3D Slicer use), so this is the one place the
RAS⇄LPS flip happens for files."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
        msg = next((ln for ln in first if "ERROR" in ln or "rror" in ln), first[-1] if first else "")
        raise InputError(f"{p}: cannot read image (truncated or corrupt?): {msg.strip()}") from None
    if img.GetDimension() == 4:
        img = img[:, :, :, 0]
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{p}: multi-component (RGB/vector) images are not supported")
    meta: dict[str, object] = {"source": str(p), "format": _fmt(p)}
    for key in reader.GetMetaDataKeys():
        if key == _LABEL_KEY:
            try:
                meta["labels"] = {int(k): v for k, v in json.loads(reader.GetMetaData(key)).items()}
            except (ValueError, AttributeError):
                pass
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


def _fmt(p: Path) -> str:
    n = p.name.lower()
    if n.endswith((".nii", ".nii.gz")):
        return "nifti"
    if n.endswith((".nrrd", ".nhdr")):
        return "nrrd"
    return "metaimage"
