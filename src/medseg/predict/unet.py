"""MONAI U-Net inference: checkpoint config, the shared preprocessing, sliding-window segmentation.

The preprocessing here is used **both** by training (:mod:`medseg.train.unet`) and by inference,
so a checkpoint is always applied exactly as it was trained:

1. *orientation*: the array is viewed in one convention, the closest axis-aligned LPS
   orientation (array ``x`` → patient left, ``y`` → posterior, ``z`` → superior) by permuting and
   flipping axes according to the direction matrix (no interpolation, undone exactly afterwards);
2. *intensity*: the checkpoint's mapping to ``[0, 1]`` from :mod:`medseg.intensity` (a CT window
   in HU, or MR percentiles of the whole volume);
3. *spacing*: separable linear resampling to the model's target spacing on the *model grid*,
   which shares voxel ``(0, 0, 0)`` with the image and has ``floor((n - 1) * s / t) + 1`` voxels
   per axis (``n`` voxels of spacing ``s``, target ``t``); labels use nearest neighbour.

Inference runs MONAI's ``sliding_window_inference`` (softmax, Gaussian or constant blending) on
the model grid, then maps the class probabilities back to the image's exact grid linearly, a few
slices at a time, and takes the argmax there. Peak memory is therefore the image, the output
label map, the model-grid probabilities (``C`` float32 copies of the *model* grid, usually much
smaller than the image) and a slab of slices.

Checkpoint format (one ``dict`` for ``torch.save``; loads with ``weights_only=True``):

* ``state_dict``: network weights;
* ``config``: ``{"arch", "arch_args", "labels" {"1": "liver", ...}, "target_spacing" (z, y, x),
  "patch_size" (z, y, x), "intensity", "modality", "orientation", "medseg_version", "format"}``;
* ``config_sha256``: SHA-256 of the canonical JSON of ``config`` (sorted keys, no spaces);
* ``history`` (per-epoch dicts), ``split`` (``{"train": [...], "val": [...]}`` case ids),
  ``epoch``, ``best_metric``, ``best_epoch``, ``optimizer`` (for resuming), ``seed``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import CheckpointConfigError, InputError, WeightsError
from medseg.volume import LabelMap, Volume

if TYPE_CHECKING:
    import torch

    from medseg.intensity import Intensity
    from medseg.progress import ProgressCallback

#: Name of the shipped demonstration model.
DEMO_NAME = "unet-demo"
#: Checkpoint format version (bump when the dict layout changes).
CHECKPOINT_FORMAT = 1
#: Architectures this module can build (``config["arch"]``).
ARCHS = ("monai.UNet",)
#: Orientation convention of the model grid (see module docstring).
ORIENTATION = "LPS-axis-aligned"
#: Output slices processed at a time when mapping probabilities back to the image grid.
_SLAB = 8


# --------------------------------------------------------------------------- config
def canonical_json(config: dict[str, Any]) -> str:
    """Canonical JSON text of a config (sorted keys, compact separators, ASCII)."""
    return json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def config_sha256(config: dict[str, Any]) -> str:
    """SHA-256 hex digest of :func:`canonical_json` of ``config``."""
    return hashlib.sha256(canonical_json(config).encode("ascii")).hexdigest()


def modality_family(modality: str | None) -> str:
    """``"CT"`` for CT-like names, ``"MR"`` for everything else (MRI, T1, T2, FLAIR, ADC ...)."""
    return "CT" if str(modality or "").strip().upper().startswith("CT") else "MR"


def intensity_config(modality: str, window: str | None = "abdomen") -> dict[str, Any]:
    """The intensity-preprocessing entry of a config, resolved through :mod:`medseg.intensity`.

    Args:
        modality: dataset modality; CT gets a window, anything else MR percentiles.
        window: CT window preset name or ``"LO,HI"`` (ignored for MR).
    """
    from medseg.intensity import MR_PERCENTILES, parse_window

    if modality_family(modality) == "CT":
        name, (lo, hi) = parse_window(window or "abdomen")
        return {"kind": "window", "name": name, "lo": float(lo), "hi": float(hi)}
    return {"kind": "percentile", "lo_pct": MR_PERCENTILES[0], "hi_pct": MR_PERCENTILES[1]}


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


def resolve_config_intensity(volume: Volume, config: dict[str, Any]) -> Intensity:
    """The :class:`~medseg.intensity.Intensity` a config prescribes for ``volume``.

    Raises:
        CheckpointConfigError: an intensity entry this version cannot reproduce.
    """
    from medseg.intensity import MR_PERCENTILES, resolve_intensity

    it = config.get("intensity") or {}
    if it.get("kind") == "window":
        return resolve_intensity(volume, f"{float(it['lo'])},{float(it['hi'])}")
    if it.get("kind") == "percentile" and (
        float(it.get("lo_pct", -1)),
        float(it.get("hi_pct", -1)),
    ) == tuple(float(p) for p in MR_PERCENTILES):
        return resolve_intensity(volume, "percentile")
    raise CheckpointConfigError(f"the checkpoint's intensity preprocessing {it!r} is not supported")


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Canonical:
    """Axis permutation + flips taking an array to the canonical orientation.

    ``canonical = flip(transpose(array, perm), flips)``; ``perm[new_axis] = old_axis``.
    """

    perm: tuple[int, int, int] = (0, 1, 2)
    flips: tuple[int, ...] = ()

    @classmethod
    def of(cls, direction: np.ndarray) -> Canonical:
        """From an ITK direction matrix (columns: LPS directions of index axes x, y, z)."""
        d = np.asarray(direction, dtype=float)
        perm = [0, 1, 2]
        flips: list[int] = []
        world_of = []
        for a in range(3):  # array axis a (0=z, 1=y, 2=x) -> ITK column 2 - a
            v = d[:, 2 - a]
            w = int(np.argmax(np.abs(v)))
            world_of.append((w, float(np.sign(v[w])) or 1.0))
        if sorted(w for w, _ in world_of) != [0, 1, 2]:  # degenerate (e.g. 45 degrees): keep
            return cls()
        for a, (w, _) in enumerate(world_of):
            perm[2 - w] = a
        for new in range(3):
            if world_of[perm[new]][1] < 0:
                flips.append(new)
        return cls(tuple(perm), tuple(flips))  # type: ignore[arg-type]

    def apply(self, array: np.ndarray) -> np.ndarray:
        """Canonical view of ``array`` (z, y, x) (no copy)."""
        out = np.transpose(array, self.perm)
        return np.flip(out, self.flips) if self.flips else out

    def undo(self, array: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`apply` (a view)."""
        out = np.flip(array, self.flips) if self.flips else array
        return np.transpose(out, np.argsort(self.perm))

    def spacing(self, spacing: tuple[float, float, float]) -> tuple[float, float, float]:
        """Spacing ``(z, y, x)`` of the canonical array."""
        return tuple(float(spacing[p]) for p in self.perm)  # type: ignore[return-value]


