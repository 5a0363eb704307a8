"""napari writer: a Labels layer → NIfTI / NRRD / MHA on its source image's grid.

The grid comes from the layer's ``metadata`` (``spacing``, ``origin``, ``direction`` copied from
the image the labels were made on, or read with the label file), so the file opens aligned with the
image in napari, ITK-SNAP and 3D Slicer even when the image direction is not the identity. A layer
without that metadata is written with its ``scale``/``translate`` and an identity direction.

The write is atomic (:func:`medseg.io.write_labels`) and refuses to replace the image the labels
belong to or the file the layer was read from. A layer made by a medseg panel carries its run's
report (``metadata["medseg_report"]``); it is written beside the file (``x.nii.gz`` → ``x.json``)
so the label map keeps its provenance. napari's save dialog has already asked before
replacing any other existing file, so that is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medseg.errors import OutputError
from medseg.io.files import IMAGE_SUFFIXES, image_suffix


def _inputs(metadata: dict[str, Any]) -> list[str]:
    out = []
    for key in ("source", "image_source"):
        v = metadata.get(key)
        if v:
            out.append(str(v))
    return out


class _LayerView:
    """The attributes :func:`medseg._napari._layers.labelmap_from_layer` reads, from the
    ``(data, attributes)`` napari hands a writer."""

    def __init__(self, data: Any, attributes: dict[str, Any]) -> None:
        self.data = data
        self.name = attributes.get("name", "labels")
        self.metadata = attributes.get("metadata") or {}
        self.features = attributes.get("features")
        self.scale = attributes.get("scale", (1.0, 1.0, 1.0))
        self.translate = attributes.get("translate", (0.0, 0.0, 0.0))


def write_labels_layer(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write one Labels layer (napari single-layer writer).

    Args:
        path: output file; ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha`` (``.nii.gz`` is added when
            the name has no known suffix).
        data: the layer's ``(z, y, x)`` integer array.
        attributes: the layer's attributes (``metadata``, ``scale``, ``translate``, ``features``).

    Returns:
        ``[written path]``.

    Raises:
        OutputError: the path names the source image or the layer's own source file.
        InputError: the data are not a 3D non-negative integer volume.
    """
    from medseg._napari._layers import labelmap_from_layer
    from medseg.io import write_labels

    out = Path(path)
    if image_suffix(out) is None:
        out = out.with_name(out.name + ".nii.gz")
    md = attributes.get("metadata") or {}
    inputs = _inputs(md)
    for inp in inputs:
        if out.resolve() == Path(inp).resolve():
            raise OutputError(
                f"{out}: this is the layer's source file ({inp}); save the labels under another "
                "name"
            )
    lm = labelmap_from_layer(_LayerView(data, attributes))
    written = write_labels(lm, out, inputs=inputs, overwrite=True)
    report = md.get("medseg_report")
    if isinstance(report, dict):
        from medseg.io.files import write_json
        from medseg.report import report_path_for

        side = report_path_for(written)
        write_json(
            {**report, "outputs": {"labels": str(written), "report": str(side)}},
            side,
            inputs=inputs,
            overwrite=True,
        )
        return [str(written), str(side)]
    return [str(written)]


def write_dicom_seg_layer(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """Write one Labels layer as a DICOM-SEG referencing the DICOM series its image came from.

    The image must have been opened from a DICOM folder (its path is the layer's
    ``metadata["image_source"]``); a panel's report (``metadata["medseg_report"]``) travels inside.

    Raises:
        InputError: the image was not opened from DICOM.
        GeometryError: the labels are not on that series' grid.
    """
    from medseg._napari._layers import labelmap_from_layer
    from medseg.errors import InputError
    from medseg.exports import export

    md = attributes.get("metadata") or {}
    ref = md.get("image_source")
    if not ref or not (Path(ref).is_dir() or str(ref).lower().endswith(".dcm")):
        raise InputError(
            "a DICOM-SEG references the DICOM series its labels were drawn on; these labels "
            "belong to an image not opened from a DICOM folder - save as .nii.gz or .nrrd"
        )
    out = Path(path) if str(path).lower().endswith(".dcm") else Path(str(path) + ".dcm")
    lm = labelmap_from_layer(_LayerView(data, attributes))
    report = md.get("medseg_report") if isinstance(md.get("medseg_report"), dict) else None
    return [str(export(lm, ref, "dicom-seg", out, report=report, overwrite=True))]


#: Suffixes offered in napari's save dialog (the manifest lists the same).
WRITER_SUFFIXES = tuple(s for s in IMAGE_SUFFIXES if s not in (".nhdr", ".mhd"))
