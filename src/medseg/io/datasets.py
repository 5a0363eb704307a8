"""Dataset layouts: Medical Segmentation Decathlon (MSD) and nnU-Net v2 raw.

MSD::

    root/dataset.json   {"name", "modality": {"0": "CT"},
                         "labels": {"0": "background", "1": "liver"}, "numTraining",
                         "training": [{"image": "./imagesTr/a.nii.gz",
                                       "label": "./labelsTr/a.nii.gz"}],
                         "test": ["./imagesTs/b.nii.gz"]}
    root/imagesTr/  root/labelsTr/  root/imagesTs/

nnU-Net v2 raw::

    root/dataset.json      {"channel_names": {"0": "CT"}, "labels": {"background": 0, "liver": 1},
                            "numTraining", "file_ending": ".nii.gz"}
    root/imagesTr/CASE_0000.nii.gz (one file per channel)   root/labelsTr/CASE.nii.gz
    root/imagesTs/CASE_0000.nii.gz

Both become a :class:`Dataset`. Label tables are ``{value: name}`` without background.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medseg.errors import InputError, OutputError
from medseg.io.labeltable import (  # noqa: F401  (re-exported: the public name lives here too)
    _parse_labels,
    _read_json,
    label_table_from_dataset_json,
)

if TYPE_CHECKING:
    from medseg.progress import ProgressCallback
    from medseg.volume import LabelMap, Volume


@dataclass
class Dataset:
    """A segmentation dataset on disk.

    Attributes:
        root: dataset folder.
        labels: ``{value: name}`` label table (0/background not listed).
        modality: name of channel 0 (``"CT"``, ``"MRI"``, ``"T2"`` ...).
        training: ``(image, label)`` paths; for multi-channel nnU-Net data the image is the
            ``_0000`` channel file (others in ``channels_of``).
        test: image paths of the test cases (may be empty).
        layout: ``"msd"`` or ``"nnunet"``.
        name: dataset name from ``dataset.json`` (may be empty).
        channels: ``{channel index: name}``.
        case_ids: case identifiers of ``training`` (file names without suffix/channel).
        meta: the parsed ``dataset.json``.
    """

    root: Path
    labels: dict[int, str]
    modality: str
    training: list[tuple[Path, Path]]
    test: list[Path]
    layout: str
    name: str = ""
    channels: dict[int, str] = field(default_factory=dict)
    case_ids: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.training)

    def load_case(self, index: int) -> tuple[Volume, LabelMap]:
        """Read training case ``index``: ``(image, labels)`` with this dataset's label table.

        Raises:
            IndexError: no such case. InputError/GeometryError: unreadable or mismatched files.
        """
        from medseg.io.files import read_labels, read_volume

        img_path, lab_path = self.training[index]
        img = read_volume(img_path)
        if self.modality and not img.meta.get("modality"):
            img.meta["modality"] = self.modality
        lab = read_labels(lab_path, reference=img, labels=self.labels)
        return img, lab


# --------------------------------------------------------------------------- json
# ``dataset.json`` parsing lives in :mod:`medseg.io.labeltable` (also used by the readers).


def _channels(data: dict[str, Any], key: str, where: str) -> dict[int, str]:
    raw = data.get(key)
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise InputError(f'{where}: \'{key}\' must be an object like {{"0": "CT"}}')
    try:
        return {int(k): str(v) for k, v in sorted(raw.items(), key=lambda kv: int(kv[0]))}
    except ValueError:
        raise InputError(
            f"{where}: '{key}' keys must be channel numbers, got {list(raw)}"
        ) from None


# --------------------------------------------------------------------------- loading
def detect_layout(root: str | os.PathLike[str]) -> str:
    """``"msd"`` or ``"nnunet"`` for the dataset at ``root``.

    Raises:
        InputError: no/malformed ``dataset.json`` or neither layout recognised.
    """
    return _detect(Path(root), _read_json(Path(root) / "dataset.json"))


def _detect(root: Path, data: dict[str, Any]) -> str:
    if "channel_names" in data or "file_ending" in data:
        return "nnunet"
    if "training" in data or "modality" in data:
        return "msd"
    raise InputError(
        f"{root / 'dataset.json'}: neither an MSD dataset (needs 'training' and 'modality') nor "
        "an nnU-Net raw dataset (needs 'channel_names' and 'file_ending')"
    )


def _resolve(root: Path, rel: Any, where: str) -> Path:
    if not isinstance(rel, str) or not rel.strip():
        raise InputError(f"{where}: expected a file path string, got {rel!r}")
    p = Path(rel)
    return p if p.is_absolute() else (root / p)


def _missing_error(root: Path, missing: list[Path]) -> InputError:
    shown = ", ".join(
        str(m.relative_to(root)) if m.is_relative_to(root) else str(m) for m in missing[:3]
    )
    more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
    return InputError(
        f"{root}: {len(missing)} file(s) listed in dataset.json do not exist ({shown}{more}); "
        "check the dataset is complete"
    )


def _msd_case_id(path: Path) -> str:
    from medseg.io.files import image_suffix

    name = path.name
    suf = image_suffix(name)
    return name[: -len(suf)] if suf else path.stem


def _load_msd(root: Path, data: dict[str, Any]) -> Dataset:
    where = str(root / "dataset.json")
    labels = _parse_labels(data.get("labels", {}), where)
    channels = _channels(data, "modality", where)
    raw_train = data.get("training", [])
    if not isinstance(raw_train, list):
        raise InputError(f'{where}: \'training\' must be a list of {{"image", "label"}} objects')
    training: list[tuple[Path, Path]] = []
    for i, item in enumerate(raw_train):
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise InputError(
                f"{where}: training entry {i} must have 'image' and 'label', got {item!r}"
            )
        img, lab = _resolve(root, item["image"], where), _resolve(root, item["label"], where)
        training.append((img, lab))
    raw_test = data.get("test", [])
    if not isinstance(raw_test, list):
        raise InputError(f"{where}: 'test' must be a list of image paths")
    test = [
        _resolve(root, t["image"] if isinstance(t, dict) and "image" in t else t, where)
        for t in raw_test
    ]
    missing = [p for pair in training for p in pair if not p.is_file()]
    missing += [p for p in test if not p.is_file()]
    if missing:
        raise _missing_error(root, missing)
    n = data.get("numTraining")
    if isinstance(n, int) and n != len(training):
        raise InputError(
            f"{where}: numTraining is {n} but 'training' lists {len(training)} cases; fix the file"
        )
    return Dataset(
        root=root,
        labels=labels,
        modality=channels.get(0, ""),
        training=training,
        test=test,
        layout="msd",
        name=str(data.get("name", "")),
        channels=channels,
        case_ids=[_msd_case_id(img) for img, _ in training],
        meta=data,
    )


def _load_nnunet(root: Path, data: dict[str, Any]) -> Dataset:
    where = str(root / "dataset.json")
    if "labels" not in data:
        raise InputError(f"{where}: no 'labels' entry (nnU-Net needs e.g. {{\"background\": 0}})")
    labels = _parse_labels(data["labels"], where)
    channels = _channels(data, "channel_names", where)
    if not channels:
        raise InputError(f'{where}: no \'channel_names\' entry (e.g. {{"0": "CT"}})')
    ending = data.get("file_ending")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise InputError(
            f"{where}: 'file_ending' must be a suffix like \".nii.gz\", got {ending!r}"
        )
    images_tr = root / "imagesTr"
    if not images_tr.is_dir():
        raise InputError(f"{root}: no imagesTr/ folder; an nnU-Net raw dataset needs one")
    pat = re.compile(r"^(?P<case>.+)_(?P<ch>\d{4})" + re.escape(ending) + "$")

    def cases_in(folder: Path) -> dict[str, dict[int, Path]]:
        found: dict[str, dict[int, Path]] = {}
        if not folder.is_dir():
            return found
        for f in sorted(folder.iterdir()):
            m = pat.match(f.name)
            if m and f.is_file():
                found.setdefault(m["case"], {})[int(m["ch"])] = f
        return found

    train_cases = cases_in(images_tr)
    training: list[tuple[Path, Path]] = []
    missing: list[Path] = []
    for case, chans in sorted(train_cases.items()):
        for c in channels:
            if c not in chans:
                missing.append(images_tr / f"{case}_{c:04d}{ending}")
        lab = root / "labelsTr" / f"{case}{ending}"
        if not lab.is_file():
            missing.append(lab)
        training.append((chans.get(0, images_tr / f"{case}_0000{ending}"), lab))
    if missing:
        raise _missing_error(root, missing)
    n = data.get("numTraining")
    if isinstance(n, int) and n != len(training):
        raise InputError(
            f"{where}: numTraining is {n} but imagesTr/ holds {len(training)} cases "
            f"(files named CASE_0000{ending}); fix the file or the folder"
        )
    test_cases = cases_in(root / "imagesTs")
    test = [chans[0] for _, chans in sorted(test_cases.items()) if 0 in chans]
    return Dataset(
        root=root,
        labels=labels,
        modality=channels.get(0, ""),
        training=training,
        test=test,
        layout="nnunet",
        name=str(data.get("name", "")),
        channels=channels,
        case_ids=sorted(train_cases),
        meta=data,
    )


def load_dataset(root: str | os.PathLike[str]) -> Dataset:
    """Open an MSD or nnU-Net raw dataset folder (layout detected from ``dataset.json``).

    Raises:
        InputError: missing folder/``dataset.json``, malformed JSON, unknown layout, listed
            files that do not exist, ``numTraining`` not matching the cases.
    """
    r = Path(root)
    if not r.is_dir():
        raise InputError(f"{r}: no such dataset folder")
    data = _read_json(r / "dataset.json")
    layout = _detect(r, data)
    return _load_msd(r, data) if layout == "msd" else _load_nnunet(r, data)


# --------------------------------------------------------------------------- writing
def msd_dataset_json(
    case_ids: list[str],
    *,
    name: str,
    description: str,
    labels: dict[int, str],
    modality: str = "CT",
    suffix: str = ".nii.gz",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``dataset.json`` object of an MSD dataset holding ``case_ids`` as training cases."""
    data: dict[str, Any] = {
        "name": name,
        "description": description,
        "tensorImageSize": "3D",
        "modality": {"0": modality},
        "labels": {"0": "background", **{str(k): v for k, v in sorted(labels.items())}},
        "numTraining": len(case_ids),
        "numTest": 0,
        "training": [
            {"image": f"./imagesTr/{c}{suffix}", "label": f"./labelsTr/{c}{suffix}"}
            for c in case_ids
        ],
        "test": [],
    }
    data.update(extra or {})
    return data


