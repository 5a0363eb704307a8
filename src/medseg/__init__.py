"""medseg: 3D medical image segmentation (MONAI U-Net and promptable SAM-Med models).

The Python front door::

    import medseg
    img = medseg.read_volume("study/")                  # DICOM folder, NIfTI, NRRD, MHA
    gt = medseg.read_labels("gt.nii.gz", reference=img)
    seg = medseg.segment(img, model="litemedsam", prompts=medseg.box_from_gt(gt, label=1))
    rows = medseg.evaluate(seg.labels, gt)
    seg.save("pred.nii.gz", report="pred.json")

Importing this package is cheap: it pulls in numpy only. Every name below is loaded on first use
(PEP 562); torch, monai, SimpleITK, pydicom and napari are imported by the modules that need them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from medseg.errors import MedsegError
from medseg.volume import LabelMap, Volume

__version__ = "0.1.0"

#: public name -> module that defines it (loaded lazily)
_LAZY = {
    "segment": "medseg.pipeline",
    "Segmentation": "medseg.pipeline",
    "read_volume": "medseg.pipeline",
    "read_labels": "medseg.pipeline",
    "write_labels": "medseg.pipeline",
    "evaluate": "medseg.pipeline",
    "Box": "medseg.prompts",
    "Point": "medseg.prompts",
    "MaskPrompt": "medseg.prompts",
    "box_from_gt": "medseg.prompts",
    "load_prompts": "medseg.prompts",
    "validate_report": "medseg.report",
    "export": "medseg.exports",
    "finetune": "medseg.train.decoder",
    "batch": "medseg.batches",
    "rank": "medseg.active",
    "InteractiveSession": "medseg.interactive",
    "simulate_interaction": "medseg.protocol",
    "InteractionResult": "medseg.protocol",
}

__all__ = ["LabelMap", "MedsegError", "Volume", "__version__", *sorted(_LAZY)]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from medseg.active import rank as rank
    from medseg.batches import batch as batch
    from medseg.exports import export as export
    from medseg.interactive import InteractiveSession as InteractiveSession
    from medseg.pipeline import Segmentation as Segmentation
    from medseg.pipeline import evaluate as evaluate
    from medseg.pipeline import read_labels as read_labels
    from medseg.pipeline import read_volume as read_volume
    from medseg.pipeline import segment as segment
    from medseg.pipeline import write_labels as write_labels
    from medseg.prompts import Box as Box
    from medseg.prompts import MaskPrompt as MaskPrompt
    from medseg.prompts import Point as Point
    from medseg.prompts import box_from_gt as box_from_gt
    from medseg.prompts import load_prompts as load_prompts
    from medseg.protocol import InteractionResult as InteractionResult
    from medseg.protocol import simulate_interaction as simulate_interaction
    from medseg.report import validate_report as validate_report
    from medseg.train.decoder import finetune as finetune


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'medseg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
