"""The front door: image → :func:`segment` → :class:`Segmentation` (labels + report) → save.

The command line, the napari panels, notebooks, batch and fine-tuning all call :func:`segment`;
none has a flow of its own. One model registry decides the engine
(:func:`medseg.models.registry.resolve_model`):

* ``"sam"`` — a SAM-family model (``litemedsam``, ``sam_vit_b``, ``medsam_vit_b``): prompts
  (:class:`~medseg.prompts.Box`, :class:`~medseg.prompts.Point`,
  :class:`~medseg.prompts.MaskPrompt`) on one or more key slices, then 3D propagation
  (:func:`medseg.predict.propagate.propagate`);
* ``"sam2"`` — SAM 2 / MedSAM2 (``sam2.1_hiera_tiny``, ``sam2.1_hiera_small``,
  ``sam2.1_hiera_base_plus``, ``medsam2``; checkpoints the user brings): the same prompts, then
  memory-attention propagation through the slices as video frames
  (:class:`medseg.predict.sam2.Sam2Propagator`);
* ``"unet"`` — an automatic MONAI U-Net (``unet-demo`` or a checkpoint path), optionally refined
  with a SAM-family model (``refine_with``).

Both return a label map on the image's exact grid and one report (:mod:`medseg.report`). Bad
input raises a :class:`~medseg.errors.MedsegError` before any slow work where the input allows
(prompts are checked against the image before the model loads); ``cancel`` stops long work with
:class:`~medseg.errors.Cancelled`. Importing this module is cheap (numpy only).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medseg.errors import Cancelled, InputError, PromptError, WeightsError
from medseg.prompts import (
    DEFAULT_BOX_MARGIN,
    Prompt,
    as_prompt_list,
    gt_object,
    key_prompts,
    prompts_to_json,
)
from medseg.volume import LabelMap, Volume

if TYPE_CHECKING:
    from medseg.predict.propagate import OracleResult, PropagationConfig, PropagationResult
    from medseg.predict.sam import VolumePredictor
    from medseg.progress import ProgressCallback

PathLike = str | os.PathLike[str]
#: ``cancel``: a callable returning True to stop, or a :class:`threading.Event`.
CancelToken = Callable[[], bool] | threading.Event


# --------------------------------------------------------------------------- result
@dataclass
class Segmentation:
    """The result of :func:`segment`.

    Attributes:
        labels: the label map ``(z, y, x)`` on the image's exact grid, with its label table.
        report: the run's report (:mod:`medseg.report`; the schema ``medseg segment --json``
            writes).
        image: the segmented image.
        probabilities: U-Net softmax ``(C, z, y, x)`` float32 on the image grid (class 0 =
            background) when asked for, else ``None``.
        instances: lesion instances (ids 1..N, largest first) when asked for, else ``None``.
        lesions: one row per lesion (:func:`medseg.instances.lesion_table`) with ``instances``.
        propagation: the SAM engine's per-slice records (``None`` for the U-Net).
        oracle: the per-slice oracle-box result when asked for (SAM with ground truth).
        predictor: the SAM engine's :class:`~medseg.predict.sam.VolumePredictor`, holding the
            slices it embedded; pass it as ``segment(..., predictor=seg.predictor)`` to prompt
            the same image again without embedding any slice twice (``None`` for the U-Net).
    """

    labels: LabelMap
    report: dict[str, Any]
    image: Volume = field(repr=False)
    probabilities: np.ndarray | None = field(default=None, repr=False)
    instances: LabelMap | None = field(default=None, repr=False)
    lesions: list[dict[str, Any]] | None = field(default=None, repr=False)
    propagation: PropagationResult | None = field(default=None, repr=False)
    oracle: OracleResult | None = field(default=None, repr=False)
    predictor: VolumePredictor | None = field(default=None, repr=False)

    def save(
        self,
        path: PathLike,
        report: PathLike | None = None,
        *,
        probabilities: PathLike | None = None,
        instances: PathLike | None = None,
        overwrite: bool = False,
        inputs: Iterable[PathLike] = (),
    ) -> dict[str, Path]:
        """Write the label map and its report (and optional extras) atomically.

        Every path is checked before anything is written: none may name an input (the image and
        ground truth of the run are inputs), exist without ``overwrite``, or repeat another.

        Args:
            path: the label map (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ``.mhd``), or a
                ``.dcm`` DICOM-SEG referencing the segmented DICOM series (the image must have
                been read from a DICOM folder or file); the report travels inside it too.
            report: the report JSON; default: beside the label map (``pred.nii.gz`` →
                ``pred.json``), so no label map exists without its provenance.
            probabilities: the U-Net probabilities as a vector image (needs
                ``segment(..., probabilities=True)``).
            instances: the lesion instance map; its table goes beside it as ``.csv`` (needs
                ``segment(..., instances=True)``).
            overwrite: replace existing files.
            inputs: further paths that must not be overwritten.

        Returns:
            ``{"labels": ..., "report": ..., ...}`` — the paths written.

        Raises:
            OutputError: a path is an input, exists, repeats another or is not writable.
            InputError: an extra was asked for that the run did not produce, or an unknown type.
        """
        from medseg.io.files import check_output_path, image_suffix, write_json, write_labels
        from medseg.report import report_path_for

        t0 = time.perf_counter()
        protected = [*self._input_paths(), *(str(p) for p in inputs)]
        plan: dict[str, Path] = {"labels": Path(path)}
        plan["report"] = Path(report) if report is not None else report_path_for(path)
        if probabilities is not None:
            if self.probabilities is None:
                raise InputError(
                    "no probabilities to save: run segment(..., probabilities=True) with a U-Net"
                )
            plan["probabilities"] = Path(probabilities)
        if instances is not None:
            if self.instances is None:
                raise InputError("no lesion instances to save: run segment(..., instances=True)")
            inst, csv_path = instance_paths(instances)
            plan["instances"], plan["lesions"] = inst, csv_path
        seg_ref = self._dicom_reference() if _is_dicom_path(plan["labels"]) else None
        for key in ("labels", "probabilities", "instances"):
            if key == "labels" and seg_ref is not None:
                continue
            if key in plan and image_suffix(plan[key]) is None:
                raise InputError(
                    f"{plan[key]}: unknown image type; use .nii.gz, .nii, .nrrd, .mha or .mhd"
                    + (" (or .dcm for a DICOM-SEG)" if key == "labels" else "")
                )
        resolved = [p.resolve() for p in plan.values()]
        if len(set(resolved)) != len(resolved):
            raise InputError("two outputs name the same file; give each output its own path")
        for p in plan.values():
            check_output_path(p, protected, overwrite=overwrite)

        if seg_ref is not None:
            from medseg.exports import export

            export(
                self.labels,
                seg_ref,
                "dicom-seg",
                plan["labels"],
                report=self.report,
                overwrite=overwrite,
            )
        else:
            write_labels(
                self.labels,
                plan["labels"],
                reference=self.image,
                inputs=protected,
                overwrite=overwrite,
            )
        if "probabilities" in plan:
            _write_probabilities(
                self.probabilities, self.image, plan["probabilities"], protected, overwrite
            )
        if "instances" in plan:
            from medseg.instances import write_lesion_table

            assert self.instances is not None
            write_labels(self.instances, plan["instances"], inputs=protected, overwrite=overwrite)
            write_lesion_table(
                self.lesions or [], plan["lesions"], inputs=protected, overwrite=overwrite
            )
        self.report["outputs"] = {k: str(v) for k, v in plan.items()}
        self.report["timings"]["write_s"] = round(time.perf_counter() - t0, 4)
        write_json(self.report, plan["report"], inputs=protected, overwrite=overwrite)
        return plan

    def save_report(self, path: PathLike, *, overwrite: bool = False) -> Path:
        """Write only the report (atomically; refuses to overwrite an input or, unless told,
        an existing file)."""
        from medseg.io.files import write_json

        return write_json(self.report, path, inputs=self._input_paths(), overwrite=overwrite)

    def _dicom_reference(self) -> str:
        """The DICOM series the image was read from (a DICOM-SEG must reference it)."""
        from medseg.io.dicom import is_dicom_file

        src = self.report.get("image", {}).get("path")
        src = self.image.meta.get("dicom_folder") or src  # a DICOMweb URL: its cached folder
        p = Path(src) if src else None
        if p is None or not (p.is_dir() or (p.is_file() and is_dicom_file(p))):
            raise InputError(
                "a DICOM-SEG (.dcm) references the DICOM series it was made on, but this image "
                f"was not read from DICOM ({src or 'an array in memory'}); save as .nii.gz or "
                ".nrrd, or segment the DICOM series"
            )
        return str(p)

    def _input_paths(self) -> list[str]:
        prov = self.report.get("provenance", {}).get("settings", {})
        paths = [self.report.get("image", {}).get("path"), prov.get("gt"), prov.get("weights")]
        paths.append(prov.get("decoder"))
        return [str(p) for p in paths if p]


def _is_dicom_path(path: PathLike) -> bool:
    return str(path).lower().endswith(".dcm")


def instance_paths(out: PathLike) -> tuple[Path, Path]:
    """``(label_map_path, csv_path)`` for a lesion-instance output (``x.nii.gz`` → ``x.csv``).

    Raises:
        InputError: not an image file name.
    """
    from medseg.io.files import image_suffix

    o = Path(out)
    suf = image_suffix(o)
    if suf is None:
        raise InputError(
            f"{o}: give the instance map an image file name (.nii.gz, .nrrd, ...); its table "
            "is written beside it as .csv"
        )
    return o, o.with_name(o.name[: -len(suf)] + ".csv")


# --------------------------------------------------------------------------- API
def read_volume(path: PathLike, series: str | None = None) -> Volume:
    """Read a 3D image: a DICOM folder (or file), NIfTI, NRRD or MHA (``(z, y, x)``, LPS)."""
    from medseg.io.files import read_volume as _read

    return _read(path, series=series)


def read_labels(
    path: PathLike, reference: Volume | None = None, labels: Mapping[int, str] | None = None
) -> LabelMap:
    """Read a label map, checked to lie on ``reference``'s grid when given."""
    from medseg.io.files import read_labels as _read

    return _read(path, reference=reference, labels=dict(labels) if labels else None)


