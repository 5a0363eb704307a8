"""The active-learning panel in a real napari viewer: rank a folder, open the next study at its
most uncertain slice. Runs under Xvfb like the other GUI tests (``gui`` marker)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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


def test_rank_widget_ranks_and_opens_next(make_napari_viewer, qtbot, tmp_path: Path) -> None:
    from medseg._napari._common import guard_triton, slice_index

    guard_triton()
    import medseg
    from medseg._napari._rank_widget import RankWidget
    from medseg.io.itk import write_image
    from medseg.phantom import make_phantom

    folder = tmp_path / "studies"
    folder.mkdir()
    sp = (9.0, 3.0, 3.0)
    img, _ = make_phantom(seed=10, shape=(16, 64, 64), spacing=sp)
    write_image(img, folder / "clean.nii.gz")
    img, _ = make_phantom(seed=20, shape=(16, 64, 64), spacing=sp, noise_sigma=150.0)
    write_image(img, folder / "noisy.nii.gz")

    viewer = make_napari_viewer()
    w = RankWidget(viewer)
    assert w.open_next() is None  # nothing ranked yet
    w.run()  # no folder chosen: refused before any work
    assert not w.job.busy and w.ranking == []

    w._folder.value = str(folder)
    w.run()
    qtbot.waitUntil(lambda: not w.job.busy, timeout=WAIT_MS)
    assert w.job.last_error is None, w.job.last_error
    want = medseg.rank(folder, "unet-demo")
    assert [(r.study, r.slices) for r in w.ranking] == [(r.study, r.slices) for r in want]
    assert w.ranking[0].study == "noisy"
    table = w._table.value
    assert [row[1] for row in table["data"]] == ["noisy", "clean"]

    layer = w.open_next()
    assert layer.name == "noisy" and w.opened == ["noisy"]
    np.testing.assert_allclose(layer.scale, sp)
    assert slice_index(viewer, layer) == w.ranking[0].slices[0]
    assert w.open_next().name == "clean"
    assert w.open_next() is None and len(viewer.layers) == 2
