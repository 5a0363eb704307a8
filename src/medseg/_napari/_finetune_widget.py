"""Fine-tune dock widget: train a SAM-Med mask decoder from the open image and a Labels layer.

The labelled part of the volume is cut into slabs along z (one slab held out for validation when
there are several), written as a small dataset in a temporary folder, and
:func:`medseg.train.decoder.finetune` runs in a thread worker (progress bar, Cancel leaves a
resumable checkpoint). The panel then shows the training curve and the zero-shot → fine-tuned
validation Dice; tick *fine-tuned decoder* in the Interactive SAM panel and choose the file to
segment with it. torch loads only when Train is pressed.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import ComboBox, Container, FileEdit, PushButton, SpinBox

from medseg._napari._common import Job, keep_choices_fresh, layer_choices, show_error, status_label
from medseg._napari._sam_widget import WINDOW_CHOICES, available_models
from medseg.errors import InputError, MedsegError

if TYPE_CHECKING:
    import napari

    from medseg.volume import LabelMap, Volume


def slab_cases(
    vol: Volume, labels: LabelMap, value: int, n_slabs: int
) -> list[tuple[str, Volume, LabelMap]]:
    """Cut the slices holding ``value`` into ``n_slabs`` contiguous slabs along z.

    Returns:
        ``[(case id, slab image, slab label map with the object as 1)]``; fewer slabs when there
        are fewer labelled slices.

    Raises:
        InputError: ``value`` is not in the labels.
    """
    from medseg.volume import LabelMap, Volume

    mask = labels.array == value
    zs = np.flatnonzero(mask.any(axis=(1, 2)))
    if zs.size == 0:
        raise InputError(f"label {value} is not in the Labels layer; paint it or pick another")
    z0, z1 = int(zs[0]), int(zs[-1]) + 1
    parts = [p for p in np.array_split(np.arange(z0, z1), max(1, min(n_slabs, z1 - z0))) if p.size]
    out = []
    for k, part in enumerate(parts):
        sl = slice(int(part[0]), int(part[-1]) + 1)
        img = Volume(
            np.ascontiguousarray(vol.array[sl]),
            spacing=vol.spacing,
            origin=vol.origin,
            direction=vol.direction,
            meta={"modality": vol.meta.get("modality", "")},
        )
        lab = LabelMap.like(img, mask[sl].astype(np.uint8), {1: labels.name(value)})
        out.append((f"slab{k}", img, lab))
    return out


class FinetuneWidget(Container):
    """Dock panel: fine-tune a SAM-Med decoder on the labelled structure of the open image.

    Args:
        viewer: the napari viewer (injected by napari).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        self._image = ComboBox(label="image", choices=layer_choices(viewer, "image"))
        self._pred = ComboBox(label="labels", choices=layer_choices(viewer, "labels"))
        self._label_value = SpinBox(label="label value", value=1, min=1, max=65535)
        models = available_models() or ["litemedsam"]
        self._model = ComboBox(label="model", choices=models, value=models[0])
        self._window = ComboBox(label="intensity", choices=list(WINDOW_CHOICES), value="auto")
        self._epochs = SpinBox(label="epochs", value=5, min=1, max=500)
        self._slabs = SpinBox(
            label="slabs",
            value=3,
            min=1,
            max=20,
            tooltip="the labelled slices are cut into this many slabs; one is held out for "
            "validation (1: train on all, no validation)",
        )
        self._out = FileEdit(label="save decoder", mode="w", filter="*.pt")
        self._train_btn = PushButton(text="Train")
        self._cancel_btn = PushButton(text="Cancel")
        self._status = status_label("paint the structure in a Labels layer, then Train")
        super().__init__(
            widgets=[
                self._image,
                self._pred,
                self._label_value,
                self._model,
                self._window,
                self._epochs,
                self._slabs,
                self._out,
                self._train_btn,
                self._cancel_btn,
                self._status,
            ],
            labels=True,
        )
        self.job = Job(status=self._set_status)
        self.result: Any = None  # the last FinetuneResult
        self._canvas: Any = None
        self._train_btn.changed.connect(self.train)
        self._cancel_btn.changed.connect(self.job.cancel)
        keep_choices_fresh(viewer, self)

    def _set_status(self, text: str) -> None:
        self._status.value = text

    def _inputs(self) -> tuple[Any, Any, Path]:
        img, lab = self._image.value, self._pred.value
        if img is None or lab is None:
            raise InputError("open an image and a Labels layer with the structure painted")
        if img.ndim != 3 or tuple(lab.data.shape) != tuple(img.data.shape):
            raise InputError("the Labels layer must cover the 3D image voxel for voxel")
        out = self._out.value
        if not out or Path(out).is_dir() or Path(out).suffix != ".pt":
            raise InputError("choose where to save the decoder (a .pt file)")
        return img, lab, Path(out)

    def train(self) -> None:
        """Fine-tune in a worker thread; shows the curve and the Dice when done."""
        try:
            img, lab, out = self._inputs()
        except MedsegError as exc:
            show_error(str(exc))
            return
        from medseg._napari._layers import labelmap_from_layer, volume_from_layer

        vol = volume_from_layer(img)
        lm = labelmap_from_layer(lab)
        value = int(self._label_value.value)
        model = str(self._model.value)
        window = None if self._window.value == "auto" else str(self._window.value)
        epochs, n_slabs = int(self._epochs.value), int(self._slabs.value)

        def work(progress: Any) -> Any:
            import tempfile

            from medseg.io.datasets import write_msd_dataset
            from medseg.train.decoder import finetune

            cases = slab_cases(vol, lm, value, n_slabs)
            tmp = Path(tempfile.mkdtemp(prefix="medseg_finetune_"))
            write_msd_dataset(
                tmp / "data",
                cases,
                name="napari",
                description="slabs of the open image",
                labels={1: lm.name(value)},
                modality=str(vol.meta.get("modality") or "CT"),
            )
            return finetune(
                tmp / "data",
                model,
                label=1,
                out=out,
                epochs=epochs,
                val_fraction=(1.0 / len(cases)) if len(cases) > 1 else 0.0,
                window=window,
                overwrite=True,
                plot=False,
                progress=progress,
            )

        self.job.start(work, "fine-tuning decoder", self._done)

    def _done(self, res: Any) -> None:
        self.result = res
        base, best = res.baseline, res.best
        text = f"saved {res.path.name} (best epoch {res.best_epoch})"
        if base is not None and best is not None:
            text = (
                f"box Dice {base['val_box_dice']:.3f} (zero-shot) → {best['val_box_dice']:.3f}; "
                + text
            )
        self._set_status(text + "; use it in Interactive SAM: tick 'fine-tuned decoder'")
        self._show_curve(res.history)

    def _show_curve(self, history: list[dict[str, Any]]) -> None:
        """Draw loss and validation Dice per epoch in the panel (needs matplotlib)."""
        try:
            from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
            from matplotlib.figure import Figure
        except ImportError:
            return
        if self._canvas is None:
            self._canvas = FigureCanvasQTAgg(Figure(figsize=(3.5, 2.4)))
            self.native.layout().addWidget(self._canvas)
        fig = self._canvas.figure
        fig.clear()
        ax = fig.add_subplot(111)
        tr = [r for r in history if r["train_loss"] is not None]
        ax.plot([r["epoch"] for r in tr], [r["train_loss"] for r in tr], "o-", label="loss")
        va = [r for r in history if r["val_box_dice"] is not None]
        if va:
            ax.plot([r["epoch"] for r in va], [r["val_box_dice"] for r in va], "s-", label="Dice")
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
        fig.tight_layout()
        self._canvas.draw()
