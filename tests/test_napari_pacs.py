"""The PACS panel in a real napari viewer against a real Orthanc: search, open a series as an
image layer, push a Labels layer back as a DICOM-SEG. Runs under Xvfb (``gui`` marker)."""

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

WAIT_MS = 120_000


@pytest.fixture(scope="session", autouse=True)
def _x_display(x_display):
    yield


def test_pacs_widget_search_open_push(
    make_napari_viewer, qtbot, tmp_path_factory, pydicom_test_files: Path, tmp_path: Path
) -> None:
    pytest.importorskip("dicomweb_client")
    from medseg._napari._common import guard_triton
    from test_pacs import Orthanc

    guard_triton()
    import medseg
    from medseg._napari._layers import labels_kwargs_like
    from medseg._napari._pacs_widget import PacsWidget
    from medseg.io import remote

    server = Orthanc(tmp_path_factory.mktemp("orthanc_gui"))
    try:
        src = pydicom_test_files / "dicomdirtests" / "98892001" / "CT5N"
        remote.push_files(sorted(src.iterdir()), server.root)
        viewer = make_napari_viewer()
        w = PacsWidget(viewer)
        w.open_row()  # nothing searched yet: refused, no job
        assert not w.job.busy

        w._server.value = server.root
        w._modality.value = "CT"
        w.search()
        qtbot.waitUntil(lambda: not w.job.busy, timeout=WAIT_MS)
        assert w.job.last_error is None, w.job.last_error
        assert len(w.rows) == 1 and w.rows[0]["instances"] == 5
        assert w._table.value["data"][0][-1] == w.rows[0]["url"]

        w.open_row()
        qtbot.waitUntil(lambda: not w.job.busy, timeout=WAIT_MS)
        assert w.job.last_error is None, w.job.last_error
        image = viewer.layers[-1]
        local = medseg.read_volume(src)
        np.testing.assert_array_equal(np.asarray(image.data), local.array)
        assert image.metadata["source"] == w.rows[0]["url"]

        painted = np.zeros(local.array.shape, np.uint8)
        painted[1:4, 4:10, 5:12] = 1
        labels = viewer.add_labels(painted, **labels_kwargs_like(image, "lesion", {1: "lesion"}))
        w.reset_choices()
        w._seg_layer.value = labels
        w.push()
        qtbot.waitUntil(lambda: not w.job.busy, timeout=WAIT_MS)
        assert w.job.last_error is None, w.job.last_error
        assert len(w.pushed) == 1

        (seg_row,) = remote.search(server.root, modality="SEG")
        assert seg_row["study_uid"] == w.rows[0]["study_uid"]
        remote.pull_series(seg_row["url"], tmp_path / "seg")
        (seg_file,) = list((tmp_path / "seg").iterdir())
        back = medseg.read_labels(seg_file, reference=local)
        np.testing.assert_array_equal(back.array, painted)
    finally:
        server.stop()
