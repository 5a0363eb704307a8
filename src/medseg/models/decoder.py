"""Fine-tuned SAM-Med mask decoders: the file format, its checks, and applying one to a model.

A decoder file (``torch.save`` of plain data, read with ``weights_only=True``) holds only what
fine-tuning trained — the ``mask_decoder.*`` weights — plus what is needed to use it safely:

``{"format": "medseg-sam-decoder", "version": 1, "state_dict": {name: tensor},
"base": {"model", "weights_sha256", "arch_sha256", "encoder", "input_size"},
"preprocessing": {"window", "intensity", "input_size", "normalisation"},
"label": {"value", "name"}, "training": {...}}``

The base's *architecture* is identified by :func:`arch_digest` (every parameter name and shape of
the whole model), its *weights* by the checkpoint's SHA-256. A decoder is refused (one-line
:class:`~medseg.errors.WeightsError`) on a model that differs in either, because the decoder was
trained on that exact encoder's embeddings.

Applying a decoder never changes a shared model: :func:`with_decoder` returns a new
:class:`~medseg.models.sam.SamModel` that shares the (frozen) image and prompt encoders with the
base and owns a copy of the mask decoder. Its image embeddings are the base's, so the embedding
cache (keyed by model name, weights digest, precision, ...) is shared; its masks differ.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.errors import WeightsError

if TYPE_CHECKING:
    import torch

    from medseg.models.sam import SamModel

DECODER_FORMAT = "medseg-sam-decoder"
DECODER_VERSION = 1
PREFIX = "mask_decoder."


@dataclass
class DecoderInfo:
    """A decoder file's content.

    Attributes:
        path: the file.
        sha256: SHA-256 of the file.
        state_dict: mask-decoder weights (keys without the ``mask_decoder.`` prefix).
        base: ``{"model", "weights_sha256", "arch_sha256", "encoder", "input_size"}``.
        preprocessing: ``{"window", "intensity", "input_size", "normalisation"}``.
        label: ``{"value", "name"}`` of the structure trained.
        training: provenance (data, split, epochs, seed, metrics, ...).
    """

    path: Path
    sha256: str
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    base: dict[str, Any]
    preprocessing: dict[str, Any]
    label: dict[str, Any]
    training: dict[str, Any] = field(repr=False)

    @property
    def window(self) -> str | None:
        """The intensity window the decoder was trained with (``None``: the modality default)."""
        return self.preprocessing.get("window")


def arch_digest(model: Any) -> str:
    """SHA-256 of every ``name:shape`` in ``model.state_dict()`` (identifies the architecture)."""
    lines = [f"{k}:{tuple(v.shape)}" for k, v in sorted(model.state_dict().items())]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _sha256(path: Path) -> str:
    from medseg.models.weights import sha256_file

    return sha256_file(path)


def decoder_state(model: Any) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``model.mask_decoder``'s weights (``model`` may be the decoder)."""
    dec = getattr(model, "mask_decoder", model)
    return {k: v.detach().cpu().clone() for k, v in dec.state_dict().items()}


def base_info(model: SamModel) -> dict[str, Any]:
    """The ``base`` entry of a decoder file for ``model``.

    Raises:
        WeightsError: the model has no weights digest (random weights, not loaded from a file).
    """
    if model.weights_sha256 is None:
        raise WeightsError(
            f"{model.spec.name}: the base model has no weights file; load it from a checkpoint "
            "before fine-tuning its decoder"
        )
    return {
        "model": model.spec.name,
        "weights_sha256": model.weights_sha256,
        "arch_sha256": arch_digest(model),
        "encoder": model.spec.encoder,
        "input_size": int(model.spec.input_size),
    }


def save_decoder(
    path: str | os.PathLike[str],
    model: SamModel,
    state: Mapping[str, torch.Tensor],
    *,
    window: str | None,
    intensity: str | None,
    label: Mapping[str, Any],
    training: Mapping[str, Any],
    inputs: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> tuple[Path, str]:
    """Write a decoder file atomically.

    Args:
        path: output file (``.pt``).
        model: the base model (its name, weights digest and architecture are recorded).
        state: mask-decoder weights (keys without prefix).
        window: the ``window`` the decoder was trained with (``None``: modality default).
        intensity: the resolved intensity key of the training data (informative).
        label: ``{"value": int, "name": str}``.
        training: provenance (plain JSON-like data).
        inputs: paths that must not be overwritten.
        overwrite: replace an existing file.

    Returns:
        ``(path, sha256)`` of the written file.

    Raises:
        OutputError: the path is an input, exists without ``overwrite`` or is not writable.
        WeightsError: the base model has no weights digest.
    """
    import torch

    from medseg.io.files import atomic_path, check_output_path

    out = check_output_path(path, list(inputs), overwrite=overwrite)
    payload = {
        "format": DECODER_FORMAT,
        "version": DECODER_VERSION,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state.items()},
        "base": base_info(model),
        "preprocessing": {
            "window": window,
            "intensity": intensity,
            "input_size": int(model.spec.input_size),
            "normalisation": model.spec.normalisation,
        },
        "label": {"value": int(label["value"]), "name": str(label["name"])},
        "training": _plain(dict(training)),
    }
    with atomic_path(out) as tmp:
        torch.save(payload, tmp)
    return out, _sha256(out)