def model_grid_shape(
    shape: tuple[int, ...], spacing: tuple[float, ...], target: tuple[float, ...]
) -> tuple[int, int, int]:
    """Model-grid shape covering an image of ``shape``/``spacing`` at ``target`` spacing."""
    return tuple(  # type: ignore[return-value]
        int(np.floor((n - 1) * s / t + 1e-6)) + 1
        for n, s, t in zip(shape, spacing, target, strict=True)
    )


def _axis_weights(n_out: int, ratio: float, n_in: int) -> tuple[Any, Any, Any]:
    """Linear interpolation indices/weights: output ``k`` samples input position ``k * ratio``."""
    import torch

    pos = torch.clamp(torch.arange(n_out, dtype=torch.float64) * ratio, 0, n_in - 1)
    i0 = torch.floor(pos).long()
    i1 = torch.clamp(i0 + 1, max=n_in - 1)
    w = (pos - i0).float()
    return i0, i1, w


def _plane_grid(out_hw: tuple[int, int], ratios: tuple[float, float], in_hw: tuple[int, int]):
    """``grid_sample`` grid ``(1, H, W, 2)`` sampling input pixel ``(r * ratio_y, c * ratio_x)``
    at output pixel ``(r, c)`` (``align_corners=True`` normalisation, clamped to the border)."""
    import torch

    axes = []
    for n_out, ratio, n_in in zip(out_hw, ratios, in_hw, strict=True):
        pos = torch.clamp(torch.arange(n_out, dtype=torch.float64) * ratio, 0, n_in - 1)
        axes.append((pos / max(n_in - 1, 1) * 2 - 1).float() if n_in > 1 else pos.float() * 0)
    gy, gx = torch.meshgrid(axes[0], axes[1], indexing="ij")
    return torch.stack([gx, gy], dim=-1)[None]


