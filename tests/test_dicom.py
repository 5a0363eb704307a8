"""DICOM series reading: pydicom's real test series and small synthetic series written here,
checked against SimpleITK's ImageSeriesReader (GDCM) and against hand-computed geometry."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import DicomError
from medseg.io import read_volume
from medseg.io.dicom import is_dicom_file, read_dicom_series, scan_dicom_folder

CT5N_UID = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.6"


@pytest.fixture(scope="module")
def dicomdir_tests(pydicom_test_files: Path) -> Path:
    return pydicom_test_files / "dicomdirtests"


# ----------------------------------------------------------------------------- synthetic writer
def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def oblique_iop(deg_z: float = 25.0, deg_x: float = 15.0) -> np.ndarray:
    """Row/column cosines of an axial plane rotated about z then x (orthonormal)."""
    a, b = np.radians(deg_z), np.radians(deg_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    r = rx @ rz
    return np.concatenate([r[:, 0], r[:, 1]])


def write_slice(
    path: Path,
    pixels: np.ndarray | None,
    ipp: np.ndarray,
    iop: np.ndarray,
    *,
    series_uid: str = "1.2.826.0.1.3680043.8.498.1",
    study_uid: str = "1.2.826.0.1.3680043.8.498.2",
    instance: int = 1,
    pixel_spacing: tuple[float, float] = (0.7, 0.9),
    slope: float = 1.0,
    intercept: float = -1024.0,
    modality: str = "CT",
    description: str = "synthetic",
    preamble: bool = True,
    rows_cols: tuple[int, int] | None = None,
) -> None:
    """Write one int16 CT slice (``pixels`` shape (rows, cols)) as a DICOM file with pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    sop = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop
    ds.Modality = modality
    ds.SeriesDescription = description
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientPosition = "HFS"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [f"{v:.6f}" for v in ipp]
    ds.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
    ds.PixelSpacing = [str(pixel_spacing[0]), str(pixel_spacing[1])]
    ds.SliceThickness = "1.5"
    ds.RescaleSlope = str(slope)
    ds.RescaleIntercept = str(intercept)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    r, c = rows_cols if rows_cols else (pixels.shape if pixels is not None else (8, 8))
    ds.Rows, ds.Columns = int(r), int(c)
    if pixels is not None:
        ds.PixelData = np.ascontiguousarray(pixels, dtype="<i2").tobytes()
    if preamble:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(path, enforce_file_format=True)
    else:  # raw dataset, implicit VR little endian, no preamble / no 'DICM'
        ds.save_as(path, implicit_vr=True, little_endian=True)


