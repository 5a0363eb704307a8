"""napari: correct a shown 3D mask with clicks and boxes through :class:`medseg.InteractiveSession`.

In the SAM panel, after *Propagate in 3D* shows a proposal, *Correct in 3D* starts a session from
that 3D mask. From then on every point added to the panel's prompt layers (the positive and the
negative layer, or any points layer's ``point_type`` feature) and every rectangle drawn in its box
layer, on any slice, goes to :meth:`~medseg.InteractiveSession.add`: the clicked slice is
re-segmented and the change carried outward while it changes anything, and the proposal shown is
updated. Key ``u`` (bound on the viewer) undoes the last correction exactly; key ``n`` jumps to
the next slice of the session's review list (also listed in the panel's review box). *Accept*
then paints the corrected proposal as before.

The model runs on the GUI thread here: a correction reuses cached embeddings (one decoder call
per slice it touches).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medseg.errors import InputError, MedsegError

#: Viewer keys: undo the last correction, jump to the next slice to review.
UNDO_KEY = "u"
NEXT_KEY = "n"


class Corrector:
    """Drives an :class:`~medseg.InteractiveSession` from a SAM panel's layers.

    Args:
        widget: the :class:`~medseg._napari._sam_widget.SamWidget` (its image, model, prompt
            layers, proposal and review list are used).
    """

    def __init__(self, widget: Any) -> None:
        self.widget = widget
        self.viewer = widget._viewer
        self.session: Any = None
        self._seen: dict[int, int] = {}  # id(layer) -> items already sent to the session
        self._layers: list[Any] = []
        self._image: Any = None
        self._next = 0

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        """Start a session from the proposal shown (or raise :class:`InputError`)."""
        from medseg.interactive import InteractiveSession

        w = self.widget
        if w.proposal is None or not w.proposal.mask.any():
            raise InputError("nothing to correct: Propagate in 3D first, then Correct in 3D")
        img = w._image_layer()
        model, window, decoder = w._settings()
        if decoder is not None:
            raise InputError("correction runs the base model; untick the fine-tuned decoder")
        pred = w._get_predictor(img, model, window, None)
        s = InteractiveSession(
            pred.volume,
            pred.spec.name,
            int(w._label_value.value),
            name=w._label_name.value.strip() or None,
            window=window,
            predictor=pred,
        )
        res = w.last_result  # the propagation shown: its review scores seed the review list
        s.start_from(w.proposal.mask, res.review_scores() if res is not None else None)
        self.session, self._image = s, img
        self._layers = [
            x for x in (w._points.value, w._neg_points.value, w._shapes.value) if x is not None
        ]
        for layer in self._layers:
            self._seen[id(layer)] = len(layer.data)
            layer.events.data.connect(self._on_data)
        self.viewer.bind_key(UNDO_KEY, lambda _v: self.undo(), overwrite=True)
        self.viewer.bind_key(NEXT_KEY, lambda _v: self.next_review(), overwrite=True)
        self._show("correcting: add points (+/−) or draw a box on any slice; u undoes")

    # ------------------------------------------------------------------ prompts
    def _on_data(self, _event: Any = None) -> None:
        try:
            self.apply()
        except MedsegError as exc:
            from napari.utils.notifications import show_error

            show_error(str(exc))

    def new_prompts(self) -> list[Any]:
        """Points and boxes added to the prompt layers since the last call, as medseg prompts
        (image voxel coordinates ``(z, y, x)``)."""
        import medseg
        from medseg._napari._prompts import _polarity, _to_image_data

        w = self.widget
        out: list[Any] = []
        h, wd = self._image.data.shape[-2:]
        for layer in self._layers:
            n = len(layer.data)
            start = self._seen.get(id(layer), 0)
            self._seen[id(layer)] = n
            if n <= start:
                continue
            if layer is w._shapes.value:
                for verts in list(layer.data)[start:]:
                    zyx = _to_image_data(layer, verts, self._image)
                    if not np.all(np.isfinite(zyx[:, 0])) or np.ptp(zyx[:, 0]) >= 0.5:
                        continue  # a shape not on one slice
                    r0, c0 = np.clip(np.min(zyx[:, 1:], axis=0), 0, (h - 1, wd - 1))
                    r1, c1 = np.clip(np.max(zyx[:, 1:], axis=0), 0, (h - 1, wd - 1))
                    if r1 > r0 and c1 > c0:
                        z = round(float(zyx[0, 0]))
                        out.append(medseg.Box(z, float(r0), float(c0), float(r1), float(c1)))
                continue
            default = 0 if layer is w._neg_points.value else 1
            zyx = _to_image_data(layer, np.asarray(layer.data)[start:], self._image)
            pol = _polarity(layer, n, default)[start:]
            for (z, y, x), lab in zip(zyx, pol, strict=True):
                if np.isfinite(z):
                    out.append(medseg.Point(round(float(z)), y, x, positive=bool(lab)))
        return out

    def apply(self) -> int:
        """Send the new prompts to the session and show the result; returns how many."""
        if self.session is None:
            return 0
        prompts = self.new_prompts()
        for p in prompts:
            self.session.add(p)
        if prompts:
            st = self.session.steps[-1]
            self._show(f"corrected slice {st.slice}: {len(st.changed)} slice(s) changed")
        return len(prompts)

    # ------------------------------------------------------------------ keys
    def undo(self) -> None:
        """Undo the last correction (the start from the proposal stays)."""
        if self.session is None or len(self.session.steps) <= 1:
            self.widget._set_status("nothing to undo in the correction")
            return
        self.session.undo()
        self._show("correction undone")

    def next_review(self) -> int | None:
        """Go to the next slice of the review list (cycling); returns it."""
        if self.session is None:
            return None
        review = self.session.review
        if not review:
            return None
        from medseg._napari._common import goto_slice

        z = review[self._next % len(review)]
        self._next += 1
        goto_slice(self.viewer, self._image, z)
        return z

    def _show(self, status: str) -> None:
        from medseg._napari._sam_widget import Proposal

        w = self.widget
        mask = self.session.mask
        slices = [int(i) for i in np.flatnonzero(mask.any(axis=(1, 2)))]
        review = self.session.review
        w.proposal = Proposal(mask=mask, slices=slices, review=review)
        w._show_proposal(self._image)
        w._review.choices = [(f"slice {i}: check", i) for i in review]
        w._set_status(status)


def attach(widget: Any) -> Corrector:
    """Add the *Correct in 3D* button to a SAM panel; returns its :class:`Corrector`."""
    from magicgui.widgets import PushButton
    from napari.utils.notifications import show_error

    corrector = Corrector(widget)
    button = PushButton(text="Correct in 3D")

    def start() -> None:
        try:
            corrector.start()
        except MedsegError as exc:
            show_error(str(exc))

    button.changed.connect(start)
    widget.insert(len(widget) - 1, button)  # above the status line
    widget.corrector = corrector
    return corrector