def _argmax0(p: torch.Tensor) -> torch.Tensor:
    """``argmax`` over dim 0 as uint8 (first maximum wins, like ``torch.argmax``), written as
    an element-wise loop over classes: ``torch.argmax(dim=0)`` was ~10x slower here."""
    import torch

    best = p[0].clone()
    idx = torch.zeros(p.shape[1:], dtype=torch.uint8)
    for c in range(1, p.shape[0]):
        better = p[c] > best
        idx[better] = c
        torch.maximum(best, p[c], out=best)
    return idx


def _lerp(t: torch.Tensor, dim: int, n_out: int, ratio: float) -> torch.Tensor:
    """Linear resampling of ``t`` along ``dim`` to ``n_out`` samples at positions ``k * ratio``."""
    i0, i1, w = _axis_weights(n_out, ratio, t.shape[dim])
    shape = [1] * t.ndim
    shape[dim] = n_out
    w = w.reshape(shape)
    a = t.index_select(dim, i0)
    b = t.index_select(dim, i1)
    return a.mul_(1 - w).add_(b.mul_(w))


def resample_image(
    array: np.ndarray,
    spacing: tuple[float, float, float],
    target: tuple[float, float, float],
    intensity: Intensity | None = None,
    slab: int = 16,
) -> torch.Tensor:
    """Intensity-map then linearly resample an image to the model grid.

    Args:
        array: image ``(z, y, x)`` (any dtype; may be a non-contiguous view).
        spacing: its voxel size ``(z, y, x)`` mm.
        target: model spacing ``(z, y, x)`` mm.
        intensity: mapping to ``[0, 1]`` applied before interpolation (``None``: raw values).
        slab: output slices computed at a time (bounds the temporary memory).

    Returns:
        float32 tensor ``(Z, Y, X)`` of :func:`model_grid_shape`.
    """
    import torch

    out_shape = model_grid_shape(array.shape, spacing, target)
    rz, ry, rx = (t / s for t, s in zip(target, spacing, strict=True))
    out = torch.empty(out_shape, dtype=torch.float32)
    i0, i1, w = _axis_weights(out_shape[0], rz, array.shape[0])
    for k0 in range(0, out_shape[0], slab):
        k1 = min(k0 + slab, out_shape[0])
        need = np.unique(np.concatenate([i0[k0:k1].numpy(), i1[k0:k1].numpy()]))
        src = np.asarray(array[need], dtype=np.float32)
        if intensity is not None:
            src = intensity.apply(src)
        src_t = torch.from_numpy(np.ascontiguousarray(src))
        pos = {int(v): j for j, v in enumerate(need)}
        a = src_t[[pos[int(v)] for v in i0[k0:k1]]]
        b = src_t[[pos[int(v)] for v in i1[k0:k1]]]
        ww = w[k0:k1].reshape(-1, 1, 1)
        z = a.mul_(1 - ww).add_(b.mul_(ww))
        z = _lerp(z, 1, out_shape[1], ry)
        out[k0:k1] = _lerp(z, 2, out_shape[2], rx)
    return out


