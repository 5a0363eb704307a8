"""napari: correcting a propagated 3D proposal with clicks through medseg.InteractiveSession
(a real viewer under Xvfb, the real LiteMedSAM weights, the real breast1 case).

The panel's result after each click must be the core session's for the same prompts; the viewer's
``u`` key undoes exactly, ``n`` jumps to the review slices.
"""

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


@pytest.fixture(scope="module", autouse=True)
def _no_triton_after_opengl():
    from medseg._napari._common import guard_triton

    yield
    guard_triton()


def _press(viewer, key: str) -> None:
    """Run the viewer's binding for ``key`` as a key press would."""
    for binding, func in viewer.keymap.items():
        if str(binding).lower() == key:
            func(viewer)
            return
    raise AssertionError(f"no viewer binding for {key!r}: {list(viewer.keymap)}")


def test_correct_proposal_with_clicks_undo_key_and_review(
    make_napari_viewer, qtbot, pyradiomics_dir, tmp_path, monkeypatch
):
    import medseg
    from medseg._napari._common import guard_triton, slice_index
    from medseg._napari._correct import NEXT_KEY, UNDO_KEY
    from medseg._napari._sam_widget import SamWidget

    monkeypatch.setenv("MEDSEG_HOME", str(tmp_path / "home"))
    guard_triton()
    viewer = make_napari_viewer(show=True)
    [img] = viewer.open(str(pyradiomics_dir / "breast1_image.nrrd"), plugin="medseg")
    vol = medseg.read_volume(pyradiomics_dir / "breast1_image.nrrd")
    gt = medseg.read_labels(pyradiomics_dir / "breast1_label.nrrd", reference=vol).array > 0
    z = 9  # the middle of the tumour's z range 8..10
    rr, cc = np.nonzero(gt[z])
    box = (int(rr.min()), int(cc.min()), int(rr.max()), int(cc.max()))
    rect = np.array([[z, box[0], box[1]], [z, box[0], box[3]], [z, box[2], box[3]],
                     [z, box[2], box[1]]], dtype=float)  # fmt: skip

    _, sam = viewer.window.add_plugin_dock_widget("medseg", "Interactive SAM")
    assert isinstance(sam, SamWidget)
    sam.add_prompt_layers()
    sam._shapes.value.add_rectangles(rect)
    from medseg._napari._common import goto_slice

    goto_slice(viewer, img, z)
    sam.propagate()
    qtbot.waitUntil(lambda: not sam.job.busy, timeout=WAIT_MS)
    assert sam.job.last_error is None, sam.job.last_error
    shown = sam.proposal.mask.copy()

    sam.corrector.start()
    s = sam.corrector.session
    np.testing.assert_array_equal(s.mask, shown)

    # the core session on the same predictor, same start, same click
    core = medseg.InteractiveSession(sam.predictor.volume, predictor=sam.predictor)
    core.start_from(shown, sam.last_result.review_scores())
    from scipy import ndimage

    edt = ndimage.distance_transform_edt(np.pad(gt[8], 1))[1:-1, 1:-1]
    r, c = np.unravel_index(int(np.argmax(edt)), edt.shape)
    click = (8, float(r), float(c))  # the middle of the tumour on slice 8
    core.add(medseg.Point(*click, positive=True))

    sam._points.value.add(np.array([click], dtype=float))  # the layer event drives the session
    assert len(s.steps) == 2 and s.steps[-1].slice == 8
    np.testing.assert_array_equal(sam.proposal.mask, core.mask)
    np.testing.assert_array_equal(s.mask, core.mask)

    _press(viewer, UNDO_KEY)
    np.testing.assert_array_equal(sam.proposal.mask, shown)
    assert len(s.steps) == 1

    review = s.review
    assert review and list(sam._review.choices) == review
    assert set(review) <= set(sam.last_result.review_scores())
    _press(viewer, NEXT_KEY)
    assert slice_index(viewer, img) == review[0]

    sam.accept()  # the corrected proposal is accepted like any other
    np.testing.assert_array_equal(np.asarray(sam._target.value.data) == 1, shown)
