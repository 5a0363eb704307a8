"""napari Fine-tune panel (real viewer under Xvfb): train a LiteMedSAM decoder from an image and a
Labels layer in a worker thread, then segment with it from the Interactive SAM panel."""

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

WAIT_MS = 400_000


@pytest.fixture(scope="module", autouse=True)
def _display(x_display):
    yield


def test_slab_cases_cut_the_labelled_slices():
    from medseg._napari._finetune_widget import slab_cases
    from medseg.volume import LabelMap, Volume

    arr = np.zeros((10, 8, 8), np.int16)
    lab = np.zeros((10, 8, 8), np.uint8)
    lab[2:9, 3:5, 3:5] = 2  # slices 2..8
    vol = Volume(arr, spacing=(2.0, 1.0, 1.0))
    cases = slab_cases(vol, LabelMap.like(vol, lab, {2: "kidney"}), 2, 3)
    assert [c[1].shape[0] for c in cases] == [3, 2, 2]
    assert all(c[2].array.max() == 1 and c[2].labels == {1: "kidney"} for c in cases)
    assert sum(int(c[2].array.sum()) for c in cases) == int((lab == 2).sum())


def test_finetune_panel_trains_and_sam_panel_uses_decoder(
    make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    from medseg._napari._finetune_widget import FinetuneWidget
    from medseg._napari._sam_widget import SamWidget
    from medseg.models.decoder import read_decoder
    from medseg.phantom import make_phantom

    monkeypatch.setenv("MEDSEG_HOME", str(tmp_path / "home"))
    img, lab = make_phantom(2, shape=(24, 96, 96), spacing=(6.0, 2.0, 2.0))
    m = lab.array == 3  # kidney
    zs = np.flatnonzero(m.any(axis=(1, 2)))[:4]
    sl = np.s_[int(zs[0]) : int(zs[-1]) + 1]
    viewer = make_napari_viewer()
    image = viewer.add_image(img.array[sl].astype(np.float32), name="ct", scale=img.spacing)
    image.metadata["modality"] = "CT"
    labels = viewer.add_labels(m[sl].astype(np.uint8) * 3, name="kidney", scale=img.spacing)

    w = FinetuneWidget(viewer)
    w.reset_choices()
    w._image.value, w._pred.value = image, labels
    w._label_value.value = 3
    w._epochs.value = 1
    w._slabs.value = 2
    out = tmp_path / "kidney.pt"
    w._out.value = out
    w.train()
    qtbot.waitUntil(lambda: not w.job.busy, timeout=WAIT_MS)
    assert w.job.last_error is None, w.job.last_error
    res = w.result
    assert out.is_file() and read_decoder(out).sha256 == res.sha256
    assert len(res.train_cases) == 1 and len(res.val_cases) == 1
    assert "box Dice" in w._status.value and w._canvas is not None

    sam = SamWidget(viewer)
    sam.reset_choices()
    box = viewer.add_shapes(
        [np.array([[1, 5, 5], [1, 5, 40], [1, 40, 40], [1, 40, 5]], float)],
        shape_type="rectangle",
        ndim=3,
        scale=image.scale,
        name="box",
    )
    rr, cc = np.nonzero(m[sl][1])
    box.data = [
        np.array(
            [
                [1, rr.min() - 2, cc.min() - 2],
                [1, rr.min() - 2, cc.max() + 2],
                [1, rr.max() + 2, cc.max() + 2],
                [1, rr.max() + 2, cc.min() - 2],
            ],
            float,
        )
    ]
    sam._image.value, sam._shapes.value = image, box
    sam._use_decoder.value = True
    sam._decoder.value = out
    sam.propagate()
    qtbot.waitUntil(lambda: not sam.job.busy, timeout=WAIT_MS)
    assert sam.job.last_error is None, sam.job.last_error
    model = sam.last_segmentation.report["model"]
    assert model["decoder_sha256"] == res.sha256
    assert sam.predictor.model.decoder_sha256 == res.sha256