def write_labels(
    labels: LabelMap,
    path: PathLike,
    reference: Volume | None = None,
    *,
    overwrite: bool = False,
    inputs: Iterable[PathLike] = (),
) -> Path:
    """Write a label map atomically on its grid (checked against ``reference`` when given)."""
    from medseg.io.files import write_labels as _write

    return _write(labels, path, reference=reference, inputs=list(inputs), overwrite=overwrite)


def evaluate(
    pred: LabelMap,
    gt: LabelMap | PathLike,
    labels: Mapping[int, str] | Iterable[int] | None = None,
    tolerance_mm: float = 1.0,
) -> list[dict[str, Any]]:
    """Per-label metrics of ``pred`` against ``gt`` (:func:`medseg.metrics.evaluate`).

    ``gt`` may be a path; it is read and checked to lie on ``pred``'s grid. Rows carry ``label``,
    ``name``, ``dice``, ``iou``, ``hd95``, ``hd``, ``msd`` (mm), ``surface_dice`` and volumes.
    """
    from medseg.metrics import evaluate as _evaluate

    if not isinstance(gt, LabelMap):
        gt = read_labels(gt, reference=pred)
    return _evaluate(pred, gt, labels=labels, tolerance_mm=tolerance_mm)


def segment(
    image: Volume | PathLike,
    model: PathLike = "litemedsam",
    prompts: Prompt | Iterable[Prompt] | None = None,
    *,
    gt: LabelMap | PathLike | None = None,
    label: int | None = None,
    name: str | None = None,
    weights: PathLike | None = None,
    decoder: PathLike | None = None,
    series: str | None = None,
    axis: str = "z",
    window: str | None = None,
    propagate: bool = True,
    config: PropagationConfig | None = None,
    oracle: bool = False,
    box_margin: float = DEFAULT_BOX_MARGIN,
    refine_with: str | None = None,
    refine_label: int | None = None,
    overlap: float = 0.25,
    blend: str = "gaussian",
    probabilities: bool = False,
    instances: bool = False,
    precision: str = "auto",
    device: str = "auto",
    runtime: str = "auto",
    cache_dir: PathLike | bool | None = True,
    predictor: VolumePredictor | None = None,
    provenance: Mapping[str, Any] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Segmentation:
    """Segment an image with any registered model; the one flow every front end calls.

    Args:
        image: a :class:`Volume` or a path (DICOM folder/file, NIfTI, NRRD, MHA).
        model: registry name (``litemedsam``, ``sam_vit_b``, ``medsam_vit_b``, the SAM 2 models
            ``sam2.1_hiera_tiny`` / ``_small`` / ``_base_plus`` and ``medsam2``, ``unet-demo``)
            or the path of a U-Net checkpoint. SAM 2 models take no ``decoder``/``oracle``;
            their ``config`` is a :class:`~medseg.predict.sam2.Sam2Config`.
        prompts: SAM models: one or more :class:`~medseg.prompts.Box` / ``Point`` /
            ``MaskPrompt`` (voxel coordinates ``(z, y, x)``; several key slices allowed).
            U-Net: must be ``None``.
        gt: ground truth (label map or path) on the image's grid: adds ``metrics``.
        label: SAM: the output label value, and the ground-truth label scored (default: the
            single label present, else all foreground as 1). U-Net: unused.
        name: SAM: the output label's name (default: from the ground truth's table, else
            ``"object"``).
        weights: SAM checkpoint file (else the weights cache / packaged copy).
        decoder: SAM: a fine-tuned mask decoder (``medseg finetune``) used with the base
            model's frozen encoder (same embedding cache); refused when trained on another base.
            Its training window is used when ``window`` is ``None``.
        series: SeriesInstanceUID when ``image`` is a DICOM folder with several series.
        axis: SAM propagation axis: ``'z'`` axial, ``'y'`` coronal, ``'x'`` sagittal.
        window: CT window preset / ``"LO,HI"`` / ``"percentile"`` for the SAM model (and the
            refinement); ``None`` chooses by modality.
        propagate: SAM: ``False`` segments the key slice(s) only.
        config: SAM propagation carry-over and stop rule (default: the measured defaults).
        oracle: SAM with ``gt``: also segment every ground-truth slice from a box around it (the
            per-slice upper bound of the protocol) and report it.
        box_margin: margin (pixels per side) of the oracle boxes.
        refine_with: U-Net: a SAM-family model that refines one label slice by slice.
        refine_label: U-Net: the label refined / split into lesion instances (default: the one
            named like a tumour).
        overlap: U-Net sliding-window overlap in ``[0, 0.9]``.
        blend: U-Net window blending, ``"gaussian"`` or ``"constant"``.
        probabilities: U-Net: keep the softmax ``(C, z, y, x)`` on the image grid.
        instances: split the lesion label into connected instances with a lesion table.
        precision: ``"auto"`` (bf16 where the CPU has native bf16), ``"fp32"`` or ``"bf16"``.
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        runtime: what runs the SAM image encoder: ``"auto"`` (see
            :func:`medseg.runtime.resolve_runtime`), ``"torch"`` or ``"openvino"`` (CPU, optional
            package; the converted encoder is cached under ``MEDSEG_HOME/openvino``).
        cache_dir: SAM embedding disk cache: ``True`` the default folder, a path, or
            ``None``/``False`` for memory only.
        predictor: SAM: a :class:`~medseg.predict.sam.VolumePredictor` already built on this
            image and axis, reused with its embeddings (napari keeps one per image).
        provenance: extra entries for the report's provenance (the command line adds ``argv``).
        progress: ``progress(done, total)`` per stage (propagation, oracle, U-Net windows,
            refinement); ``total`` may be an upper bound until the stage ends.
        cancel: a callable returning ``True`` (or a set :class:`threading.Event`) stops the work
            at the next step with :class:`~medseg.errors.Cancelled`.

    Returns:
        :class:`Segmentation` with ``labels`` on the image's grid and ``report``.

    Raises:
        MedsegError: bad image, prompts, ground truth, weights or settings (InputError,
            PromptError, GeometryError, WeightsError, CheckpointConfigError); Cancelled.
    """
    from medseg.models.registry import resolve_model

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    ref = resolve_model(model)
    plist = as_prompt_list(prompts)
    if weights is not None and not Path(weights).is_file():
        raise WeightsError(f"weights file {weights} does not exist; check the path")
    tick = _progress_with_cancel(progress, cancel)
    if ref.engine == "sam2" and (decoder is not None or oracle):  # SAM 2: memory propagation
        raise InputError(
            f"{ref.name} propagates with SAM 2 memory attention: decoder and oracle are for "
            "the slice-loop SAM models (litemedsam, sam_vit_b, medsam_vit_b)"
        )
    if ref.engine in ("sam", "sam2"):
        if refine_with is not None or probabilities:
            raise InputError(
                "refine_with and probabilities are U-Net options; a SAM model already outputs "
                "its own mask"
            )
        if not plist:
            raise PromptError(
                "no prompt: give a Box, Point or MaskPrompt (command line: --box, --point, "
                "--prompts FILE.json or --box-from-gt GT)"
            )
        if decoder is not None and window is None:
            from medseg.models.decoder import read_decoder

            window = read_decoder(decoder).window  # checked before any slow work
    else:
        if decoder is not None:
            raise InputError("decoder is a fine-tuned SAM decoder; the U-Net takes none")
        if plist:
            raise InputError(
                f"{ref.name} is an automatic U-Net: it takes no prompts (prompts are for "
                "litemedsam, sam_vit_b and medsam_vit_b)"
            )
        if weights is not None:
            raise InputError("weights is for SAM-family models; give the U-Net checkpoint as model")
        if refine_with is not None and resolve_model(refine_with).engine != "sam":
            raise InputError("refine_with takes a SAM-family model (litemedsam, sam_vit_b, ...)")

    t = time.perf_counter()
    image_path: str | None = None
    if not isinstance(image, Volume):
        image_path = str(image)
        image = read_volume(image, series=series)
    gt_path: str | None = None
    if gt is not None and not isinstance(gt, LabelMap):
        gt_path = str(gt)
        gt = read_labels(gt, reference=image)
    elif gt is not None:
        from medseg.volume import check_same_grid

        check_same_grid(gt, image, what="ground truth")
        gt_path = gt.meta.get("source")
    timings["read_s"] = time.perf_counter() - t

    settings: dict[str, Any] = {
        "model": str(model),
        "weights": str(weights) if weights else None,
        "decoder": str(decoder) if decoder else None,
        "gt": gt_path,
        "series": series,
        "precision": precision,
        "device": device,
        "runtime": runtime,
    }
    if provenance:
        settings["caller"] = dict(provenance)
    common = {
        "image": image,
        "image_path": image_path,
        "gt": gt,
        "timings": timings,
        "settings": settings,
        "tick": tick,
        "precision": precision,
        "device": device,
    }
    if ref.engine in ("sam", "sam2"):
        seg = _segment_sam(
            ref,
            plist,
            label=label,
            name=name,
            weights=weights,
            decoder=decoder,
            axis=axis,
            window=window,
            propagate=propagate,
            config=config,
            oracle=oracle,
            box_margin=box_margin,
            instances=instances,
            cache_dir=cache_dir,
            predictor=predictor,
            runtime=runtime,
            **common,
        )
    else:
        seg = _segment_unet(
            ref,
            window=window,
            refine_with=refine_with,
            refine_label=refine_label,
            overlap=overlap,
            blend=blend,
            probabilities=probabilities,
            instances=instances,
            **common,
        )
    timings["total_s"] = time.perf_counter() - t_start
    seg.report["timings"] = {k: round(float(v), 4) for k, v in timings.items()}
    return seg


# --------------------------------------------------------------------------- engines
def _segment_sam(
    ref: Any,
    plist: list[Prompt],
    *,
    image: Volume,
    image_path: str | None,
    gt: LabelMap | None,
    label: int | None,
    name: str | None,
    weights: PathLike | None,
    decoder: PathLike | None,
    axis: str,
    window: str | None,
    propagate: bool,
    config: PropagationConfig | None,
    oracle: bool,
    box_margin: float,
    instances: bool,
    cache_dir: PathLike | bool | None,
    predictor: VolumePredictor | None,
    timings: dict[str, float],
    settings: dict[str, Any],
    tick: ProgressCallback | None,
    precision: str,
    device: str,
    runtime: str = "auto",
) -> Segmentation:
    from medseg.predict.propagate import (
        DEFAULT_CONFIG,
        PropagationConfig,
        oracle_dice,
    )
    from medseg.predict.propagate import propagate as run_propagation
    from medseg.runtime import configure_threads

    configure_threads()  # MEDSEG_THREADS, when set, applies from here on
    settings["threads"] = _threads_in_effect()
    if ref.engine == "sam2" and str(runtime).strip().lower() == "openvino":
        raise InputError("runtime 'openvino' runs the LiteMedSAM/SAM encoders only; use torch")
    gt_mask: np.ndarray | None = None
    value, lname = (int(label) if label is not None else 1), "object"
    if gt is not None:
        gt_mask, value, lname = gt_object(gt, label)
    if name:
        lname = str(name)
    keys = key_prompts(plist, image.shape, axis)  # checked before the model loads
    cfg = config or DEFAULT_CONFIG
    if not propagate:
        cfg = PropagationConfig(**{**cfg.to_json(), "max_slices": 0})
    if oracle and gt_mask is None:
        raise InputError("oracle needs ground truth (the oracle boxes come from it)")

    t = time.perf_counter()
    if ref.engine == "sam2":  # SAM 2 / MedSAM2: memory-attention propagation
        from medseg.predict.sam2 import sam2_config, sam2_predictor

        cfg = sam2_config(config, propagate)  # type: ignore[assignment]
        pred: Any = sam2_predictor(
            ref,
            image,
            predictor,
            axis=axis,
            window=window,
            weights=weights,
            precision=precision,
            device=device,
        )
    else:
        pred = _sam_predictor(
            ref,
            image,
            predictor,
            axis=axis,
            window=window,
            weights=weights,
            decoder=decoder,
            cache_dir=cache_dir,
            precision=precision,
            device=device,
            runtime=runtime,
        )
    timings["model_load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    if ref.engine == "sam2":
        result = pred.propagate(keys, cfg, progress=tick)
    else:
        result = run_propagation(pred, keys, cfg, progress=tick)
    timings["segment_s"] = time.perf_counter() - t
    labels = result.to_labelmap(image, label=value, name=lname)

    metrics = None
    orc = None
    if gt is not None:
        assert gt_mask is not None
        t = time.perf_counter()
        gt_bin = LabelMap.like(image, gt_mask.astype(np.uint8) * np.uint8(value), {value: lname})
        metrics = _metrics(labels, gt_bin, {value: lname})
        timings["metrics_s"] = time.perf_counter() - t
        if oracle:
            t = time.perf_counter()
            orc = oracle_dice(pred, gt_mask, margin_px=box_margin, progress=tick)
            timings["oracle_s"] = time.perf_counter() - t
    inst = _instances(labels, value, timings) if instances else None

    dice = metrics[0]["dice"] if metrics else None
    oracle_json = None
    if orc is not None:
        oracle_json = orc.to_json()
        oracle_json["ratio"] = (
            round(dice / orc.dice, 4) if orc.dice > 0 and dice is not None else None
        )
    settings.update(
        axis=pred.axis,
        window=window,
        propagate=propagate,
        config=cfg.to_json(),
        label=label,
        name=name,
        oracle=oracle,
        box_margin=box_margin,
        instances=instances,
        cache_dir=str(cache_dir) if cache_dir not in (None, False, True) else cache_dir,
    )
    detail = {
        "axis": pred.axis,
        "label": {"value": value, "name": lname},
        "intensity": pred.intensity.key,
        "dice": dice,
        "key_prompts": [k.to_json() for k in keys],
        "config": cfg.to_json(),
        "propagation": result.to_json(),
        "oracle": oracle_json,
        "cache": pred.cache_info(),
        "instances": inst[2] if inst else None,
    }
    m = pred.model
    model_info = {
        "name": pred.spec.name,
        "engine": ref.engine,
        "weights": str(m.weights_path) if m.weights_path else None,
        "weights_sha256": m.weights_sha256,
        "decoder": str(m.decoder_path) if getattr(m, "decoder_path", None) else None,
        "decoder_sha256": getattr(m, "decoder_sha256", None),
        "precision": m.precision,
        "device": str(m.device),
        "runtime": getattr(m, "runtime", "torch"),
    }
    report = _report(
        ref.engine, image, image_path, model_info, labels, metrics, timings, settings, plist, detail
    )
    return Segmentation(
        labels=labels,
        report=report,
        image=image,
        propagation=result,
        oracle=orc,
        predictor=pred,
        instances=inst[0] if inst else None,
        lesions=inst[1] if inst else None,
    )


def _sam_predictor(
    ref: Any,
    image: Volume,
    predictor: VolumePredictor | None,
    *,
    axis: str,
    window: str | None,
    weights: PathLike | None,
    decoder: PathLike | None,
    cache_dir: PathLike | bool | None,
    precision: str,
    device: str,
    runtime: str = "auto",
) -> VolumePredictor:
    """The given predictor (checked to fit) or a new one on ``image``.

    With ``decoder`` the predictor gets its own model: the shared base model's encoders with a
    copy of the decoder holding the file's weights (the shared model is never modified, so
    plain runs keep the base decoder; the embedding cache is the base's).
    """
    from medseg.predict.sam import VolumePredictor, check_predictor_fits, predictor_cache_dir

    if predictor is not None:
        check_predictor_fits(predictor, image, axis, ref.spec.name)
        want = None
        if decoder is not None:
            from medseg.models.decoder import read_decoder

            want = read_decoder(decoder).sha256
        if getattr(predictor.model, "decoder_sha256", None) != want:
            raise InputError(
                "the predictor runs another decoder than the one asked for; build one with it"
            )
        return predictor
    model: Any = ref.spec.name
    if decoder is not None:
        from medseg.models.decoder import with_decoder
        from medseg.models.sam import get_sam_model

        base = get_sam_model(
            ref.spec, weights=weights, device=device, precision=precision, runtime=runtime
        )
        model = with_decoder(base, decoder)
    return VolumePredictor(
        image,
        model,
        axis=axis,
        window=window,
        weights=weights,
        cache_dir=predictor_cache_dir(cache_dir),
        precision=precision,
        device=device,
        runtime=runtime,
    )


def _segment_unet(
    ref: Any,
    *,
    image: Volume,
    image_path: str | None,
    gt: LabelMap | None,
    window: str | None,
    refine_with: str | None,
    refine_label: int | None,
    overlap: float,
    blend: str,
    probabilities: bool,
    instances: bool,
    timings: dict[str, float],
    settings: dict[str, Any],
    tick: ProgressCallback | None,
    precision: str,
    device: str,
) -> Segmentation:
    from medseg.instances import lesion_label
    from medseg.models.unet import config_sha256
    from medseg.predict.unet import UNetSegmenter
    from medseg.runtime import configure_threads

    configure_threads()  # MEDSEG_THREADS, when set, applies from here on
    settings["threads"] = _threads_in_effect()

    t = time.perf_counter()
    seg = UNetSegmenter.load(
        ref.path,
        labels=(gt.labels or None) if gt is not None else None,
        precision=precision,
        device=device,
    )
    timings["model_load_s"] = time.perf_counter() - t
    lesion = None
    if refine_with or instances:
        lesion = lesion_label(seg.labels, refine_label)
    t = time.perf_counter()
    res = seg.segment(
        image, overlap=overlap, blend=blend, progress=tick, return_probabilities=probabilities
    )
    timings["segment_s"] = time.perf_counter() - t
    labels, probs = res if isinstance(res, tuple) else (res, None)
    metrics = metrics_unet = None
    if gt is not None:
        t = time.perf_counter()
        metrics = _metrics(labels, gt, seg.labels)
        timings["metrics_s"] = time.perf_counter() - t
    refine = None
    if refine_with:
        from medseg.predict.hybrid import refine_with_sam

        assert lesion is not None
        t = time.perf_counter()
        refined = refine_with_sam(
            image,
            labels,
            lesion,
            model=refine_with,
            progress=tick,
            window=window or _unet_window(seg.config),
            precision=precision,
            device=device,
        )
        timings["refine_s"] = time.perf_counter() - t
        refine = dict(refined.meta.get("refined", {}))
        if gt is not None:
            metrics_unet = metrics
            metrics = _metrics(refined, gt, seg.labels)
        labels = refined
    inst = _instances(labels, lesion, timings) if instances else None
    settings.update(
        window=window,
        refine_with=refine_with,
        refine_label=refine_label,
        overlap=overlap,
        blend=blend,
        probabilities=probabilities,
        instances=instances,
    )
    detail = {
        "checkpoint": seg.source,
        "config_sha256": config_sha256(seg.config),
        "target_spacing": [float(s) for s in seg.config["target_spacing"]],
        "patch_size": [int(s) for s in seg.config["patch_size"]],
        "overlap": overlap,
        "blend": blend,
        "refine": refine,
        "metrics_unet": metrics_unet,
        "instances": inst[2] if inst else None,
    }
    from medseg.models.weights import sha256_file

    model_info = {
        "name": ref.name,
        "engine": "unet",
        "weights": seg.source,
        "weights_sha256": sha256_file(seg.source),
        "decoder": None,
        "decoder_sha256": None,
        "precision": seg.precision,
        "device": str(seg.device),
        "runtime": "torch",
    }
    report = _report(
        "unet", image, image_path, model_info, labels, metrics, timings, settings, [], detail
    )
    return Segmentation(
        labels=labels,
        report=report,
        image=image,
        probabilities=probs,
        instances=inst[0] if inst else None,
        lesions=inst[1] if inst else None,
    )


# --------------------------------------------------------------------------- helpers
def _metrics(pred: LabelMap, gt: LabelMap, labels: Mapping[int, str]) -> list[dict[str, Any]]:
    from medseg.metrics import evaluate as _evaluate
    from medseg.metrics import rows_to_json

    return rows_to_json(_evaluate(pred, gt, labels=dict(labels)))


def _instances(
    labels: LabelMap, value: int | None, timings: dict[str, float]
) -> tuple[LabelMap, list[dict[str, Any]], dict[str, Any]]:
    """``(instance map, lesion table, report entry)`` of the lesion label's components."""
    from medseg.instances import label_lesions, lesion_table, semantic_to_panoptic

    t = time.perf_counter()
    value = int(value if value is not None else 1)
    inst = label_lesions(labels.array == value, labels.spacing)
    n = int(inst.max(initial=0))
    names = {k: f"{labels.name(value)}_{k}" for k in range(1, n + 1)}
    lm = LabelMap.like(labels, inst, names)
    rows = lesion_table(inst, labels)
    _, pan_table = semantic_to_panoptic(labels, [value])
    timings["instances_s"] = time.perf_counter() - t
    return lm, rows, {"label": value, "lesions": n, "rows": rows, "panoptic": pan_table}


def _unet_window(config: Mapping[str, Any]) -> str:
    """The U-Net's own intensity mapping as a ``window`` for the SAM refinement.

    On the phantoms the U-Net's abdomen window let LiteMedSAM see the hypodense tumours; the
    SAM default (wide, -1000..400 HU) made the refinement worse than the U-Net alone.
    """
    it = config.get("intensity") or {}
    if it.get("kind") == "window":
        return f"{float(it['lo']):g},{float(it['hi']):g}"
    return "percentile"


def _report(
    engine: str,
    image: Volume,
    image_path: str | None,
    model_info: dict[str, Any],
    labels: LabelMap,
    metrics: list[dict[str, Any]] | None,
    timings: dict[str, float],
    settings: dict[str, Any],
    plist: list[Prompt],
    detail: dict[str, Any],
) -> dict[str, Any]:
    from medseg import report as rep

    extra = settings.pop("caller", None)
    return rep.new_report(
        engine,
        image=rep.image_info(image, image_path),
        model=model_info,
        labels=labels,
        metrics=metrics,
        timings=timings,
        provenance=rep.provenance(settings, prompts_to_json(plist), extra),
        detail=detail,
    )


def _progress_with_cancel(
    progress: ProgressCallback | None, cancel: CancelToken | None
) -> ProgressCallback | None:
    """A progress callback that also raises :class:`Cancelled` once ``cancel`` says so."""
    if cancel is None:
        return progress
    is_set = cancel.is_set if isinstance(cancel, threading.Event) else cancel

    def tick(done: int, total: int) -> None:
        if is_set():
            raise Cancelled("cancelled")
        if progress is not None:
            progress(done, total)

    return tick


def _write_probabilities(
    probs: np.ndarray | None, image: Volume, out: Path, inputs: list[str], overwrite: bool
) -> None:
    """``(C, z, y, x)`` probabilities → one vector image (components = classes) on the grid."""
    import SimpleITK as sitk

    from medseg.io.files import write_sitk_image

    assert probs is not None
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(probs, 0, -1)), isVector=True)
    img.SetSpacing(image.spacing_xyz)
    img.SetOrigin(image.origin)
    img.SetDirection(tuple(float(v) for v in image.direction.reshape(-1)))
    write_sitk_image(img, out, inputs=inputs, overwrite=overwrite)


def _threads_in_effect() -> int:
    import torch

    return int(torch.get_num_threads())
