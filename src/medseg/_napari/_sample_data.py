"""napari sample data: the synthetic phantom CT case and the real brain MR case (brain1).

Files are looked for in ``$MEDSEG_SAMPLE_DATA`` and in the repository's ``sample_data/`` folder
(an editable/source install). The phantom is regenerated (seed 0) when its files are absent; the
real case raises a clear error naming where it was looked for.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from medseg.errors import InputError


def sample_data_dirs() -> list[Path]:
    """Folders searched for sample data, first match wins."""
    out = []
    env = os.environ.get("MEDSEG_SAMPLE_DATA")
    if env:
        out.append(Path(env).expanduser())
    here = Path(__file__).resolve()
    out.append(here.parents[3] / "sample_data")  # <repo>/src/medseg/_napari/ -> <repo>
    return out


def _find(*rel: str) -> Path | None:
    for base in sample_data_dirs():
        cand = base.joinpath(*rel)
        if cand.exists():
            return cand
    return None


def _read_case(image: Path, label: Path, name: str) -> list[tuple[Any, dict, str]]:
    from medseg._napari._layers import image_layer_data, labels_layer_data
    from medseg.io import read_labels, read_volume

    vol = read_volume(image)
    lm = read_labels(label, reference=vol)
    if not lm.labels:
        lm.labels = {v: f"label_{v}" for v in lm.present()}
    img = image_layer_data(vol, name)
    lab = labels_layer_data(lm, f"{name} label", image_source=str(image))
    lab[1]["opacity"] = 0.5
    return [img, lab]


def phantom_sample() -> list[tuple[Any, dict, str]]:
    """The phantom CT case (``sample_data/phantom``, MSD layout) with its liver/tumour labels.

    Regenerated with :func:`medseg.phantom.make_phantom` (seed 0) when the files are absent.
    """
    image = _find("phantom", "imagesTr", "phantom_000.nii.gz")
    label = _find("phantom", "labelsTr", "phantom_000.nii.gz")
    if image is not None and label is not None:
        return _read_case(image, label, "phantom_000")
    from medseg._napari._layers import image_layer_data, labels_layer_data
    from medseg.phantom import make_phantom

    vol, lm = make_phantom(seed=0, shape=(40, 128, 128), spacing=(3.0, 1.2, 1.2))
    lab = labels_layer_data(lm, "phantom_000 label")
    lab[1]["opacity"] = 0.5
    return [image_layer_data(vol, "phantom_000"), lab]


def brain1_sample() -> list[tuple[Any, dict, str]]:
    """The real brain MR case (``sample_data/brain1``, pyradiomics test data) with its tumour label.

    Raises:
        InputError: the files are not found (the message lists the folders searched).
    """
    image = _find("brain1", "brain1_image.nrrd")
    label = _find("brain1", "brain1_label.nrrd")
    if image is None or label is None:
        where = ", ".join(str(d / "brain1") for d in sample_data_dirs())
        raise InputError(
            f"brain1 sample not found (looked in {where}); set MEDSEG_SAMPLE_DATA to the folder "
            "holding brain1/brain1_image.nrrd"
        )
    return _read_case(image, label, "brain1")
