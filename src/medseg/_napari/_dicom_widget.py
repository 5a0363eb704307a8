"""DICOM series dock widget: list the series of a folder and open the chosen one.

The reader opens a folder's largest series; this panel opens any other. Scanning reads headers
only (:func:`medseg.io.dicom.scan_dicom_folder`); reading runs in a thread worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, Container, FileEdit, PushButton

from medseg._napari._common import Job, chosen_path, show_error, status_label
from medseg.errors import MedsegError

if TYPE_CHECKING:
    import napari


class DicomSeriesWidget(Container):
    """Dock panel: folder → series list → open as an image layer.

    Args:
        viewer: the napari viewer (injected by napari).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        self._folder = FileEdit(label="DICOM folder", mode="d")
        self._scan_btn = PushButton(text="Scan")
        self._series = ComboBox(label="series", choices=[])
        self._open_btn = PushButton(text="Open series")
        self._status = status_label("")
        super().__init__(
            widgets=[self._folder, self._scan_btn, self._series, self._open_btn, self._status],
            labels=True,
        )
        self.job = Job(status=self._set_status)
        self.scan: Any = None
        self._scan_btn.changed.connect(self.scan_folder)
        self._open_btn.changed.connect(self.open_series)

    def _set_status(self, text: str) -> None:
        self._status.value = text

    def scan_folder(self) -> None:
        """List the folder's series (largest first)."""
        folder = chosen_path(self._folder.value)
        if folder is None:
            show_error("choose the folder holding the DICOM files first")
            return

        def work(progress: Any) -> Any:
            from medseg.io.dicom import scan_dicom_folder

            return scan_dicom_folder(folder, progress=progress)

        def done(scan: Any) -> None:
            self.scan = scan
            self._series.choices = [(s.summary(), s.uid) for s in scan.series.values()]
            self._set_status(f"{len(scan.series)} series")
            if not scan.series:
                show_error(scan._nothing_found())

        self.job.start(work, "scan DICOM folder", done)

    def open_series(self) -> None:
        """Read the chosen series and add it as an image layer."""
        uid = self._series.value
        if self.scan is None or uid is None:
            show_error("scan a folder and choose a series first")
            return
        scan = self.scan

        def work(progress: Any) -> Any:
            from medseg._napari._layers import image_layer_data
            from medseg.io.dicom import read_dicom_series

            vol = read_dicom_series(scan.folder, series=uid, progress=progress, scan=scan)
            info = scan.get(uid)
            data, kwargs, _ = image_layer_data(vol, info.description or info.uid[-12:])
            kwargs["metadata"]["dicom_series_uid"] = uid
            return data, kwargs

        def done(out: Any) -> None:
            data, kwargs = out
            try:
                self._viewer.add_image(data, **kwargs)
            except MedsegError as exc:
                show_error(str(exc))

        self.job.start(work, "read DICOM series", done)