def resample_labels_nearest(
    array: np.ndarray, spacing: tuple[float, float, float], target: tuple[float, float, float]
) -> np.ndarray:
    """Nearest-neighbour resampling of a label array ``(z, y, x)`` to the model grid."""
    out_shape = model_grid_shape(array.shape, spacing, target)
    idx = [
        np.clip(np.rint(np.arange(n) * t / s).astype(np.int64), 0, m - 1)
        for n, t, s, m in zip(out_shape, target, spacing, array.shape, strict=True)
    ]
    return np.asarray(array)[np.ix_(*idx)]


def preprocess(volume: Volume, config: dict[str, Any]) -> tuple[torch.Tensor, Canonical]:
    """Volume → model-grid float32 tensor ``(Z, Y, X)`` in ``[0, 1]`` + the orientation used."""
    can = Canonical.of(volume.direction)
    arr = can.apply(volume.array)
    intensity = resolve_config_intensity(volume, config)
    target = tuple(float(s) for s in config["target_spacing"])
    return resample_image(arr, can.spacing(volume.spacing), target, intensity), can  # type: ignore[arg-type]


def preprocess_labels(labels: LabelMap, config: dict[str, Any]) -> np.ndarray:
    """Label map → model-grid label array (nearest neighbour, canonical orientation)."""
    can = Canonical.of(labels.direction)
    target = tuple(float(s) for s in config["target_spacing"])
    return resample_labels_nearest(can.apply(labels.array), can.spacing(labels.spacing), target)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- precision
def resolve_precision(requested: str = "auto") -> str:
    """``"bf16"`` or ``"fp32"``: ``auto`` picks bf16 only on CPUs with native bf16."""
    try:
        from medseg.models.accelerated import precision_for
    except ImportError:  # pragma: no cover - the fast module is optional
        req = str(requested).lower()
        if req in {"bf16", "bfloat16"}:
            return "bf16"
        if req in {"fp32", "float32"}:
            return "fp32"
        return "bf16" if _own_native_bf16() else "fp32"
    return precision_for(requested)


def _own_native_bf16() -> bool:  # pragma: no cover - used only without medseg.models.accelerated
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in text or "amx_bf16" in text


