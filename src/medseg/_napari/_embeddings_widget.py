"""Embeddings dock widget: precompute SAM image embeddings for a volume in the background.

It builds a :class:`~medseg.predict.sam.VolumePredictor` with the disk embedding cache
(:func:`medseg.predict.cache.default_cache_dir`) and calls ``precompute`` in a thread worker
(progress + cancel). The Interactive SAM widget uses the same cache folder, so slices embedded here
answer prompts without running the image encoder. The panel shows how many slices are cached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, Container, PushButton

from medseg._napari._common import Job, keep_choices_fresh, layer_choices, show_error, status_label
from medseg._napari._sam_widget import WINDOW_CHOICES, available_models
from medseg.errors import InputError, MedsegError

if TYPE_CHECKING:
    import napari


class EmbeddingsWidget(Container):
    """Dock panel: precompute and inspect the embedding cache of an image layer.

    Args:
        viewer: the napari viewer (injected by napari).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        self._image = ComboBox(label="image", choices=layer_choices(viewer, "image"))
        models = available_models() or ["litemedsam"]
        self._model = ComboBox(label="model", choices=models, value=models[0])
        self._window = ComboBox(label="intensity", choices=list(WINDOW_CHOICES), value="auto")
        self._run_btn = PushButton(text="Precompute all slices")
        self._check_btn = PushButton(text="Check cache")
        self._cancel_btn = PushButton(text="Cancel")
        self._state = status_label("cache: not checked")
        super().__init__(
            widgets=[
                self._image,
                self._model,
                self._window,
                self._run_btn,
                self._check_btn,
                self._cancel_btn,
                self._state,
            ],
            labels=True,
        )
        self.job = Job(status=self._set_state)
        self.predictor: Any = None
        self._key: tuple | None = None
        self._models: dict[str, Any] = {}  # loaded SAM models by name, reused across images
        self.cached: list[int] = []
        self._run_btn.changed.connect(self.precompute)
        self._check_btn.changed.connect(self.check)
        self._cancel_btn.changed.connect(self.job.cancel)
        keep_choices_fresh(viewer, self)

    def _set_state(self, text: str) -> None:
        self._state.value = text

    def _settings(self) -> tuple[str, str | None]:
        """``(model name, window)`` read on the GUI thread before a job starts."""
        window = None if self._window.value == "auto" else str(self._window.value)
        return str(self._model.value), window

    def _predictor(self, layer: Any, name: str, window: str | None) -> Any:
        from medseg._napari._layers import volume_from_layer
        from medseg.predict.cache import default_cache_dir
        from medseg.predict.sam import VolumePredictor

        key = (id(layer), id(layer.data), name, window)
        if self.predictor is None or self._key != key:
            self.predictor = VolumePredictor(
                volume_from_layer(layer),
                model=self._models.get(name, name),
                axis="z",
                window=window,
                cache_dir=default_cache_dir(),
            )
            self._models[name] = self.predictor.model
            self._key = key
        return self.predictor

    def _layer(self) -> Any:
        layer = self._image.value
        if layer is None:
            raise InputError("open an image first")
        if layer.ndim != 3:
            raise InputError(f"layer {layer.name!r} is not a 3D volume")
        return layer

    def _describe(self, pred: Any) -> str:
        self.cached = [i for i in range(pred.n_slices) if pred.is_cached(i)]
        info = pred.cache_info()
        where = info.get("disk_dir") or info.get("dir") or "memory"
        return (
            f"cache: {len(self.cached)}/{pred.n_slices} slices embedded "
            f"({pred.spec.name}, {pred.intensity.name}) in {where}"
        )

    def check(self) -> None:
        """Count the cached slices of the chosen image (loads the model once)."""
        self._start(precompute=False)

    def precompute(self) -> None:
        """Embed every slice not yet cached (background, cancellable)."""
        self._start(precompute=True)

    def _start(self, precompute: bool) -> None:
        try:
            layer = self._layer()
        except MedsegError as exc:
            show_error(str(exc))
            return
        settings = self._settings()

        def work(progress: Any) -> Any:
            pred = self._predictor(layer, *settings)
            if precompute:
                pred.precompute(None, progress=progress)
            return pred

        title = "precompute embeddings" if precompute else "embedding cache"
        self.job.start(work, title, lambda pred: self._set_state(self._describe(pred)))
