"""The SAM panel loads the model and embeds the current slice in the background when its prompt
layers are added, and embeds the slice again as soon as the box layer gets a shape on a new
slice, so "Segment slice" then costs only the decoder (Xvfb; real LiteMedSAM weights)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

pytestmark = [
    pytest.mark.gui,
    pytest.mark.skipif(
        importlib.util.find_spec("napari") is None, reason="needs napari (the [napari] extra)"
    ),
]

WAIT_MS = 240_000


@pytest.fixture(scope="session", autouse=True)
def _x_display(x_display):
    yield


def test_first_box_starts_the_slice_embedding(
    make_napari_viewer, qtbot, pyradiomics_dir, tmp_path, monkeypatch
):
    from medseg._napari._common import goto_slice, guard_triton
    from medseg._napari._sam_widget import SamWidget

    monkeypatch.setenv("MEDSEG_HOME", str(tmp_path / "home"))
    guard_triton()
    viewer = make_napari_viewer(show=True)
    [img] = viewer.open(str(pyradiomics_dir / "breast1_image.nrrd"), plugin="medseg")
    [gt_layer] = viewer.open(str(pyradiomics_dir / "breast1_label.nrrd"), plugin="medseg")
    gt = np.asarray(gt_layer.data) > 0
    z = int(np.argmax(gt.reshape(gt.shape[0], -1).sum(1)))
    _, sam = viewer.window.add_plugin_dock_widget("medseg", "Interactive SAM")
    assert isinstance(sam, SamWidget)
    sam.reset_choices()
    sam._image.value = img
    goto_slice(viewer, img, z)
    sam.add_prompt_layers()  # empty box/points layers, chosen in the panel
    # the model loads and this slice is embedded in the background while the user draws
    assert sam.prefetch.busy
    qtbot.waitUntil(lambda: not sam.prefetch.busy, timeout=WAIT_MS)
    assert sam.prefetch.last_error is None, sam.prefetch.last_error
    pred = sam.predictor
    assert pred is not None and pred.is_cached(z) and pred.encoder_calls == 1

    z2 = next(i for i in (z - 1, z + 1) if gt[i].any())  # the user moves to another slice
    goto_slice(viewer, img, z2)
    rr, cc = np.nonzero(gt[z2])
    r0, c0, r1, c1 = rr.min() - 1, cc.min() - 1, rr.max() + 1, cc.max() + 1
    rect = np.array([[z2, r0, c0], [z2, r0, c1], [z2, r1, c1], [z2, r1, c0]], dtype=float)
    sam._shapes.value.add_rectangles(rect)  # the user's first box there
    assert sam.prefetch.busy  # embedding started on the draw event, before any button
    qtbot.waitUntil(lambda: not sam.prefetch.busy, timeout=WAIT_MS)
    assert sam.prefetch.last_error is None, sam.prefetch.last_error
    assert sam.predictor is pred and pred.is_cached(z2) and pred.encoder_calls == 2

    # a point added on the embedded slice: no new embedding
    sam._points.value.add([[z2, (r0 + r1) / 2, (c0 + c1) / 2]])
    assert not sam.prefetch.busy
    sam.segment_slice()
    qtbot.waitUntil(lambda: not sam.job.busy, timeout=WAIT_MS)
    assert sam.job.last_error is None, sam.job.last_error
    assert sam.predictor is pred and pred.encoder_calls == 2  # decoder only
    # the panel's mask is the core's answer to the prompts it read (box + point)
    pr = sam._prompts(img)
    assert pr.box_rc is not None and len(pr.points_rc) == 1
    core = pred.predict(z2, box_rc=pr.box_rc, points_rc=pr.points_rc, point_labels=pr.point_labels)
    assert core.masks[0].sum() > 0
    np.testing.assert_array_equal(sam.proposal.mask[z2], core.masks[0])
