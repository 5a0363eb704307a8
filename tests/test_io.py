"""Volume / LabelMap geometry and file I/O: agreement with SimpleITK and nibabel, hand-computed
resampling, label validation, round trips through real files, and bad files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import GeometryError, InputError, OutputError
from medseg.io import (
    atomic_path,
    check_output_path,
    read_labels,
    read_volume,
    write_labels,
    write_volume,
)
from medseg.volume import LabelMap, Volume, check_same_grid, resample_labels_to

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def nib_affine_expected(vol: Volume) -> np.ndarray:
    """The RAS affine nibabel should report for ``vol`` written as NIfTI: nibabel indexes
    (i, j, k) = (x, y, z), ours (z, y, x), so permute the columns, then flip LPS -> RAS."""
    a = vol.affine_lps()
    perm = np.eye(4)
    perm[:3, :3] = np.eye(3)[:, ::-1]  # (i, j, k) -> (k, j, i)
    return LPS_TO_RAS @ a @ perm


@pytest.fixture(scope="module")
def brain1(pyradiomics_dir: Path) -> Volume:
    return read_volume(pyradiomics_dir / "brain1_image.nrrd")


@pytest.fixture
def oblique() -> Volume:
    c, s = np.cos(0.3), np.sin(0.3)
    d = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.diag([1.0, -1.0, -1.0])
    arr = np.random.default_rng(1).normal(size=(5, 6, 7)).astype(np.float32)
    return Volume(arr, spacing=(2.5, 0.8, 0.6), origin=(10.0, -20.0, 33.0), direction=d)


# ----------------------------------------------------------------------------- geometry
def test_index_to_world_matches_simpleitk_on_brain1(brain1: Volume, pyradiomics_dir: Path) -> None:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(pyradiomics_dir / "brain1_image.nrrd"))
    assert brain1.direction[1, 1] == pytest.approx(-1.0)  # the flipped y axis
    assert brain1.shape == (25, 256, 256)
    rng = np.random.default_rng(0)
    idx = np.column_stack([rng.integers(0, n, 20) for n in brain1.shape])
    ours = brain1.index_to_world(idx)
    ref = np.array([img.TransformIndexToPhysicalPoint([int(i) for i in p[::-1]]) for p in idx])
    np.testing.assert_allclose(ours, ref, atol=1e-6)
    cont = idx + 0.25
    ref_c = np.array([img.TransformContinuousIndexToPhysicalPoint(list(p[::-1])) for p in cont])
    np.testing.assert_allclose(brain1.index_to_world(cont), ref_c, atol=1e-6)
    np.testing.assert_allclose(brain1.world_to_index(ours), idx, atol=1e-9)
    a = brain1.affine_lps()
    np.testing.assert_allclose(a[:3, 3], img.GetOrigin())
    np.testing.assert_allclose(np.abs(np.linalg.det(a[:3, :3])), np.prod(img.GetSpacing()))


def test_same_grid_and_check_same_grid(oblique: Volume) -> None:
    twin = Volume(np.zeros(oblique.shape), **oblique.copy_geometry())
    assert oblique.same_grid(twin)
    check_same_grid(twin, oblique)
    moved = Volume(np.zeros(oblique.shape), oblique.spacing, (10.0, -20.0, 34.0), oblique.direction)
    assert not oblique.same_grid(moved)
    with pytest.raises(GeometryError, match=r"origin \(10, -20, 34\) vs \(10, -20, 33\) mm"):
        check_same_grid(moved, oblique)
    other_shape = Volume(np.zeros((5, 6, 8)), **oblique.copy_geometry())
    with pytest.raises(GeometryError, match=r"shape \(5, 6, 8\) vs \(5, 6, 7\)"):
        check_same_grid(other_shape, oblique)
    flipped = Volume(np.zeros(oblique.shape), oblique.spacing, oblique.origin, np.eye(3))
    with pytest.raises(GeometryError, match="direction differs"):
        check_same_grid(flipped, oblique)


def test_resample_labels_to_hand_computed() -> None:
    coarse = LabelMap(
        np.arange(1, 9, dtype=np.uint8).reshape(2, 2, 2), spacing=(2, 2, 2), labels={1: "a"}
    )
    # fine grid: centres at 0.25, 1.25, 2.25, 3.25 mm -> coarse index 0.125, 0.625, 1.125, 1.625
    # nearest: 0, 1, 1, outside (-> 0)
    ref = Volume(np.zeros((4, 4, 4)), spacing=(1, 1, 1), origin=(0.25, 0.25, 0.25))
    out = resample_labels_to(coarse, ref)
    near = [0, 1, 1, -1]
    expected = np.zeros((4, 4, 4), dtype=np.uint8)
    for k in range(4):
        for j in range(4):
            for i in range(4):
                if min(near[k], near[j], near[i]) >= 0:
                    expected[k, j, i] = coarse.array[near[k], near[j], near[i]]
    np.testing.assert_array_equal(out.array, expected)
    assert out.same_grid(ref) and out.labels == {1: "a"}


def test_labelmap_validation() -> None:
    with pytest.raises(InputError, match="whole numbers"):
        LabelMap(np.full((2, 2, 2), 0.5))
    with pytest.raises(InputError, match="whole numbers"):
        LabelMap(np.array([[[np.nan, 1.0]]]))
    with pytest.raises(InputError, match="label values must be >= 0, found -1"):
        LabelMap(np.array([[[0, -1]]]))
    with pytest.raises(InputError, match="must be integer"):
        LabelMap(np.array([[["a", "b"]]]))
    with pytest.raises(InputError, match="must be 3D"):
        LabelMap(np.zeros((2, 2)))
    assert LabelMap(np.array([[[True, False]]])).array.dtype == np.uint8
    whole = LabelMap(np.array([[[0.0, 2.0, 3.0]]]), labels={0: "bg", 2: "tumour"})
    assert whole.array.dtype == np.uint8 and whole.present() == [2, 3]
    assert whole.labels == {2: "tumour"} and whole.name(3) == "label_3"
    assert LabelMap(np.array([[[0, 300]]])).array.dtype == np.uint16
    with pytest.raises(GeometryError):
        LabelMap.like(Volume(np.zeros((2, 2, 2))), np.zeros((2, 2, 3)))


# ----------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".nii", ".mha"])
def test_labelmap_round_trip_keeps_grid_and_table(
    tmp_path: Path, oblique: Volume, suffix: str
) -> None:
    lm = LabelMap.like(oblique, (oblique.array > 0.5).astype(np.uint8) * 2, {2: "tumour"})
    img_path = write_volume(oblique, tmp_path / f"img{suffix}")
    lab_path = write_labels(lm, tmp_path / f"lab{suffix}", reference=oblique)
    back = read_labels(lab_path, reference=oblique)
    assert back.same_grid(oblique, atol_mm=1e-4)
    np.testing.assert_array_equal(back.array, lm.array)
    assert back.labels == {2: "tumour"}
    img = read_volume(img_path)
    np.testing.assert_array_equal(img.array, oblique.array)
    assert img.same_grid(oblique, atol_mm=1e-4)
    if suffix.startswith(".nii"):
        import nibabel as nib

        a_img = nib.load(str(img_path)).affine
        a_lab = nib.load(str(lab_path)).affine
        np.testing.assert_allclose(a_lab, a_img, atol=1e-5)
        np.testing.assert_allclose(a_img, nib_affine_expected(oblique), atol=1e-5)
        # and nibabel sees the same voxels in (x, y, z) order
        np.testing.assert_array_equal(np.asarray(nib.load(str(lab_path)).dataobj), lm.array.T)


def test_read_labels_checks_grid_and_values(tmp_path: Path, oblique: Volume) -> None:
    lm = LabelMap.like(oblique, np.ones(oblique.shape, dtype=np.uint8))
    shifted = Volume(oblique.array, oblique.spacing, (0.0, 0.0, 0.0), oblique.direction)
    write_labels(lm, tmp_path / "lab.nrrd")
    with pytest.raises(GeometryError, match=r"not on the image's grid.*origin"):
        read_labels(tmp_path / "lab.nrrd", reference=shifted)
    write_volume(oblique, tmp_path / "prob.nrrd")  # a float image with fractions
    with pytest.raises(InputError, match="whole numbers"):
        read_labels(tmp_path / "prob.nrrd")


def test_label_table_from_argument_wins(tmp_path: Path, oblique: Volume) -> None:
    lm = LabelMap.like(oblique, np.ones(oblique.shape, dtype=np.uint8), {1: "liver"})
    write_labels(lm, tmp_path / "lab.nii.gz")
    assert read_labels(tmp_path / "lab.nii.gz", labels={1: "organ"}).labels == {1: "organ"}


# ----------------------------------------------------------------------------- bad files
def test_truncated_nifti_gz_and_nii(tmp_path: Path, oblique: Volume) -> None:
    for suffix in (".nii.gz", ".nii"):
        good = write_volume(oblique, tmp_path / f"good{suffix}")
        data = good.read_bytes()
        bad = tmp_path / f"bad{suffix}"
        bad.write_bytes(data[: len(data) * 2 // 3])
        with pytest.raises(InputError, match="truncated"):
            read_volume(bad)


def test_truncated_nrrd(tmp_path: Path, oblique: Volume) -> None:
    good = write_volume(oblique, tmp_path / "good.nrrd")
    data = good.read_bytes()
    (tmp_path / "bad.nrrd").write_bytes(data[: len(data) - 200])
    with pytest.raises(InputError, match="cannot read image"):
        read_volume(tmp_path / "bad.nrrd")


def test_nan_intensities_rejected(tmp_path: Path, oblique: Volume) -> None:
    arr = oblique.array.copy()
    arr[1, 2, 3] = np.nan
    arr[0, 0, 0] = np.inf
    write_volume(oblique.with_array(arr), tmp_path / "nan.nrrd")
    with pytest.raises(InputError, match="2 voxels are NaN or infinite"):
        read_volume(tmp_path / "nan.nrrd")


def test_4d_nifti_rejected_singleton_4d_squeezed(tmp_path: Path) -> None:
    import nibabel as nib
    import nibabel.testing

    ex4d = Path(nibabel.testing.data_path) / "example4d.nii.gz"
    with pytest.raises(InputError, match=r"4D .*a 3D volume is needed"):
        read_volume(ex4d)
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4, 1)
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 3.0, 4.0, 1.0])), tmp_path / "one.nii.gz")
    vol = read_volume(tmp_path / "one.nii.gz")
    assert vol.shape == (4, 3, 2)
    np.testing.assert_array_equal(vol.array, arr[..., 0].T)
    assert vol.spacing == pytest.approx((4.0, 3.0, 2.0))


def test_unknown_and_missing_paths(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or folder"):
        read_volume(tmp_path / "nope.nii.gz")
    (tmp_path / "a.png").write_bytes(b"\x89PNG....")
    with pytest.raises(InputError, match="unknown file type"):
        read_volume(tmp_path / "a.png")


# ----------------------------------------------------------------------------- output rules
def test_check_output_path_rules(tmp_path: Path) -> None:
    inp = tmp_path / "in.nii.gz"
    inp.write_bytes(b"x")
    with pytest.raises(OutputError, match="output path is an input"):
        check_output_path(inp, [inp], overwrite=True)
    with pytest.raises(OutputError, match="already exists; pass --overwrite"):
        check_output_path(inp)
    assert check_output_path(inp, overwrite=True) == inp
    with pytest.raises(OutputError, match="is a folder"):
        check_output_path(tmp_path)
    (tmp_path / "dicom").mkdir()
    with pytest.raises(OutputError, match="output path is an input"):
        check_output_path(tmp_path / "dicom" / "out.nii.gz", [tmp_path / "dicom"])
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(OutputError, match="cannot create folder"):
        check_output_path(blocker / "sub" / "out.nii.gz")
    new = check_output_path(tmp_path / "new" / "deeper" / "out.nii.gz")
    assert new.parent.is_dir() and not new.exists()


def test_atomic_path_leaves_nothing_on_failure(tmp_path: Path, oblique: Volume) -> None:
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]
    assert out.read_bytes() == b"old"
    write_volume(oblique, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]
    np.testing.assert_array_equal(read_volume(out).array, oblique.array)


def test_write_refuses_existing_and_input(tmp_path: Path, oblique: Volume) -> None:
    out = write_volume(oblique, tmp_path / "a.nrrd")
    before = out.read_bytes()
    with pytest.raises(OutputError, match="already exists"):
        write_volume(oblique.with_array(oblique.array * 0), out)
    with pytest.raises(OutputError, match="output path is an input"):
        write_volume(oblique, out, inputs=[out], overwrite=True)
    assert out.read_bytes() == before
    with pytest.raises(OutputError, match="unknown output type"):
        write_volume(oblique, tmp_path / "a.png")


def test_atomic_write_gets_umask_mode_not_0600(tmp_path: Path, oblique: Volume) -> None:
    old = os.umask(0o022)
    try:
        out = write_volume(oblique, tmp_path / "img.nii.gz")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
