"""``medseg batch``: segment every study of a folder; parses, calls :func:`medseg.batch`
(module :mod:`medseg.batches`), prints.

``--data DIR`` is an MSD / nnU-Net raw dataset (a ``dataset.json`` inside: training cases with
their labels, then test cases) or a folder of studies: every image file (``.nii.gz``, ``.nii``,
``.nrrd``, ``.mha``, ``.mhd``) and every subfolder (one DICOM series) is a study named after it.
Ground truth naming rule for a folder: the ground truth of study ``NAME`` (``NAME.nii.gz`` or the
DICOM folder ``NAME/``) is ``NAME_gt.<ext>`` in ``DIR``; files named ``*_gt.<ext>`` are never
studies.

``--out OUTDIR`` receives ``studies/NAME.nii.gz`` (label map on the source grid) and
``studies/NAME.json`` (its report), ``metrics.csv`` (one row per study and label: study, label,
name, dice, iou, hd95, status, error), ``summary.json`` (mean, median, std, count per label; the
failures) and ``plots/`` (Dice per label, the worst studies' worst slices).

A rerun skips studies whose outputs are complete and valid (report checked against the schema,
the image digest, the settings and the label map read back) and rebuilds the aggregate files;
a killed run can simply be run again. A failing study is recorded with its error and the batch
goes on; the exit status is 1 when any study failed (2: bad options or data).

``--data URL`` runs a PACS query instead: a QIDO-RS address with filters
(``http://host/dicom-web/studies?Modality=CT&PatientID=X``; ``--patient``, ``--modality`` and
``--study-date`` add the same filters, as in ``medseg search``) or ``dimse://AET@HOST:PORT``: one
study per matching image series, its id (``study`` in ``metrics.csv``) the series URL, its files
named by the SeriesInstanceUID.

``--push`` also writes each DICOM study's label map as a DICOM-SEG (``studies/NAME.dcm``) and
stores it as a new series of its study on the server it was read from (``--to URL`` for local
data, or another server); ``studies/NAME.push.json`` and the ``pushed`` column of ``metrics.csv``
record the SOPInstanceUID stored. A failed push fails that study (the label map is kept) and the
batch goes on; a rerun retries it without segmenting again, and never pushes a stored result twice.

``--prompts FILE.json`` maps study ids to prompts in the ``medseg segment --prompts`` format:
``{"NAME": {"boxes": [{"slice": I, "box": [R0, C0, R1, C1]}], "points": [...]}, ...}``.
"""

from __future__ import annotations

import argparse
import sys

