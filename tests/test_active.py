"""Active learning: entropy and disagreement scores by hand, and ``medseg rank`` over phantoms
where the study with heavy noise must come first."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import medseg
from medseg.active import disagreement_scores, entropy_scores, normalized_entropy, top_slices
from medseg.errors import InputError, OutputError

SPACING = (9.0, 3.0, 3.0)


def test_entropy_and_disagreement_by_hand() -> None:
    p = np.zeros((2, 2, 1, 2))  # C=2, z=2, y=1, x=2
    p[:, 0, 0, 0] = (0.5, 0.5)  # uniform: 1
    p[:, 0, 0, 1] = (1.0, 0.0)  # certain: 0
    p[:, 1, 0, 0] = (0.9, 0.1)  # -(0.9 ln 0.9 + 0.1 ln 0.1) / ln 2
    p[:, 1, 0, 1] = (0.0, 1.0)
    h01 = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1)) / math.log(2)
    h = normalized_entropy(p)
    assert h[0, 0].tolist() == [1.0, 0.0]
    assert h[1, 0, 0] == pytest.approx(h01) and h[1, 0, 1] == 0.0
    score, per = entropy_scores(p)
    assert score == pytest.approx((1.0 + h01) / 4)
    assert per == pytest.approx([0.5, h01 / 2])
    assert normalized_entropy(np.full((4, 1, 1, 1), 0.25))[0, 0, 0] == pytest.approx(1.0)
    with pytest.raises(InputError, match="C >= 2"):
        normalized_entropy(np.ones((1, 2, 2, 2)))

    a = np.zeros((3, 2, 2), bool)
    b = np.zeros((3, 2, 2), bool)
    a[0] = True  # 4 voxels
    b[0, 0] = True  # 2 voxels, inside a
    b[2, 1, 1] = True  # 1 voxel outside a
    score, per = disagreement_scores(a, b)
    assert score == pytest.approx(1 - 2 * 2 / (4 + 3))
    assert per.tolist() == [2.0, 0.0, 1.0]
    empty = np.zeros((2, 2, 2), bool)
    score, per0 = disagreement_scores(empty, empty)
    assert score == 0.0 and per0.tolist() == [0.0, 0.0]
    assert top_slices(per, 3) == [0, 2]  # slice 1 agrees: not named
    assert top_slices(np.array([1.0, 3.0, 3.0]), 2) == [1, 2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three clean unlabelled phantoms, one with heavy noise (150 HU), one labelled study."""
    from medseg.io.itk import write_image
    from medseg.phantom import make_phantom

    d = tmp_path_factory.mktemp("rank") / "data"
    d.mkdir()
    for i in range(3):
        img, _ = make_phantom(seed=10 + i, shape=(16, 64, 64), spacing=SPACING)
        write_image(img, d / f"u{i}.nii.gz")
    img, _ = make_phantom(seed=20, shape=(16, 64, 64), spacing=SPACING, noise_sigma=150.0)
    write_image(img, d / "noisy.nii.gz")
    img, lab = make_phantom(seed=21, shape=(16, 64, 64), spacing=SPACING)
    write_image(img, d / "lab.nii.gz")
    write_image(lab, d / "lab_gt.nii.gz")
    return d


def test_rank_entropy_puts_the_noisy_study_first(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "rank.csv"
    top = medseg.rank(folder, "unet-demo", k=2, out=out)
    assert top[0].study == "noisy" and len(top) == 2
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["study"] == "noisy" and "lab" not in [r["study"] for r in rows]
    assert sorted(r["study"] for r in rows) == ["noisy", "u0", "u1", "u2"]
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True) and scores[0] > 1.5 * scores[1]
    # the score is the mean normalised entropy of the pipeline's softmax, recomputed here
    seg = medseg.segment(folder / "u0.nii.gz", model="unet-demo", probabilities=True)
    p = seg.probabilities.astype(np.float64)
    h = -(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0)).sum(0) / math.log(p.shape[0])
    (u0,) = [r for r in rows if r["study"] == "u0"]
    assert float(u0["score"]) == pytest.approx(h.mean(), abs=2e-6)
    per = h.reshape(h.shape[0], -1).mean(1)
    assert u0["slices"] == ";".join(str(z) for z in np.argsort(-per, kind="stable")[:3])

    with pytest.raises(OutputError, match="already exists"):
        medseg.rank(folder, "unet-demo", out=out)
    with pytest.raises(InputError, match="unknown strategy"):
        medseg.rank(folder, "unet-demo", strategy="iou")


@pytest.mark.slow
def test_rank_cli(folder: Path, tmp_path: Path) -> None:
    env = dict(os.environ)
    src = str(Path(medseg.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    run = subprocess.run(
        [sys.executable, "-m", "medseg", "rank", "--data", str(folder), "--k", "1", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert run.returncode == 0, run.stderr
    (line,) = run.stdout.splitlines()
    assert line.split()[:3] == ["1", "noisy", "entropy"]
    bad = subprocess.run(
        [sys.executable, "-m", "medseg", "rank", "--data", str(folder), "--model", "litemedsam"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and "SAM-family" in bad.stderr


@pytest.mark.slow
def test_rank_disagreement_is_unet_vs_sam_refinement(folder: Path, tmp_path: Path) -> None:
    import shutil

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(folder / "u1.nii.gz", one / "u1.nii.gz")
    cache = tmp_path / "cache"
    (r,) = medseg.rank(one, "unet-demo", strategy="disagreement", cache_dir=cache)
    seg = medseg.segment(
        one / "u1.nii.gz",
        model="unet-demo",
        refine_with="litemedsam",
        probabilities=True,
        cache_dir=cache,
    )
    lesion = seg.report["unet"]["refine"]["label"]
    unet = seg.probabilities.argmax(0) == lesion
    sam = seg.labels.array == lesion
    assert unet.any() and sam.any()
    want = 1 - 2 * (unet & sam).sum() / (unet.sum() + sam.sum())
    assert r.score == pytest.approx(want) and 0 < r.score < 1
    per = (unet ^ sam).sum(axis=(1, 2))
    assert r.slices == [int(z) for z in np.argsort(-per, kind="stable")[:3] if per[z] > 0]
