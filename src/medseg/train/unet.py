"""MONAI U-Net training on an MSD / nnU-Net raw dataset.

Pipeline (MONAI building blocks):

* every case is read with our readers (``medseg.io``) and put on the *model grid* once by the
  same function inference uses (:func:`medseg.predict.unet.preprocess`: canonical axis-aligned
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
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import CheckpointConfigError, InputError

if TYPE_CHECKING:
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
        threads: torch intra-op threads while training (``None``: unchanged). On a busy shared
            CPU one thread was 4-5x faster per step than two here (no spinning between threads).

    Returns:
        ``{"out", "last", "log", "epochs", "best_epoch", "best_metric", "split",
        "config_sha256", "history"}``.

    Raises:
        InputError: bad dataset/arguments. OutputError: unusable output path.
        CheckpointConfigError: ``resume`` checkpoint made for another label table / split.
    """
    import torch
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss

    from medseg.io.datasets import load_dataset
    from medseg.io.files import check_output_path
    from medseg.predict.unet import (
        build_network,
        config_sha256,
        labels_of,
        load_checkpoint,
        make_config,
        preprocess,
        preprocess_labels,
        save_checkpoint,
    )

    if epochs < 1:
        raise InputError(f"--epochs must be at least 1, got {epochs}")
    if threads is not None:
        old = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return train_unet(
                dataset_root,
                out,
                epochs=epochs,
                patch_size=patch_size,
                target_spacing=target_spacing,
                channels=channels,
                seed=seed,
                val_fraction=val_fraction,
                resume=resume,
                progress=progress,
                window=window,
                num_res_units=num_res_units,
                lr=lr,
                batch_cases=batch_cases,
                samples_per_case=samples_per_case,
                flip=flip,
                overwrite=overwrite,
                on_epoch=on_epoch,
                threads=None,
                lr_schedule=lr_schedule,
            )
        finally:
            torch.set_num_threads(old)
    ds = load_dataset(dataset_root)
    if len(ds) == 0:
        raise InputError(f"{dataset_root}: the dataset has no training cases")
    case_ids = list(ds.case_ids) or [Path(p[0]).name for p in ds.training]
    out = Path(out)
    last_path, log_path = sidecar_paths(out)
    inputs = [ds.root] + ([resume] if resume is not None and Path(resume) != out else [])
    check_output_path(out, inputs, overwrite=overwrite or (resume is not None))

    ckpt: dict[str, Any] | None = None
    if resume is not None:
        ckpt = load_checkpoint(resume)
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
        seed = int(ckpt.get("seed", seed))
        ta = dict(ckpt.get("train_args") or {})  # the run's own settings win when resuming
        lr = float(ta.get("lr", lr))
        batch_cases = int(ta.get("batch_cases", batch_cases))
        samples_per_case = int(ta.get("samples_per_case", samples_per_case))
        flip = bool(ta.get("flip", flip))
        lr_schedule = str(ta.get("lr_schedule", lr_schedule))
        if "optimizer" not in ckpt or "epoch" not in ckpt:
            raise CheckpointConfigError(
                f"{resume}: no optimizer state/epoch; cannot resume from it"
            )
    else:
        config = make_config(
            labels=ds.labels,
            target_spacing=tuple(target_spacing),
            patch_size=tuple(patch_size),
            channels=tuple(channels),
            num_res_units=num_res_units,
            modality=ds.modality or "CT",
            window=window,
        )
        split = split_cases(case_ids, val_fraction, seed)
    sha = config_sha256(config)
    train_args = {
        "lr": float(lr),
        "batch_cases": int(batch_cases),
        "samples_per_case": int(samples_per_case),
        "flip": bool(flip),
        "epochs": int(epochs),
        "lr_schedule": lr_schedule,
    }
    if lr_schedule not in {"poly", "constant"}:
        raise InputError(f"lr_schedule must be poly or constant, got {lr_schedule!r}")
    labels = labels_of(config)
    n_cls = len(labels) + 1
    patch = tuple(int(p) for p in config["patch_size"])

    # ---- data on the model grid, once
    index = {c: i for i, c in enumerate(case_ids)}
    data: dict[str, dict[str, Any]] = {}
    for case in split["train"] + split["val"]:
        img, lab = ds.load_case(index[case])
        x, _ = preprocess(img, config)
        y = preprocess_labels(lab, config)
        if int(y.max()) >= n_cls:
            raise InputError(f"case {case}: label value {int(y.max())} not in the label table")
        data[case] = {"image": x[None], "label": torch.from_numpy(y.astype(np.int64))[None]}

    transforms = _train_transforms(patch, n_cls, samples_per_case, flip)

    torch.manual_seed(seed)
    net = build_network(config)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5)
    history: list[dict[str, Any]] = []
    best_metric, best_epoch, start = -np.inf, 0, 1
    if ckpt is not None:
        net.load_state_dict(ckpt["state_dict"])
        opt.load_state_dict(ckpt["optimizer"])
        history = list(ckpt.get("history", []))
        best_metric = float(ckpt.get("best_metric", -np.inf))
        best_epoch = int(ckpt.get("best_epoch", 0))
        start = int(ckpt["epoch"]) + 1
        if start > epochs:
            raise InputError(
                f"{resume}: already trained for {start - 1} epochs; ask for more with --epochs"
            )
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)

    train_ids = split["train"]
    steps_per_epoch = -(-len(train_ids) // batch_cases)
    total = steps_per_epoch * (epochs - start + 1)
    step = 0
    for epoch in range(start, epochs + 1):
        t0 = time.perf_counter()
        ep_seed = (seed * 1_000_003 + epoch) % (2**31)
        for g in opt.param_groups:  # a function of the epoch only (resume-safe)
            g["lr"] = lr * (1.0 - (epoch - 1) / epochs) ** 0.9 if lr_schedule == "poly" else lr
        torch.manual_seed(ep_seed)
        transforms.set_random_state(seed=ep_seed)
        order = np.random.default_rng(ep_seed).permutation(len(train_ids))
        net.train()
        losses = []
        for b in range(steps_per_epoch):
            cases = [train_ids[i] for i in order[b * batch_cases : (b + 1) * batch_cases]]
            samples = [s for c in cases for s in transforms(dict(data[c]))]
            xb = torch.stack([torch.as_tensor(s["image"]) for s in samples]).float()
            yb = torch.stack([torch.as_tensor(s["label"]) for s in samples]).long()
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(net(xb), yb)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if progress is not None:
                progress(step, total)
        record: dict[str, Any] = {
            "epoch": epoch,
            "loss": float(np.mean(losses)),
            "lr": float(opt.param_groups[0]["lr"]),
        }
        if split["val"]:
            net.eval()
            per_case = []
            with torch.inference_mode():
                for c in split["val"]:
                    pr = sliding_window_inference(
                        data[c]["image"][None], patch, 2, net, overlap=0.25, mode="gaussian"
                    )
                    pred = torch.argmax(pr[0], dim=0).numpy()
                    per_case.append(dice_per_label(pred, data[c]["label"][0].numpy(), labels))
            val = {n: float(np.mean([d[n] for d in per_case])) for n in labels.values()}
            record["val_dice"] = val
            record["val_mean_dice"] = float(np.mean(list(val.values())))
            metric = record["val_mean_dice"]
        else:
            metric = -record["loss"]  # no validation cases: the training loss decides
        record["time_s"] = round(time.perf_counter() - t0, 2)
        is_best = metric > best_metric
        if is_best:
            best_metric, best_epoch = metric, epoch
        record["best_epoch"] = best_epoch
        history.append(record)
        state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        ck = {
            "state_dict": state,
            "config": config,
            "config_sha256": sha,
            "history": history,
            "split": split,
            "epoch": epoch,
            "seed": int(seed),
            "best_metric": float(best_metric),
            "best_epoch": best_epoch,
            "optimizer": opt.state_dict(),
            "train_args": train_args,
        }
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
        "epochs": epochs,
        "best_epoch": best_epoch,
        "best_metric": float(best_metric),
        "split": split,
        "config_sha256": sha,
        "history": history,
    }


def _train_transforms(patch: tuple[int, ...], n_cls: int, samples: int, flip: bool) -> Any:
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
