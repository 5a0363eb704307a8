"""DICOM-SEG and RTSTRUCT export/import: geometry, validity, provenance, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import GeometryError, InputError, MedsegError, OutputError
from medseg.exports import export
from medseg.io.dicom import read_dicom_series
from medseg.io.dicom_seg import (
    PALETTE,
    fit_report_json,
    read_dicom_seg,
    read_provenance,
    write_dicom_seg,
)
from medseg.io.dicom_write import write_dicom_series
from medseg.io.rtstruct import read_rtstruct, slice_contours, write_rtstruct
from medseg.volume import LabelMap, Volume

pytest.importorskip("highdicom")
pytest.importorskip("skimage")


def _rot(ax: float, ay: float, az: float) -> np.ndarray:
    def r(axis: int, deg: float) -> np.ndarray:
        c, s = np.cos(np.radians(deg)), np.sin(np.radians(deg))
        m = np.eye(3)
        i, j = [a for a in range(3) if a != axis]
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        return m

    return r(2, az) @ r(1, ay) @ r(0, ax)


#: Direction matrices (columns: LPS directions of array x, y, z), all right-handed.
GEOMETRIES = {
    "axial": np.eye(3),
    "oblique": _rot(20.0, -15.0, 30.0),
    "negative_cosines": np.diag([-1.0, -1.0, 1.0]),
    "sagittal": np.column_stack([(0, 1, 0), (0, 0, -1), (-1, 0, 0)]).astype(float),
    "coronal": np.column_stack([(1, 0, 0), (0, 0, -1), (0, 1, 0)]).astype(float),
}

REPORT = {
    "schema": "medseg-report/1",
    "engine": "sam-slice",
    "image": {"shape": [6, 13, 15], "spacing": [2.5, 0.8, 0.9]},
    "model": {
        "name": "LiteMedSAM",
        "weights_sha256": "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        "decoder_sha256": None,
        "precision": "bf16",
        "device": "cpu",
    },
    "labels": {"1": "liver", "3": "liver tumour"},
    "metrics": {"dice": {"1": 0.91}},
    "timings": {"total_s": 1.5},
    "provenance": {
        "medseg_version": "0.1.0",
        "created": "2026-12-02T14:00:00Z",
        "host": "test",
        "settings": {"window": "abdomen"},
        "prompts": [{"box": [1, 2, 5, 6], "slice": 3}],
    },
}


def _labels_array(shape: tuple[int, int, int]) -> np.ndarray:
    """Two asymmetric objects (values 1 and 3), one with a hole; z slices 1..4 only."""
    lab = np.zeros(shape, np.uint8)
    lab[1:4, 2:9, 2:7] = 1
    lab[2, 4:6, 3:5] = 0  # a hole inside label 1 on slice 2
    lab[2:5, 9:12, 6:13] = 3
    lab[3, 10, 12] = 0
    return lab


def _make_series(geometry: str, tmp_path_factory: pytest.TempPathFactory):
    rng = np.random.default_rng(7)
    vol = Volume(
        rng.integers(-200, 200, size=(6, 13, 15)).astype(np.int16),
        spacing=(2.5, 0.8, 0.9),
        origin=(12.0, -30.5, 7.25),
        direction=GEOMETRIES[geometry],
    )
    folder = tmp_path_factory.mktemp(f"series_{geometry}") / "dicom"
    write_dicom_series(vol, folder, uid_seed=geometry)
    ref = read_dicom_series(folder)
    assert np.allclose(ref.direction, vol.direction)  # right-handed: read back unchanged
    lm = LabelMap.like(ref, _labels_array(ref.shape), {1: "liver", 3: "liver tumour"})
    return folder, ref, lm


@pytest.fixture(scope="module", params=list(GEOMETRIES))
def series(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(folder, reference volume as read, label map on it) for each geometry."""
    return _make_series(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def oblique(tmp_path_factory: pytest.TempPathFactory):
    """The oblique case alone, for tests whose subject is not the geometry."""
    return _make_series("oblique", tmp_path_factory)


def _sorted_sop_uids(folder: Path, ref: Volume) -> list[str]:
    import pydicom

    hs = [pydicom.dcmread(f, stop_before_pixels=True) for f in folder.glob("*.dcm")]
    n = ref.direction[:, 2]
    hs.sort(key=lambda h: float(np.dot(n, [float(v) for v in h.ImagePositionPatient])))
    return [str(h.SOPInstanceUID) for h in hs]


# --------------------------------------------------------------------------- DICOM-SEG
def test_seg_round_trip_voxel_exact(series, tmp_path: Path) -> None:
    import highdicom as hd

    folder, ref, lm = series
    out = write_dicom_seg(lm, folder, tmp_path / "seg.dcm", report=REPORT)

    # our reader on the referenced series' grid: voxel for voxel, names, values 1 and 3
    back = read_dicom_seg(out, folder)
    assert np.array_equal(back.array, lm.array)
    assert back.labels == {1: "liver", 3: "liver tumour"}
    assert not back.meta["warnings"]
    assert back.same_grid(ref)
    # the same with the reference as a Volume
    assert np.array_equal(read_dicom_seg(out, ref).array, lm.array)

    # without a reference: the grid comes from the SEG's own plane positions (slices 1..4)
    own = read_dicom_seg(out)
    assert own.shape == (4, *ref.shape[1:])
    assert np.allclose(own.origin, ref.index_to_world((1, 0, 0)), atol=1e-3)
    assert np.allclose(own.direction, ref.direction, atol=1e-4)
    assert np.allclose(own.spacing, ref.spacing, atol=1e-4)
    assert np.array_equal(own.array, lm.array[1:5])

    # highdicom, by source instance (segment numbers 1, 2 stand for label values 1, 3)
    seg = hd.seg.segread(out)
    uids = _sorted_sop_uids(folder, ref)
    px = seg.get_pixels_by_source_instance(uids, combine_segments=True)
    lut = np.array([0, 1, 0, 2], dtype=np.uint8)
    assert np.array_equal(px, lut[lm.array])

    # highdicom's own volume, placed by its affine, lands on the same voxels
    hv = seg.get_volume(combine_segments=True)
    idx = np.argwhere(hv.array > 0)
    world = idx @ hv.affine[:3, :3].T + hv.affine[:3, 3]
    ours = np.rint(ref.world_to_index(world)).astype(int)
    assert np.allclose(ref.world_to_index(world), ours, atol=1e-3)
    assert np.array_equal(lut[lm.array[tuple(ours.T)]], hv.array[tuple(idx.T)])
    assert len(idx) == np.count_nonzero(lm.array)


def test_seg_is_valid_dicom(series, tmp_path: Path) -> None:
    import highdicom as hd
    import pydicom
    from pydicom import config

    folder, ref, lm = series
    out = write_dicom_seg(lm, folder, tmp_path / "seg.dcm", report=REPORT)
    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        ds = pydicom.dcmread(out)
        n = 0
        for elem in ds.iterall():  # every attribute, nested ones too, parses and validates
            _ = elem.value
            n += 1
    finally:
        config.settings.reading_validation_mode = old
    assert n > 100
    hd.seg.Segmentation.from_dataset(ds)  # highdicom's own checks on a SEG
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == ref.meta["series_uid"]
    referenced = {
        r.ReferencedSOPInstanceUID
        for r in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence
    }
    uids = _sorted_sop_uids(folder, ref)
    assert referenced == set(uids)  # every source slice
    assert ds.FrameOfReferenceUID == pydicom.dcmread(next(folder.glob("*.dcm"))).FrameOfReferenceUID
    # frames sit at the source slices' positions
    srcs = {
        str(h.SOPInstanceUID): [float(v) for v in h.ImagePositionPatient]
        for h in (pydicom.dcmread(f, stop_before_pixels=True) for f in folder.glob("*.dcm"))
    }
    for fg in ds.PerFrameFunctionalGroupsSequence:
        src = fg.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = [float(v) for v in fg.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(pos, srcs[src], atol=1e-4)
    liver, tumour = ds.SegmentSequence
    assert (liver.SegmentLabel, tumour.SegmentLabel) == ("liver", "liver tumour")
    assert liver.SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SCT Liver
    assert tumour.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # Neoplasm
    assert tumour.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert tumour.AnatomicRegionSequence[0].CodeValue == "10200004"
    assert liver.SegmentAlgorithmType == "SEMIAUTOMATIC"  # the report has prompts
    algo = liver.SegmentationAlgorithmIdentificationSequence[0]
    assert algo.AlgorithmName == "LiteMedSAM"
    assert algo.AlgorithmVersion == "medseg 0.1.0"
    assert REPORT["model"]["weights_sha256"] in algo.AlgorithmParameters
    rgb = hd.color.CIELabColor.from_dicom_value(liver.RecommendedDisplayCIELabValue).to_rgb()
    assert np.allclose(rgb, PALETTE[0], atol=2)
    assert "LiteMedSAM" in ds.ContentDescription


def test_seg_left_handed_label_map_is_flipped_onto_the_series(tmp_path: Path) -> None:
    """A label map on the same physical grid stored with z reversed is accepted."""
    vol = Volume(np.zeros((5, 8, 9), np.int16), spacing=(2.0, 1.0, 1.0))
    folder = tmp_path / "dicom"
    write_dicom_series(vol, folder, uid_seed="lh")
    ref = read_dicom_series(folder)
    lab = np.zeros(ref.shape, np.uint8)
    lab[0, 1:3, 1:4] = 2
    lab[3, 5:7, 2:8] = 2
    flipped_dir = ref.direction.copy()
    flipped_dir[:, 2] *= -1
    lh = LabelMap(
        array=lab[::-1].copy(),
        labels={2: "kidney"},
        spacing=ref.spacing,
        origin=tuple(ref.index_to_world((4, 0, 0))),
        direction=flipped_dir,
    )
    out = write_dicom_seg(lh, folder, tmp_path / "lh.dcm")
    back = read_dicom_seg(out, folder)
    assert np.array_equal(back.array, lab)
    assert back.labels == {2: "kidney"}
    import pydicom

    ds = pydicom.dcmread(out)
    assert ds.SegmentSequence[0].SegmentAlgorithmType == "MANUAL"  # no report: origin unknown
    assert "ImageComments" not in ds
    assert read_provenance(out) is None


def test_liver_1frame_opens_on_its_own_geometry(pydicom_test_files: Path) -> None:
    import pydicom

    path = pydicom_test_files / "liver_1frame.dcm"
    ds = pydicom.dcmread(path)
    lm = read_dicom_seg(path)
    assert lm.shape == (1, 512, 512)
    assert lm.labels == {1: "Liver"}
    assert lm.present() == [1]
    assert np.count_nonzero(lm.array) == np.count_nonzero(ds.pixel_array)
    assert np.array_equal(lm.array[0] > 0, ds.pixel_array > 0)
    ipp = ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient
    assert np.allclose(lm.origin, [float(v) for v in ipp])
    assert lm.meta["referenced_series_uid"]
    # on a given grid one slice below the frame, the frame lands in slice 1
    grid = LabelMap(
        array=np.zeros((3, 512, 512), np.uint8),
        spacing=lm.spacing,
        origin=tuple(lm.index_to_world((-1, 0, 0))),
        direction=lm.direction,
    )
    on = read_dicom_seg(path, grid)
    assert np.array_equal(on.array[1], lm.array[0])
    assert not on.array[0].any() and not on.array[2].any()
    # a grid the frame does not fall on is refused
    shifted = Volume(np.zeros((3, 512, 512)), spacing=lm.spacing, origin=(0.0, 0.0, 0.0))
    with pytest.raises(GeometryError, match="does not fall on a slice"):
        read_dicom_seg(path, shifted)


# --------------------------------------------------------------------------- RTSTRUCT
def test_rtstruct_round_trip_within_one_voxel(series, tmp_path: Path) -> None:
    import pydicom
    from scipy import ndimage

    folder, ref, lm = series
    out = write_rtstruct(lm, folder, tmp_path / "rt.dcm", report=REPORT)
    back = read_rtstruct(out, folder)
    assert back.same_grid(ref)
    assert back.labels == {1: "liver", 3: "liver tumour"}
    for v in (1, 3):
        a, b = lm.array == v, back.array == v
        dice = 2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
        assert dice > 0.9
        # any disagreement lies on the label's boundary (within one voxel in-plane)
        edge = np.zeros_like(a)
        for k in range(a.shape[0]):
            edge[k] = ndimage.binary_dilation(a[k]) & ~ndimage.binary_erosion(a[k])
        assert not np.any((a ^ b) & ~edge)
    assert not back.array[2, 4:6, 3:5].any()  # the hole came back as a hole

    # every contour point lies on its slice and within one voxel of the label's boundary
    ds = pydicom.dcmread(out)
    for rc in ds.ROIContourSequence:
        value = {1: 1, 2: 3}[int(rc.ReferencedROINumber)]
        for c in rc.ContourSequence:
            pts = np.asarray([float(x) for x in c.ContourData]).reshape(-1, 3)
            idx = ref.world_to_index(pts)
            k = int(np.rint(idx[0, 0]))
            assert np.allclose(idx[:, 0], k, atol=1e-3)
            padded = np.pad(lm.array[k] == value, 1)  # outside the grid counts as outside
            for _, r, col in idx:
                r0, c0 = int(np.floor(r + 1e-6)) + 1, int(np.floor(col + 1e-6)) + 1
                patch = padded[r0 : r0 + 2, c0 : c0 + 2]
                assert patch.any() and not patch.all()  # between inside and outside centres


def test_rtstruct_is_valid_dicom(series, tmp_path: Path) -> None:
    import pydicom
    from pydicom import config

    folder, ref, lm = series
    out = write_rtstruct(lm, folder, tmp_path / "rt.dcm", report=REPORT)
    old = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        ds = pydicom.dcmread(out)
        for elem in ds.iterall():
            _ = elem.value
    finally:
        config.settings.reading_validation_mode = old
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.481.3"
    assert ds.Modality == "RTSTRUCT"
    fr = ds.ReferencedFrameOfReferenceSequence[0]
    rs = fr.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert rs.SeriesInstanceUID == ref.meta["series_uid"]
    assert len(rs.ContourImageSequence) == ref.shape[0]
    assert [r.ROIName for r in ds.StructureSetROISequence] == ["liver", "liver tumour"]
    assert list(ds.ROIContourSequence[1].ROIDisplayColor) == list(PALETTE[2])
    obs = ds.RTROIObservationsSequence
    assert obs[0].RTROIInterpretedType == "ORGAN"
    assert obs[1].RTROIIdentificationCodeSequence[0].CodeValue == "108369006"
    assert ds.StructureSetROISequence[0].ROIGenerationAlgorithm == "SEMIAUTOMATIC"
    uids = set(_sorted_sop_uids(folder, ref))
    for rc in ds.ROIContourSequence:
        for c in rc.ContourSequence:
            assert c.ContourImageSequence[0].ReferencedSOPInstanceUID in uids


def test_slice_contours_hand_case() -> None:
    """A 2x2 square: one contour through the 4 edge midpoints' corners, at half-voxel lines."""
    m = np.zeros((4, 4), bool)
    m[1:3, 1:3] = True
    (c,) = slice_contours(m)
    assert c.min(axis=0).tolist() == [0.5, 0.5]
    assert c.max(axis=0).tolist() == [2.5, 2.5]
    ring = np.ones((5, 5), bool)
    ring[2, 2] = False
    assert len(slice_contours(ring)) == 2  # the outer boundary and the hole


def test_pydicom_rtstruct_reads_or_fails_cleanly(pydicom_test_files: Path) -> None:
    path = pydicom_test_files / "rtstruct.dcm"
    with pytest.raises(InputError, match="reference"):
        read_rtstruct(path)
    # a grid covering its contours (x -200..200, y -150..150 mm on z = -200, -190, -180)
    grid = Volume(np.zeros((3, 65, 85)), spacing=(10.0, 5.0, 5.0), origin=(-210.0, -160.0, -200.0))
    lm = read_rtstruct(path, grid)
    assert lm.labels[1] == "patient"
    assert lm.present() == [1]  # the two POINT ROIs (isocentres) are not areas
    assert any("skipped 2 contour" in w for w in lm.meta["warnings"])
    for k in range(3):
        rows, cols = np.nonzero(lm.array[k])
        # voxel centres strictly inside the 400 x 300 mm rectangle: x index 3..81, y 3..61
        assert rows.min() in (2, 3) and rows.max() in (61, 62)
        assert cols.min() in (2, 3) and cols.max() in (81, 82)
        assert lm.array[k, 10:55, 10:75].all()


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("fmt", ["dicom-seg", "rtstruct"])
def test_other_grid_is_refused_naming_the_difference(series, tmp_path: Path, fmt: str) -> None:
    folder, ref, lm = series
    moved = LabelMap(
        array=lm.array,
        labels=lm.labels,
        spacing=(ref.spacing[0], ref.spacing[1], ref.spacing[2] * 2),
        origin=ref.origin,
        direction=ref.direction,
    )
    with pytest.raises(GeometryError, match="spacing"):
        export(moved, folder, fmt, tmp_path / "x.dcm")
    small = LabelMap.like(Volume(np.zeros((6, 13, 14))), np.zeros((6, 13, 14), np.uint8))
    small.array[2, 2, 2] = 1
    with pytest.raises(GeometryError, match="shape"):
        export(small, folder, fmt, tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()


@pytest.mark.parametrize("fmt", ["dicom-seg", "rtstruct"])
def test_gantry_tilted_series_is_refused(tmp_path: Path, fmt: str) -> None:
    import pydicom

    vol = Volume(np.zeros((5, 8, 9), np.int16), spacing=(3.0, 1.0, 1.0))
    folder = tmp_path / "tilted"
    write_dicom_series(vol, folder, uid_seed="tilt")
    for f in sorted(folder.glob("*.dcm")):  # shear: each slice 0.5 mm further along y
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * z / 3.0, z]
        ds.save_as(f)
    ref = read_dicom_series(folder)
    assert any("tilt" in w for w in ref.meta["warnings"])
    lm = LabelMap.like(ref, np.ones(ref.shape, np.uint8))
    with pytest.raises(GeometryError, match="gantry-tilted"):
        export(lm, folder, fmt, tmp_path / "t.dcm")


def test_export_api_paths_and_output_rules(oblique, tmp_path: Path) -> None:
    from medseg.io import write_labels

    folder, ref, lm = oblique
    nii = write_labels(lm, tmp_path / "labels.nii.gz")
    out = export(nii, folder, "dicom-seg", tmp_path / "out" / "seg.dcm", report=REPORT)
    assert np.array_equal(read_dicom_seg(out, folder).array, lm.array)
    with pytest.raises(OutputError, match="exists"):
        export(nii, folder, "dicom-seg", out)
    assert export(nii, folder, "dicom-seg", out, overwrite=True) == out
    with pytest.raises(OutputError, match="input"):
        export(lm, folder, "rtstruct", folder / "rt.dcm")
    with pytest.raises(OutputError, match="input"):
        export(nii, folder, "rtstruct", nii, overwrite=True)
    with pytest.raises(InputError, match="format"):
        export(lm, folder, "stl", tmp_path / "x.stl")
    empty = LabelMap.like(ref, np.zeros(ref.shape, np.uint8))
    with pytest.raises(InputError, match="empty"):
        export(empty, folder, "rtstruct", tmp_path / "e.dcm")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz", "out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["seg.dcm"]
    with pytest.raises(MedsegError):
        read_dicom_seg(nii)


# --------------------------------------------------------------------------- provenance
def test_provenance_round_trip(oblique, tmp_path: Path) -> None:
    folder, _ref, lm = oblique
    seg = export(lm, folder, "dicom-seg", tmp_path / "seg.dcm", report=REPORT)
    assert read_provenance(seg) == json.loads(json.dumps(REPORT))
    assert read_dicom_seg(seg, folder).meta["provenance"] == read_provenance(seg)
    rt = export(lm, folder, "rtstruct", tmp_path / "rt.dcm", report=REPORT)
    assert read_provenance(rt) == json.loads(json.dumps(REPORT))  # fits the 1024-char ST
    assert read_rtstruct(rt, folder).meta["provenance"] == read_provenance(rt)
    # a report too long for StructureSetDescription keeps what identifies the result
    big = json.loads(json.dumps(REPORT))
    big["provenance"]["prompts"] = [{"point": [i, i], "slice": i % 6} for i in range(100)]
    rt_big = export(lm, folder, "rtstruct", tmp_path / "rt_big.dcm", report=big)
    got = read_provenance(rt_big)
    assert got is not None and got["truncated"] == ["provenance.prompts"]
    assert got["model"] == REPORT["model"]
    assert got["provenance"]["settings"] == REPORT["provenance"]["settings"]
    assert read_provenance(seg) == json.loads(json.dumps(REPORT))
    assert read_provenance(folder / "slice_0000.dcm") is None  # a CT slice holds no report
    (tmp_path / "x.nii").write_bytes(b"\0" * 400)
    assert read_provenance(tmp_path / "x.nii") is None  # not DICOM
    with pytest.raises(InputError, match="no such file"):
        read_provenance(tmp_path / "missing.dcm")


def test_fit_report_json_limits() -> None:
    big = json.loads(json.dumps(REPORT))
    big["provenance"]["prompts"] = [{"box": [i, i, i + 5, i + 5], "slice": i} for i in range(2000)]
    text = fit_report_json(big, 10240)
    assert text is not None and len(text) <= 10240
    got = json.loads(text)
    assert got["truncated"] == ["provenance.prompts"]
    assert got["model"] == REPORT["model"]
    assert got["metrics"] == REPORT["metrics"]
    small = json.loads(fit_report_json(REPORT, 200))
    assert len(fit_report_json(REPORT, 200)) <= 200
    assert small["model"]["weights_sha256"] == REPORT["model"]["weights_sha256"]
    assert fit_report_json(None, 100) is None
    assert json.loads(fit_report_json(REPORT, 10**6)) == REPORT


def test_small_position_jitter_is_accepted_and_a_gap_refused(tmp_path: Path) -> None:
    """Real series round positions: 0.03 mm jitter exports exactly; a missing slice is refused."""
    import pydicom

    vol = Volume(np.zeros((6, 8, 9), np.int16), spacing=(2.0, 1.0, 1.0), origin=(1.0, 2.0, 3.0))
    folder = tmp_path / "jitter"
    files = write_dicom_series(vol, folder, uid_seed="jitter")
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, round(z + (0.03 if k % 2 else -0.03), 2)]
        ds.save_as(f)
    ref = read_dicom_series(folder)
    lab = np.zeros(ref.shape, np.uint8)
    lab[:, 2:5, 3:7] = 1
    lab[5, 0, 0] = 2
    lm = LabelMap.like(ref, lab, {1: "spleen", 2: "a\\b"})
    out = write_dicom_seg(lm, folder, tmp_path / "j.dcm")
    back = read_dicom_seg(out, folder)
    assert np.array_equal(back.array, lab)
    assert back.labels == {1: "spleen", 2: "a b"}  # a backslash cannot live in an LO value

    files[3].unlink()  # a gap: slices 2 and 4 are now 4 mm apart
    ref2 = read_dicom_series(folder)
    lm2 = LabelMap.like(ref2, np.ones(ref2.shape, np.uint8))
    with pytest.raises(GeometryError, match="off the series' regular grid"):
        write_dicom_seg(lm2, folder, tmp_path / "g.dcm")


@pytest.mark.parametrize("seg_type", ["LABELMAP", "FRACTIONAL"])
def test_reader_handles_labelmap_and_fractional_segs(tmp_path: Path, seg_type: str) -> None:
    """SEGs from other tools: highdicom-written LABELMAP and FRACTIONAL (> 50 % is inside)."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    from medseg.io.dicom_seg import load_reference_series

    vol = Volume(np.zeros((4, 9, 10), np.int16), spacing=(3.0, 0.7, 0.7))
    folder = tmp_path / "dicom"
    write_dicom_series(vol, folder, uid_seed="other")
    ref = load_reference_series(folder)
    lab = np.zeros(ref.volume.shape, np.uint8)
    lab[0:3, 1:4, 2:6] = 1
    lab[2:4, 5:8, 4:9] = 2
    lab[1, 2, 3] = 0
    if seg_type == "LABELMAP":
        pixels = lab
    else:  # probabilities: 0.9 / 0.7 inside, 0.3 in a ring that must stay outside
        pixels = np.stack([(lab == 1) * 0.9, (lab == 2) * 0.7], axis=-1).astype(np.float32)
        pixels[0, 0, :, 0] = 0.3
    descs = [
        hd.seg.SegmentDescription(n, name, codes.SCT.Organ, codes.SCT.Liver, "MANUAL")
        for n, name in [(1, "first"), (2, "second")]
    ]
    seg = hd.seg.Segmentation(
        ref.headers, pixels, seg_type, descs, hd.UID(), 1, hd.UID(), 1, "x", "x", "1", "1"
    )
    seg.save_as(tmp_path / "other.dcm")
    back = read_dicom_seg(tmp_path / "other.dcm", folder)
    assert np.array_equal(back.array, lab)
    assert back.labels == {1: "first", 2: "second"}


def test_series_is_chosen_in_a_folder_of_several(tmp_path: Path) -> None:
    import pydicom

    study = tmp_path / "study"
    big = Volume(np.zeros((5, 6, 7), np.int16), spacing=(2.0, 1.0, 1.0))
    small = Volume(np.zeros((3, 6, 7), np.int16), spacing=(2.0, 1.0, 1.0), origin=(0, 0, 50))
    write_dicom_series(big, study / "a", uid_seed="a", series_uid="1.2.3.1")
    write_dicom_series(small, study / "b", uid_seed="b", series_uid="1.2.3.2")
    ref_small = read_dicom_series(study, series="1.2.3.2")
    lm = LabelMap.like(ref_small, np.ones(ref_small.shape, np.uint8), {1: "lung"})
    with pytest.raises(GeometryError, match="shape"):  # the largest series is the default
        export(lm, study, "dicom-seg", tmp_path / "x.dcm")
    out = export(lm, study, "dicom-seg", tmp_path / "s.dcm", series="1.2.3.2")
    assert pydicom.dcmread(out).ReferencedSeriesSequence[0].SeriesInstanceUID == "1.2.3.2"
    assert np.array_equal(read_dicom_seg(out, study / "b").array, lm.array)
    rt = export(lm, study, "rtstruct", tmp_path / "r.dcm", series="1.2.3.2")
    assert np.array_equal(read_rtstruct(rt, ref_small).array, lm.array)
    assert not read_rtstruct(rt, ref_small).meta["warnings"]
    # the same grid under another series UID: placed by position, with a warning
    write_dicom_series(small, tmp_path / "copy", uid_seed="c", series_uid="1.2.3.9")
    for back in (read_dicom_seg(out, tmp_path / "copy"), read_rtstruct(rt, tmp_path / "copy")):
        assert np.array_equal(back.array, lm.array)
        assert any("references series 1.2.3.2" in w for w in back.meta["warnings"])


def test_real_scanner_series_from_pydicom(pydicom_test_files: Path, tmp_path: Path) -> None:
    """pydicom's CT5N (5 real axial CT slices) exports exactly; CT2 (4 slices, a 200 mm gap)
    is refused."""
    ct5n = pydicom_test_files / "dicomdirtests" / "98892001" / "CT5N"
    ref = read_dicom_series(ct5n)
    lab = np.zeros(ref.shape, np.uint8)
    lab[1:4, 3:9, 5:12] = 1
    lab[4, 10:14, 2:5] = 2
    lm = LabelMap.like(ref, lab, {1: "liver", 2: "lesion"})
    seg = export(lm, ct5n, "dicom-seg", tmp_path / "seg.dcm")
    assert np.array_equal(read_dicom_seg(seg, ct5n).array, lab)
    rt = export(lm, ct5n, "rtstruct", tmp_path / "rt.dcm")
    assert np.array_equal(read_rtstruct(rt, ct5n).array, lab)

    ct2 = pydicom_test_files / "dicomdirtests" / "77654033" / "CT2"
    ref2 = read_dicom_series(ct2)
    lm2 = LabelMap.like(ref2, np.ones(ref2.shape, np.uint8))
    with pytest.raises(GeometryError, match="gap"):
        export(lm2, ct2, "dicom-seg", tmp_path / "gap.dcm")


@pytest.mark.parametrize("fmt", ["dicom-seg", "rtstruct"])
def test_series_without_frame_of_reference_fails_cleanly(tmp_path: Path, fmt: str) -> None:
    import pydicom

    from medseg.errors import DicomError

    folder = tmp_path / "nofor"
    for f in write_dicom_series(Volume(np.zeros((3, 5, 6), np.int16)), folder, uid_seed="nf"):
        ds = pydicom.dcmread(f)
        del ds.FrameOfReferenceUID
        ds.save_as(f)
    ref = read_dicom_series(folder)
    with pytest.raises(DicomError, match=r"Frame ?Of ?Reference ?UID"):
        export(LabelMap.like(ref, np.ones(ref.shape, np.uint8)), folder, fmt, tmp_path / "o.dcm")
    assert not (tmp_path / "o.dcm").exists()


def test_medseg_export_is_the_facade_function(oblique, tmp_path: Path) -> None:
    """``medseg.export`` is the function (the module is ``medseg.exports``)."""
    import medseg

    folder, _ref, lm = oblique
    out = medseg.export(lm, folder, "dicom-seg", tmp_path / "m.dcm")
    assert np.array_equal(read_dicom_seg(out, folder).array, lm.array)