# --------------------------------------------------------------------------- checkpoint
def demo_model_path() -> Path:
    """Path of the shipped demonstration checkpoint (``medseg/assets/unet_demo.pt``)."""
    return Path(__file__).resolve().parent.parent / "assets" / "unet_demo.pt"


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint dict with ``weights_only=True`` and verify its config hash.

    Raises:
        WeightsError: missing/unreadable file or not a medseg U-Net checkpoint.
        CheckpointConfigError: the config does not match its recorded hash (tampered/corrupt).
    """
    import torch

    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"{p}: no such checkpoint file")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors, truncated files, non-tensor objects
        raise WeightsError(
            f"{p}: cannot load as a safe (weights_only) checkpoint: {str(exc).splitlines()[0]}"
        ) from None
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
    with atomic_path(p) as tmp:
        torch.save(ckpt, tmp)
    return p


# --------------------------------------------------------------------------- segmenter
@dataclass
class UNetSegmenter:
    """A loaded U-Net checkpoint ready to segment volumes.

    Attributes:
        network: the MONAI network (eval mode, CPU or the chosen device).
        config: the checkpoint config (see module docstring).
        source: where it was loaded from.
        precision: ``"bf16"`` or ``"fp32"`` (autocast on CPU).
        device: torch device string.
        info: the checkpoint's non-weight entries (history, split, best metric ...).
    """

    network: Any
    config: dict[str, Any]
    source: str = ""
    precision: str = "fp32"
    device: str = "cpu"
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        model: str | os.PathLike[str] = DEMO_NAME,
        labels: dict[int, str] | None = None,
        precision: str = "auto",
        device: str = "auto",
    ) -> UNetSegmenter:
        """Load ``"unet-demo"`` or a checkpoint path.

        Args:
            model: ``"unet-demo"`` or a ``.pt`` file from :func:`medseg.train.unet.train_unet`.
            labels: the label table the caller expects; refused unless it equals the checkpoint's.
            precision: ``auto`` | ``bf16`` | ``fp32``.
            device: ``auto`` | ``cpu`` | ``cuda``.

        Raises:
            WeightsError: missing/unreadable checkpoint, weights not matching the architecture.
            CheckpointConfigError: tampered config, unknown architecture, different label table.
        """
        import torch

        path = demo_model_path() if str(model) == DEMO_NAME else Path(model)
        if str(model) == DEMO_NAME and not path.is_file():
            raise WeightsError(f"the demo model is missing from the installation ({path})")
        ckpt = load_checkpoint(path)
        cfg = ckpt["config"]
        have = labels_of(cfg)
        if labels is not None:
            want = {int(k): str(v) for k, v in labels.items() if int(k) != 0}
            if want != have:
                raise CheckpointConfigError(
                    f"{path.name}: the checkpoint segments {_fmt_table(have)} but "
                    f"{_fmt_table(want)} was requested; use a model trained for those labels"
                )
        net = build_network(cfg)
        try:
            net.load_state_dict(ckpt["state_dict"], strict=True)
        except RuntimeError as exc:
            raise WeightsError(
                f"{path}: weights do not fit the architecture in its config: "
                f"{str(exc).splitlines()[0]}"
            ) from None
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        net = net.to(device).eval()
        prec = resolve_precision(precision)
        info = {k: v for k, v in ckpt.items() if k not in {"state_dict", "optimizer"}}
        return cls(
            network=net, config=cfg, source=str(path), precision=prec, device=device, info=info
        )

    @property
    def labels(self) -> dict[int, str]:
        """Label table ``{value: name}`` of the model's output."""
        return labels_of(self.config)

    def check_volume(self, volume: Volume) -> None:
        """Refuse a volume whose modality differs from the model's (when detectable).

        Raises:
            CheckpointConfigError: e.g. a CT model given an MR image.
        """
        from medseg.intensity import guess_modality

        have = modality_family(guess_modality(volume))
        want = modality_family(self.config.get("modality"))
        if have != want:
            raise CheckpointConfigError(
                f"this U-Net was trained on {want} but the image looks like {have} "
                f"(modality {volume.meta.get('modality') or 'guessed from intensities'}); "
                f"use a {have} model"
            )

    def segment(
        self,
        volume: Volume,
        overlap: float = 0.25,
        blend: str = "gaussian",
        progress: ProgressCallback | None = None,
        return_probabilities: bool = False,
        sw_batch_size: int = 2,
    ) -> LabelMap | tuple[LabelMap, np.ndarray]:
        """Segment a whole volume.

        Args:
            volume: the image (any grid, orientation and spacing).
            overlap: sliding-window overlap fraction in ``[0, 0.9]``.
            blend: ``"gaussian"`` or ``"constant"`` window blending.
            progress: ``progress(done, total)`` over windows + output slabs.
            return_probabilities: also return softmax probabilities on the image grid.
            sw_batch_size: windows per forward pass.

        Returns:
            A :class:`LabelMap` on ``volume``'s exact grid with the model's label table; with
            ``return_probabilities`` also a float32 array ``(C, z, y, x)`` (class 0 = background)
            that sums to 1 over ``C`` (costs ``C`` float32 copies of the image).

        Raises:
            InputError: bad overlap/blend. CheckpointConfigError: modality mismatch.
        """
        import torch
        from monai.inferers import sliding_window_inference

        if not 0.0 <= float(overlap) <= 0.9:
            raise InputError(f"overlap must be between 0 and 0.9, got {overlap}")
        if blend not in {"gaussian", "constant"}:
            raise InputError(f"blend must be gaussian or constant, got {blend!r}")
        self.check_volume(volume)
        cfg = self.config
        target = tuple(float(s) for s in cfg["target_spacing"])
        roi = tuple(int(p) for p in cfg["patch_size"])
        n_cls = int(cfg["arch_args"]["out_channels"])

        with torch.inference_mode():
            x, can = preprocess(volume, cfg)
            grid = tuple(x.shape)
            n_win = _count_windows(grid, roi, overlap)
            can_shape = tuple(can.apply(volume.array).shape)
            n_slab = -(-can_shape[0] // _SLAB)
            total = n_win + n_slab
            done = [0]
            use_bf16 = self.precision == "bf16"
            dev_type = "cuda" if str(self.device).startswith("cuda") else "cpu"

            def predictor(patch: torch.Tensor) -> torch.Tensor:
                with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=use_bf16):
                    logits = self.network(patch)
                out = torch.softmax(logits.float(), dim=1)
                done[0] = min(done[0] + patch.shape[0], n_win)
                if progress is not None:
                    progress(done[0], total)
                return out

            probs = sliding_window_inference(
                x[None, None].to(self.device),
                roi,
                sw_batch_size,
                predictor,
                overlap=overlap,
                mode=blend,
                sigma_scale=0.125,
                device="cpu",
            )
            del x
            probs = probs[0].float().cpu()  # (C, Z, Y, X) on the model grid
            ratios = [t / s for t, s in zip(target, can.spacing(volume.spacing), strict=True)]
            # model index = image index * image spacing / target spacing
            inv = [1.0 / r for r in ratios]
            out = np.empty(can_shape, dtype=np.uint8)
            prob_out = (
                np.empty((n_cls, *can_shape), dtype=np.float32) if return_probabilities else None
            )
            i0, i1, w = _axis_weights(can_shape[0], inv[0], grid[0])
            plane = _plane_grid(can_shape[1:], (inv[1], inv[2]), grid[1:])  # (1, H, W, 2)
            for s, k0 in enumerate(range(0, can_shape[0], _SLAB)):
                k1 = min(k0 + _SLAB, can_shape[0])
                ww = w[k0:k1].reshape(-1, 1, 1, 1)
                pz = probs[:, i0[k0:k1]].transpose(0, 1) * (1 - ww)  # (k, C, Hm, Wm)
                pz += probs[:, i1[k0:k1]].transpose(0, 1) * ww
                p = torch.nn.functional.grid_sample(
                    pz,
                    plane.expand(k1 - k0, -1, -1, -1),
                    mode="bilinear",
                    padding_mode="border",
                    align_corners=True,
                ).transpose(0, 1)  # (C, k, H, W)
                out[k0:k1] = _argmax0(p).numpy()
                if prob_out is not None:
                    prob_out[:, k0:k1] = p.numpy()
                if progress is not None:
                    progress(n_win + s + 1, total)
            del probs
        arr = np.ascontiguousarray(can.undo(out))
        lm = LabelMap.like(volume, arr, self.labels, model=Path(self.source).name)
        if prob_out is None:
            return lm
        prob = np.ascontiguousarray(np.stack([can.undo(prob_out[c]) for c in range(n_cls)]))
        return lm, prob


def _count_windows(grid: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """Number of sliding windows MONAI visits (same scan rule: interval = roi * (1 - overlap))."""
    n = 1
    for g, r in zip(grid, roi, strict=True):
        g = max(g, r)
        if g == r:
            continue
        step = max(int(r * (1 - overlap)), 1)
        n *= int(np.ceil((g - r) / step)) + 1
    return n


def _fmt_table(t: dict[int, str]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(t.items())) + "}"