from medseg.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    from medseg.models.registry import known_models

    p = sub.add_parser(
        "batch",
        help="segment every study of a dataset or folder (resumable; metrics, summary, plots)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="DIR|URL",
        help="dataset or folder of studies, or a PACS query (QIDO-RS URL with filters)",
    )
    p.add_argument("--model", required=True, help=f"{' | '.join(known_models())} | CHECKPOINT.pt")
    p.add_argument("--out", required=True, metavar="OUTDIR", help="output folder")
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--prompts-from-gt",
        action="store_true",
        help="SAM-Med models: one box around each study's ground truth on its largest slice",
    )
    g.add_argument("--prompts", metavar="FILE.json", help="SAM-Med models: prompts per study")
    p.add_argument("--label", type=int, help="SAM-Med: ground-truth label boxed and scored")
    p.add_argument("--window", help="CT window preset or LO,HI for a SAM-Med model")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--executor", choices=["local", "dask"], default="local")
    p.add_argument(
        "--scheduler", metavar="ADDRESS", help="join this Dask scheduler (tcp://host:8786)"
    )
    p.add_argument("--dry-run", action="store_true", help="list what would run; write nothing")
    p.add_argument("--overwrite", action="store_true", help="redo studies with valid outputs")
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    q = p.add_argument_group("PACS (--data URL, --push)")
    q.add_argument("--patient", help="query filter: PatientID")
    q.add_argument("--modality", help="query filter: series Modality (CT, MR, ...)")
    q.add_argument("--study-date", help="query filter: YYYYMMDD or YYYYMMDD-YYYYMMDD")
    q.add_argument(
        "--push",
        action="store_true",
        help="store each result as a DICOM-SEG on the server the study came from (or --to)",
    )
    q.add_argument("--to", metavar="URL", help="the server to push to (DICOMweb root or dimse://)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--runtime", choices=["auto", "torch", "openvino"], default="auto")  # issue 14
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--protocol",
        choices=["interactive"],
        help="SAM-Med: the SEGFM3D box + clicks protocol per study and label (metrics.csv: "
        "dsc_0..dsc_N, nsd_0..nsd_N, dsc_auc, nsd_auc, final_dsc, final_nsd, seconds)",
    )
    p.add_argument("--clicks", type=int, default=5, help="--protocol: corrective clicks (5)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``medseg batch``. Returns 0, or 1 when any study failed."""
    from medseg.batches import batch

    if args.scheduler and args.executor != "dask":
        raise InputError("--scheduler needs --executor dask")
    data = _query_data(args)
    kwargs = {"precision": args.precision, "device": args.device}
    if args.runtime != "auto":  # issue 14: the SAM encoder's runtime
        if args.protocol:
            raise InputError("--runtime is not supported with --protocol yet; leave it at auto")
        kwargs["runtime"] = args.runtime
    if args.label is not None:
        kwargs["label"] = args.label
    if args.window:
        kwargs["window"] = args.window
    bar = None
    if not args.quiet and not args.dry_run:
        from tqdm import tqdm

        bar = tqdm(desc="batch", unit="study", dynamic_ncols=True, disable=None)

    def on_study(r) -> None:  # type: ignore[no-untyped-def]
        if bar is not None:
            bar.set_postfix_str(f"{r.study}: {r.status}", refresh=False)
        if r.status == "failed":
            msg = f"{r.study}: failed: {r.error}"
            if bar is not None:
                bar.write(msg, file=sys.stderr)
            else:
                print(msg, file=sys.stderr)

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar.total = total
            bar.n = done
            bar.refresh()

    try:
        res = batch(
            data,
            args.model,
            args.out,
            prompts_from_gt=args.prompts_from_gt,
            prompts=args.prompts,
            workers=args.workers,
            executor=args.executor,
            scheduler=args.scheduler,
            dry_run=args.dry_run,
            overwrite=args.overwrite,
            plots=not args.no_plots,
            push=args.push,
            to=args.to,
            progress=progress,
            on_study=on_study,
            protocol=args.protocol,
            clicks=args.clicks,
            **kwargs,
        )
    finally:
        if bar is not None:
            bar.close()
    if res.dry_run:
        for r in res.studies:
            why = f"  ({r.error})" if r.error and r.status == "run" else ""
            print(f"{r.status:4}  {r.study}  -> {r.labels}{why}")
        c = res.counts()
        print(f"dry run: {c.get('run', 0)} to run, {c.get('skip', 0)} complete; nothing written")
        return 0
    c = res.counts()
    print(
        f"{len(res.studies)} studies: {c.get('ok', 0)} segmented, {c.get('skipped', 0)} kept "
        f"from an earlier run, {c.get('failed', 0)} failed"
    )
    import json

    assert res.summary_json is not None
    summ = json.loads(res.summary_json.read_text())
    for e in summ["labels"]:
        d = e["dice"]
        if d["mean"] is None:
            continue
        print(
            f"  {e['name']:>12}: dice mean {d['mean']:.4f} median {d['median']:.4f} "
            f"(n={d['count']})"
        )
    for f in summ["failed"]:
        print(f"  failed: {f['study']}: {f['error']}")
    if res.push:
        print(f"  pushed: {sum(bool(r.pushed) for r in res.studies)} DICOM-SEG stored")
    print(f"wrote {res.metrics_csv}, {res.summary_json}" + "".join(f", {p}" for p in res.plots))
    return 1 if res.failed else 0


def _query_data(args: argparse.Namespace) -> str:
    """``--data``, with the ``--patient/--modality/--study-date`` filters added to a query URL."""
    from urllib.parse import urlencode

    from medseg.io.remote import is_remote_url

    filters = {
        k: v
        for k, v in (
            ("PatientID", args.patient),
            ("Modality", args.modality),
            ("StudyDate", args.study_date),
        )
        if v
    }
    if not filters:
        return str(args.data)
    if not is_remote_url(args.data):
        raise InputError("--patient, --modality and --study-date filter a PACS query: --data URL")
    sep = "&" if "?" in args.data else "?"
    return f"{args.data}{sep}{urlencode(filters)}"
