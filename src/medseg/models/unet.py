"""The U-Net checkpoint format and network factory (what a trained model *is*).

Checkpoint format (one ``dict`` for ``torch.save``; loads with ``weights_only=True``):

* ``state_dict``: network weights;
* ``config``: ``{"arch", "arch_args", "labels" {"1": "liver", ...}, "target_spacing" (z, y, x),
  "patch_size" (z, y, x), "intensity", "modality", "orientation", "medseg_version", "format"}``
  (see :func:`make_config`; the preprocessing it prescribes is :mod:`medseg.preprocess`);
* ``config_sha256``: SHA-256 of the canonical JSON of ``config`` (sorted keys, no spaces);
* ``history`` (per-epoch dicts), ``split`` (``{"train": [...], "val": [...]}`` case ids),
  ``epoch``, ``best_metric``, ``best_epoch``, ``optimizer`` (for resuming), ``seed``.

Training writes it (:mod:`medseg.train.unet`), inference reads it (:mod:`medseg.predict.unet`).
torch and MONAI are imported lazily.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import CheckpointConfigError, InputError, WeightsError
from medseg.preprocess import ORIENTATION, intensity_config, modality_family

if TYPE_CHECKING:
    import torch

#: Name of the shipped demonstration model.
DEMO_NAME = "unet-demo"
#: Checkpoint format version (bump when the dict layout changes).
CHECKPOINT_FORMAT = 1
#: Architectures this module can build (``config["arch"]``).
ARCHS = ("monai.UNet",)


# --------------------------------------------------------------------------- config
def canonical_json(config: dict[str, Any]) -> str:
    """Canonical JSON text of a config (sorted keys, compact separators, ASCII)."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_sha256(config: dict[str, Any]) -> str:
    """SHA-256 hex digest of :func:`canonical_json` of ``config``."""
    return hashlib.sha256(canonical_json(config).encode("ascii")).hexdigest()


def make_config(
    *,
    labels: dict[int, str],
    target_spacing: tuple[float, float, float],
    patch_size: tuple[int, int, int],
    channels: tuple[int, ...] = (16, 32, 64, 128),
    strides: tuple[int, ...] | None = None,
    num_res_units: int = 1,
    modality: str = "CT",
    window: str | None = "abdomen",
) -> dict[str, Any]:
    """Build a checkpoint config (only JSON primitives, so it hashes and loads safely).

    Args:
        labels: ``{value: name}`` without background; values must be ``1..C-1`` contiguous.
        target_spacing: model voxel size ``(z, y, x)`` mm.
        patch_size: training patch / inference window ``(z, y, x)`` voxels, each divisible by the
            product of ``strides``.
        channels: feature channels per U-Net level.
        strides: down-sampling strides between levels (default all 2).
        num_res_units: residual units per block (MONAI ``UNet``).
        modality: ``"CT"`` or an MR name.
        window: CT window for the intensity mapping.

    Raises:
        InputError: labels not contiguous from 1 or a patch not divisible by the strides.
    """
    from medseg import __version__

    vals = sorted(int(k) for k in labels)
    if vals != list(range(1, len(vals) + 1)):
        raise InputError(
            f"the label values must be 1..N without gaps for a U-Net, got {vals}; relabel first"
        )
    strides = tuple(strides) if strides is not None else (2,) * (len(channels) - 1)
    if len(strides) != len(channels) - 1:
        raise InputError("strides must have one entry fewer than channels")
    factor = int(np.prod(strides))
    patch = tuple(int(p) for p in patch_size)
    if len(patch) != 3 or any(p <= 0 or p % factor for p in patch):
        raise InputError(f"patch size {patch_size} must be 3 sizes divisible by {factor}")
    return {
        "format": CHECKPOINT_FORMAT,
        "arch": "monai.UNet",
        "arch_args": {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": len(vals) + 1,
            "channels": [int(c) for c in channels],
            "strides": [int(s) for s in strides],
            "num_res_units": int(num_res_units),
            "norm": "instance",
        },
        "labels": {str(k): str(labels[k]) for k in sorted(labels)},
        "target_spacing": [float(s) for s in target_spacing],
        "patch_size": list(patch),
        "intensity": intensity_config(modality, window),
        "modality": modality_family(modality),
        "orientation": ORIENTATION,
        "medseg_version": __version__,
    }


def build_network(config: dict[str, Any]) -> torch.nn.Module:
    """The network a config describes (weights uninitialised / random).

    Raises:
        CheckpointConfigError: unknown architecture or arguments MONAI rejects.
    """
    arch = config.get("arch")
    if arch not in ARCHS:
        raise CheckpointConfigError(
            f"unknown architecture {arch!r} in the checkpoint; "
            f"this medseg builds {', '.join(ARCHS)}"
        )
    from monai.networks.nets import UNet

    a = dict(config.get("arch_args") or {})
    try:
        return UNet(
            spatial_dims=int(a["spatial_dims"]),
            in_channels=int(a["in_channels"]),
            out_channels=int(a["out_channels"]),
            channels=tuple(int(c) for c in a["channels"]),
            strides=tuple(int(s) for s in a["strides"]),
            num_res_units=int(a.get("num_res_units", 0)),
            norm=a.get("norm", "instance"),
        )
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise CheckpointConfigError(
            f"the checkpoint's arch_args cannot build a U-Net: {exc}"
        ) from None


def labels_of(config: dict[str, Any]) -> dict[int, str]:
    """The config's label table as ``{int: name}``."""
    return {int(k): str(v) for k, v in config["labels"].items()}


# --------------------------------------------------------------------------- checkpoint
def demo_model_path() -> Path:
    """Path of the shipped demonstration checkpoint (``medseg/assets/unet_demo.pt``)."""
    from medseg.models.registry import unet_asset

    return unet_asset(DEMO_NAME)


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True`` and verify its config hash.

    Raises:
        WeightsError: missing/unreadable file or not a medseg U-Net checkpoint.
        CheckpointConfigError: the config does not match its recorded hash (tampered/corrupt).
    """

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: no such checkpoint file")
    from medseg.models.weights import load_torch_file

    ckpt = load_torch_file(p, "U-Net checkpoint", "train one with `medseg train-unet`")
    if not isinstance(ckpt, dict) or not {"state_dict", "config", "config_sha256"} <= set(ckpt):
        raise WeightsError(
            f"{p}: not a medseg U-Net checkpoint (needs state_dict, config, config_sha256); "
            "train one with `medseg train-unet`"
        )
    cfg = ckpt["config"]
    if not isinstance(cfg, dict) or config_sha256(cfg) != ckpt["config_sha256"]:
        raise CheckpointConfigError(
            f"{p}: the checkpoint's config does not match its recorded sha256 (edited or "
            "corrupted); refusing to run it - retrain or restore the original file"
        )
    if int(cfg.get("format", 0)) > CHECKPOINT_FORMAT:
        raise CheckpointConfigError(
            f"{p}: checkpoint format {cfg.get('format')} is newer than this medseg understands "
            f"({CHECKPOINT_FORMAT}); upgrade medseg"
        )
    if cfg.get("orientation", ORIENTATION) != ORIENTATION:
        raise CheckpointConfigError(
            f"{p}: unknown orientation convention {cfg.get('orientation')!r}"
        )
    return ckpt


def save_checkpoint(ckpt: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Save a checkpoint dict atomically (temp file beside ``path`` + rename)."""
    import torch

    from medseg.io.files import atomic_path

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(
        p, verify=lambda t: torch.load(t, map_location="cpu", weights_only=True)
    ) as tmp:
        torch.save(ckpt, tmp)
    return p
