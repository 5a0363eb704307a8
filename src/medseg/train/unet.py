"""MONAI U-Net training on an MSD / nnU-Net raw dataset.

Pipeline (MONAI building blocks):

* every case is read with our readers (``medseg.io``) and put on the *model grid* once by the
  same function inference uses (:func:`medseg.preprocess.preprocess`: canonical axis-aligned
  orientation, intensity window / MR percentiles from :mod:`medseg.intensity`, linear
  resampling to the target spacing; nearest neighbour for labels). We use this shared function
  instead of ``Orientationd``/``Spacingd`` so that training and inference cannot disagree on
  grid placement or interpolation;
* MONAI dictionary transforms draw the patches: ``SpatialPadd`` → ``RandCropByLabelClassesd``
  (positive/negative sampling generalised to several classes: each class, background included,
  is a patch centre equally often, so small tumours are seen) → ``RandScaleIntensityd`` /
  ``RandShiftIntensityd`` → optional ``RandFlipd`` (off by default: left/right flips would make
  liver and spleen, of similar density, indistinguishable except by shape);
* ``monai.networks.nets.UNet`` + ``DiceCELoss`` (softmax, one-hot targets), AdamW;
* validation each epoch with ``sliding_window_inference`` (Gaussian blending) on the validation
  cases' model grids: Dice per label, and their mean selects the best checkpoint.

Outputs: ``OUT`` (best checkpoint), ``OUT.last.pt`` (latest epoch, for ``resume``), and
``OUT.log.jsonl`` (one JSON line per epoch). All checkpoint writes are atomic.

Determinism: the split comes from ``seed``; each epoch reseeds torch and the transforms from
``(seed, epoch)``, so a run resumed from epoch ``k`` continues as the uninterrupted run would.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import CheckpointConfigError, InputError

if TYPE_CHECKING:
    import torch

    from medseg.io.datasets import Dataset
    from medseg.progress import ProgressCallback


def sidecar_paths(out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(last_checkpoint, log)`` beside ``out``: ``M.pt`` → ``M.last.pt``, ``M.log.jsonl``."""
    o = Path(out)
    stem = o.name[:-3] if o.name.endswith(".pt") else o.name
    return o.with_name(stem + ".last.pt"), o.with_name(stem + ".log.jsonl")


def split_cases(case_ids: list[str], val_fraction: float, seed: int) -> dict[str, list[str]]:
    """Seeded train/validation split of case ids.

    ``round(val_fraction * n)`` cases (at least 1 when ``val_fraction > 0`` and ``n >= 2``, and
    never all of them) go to validation.
    """
    n = len(case_ids)
    if not 0.0 <= val_fraction < 1.0:
        raise InputError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    n_val = 0
    if val_fraction > 0 and n >= 2:
        n_val = int(min(max(round(val_fraction * n), 1), n - 1))
    order = np.random.default_rng(seed).permutation(n)
    val = sorted(case_ids[i] for i in order[:n_val])
    train = sorted(case_ids[i] for i in order[n_val:])
    return {"train": train, "val": val}


def dice_per_label(pred: np.ndarray, gt: np.ndarray, labels: dict[int, str]) -> dict[str, float]:
    """Dice of each label value of ``(z, y, x)`` label arrays (:func:`medseg.metrics.dice`:
    both empty → 1.0)."""
    from medseg.metrics import dice

    return {name: dice(pred == v, gt == v) for v, name in labels.items()}


@dataclass
class TrainSettings:
    """Optimisation settings of one run; stored in the checkpoint as ``train_args``.

    A resumed run takes them from its checkpoint (the run's own settings win), except ``epochs``.
    """

    lr: float
    batch_cases: int
    samples_per_case: int
    flip: bool
    epochs: int
    lr_schedule: str

    def lr_at(self, epoch: int) -> float:
        """Learning rate of ``epoch`` (1-based): a function of the epoch only (resume-safe)."""
        if self.lr_schedule == "poly":
            return self.lr * (1.0 - (epoch - 1) / self.epochs) ** 0.9
        return self.lr


@dataclass
class _Model:
    """Network, optimizer and the run's progress so far (fresh or restored from a checkpoint)."""

    net: Any
    opt: Any
    history: list[dict[str, Any]]
    best_metric: float
    best_epoch: int
    start: int


