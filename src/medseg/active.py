"""Active learning: rank unlabelled studies (and their slices) by how unsure the model is.

Every study goes through :func:`medseg.segment` (no other flow). Strategies:

* ``"entropy"`` (U-Net): the mean voxel entropy of the softmax, ``-sum_c p_c log p_c``, divided
  by ``log C`` so that it lies in ``[0, 1]`` (``C`` classes, background included); a slice's
  score is the mean over its voxels.
* ``"disagreement"`` (U-Net refined with a SAM-family model, ``refine_with``): ``1 - Dice``
  between the U-Net's lesion mask (the argmax of its softmax) and the SAM-refined lesion mask;
  a slice's score is its number of disagreeing voxels. Two studies where neither model finds a
  lesion score 0.

The ``k`` highest-scoring studies are the ones to label next, each with the axial slices
(``z`` indices) to look at first. Importing this module is cheap (numpy only).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import InputError, MedsegError

PathLike = str | os.PathLike[str]
#: Strategies :func:`rank` knows.
STRATEGIES = ("entropy", "disagreement")
#: Columns of the rank CSV.
RANK_COLUMNS = ("rank", "study", "score", "strategy", "slices", "image", "status", "error")


@dataclass
class Ranked:
    """One study's uncertainty.

    Attributes:
        study: study id. image: its image.
        score: the study's score (higher = more uncertain); ``None`` when it failed.
        slices: axial indices ``z`` to look at first (highest slice scores first).
        slice_scores: the score of every axial slice ``(z,)``.
        error: the one-line error of a failed study.
    """

    study: str
    image: Path
    score: float | None
    slices: list[int] = field(default_factory=list)
    slice_scores: np.ndarray | None = field(default=None, repr=False)
    error: str = ""


def normalized_entropy(probs: np.ndarray) -> np.ndarray:
    """Voxel entropy of softmax probabilities, divided by ``log C``.

    Args:
        probs: ``(C, z, y, x)`` probabilities summing to 1 over ``C`` (``C >= 2``).

    Returns:
        ``(z, y, x)`` float64 in ``[0, 1]``: 0 where one class has probability 1, 1 where all
        ``C`` classes are equally likely.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim < 2 or p.shape[0] < 2:
        raise InputError(f"entropy needs probabilities (C, ...) with C >= 2, got {p.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=0)
    return np.clip(h / math.log(p.shape[0]), 0.0, 1.0)


def entropy_scores(probs: np.ndarray) -> tuple[float, np.ndarray]:
    """``(study score, per-slice scores (z,))`` from ``(C, z, y, x)`` probabilities: the mean
    normalized voxel entropy over the volume and over each axial slice."""
    h = normalized_entropy(probs)
    return float(h.mean()), h.reshape(h.shape[0], -1).mean(axis=1)


def disagreement_scores(a: np.ndarray, b: np.ndarray) -> tuple[float, np.ndarray]:
    """``(1 - Dice(a, b), disagreeing voxels per axial slice (z,))`` for two ``(z, y, x)`` masks;
    ``(0.0, zeros)`` when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    s = int(a.sum()) + int(b.sum())
    score = 0.0 if s == 0 else 1.0 - 2.0 * float((a & b).sum()) / s
    per = (a ^ b).reshape(a.shape[0], -1).sum(axis=1).astype(np.float64)
    return score, per


def top_slices(slice_scores: np.ndarray, n: int) -> list[int]:
    """The ``n`` slice indices with the highest scores (ties: lower index first), skipping slices
    that score 0."""
    order = sorted(range(len(slice_scores)), key=lambda z: (-float(slice_scores[z]), z))
    return [int(z) for z in order[:n] if slice_scores[z] > 0]


def rank(
    data: PathLike,
    model: PathLike = "unet-demo",
    *,
    k: int = 10,
    strategy: str = "entropy",
    out: PathLike | None = None,
    slices: int = 3,
    include_labelled: bool = False,
    refine_with: str = "litemedsam",
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    **segment_kwargs: Any,
) -> list[Ranked]:
    """Score the unlabelled studies of ``data`` and return the ``k`` to label next.

    Args:
        data: an MSD / nnU-Net dataset or a folder of studies (:func:`medseg.batches.find_studies`;
            a study is labelled when it has ground truth).
        model: a U-Net (``unet-demo`` or a checkpoint path).
        k: how many studies to return (all when ``k <= 0``).
        strategy: ``"entropy"`` or ``"disagreement"`` (see the module docstring).
        out: write the full ranking as CSV (``rank, study, score, strategy, slices, image,
            status, error``; slices ``;``-separated), atomically.
        slices: how many slices per study to name.
        include_labelled: also score studies that have ground truth.
        refine_with: the SAM-family model of ``"disagreement"``.
        overwrite: replace an existing ``out``.
        progress: ``progress(done, total)`` after each study.
        **segment_kwargs: passed on to :func:`medseg.segment` (``precision``, ``device``, ...).

    Returns:
        The top ``k`` studies, most uncertain first (failed studies are only in the CSV).

    Raises:
        InputError: unknown strategy, a SAM model, no studies to score.
        OutputError: ``out`` exists (without ``overwrite``) or is an input.
    """
    import medseg
    from medseg.batches import find_studies
    from medseg.models.registry import resolve_model

    if strategy not in STRATEGIES:
        raise InputError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if resolve_model(model).engine != "unet":
        raise InputError(
            f"{model} is a SAM-family model; rank scores a U-Net (refined with "
            f"{refine_with} for 'disagreement')"
        )
    for bad in ("probabilities", "refine_with", "image", "prompts", "gt", "progress"):
        if bad in segment_kwargs:
            raise InputError(f"rank sets {bad!r} itself; do not pass it")
    studies = [s for s in find_studies(data) if include_labelled or s.gt is None]
    if not studies:
        raise InputError(
            f"{data}: every study has ground truth; nothing unlabelled to rank "
            "(pass include_labelled=True / --include-labelled to score them anyway)"
        )
    if out is not None:
        from medseg.io.files import check_output_path

        inputs = [p for s in studies for p in (s.image, s.gt) if p is not None]
        check_output_path(out, inputs, overwrite=overwrite)

    results: list[Ranked] = []
    for i, s in enumerate(studies):
        try:
            kw = dict(segment_kwargs)
            if strategy == "disagreement":
                kw["refine_with"] = refine_with
            seg = medseg.segment(s.image, model=model, probabilities=True, **kw)
            assert seg.probabilities is not None
            if strategy == "entropy":
                score, per = entropy_scores(seg.probabilities)
            else:
                lesion = int((seg.report["unet"]["refine"] or {}).get("label", 0))
                unet = np.argmax(seg.probabilities, axis=0) == lesion
                score, per = disagreement_scores(unet, seg.labels.array == lesion)
            results.append(Ranked(s.id, s.image, score, top_slices(per, slices), per))
        except MedsegError as exc:
            results.append(Ranked(s.id, s.image, None, error=" ".join(str(exc).split())))
        if progress is not None:
            progress(i + 1, len(studies))
    ok = sorted((r for r in results if r.score is not None), key=lambda r: (-r.score, r.study))
    failed = [r for r in results if r.score is None]
    if out is not None:
        write_rank_csv([*ok, *failed], strategy, out, overwrite=overwrite)
    return ok[:k] if k > 0 else ok


def write_rank_csv(
    ranked: Sequence[Ranked], strategy: str, out: PathLike, *, overwrite: bool = False
) -> Path:
    """Write a ranking as CSV atomically (columns :data:`RANK_COLUMNS`)."""
    import csv
    import io

    from medseg.io.files import atomic_path, check_output_path

    o = check_output_path(out, overwrite=overwrite)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(RANK_COLUMNS)
    n = 0
    for r in ranked:
        ok = r.score is not None
        n += ok
        w.writerow(
            [
                n if ok else "",
                r.study,
                "" if not ok else f"{r.score:.6f}",
                strategy,
                ";".join(str(z) for z in r.slices),
                str(r.image),
                "ok" if ok else "failed",
                r.error,
            ]
        )
    with atomic_path(o) as tmp:
        tmp.write_text(buf.getvalue(), encoding="utf-8")
    return o
