"""SAM 2 / MedSAM2 networks, built with Meta's ``sam2`` package and loaded from user checkpoints.

The architecture comes from the configuration files shipped in the ``sam2`` package (Hydra,
``configs/sam2.1/*.yaml``); nothing of it is copied here. A checkpoint in the official layout
(``{"model": state_dict}``, as Meta and MedSAM2 save them) is read with ``weights_only=True``
through :func:`medseg.models.weights.load_torch_file` and loaded with strict keys: missing or
unexpected keys and shape mismatches are named in one :class:`~medseg.errors.WeightsError` line.

Installing ``sam2`` (no CUDA extension is needed; it only fills small holes in masks)::

    SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0

Importing this module does not import torch or sam2; :func:`build_sam2_model` does.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.errors import WeightsError
from medseg.models.registry import ModelSpec, get_sam2_spec

if TYPE_CHECKING:
    import torch

#: What to run when the ``sam2`` package is missing.
SAM2_INSTALL = "SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0"


def sam2_available() -> bool:
    """Whether the ``sam2`` package is installed (found, not imported)."""
    import importlib.util

    try:
        return importlib.util.find_spec("sam2") is not None
    except (ImportError, ValueError):
        return False


def require_sam2() -> None:
    """Raise one line saying how to install ``sam2`` when it is missing.

    Raises:
        WeightsError: ``sam2`` is not installed.
    """
    if not sam2_available():
        raise WeightsError(
            f"SAM 2 models need Meta's sam2 package, which is not installed: {SAM2_INSTALL}"
        )


def hydra_overrides(spec: ModelSpec, image_size: int | None = None) -> list[str]:
    """The Hydra overrides that turn ``spec``'s base configuration into the network to build.

    ``image_size`` (default ``spec.input_size``) replaces the input side; the memory attention's
    RoPE grid follows it (``image_size / 16``), as in MedSAM2's 512-pixel configuration. The
    post-processing options are those of ``sam2.build_sam.build_sam2_video_predictor``.
    """
    size = int(image_size or spec.input_size)
    if size % 64:
        raise WeightsError(f"SAM 2 image size must be a multiple of 64, got {size}")
    feat = size // 16
    out = [
        "++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor",
        f"++model.image_size={size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{feat},{feat}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{feat},{feat}]",
        # build_sam2_video_predictor(apply_postprocessing=True) defaults:
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
        "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
        "++model.binarize_mask_from_pts_for_mem_enc=true",
        # no hole filling: it needs the CUDA extension, which SAM2_BUILD_CUDA=0 leaves out
        "++model.fill_hole_area=0",
    ]
    out += [f"++model.{k}={v}" for k, v in spec.arch.get("overrides", {}).items()]
    return out


_BUILD_LOCK = threading.Lock()


def build_sam2_model(spec: ModelSpec | str, image_size: int | None = None) -> Any:
    """A ``sam2.sam2_video_predictor.SAM2VideoPredictor`` with random weights, in eval mode.

    Args:
        spec: a SAM 2 registry name or spec (``spec.arch["config"]`` names the ``sam2``
            configuration file).
        image_size: input side override (tests build hiera-tiny at 256).

    Raises:
        WeightsError: ``sam2`` is not installed.
    """
    require_sam2()
    spec = get_sam2_spec(spec)
    from hydra import compose
    from hydra.core.global_hydra import GlobalHydra
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    with _BUILD_LOCK:
        import sam2  # noqa: F401  (initialises Hydra's config module)

        if not GlobalHydra.instance().is_initialized():  # someone cleared it
            from hydra import initialize_config_module

            initialize_config_module("sam2", version_base="1.2")
        cfg = compose(config_name=spec.arch["config"], overrides=hydra_overrides(spec, image_size))
        OmegaConf.resolve(cfg)
        model = instantiate(cfg.model, _recursive_=True)
    model.eval()
    model.name = spec.name
    return model


def load_sam2_model(
    spec: ModelSpec | str,
    weights: str | os.PathLike[str] | None = None,
    *,
    device: str = "auto",
    precision: str = "auto",
    download: bool | None = None,
    image_size: int | None = None,
) -> Sam2Model:
    """Build ``spec``'s network and load its checkpoint (strict keys, ``weights_only``).

    Args:
        spec: registry name (``sam2.1_hiera_tiny``, ``sam2.1_hiera_small``,
            ``sam2.1_hiera_base_plus``, ``medsam2``) or spec.
        weights: checkpoint file or folder; else ``$MEDSEG_HOME/weights`` / verified download.
        device: ``'auto'`` | ``'cpu'`` | ``'cuda'``.
        precision: ``'auto'`` | ``'fp32'`` | ``'bf16'`` (autocast around the propagation).
        download: allow the download (default: ``MEDSEG_ALLOW_DOWNLOAD``).
        image_size: input side override (must match how the checkpoint was trained).

    Raises:
        WeightsError: ``sam2`` missing; no weights (one line naming the file and the folder);
            unreadable file; missing/unexpected keys or shape mismatches (named).
    """
    from medseg.models.sam import load_state_strict, read_checkpoint
    from medseg.models.weights import resolve_weights, sha256_file
    from medseg.runtime import resolve_device, resolve_precision

    spec = get_sam2_spec(spec)
    path = resolve_weights(spec, weights, download=download)
    require_sam2()
    digest = sha256_file(path)
    official_name = weights is None or Path(weights).name == spec.filename
    if spec.sha256 and official_name and digest != spec.sha256:
        raise WeightsError(
            f"{path}: weights for {spec.name!r} are corrupted: expected sha256 {spec.sha256}, "
            f"got {digest}; delete the file and fetch it again"
        )
    state = read_checkpoint(path)
    net = build_sam2_model(spec, image_size=image_size)
    load_state_strict(net, state, str(path))
    dev = resolve_device(device)
    net.to(dev)
    return Sam2Model(
        net=net,
        spec=spec,
        weights_path=Path(path),
        weights_sha256=digest,
        device=dev,
        precision=resolve_precision(precision, dev),
    )


class Sam2Model:
    """A loaded SAM 2 network with what the report needs about it.

    Attributes:
        net: the ``SAM2VideoPredictor`` (eval mode).
        spec: its registry entry.
        weights_path: checkpoint file (``None`` for random weights).
        weights_sha256: its digest (``None`` for random weights).
        device: where it runs.
        precision: ``"fp32"`` or ``"bf16"`` (autocast during propagation).
        lock: one propagation at a time per model (the decoder hook and autocast are per call).
    """

    def __init__(
        self,
        net: Any,
        spec: ModelSpec,
        weights_path: Path | None,
        weights_sha256: str | None,
        device: torch.device | str,
        precision: str,
    ) -> None:
        self.net = net
        self.spec = spec
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256
        self.device = device
        self.precision = precision
        self.lock = threading.RLock()

    @property
    def image_size(self) -> int:
        """The square input side the network was built for."""
        return int(self.net.image_size)

    def __repr__(self) -> str:
        return (
            f"Sam2Model({self.spec.name}, {self.image_size}px, {self.precision}, "
            f"{self.device}, weights={self.weights_path})"
        )


_MEMO: dict[tuple[Any, ...], Sam2Model] = {}
_MEMO_MAX = 2
_MEMO_LOCK = threading.Lock()


def get_sam2_model(
    spec: ModelSpec | str,
    weights: str | os.PathLike[str] | None = None,
    device: str = "auto",
    precision: str = "auto",
) -> Sam2Model:
    """:func:`load_sam2_model`, remembered per process (the two most recent), keyed by spec,
    resolved file (path, size, mtime), device and precision."""
    from medseg.models.weights import file_identity, resolve_weights
    from medseg.runtime import resolve_device, resolve_precision

    spec = get_sam2_spec(spec)
    path = resolve_weights(spec, weights)
    dev = resolve_device(device)
    key = (
        repr(spec),
        *file_identity(path),
        str(dev),
        resolve_precision(precision, dev),
    )
    with _MEMO_LOCK:
        hit = _MEMO.get(key)
        if hit is None:
            hit = load_sam2_model(spec, path, device=str(dev), precision=precision)
            _MEMO[key] = hit
            while len(_MEMO) > _MEMO_MAX:
                _MEMO.pop(next(iter(_MEMO)))
    return hit