def train_unet(
    dataset_root: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    epochs: int = 50,
    patch_size: tuple[int, int, int] = (32, 64, 64),
    target_spacing: tuple[float, float, float] = (3.0, 2.0, 2.0),
    channels: tuple[int, ...] = (16, 32, 64, 128),
    seed: int = 0,
    val_fraction: float = 0.2,
    resume: str | os.PathLike[str] | None = None,
    progress: ProgressCallback | None = None,
    window: str = "abdomen",
    num_res_units: int = 1,
    lr: float = 2e-3,
    batch_cases: int = 2,
    samples_per_case: int = 2,
    flip: bool = False,
    overwrite: bool = False,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    threads: int | None = None,
    lr_schedule: str = "poly",
) -> dict[str, Any]:
    """Train (or resume training) a 3D U-Net.

    Args:
        dataset_root: MSD or nnU-Net raw dataset folder (:func:`medseg.io.datasets.load_dataset`).
        out: best-checkpoint path (``.pt``); ``.last.pt`` and ``.log.jsonl`` are written beside.
        epochs: total number of epochs (with ``resume``: continue up to this number).
        patch_size: training patch and inference window ``(z, y, x)`` voxels on the model grid.
        target_spacing: model voxel size ``(z, y, x)`` mm.
        channels: U-Net feature channels per level.
        seed: seeds the split, the weights and the patch sampling.
        val_fraction: share of cases held out for validation.
        resume: a checkpoint from this function (``OUT.last.pt`` or ``OUT``): weights, optimizer,
            epoch, history and split are restored; its config (labels, spacing, patch ...) wins.
        progress: ``progress(done, total)`` over training steps.
        window: CT intensity window (:data:`medseg.intensity.WINDOWS` name or ``"LO,HI"``).
        num_res_units: residual units per U-Net block.
        lr: AdamW initial learning rate.
        lr_schedule: ``"poly"``: ``lr * (1 - (epoch - 1) / epochs) ** 0.9`` (the horizon is this
            call's ``epochs``, so a resumed run with another total follows a different curve),
            or ``"constant"``.
        batch_cases: cases per optimisation step (each gives ``samples_per_case`` patches).
        samples_per_case: patches drawn per case per step.
        flip: add random flips along all axes.
        overwrite: replace an existing ``out`` (implied when resuming into the same file).
        on_epoch: called with each epoch's log record (the CLI prints it).
        threads: torch intra-op threads while training (``None``: unchanged), set with
            :func:`medseg.runtime.configure_threads` and restored afterwards. On a busy shared
            CPU one thread was 4-5x faster per step than two here (no spinning between threads).

    Returns:
        ``{"out", "last", "log", "epochs", "best_epoch", "best_metric", "split",
        "config_sha256", "history"}``.

    Raises:
        InputError: bad dataset/arguments. OutputError: unusable output path.
        CheckpointConfigError: ``resume`` checkpoint made for another label table / split.
    """
    from medseg.runtime import configure_threads

    if epochs < 1:
        raise InputError(f"--epochs must be at least 1, got {epochs}")
    settings = TrainSettings(
        lr=float(lr),
        batch_cases=int(batch_cases),
        samples_per_case=int(samples_per_case),
        flip=bool(flip),
        epochs=int(epochs),
        lr_schedule=lr_schedule,
    )
    old_threads = None if threads is None else configure_threads(int(threads))
    try:
        return _run(
            dataset_root,
            Path(out),
            settings,
            seed=seed,
            resume=resume,
            overwrite=overwrite,
            new_config={
                "target_spacing": tuple(target_spacing),
                "patch_size": tuple(patch_size),
                "channels": tuple(channels),
                "num_res_units": num_res_units,
                "window": window,
            },
            val_fraction=val_fraction,
            progress=progress,
            on_epoch=on_epoch,
        )
    finally:
        if old_threads is not None:
            configure_threads(old_threads)


