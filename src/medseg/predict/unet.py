"""MONAI U-Net inference: sliding-window segmentation of a whole volume.

A checkpoint (:mod:`medseg.models.unet`) is applied on the *model grid* its config prescribes,
reached with the preprocessing training used (:func:`medseg.preprocess.preprocess`: canonical
orientation, intensity mapping, linear resampling to the target spacing).

Inference runs MONAI's ``sliding_window_inference`` (softmax, Gaussian or constant blending) on
the model grid, then maps the class probabilities back to the image's exact grid linearly, a few
slices at a time, and takes the argmax there. Peak memory is therefore the image, the output
label map, the model-grid probabilities (``C`` float32 copies of the *model* grid, usually much
smaller than the image) and a slab of slices. Device and precision come from
:mod:`medseg.runtime`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import CheckpointConfigError, InputError, WeightsError
from medseg.models.unet import (
    DEMO_NAME,
    build_network,
    demo_model_path,
    labels_of,
    load_checkpoint,
)
from medseg.preprocess import axis_weights, modality_family, preprocess
from medseg.volume import LabelMap, Volume

if TYPE_CHECKING:
    import torch

    from medseg.progress import ProgressCallback

#: Output slices processed at a time when mapping probabilities back to the image grid.
_SLAB = 8


# --------------------------------------------------------------------------- probabilities
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


# --------------------------------------------------------------------------- segmenter
@dataclass
class UNetSegmenter:
    """A loaded U-Net checkpoint ready to segment volumes.

    Attributes:
        network: the MONAI network (eval mode, CPU or the chosen device).
        config: the checkpoint config (see :mod:`medseg.models.unet`).
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
            precision: ``auto`` | ``bf16`` | ``fp32`` (:func:`medseg.runtime.resolve_precision`).
            device: ``auto`` | ``cpu`` | ``cuda`` (:func:`medseg.runtime.resolve_device`).

        Raises:
            WeightsError: missing/unreadable checkpoint, weights not matching the architecture.
            CheckpointConfigError: tampered config, unknown architecture, different label table.
            InputError: unknown precision or device.
        """
        from medseg.runtime import resolve_device, resolve_precision

        path = demo_model_path() if str(model) == DEMO_NAME else Path(model)
        if str(model) == DEMO_NAME and not path.is_file():
            raise WeightsError(f"the demo model is missing from the installation ({path})")
        kept = _KEPT.get(_kept_key(path, precision, device))  # a batch worker's model
        cfg = kept.config if kept is not None else None
        if cfg is None:
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
        if kept is not None:
            return kept
        net = build_network(cfg)
        try:
            net.load_state_dict(ckpt["state_dict"], strict=True)
        except RuntimeError as exc:
            raise WeightsError(
                f"{path}: weights do not fit the architecture in its config: "
                f"{str(exc).splitlines()[0]}"
            ) from None
        dev = resolve_device(device)
        prec = resolve_precision(precision, dev)
        net = net.to(dev).eval()
        info = {k: v for k, v in ckpt.items() if k not in {"state_dict", "optimizer"}}
        return cls(
            network=net, config=cfg, source=str(path), precision=prec, device=str(dev), info=info
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

            def on_slab(s: int) -> None:
                if progress is not None:
                    progress(n_win + s + 1, total)

            out, prob_out = _to_image_grid(
                probs, can_shape, [1.0 / r for r in ratios], return_probabilities, on_slab
            )
            del probs
        arr = np.ascontiguousarray(can.undo(out))
        lm = LabelMap.like(volume, arr, self.labels, model=Path(self.source).name)
        if prob_out is None:
            return lm
        prob = np.ascontiguousarray(np.stack([can.undo(prob_out[c]) for c in range(n_cls)]))
        return lm, prob


def _to_image_grid(
    probs: torch.Tensor,
    shape: tuple[int, ...],
    inv: list[float],
    keep_probabilities: bool,
    on_slab: Callable[[int], None],
) -> tuple[np.ndarray, np.ndarray | None]:
    """Model-grid class probabilities back to the (canonical) image grid, a slab at a time.

    Args:
        probs: float32 ``(C, Z, Y, X)`` on the model grid.
        shape: canonical image shape ``(z, y, x)``.
        inv: per axis, model index per image index (image spacing / target spacing).
        keep_probabilities: also return the interpolated probabilities.
        on_slab: called with the slab number after each slab.

    Returns:
        uint8 argmax labels of ``shape`` and, if asked, float32 ``(C, *shape)`` probabilities
        (linear in ``z``, bilinear in-plane, clamped at the borders).
    """
    import torch

    grid = tuple(probs.shape[1:])
    out = np.empty(shape, dtype=np.uint8)
    prob_out = np.empty((probs.shape[0], *shape), dtype=np.float32) if keep_probabilities else None
    i0, i1, w = axis_weights(shape[0], inv[0], grid[0])
    plane = _plane_grid(shape[1:], (inv[1], inv[2]), grid[1:])  # (1, H, W, 2)
    for s, k0 in enumerate(range(0, shape[0], _SLAB)):
        k1 = min(k0 + _SLAB, shape[0])
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
        on_slab(s)
    return out, prob_out


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


#: U-Nets a batch worker keeps loaded (:func:`keep_loaded`), by checkpoint file and settings
_KEPT: dict[tuple[str, int, int, str, str], UNetSegmenter] = {}


def _kept_key(path: Path, precision: str, device: str) -> tuple[str, int, int, str, str]:
    """The checkpoint file (resolved path, size, mtime: a replaced file is another model) and the
    requested precision and device."""
    from medseg.models.weights import file_identity

    try:
        return (*file_identity(path), str(precision), str(device))
    except OSError:
        return (str(path), -1, -1, str(precision), str(device))


def keep_loaded(
    segmenter: UNetSegmenter, precision: str = "auto", device: str = "auto"
) -> UNetSegmenter:
    """Keep ``segmenter`` (loaded with these requested ``precision``/``device``) for this process:
    later :meth:`UNetSegmenter.load` calls for the same, unchanged checkpoint file return it
    instead of reading the file again (a batch worker loads its U-Net once). Returns it."""
    _KEPT[_kept_key(Path(segmenter.source), precision, device)] = segmenter
    return segmenter


def _fmt_table(t: dict[int, str]) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in sorted(t.items())) + "}"
