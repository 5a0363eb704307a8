"""Make ``docs/screenshot.png``: napari with brain1, the Interactive SAM panel and a propagated
tumour segmentation in 3D, plus the Evaluate panel with its Dice against the label.

It does what a user does in the README's napari steps: open ``brain1_image.nrrd`` and its label
through the medseg reader, draw a box on the slice where the tumour is largest (here the box is the
label's bounding box on that slice, padded by 2 pixels), Propagate in 3D with LiteMedSAM; where the
walk stopped before the tumour's end, draw a second box on the largest missed slice and propagate
again (both boxes are key slices); Accept, Evaluate. Needs an X server: when ``DISPLAY`` is
unset it starts ``Xvfb`` itself.

Usage::

    .venv/bin/python docs/make_screenshot.py [--out docs/screenshot.png] [--data sample_data/brain1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def _wait(app, job, timeout_s: float = 900.0) -> None:
    t0 = time.time()
    while job.busy:
        app.processEvents()
        time.sleep(0.02)
        if time.time() - t0 > timeout_s:
            raise TimeoutError("the job did not finish")
    if job.last_error:
        raise RuntimeError(job.last_error)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.count_nonzero(a & b) / max(np.count_nonzero(a) + np.count_nonzero(b), 1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "screenshot.png"))
    ap.add_argument("--data", default=str(HERE.parent / "sample_data" / "brain1"))
    ap.add_argument("--size", default="1280x820", help="window size WxH")
    args = ap.parse_args()

    from medseg._napari._xvfb import ensure_display

    ensure_display()
    import warnings

    warnings.filterwarnings("ignore", message="System theme detection")
    import napari
    from napari.utils.colormaps import DirectLabelColormap
    from qtpy.QtWidgets import QApplication

    from medseg._napari._common import goto_slice
    from medseg._napari._evaluate_widget import EvaluateWidget
    from medseg._napari._sam_widget import SamWidget

    data = Path(args.data)
    viewer = napari.Viewer(show=True, title="medseg — brain1")
    w, h = (int(v) for v in args.size.split("x"))
    viewer.window._qt_window.resize(w, h)
    [img] = viewer.open(str(data / "brain1_image.nrrd"), plugin="medseg")
    [gt] = viewer.open(str(data / "brain1_label.nrrd"), plugin="medseg")
    gt.visible = False
    app = QApplication.instance()

    lab = np.asarray(gt.data) > 0
    areas = lab.reshape(lab.shape[0], -1).sum(1)

    def rectangle(z: int) -> np.ndarray:
        rr, cc = np.nonzero(lab[z])
        r0, r1, c0, c1 = rr.min() - 2, rr.max() + 2, cc.min() - 2, cc.max() + 2
        return np.array([[z, r0, c0], [z, r0, c1], [z, r1, c1], [z, r1, c0]], dtype=float)

    z = int(np.argmax(areas))
    box = viewer.add_shapes(
        [rectangle(z)],
        shape_type="rectangle",
        ndim=3,
        scale=img.scale,
        translate=img.translate,
        name="box",
        edge_color="yellow",
        face_color="transparent",
        edge_width=2,
    )

    sam = SamWidget(viewer)
    viewer.window.add_dock_widget(sam, name="Interactive SAM", area="right")
    sam.reset_choices()
    sam._image.value, sam._shapes.value = img, box
    goto_slice(viewer, img, z)
    t0 = time.time()
    sam.propagate()
    _wait(app, sam.job)
    seconds = [round(time.time() - t0, 1)]
    one_box = _dice(sam.proposal.mask, lab)
    # where the walk stopped early, the user draws a second box on the part it missed
    missed = [i for i in np.flatnonzero(areas) if not sam.proposal.mask[i].any()]
    z2 = None
    if missed:
        z2 = int(max(missed, key=lambda i: areas[i]))
        box.add_rectangles(rectangle(z2))
        t0 = time.time()
        sam.propagate()
        _wait(app, sam.job)
        seconds.append(round(time.time() - t0, 1))
    slices = list(sam.proposal.slices)
    sam.accept()
    seg = sam._target.value
    seg.colormap = DirectLabelColormap(
        color_dict={None: "transparent", 0: "transparent", 1: "orangered"}
    )

    ev = EvaluateWidget(viewer)
    viewer.window.add_dock_widget(ev, name="Evaluate", area="right", tabify=True)
    ev.reset_choices()
    ev._pred.value, ev._gt.value = seg, gt
    ev.evaluate()
    _wait(app, ev.job)

    viewer.layers.selection.active = seg
    box.visible = False
    img.rendering = "attenuated_mip"
    img.attenuation = 0.3
    viewer.dims.ndisplay = 3
    viewer.reset_view()
    camera = getattr(getattr(viewer, "scene", None), "camera", None) or viewer.camera
    camera.angles = (-20.0, 30.0, 150.0)
    camera.zoom *= 1.2
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for note in viewer.window._qt_window.findChildren(NapariQtNotification):
        note.close()  # start-up notices (e.g. theme detection) would cover the canvas
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    shot = viewer.screenshot(path=args.out, canvas_only=False, flash=False)
    row = ev.rows[0]
    print(
        json.dumps(
            {
                "out": args.out,
                "shape": list(shot.shape),
                "key_slices": [z, z2],
                "dice_one_box": round(one_box, 4),
                "slices": f"{slices[0]}-{slices[-1]}" if slices else None,
                "propagate_seconds": seconds,
                "dice": round(row["dice"], 4),
                "iou": round(row["iou"], 4),
                "hd95_mm": round(row["hd95"], 2),
            }
        )
    )
    viewer.close()


if __name__ == "__main__":
    main()
