"""Active-learning dock widget: rank a folder's unlabelled studies and open the next one to label.

Rank calls :func:`medseg.rank` (every study through :func:`medseg.segment`) in a thread worker
with napari progress and shows the ranking (study, score, slices to look at). "Open next" reads
the most uncertain study not opened yet, adds it as an image layer on its physical grid, and moves
the viewer to its first slice to look at. torch/monai load only when Rank is pressed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from magicgui.widgets import ComboBox, Container, FileEdit, PushButton, SpinBox, Table

from medseg._napari._common import (
    Job,
    chosen_path,
    goto_slice,
    show_error,
    show_info,
    status_label,
    unet_model_source,
)
from medseg.errors import InputError, MedsegError

if TYPE_CHECKING:
    import napari

DEMO = "unet-demo"
CHECKPOINT = "checkpoint file…"
COLUMNS = ("rank", "study", "score", "slices")


class RankWidget(Container):
    """Dock panel: folder + U-Net + strategy → ranking table; "Open next" opens the next study.

    Args:
        viewer: the napari viewer (injected by napari).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        self._folder = FileEdit(label="folder", mode="d")
        self._model = ComboBox(label="model", choices=[DEMO, CHECKPOINT], value=DEMO)
        self._checkpoint = FileEdit(label="checkpoint", mode="r", filter="*.pt")
        self._strategy = ComboBox(
            label="strategy", choices=["entropy", "disagreement"], value="entropy"
        )
        self._k = SpinBox(label="studies", value=10, min=1, max=10_000)
        self._rank_btn = PushButton(text="Rank")
        self._next_btn = PushButton(text="Open next")
        self._cancel_btn = PushButton(text="Cancel")
        self._table = Table(value={c: [] for c in COLUMNS})
        self._status = status_label("")
        super().__init__(
            widgets=[
                self._folder,
                self._model,
                self._checkpoint,
                self._strategy,
                self._k,
                self._rank_btn,
                self._next_btn,
                self._cancel_btn,
                self._table,
                self._status,
            ],
            labels=True,
        )
        self.job = Job(status=self._set_status)
        self.ranking: list[Any] = []  # medseg.active.Ranked, most uncertain first
        self.opened: list[str] = []  # study ids opened with "Open next"
        self._rank_btn.changed.connect(self.run)
        self._next_btn.changed.connect(self.open_next)
        self._cancel_btn.changed.connect(self.job.cancel)

    def _set_status(self, text: str) -> None:
        self._status.value = text

    def _model_source(self) -> str:
        return unet_model_source(str(self._model.value), self._checkpoint.value, DEMO)

    def run(self) -> None:
        """Rank the folder's unlabelled studies."""
        try:
            folder = chosen_path(self._folder.value)
            if folder is None:
                raise InputError("choose a folder of studies (or an MSD / nnU-Net dataset)")
            source = self._model_source()
        except MedsegError as exc:
            show_error(str(exc))
            return
        strategy, k = str(self._strategy.value), int(self._k.value)

        def work(progress: Any) -> Any:
            from medseg.active import rank

            return rank(folder, source, k=k, strategy=strategy, progress=progress)

        def done(ranked: list[Any]) -> None:
            self.ranking = list(ranked)
            self.opened = []
            self._table.value = {
                "rank": list(range(1, len(ranked) + 1)),
                "study": [r.study for r in ranked],
                "score": [f"{r.score:.4f}" for r in ranked],
                "slices": [", ".join(str(z) for z in r.slices) for r in ranked],
            }
            self._set_status(f"ranked {len(ranked)} studies by {strategy}")

        self.job.start(work, f"rank ({strategy})", done)

    def open_next(self) -> Any:
        """Open the most uncertain study not opened yet; returns its image layer (or ``None``)."""
        from medseg._napari._layers import image_layer_data
        from medseg.pipeline import read_volume

        todo = [r for r in self.ranking if r.study not in self.opened]
        if not todo:
            show_info(
                "medseg: nothing left to open; press Rank first"
                if not self.ranking
                else "medseg: every ranked study is open"
            )
            return None
        r = todo[0]
        try:
            vol = read_volume(r.image)
        except MedsegError as exc:
            show_error(str(exc))
            return None
        data, kwargs, _ = image_layer_data(vol, r.study)
        layer = self._viewer.add_image(data, **kwargs)
        self.opened.append(r.study)
        if r.slices:
            goto_slice(self._viewer, layer, r.slices[0])
        z = ", ".join(str(v) for v in r.slices) or "-"
        self._set_status(f"opened {r.study} (score {r.score:.4f}); look at slices {z}")
        return layer
