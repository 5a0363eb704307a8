"""Batch segmentation over many studies: resumable, with per-study reports, metrics and plots.

Every study goes through :func:`medseg.segment` (no other flow) and is saved with
:meth:`~medseg.pipeline.Segmentation.save`. The output folder::

    OUT/studies/<study>.nii.gz   label map on the study's source grid
    OUT/studies/<study>.json     its report (the pipeline's schema, provenance["batch"] added)
    OUT/metrics.csv              one row per study and label: study, label, name, dice, iou, hd95,
                                 status, error (a failed study: one row, status "failed")
    OUT/summary.json             per label: mean, median, std, count of dice / iou / hd95;
                                 failures listed
    OUT/plots/dice_per_label.png Dice per label (box + strip plot)
    OUT/plots/worst_slices.png   the worst studies' worst slices (image, ground truth, prediction)

Studies come from ``data`` (:func:`find_studies`): an MSD / nnU-Net dataset folder
(``dataset.json``), or a folder of studies — image files (NIfTI/NRRD/MHA) and DICOM subfolders —
where the ground truth of study ``NAME`` is the file ``NAME_gt.<ext>`` beside it — or from a
PACS query (:func:`medseg.io.remote.query_series`): ``data`` a QIDO-RS address with filters
(``http://host/dicom-web/studies?Modality=CT&PatientID=X``, or ``dimse://AET@HOST:PORT?...``),
one study per matching image series, its id the series URL (its files are named by the
SeriesInstanceUID).

Pushing (``push=True``): each study's label map is also written as a DICOM-SEG
(``OUT/studies/<study>.dcm``) and stored as a new series of the source study on the server it was
read from (or ``to``); ``OUT/studies/<study>.push.json`` records what was stored (server,
SOPInstanceUID, the settings fingerprint and the label map's digest), so a rerun never pushes the
same result twice, and a push that failed (the study then fails, its label map kept) is retried
by the rerun without segmenting again.

Resuming: a rerun skips a study whose outputs are complete and valid — its report follows the
schema, names the expected files, was made with the same settings (a fingerprint), its image
digest equals the image's now, and the label map reads back with the report's shape and voxel
counts. Anything else is redone. Aggregate files are rebuilt from the per-study files on every
run, and every file is written atomically, so a run killed at any moment and rerun ends with the
same outputs as an uninterrupted run. Importing this module is cheap (numpy only).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError, MedsegError, OutputError

PathLike = str | os.PathLike[str]
#: Suffixes marking a ground-truth file beside a study in a plain folder (``NAME_gt.nii.gz``).
GT_SUFFIX = "_gt"
#: Columns of ``metrics.csv``.
METRICS_COLUMNS = ("study", "label", "name", "dice", "iou", "hd95", "status", "error")
#: Metrics summarised per label in ``summary.json``.
SUMMARY_METRICS = ("dice", "iou", "hd95")
#: How many of the worst studies the overlay plot shows.
WORST_STUDIES = 4
#: Version of the ``provenance["batch"]`` entry (bump when the fingerprint's content changes).
BATCH_VERSION = 1

_PART_MARK = ".part"


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Study:
    """One study of a batch.

    Attributes:
        id: study identifier (file name without suffix, DICOM folder name, dataset case id);
            names the output files.
        image: image file or DICOM folder.
        gt: ground-truth label map, or ``None``.
    """

    id: str
    image: Path | str
    gt: Path | None = None

    @property
    def remote(self) -> bool:
        """The image is a series URL (DICOMweb or DIMSE), not a local path."""
        from medseg.io.remote import is_remote_url

        return is_remote_url(self.image)


@dataclass
class StudyResult:
    """What happened to one study.

    Attributes:
        study: the study id.
        status: ``"ok"`` (segmented now), ``"skipped"`` (valid outputs kept from an earlier run),
            ``"failed"`` (``error`` says why; a failed push too) or, in a dry run, ``"run"`` /
            ``"skip"``.
        error: the one-line error of a failed study (``""`` otherwise).
        labels: the label map written (or kept).
        report: its report.
        seconds: wall time spent on the study by its worker.
        worker: ``"host:pid"`` of the process that handled it.
        model_loaded: this study made its worker load the model (once per worker process).
        pushed: SOPInstanceUID of the DICOM-SEG stored on the server for this result (now or by
            an earlier run); ``""`` when not pushed.
    """

    study: str
    status: str
    error: str = ""
    labels: Path | None = None
    report: Path | None = None
    seconds: float = 0.0
    worker: str = ""
    model_loaded: bool = False
    pushed: str = ""


@dataclass
class BatchResult:
    """The outcome of :func:`batch`.

    Attributes:
        out: the output folder.
        model: the model (name or checkpoint path) as given.
        studies: one :class:`StudyResult` per study, in study order.
        metrics_csv, summary_json: aggregate files (``None`` in a dry run).
        plots: plot files written (may be empty: no ground truth, or ``plots=False``).
        dry_run: nothing was written.
        push: the results were pushed (``metrics.csv`` then has a ``pushed`` column).
    """

    out: Path
    studies: list[StudyResult]
    model: str = ""
    push: bool = False
    metrics_csv: Path | None = None
    summary_json: Path | None = None
    plots: list[Path] = field(default_factory=list)
    dry_run: bool = False
    protocol: str | None = None  # "interactive": medseg.protocol per study (issue 15)
    clicks: int = 5

    @property
    def failed(self) -> list[StudyResult]:
        """The studies that failed."""
        return [r for r in self.studies if r.status == "failed"]

    @property
    def ok(self) -> bool:
        """True when no study failed."""
        return not self.failed

    def counts(self) -> dict[str, int]:
        """``{status: number of studies}``."""
        out: dict[str, int] = {}
        for r in self.studies:
            out[r.status] = out.get(r.status, 0) + 1
        return out


# --------------------------------------------------------------------------- discovery
def find_studies(data: PathLike) -> list[Study]:
    """The studies of ``data``, in a stable order.

    ``data`` is either an MSD / nnU-Net raw dataset (a ``dataset.json`` inside: the training
    cases with their labels, then the test cases without), or a folder of studies: each image
    file (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ``.mhd``) and each subfolder (a DICOM
    series) is a study named after it; the ground truth of study ``NAME`` is ``NAME_gt.<ext>``
    (any of those suffixes) in the same folder. Hidden entries are ignored.

    ``data`` may also be a PACS query address (:func:`medseg.io.remote.query_series`): one study
    per matching image series, its id the series URL, without ground truth.

    Raises:
        InputError: no such folder, no studies, two studies with one name, a malformed dataset;
            RemoteError: the server cannot be reached or refuses the query.
    """
    from medseg.io.remote import is_remote_url

    if is_remote_url(data):
        return _remote_studies(str(data))
    root = Path(data)
    if not root.is_dir():
        raise InputError(f"{root}: no such folder; --data takes a dataset or a folder of studies")
    has_json = (root / "dataset.json").is_file()
    studies = _dataset_studies(root) if has_json else _folder_studies(root)
    if not studies:
        raise InputError(
            f"{root}: no studies found; expected image files (.nii.gz, .nrrd, ...), DICOM "
            "subfolders or a dataset.json"
        )
    seen: dict[str, Path] = {}
    for s in studies:
        if s.id in seen:
            raise InputError(
                f"two studies are named {s.id!r} ({seen[s.id]} and {s.image}); rename one"
            )
        seen[s.id] = s.image
    return studies


def _remote_studies(url: str) -> list[Study]:
    from medseg.io.remote import query_series

    rows = query_series(url)
    if not rows:
        raise InputError(
            f"{url.split('?', 1)[0]}: the query matched no image series; check the filters "
            "(medseg search lists what the server holds)"
        )
    urls = list(dict.fromkeys(str(r["url"]) for r in rows))
    return [Study(u, u, None) for u in urls]


def _dataset_studies(root: Path) -> list[Study]:
    from medseg.io.datasets import load_dataset
    from medseg.io.files import image_suffix

    ds = load_dataset(root)
    out = [Study(cid, img, lab) for cid, (img, lab) in zip(ds.case_ids, ds.training, strict=True)]
    for img in ds.test:
        suf = image_suffix(img) or ""
        cid = img.name[: -len(suf)] if suf else img.stem
        if ds.layout == "nnunet" and cid.endswith("_0000"):
            cid = cid[: -len("_0000")]
        out.append(Study(cid, img, None))
    return out


def _folder_studies(root: Path) -> list[Study]:
    from medseg.io.files import image_suffix

    files: dict[str, Path] = {}
    gts: dict[str, Path] = {}
    studies: list[Study] = []
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or _PART_MARK in entry.name:
            continue
        if entry.is_dir():
            studies.append(Study(entry.name, entry, None))
            continue
        suf = image_suffix(entry)
        if suf is None:
            continue  # .raw of an .mhd, notes, ...
        stem = entry.name[: -len(suf)]
        if stem.endswith(GT_SUFFIX):
            gts.setdefault(stem[: -len(GT_SUFFIX)], entry)
        elif stem in files:
            raise InputError(
                f"two studies are named {stem!r} ({files[stem].name} and {entry.name}); rename one"
            )
        else:
            files[stem] = entry
            studies.append(Study(stem, entry, None))
    return sorted((Study(s.id, s.image, gts.get(s.id)) for s in studies), key=lambda s: s.id)


# --------------------------------------------------------------------------- prompts
def load_batch_prompts(
    prompts: PathLike | Mapping[str, Any], axis: str | None = None
) -> dict[str, list[Any]]:
    """Per-study prompts: ``{study id: [Box | Point | MaskPrompt, ...]}``.

    Args:
        prompts: a JSON file, or a mapping, from study id to either a list of prompt objects or
            an object in the prompts-file format (``{"axis", "boxes", "points", "masks"}``, see
            :mod:`medseg.prompts`; mask files relative to the JSON file).
        axis: the propagation axis; each entry's ``axis`` must agree.

    Raises:
        InputError: unreadable file, not an object, a malformed entry.
    """
    from medseg.prompts import as_prompt_list, prompts_from_json

    base = Path(".")
    where = "prompts"
    if isinstance(prompts, Mapping):
        data: Any = prompts
    else:
        p = Path(prompts)
        where, base = str(p), p.parent
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise InputError(f"{p}: no such prompts file") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"{p}: not a readable JSON prompts file ({exc})") from None
        if not isinstance(data, dict):
            raise InputError(
                f'{p}: a batch prompts file maps study ids to prompts: {{"case1": {{"boxes": '
                "[...]}}, ...}}"
            )
    out: dict[str, list[Any]] = {}
    for sid, entry in data.items():
        if isinstance(entry, Mapping):
            out[str(sid)] = prompts_from_json(
                dict(entry), axis=axis, where=f"{where}[{sid!r}]", base_dir=base
            )
        else:
            out[str(sid)] = as_prompt_list(entry)
    return out


# --------------------------------------------------------------------------- paths
def study_paths(out: PathLike, study_id: str) -> tuple[Path, Path]:
    """``(label map, report)`` paths of a study in the output folder (a series-URL study is named
    by its SeriesInstanceUID)."""
    d = Path(out) / "studies"
    stem = _file_stem(study_id)
    return d / f"{stem}.nii.gz", d / f"{stem}.json"


def push_paths(out: PathLike, study_id: str) -> tuple[Path, Path]:
    """``(DICOM-SEG, push record)`` paths of a study whose result is pushed."""
    d = Path(out) / "studies"
    stem = _file_stem(study_id)
    return d / f"{stem}.dcm", d / f"{stem}.push.json"


def _file_stem(study_id: str) -> str:
    from medseg.io.remote import is_remote_url, parse_remote_series

    return parse_remote_series(study_id).series if is_remote_url(study_id) else study_id


def _fingerprint(model: str, prompts: Any, kwargs: Mapping[str, Any]) -> str:
    """sha256 of everything that decides a study's result (model, its prompts, the settings)."""
    blob = json.dumps(
        {"version": BATCH_VERSION, "model": model, "prompts": prompts, "kwargs": kwargs},
        sort_keys=True,
        default=_jsonable,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


#: ``segment`` parameters the batch sets per study, or that do not change a result
_PER_STUDY = ("image", "model", "prompts", "gt", "progress", "cancel", "provenance", "predictor")
_NOT_RESULT = ("cache_dir",)


def _settings(segment_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Every :func:`medseg.segment` setting of the run (its defaults filled in), so that a
    setting given explicitly at its default value fingerprints like one left out.

    Raises:
        InputError: a keyword :func:`medseg.segment` does not take, or one the batch sets.
    """
    import inspect

    from medseg.pipeline import segment

    params = inspect.signature(segment).parameters
    for k in segment_kwargs:
        if k in _PER_STUDY:
            raise InputError(f"batch sets {k!r} per study; do not pass it")
        if k not in params:
            raise InputError(
                f"unknown segment option {k!r}; see help(medseg.segment) for the options"
            )
    eff = {
        n: p.default
        for n, p in params.items()
        if n not in _PER_STUDY and n not in _NOT_RESULT and p.default is not inspect.Parameter.empty
    }
    eff.update({k: v for k, v in segment_kwargs.items() if k not in _NOT_RESULT})
    return dict(sorted(eff.items()))


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_json"):
        return obj.to_json()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()
    return str(obj)


def _model_key(model: PathLike) -> str:
    """The model name, or a checkpoint path with its content digest (so a new file reruns)."""
    from medseg.models.registry import resolve_model

    ref = resolve_model(model)
    path = getattr(ref, "path", None)
    if path is not None and Path(str(model)).exists():
        from medseg.models.weights import sha256_file

        return f"{Path(path).resolve()}#{sha256_file(path)}"
    return str(model)


# --------------------------------------------------------------------------- one study
@dataclass(frozen=True)
class _Task:
    study: Study
    out: str
    model: str
    prompts: tuple[Any, ...] | None
    prompts_from_gt: bool
    fingerprint: str
    push: bool  # store the result's DICOM-SEG (on push_to, else the study's server)
    push_to: str | None
    overwrite: bool
    kwargs: dict[str, Any]
    protocol: str | None = None  # "interactive": medseg.protocol.run_batch_study (issue 15)
    clicks: int = 5


#: worker-local models, keyed by (model, precision, device): each worker process loads once
_WORKER_MODELS: dict[tuple[str, str, str], Any] = {}
_WORKER_LOCK = threading.Lock()


def _warm_model(model: str, precision: str, device: str) -> bool:
    """Load ``model`` once per worker process and keep it (SAM models through their memo).

    SAM-family models are remembered by :func:`medseg.models.sam.get_sam_model`, which the
    pipeline's predictor uses, so holding the object here keeps it loaded for every study; a
    U-Net is kept by :func:`medseg.predict.unet.keep_loaded`, which the pipeline's load finds.
    Thread-safe (a Dask worker may run several threads). Returns True when this call loaded it.
    """
    key = (model, precision, device)
    with _WORKER_LOCK:
        if key in _WORKER_MODELS:
            return False
        from medseg.models.registry import resolve_model

        ref = resolve_model(model)
        if ref.engine == "sam2":  # SAM 2: remembered by get_sam2_model (weights resolved there)
            from medseg.models.sam2 import get_sam2_model

            loaded: Any = get_sam2_model(ref.spec, precision=precision, device=device)
        elif ref.engine == "sam":
            from medseg.models.sam import get_sam_model

            loaded = get_sam_model(ref.spec.name, precision=precision, device=device)
        else:
            from medseg.predict.unet import UNetSegmenter, keep_loaded

            loaded = UNetSegmenter.load(ref.path, precision=precision, device=device)
            keep_loaded(loaded, precision, device)
        _WORKER_MODELS[key] = loaded
        return True


def _worker_id() -> str:
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def check_study_outputs(study: Study, out: PathLike, fingerprint: str | None = None) -> str | None:
    """Why the outputs of ``study`` in ``out`` are not complete and valid, or ``None`` if they are.

    Checks (not file existence alone): the report parses and follows the schema, names this
    label map and report, carries this study id and settings ``fingerprint`` (when given), its
    image digest equals the study image's now, and so does the ground truth's (metrics and a GT
    box depend on it), and the label map reads back on the report's grid with its voxel counts.
    """
    from medseg.io.files import read_labels, read_volume
    from medseg.report import labels_info, validate_report

    lab_path, rep_path = study_paths(out, study.id)
    if not rep_path.is_file() or not lab_path.is_file():
        return "missing"
    try:
        rep = json.loads(rep_path.read_text(encoding="utf-8"))
        validate_report(rep)
    except (OSError, ValueError, MedsegError) as exc:
        return f"report unreadable or invalid ({str(exc).splitlines()[0]})"
    outputs = rep.get("outputs") or {}
    names = (Path(str(outputs.get("labels"))).name, Path(str(outputs.get("report"))).name)
    if names != (lab_path.name, rep_path.name):
        return "report names other files"
    info = (rep.get("provenance") or {}).get("batch") or {}
    if info.get("study") != study.id:
        return "report is for another study"
    if fingerprint is not None and info.get("fingerprint") != fingerprint:
        return "made with other settings"
    if study.gt is not None and not rep.get("metrics"):
        return "no metrics although the study has ground truth"
    try:
        from medseg.predict.cache import array_digest

        image = read_volume(study.image)
        if array_digest(image.array) != rep["image"]["sha256"]:
            return "the image changed"
        gt_now = array_digest(read_labels(study.gt).array) if study.gt is not None else None
        if gt_now != info.get("gt_sha256"):
            return "the ground truth changed"
        lm = read_labels(lab_path)
    except MedsegError as exc:
        return f"unreadable ({str(exc).splitlines()[0]})"
    if list(lm.shape) != list(rep["image"]["shape"]) or not lm.same_grid(image):
        return "label map is not on the image grid"
    want = {int(e["value"]): int(e["voxels"]) for e in rep["labels"]}
    have = {int(e["value"]): int(e["voxels"]) for e in labels_info(lm)}
    if {k: v for k, v in have.items() if v} != {k: v for k, v in want.items() if v}:
        return "label map does not match its report"
    return None


def _run_study(task: _Task) -> StudyResult:
    """Segment one study (or keep its valid outputs); never raises for a bad study."""
    if task.protocol:  # --protocol interactive (issue 15)
        from medseg.protocol import run_batch_study

        return run_batch_study(task)
    import medseg
    from medseg.io.files import read_labels, read_volume

    t0 = time.perf_counter()
    study = task.study
    lab_path, rep_path = study_paths(task.out, study.id)
    res = StudyResult(study.id, "ok", labels=lab_path, report=rep_path, worker=_worker_id())
    try:
        if not task.overwrite and check_study_outputs(study, task.out, task.fingerprint) is None:
            res.status = "skipped"
            if task.push:
                res.pushed = _push_study(task)
            return res
        kwargs = dict(task.kwargs)
        res.model_loaded = _warm_model(
            task.model, kwargs.get("precision", "auto"), kwargs.get("device", "auto")
        )
        image = read_volume(study.image)
        image.meta.setdefault("source", str(study.image))
        gt = read_labels(study.gt, reference=image) if study.gt is not None else None
        gt_digest = None
        if gt is not None:
            from medseg.predict.cache import array_digest

            gt.meta.setdefault("source", str(study.gt))
            gt_digest = array_digest(gt.array)
        prompts: Any = list(task.prompts) if task.prompts is not None else None
        if task.prompts_from_gt:
            if gt is None:
                raise InputError(
                    f"study {study.id}: no ground truth ({study.id}{GT_SUFFIX}.nii.gz) to draw "
                    "the prompt box from"
                )
            prompts = [
                medseg.box_from_gt(gt, label=kwargs.get("label"), axis=kwargs.get("axis", "z"))
            ]
        seg = medseg.segment(
            image,
            model=task.model,
            prompts=prompts,
            gt=gt,
            provenance={
                "batch": {
                    "version": BATCH_VERSION,
                    "study": study.id,
                    "fingerprint": task.fingerprint,
                    "image": str(study.image),
                    "gt": str(study.gt) if study.gt else None,
                    "gt_sha256": gt_digest,
                    "prompts_from_gt": task.prompts_from_gt,
                }
            },
            **kwargs,
        )
        inputs = [p for p in (study.image, study.gt) if p is not None and not study.remote]
        seg.save(lab_path, report=rep_path, overwrite=True, inputs=inputs)
        if task.push:
            res.pushed = _push_study(task)
    except _PushFailed as exc:
        res.status, res.error = "failed", _one_line(f"push failed: {exc}; rerun to push again")
    except MedsegError as exc:
        res.status, res.error = "failed", _one_line(str(exc))
    except Exception as exc:  # a bug or a library error in one study must not stop the batch
        res.status, res.error = "failed", _one_line(f"{type(exc).__name__}: {exc}")
    res.seconds = round(time.perf_counter() - t0, 4)
    return res


class _PushFailed(Exception):
    """Storing a study's DICOM-SEG failed (its label map and report are kept)."""


def _push_study(task: _Task) -> str:
    """Write the study's DICOM-SEG and store it, unless its push record says this result is
    already on that server. Returns the stored SOPInstanceUID.

    Raises:
        InputError: the study is no DICOM series.
        _PushFailed: the SEG cannot be written or the server refuses / is down.
    """
    from medseg.exports import export
    from medseg.io.files import read_labels, write_json
    from medseg.io.remote import fetch_series, push_result, push_target
    from medseg.predict.cache import array_digest

    study = task.study
    lab_path, rep_path = study_paths(task.out, study.id)
    seg_path, record_path = push_paths(task.out, study.id)
    if not study.remote and not Path(study.image).is_dir():
        raise InputError(
            f"study {study.id} is not a DICOM series: --push stores DICOM-SEGs of DICOM studies"
        )
    try:
        target = push_target(study.image, task.push_to)
        labels = read_labels(lab_path)
        digest = array_digest(labels.array)
        old = _read_push_record(record_path)
        if (
            old.get("to") == target
            and old.get("fingerprint") == task.fingerprint
            and old.get("labels_sha256") == digest
            and old.get("sop_instance_uid")
        ):
            return str(old["sop_instance_uid"])
        record_path.unlink(missing_ok=True)
        reference: Any = fetch_series(str(study.image)) if study.remote else study.image
        report = json.loads(rep_path.read_text(encoding="utf-8"))
        export(labels, reference, "dicom-seg", seg_path, report=report, overwrite=True)
        stored = push_result(seg_path, source=study.image, to=task.push_to)
    except MedsegError as exc:
        raise _PushFailed(str(exc)) from None
    record = {
        **stored.to_json(),
        "study": study.id,
        "fingerprint": task.fingerprint,
        "labels_sha256": digest,
        "file": seg_path.name,
    }
    write_json(record, record_path, overwrite=True)
    return stored.sop_instance


def _read_push_record(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _one_line(text: str) -> str:
    return " ".join(text.split()) or "failed"


# --------------------------------------------------------------------------- executors
def _run_local(
    tasks: list[_Task], workers: int, on_done: Callable[[StudyResult], None]
) -> list[StudyResult]:
    if workers <= 1 or len(tasks) <= 1:
        out = []
        for t in tasks:
            r = _run_study(t)
            on_done(r)
            out.append(r)
        return out
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor, as_completed

    done: list[StudyResult] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        futs = {ex.submit(_run_study, t): t for t in tasks}
        for f in as_completed(futs):
            r = _result_or_failure(f, futs[f])
            on_done(r)
            done.append(r)
    return done


def _result_or_failure(future: Any, task: _Task) -> StudyResult:
    """A future's :class:`StudyResult`; a lost worker (killed, out of memory) fails the study."""
    try:
        return future.result()
    except Exception as exc:
        return StudyResult(
            task.study.id, "failed", error=_one_line(f"worker lost: {type(exc).__name__}: {exc}")
        )


def _run_dask(
    tasks: list[_Task],
    workers: int,
    scheduler: Any,
    on_done: Callable[[StudyResult], None],
) -> list[StudyResult]:
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError:
        raise InputError(
            "--executor dask needs dask.distributed: pip install 'medseg[batch]' "
            "(or 'dask[distributed]')"
        ) from None
    cluster = None
    if scheduler is None:
        cluster = LocalCluster(
            n_workers=max(1, workers),
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
        )
        client = Client(cluster)
    elif isinstance(scheduler, Client):
        client = scheduler
    else:
        try:
            client = Client(str(scheduler), timeout="20s")
        except OSError as exc:
            raise InputError(
                f"cannot reach the Dask scheduler {scheduler}: {exc}; check the address "
                "(tcp://HOST:8786)"
            ) from None
    try:
        futs = {
            client.submit(_run_study, t, key=f"medseg-study-{t.study.id}-{t.fingerprint[:12]}"): t
            for t in tasks
        }
        done: list[StudyResult] = []
        for f in as_completed(list(futs)):
            r = _result_or_failure(f, futs[f])
            on_done(r)
            done.append(r)
        return done
    finally:
        if client is not scheduler:
            client.close()
        if cluster is not None:
            cluster.close()


# --------------------------------------------------------------------------- main
def batch(
    data: PathLike,
    model: PathLike,
    out: PathLike,
    *,
    prompts_from_gt: bool = False,
    prompts: PathLike | Mapping[str, Any] | None = None,
    workers: int = 1,
    executor: str = "local",
    scheduler: Any = None,
    dry_run: bool = False,
    overwrite: bool = False,
    plots: bool = True,
    push: bool = False,
    to: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_study: Callable[[StudyResult], None] | None = None,
    protocol: str | None = None,
    clicks: int = 5,
    **segment_kwargs: Any,
) -> BatchResult:
    """Segment every study of ``data`` with ``model`` through :func:`medseg.segment`.

    Args:
        data: an MSD / nnU-Net dataset folder, a folder of studies, or a PACS query address
            (QIDO-RS URL with filters, or ``dimse://...``; see :func:`find_studies`).
        model: registry name (``unet-demo``, ``litemedsam``, ...) or a U-Net checkpoint path.
        out: output folder (layout in the module docstring); must lie outside ``data``.
        prompts_from_gt: SAM models: one box around each study's ground truth on its largest
            slice (``label=`` in ``segment_kwargs`` picks the label; default all foreground).
        prompts: SAM models: per-study prompts, a JSON file or mapping
            (:func:`load_batch_prompts`); a study without an entry fails.
        workers: parallel workers (processes).
        executor: ``"local"`` (this machine: in-process for 1 worker, else a process pool) or
            ``"dask"`` (a ``LocalCluster`` of ``workers`` processes, or ``scheduler``).
        scheduler: a Dask scheduler address (``tcp://host:8786``) or ``distributed.Client`` to
            run on instead of a new ``LocalCluster``.
        dry_run: list what would run (``"run"``) or be kept (``"skip"``); write nothing.
        overwrite: redo every study even when its outputs are complete.
        plots: write the plots (needs matplotlib).
        push: also write each DICOM study's label map as a DICOM-SEG and store it on the server
            it was read from (STOW-RS / C-STORE) as a new series of its study; recorded per study
            (a failed push fails the study, is retried by a rerun; a stored one is never resent).
        to: the server to push to (DICOMweb root or ``dimse://AET@HOST:PORT``); needed when
            ``data`` is local.
        progress: ``progress(done, total)`` after each study.
        on_study: called with each :class:`StudyResult` as it finishes (any order).
        protocol: ``"interactive"``: run the SEGFM3D protocol (:mod:`medseg.protocol`: the
            challenge box + ``clicks`` corrective clicks) on every label of each study instead of
            one segmentation; ``metrics.csv`` then has one row per study and label with
            ``dsc_0..dsc_N, nsd_0..nsd_N, dsc_auc, nsd_auc, final_dsc, final_nsd, seconds``.
        clicks: corrective clicks of the protocol.
        **segment_kwargs: passed on to :func:`medseg.segment` (``label``, ``window``,
            ``precision``, ``device``, ``overlap``, ...).

    Returns:
        A :class:`BatchResult`; ``result.failed`` lists the studies that failed (their one-line
        errors are in ``metrics.csv`` and ``summary.json`` too).

    Raises:
        InputError: bad ``data``, prompts, options or a missing optional package.
        OutputError: ``out`` is unusable (inside ``data``, a file, not writable).
    """
    if executor not in ("local", "dask"):
        raise InputError(f"unknown executor {executor!r}; use 'local' or 'dask'")
    if int(workers) < 1:
        raise InputError(f"workers must be >= 1, got {workers}")
    if prompts_from_gt and prompts is not None:
        raise InputError("give either prompts_from_gt or prompts, not both")
    if protocol is not None:  # issue 15
        from medseg.protocol import BATCH_PROTOCOL

        if protocol != BATCH_PROTOCOL or prompts_from_gt or prompts is not None or clicks < 0:
            raise InputError(
                f"protocol must be {BATCH_PROTOCOL!r}, with clicks >= 0 and without prompts "
                "(the protocol draws its own box and clicks from the ground truth)"
            )
        prompts_from_gt, plots = True, False
    settings = _settings(segment_kwargs)
    from medseg.models.registry import resolve_model

    engine = resolve_model(model).engine
    if engine in ("sam", "sam2") and not prompts_from_gt and prompts is None:
        raise InputError(
            f"{model} is a promptable SAM-family model: give --prompts-from-gt or --prompts FILE"
        )
    if engine == "unet" and (prompts_from_gt or prompts is not None):
        raise InputError(f"{model} is an automatic U-Net: prompts are for SAM-Med models")
    if plots and not dry_run:
        _require_matplotlib()
    from medseg.io.remote import is_remote_url, push_target

    if to and not push:
        raise InputError("--to names the server to push to; add --push")
    if push:
        push_target(data if is_remote_url(data) else None, to)  # no server: fail before work

    out_p = Path(out).absolute()
    if out_p.exists() and not out_p.is_dir():
        raise OutputError(f"{out_p}: is a file; give a folder for the batch outputs")
    if not is_remote_url(data):
        data_p = Path(data)
        if data_p.resolve() == out_p.resolve() or data_p.resolve() in out_p.resolve().parents:
            raise OutputError(
                f"{out_p}: lies inside the data folder {data_p}; choose another folder"
            )
    studies = find_studies(str(data) if is_remote_url(data) else Path(data))
    per_study: dict[str, list[Any]] | None = None
    if prompts is not None:
        per_study = load_batch_prompts(prompts, axis=segment_kwargs.get("axis"))
    model_key = _model_key(model)
    tasks = []
    for s in studies:
        sp = per_study.get(s.id) if per_study is not None else None
        if per_study is not None and sp is None:
            sp_json: Any = None
        else:
            sp_json = [p.to_json() for p in sp] if sp is not None else None
        fp = _fingerprint(
            model_key,
            f"{protocol}:{clicks}" if protocol else "gt-box" if prompts_from_gt else sp_json,
            settings,
        )
        tasks.append(
            _Task(
                study=s,
                out=str(out_p),
                model=str(model),
                prompts=tuple(sp) if sp is not None else None,
                prompts_from_gt=prompts_from_gt,
                fingerprint=fp,
                push=push,
                push_to=to,
                overwrite=overwrite,
                kwargs=dict(segment_kwargs),
                protocol=protocol,
                clicks=clicks,
            )
        )

    if dry_run:
        results = []
        for t in tasks:
            check = check_study_outputs
            if protocol:
                from medseg.protocol import check_batch_study as check
            why = "overwrite" if overwrite else check(t.study, out_p, t.fingerprint)
            results.append(
                StudyResult(
                    t.study.id,
                    "skip" if why is None else "run",
                    error="" if why is None else why,
                    labels=study_paths(out_p, t.study.id)[0],
                    report=study_paths(out_p, t.study.id)[1],
                )
            )
        return BatchResult(out=out_p, studies=results, model=str(model), dry_run=True)

    _prepare_out(
        out_p, [p for s in studies for p in (s.image, s.gt) if p is not None and not s.remote]
    )
    missing = [t for t in tasks if per_study is not None and t.prompts is None]
    runnable = [t for t in tasks if per_study is None or t.prompts is not None]
    finished: dict[str, StudyResult] = {}
    for t in missing:
        finished[t.study.id] = StudyResult(
            t.study.id, "failed", error=f"no prompts for study {t.study.id} in the prompts file"
        )
    total = len(tasks)

    def on_done(r: StudyResult) -> None:
        finished[r.study] = r
        if on_study is not None:
            on_study(r)
        if progress is not None:
            progress(len(finished), total)

    for r in list(finished.values()):
        if on_study is not None:
            on_study(r)
    if progress is not None:
        progress(len(finished), total)
    if executor == "dask":
        _run_dask(runnable, int(workers), scheduler, on_done)
    else:
        _run_local(runnable, int(workers), on_done)
    results = [finished[s.id] for s in studies]
    result = BatchResult(
        out=out_p,
        studies=results,
        model=str(model),
        push=push,
        protocol=protocol,
        clicks=clicks,
    )
    write_aggregates(result, studies, plots=plots)
    return result


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InputError(
            "the batch plots need matplotlib: pip install 'medseg[batch]' (or matplotlib), "
            "or pass --no-plots"
        ) from None


def _prepare_out(out: Path, inputs: Sequence[Path]) -> None:
    """Create ``out/studies`` and remove temporary files a killed run left behind."""
    from medseg.io.files import check_output_path

    check_output_path(out / "metrics.csv", inputs, overwrite=True)
    (out / "studies").mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "studies", out / "plots"):
        if folder.is_dir():
            for f in folder.iterdir():
                if f.name.startswith(".") and _PART_MARK in f.name and f.is_file():
                    f.unlink(missing_ok=True)


# --------------------------------------------------------------------------- aggregates
def _study_rows(study: Study, r: StudyResult) -> list[dict[str, Any]]:
    """The ``metrics.csv`` rows of one study, from its report on disk."""
    if r.status == "failed":
        return [_row(study.id, None, "", None, "failed", r.error)]
    assert r.report is not None
    rep = json.loads(Path(r.report).read_text(encoding="utf-8"))
    rows = rep.get("metrics") or []
    if not rows:
        return [_row(study.id, None, "", None, "no_gt", "")]
    return [_row(study.id, m["label"], m.get("name", ""), m, "ok", "") for m in rows]


def _row(
    sid: str, label: Any, name: str, m: Mapping[str, Any] | None, status: str, error: str
) -> dict[str, Any]:
    m = m or {}
    return {
        "study": sid,
        "label": "" if label is None else int(label),
        "name": name,
        **{k: m.get(k) for k in ("dice", "iou", "hd95")},
        "status": status,
        "error": error,
    }


def _stats(vals: Iterable[Any]) -> dict[str, Any]:
    a = np.array([float(v) for v in vals if v is not None], dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size == 0:
        return {"mean": None, "median": None, "std": None, "count": 0}
    return {
        "mean": round(float(a.mean()), 6),
        "median": round(float(np.median(a)), 6),
        "std": round(float(a.std()), 6),
        "count": int(a.size),
    }


def summarize(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``summary.json`` content from ``metrics.csv`` rows: per label mean / median / std / count
    of dice, iou and hd95 (hd95 over finite values; ``hd95_missing`` counts the cases where one
    mask was empty), and the failed studies with their errors."""
    by_label: dict[int, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r["status"] == "ok":
            by_label.setdefault(int(r["label"]), []).append(r)
    labels = []
    for value in sorted(by_label):
        rs = by_label[value]
        entry: dict[str, Any] = {"label": value, "name": rs[0]["name"], "studies": len(rs)}
        for k in SUMMARY_METRICS:
            entry[k] = _stats(r[k] for r in rs)
        entry["hd95_missing"] = sum(r["hd95"] is None for r in rs)
        labels.append(entry)
    studies = list(dict.fromkeys(r["study"] for r in rows))
    failed = [{"study": r["study"], "error": r["error"]} for r in rows if r["status"] == "failed"]
    no_gt = [r["study"] for r in rows if r["status"] == "no_gt"]
    return {
        "studies": len(studies),
        "succeeded": len(studies) - len(failed),
        "failed": failed,
        "without_ground_truth": no_gt,
        "labels": labels,
    }


def write_aggregates(
    result: BatchResult, studies: Sequence[Study], *, plots: bool = True
) -> BatchResult:
    """(Re)build ``metrics.csv``, ``summary.json`` and the plots from the per-study files."""
    if result.protocol:  # issue 15: the protocol's own columns
        from medseg.protocol import write_batch_aggregates

        return write_batch_aggregates(result, studies, result.clicks)
    from medseg.io.files import atomic_path, write_json

    out = result.out
    by_id = {r.study: r for r in result.studies}
    rows = [row for s in studies for row in _study_rows(s, by_id[s.id])]
    columns = METRICS_COLUMNS + (("pushed",) if result.push else ())
    for r in rows:  # the SOPInstanceUID of the study's stored DICOM-SEG
        r["pushed"] = by_id[r["study"]].pushed
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r[k] is None else r[k] for k in columns})
    result.metrics_csv = out / "metrics.csv"
    with atomic_path(result.metrics_csv) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    summary = {"model": result.model, **summarize(rows)}
    worst = worst_studies(rows, WORST_STUDIES)
    summary["worst_studies"] = worst
    result.summary_json = write_json(summary, out / "summary.json", overwrite=True)
    result.plots = []
    if plots:
        (out / "plots").mkdir(exist_ok=True)
        ok_rows = [r for r in rows if r["status"] == "ok"]
        if ok_rows:
            result.plots.append(plot_dice(ok_rows, out / "plots" / "dice_per_label.png"))
            sel = {s.id: s for s in studies}
            cases = [(sel[w_["study"]], w_["label"], w_["name"], w_["dice"]) for w_ in worst]
            result.plots.append(plot_worst_slices(cases, out, out / "plots" / "worst_slices.png"))
    return result


def worst_studies(rows: Sequence[Mapping[str, Any]], k: int) -> list[dict[str, Any]]:
    """The ``k`` studies with the lowest Dice on any label: ``[{study, label, name, dice}]``."""
    worst: dict[str, Mapping[str, Any]] = {}
    for r in rows:
        if r["status"] != "ok" or r["dice"] is None:
            continue
        cur = worst.get(r["study"])
        if cur is None or float(r["dice"]) < float(cur["dice"]):
            worst[r["study"]] = r
    order = sorted(worst.values(), key=lambda r: (float(r["dice"]), r["study"]))[:k]
    return [
        {"study": r["study"], "label": int(r["label"]), "name": r["name"], "dice": r["dice"]}
        for r in order
    ]


def plot_dice(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Box plot with the points (seeded jitter) of Dice per label; PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from medseg.io.files import atomic_path

    by: dict[tuple[int, str], list[float]] = {}
    for r in rows:
        if r["dice"] is not None:
            by.setdefault((int(r["label"]), str(r["name"])), []).append(float(r["dice"]))
    keys = sorted(by)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(keys) + 2), 4.0), dpi=100)
    try:
        if keys:
            ax.boxplot([by[k] for k in keys], showfliers=False)
            rng = np.random.default_rng(0)
            for i, k in enumerate(keys, start=1):
                xs = i + rng.uniform(-0.15, 0.15, len(by[k]))
                ax.plot(xs, by[k], "o", ms=4, alpha=0.7, color="tab:blue")
            ax.set_xticks(range(1, len(keys) + 1), [f"{n} ({v})" for v, n in keys])
        ax.set_ylim(-0.02, 1.02)
        ax.set_ylabel("Dice")
        ax.set_title(f"Dice per label ({len({r['study'] for r in rows})} studies)")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)
    return path


def worst_slice(pred: np.ndarray, gt: np.ndarray) -> int:
    """Axial index ``z`` with the most disagreeing voxels between two ``(z, y, x)`` masks (ties:
    the lowest index); the slice of largest ground truth when they agree everywhere."""
    err = (pred != gt).reshape(pred.shape[0], -1).sum(axis=1)
    if err.max(initial=0) == 0:
        return int(np.argmax(gt.reshape(gt.shape[0], -1).sum(axis=1)))
    return int(np.argmax(err))


def plot_worst_slices(cases: Sequence[tuple[Study, int, str, Any]], out: Path, path: Path) -> Path:
    """One panel per worst study: its worst axial slice, ground truth (green) and prediction
    (red) contours of the worst label; PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from medseg.io.files import atomic_path, read_labels, read_volume

    n = max(1, len(cases))
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.6), dpi=100, squeeze=False)
    try:
        for ax, (study, label, name, dice) in zip(axes[0], cases, strict=False):
            image = read_volume(study.image)
            assert study.gt is not None
            gt = read_labels(study.gt, reference=image).array
            pred = read_labels(study_paths(out, study.id)[0], reference=image).array
            # a SAM run scores one object; its metrics label may stand for all foreground
            g = gt == label if (gt == label).any() else gt > 0
            p = pred == label if (pred == label).any() else pred > 0
            z = worst_slice(p, g)
            sl = image.array[z].astype(np.float32)
            lo, hi = np.percentile(sl, [1, 99])
            ax.imshow(sl, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1)
            if g[z].any():
                ax.contour(g[z].astype(float), levels=[0.5], colors="lime", linewidths=1)
            if p[z].any():
                ax.contour(p[z].astype(float), levels=[0.5], colors="red", linewidths=1)
            ax.set_title(f"{study.id}\n{name} z={z} Dice {float(dice):.3f}", fontsize=8)
            ax.set_axis_off()
        for ax in axes[0][len(cases) :]:
            ax.set_axis_off()
        fig.suptitle("worst studies: ground truth (green), prediction (red)", fontsize=9)
        fig.tight_layout(rect=(0.0, 0.0, 1.0, 0.9))
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)
    return path