def make_series(
    folder: Path,
    n: int = 6,
    shape: tuple[int, int] = (12, 10),
    step: float = 1.5,
    iop: np.ndarray | None = None,
    origin: tuple[float, float, float] = (-40.0, 25.0, 80.0),
    seed: int = 0,
    shear: np.ndarray | None = None,
    **kw: object,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Write ``n`` parallel slices; return (raw int16 stack (n, rows, cols) in position order,
    iop, positions (n, 3))."""
    folder.mkdir(parents=True, exist_ok=True)
    iop = oblique_iop() if iop is None else np.asarray(iop, dtype=float)
    normal = _unit(np.cross(iop[:3], iop[3:]))
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 2000, size=(n, *shape)).astype(np.int16)
    pos = np.array([np.asarray(origin) + k * step * normal for k in range(n)])
    if shear is not None:
        pos = pos + np.arange(n)[:, None] * np.asarray(shear)[None, :]
    for k in range(n):
        # instance numbers deliberately run against the spatial order
        write_slice(folder / f"slice{k:03d}.dcm", raw[k], pos[k], iop, instance=n - k, **kw)
    return raw, iop, pos


def sitk_series(folder: Path):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    uid = reader.GetGDCMSeriesIDs(str(folder))[0]
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder), uid))
    return reader.Execute()


def assert_matches_sitk(vol, img, atol: float = 1e-4) -> None:
    import SimpleITK as sitk

    sx, sy, sz = img.GetSpacing()
    np.testing.assert_allclose(vol.spacing, (sz, sy, sx), atol=atol)
    np.testing.assert_allclose(vol.origin, img.GetOrigin(), atol=atol)
    np.testing.assert_allclose(vol.direction.reshape(-1), img.GetDirection(), atol=atol)
    np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(img))
    for idx in [(0, 0, 0), (1, 2, 3), (vol.shape[0] - 1, vol.shape[1] - 1, vol.shape[2] - 1)]:
        k, j, i = idx
        ref = img.TransformIndexToPhysicalPoint((i, j, k))
        np.testing.assert_allclose(vol.index_to_world(idx), ref, atol=atol)


# ----------------------------------------------------------------------------- detection/scan
def test_is_dicom_file(tmp_path: Path, dicomdir_tests: Path) -> None:
    assert is_dicom_file(dicomdir_tests / "98892001" / "CT5N" / "2062")
    raw = tmp_path / "raw_no_preamble"
    write_slice(raw, np.zeros((4, 4)), np.zeros(3), np.array([1, 0, 0, 0, 1, 0.0]), preamble=False)
    assert raw.read_bytes()[128:132] != b"DICM"
    assert is_dicom_file(raw)
    text = tmp_path / "notes.txt"
    text.write_text("not dicom at all\n" * 20)
    assert not is_dicom_file(text)
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert not is_dicom_file(empty)
    assert not is_dicom_file(tmp_path / "missing")
    assert not is_dicom_file(tmp_path)


def test_scan_groups_series_and_lists_skipped(dicomdir_tests: Path) -> None:
    calls: list[tuple[int, int]] = []
    scan = scan_dicom_folder(
        dicomdir_tests / "98892001", progress=lambda d, t: calls.append((d, t))
    )
    assert [s.n_files for s in scan.series.values()] == [5, 2]
    ct5n = scan.series[CT5N_UID]
    assert (ct5n.modality, ct5n.size) == ("CT", (16, 16))
    assert ct5n.description == "SmartScore - Gated 0.5 sec"
    assert scan.largest().uid == CT5N_UID
    assert calls == [(i, 7) for i in range(1, 8)]

    top = scan_dicom_folder(dicomdir_tests)
    names = {p.name for p in top.dicomdirs}
    assert "DICOMDIR" in names and "DICOMDIR-implicit" in names
    assert any(p.name == "README.txt" for p in top.skipped)
    assert top.series[CT5N_UID].n_files == 5


# ----------------------------------------------------------------------------- real series
def test_ct5n_matches_simpleitk(dicomdir_tests: Path) -> None:
    import pydicom

    folder = dicomdir_tests / "98892001" / "CT5N"
    vol = read_dicom_series(folder)
    assert vol.shape == (5, 16, 16)
    assert vol.spacing == pytest.approx((2.5, 0.488281, 0.488281))
    assert vol.array.dtype == np.int16
    assert_matches_sitk(vol, sitk_series(folder))
    # the lowest slice along +z is file 3353 (z=-1.2375); HU = raw * 1 - 1024, by hand
    ds = pydicom.dcmread(folder / "3353")
    np.testing.assert_array_equal(vol.array[0], ds.pixel_array.astype(np.int32) - 1024)
    assert vol.meta["modality"] == "CT"
    assert vol.meta["series_uid"] == vol.meta["series_chosen"] == CT5N_UID
    assert vol.meta["n_files"] == 5 and vol.meta["warnings"] == []
    assert vol.meta["study_uid"] and vol.meta["patient_position"]


def test_folder_with_two_series_picks_largest_and_names_other(dicomdir_tests: Path) -> None:
    folder = dicomdir_tests / "98892001"
    vol = read_dicom_series(folder)
    assert vol.meta["series_chosen"] == CT5N_UID
    scout = "1.3.6.1.4.1.5962.1.1.0.0.0.1194734704.16302.0.2"
    assert any(scout in w and "--series" in w for w in vol.meta["warnings"])
    with pytest.raises(DicomError, match=r"no series with UID 9\.9\.9; available: .*16302\.0\.6"):
        read_dicom_series(folder, series="9.9.9")


def test_ct2_gap_is_named(dicomdir_tests: Path) -> None:
    vol = read_dicom_series(dicomdir_tests / "77654033" / "CT2")
    assert vol.shape == (4, 16, 16)
    assert vol.spacing[0] == pytest.approx(1.25)
    gaps = [w for w in vol.meta["warnings"] if w.startswith("gap")]
    assert len(gaps) == 1
    assert "-99.48 mm" in gaps[0] and "103.02 mm" in gaps[0]
    assert "202.50 mm vs 1.25 mm expected" in gaps[0]
    assert "about 161 missing" in gaps[0]


def test_mr700_radial_folder_errors_but_each_file_reads_with_its_direction(
    dicomdir_tests: Path,
) -> None:
    import SimpleITK as sitk

    folder = dicomdir_tests / "98892003" / "MR700"
    with pytest.raises(DicomError, match="mixes 7 orientations with no majority"):
        read_dicom_series(folder)
    for f in sorted(folder.iterdir()):
        vol = read_volume(f)  # one file: its own orientation group of the series
        ref = sitk.ReadImage(str(f))
        assert vol.shape == (1, 16, 16)
        np.testing.assert_allclose(vol.direction.reshape(-1), ref.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(vol.origin, ref.GetOrigin(), atol=1e-4)
        np.testing.assert_allclose(vol.spacing[1:], ref.GetSpacing()[1::-1], atol=1e-6)
        np.testing.assert_array_equal(vol.array, sitk.GetArrayFromImage(ref))
        assert any("skipped 6" in w for w in vol.meta["warnings"])


def test_tiny_alpha_without_pixel_data_errors(dicomdir_tests: Path) -> None:
    with pytest.raises(DicomError, match="none holds pixel data"):
        read_dicom_series(dicomdir_tests / "TINY_ALPHA")


# ----------------------------------------------------------------------------- synthetic series
def test_oblique_synthetic_series_matches_simpleitk(tmp_path: Path) -> None:
    raw, iop, pos = make_series(tmp_path / "s", slope=2.0, intercept=-1000.0)
    vol = read_dicom_series(tmp_path / "s")
    assert vol.shape == (6, 12, 10)
    # PixelSpacing is (row pitch = y, column pitch = x)
    assert vol.spacing == pytest.approx((1.5, 0.7, 0.9))
    np.testing.assert_allclose(vol.direction[:, 0], iop[:3], atol=1e-7)
    np.testing.assert_allclose(vol.direction[:, 1], iop[3:], atol=1e-7)
    np.testing.assert_allclose(vol.origin, pos[0], atol=1e-5)
    assert vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, raw.astype(np.int32) * 2 - 1000)
    assert_matches_sitk(vol, sitk_series(tmp_path / "s"))
    assert vol.meta["warnings"] == []


def test_shuffled_renamed_nested_files_read_identically(tmp_path: Path) -> None:
    make_series(tmp_path / "s", n=7)
    ref = read_dicom_series(tmp_path / "s")
    files = sorted((tmp_path / "s").iterdir())
    rng = random.Random(3)
    rng.shuffle(files)
    for i, f in enumerate(files):  # new names in an order unrelated to position
        dst = tmp_path / "mixed" / f"sub{i % 3}" / f"IM{rng.randrange(10**6):06d}_{i}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    vol = read_dicom_series(tmp_path / "mixed")
    np.testing.assert_array_equal(vol.array, ref.array)
    assert vol.spacing == ref.spacing and vol.origin == ref.origin
    np.testing.assert_array_equal(vol.direction, ref.direction)


def test_non_dicom_files_are_skipped_and_listed(tmp_path: Path) -> None:
    _raw, _, _ = make_series(tmp_path, n=3, iop=np.array([1, 0, 0, 0, 1, 0.0]))
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "thumbs.db").write_bytes(b"\x00" * 300)
    vol = read_dicom_series(tmp_path)
    assert vol.shape == (3, 12, 10)
    assert sorted(Path(p).name for p in vol.meta["skipped_files"]) == ["notes.txt", "thumbs.db"]
    assert any("skipped 2 non-DICOM" in w for w in vol.meta["warnings"])


def test_preamble_less_files_read(tmp_path: Path) -> None:
    raw, _, _ = make_series(tmp_path, n=3, preamble=False, intercept=0.0)
    vol = read_dicom_series(tmp_path)
    np.testing.assert_array_equal(vol.array, raw)


def test_duplicate_positions_warn_and_keep_one(tmp_path: Path) -> None:
    raw, iop, pos = make_series(tmp_path, n=4)
    write_slice(tmp_path / "dup.dcm", raw[2] + 1, pos[2], iop, instance=99)
    vol = read_dicom_series(tmp_path)
    assert vol.shape[0] == 4
    assert any("1 slice(s) duplicate" in w for w in vol.meta["warnings"])
    # slice 2 kept the lower InstanceNumber (the original, instance 2), not the duplicate (99)
    np.testing.assert_array_equal(vol.array[2], raw[2].astype(np.int32) - 1024)


def test_gantry_tilt_is_reported_with_angle(tmp_path: Path) -> None:
    axial = np.array([1, 0, 0, 0, 1, 0.0])
    step = 2.0
    tilt = 12.0  # positions advance along z and drift in y by tan(12 deg) * step
    make_series(tmp_path, n=5, step=step, iop=axial, shear=[0, step * np.tan(np.radians(tilt)), 0])
    vol = read_dicom_series(tmp_path)
    tilt_w = [w for w in vol.meta["warnings"] if "gantry tilt" in w]
    assert len(tilt_w) == 1 and f"{tilt:.2f} degrees" in tilt_w[0]
    assert vol.spacing[0] == pytest.approx(step)


def test_uneven_spacing_warns(tmp_path: Path) -> None:
    axial = np.array([1, 0, 0, 0, 1, 0.0])
    raw, _, pos = make_series(tmp_path, n=5, step=2.0, iop=axial)
    # move slice 3 by 0.5 mm: steps 2, 2, 2.5, 1.5
    moved = pos[3] + [0, 0, 0.5]
    write_slice(tmp_path / "slice003.dcm", raw[3], moved, axial, instance=2)
    vol = read_dicom_series(tmp_path)
    assert any("uneven slice spacing: steps range 1.500..2.500" in w for w in vol.meta["warnings"])


def test_mixed_sizes_use_majority_and_warn(tmp_path: Path) -> None:
    _raw, iop, pos = make_series(tmp_path, n=5)
    write_slice(tmp_path / "odd.dcm", np.zeros((6, 6)), pos[-1] + 50, iop, instance=50)
    vol = read_dicom_series(tmp_path)
    assert vol.shape == (5, 12, 10)
    assert any("mixed slice sizes" in w and "odd.dcm" in w for w in vol.meta["warnings"])


def test_mixed_orientation_tie_errors(tmp_path: Path) -> None:
    make_series(tmp_path, n=2, iop=np.array([1, 0, 0, 0, 1, 0.0]))
    make_series(tmp_path / "b", n=2, iop=np.array([1, 0, 0, 0, 0, -1.0]))
    with pytest.raises(DicomError, match="mixes 2 orientations with no majority"):
        read_dicom_series(tmp_path)


def test_some_files_without_pixels_warn_all_without_error(tmp_path: Path) -> None:
    _raw, iop, pos = make_series(tmp_path / "a", n=3)
    write_slice(tmp_path / "a" / "hdr_only.dcm", None, pos[-1] + 9, iop, rows_cols=(12, 10))
    vol = read_dicom_series(tmp_path / "a")
    assert vol.shape == (3, 12, 10)
    assert any("1 file(s) without pixel data: hdr_only.dcm" in w for w in vol.meta["warnings"])
    (tmp_path / "b").mkdir()
    for k in range(3):
        write_slice(tmp_path / "b" / f"{k}.dcm", None, pos[k], iop, rows_cols=(12, 10))
    with pytest.raises(DicomError, match="3 file\\(s\\) but none holds pixel data"):
        read_dicom_series(tmp_path / "b")


def test_truncated_pixel_data_errors(tmp_path: Path) -> None:
    make_series(tmp_path, n=3)
    f = tmp_path / "slice001.dcm"
    f.write_bytes(f.read_bytes()[:-60])
    with pytest.raises(DicomError, match=r"slice001\.dcm: .*truncated"):
        read_dicom_series(tmp_path)


def test_empty_and_non_dicom_folders_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DicomError, match="the folder is empty"):
        read_dicom_series(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(DicomError, match="no readable DICOM image files found \\(1 non-DICOM"):
        read_dicom_series(tmp_path / "text")


def test_rescale_to_float_when_slope_fractional(tmp_path: Path) -> None:
    raw, _, _ = make_series(tmp_path, n=3, slope=0.5, intercept=-10.0)
    vol = read_dicom_series(tmp_path)
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array, raw * 0.5 - 10.0)


def test_progress_is_called_per_file_and_monotonic(tmp_path: Path) -> None:
    make_series(tmp_path, n=4)
    (tmp_path / "x.txt").write_text("x")
    calls: list[tuple[int, int]] = []
    read_dicom_series(tmp_path, progress=lambda d, t: calls.append((d, t)))
    done = [d for d, _ in calls]
    assert len(calls) == 5 + 4  # 5 files scanned, 4 slices read
    assert done == sorted(done) and calls[-1] == (9, 9)


def test_single_file_path_reads_its_series(tmp_path: Path) -> None:
    _raw_a, _, _ = make_series(tmp_path, n=4, series_uid="1.2.3.4")
    raw_b, _, _ = make_series(tmp_path / "b", n=2, series_uid="1.2.3.5", seed=1)
    vol = read_volume(tmp_path / "b" / "slice000.dcm")  # the smaller series, chosen by file
    assert vol.meta["series_chosen"] == "1.2.3.5"
    np.testing.assert_array_equal(vol.array, raw_b.astype(np.int32) - 1024)
    assert read_volume(tmp_path).meta["series_chosen"] == "1.2.3.4"


def test_multiframe_enhanced_matches_single_frame_series(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.sequence import Sequence
    from pydicom.uid import EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

    raw, iop, pos = make_series(tmp_path / "single", n=4, intercept=-1024.0)
    ref = read_dicom_series(tmp_path / "single")

    ds = Dataset()
    ds.SOPClassUID = EnhancedCTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.Rows, ds.Columns = raw.shape[1:]
    ds.NumberOfFrames = 4
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    shared = Dataset()
    po, pm, pv = Dataset(), Dataset(), Dataset()
    po.ImageOrientationPatient = [f"{v:.8f}" for v in iop]
    pm.PixelSpacing = ["0.7", "0.9"]
    pv.RescaleSlope, pv.RescaleIntercept, pv.RescaleType = "1", "-1024", "HU"
    shared.PlaneOrientationSequence = Sequence([po])
    shared.PixelMeasuresSequence = Sequence([pm])
    shared.PixelValueTransformationSequence = Sequence([pv])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    order = [2, 0, 3, 1]  # frames stored out of spatial order
    frames = []
    for k in order:
        fr, pp = Dataset(), Dataset()
        pp.ImagePositionPatient = [f"{v:.6f}" for v in pos[k]]
        fr.PlanePositionSequence = Sequence([pp])
        frames.append(fr)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)
    ds.PixelData = np.ascontiguousarray(raw[order], dtype="<i2").tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = EnhancedCTImageStorage
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    (tmp_path / "multi").mkdir()
    ds.save_as(tmp_path / "multi" / "enhanced.dcm", enforce_file_format=True)

    vol = read_dicom_series(tmp_path / "multi")
    np.testing.assert_array_equal(vol.array, ref.array)
    assert vol.spacing == pytest.approx(ref.spacing)
    np.testing.assert_allclose(vol.origin, ref.origin, atol=1e-5)
    np.testing.assert_allclose(vol.direction, ref.direction, atol=1e-7)


@pytest.mark.usefixtures("dcm2niix")  # skips (or fails under MEDSEG_REQUIRE_SYSTEM_TOOLS=1)
def test_dcm2niix_agrees_on_physical_geometry(tmp_path: Path) -> None:
    """dcm2niix's NIfTI (read back through SimpleITK, LPS) puts each voxel value at the same
    physical point as our reading of the DICOM series (it may flip axes, so compare in world)."""
    import subprocess

    make_series(tmp_path / "s", n=5, shape=(9, 7))
    ours = read_dicom_series(tmp_path / "s")
    out = tmp_path / "nii"
    out.mkdir()
    subprocess.run(
        ["dcm2niix", "-z", "y", "-f", "vol", "-o", str(out), str(tmp_path / "s")],
        check=True,
        capture_output=True,
    )
    theirs = read_volume(out / "vol.nii.gz")
    assert sorted(theirs.shape) == sorted(ours.shape)
    idx = np.stack(np.meshgrid(*[np.arange(s) for s in theirs.shape], indexing="ij"), -1)
    world = theirs.index_to_world(idx.reshape(-1, 3))
    back = np.rint(ours.world_to_index(world)).astype(int)
    assert np.abs(ours.world_to_index(world) - back).max() < 1e-2
    np.testing.assert_array_equal(
        ours.array[back[:, 0], back[:, 1], back[:, 2]], theirs.array.reshape(-1)
    )
