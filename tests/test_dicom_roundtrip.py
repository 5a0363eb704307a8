"""Phantom → DICOM series → readers (ours, SimpleITK, highdicom) and NIfTI round trips."""

from __future__ import annotations

import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medseg.errors import InputError, OutputError
from medseg.io import read_volume, write_volume
from medseg.io.dicom_write import SOP_CLASSES, write_dicom_series
from medseg.phantom import make_phantom
from medseg.volume import Volume

# different z, y and x spacings so that any axis swap shows
SHAPE = (20, 72, 64)
SPACING = (2.5, 1.4, 1.1)


def _rotation(axis: np.ndarray, angle_deg: float) -> np.ndarray:
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = np.deg2rad(angle_deg)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * (k @ k)


@pytest.fixture(scope="module")
def phantom() -> Volume:
    img, _ = make_phantom(11, SHAPE, SPACING)
    img.origin = (-40.0, 12.5, 100.0)
    return img


@pytest.fixture(scope="module")
def series(phantom, tmp_path_factory) -> tuple[Path, list[Path]]:
    folder = tmp_path_factory.mktemp("dcm") / "series"
    files = write_dicom_series(phantom, folder, series_description="roundtrip")
    return folder, files


def _sitk_read(folder: Path) -> Volume:
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder), recursive=True)
    reader.SetFileNames(names)
    return Volume.from_sitk(reader.Execute())


def _assert_same(a: Volume, b: Volume) -> None:
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.spacing, b.spacing, atol=1e-6)
    np.testing.assert_allclose(a.origin, b.origin, atol=1e-4)
    np.testing.assert_allclose(a.direction, b.direction, atol=1e-6)


# --------------------------------------------------------------------------- the files
def test_written_tags(phantom, series):
    folder, files = series
    assert len(files) == SHAPE[0]
    assert sorted(p.name for p in folder.iterdir()) == [p.name for p in files]
    uids = set()
    for k in (0, 7, SHAPE[0] - 1):
        ds = pydicom.dcmread(files[k])
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == SOP_CLASSES["CT"] == "1.2.840.10008.5.1.4.1.1.2"
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.Modality == "CT" and ds.SeriesDescription == "roundtrip"
        assert ds.InstanceNumber == k + 1
        assert (ds.Rows, ds.Columns) == (SHAPE[1], SHAPE[2])
        assert [float(v) for v in ds.PixelSpacing] == [SPACING[1], SPACING[2]]  # [row, col]
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == SPACING[0]
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        np.testing.assert_allclose(
            [float(v) for v in ds.ImagePositionPatient],
            phantom.index_to_world((k, 0, 0)),
            atol=1e-6,
        )
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 16, 15)
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        np.testing.assert_array_equal(hu, phantom.array[k])
        uids.add(ds.SOPInstanceUID)
        for key in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
            assert pydicom.uid.UID(ds[key].value).is_valid
    assert len(uids) == 3  # one SOP instance per slice


def test_values_pass_pydicom_strict_validation(monkeypatch, tmp_path):
    """Every element's value is valid for its VR (pydicom raises in RAISE mode), also for awkward
    geometry numbers that need DS rounding and a maximum-length description."""
    from pydicom import config

    monkeypatch.setattr(config.settings, "writing_validation_mode", config.RAISE)
    monkeypatch.setattr(config.settings, "reading_validation_mode", config.RAISE)
    vol = Volume(
        np.arange(32, dtype=np.int16).reshape(2, 4, 4),
        (1 / 3, 0.7777777777, 1e-5),
        origin=(1 / 3, -123456.123456789, 1e-9),
    )
    files = write_dicom_series(vol, tmp_path / "s", series_description="x" * 64)
    for f in files:
        ds = pydicom.dcmread(f)
        for elem in ds.iterall():
            assert elem.value is not None or elem.VR in ("DS", "IS", "DA", "TM", "PN", "CS")
    back = read_volume(tmp_path / "s")
    np.testing.assert_array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.spacing, vol.spacing, rtol=1e-9)
    np.testing.assert_allclose(back.origin, vol.origin, rtol=1e-9, atol=1e-8)


def test_highdicom_accepts_and_maps_the_series(phantom, series):
    """highdicom builds a Legacy Converted Enhanced CT from the files (it checks the shared
    attributes) and its own volume geometry puts every voxel where ours does."""
    from highdicom.legacy import LegacyConvertedEnhancedCTImage
    from highdicom.uid import UID

    _, files = series
    dss = [pydicom.dcmread(f) for f in files]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        enh = LegacyConvertedEnhancedCTImage(
            legacy_datasets=dss,
            series_instance_uid=UID(),
            series_number=2,
            sop_instance_uid=UID(),
            instance_number=1,
        )
    hd = enh.get_volume()
    assert hd.array.shape == phantom.shape
    idx = np.argwhere(np.ones(hd.array.shape, bool))
    world = hd.map_indices_to_reference(idx)
    ours = np.rint(phantom.world_to_index(world)).astype(int)
    np.testing.assert_allclose(phantom.world_to_index(world), ours, atol=1e-4)
    np.testing.assert_array_equal(hd.array[tuple(idx.T)], phantom.array[tuple(ours.T)])


# --------------------------------------------------------------------------- readers
def test_read_back_equals_phantom_and_sitk(phantom, series):
    folder, _ = series
    vol = read_volume(folder)
    _assert_same(vol, phantom)
    assert vol.meta["modality"] == "CT" and vol.meta["warnings"] == []
    _assert_same(_sitk_read(folder), phantom)


