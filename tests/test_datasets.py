"""Dataset layouts (MSD, nnU-Net raw), label tables, and the ``medseg phantom`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.cli import main
from medseg.errors import InputError, OutputError
from medseg.io import read_labels, read_volume, write_volume
from medseg.io.datasets import (
    detect_layout,
    label_table_from_dataset_json,
    load_dataset,
    write_msd_dataset,
)
from medseg.phantom import PHANTOM_LABELS, make_phantom
from medseg.volume import LabelMap, Volume

SMALL = (16, 64, 64)
SMALL_SPACING = (5.0, 3.0, 3.0)


def _tiny_case(seed: int, value: int = 1) -> tuple[Volume, LabelMap]:
    rng = np.random.default_rng(seed)
    img = Volume(rng.integers(-100, 100, size=(4, 6, 5)).astype(np.int16), spacing=(2.0, 1.0, 0.5))
    lab = np.zeros((4, 6, 5), np.uint8)
    lab[1:3, 2:4, 1:4] = value
    return img, LabelMap.like(img, lab)


def _write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data))


# --------------------------------------------------------------------------- label tables
def test_label_table_msd_and_nnunet(tmp_path):
    msd = tmp_path / "msd.json"
    _write_json(msd, {"labels": {"0": "background", "1": "liver", "2": "tumour"}})
    assert label_table_from_dataset_json(msd) == {1: "liver", 2: "tumour"}
    nn = tmp_path / "nn.json"
    _write_json(nn, {"labels": {"background": 0, "liver": 1, "tumour": 2}})
    assert label_table_from_dataset_json(nn) == {1: "liver", 2: "tumour"}
    # nnU-Net region entries (lists of values) are not single labels and are skipped
    reg = tmp_path / "reg.json"
    _write_json(reg, {"labels": {"background": 0, "whole": [1, 2], "edema": 1, "core": 2}})
    assert label_table_from_dataset_json(reg) == {1: "edema", 2: "core"}


def test_label_table_errors(tmp_path):
    with pytest.raises(InputError, match=r"no dataset\.json"):
        label_table_from_dataset_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"labels": {"1": "liver",}')
    with pytest.raises(InputError, match=r"malformed JSON .*line 1"):
        label_table_from_dataset_json(bad)
    nolab = tmp_path / "nolab.json"
    _write_json(nolab, {"name": "x"})
    with pytest.raises(InputError, match="no 'labels'"):
        label_table_from_dataset_json(nolab)
    weird = tmp_path / "weird.json"
    _write_json(weird, {"labels": {"1": 5}})
    with pytest.raises(InputError, match="label 1 must map to a name"):
        label_table_from_dataset_json(weird)


# --------------------------------------------------------------------------- MSD
def _make_msd(root: Path, n: int = 2, with_test: bool = True) -> list[tuple[Volume, LabelMap]]:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    cases, training = [], []
    for i in range(n):
        img, lab = _tiny_case(i, value=i + 1)
        write_volume(img, root / "imagesTr" / f"liver_{i}.nii.gz")
        write_volume(lab, root / "labelsTr" / f"liver_{i}.nii.gz")
        training.append(
            {"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"}
        )
        cases.append((img, lab))
    test = []
    if with_test:
        write_volume(_tiny_case(9)[0], root / "imagesTs" / "liver_9.nii.gz")
        test = ["./imagesTs/liver_9.nii.gz"]
    _write_json(
        root / "dataset.json",
        {
            "name": "Task03_Liver",
            "modality": {"0": "CT"},
            "labels": {"0": "background", "1": "liver", "2": "cancer"},
            "numTraining": n,
            "numTest": len(test),
            "training": training,
            "test": test,
        },
    )
    return cases


def test_load_msd(tmp_path):
    cases = _make_msd(tmp_path / "Task03_Liver")
    ds = load_dataset(tmp_path / "Task03_Liver")
    assert ds.layout == "msd" == detect_layout(tmp_path / "Task03_Liver")
    assert ds.labels == {1: "liver", 2: "cancer"}
    assert ds.modality == "CT" and ds.channels == {0: "CT"}
    assert ds.name == "Task03_Liver"
    assert len(ds) == 2 and ds.case_ids == ["liver_0", "liver_1"]
    assert ds.training[1] == (
        tmp_path / "Task03_Liver" / "imagesTr" / "liver_1.nii.gz",
        tmp_path / "Task03_Liver" / "labelsTr" / "liver_1.nii.gz",
    )
    assert ds.test == [tmp_path / "Task03_Liver" / "imagesTs" / "liver_9.nii.gz"]
    img, lab = ds.load_case(1)
    np.testing.assert_array_equal(img.array, cases[1][0].array)
    np.testing.assert_array_equal(lab.array, cases[1][1].array)
    assert lab.labels == {1: "liver", 2: "cancer"} and lab.present() == [2]
    assert img.meta["modality"] == "CT"
    # read_labels finds the table in the dataset.json one level up (medseg.io.files)
    assert read_labels(ds.training[0][1]).labels == {1: "liver", 2: "cancer"}


def test_msd_errors(tmp_path):
    root = tmp_path / "ds"
    _make_msd(root)
    (root / "labelsTr" / "liver_1.nii.gz").unlink()
    with pytest.raises(
        InputError,
        match=r"1 file\(s\) listed in dataset.json do not exist "
        r"\(labelsTr/liver_1.nii.gz\)",
    ):
        load_dataset(root)
    root2 = tmp_path / "ds2"
    _make_msd(root2, with_test=False)
    data = json.loads((root2 / "dataset.json").read_text())
    data["numTraining"] = 5
    _write_json(root2 / "dataset.json", data)
    with pytest.raises(InputError, match="numTraining is 5 but 'training' lists 2"):
        load_dataset(root2)
    data["numTraining"] = 2
    data["training"][0] = {"image": "./imagesTr/liver_0.nii.gz"}
    _write_json(root2 / "dataset.json", data)
    with pytest.raises(InputError, match="training entry 0 must have 'image' and 'label'"):
        load_dataset(root2)
    (root2 / "dataset.json").write_text("[1, 2")
    with pytest.raises(InputError, match="malformed JSON"):
        load_dataset(root2)
    _write_json(root2 / "dataset.json", {"labels": {"0": "background"}})
    with pytest.raises(InputError, match="neither an MSD dataset"):
        load_dataset(root2)
    with pytest.raises(InputError, match="no such dataset folder"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"no dataset\.json"):
        load_dataset(tmp_path / "empty")


# --------------------------------------------------------------------------- nnU-Net
def _make_nnunet(root: Path, channels: dict[str, str], n: int = 3) -> None:
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    (root / "imagesTs").mkdir()
    for i in range(n):
        img, lab = _tiny_case(i)
        for c in channels:
            write_volume(img, root / "imagesTr" / f"case_{i:03d}_{int(c):04d}.nii.gz")
        write_volume(lab, root / "labelsTr" / f"case_{i:03d}.nii.gz")
    for c in channels:
        write_volume(_tiny_case(7)[0], root / "imagesTs" / f"case_900_{int(c):04d}.nii.gz")
    _write_json(
        root / "dataset.json",
        {
            "channel_names": channels,
            "labels": {"background": 0, "liver": 1, "tumour": 2},
            "numTraining": n,
            "file_ending": ".nii.gz",
            "name": "Dataset003_Liver",
        },
    )


def test_load_nnunet(tmp_path):
    root = tmp_path / "Dataset003_Liver"
    _make_nnunet(root, {"0": "CT"})
    ds = load_dataset(root)
    assert ds.layout == "nnunet"
    assert ds.labels == {1: "liver", 2: "tumour"} and ds.modality == "CT"
    assert ds.case_ids == ["case_000", "case_001", "case_002"]
    assert ds.training[2] == (
        root / "imagesTr" / "case_002_0000.nii.gz",
        root / "labelsTr" / "case_002.nii.gz",
    )
    assert ds.test == [root / "imagesTs" / "case_900_0000.nii.gz"]
    img, lab = ds.load_case(0)
    np.testing.assert_array_equal(img.array, _tiny_case(0)[0].array)
    assert lab.labels == {1: "liver", 2: "tumour"} and int(lab.array.sum()) == 12
    # nnU-Net's name->value table also drives read_labels next to the files
    assert read_labels(root / "labelsTr" / "case_001.nii.gz").labels == {1: "liver", 2: "tumour"}


def test_nnunet_multichannel_and_errors(tmp_path):
    root = tmp_path / "mc"
    _make_nnunet(root, {"0": "T2", "1": "ADC"}, n=2)
    ds = load_dataset(root)
    assert ds.channels == {0: "T2", 1: "ADC"} and ds.modality == "T2" and len(ds) == 2
    (root / "imagesTr" / "case_001_0001.nii.gz").unlink()
    with pytest.raises(InputError, match=r"imagesTr/case_001_0001.nii.gz"):
        load_dataset(root)
    root2 = tmp_path / "n2"
    _make_nnunet(root2, {"0": "CT"}, n=2)
    (root2 / "labelsTr" / "case_000.nii.gz").unlink()
    with pytest.raises(InputError, match=r"labelsTr/case_000.nii.gz"):
        load_dataset(root2)
    root3 = tmp_path / "n3"
    _make_nnunet(root3, {"0": "CT"}, n=2)
    data = json.loads((root3 / "dataset.json").read_text())
    data["numTraining"] = 3
    _write_json(root3 / "dataset.json", data)
    with pytest.raises(InputError, match="numTraining is 3 but imagesTr/ holds 2"):
        load_dataset(root3)
    data["numTraining"] = 2
    data["file_ending"] = "nii.gz"
    _write_json(root3 / "dataset.json", data)
    with pytest.raises(InputError, match="'file_ending' must be a suffix"):
        load_dataset(root3)


# --------------------------------------------------------------------------- writing + CLI
def test_write_msd_dataset_roundtrip_and_refusal(tmp_path):
    cases = [("a_0", *_tiny_case(0)), ("a_1", *_tiny_case(1, value=2))]
    ds = write_msd_dataset(
        tmp_path / "out",
        iter(cases),
        name="t",
        description="d",
        labels={1: "x", 2: "y"},
        modality="MRI",
    )
    assert ds.layout == "msd" and ds.case_ids == ["a_0", "a_1"] and ds.modality == "MRI"
    data = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert data["labels"] == {"0": "background", "1": "x", "2": "y"}
    assert data["numTraining"] == 2 and data["modality"] == {"0": "MRI"}
    for i, (_, img, lab) in enumerate(cases):
        im2, lab2 = ds.load_case(i)
        np.testing.assert_array_equal(im2.array, img.array)
        np.testing.assert_array_equal(lab2.array, lab.array)
        assert im2.same_grid(img)
    with pytest.raises(OutputError, match="already exists"):
        write_msd_dataset(tmp_path / "out", iter(cases), name="t", description="d", labels={})

    # a failure part-way leaves nothing behind
    def broken():
        yield cases[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_msd_dataset(tmp_path / "out2", broken(), name="t", description="d", labels={})
    assert not (tmp_path / "out2").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_cli_phantom_dataset(tmp_path, capsys):
    out = tmp_path / "ph"
    shape = ",".join(map(str, SMALL))
    spacing = ",".join(map(str, SMALL_SPACING))
    rc = main(
        [
            "phantom",
            str(out),
            "--seed",
            "5",
            "--cases",
            "2",
            "--dicom",
            "--shape",
            shape,
            "--spacing",
            spacing,
        ]
    )
    assert rc == 0
    assert "wrote 2 phantom case(s)" in capsys.readouterr().out  # (with a progress bar)
    data = json.loads((out / "dataset.json").read_text())
    assert data["description"] == "synthetic abdominal CT phantom"
    assert data["modality"] == {"0": "CT"} and data["numTraining"] == 2
    assert data["labels"] == {"0": "background", **{str(k): v for k, v in PHANTOM_LABELS.items()}}
    assert [t["image"] for t in data["training"]] == [
        "./imagesTr/phantom_000.nii.gz",
        "./imagesTr/phantom_001.nii.gz",
    ]
    ds = load_dataset(out)
    for i in range(2):
        img, lab = ds.load_case(i)
        ref_img, ref_lab = make_phantom(5 + i, SMALL, SMALL_SPACING)
        np.testing.assert_array_equal(img.array, ref_img.array)
        np.testing.assert_array_equal(lab.array, ref_lab.array)
        assert img.same_grid(ref_img) and lab.labels == PHANTOM_LABELS
        dcm = read_volume(out / "dicom" / f"phantom_{i:03d}")
        np.testing.assert_array_equal(dcm.array, ref_img.array)
        assert dcm.same_grid(ref_img) and dcm.meta["modality"] == "CT"
    # refuses to overwrite: exit code 2 and one clear line
    rc = main(["phantom", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "already exists" in err and err.count("\n") == 1
    rc = main(["phantom", str(tmp_path / "bad"), "--shape", "10,20", "--quiet"])
    assert rc == 2 and "--shape must be three positive numbers" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# --------------------------------------------------------------------------- sample_data
SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def test_sample_phantom_is_reproducible_from_the_generator():
    ds = load_dataset(SAMPLE / "phantom")
    assert ds.layout == "msd" and ds.case_ids == ["phantom_000"] and ds.labels == PHANTOM_LABELS
    gen = ds.meta["generator"]
    assert gen["seed"] == 0 and gen["shape"] == [40, 128, 128]
    img, lab = ds.load_case(0)
    ref_img, ref_lab = make_phantom(
        gen["seed"], tuple(gen["shape"]), tuple(gen["spacing"]), tuple(gen["tumours"])
    )
    hint = "sample_data/phantom differs from make_phantom(); regenerate it (sample_data/README.md)"
    assert np.array_equal(img.array, ref_img.array), hint
    assert np.array_equal(lab.array, ref_lab.array), hint
    assert img.same_grid(ref_img) and img.meta["modality"] == "CT"


def test_sample_brain1_matches_source_and_names_its_label(pyradiomics_dir):
    folder = SAMPLE / "brain1"
    for name in ("brain1_image.nrrd", "brain1_label.nrrd", "LICENSE.txt"):
        assert (folder / name).read_bytes() == (pyradiomics_dir / name).read_bytes()
    assert "BSD-3-Clause" in (folder / "README.md").read_text()
    lab = read_labels(folder / "brain1_label.nrrd")
    assert lab.labels == {1: "tumour"} and lab.present() == [1]
    ds = load_dataset(folder)
    img, lab2 = ds.load_case(0)
    assert img.shape == (25, 256, 256) and img.same_grid(lab2) and ds.modality == "MR"
