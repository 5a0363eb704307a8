"""Evaluate dock widget: prediction vs ground-truth Labels layers → per-label metrics table.

Both layers are turned into :class:`~medseg.volume.LabelMap` on their recorded grids and scored by
:func:`medseg.metrics.evaluate` (Dice, IoU, HD95 in mm, ...). The table can be copied to the
clipboard as CSV or exported to a CSV file (atomic write, never over an input).
"""

from __future__ import annotations

import csv
import io
from typing import TYPE_CHECKING, Any

from magicgui.widgets import (
    ComboBox,
    Container,
    FileEdit,
    FloatSpinBox,
    PushButton,
    Table,
)

from medseg._napari._common import (
    Job,
    chosen_path,
    keep_choices_fresh,
    layer_choices,
    show_error,
    show_info,
    status_label,
)
from medseg.errors import InputError, MedsegError

if TYPE_CHECKING:
    import napari

#: Columns shown and exported, in order.
COLUMNS = (
    "label",
    "name",
    "dice",
    "iou",
    "hd95",
    "hd",
    "msd",
    "surface_dice",
    "voxels_pred",
    "voxels_gt",
)


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "inf" if v == float("inf") else f"{v:.4f}"
    return v


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    """CSV text (header + one line per label) of metric rows; floats at full precision."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([r.get(c) for c in COLUMNS])
    return buf.getvalue()


class EvaluateWidget(Container):
    """Dock panel: pick prediction and ground-truth Labels layers, get per-label metrics.

    Args:
        viewer: the napari viewer (injected by napari).
    """

    def __init__(self, viewer: napari.viewer.Viewer) -> None:
        self._viewer = viewer
        self._pred = ComboBox(label="prediction", choices=layer_choices(viewer, "labels"))
        self._gt = ComboBox(label="ground truth", choices=layer_choices(viewer, "labels"))
        self._tol = FloatSpinBox(label="surface tol. (mm)", value=1.0, min=0.0, max=100.0, step=0.5)
        self._run_btn = PushButton(text="Evaluate")
        self._table = Table(value={c: [] for c in COLUMNS})
        self._copy_btn = PushButton(text="Copy as CSV")
        self._csv_path = FileEdit(label="CSV file", mode="w", filter="*.csv")
        self._export_btn = PushButton(text="Export CSV")
        self._status = status_label("")
        super().__init__(
            widgets=[
                self._pred,
                self._gt,
                self._tol,
                self._run_btn,
                self._table,
                self._copy_btn,
                self._csv_path,
                self._export_btn,
                self._status,
            ],
            labels=True,
        )
        self.job = Job(status=self._set_status)
        self.rows: list[dict[str, Any]] = []
        self._run_btn.changed.connect(self.evaluate)
        self._copy_btn.changed.connect(self.copy_csv)
        self._export_btn.changed.connect(self.export_csv)
        keep_choices_fresh(viewer, self)
        labels = [v for _, v in layer_choices(viewer, "labels")()]
        if len(labels) >= 2:  # a sensible default: the newest layer against the first
            self._pred.value, self._gt.value = labels[-1], labels[0]

    def _set_status(self, text: str) -> None:
        self._status.value = text

    def evaluate(self) -> None:
        """Score the prediction layer against the ground-truth layer (in a worker)."""
        from medseg._napari._layers import labelmaps_from_layers

        try:
            pred_layer, gt_layer = self._pred.value, self._gt.value
            if pred_layer is None or gt_layer is None:
                raise InputError("choose a prediction and a ground-truth Labels layer")
            if pred_layer is gt_layer:
                raise InputError("prediction and ground truth are the same layer; pick two")
            pred, gt = labelmaps_from_layers(pred_layer, gt_layer)
        except MedsegError as exc:
            show_error(str(exc))
            return
        tol = float(self._tol.value)

        def work(progress: Any) -> Any:
            from medseg.metrics import evaluate

            progress(0, 1)
            rows = evaluate(pred, gt, tolerance_mm=tol)
            progress(1, 1)
            return rows

        def done(rows: list[dict[str, Any]]) -> None:
            self.rows = rows
            self._table.value = {c: [_fmt(r.get(c)) for r in rows] for c in COLUMNS}
            summary = "; ".join(f"{r['name']}: Dice {r['dice']:.3f}" for r in rows)
            self._set_status(summary or "no labels in either layer")

        self.job.start(work, "evaluate", done)

    def csv_text(self) -> str:
        """The current table as CSV text."""
        return rows_to_csv(self.rows)

    def copy_csv(self) -> None:
        """Put the table on the clipboard as CSV."""
        from qtpy.QtWidgets import QApplication

        if not self.rows:
            show_error("nothing to copy: press Evaluate first")
            return
        QApplication.clipboard().setText(self.csv_text())
        show_info("metrics copied to the clipboard (CSV)")

    def export_csv(self) -> None:
        """Write the table to the chosen CSV file (atomic; never over an input)."""
        from medseg.io.files import write_text

        if not self.rows:
            show_error("nothing to export: press Evaluate first")
            return
        path = chosen_path(self._csv_path.value)
        if path is None:
            show_error("choose a CSV file to export to")
            return
        inputs = []
        for layer in (self._pred.value, self._gt.value):
            md = getattr(layer, "metadata", None) or {}
            inputs += [md[k] for k in ("source", "image_source") if md.get(k)]
        try:
            out = write_text(self.csv_text(), path, inputs=inputs, overwrite=True)
        except MedsegError as exc:
            show_error(str(exc))
            return
        self._set_status(f"saved {out}")