def test_shuffled_renamed_subfolders(phantom, series, tmp_path):
    _, files = series
    rng = random.Random(3)
    order = list(files)
    rng.shuffle(order)
    for i, f in enumerate(order):
        sub = tmp_path / "messy" / f"d{rng.randint(0, 3)}" / ("x" if i % 2 else "")
        sub.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, sub / f"IMG{rng.randint(0, 10**9):09d}_{i}")
    vol = read_volume(tmp_path / "messy")
    _assert_same(vol, phantom)
    _assert_same(_sitk_read(tmp_path / "messy"), phantom)


def test_nifti_roundtrip(phantom, series, tmp_path):
    vol = read_volume(series[0])
    out = write_volume(vol, tmp_path / "ct.nii.gz")
    _assert_same(read_volume(out), phantom)
    # and the NIfTI agrees with SimpleITK reading it directly
    _assert_same(Volume.from_sitk(sitk.ReadImage(str(out))), phantom)


@pytest.mark.parametrize(
    "direction",
    [
        np.diag([-1.0, -1.0, 1.0]),  # in-plane 180-degree flip (right-handed)
        _rotation([1.0, 0.3, 0.2], 25.0),  # oblique
    ],
    ids=["flipped", "oblique"],
)
def test_non_identity_direction(phantom, tmp_path, direction):
    vol = Volume(phantom.array, phantom.spacing, phantom.origin, direction, {"modality": "CT"})
    write_dicom_series(vol, tmp_path / "s")
    back = read_volume(tmp_path / "s")
    _assert_same(back, vol)
    _assert_same(_sitk_read(tmp_path / "s"), vol)
    ds = pydicom.dcmread(tmp_path / "s" / "slice_0003.dcm")
    np.testing.assert_allclose(
        [float(v) for v in ds.ImageOrientationPatient], direction[:, :2].T.reshape(-1), atol=1e-9
    )


def test_left_handed_direction_reads_back_as_same_physical_image(phantom, tmp_path):
    """A z-flipped (left-handed) frame: positions are written faithfully; readers order the
    slices along row x column, so the array comes back reversed in z on the same world points."""
    d = np.diag([1.0, 1.0, -1.0])
    vol = Volume(phantom.array, phantom.spacing, phantom.origin, d, {"modality": "CT"})
    write_dicom_series(vol, tmp_path / "s")
    back = read_volume(tmp_path / "s")
    np.testing.assert_array_equal(back.array, vol.array[::-1])
    np.testing.assert_allclose(back.direction, np.eye(3), atol=1e-9)
    nz = vol.shape[0]
    for k in (0, 5, nz - 1):
        np.testing.assert_allclose(
            back.index_to_world((nz - 1 - k, 3, 4)), vol.index_to_world((k, 3, 4)), atol=1e-4
        )
    _assert_same(_sitk_read(tmp_path / "s"), back)


# --------------------------------------------------------------------------- encodings, MR
def test_signed_and_float_mr_encodings(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(-3000, 3000, size=(3, 8, 9)).astype(np.int16)
    vol = Volume(arr, (2.0, 0.7, 0.8))
    files = write_dicom_series(vol, tmp_path / "signed")
    assert pydicom.dcmread(files[0]).PixelRepresentation == 1
    np.testing.assert_array_equal(read_volume(tmp_path / "signed").array, arr)

    mr = Volume(rng.uniform(0.0, 812.5, size=(4, 10, 6)).astype(np.float32), (3.0, 0.5, 0.5))
    files = write_dicom_series(mr, tmp_path / "mr", modality="MR")
    ds = pydicom.dcmread(files[0])
    assert ds.SOPClassUID == SOP_CLASSES["MR"] and ds.Modality == "MR"
    back = read_volume(tmp_path / "mr")
    step = float(ds.RescaleSlope)
    assert step == pytest.approx(float(np.ptp(mr.array)) / 65535, rel=1e-6)
    assert np.max(np.abs(back.array - mr.array)) <= step / 2 + 1e-4
    assert back.meta["modality"] == "MR"


def test_uid_seed_is_reproducible(phantom, tmp_path):
    small = Volume(phantom.array[:3], phantom.spacing)
    a = write_dicom_series(small, tmp_path / "a", uid_seed="x")
    b = write_dicom_series(small, tmp_path / "b", uid_seed="x")
    c = write_dicom_series(small, tmp_path / "c")
    ua, ub, uc = (pydicom.dcmread(f[1]) for f in (a, b, c))
    for key in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        assert ua[key].value == ub[key].value != uc[key].value


# --------------------------------------------------------------------------- output rules
def test_refuses_existing_folder_and_is_atomic(phantom, tmp_path):
    small = Volume(phantom.array[:4], phantom.spacing)
    out = tmp_path / "s"
    write_dicom_series(small, out)
    with pytest.raises(OutputError, match="not empty"):
        write_dicom_series(small, out)
    bigger = Volume(phantom.array[:6], phantom.spacing)
    write_dicom_series(bigger, out, overwrite=True)
    assert len(list(out.iterdir())) == 6
    # an empty folder may be filled
    (tmp_path / "empty").mkdir()
    assert len(write_dicom_series(small, tmp_path / "empty")) == 4

    # a failure part-way leaves the target untouched and no temporary folder behind
    def stop(done: int, total: int) -> None:
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_dicom_series(small, tmp_path / "never", progress=stop)
    with pytest.raises(KeyboardInterrupt):
        write_dicom_series(small, out, overwrite=True, progress=stop)
    assert len(list(out.iterdir())) == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "s"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        write_dicom_series(small, tmp_path / "afile")
    with pytest.raises(InputError, match="modality"):
        write_dicom_series(small, tmp_path / "pet", modality="PT")
    nan = Volume(np.full((2, 3, 3), np.nan, np.float32))
    with pytest.raises(InputError, match="NaN"):
        write_dicom_series(nan, tmp_path / "nan")
