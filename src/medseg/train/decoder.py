"""Fine-tune a SAM-Med mask decoder on a labelled dataset, image encoder frozen.

What is trained: the **mask decoder** only (two-way transformer, upscaling, mask hypernetworks and
the IoU head). The image encoder is frozen (eval mode, ``requires_grad=False``, run under
``inference_mode``) and so is the **prompt encoder**: its box/point/mask embeddings describe
geometry, not the structure, and they are what the pretrained decoder already reads; keeping them
fixed keeps the saved decoder interchangeable with the base's prompt handling (the same prompts,
the same tokens) and the file small.

Because the encoder is frozen, every training slice is embedded once through the embedding cache
interactive use fills (:class:`~medseg.predict.sam.VolumePredictor`, memory LRU + disk, keyed by
volume content + model + weights + axis + intensity + precision); every epoch then runs the
prompt encoder + mask decoder on cached embeddings.

Prompts are simulated from the labels the way the project prompts at inference (all
single-mask, as :func:`medseg.predict.propagate.propagate` asks): a box around the slice's object
with random jitter (the interactive / oracle box), the propagation carry-over (a box around the
*neighbouring* slice's object grown by 10 % + 2 px, with its interior point and sometimes its
mask as mask logits), and boxes with positive/negative clicks. The prompt of a sample depends only
on ``(seed, epoch, sample)``, so one process and several (``torchrun``) see the same data.

Loss: soft Dice + BCE on the 256x256 low-res logits against the object in the model frame, plus
the MSE between the IoU head's prediction and the mask's true IoU (so predicted IoU stays
meaningful for propagation's stop rule and review list).

Validation runs on held-out *volumes* (never slices of training volumes): the per-slice box Dice
(a box from the ground truth on every object slice, :func:`~medseg.predict.propagate.oracle_dice`)
and the 3D Dice of the real propagation from one box on the largest slice. Epoch 0 is the
zero-shot base decoder; the best epoch by box Dice is saved. ``torchrun``: one process per
rank, DistributedDataParallel (gloo on CPU, nccl on GPU), the global batch split over ranks.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import Cancelled, InputError

if TYPE_CHECKING:
    import torch

    from medseg.models.registry import ModelSpec
    from medseg.models.sam import SamModel
    from medseg.predict.sam import VolumePredictor
    from medseg.progress import ProgressCallback

PathLike = str | os.PathLike[str]
CancelToken = Callable[[], bool] | threading.Event

CHECKPOINT_FORMAT = "medseg-finetune-checkpoint"
#: Fraction of the volumes held out when ``val_fraction`` is not given (and there are >= 2).
DEFAULT_VAL_FRACTION = 0.2


@dataclass
class FinetuneResult:
    """What :func:`finetune` produced.

    Attributes:
        path: the decoder file (best epoch).
        sha256: its SHA-256.
        best_epoch: the epoch saved (0 = the base decoder: training did not beat zero-shot).
        history: one row per epoch (epoch 0 = zero-shot validation): ``epoch``, ``train_loss``,
            ``val_box_dice``, ``val_dice_3d``, ``seconds``.
        checkpoint: the resumable checkpoint (model, optimizer, position).
        curve_json: the training curve as JSON.
        curve_png: the curve as PNG (``None`` without matplotlib).
        train_cases / val_cases: case ids of the split.
        train_slices: number of distinct training slices.
        encoder_calls: slices run through the image encoder in this run (cache misses).
        state: the saved decoder weights (under ``torchrun`` every rank returns its replica;
            only rank 0 writes files and has ``sha256``).
    """

    path: Path
    sha256: str
    best_epoch: int
    history: list[dict[str, Any]]
    checkpoint: Path
    curve_json: Path
    curve_png: Path | None
    train_cases: list[str]
    val_cases: list[str]
    train_slices: int
    encoder_calls: int
    state: dict[str, Any] = field(default_factory=dict, repr=False)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def baseline(self) -> dict[str, Any] | None:
        """The zero-shot validation row (epoch 0), if validation ran."""
        return self.history[0] if self.history and self.history[0]["epoch"] == 0 else None

    @property
    def best(self) -> dict[str, Any] | None:
        """The history row of the saved epoch."""
        return next((r for r in self.history if r["epoch"] == self.best_epoch), None)


@dataclass
class _Sample:
    case: int  # index into the training predictors
    index: int  # slice index along the axis
    gt: np.ndarray  # (H, W) bool
    prev: list[np.ndarray]  # non-empty neighbouring GT slices (H, W) bool


# --------------------------------------------------------------------------- helpers
def resume_path_for(out: PathLike) -> Path:
    """The resumable checkpoint beside a decoder file: ``D.pt`` → ``D.resume.pt``."""
    o = Path(out)
    return o.with_name(o.stem + ".resume.pt")


def curve_paths_for(out: PathLike) -> tuple[Path, Path]:
    """``(D.curve.json, D.curve.png)`` beside a decoder file ``D.pt``."""
    o = Path(out)
    return o.with_name(o.stem + ".curve.json"), o.with_name(o.stem + ".curve.png")


def resolve_label(label: int | str, table: dict[int, str]) -> tuple[int, str]:
    """``label`` (a value or a name from ``table``) → ``(value, name)``.

    Raises:
        InputError: unknown name, or a value that is not a positive integer.
    """
    text = str(label).strip()
    if text.lstrip("-").isdigit():
        value = int(text)
        if value <= 0:
            raise InputError(f"--label {label}: give a positive label value or a label name")
        return value, table.get(value, "object")
    for v, n in table.items():
        if n.lower() == text.lower():
            return int(v), n
    known = ", ".join(f"{v}={n}" for v, n in sorted(table.items())) or "none named"
    raise InputError(f"label {label!r} is not in the dataset's label table ({known})")


def split_cases(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Split ``n`` volumes into ``(train, val)`` indices (seeded; whole volumes only).

    Raises:
        InputError: a fraction outside ``[0, 1)`` or too few volumes for it.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise InputError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return list(range(n)), []
    if n < 2:
        raise InputError(
            f"validation needs held-out volumes but the dataset has {n}; add volumes (e.g. "
            "slabs of the volume saved as separate cases) or use val_fraction 0"
        )
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    order = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in order[n_val:]), sorted(int(i) for i in order[:n_val])


def window_of(intensity: Any) -> str:
    """The ``window`` string that reproduces an intensity mapping: ``"LO,HI"`` for a CT window,
    ``"percentile"`` for the percentile mapping (saved with a decoder so that segmenting with it
    maps intensities the way training did, whatever the image's modality tag says)."""
    name = str(intensity.name)
    if name.startswith("percentile"):
        return "percentile"
    if name.startswith("window:"):
        return name.split(":", 1)[1]  # a preset name or "LO,HI", as resolve_intensity named it
    return f"{float(intensity.lo):g},{float(intensity.hi):g}"


def _dist_info() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (``(0, 1, 0)`` without)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def _is_cancelled(cancel: CancelToken | None) -> bool:
    if cancel is None:
        return False
    return cancel.is_set() if isinstance(cancel, threading.Event) else bool(cancel())


# --------------------------------------------------------------------------- prompts
def simulate_prompt(
    sample: _Sample, shape: tuple[int, int], rng: np.random.Generator
) -> dict[str, Any]:
    """One prompt for a training slice, as the project prompts at inference.

    Returns:
        ``{"kind", "box_rc", "points_rc", "point_labels", "mask"}`` in slice pixels
        (``mask``: a neighbouring slice's object to pass as mask logits, or ``None``).
    """
    from medseg.predict.propagate import expand_box, interior_point, largest_component, mask_box

    h, w = shape
    gt = sample.gt
    bbox = mask_box(gt)
    assert bbox is not None
    u = rng.random()
    out: dict[str, Any] = {"points_rc": None, "point_labels": None, "mask": None}
    if u < 0.3 and sample.prev:  # the propagation carry-over from a neighbouring slice
        prev = sample.prev[int(rng.integers(len(sample.prev)))]
        pb = mask_box(prev)
        assert pb is not None
        out["kind"] = "carry"
        out["box_rc"] = expand_box(pb, shape, 0.1, 2.0)
        if rng.random() < 0.5:
            out["points_rc"] = np.asarray([interior_point(largest_component(prev))])
            out["point_labels"] = np.asarray([1])
        if rng.random() < 0.3:
            out["mask"] = prev
        return out
    # a box around this slice's object: the interactive / oracle box, jittered
    r0, c0, r1, c1 = (float(v) for v in bbox)
    hh, ww = r1 - r0 + 1, c1 - c0 + 1
    jit = rng.uniform(-0.1, 0.15, 4) * np.array([hh, ww, hh, ww]) + rng.uniform(0, 5, 4)
    box = [r0 - jit[0], c0 - jit[1], r1 + jit[2], c1 + jit[3]]
    box = [
        float(np.clip(box[0], 0, h - 1)),
        float(np.clip(box[1], 0, w - 1)),
        float(np.clip(box[2], 0, h - 1)),
        float(np.clip(box[3], 0, w - 1)),
    ]
    if box[2] <= box[0]:
        box[2] = min(h - 1.0, box[0] + 1)
    if box[3] <= box[1]:
        box[3] = min(w - 1.0, box[1] + 1)
    out["kind"] = "box"
    out["box_rc"] = tuple(box)
    if u > 0.7:  # clicks inside the box: positives in the object, maybe a negative outside it
        ys, xs = np.nonzero(gt)
        k = int(rng.integers(1, 3))
        pick = rng.integers(len(ys), size=k)
        pts = [(float(ys[i]), float(xs[i])) for i in pick]
        labels = [1] * k
        rr0, cc0, rr1, cc1 = (round(v) for v in box)
        window = ~gt[rr0 : rr1 + 1, cc0 : cc1 + 1]
        if rng.random() < 0.5 and window.any():
            ny, nx = np.nonzero(window)
            j = int(rng.integers(len(ny)))
            pts.append((float(ny[j] + rr0), float(nx[j] + cc0)))
            labels.append(0)
        out["kind"] = "box+points"
        out["points_rc"] = np.asarray(pts)
        out["point_labels"] = np.asarray(labels)
    return out


# --------------------------------------------------------------------------- loss
def decoder_loss(
    low_logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Soft Dice + BCE on low-res logits plus the IoU-head regression.

    Args:
        low_logits: ``(B, 1, L, L)`` decoder logits.
        iou_pred: ``(B, 1)`` predicted IoU.
        target: ``(B, 1, L, L)`` float {0, 1}.

    Returns:
        ``(mean loss over the batch, {"dice", "bce", "iou"} parts)``.
    """
    import torch
    import torch.nn.functional as F

    prob = torch.sigmoid(low_logits)
    dims = (1, 2, 3)
    inter = (prob * target).sum(dims)
    dice = 1.0 - (2 * inter + 1.0) / (prob.sum(dims) + target.sum(dims) + 1.0)
    bce = F.binary_cross_entropy_with_logits(low_logits, target, reduction="none").mean(dims)
    with torch.no_grad():
        hard = (low_logits > 0).float()
        i = (hard * target).sum(dims)
        un = ((hard + target) > 0).float().sum(dims)
        true_iou = torch.where(un > 0, i / un.clamp(min=1), torch.ones_like(un))
    iou_loss = (iou_pred[:, 0] - true_iou) ** 2
    loss = (dice + bce + iou_loss).mean()
    parts = {
        "dice": float(dice.detach().mean()),
        "bce": float(bce.detach().mean()),
        "iou": float(iou_loss.detach().mean()),
    }
    return loss, parts


# --------------------------------------------------------------------------- trainer
class _Trainer:
    """State of one fine-tuning run (built by :func:`finetune`)."""

    def __init__(
        self,
        base: SamModel,
        predictors: list[VolumePredictor],
        samples: list[_Sample],
        *,
        lr: float,
        weight_decay: float,
        batch_size: int,
        seed: int,
        rank: int,
        world: int,
        device: torch.device,
    ) -> None:
        import torch

        from medseg.models.decoder import decoder_view

        self.base = base
        self.predictors = predictors
        self.samples = samples
        self.seed = int(seed)
        self.rank, self.world = rank, world
        self.device = device
        for mod in (base.image_encoder, base.prompt_encoder):
            mod.eval()
            mod.requires_grad_(False)
        self.view = decoder_view(base)  # own copy of the mask decoder; encoders shared, frozen
        self.decoder = self.view.mask_decoder.to(device)
        self.decoder.requires_grad_(True)
        self.decoder.train()
        self.module: Any = self.decoder
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.module = DistributedDataParallel(self.decoder, device_ids=ids)
        self.opt = torch.optim.AdamW(
            [p for p in self.decoder.parameters() if p.requires_grad],
            lr=lr,
            weight_decay=weight_decay,
        )
        n = len(samples)
        self.batch = max(world, min(int(batch_size), n))
        if n < world:
            raise InputError(
                f"{n} training slice(s) cannot be shared by {world} processes; use fewer "
                "processes or more data"
            )
        self.steps_per_epoch = max(1, n // self.batch)
        self._targets: dict[int, torch.Tensor] = {}

    # -------------------------------------------------------------- one sample
    def _target(self, sid: int) -> torch.Tensor:
        import torch

        t = self._targets.get(sid)
        if t is None:
            s = self.samples[sid]
            frame = self.predictors[s.case].frame
            low = frame.mask_to_lowres(s.gt) > 0
            t = torch.from_numpy(low.astype(np.float32))[None, None]
            self._targets[sid] = t
        return t

    def _forward(self, sid: int, epoch: int) -> tuple[torch.Tensor, dict[str, float]]:
        import torch

        s = self.samples[sid]
        pred = self.predictors[s.case]
        rng = np.random.default_rng([self.seed, epoch, sid])
        pr = simulate_prompt(s, pred.slice_shape, rng)
        dev = self.device
        emb = pred.embed(s.index).to(dev)
        with torch.no_grad():
            pts = None
            if pr["points_rc"] is not None:
                xy = torch.from_numpy(pred.frame.points_to_model(pr["points_rc"]))[None]
                lab = torch.from_numpy(np.asarray(pr["point_labels"], dtype=np.int64))[None]
                pts = (xy.to(dev, torch.float32), lab.to(dev))
            box = torch.from_numpy(pred.frame.box_to_model(pr["box_rc"]))[None].to(
                dev, torch.float32
            )
            mask = None
            if pr["mask"] is not None:
                mask = torch.from_numpy(pred.mask_prompt(pr["mask"]))[None, None].to(dev)
            sparse, dense = self.base.prompt_encoder(points=pts, boxes=box, masks=mask)
            pe = self.base.prompt_encoder.get_dense_pe()
        low, iou = self.module(
            image_embeddings=emb,
            image_pe=pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return decoder_loss(low, iou, self._target(sid).to(dev))

    # -------------------------------------------------------------- one step
    def order(self, epoch: int) -> np.ndarray:
        """The epoch's sample order (the same in every process)."""
        return np.random.default_rng([self.seed, epoch, 10**6]).permutation(len(self.samples))

    def step(self, epoch: int, step: int) -> float:
        """One optimizer step on global batch ``step`` of ``epoch``; returns its mean loss."""
        import contextlib

        import torch

        order = self.order(epoch)
        batch = order[step * self.batch : (step + 1) * self.batch]
        mine = np.array_split(batch, self.world)[self.rank]
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        scale = self.world / len(batch)  # DDP averages over ranks: sum / global batch overall
        for j, sid in enumerate(mine):
            last = j == len(mine) - 1
            ctx = self.module.no_sync() if self.world > 1 and not last else contextlib.nullcontext()
            with ctx:
                loss, _ = self._forward(int(sid), epoch)
                (loss * scale).backward()
            total += float(loss.detach())
        self.opt.step()
        if self.world > 1:
            import torch.distributed as dist

            t = torch.tensor([total], dtype=torch.float64)
            dist.all_reduce(t)
            total = float(t[0])
        return total / len(batch)

    # -------------------------------------------------------------- state
    def state(self) -> dict[str, Any]:
        from medseg.models.decoder import decoder_state

        return {
            "decoder": decoder_state(self.decoder),
            "optimizer": self.opt.state_dict(),
        }

    def load_state(self, st: dict[str, Any]) -> None:
        self.decoder.load_state_dict(st["decoder"], strict=True)
        self.opt.load_state_dict(st["optimizer"])


def validate(
    predictors: Sequence[VolumePredictor],
    gts: Sequence[np.ndarray],
    *,
    box_margin: float = 3.0,
    cancel: CancelToken | None = None,
) -> dict[str, Any]:
    """Per-slice box Dice and propagated 3D Dice on held-out volumes.

    Args:
        predictors: one per validation volume (their model holds the decoder under test).
        gts: ``(z, y, x)`` bool object masks, one per predictor.
        box_margin: box margin in pixels (the oracle and the key-slice box).

    Returns:
        ``{"box_dice": mean per-slice box Dice over all object slices, "dice_3d": mean over
        volumes of the propagation's 3D Dice, "cases": [...]}``.
    """
    from medseg.predict.propagate import box_from_gt, dice3d, oracle_dice, propagate

    rows: list[dict[str, Any]] = []
    per_slice: list[float] = []
    for pred, gt in zip(predictors, gts, strict=True):
        if _is_cancelled(cancel):
            raise Cancelled("cancelled")
        orc = oracle_dice(pred, gt, margin_px=box_margin)
        ds = [float(r["dice"]) for r in orc.per_slice]
        per_slice += ds
        res = propagate(pred, [box_from_gt(gt, pred.axis, box_margin)])
        d3 = dice3d(res.mask, gt)
        rows.append(
            {
                "box_dice": float(np.mean(ds)) if ds else None,
                "oracle_dice_3d": float(orc.dice),
                "dice_3d": float(d3),
            }
        )
    return {
        "box_dice": float(np.mean(per_slice)) if per_slice else float("nan"),
        "dice_3d": float(np.mean([r["dice_3d"] for r in rows])) if rows else float("nan"),
        "cases": rows,
    }


# --------------------------------------------------------------------------- API
def finetune(
    data: PathLike,
    model: str | ModelSpec = "litemedsam",
    *,
    weights: PathLike | None = None,
    label: int | str,
    out: PathLike,
    epochs: int = 10,
    val_fraction: float | None = None,
    resume: PathLike | None = None,
    seed: int = 0,
    batch_size: int = 4,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    axis: str = "z",
    window: str | None = None,
    box_margin: float = 3.0,
    precision: str = "auto",
    device: str = "auto",
    cache_dir: PathLike | bool | None = True,
    overwrite: bool = False,
    plot: bool = True,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> FinetuneResult:
    """Fine-tune a SAM-Med mask decoder on a dataset's ``label``; the image encoder stays frozen.

    Args:
        data: dataset folder: Medical Segmentation Decathlon layout, nnU-Net raw layout, or a
            folder of image/label pairs (:func:`medseg.io.datasets.load_dataset`).
        model: ``litemedsam``, ``sam_vit_b``, ``medsam_vit_b`` (or a registry spec).
        weights: base checkpoint (else the weights cache / packaged copy).
        label: the structure: a label value or a name from the dataset's label table.
        out: the decoder file to write (``.pt``); beside it ``.resume.pt`` (checkpoint),
            ``.curve.json`` and ``.curve.png``.
        epochs: epochs to train (in total, counting those of a resumed run).
        val_fraction: fraction of the *volumes* held out for validation (0: none; the last
            epoch is saved). Default ``None``: 0.2 with two or more volumes, none with one
            (noted in the result's ``extra["note"]``).
        resume: a ``.resume.pt`` checkpoint to continue from (same data, model and settings).
        seed: seeds the split, prompt simulation and sample order.
        batch_size: slices per optimizer step (over all processes under ``torchrun``).
        lr, weight_decay: AdamW settings.
        axis: slicing axis ``z`` / ``y`` / ``x``.
        window: CT window preset / ``"LO,HI"`` / ``"percentile"`` (``None``: by modality). The
            mapping used (resolved on the first training volume) is saved in the decoder and
            used by ``segment(..., decoder=...)`` unless another window is given.
        box_margin: pixel margin of the validation boxes.
        precision: image-encoder precision (``auto``/``fp32``/``bf16``; part of the cache key,
            so use the one you segment with).
        device: ``auto`` / ``cpu`` / ``cuda`` (under ``torchrun`` on GPU: ``cuda:LOCAL_RANK``).
        cache_dir: embedding disk cache (``True`` the default folder, a path, ``None`` memory).
        overwrite: replace existing output files.
        plot: write the PNG curve (needs matplotlib; skipped with a note when absent).
        progress: ``progress(done, total)`` over embedding, then training steps.
        cancel: a callable returning True (or a set Event): stops at the next step, leaves a
            resumable checkpoint and raises :class:`~medseg.errors.Cancelled`.

    Returns:
        :class:`FinetuneResult`.

    Raises:
        InputError: not a dataset, unknown label, too few volumes/slices, a mismatched resume.
        WeightsError: base weights missing or corrupted.
        OutputError: an output exists (without ``overwrite``) or is an input.
        Cancelled: ``cancel`` said so (a checkpoint was written first).
        KeyboardInterrupt: Ctrl-C (a checkpoint was written first).
    """
    import torch

    from medseg.io.datasets import load_dataset
    from medseg.io.files import check_output_path
    from medseg.models.decoder import base_info, decoder_view, save_decoder
    from medseg.models.registry import get_spec
    from medseg.models.sam import get_sam_model, resolve_device
    from medseg.predict.frame import axis_index, slice_of
    from medseg.predict.sam import VolumePredictor, predictor_cache_dir

    t_start = time.perf_counter()
    epochs = int(epochs)
    if epochs < 0:
        raise InputError(f"epochs must be >= 0, got {epochs}")
    rank, world, local_rank = _dist_info()
    spec = get_spec(model)
    out_p = Path(out)
    ckpt_p = resume_path_for(out_p)
    curve_json, curve_png = curve_paths_for(out_p)
    data_p = Path(data)
    inputs = [str(data_p)] + ([str(weights)] if weights else [])
    if resume is not None:
        inputs.append(str(resume))
    if rank == 0:
        for p in (out_p, curve_json, curve_png):
            check_output_path(p, inputs, overwrite=overwrite)
        if resume is None or Path(resume).resolve() != ckpt_p.resolve():
            check_output_path(ckpt_p, inputs, overwrite=overwrite)
    ds = load_dataset(data_p)
    value, lname = resolve_label(label, ds.labels)
    note = None
    if val_fraction is None:
        val_fraction = DEFAULT_VAL_FRACTION if len(ds) >= 2 else 0.0
        if len(ds) < 2:
            note = "one volume: no held-out validation; the last epoch is saved"
    train_idx, val_idx = split_cases(len(ds), val_fraction, seed)
    ax = axis_index(axis)
    ax_name = "zyx"[ax]

    dev = resolve_device(device)
    if world > 1:
        import torch.distributed as dist

        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    base = get_sam_model(spec, weights=weights, device=dev, precision=precision)
    binfo = base_info(base)
    cdir = predictor_cache_dir(cache_dir)

    # ---- data: training slices embedded once through the shared embedding cache
    predictors: list[VolumePredictor] = []
    samples: list[_Sample] = []
    case_ids = ds.case_ids or [Path(p[0]).name for p in ds.training]
    intensity_key = None
    used_window: str | None = window
    for ci in train_idx:
        img, lab = ds.load_case(ci)
        mask = lab.array == value
        other = tuple(i for i in range(3) if i != ax)
        idxs = [int(i) for i in np.flatnonzero(mask.any(axis=other))]
        if not idxs:
            continue
        pred = VolumePredictor(
            img,
            base,
            axis=ax_name,
            window=window,
            cache_dir=cdir,
            memory_slices=max(256, len(idxs) + 8),
        )
        if intensity_key is None:
            intensity_key = pred.intensity.key
            used_window = window_of(pred.intensity)
        k = len(predictors)
        predictors.append(pred)
        for i in idxs:
            gt = slice_of(mask, ax, i).astype(bool)
            prev = [
                slice_of(mask, ax, j).astype(bool)
                for j in (i - 1, i + 1)
                if 0 <= j < mask.shape[ax] and slice_of(mask, ax, j).any()
            ]
            samples.append(_Sample(k, i, gt, prev))
    if not samples:
        raise InputError(
            f"label {value} ({lname}) is absent from every training volume; choose a label "
            f"present in the data ({ds.labels or 'no label table'})"
        )
    total_steps_hint = len(samples)
    if progress is not None:
        progress(0, total_steps_hint)
    # under torchrun each rank embeds its share into the disk cache, then reads the rest back
    mine = [s for j, s in enumerate(samples) if cdir is None or world == 1 or j % world == rank]
    for done_embed, s in enumerate(mine, 1):
        if _is_cancelled(cancel):
            raise Cancelled("cancelled")
        predictors[s.case].embed(s.index)
        if progress is not None:
            progress(done_embed, total_steps_hint)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    encoder_calls = sum(p.encoder_calls for p in predictors)

    trainer = _Trainer(
        base,
        predictors,
        samples,
        lr=lr,
        weight_decay=weight_decay,
        batch_size=batch_size,
        seed=seed,
        rank=rank,
        world=world,
        device=dev,
    )
    config = {
        "data": str(data_p.resolve()),
        "cases": len(ds),
        "model": spec.name,
        "weights_sha256": binfo["weights_sha256"],
        "label": value,
        "axis": ax_name,
        "window": window,
        "seed": int(seed),
        "batch_size": trainer.batch,
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "val_fraction": float(val_fraction),
        "precision": base.precision,
    }

    # ---- validation volumes (rank 0), predicted through a view on the decoder being trained
    val_preds: list[VolumePredictor] = []
    val_gts: list[np.ndarray] = []
    if rank == 0:
        view = decoder_view(base, trainer.decoder)
        for ci in val_idx:
            img, lab = ds.load_case(ci)
            mask = lab.array == value
            if not mask.any():
                continue
            val_preds.append(
                VolumePredictor(img, view, axis=ax_name, window=window, cache_dir=cdir)
            )
            val_gts.append(mask)

    def run_validation() -> dict[str, Any] | None:
        if not val_preds:
            return None
        trainer.decoder.eval()
        try:
            with torch.no_grad():
                return validate(val_preds, val_gts, box_margin=box_margin, cancel=cancel)
        finally:
            trainer.decoder.train()

    # ---- resume
    history: list[dict[str, Any]] = []
    start_epoch, start_step = 1, 0
    resumed_losses: list[float] = []
    best: dict[str, Any] = {"epoch": 0, "score": -math.inf, "state": None}
    if resume is not None:
        ck = _read_checkpoint(resume)
        diff = {k: (ck["config"].get(k), v) for k, v in config.items() if ck["config"].get(k) != v}
        if diff:
            k0, (was, now) = next(iter(diff.items()))
            raise InputError(
                f"{resume}: checkpoint was made with {k0}={was!r}, this run has {now!r}; resume "
                "with the same data, model and settings"
            )
        trainer.load_state({"decoder": ck["decoder"], "optimizer": ck["optimizer"]})
        start_epoch, start_step = int(ck["epoch"]), int(ck["step"])
        resumed_losses = [float(x) for x in ck.get("epoch_losses", [])]
        history = list(ck["history"])
        best = {"epoch": int(ck["best_epoch"]), "score": float(ck["best_score"])}
        best["state"] = ck.get("best_state")

    total = max(0, epochs - start_epoch + 1) * trainer.steps_per_epoch - start_step
    done = 0
    if progress is not None:
        progress(0, max(total, 0))

    def save_checkpoint(epoch: int, step: int) -> None:
        if rank != 0:
            return
        import torch as _t

        from medseg.io.files import atomic_path

        st = trainer.state()
        payload = {
            "format": CHECKPOINT_FORMAT,
            "version": 1,
            "config": config,
            "epoch": epoch,
            "step": step,
            "decoder": st["decoder"],
            "optimizer": st["optimizer"],
            "history": history,
            "epoch_losses": [float(x) for x in losses],
            "best_epoch": int(best["epoch"]),
            "best_score": float(best["score"]),
            "best_state": best.get("state"),
        }
        with atomic_path(ckpt_p) as tmp:
            _t.save(payload, tmp)

    if not history and val_preds:  # epoch 0: the zero-shot decoder
        t = time.perf_counter()
        v = run_validation()
        assert v is not None
        history.append(_row(0, None, v, time.perf_counter() - t))
        best = {"epoch": 0, "score": v["box_dice"], "state": None}

    epoch, step = start_epoch, start_step
    losses: list[float] = list(resumed_losses)
    try:
        while epoch <= epochs:
            t_ep = time.perf_counter()
            while step < trainer.steps_per_epoch:
                if _is_cancelled(cancel):
                    raise Cancelled("cancelled")
                losses.append(trainer.step(epoch, step))
                step += 1
                done += 1
                if progress is not None:
                    progress(done, total)
            train_loss = float(np.mean(losses)) if losses else None
            v = run_validation() if rank == 0 else None
            history.append(_row(epoch, train_loss, v, time.perf_counter() - t_ep))
            score = v["box_dice"] if v is not None else float(epoch)
            if rank == 0 and score > best["score"]:
                from medseg.models.decoder import decoder_state

                best = {"epoch": epoch, "score": score, "state": decoder_state(trainer.decoder)}
            epoch, step, losses = epoch + 1, 0, []
            save_checkpoint(epoch, step)
    except (KeyboardInterrupt, Cancelled):
        save_checkpoint(epoch, step)
        raise

    # ---- outputs (rank 0)
    from medseg.models.decoder import decoder_state

    state = best.get("state")
    if state is None:
        # best is the base decoder (epoch 0) or no validation: the base / last weights
        state = decoder_state(base) if best["epoch"] == 0 and val_preds else None
    if state is None:
        state = decoder_state(trainer.decoder)
    training = {
        "data": str(data_p.resolve()),
        "layout": ds.layout,
        "train_cases": [case_ids[i] for i in train_idx],
        "val_cases": [case_ids[i] for i in val_idx],
        "train_slices": len(samples),
        "epochs": epochs,
        "best_epoch": int(best["epoch"]),
        "history": history,
        "seed": int(seed),
        "batch_size": trainer.batch,
        "lr": float(lr),
        "weight_decay": float(weight_decay),
        "world_size": world,
        "trained": "mask_decoder",
        "prompts": "jittered box, box+points (pos/neg), neighbour-slice box/point/mask carry",
        "loss": "dice + bce + iou-mse",
        "precision": base.precision,
    }
    sha = ""
    png: Path | None = None
    if rank == 0:
        from medseg.io.files import write_json

        _, sha = save_decoder(
            out_p,
            base,
            state,
            window=used_window,
            intensity=intensity_key,
            label={"value": value, "name": lname},
            training=training,
            inputs=inputs,
            overwrite=True,
        )
        curve = {"best_epoch": int(best["epoch"]), "history": history, "decoder_sha256": sha}
        write_json(curve, curve_json, inputs=inputs, overwrite=True)
        if plot:
            png = plot_curve(history, curve_png)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return FinetuneResult(
        path=out_p,
        sha256=sha,
        best_epoch=int(best["epoch"]),
        history=history,
        checkpoint=ckpt_p,
        curve_json=curve_json,
        curve_png=png,
        train_cases=training["train_cases"],
        val_cases=training["val_cases"],
        train_slices=len(samples),
        encoder_calls=encoder_calls,
        state=state,
        extra={
            "seconds": time.perf_counter() - t_start,
            "rank": rank,
            "world_size": world,
            "note": note,
        },
    )


def _row(
    epoch: int, loss: float | None, v: dict[str, Any] | None, seconds: float
) -> dict[str, Any]:
    return {
        "epoch": epoch,
        "train_loss": None if loss is None else round(loss, 6),
        "val_box_dice": None if v is None else round(v["box_dice"], 4),
        "val_dice_3d": None if v is None else round(v["dice_3d"], 4),
        "seconds": round(seconds, 3),
    }


def _read_checkpoint(path: PathLike) -> dict[str, Any]:
    """Read a ``.resume.pt`` (``weights_only=True``).

    Raises:
        InputError: missing, unreadable or not a fine-tuning checkpoint.
    """

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such checkpoint; give the .resume.pt a run left")
    from medseg.models.weights import load_torch_file

    ck = load_torch_file(p, "fine-tuning checkpoint", "start again without --resume")
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise InputError(f"{p}: not a medseg finetune checkpoint (a .resume.pt)")
    return ck


def plot_curve(history: list[dict[str, Any]], out: PathLike) -> Path | None:
    """Draw loss and validation Dice per epoch into a PNG; ``None`` (with a note on stderr)
    when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError:
        import sys

        print(
            "medseg finetune: note: matplotlib is not installed, so no PNG curve was drawn "
            "(the JSON curve was written); pip install matplotlib",
            file=sys.stderr,
        )
        return None
    from medseg.io.files import atomic_path

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
    tr = [r for r in history if r["train_loss"] is not None]
    a1.plot([r["epoch"] for r in tr], [r["train_loss"] for r in tr], "o-")
    a1.set_xlabel("epoch")
    a1.set_ylabel("training loss (Dice + BCE + IoU)")
    va = [r for r in history if r["val_box_dice"] is not None]
    if va:
        a2.plot([r["epoch"] for r in va], [r["val_box_dice"] for r in va], "o-", label="box Dice")
        a2.plot([r["epoch"] for r in va], [r["val_dice_3d"] for r in va], "s-", label="3D Dice")
        a2.legend()
    a2.set_xlabel("epoch (0 = zero-shot)")
    a2.set_ylabel("validation Dice")
    fig.tight_layout()
    o = Path(out)
    with atomic_path(o) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return o


__all__ = [
    "FinetuneResult",
    "curve_paths_for",
    "decoder_loss",
    "finetune",
    "resume_path_for",
    "simulate_prompt",
    "split_cases",
    "validate",
]