def _plain(obj: Any) -> Any:
    """JSON-like copy (dict/list/str/int/float/bool/None) that ``weights_only`` loading accepts."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return float(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def read_decoder(path: str | os.PathLike[str]) -> DecoderInfo:
    """Read and check a decoder file (``torch.load(weights_only=True)``).

    Raises:
        WeightsError: missing, unreadable or not a medseg decoder file.
    """

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: no such decoder file; give the .pt that medseg finetune wrote")
    from medseg.models.weights import load_torch_file

    obj = load_torch_file(p, "decoder file", "write it again with medseg finetune")
    if not isinstance(obj, dict) or obj.get("format") != DECODER_FORMAT:
        raise WeightsError(
            f"{p}: not a medseg decoder file (a full model checkpoint goes to --weights; a "
            "decoder comes from medseg finetune)"
        )
    if int(obj.get("version", 0)) > DECODER_VERSION:
        raise WeightsError(
            f"{p}: decoder file version {obj.get('version')} is newer than this medseg reads "
            f"({DECODER_VERSION}); update medseg"
        )
    state = obj.get("state_dict")
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{p}: the decoder file holds no weights; write it again")
    return DecoderInfo(
        path=p,
        sha256=_sha256(p),
        state_dict=state,
        base=dict(obj.get("base") or {}),
        preprocessing=dict(obj.get("preprocessing") or {}),
        label=dict(obj.get("label") or {}),
        training=dict(obj.get("training") or {}),
    )


def check_base(info: DecoderInfo, model: SamModel) -> None:
    """Refuse a decoder trained on another base model.

    Raises:
        WeightsError: other architecture, or other weights (SHA-256), than the decoder's base.
    """
    base = info.base
    arch = arch_digest(model)
    if base.get("arch_sha256") != arch:
        raise WeightsError(
            f"{info.path.name}: decoder was trained on {base.get('model')} "
            f"({base.get('encoder')}, input {base.get('input_size')}), another architecture than "
            f"{model.spec.name}; use --model {base.get('model')} with the weights it was trained on"
        )
    if base.get("weights_sha256") != model.weights_sha256:
        want = str(base.get("weights_sha256"))[:12]
        got = str(model.weights_sha256)[:12]
        raise WeightsError(
            f"{info.path.name}: decoder was trained on {base.get('model')} weights sha256 "
            f"{want}..., not these ({got}...); give the base weights it was trained on"
        )


def load_decoder(model: SamModel, path: str | os.PathLike[str] | DecoderInfo) -> str:
    """Load a decoder file into ``model.mask_decoder`` in place (after :func:`check_base`).

    Use :func:`with_decoder` for a model shared with other callers.

    Returns:
        The decoder file's SHA-256 (also set as ``model.decoder_sha256``; ``model.decoder_path``
        is the file).

    Raises:
        WeightsError: unreadable file, wrong base, or weights not matching the decoder.
    """
    from medseg.models.sam import load_state_strict

    info = path if isinstance(path, DecoderInfo) else read_decoder(path)
    check_base(info, model)
    load_state_strict(model.mask_decoder, info.state_dict, str(info.path))
    model.decoder_sha256 = info.sha256  # type: ignore[attr-defined]
    model.decoder_path = info.path  # type: ignore[attr-defined]
    return info.sha256


def decoder_view(base: SamModel, mask_decoder: Any | None = None) -> SamModel:
    """A model sharing ``base``'s image and prompt encoders with its own mask decoder.

    Args:
        base: a loaded model (left unchanged).
        mask_decoder: the decoder module to use (shared, e.g. one being trained); default: a
            deep copy of ``base.mask_decoder``.
    """
    from medseg.models.sam import SamModel

    dec = mask_decoder if mask_decoder is not None else copy.deepcopy(base.mask_decoder)
    view = SamModel(base.spec, base.image_encoder, base.prompt_encoder, dec)
    view.weights_sha256 = base.weights_sha256
    view.weights_path = base.weights_path
    view.precision = base.precision
    view.runtime = base.runtime
    view.ov_encoder = base.ov_encoder  # the encoder is shared, so is its OpenVINO form
    view.eval()
    return view


def with_decoder(base: SamModel, path: str | os.PathLike[str] | DecoderInfo) -> SamModel:
    """A new model: ``base``'s encoders (shared, unchanged) with the decoder file's weights.

    Raises:
        WeightsError: unreadable file or a decoder trained on another base model.
    """
    info = path if isinstance(path, DecoderInfo) else read_decoder(path)
    check_base(info, base)  # before copying anything
    view = decoder_view(base)
    load_decoder(view, info)
    return view