def write_msd_dataset(
    root: str | os.PathLike[str],
    cases: Iterable[tuple[str, Volume, LabelMap]],
    *,
    name: str,
    description: str,
    labels: dict[int, str],
    modality: str = "CT",
    extra: dict[str, Any] | None = None,
    on_case: Callable[[Path, str, Volume, LabelMap], None] | None = None,
    n_cases: int | None = None,
    progress: ProgressCallback | None = None,
) -> Dataset:
    """Write an MSD-layout dataset atomically: ``imagesTr/ID.nii.gz``, ``labelsTr/ID.nii.gz``
    and ``dataset.json``.

    Everything is written into a temporary folder beside ``root`` and renamed onto it at the end.

    Args:
        root: the dataset folder to create; it must not exist or be an empty folder.
        cases: ``(case_id, image, labels)`` triples, consumed one at a time.
        name, description, labels, modality, extra: ``dataset.json`` content.
        on_case: called as ``on_case(staging_root, case_id, image, labels)`` after each case to
            write extra files inside the dataset (e.g. DICOM series).
        n_cases: number of cases, for progress reporting (``progress(done, n_cases)``).
        progress: optional ``progress(done, total)`` callback.

    Returns:
        The written dataset, loaded back with :func:`load_dataset`.

    Raises:
        OutputError: ``root`` exists (and is not an empty folder) or cannot be created.
    """
    from medseg.io.atomic import atomic_dir, write_json
    from medseg.io.itk import write_image

    out = Path(root)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise OutputError(f"{out}: already exists; choose a new folder for the dataset")
    ids: list[str] = []
    with atomic_dir(out) as tmp:
        (tmp / "imagesTr").mkdir()
        (tmp / "labelsTr").mkdir()
        for case_id, img, lab in cases:
            if not re.fullmatch(r"[A-Za-z0-9._-]+", case_id) or case_id in ids:
                raise InputError(f"bad or duplicate case id {case_id!r}; use letters, digits, _-.")
            write_image(img, tmp / "imagesTr" / f"{case_id}.nii.gz")
            write_image(lab, tmp / "labelsTr" / f"{case_id}.nii.gz")
            if on_case is not None:
                on_case(tmp, case_id, img, lab)
            ids.append(case_id)
            if progress is not None:
                progress(len(ids), max(n_cases or 0, len(ids)))
        data = msd_dataset_json(
            ids, name=name, description=description, labels=labels, modality=modality, extra=extra
        )
        write_json(data, tmp / "dataset.json")
    return load_dataset(out)