def _run(
    dataset_root: str | os.PathLike[str],
    out: Path,
    settings: TrainSettings,
    *,
    seed: int,
    resume: str | os.PathLike[str] | None,
    overwrite: bool,
    new_config: dict[str, Any],
    val_fraction: float,
    progress: ProgressCallback | None,
    on_epoch: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    """:func:`train_unet` once its arguments are checked: set up, then the epoch loop."""
    from monai.losses import DiceCELoss

    from medseg.io.datasets import load_dataset
    from medseg.io.files import check_output_path
    from medseg.models.unet import (
        config_sha256,
        labels_of,
        load_checkpoint,
        make_config,
        save_checkpoint,
    )

    ds = load_dataset(dataset_root)
    if len(ds) == 0:
        raise InputError(f"{dataset_root}: the dataset has no training cases")
    case_ids = list(ds.case_ids) or [Path(p[0]).name for p in ds.training]
    last_path, log_path = sidecar_paths(out)
    inputs = [ds.root] + ([resume] if resume is not None and Path(resume) != out else [])
    check_output_path(out, inputs, overwrite=overwrite or (resume is not None))

    ckpt: dict[str, Any] | None = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
        config, split, seed, settings = _resume_state(ckpt, resume, ds, case_ids, seed, settings)
    else:
        config = make_config(labels=ds.labels, modality=ds.modality or "CT", **new_config)
        split = split_cases(case_ids, val_fraction, seed)
    sha = config_sha256(config)
    if settings.lr_schedule not in {"poly", "constant"}:
        raise InputError(f"lr_schedule must be poly or constant, got {settings.lr_schedule!r}")
    labels = labels_of(config)
    patch = tuple(int(p) for p in config["patch_size"])

    data = _load_cases(ds, case_ids, split["train"] + split["val"], config)
    transforms = _train_transforms(patch, len(labels) + 1, settings.samples_per_case, settings.flip)
    model = _setup_model(config, seed, settings, ckpt, resume)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    steps_per_epoch = -(-len(split["train"]) // settings.batch_cases)
    total = steps_per_epoch * (settings.epochs - model.start + 1)
    step = [0]

    def count_step() -> None:
        step[0] += 1
        if progress is not None:
            progress(step[0], total)

    for epoch in range(model.start, settings.epochs + 1):
        record, metric = _fit_epoch(
            model,
            epoch,
            settings,
            seed,
            loss_fn,
            data,
            split,
            transforms,
            patch,
            labels,
            count_step,
        )
        ck, is_best = _end_epoch(model, record, metric, config, sha, split, seed, settings)
        save_checkpoint(ck, last_path)
        if is_best:
            save_checkpoint(ck, out)
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")
        if on_epoch is not None:
            on_epoch(record)
    if not out.exists():  # resumed and never improved into a new file: keep the latest
        save_checkpoint(ck, out)
    return {
        "out": str(out),
        "last": str(last_path),
        "log": str(log_path),
        "epochs": settings.epochs,
        "best_epoch": model.best_epoch,
        "best_metric": float(model.best_metric),
        "split": split,
        "config_sha256": sha,
        "history": model.history,
    }


def _resume_state(
    ckpt: dict[str, Any],
    resume: str | os.PathLike[str],
    ds: Dataset,
    case_ids: list[str],
    seed: int,
    settings: TrainSettings,
) -> tuple[dict[str, Any], dict[str, list[str]], int, TrainSettings]:
    """Config, split, seed and settings of the run a checkpoint continues (its own win).

    Raises:
        CheckpointConfigError: other labels, cases missing from the dataset, no optimizer state.
    """
    from medseg.models.unet import labels_of

    config = ckpt["config"]
    if labels_of(config) != ds.labels:
        raise CheckpointConfigError(
            f"{resume}: the checkpoint was trained for labels {labels_of(config)} but the "
            f"dataset has {ds.labels}; start a new training instead of --resume"
        )
    split = {k: list(v) for k, v in ckpt["split"].items()}
    missing = [c for c in split["train"] + split["val"] if c not in case_ids]
    if missing:
        raise CheckpointConfigError(
            f"{resume}: cases of its split are not in the dataset ({', '.join(missing[:3])}); "
            "resume with the dataset it was trained on"
        )
    ta = dict(ckpt.get("train_args") or {})  # the run's own settings win when resuming
    settings = TrainSettings(
        lr=float(ta.get("lr", settings.lr)),
        batch_cases=int(ta.get("batch_cases", settings.batch_cases)),
        samples_per_case=int(ta.get("samples_per_case", settings.samples_per_case)),
        flip=bool(ta.get("flip", settings.flip)),
        epochs=settings.epochs,
        lr_schedule=str(ta.get("lr_schedule", settings.lr_schedule)),
    )
    if "optimizer" not in ckpt or "epoch" not in ckpt:
        raise CheckpointConfigError(f"{resume}: no optimizer state/epoch; cannot resume from it")
    return config, split, int(ckpt.get("seed", seed)), settings


def _load_cases(
    ds: Dataset, case_ids: list[str], cases: list[str], config: dict[str, Any]
) -> dict[str, dict[str, torch.Tensor]]:
    """Each case on the model grid, once: ``{case: {"image": (1, Z, Y, X) float32,
    "label": (1, Z, Y, X) int64}}`` (:func:`medseg.preprocess.preprocess`).

    Raises:
        InputError: a label value outside the config's label table.
    """
    import torch

    from medseg.preprocess import preprocess, preprocess_labels

    n_cls = len(config["labels"]) + 1
    index = {c: i for i, c in enumerate(case_ids)}
    data: dict[str, dict[str, torch.Tensor]] = {}
    for case in cases:
        img, lab = ds.load_case(index[case])
        x, _ = preprocess(img, config)
        y = preprocess_labels(lab, config)
        if int(y.max()) >= n_cls:
            raise InputError(f"case {case}: label value {int(y.max())} not in the label table")
        data[case] = {"image": x[None], "label": torch.from_numpy(y.astype(np.int64))[None]}
    return data


def _setup_model(
    config: dict[str, Any],
    seed: int,
    settings: TrainSettings,
    ckpt: dict[str, Any] | None,
    resume: str | os.PathLike[str] | None,
) -> _Model:
    """Seeded network + AdamW; with ``ckpt`` its weights, optimizer state and history.

    Raises:
        InputError: the checkpoint already reached ``settings.epochs``.
    """
    import torch

    from medseg.models.unet import build_network

    torch.manual_seed(seed)
    net = build_network(config)
    opt = torch.optim.AdamW(net.parameters(), lr=settings.lr, weight_decay=1e-5)
    model = _Model(net, opt, history=[], best_metric=-np.inf, best_epoch=0, start=1)
    if ckpt is not None:
        net.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        model.history = list(ckpt.get("history", []))
        model.best_metric = float(ckpt.get("best_metric", -np.inf))
        model.best_epoch = int(ckpt.get("best_epoch", 0))
        model.start = int(ckpt["epoch"]) + 1
        if model.start > settings.epochs:
            raise InputError(
                f"{resume}: already trained for {model.start - 1} epochs; ask for more with "
                "--epochs"
            )
    return model


def _fit_epoch(
    model: _Model,
    epoch: int,
    settings: TrainSettings,
    seed: int,
    loss_fn: Any,
    data: dict[str, dict[str, torch.Tensor]],
    split: dict[str, list[str]],
    transforms: Any,
    patch: tuple[int, ...],
    labels: dict[int, str],
    on_step: Callable[[], None],
) -> tuple[dict[str, Any], float]:
    """Train one epoch (seeded from ``(seed, epoch)``), then validate.

    Returns:
        The epoch's log record (``epoch``, ``loss``, ``lr``, ``val_dice``, ``val_mean_dice``,
        ``time_s``) and the metric that selects the best checkpoint: the mean validation Dice,
        or minus the training loss when there are no validation cases.
    """
    t0 = time.perf_counter()
    ep_seed = (seed * 1_000_003 + epoch) % (2**31)
    for g in model.opt.param_groups:
        g["lr"] = settings.lr_at(epoch)
    loss = _train_epoch(
        model, loss_fn, data, split["train"], transforms, settings.batch_cases, ep_seed, on_step
    )
    record: dict[str, Any] = {
        "epoch": epoch,
        "loss": loss,
        "lr": float(model.opt.param_groups[0]["lr"]),
    }
    if split["val"]:
        val = _validate(model.net, data, split["val"], patch, labels)
        record["val_dice"] = val
        record["val_mean_dice"] = float(np.mean(list(val.values())))
        metric = record["val_mean_dice"]
    else:
        metric = -record["loss"]  # no validation cases: the training loss decides
    record["time_s"] = round(time.perf_counter() - t0, 2)
    return record, metric


def _train_epoch(
    model: _Model,
    loss_fn: Any,
    data: dict[str, dict[str, torch.Tensor]],
    train_ids: list[str],
    transforms: Any,
    batch_cases: int,
    ep_seed: int,
    on_step: Callable[[], None],
) -> float:
    """One pass over the training cases in a seeded order; returns the mean loss.

    Torch and the patch transforms are reseeded from ``ep_seed``, so the epoch is the same
    whether the run was resumed or not.
    """
    import torch

    net, opt = model.net, model.opt
    torch.manual_seed(ep_seed)
    transforms.set_random_state(seed=ep_seed)
    order = np.random.default_rng(ep_seed).permutation(len(train_ids))
    net.train()
    losses = []
    for b in range(-(-len(train_ids) // batch_cases)):
        cases = [train_ids[i] for i in order[b * batch_cases : (b + 1) * batch_cases]]
        samples = [s for c in cases for s in transforms(dict(data[c]))]
        xb = torch.stack([torch.as_tensor(s["image"]) for s in samples]).float()
        yb = torch.stack([torch.as_tensor(s["label"]) for s in samples]).long()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(xb), yb)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        on_step()
    return float(np.mean(losses))


def _validate(
    net: Any,
    data: dict[str, dict[str, torch.Tensor]],
    val_ids: list[str],
    patch: tuple[int, ...],
    labels: dict[int, str],
) -> dict[str, float]:
    """Mean Dice per label name over the validation cases (sliding window on the model grid)."""
    import torch
    from monai.inferers import sliding_window_inference

    net.eval()
    per_case = []
    with torch.inference_mode():
        for c in val_ids:
            pr = sliding_window_inference(
                data[c]["image"][None], patch, 2, net, overlap=0.25, mode="gaussian"
            )
            pred = torch.argmax(pr[0], dim=0).numpy()
            per_case.append(dice_per_label(pred, data[c]["label"][0].numpy(), labels))
    return {n: float(np.mean([d[n] for d in per_case])) for n in labels.values()}


def _end_epoch(
    model: _Model,
    record: dict[str, Any],
    metric: float,
    config: dict[str, Any],
    sha: str,
    split: dict[str, list[str]],
    seed: int,
    settings: TrainSettings,
) -> tuple[dict[str, Any], bool]:
    """Update best metric/epoch and history with ``record``.

    Returns:
        The epoch's checkpoint dict and whether the epoch is the best so far.
    """
    is_best = metric > model.best_metric
    if is_best:
        model.best_metric, model.best_epoch = metric, int(record["epoch"])
    record["best_epoch"] = model.best_epoch
    model.history.append(record)
    ck = {
        "state_dict": {k: v.detach().clone() for k, v in model.net.state_dict().items()},
        "config": config,
        "config_sha256": sha,
        "history": model.history,
        "split": split,
        "epoch": int(record["epoch"]),
        "seed": int(seed),
        "best_metric": float(model.best_metric),
        "best_epoch": model.best_epoch,
        "optimizer": model.opt.state_dict(),
        "train_args": asdict(settings),
    }
    return ck, is_best


def _train_transforms(patch: tuple[int, ...], n_cls: int, samples: int, flip: bool) -> Any:
    """MONAI patch sampling: pad, class-balanced crops (background included), intensity jitter,
    optional flips; applied to ``{"image", "label"}`` dicts of ``(1, Z, Y, X)`` tensors."""
    from monai.transforms import (
        Compose,
        RandCropByLabelClassesd,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        SpatialPadd,
    )

    keys = ["image", "label"]
    t: list[Any] = [
        SpatialPadd(keys=keys, spatial_size=patch),
        RandCropByLabelClassesd(
            keys=keys,
            label_key="label",
            spatial_size=patch,
            ratios=[1] * n_cls,
            num_classes=n_cls,
            num_samples=samples,
            warn=False,
        ),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
        RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
    ]
    if flip:
        t += [RandFlipd(keys=keys, prob=0.5, spatial_axis=a) for a in range(3)]
    return Compose(t)
