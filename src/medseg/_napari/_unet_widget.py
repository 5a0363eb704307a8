"""Automatic segmentation dock widget: a U-Net checkpoint (or the shipped demo) on an image layer.

Validate the layer, convert it to a :class:`~medseg.volume.Volume`, call
:meth:`medseg.predict.unet.UNetSegmenter.segment` in a thread worker with napari progress, and add
the :class:`~medseg.volume.LabelMap` as a Labels layer on the image's grid. The loaded model is kept
on the widget for the next run. torch/monai load only when Run is pressed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, Container, FileEdit, PushButton

from medseg._napari._common import (
    Job,
    keep_choices_fresh,
    layer_choices,
    show_error,
    status_label,
    unet_model_source,
)
from medseg.errors import InputError, MedsegError

if TYPE_CHECKING:
    import napari

DEMO = "unet-demo"
CHECKPOINT = "checkpoint file…"


class UNetWidget(Container):
    """Dock panel: pick a checkpoint (or the demo), run on the image layer, get a Labels layer.

    Args:
        viewer: the napari viewer (injected by napari).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        self._image = ComboBox(label="image", choices=layer_choices(viewer, "image"))
        self._model = ComboBox(label="model", choices=[DEMO, CHECKPOINT], value=DEMO)
        self._checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.pt")
        self._run_btn = PushButton(text="Run")
        self._cancel_btn = PushButton(text="Cancel")
        self._status = status_label("")
        super().__init__(
            widgets=[
                self._image,
                self._model,
                self._checkpoint,
                self._run_btn,
                self._cancel_btn,
                self._status,
            ],
            labels=True,
        )
        self.job = Job(status=self._set_status)
        self.last_segmentation: Any = None  # the last medseg.segment result (labels + report)
        self.result_layer: Any = None
        self._run_btn.changed.connect(self.run)
        self._cancel_btn.changed.connect(self.job.cancel)
        keep_choices_fresh(viewer, self)

    def _set_status(self, text: str) -> None:
        self._status.value = text

    def _model_source(self) -> str:
        return unet_model_source(str(self._model.value), self._checkpoint.value, DEMO)

    def run(self) -> None:
        """Segment the chosen image layer with the chosen model."""
        from medseg._napari._layers import labels_kwargs_like, volume_from_layer

        try:
            img = self._image.value
            if img is None:
                raise InputError("open an image first")
            vol = volume_from_layer(img)
            source = self._model_source()
        except MedsegError as exc:
            show_error(str(exc))
            return

        def work(progress: Any) -> Any:
            import medseg

            return medseg.segment(vol, model=source, progress=progress)

        def done(seg: Any) -> None:
            lm = seg.labels
            self.last_segmentation = seg
            kw = labels_kwargs_like(img, f"{img.name} unet", lm.labels)
            kw.setdefault("metadata", {})["medseg_report"] = seg.report
            from medseg._napari._layers import label_features

            kw["features"] = label_features(lm.labels, lm.present())
            self.result_layer = self._viewer.add_labels(lm.array, opacity=0.5, **kw)
            names = ", ".join(f"{v}={lm.name(v)}" for v in lm.present()) or "nothing found"
            self._set_status(f"done: {names}")

        self.job.start(work, "U-Net segmentation", done)
