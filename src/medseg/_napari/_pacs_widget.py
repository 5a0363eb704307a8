"""PACS dock widget: search a DICOMweb (or ``dimse://``) archive, open a series as an image layer,
push a Labels layer back as a DICOM-SEG (a new series of the same study).

Search and open run in a thread worker with napari progress (:class:`~medseg._napari._common.Job`);
the series is fetched into medseg's cache (:func:`medseg.io.remote.fetch_series`) and read like a
DICOM folder, so the image layer's ``metadata["source"]`` is the series URL. Push writes the
DICOM-SEG on the cached series (:func:`medseg.exports.export`) in a temporary folder and stores
it with :func:`medseg.io.remote.push_files`. Credentials come from the environment as for the CLI.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, Container, LineEdit, PushButton, SpinBox, Table

from medseg._napari._common import (
    Job,
    keep_choices_fresh,
    layer_choices,
    show_error,
    status_label,
)
from medseg.errors import InputError, MedsegError

if TYPE_CHECKING:
    import napari

COLUMNS = ("date", "patient", "modality", "instances", "description", "url")


class PacsWidget(Container):
    """Dock panel: server + filters → series table; "Open row" adds the series as an image layer;
    "Push labels" stores the chosen Labels layer as a DICOM-SEG on the server it came from.

    Args:
        viewer: the napari viewer (injected by napari).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        self._server = LineEdit(label="server", value="http://localhost:8042/dicom-web")
        self._patient = LineEdit(label="patient ID", value="")
        self._modality = LineEdit(label="modality", value="")
        self._date = LineEdit(label="study date", value="")
        self._search_btn = PushButton(text="Search")
        self._table = Table(value={c: [] for c in COLUMNS})
        self._row = SpinBox(label="row", value=1, min=1, max=100_000)
        self._open_btn = PushButton(text="Open row")
        self._seg_layer = ComboBox(label="labels", choices=layer_choices(viewer, "labels"))
        self._push_btn = PushButton(text="Push labels as DICOM-SEG")
        self._cancel_btn = PushButton(text="Cancel")
        self._status = status_label("")
        super().__init__(
            widgets=[
                self._server,
                self._patient,
                self._modality,
                self._date,
                self._search_btn,
                self._table,
                self._row,
                self._open_btn,
                self._seg_layer,
                self._push_btn,
                self._cancel_btn,
                self._status,
            ],
            labels=True,
        )
        self.job = Job(status=self._set_status)
        self.rows: list[dict[str, Any]] = []  # the last search's series rows
        self.pushed: list[str] = []  # SOPInstanceUIDs stored by the last push
        keep_choices_fresh(viewer, self)
        self._search_btn.changed.connect(self.search)
        self._open_btn.changed.connect(self.open_row)
        self._push_btn.changed.connect(self.push)
        self._cancel_btn.changed.connect(self.job.cancel)

    def _set_status(self, text: str) -> None:
        self._status.value = text

    def search(self) -> None:
        """QIDO-RS (or C-FIND) with the filters; fills the table."""
        url = str(self._server.value).strip()
        filters = {
            "patient": str(self._patient.value).strip() or None,
            "modality": str(self._modality.value).strip() or None,
            "study_date": str(self._date.value).strip() or None,
        }
        if not url:
            show_error("enter the server's DICOMweb root URL (or dimse://AET@HOST:PORT)")
            return

        def work(progress: Any) -> Any:
            from medseg.io.remote import search

            progress(0, 1)
            rows = search(url, **filters)
            progress(1, 1)
            return rows

        def done(rows: list[dict[str, Any]]) -> None:
            self.rows = list(rows)
            self._table.value = {
                "date": [r["study_date"] or "" for r in rows],
                "patient": [r["patient_id"] or "" for r in rows],
                "modality": [r["modality"] or "" for r in rows],
                "instances": [r["instances"] if r["instances"] is not None else "" for r in rows],
                "description": [r["series_description"] or "" for r in rows],
                "url": [r["url"] for r in rows],
            }
            self._set_status(f"{len(rows)} series")

        self.job.start(work, "search", done)

    def open_row(self) -> None:
        """Fetch the chosen row's series (cached, resumable) and add it as an image layer."""
        i = int(self._row.value) - 1
        if not 0 <= i < len(self.rows):
            show_error(f"row {i + 1} does not exist; press Search and choose a row of the table")
            return
        row = self.rows[i]
        url = row["url"]

        def work(progress: Any) -> Any:
            from medseg.io.dicom import read_dicom_series
            from medseg.io.remote import fetch_series, parse_remote_series

            folder = fetch_series(url, progress=progress)
            vol = read_dicom_series(folder)
            vol.meta["dicom_folder"] = str(folder)
            vol.meta["source"] = parse_remote_series(url).url
            return vol

        def done(vol: Any) -> None:
            from medseg._napari._layers import image_layer_data

            name = row["series_description"] or row["series_uid"]
            data, kwargs, _ = image_layer_data(vol, str(name))
            self._viewer.add_image(data, **kwargs)
            self._set_status(f"opened {name} ({vol.array.shape[0]} slices)")

        self.job.start(work, "open series", done)

    def push(self) -> None:
        """Store the chosen Labels layer as a DICOM-SEG of its series on that series' server."""
        layer = self._seg_layer.value
        try:
            if layer is None:
                raise InputError("choose a Labels layer drawn on a series opened from the PACS")
            from medseg._napari._layers import labelmap_from_layer
            from medseg.io.remote import is_remote_url, parse_remote_series

            url = (layer.metadata or {}).get("image_source")
            if not is_remote_url(url):
                raise InputError(
                    f"{layer.name}: its image was not opened from a PACS; open the series with "
                    "this panel and draw or segment on it"
                )
            ref = parse_remote_series(url)
            lm = labelmap_from_layer(layer)
        except MedsegError as exc:
            show_error(str(exc))
            return
        name = layer.name

        def work(progress: Any) -> Any:
            from medseg.exports import export
            from medseg.io.remote import fetch_series, push_files

            folder = fetch_series(url, progress=progress)
            with tempfile.TemporaryDirectory(prefix="medseg-push-") as tmp:
                seg = export(lm, folder, "dicom-seg", Path(tmp) / f"{name}.dcm", overwrite=True)
                return push_files([seg], ref.root, study=ref.study)

        def done(stored: list[str]) -> None:
            self.pushed = list(stored)
            self._set_status(f"pushed {name} as a DICOM-SEG to {ref.root} (study {ref.study})")

        self.job.start(work, "push", done)
