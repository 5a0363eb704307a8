"""PACS batch against a real Orthanc: what ``--push`` adds per study, and what reloading the
U-Net checkpoint per study costs.

Starts Debian's Orthanc (with its DICOMweb plugin) on free loopback ports with a temporary
storage folder, stores N seeded phantom CT series, then, interleaved over ``--reps`` rounds:

* ``batch``: ``medseg.batch(QIDO query, "unet-demo", fresh OUT)`` without push,
* ``batch_push``: the same with ``push=True`` (DICOM-SEG written and stored by STOW-RS),

and reports the median wall time per study of each and their difference (the push cost). Then,
interleaved, ``batch`` (the worker keeps its U-Net: :func:`medseg.predict.unet.keep_loaded`) vs
``batch_reload`` (keeping disabled: the checkpoint is read again for every study, as before), and
``UNetSegmenter.load`` alone next to one study's segmentation. Prints JSON (``--out`` writes
it); records ``os.getloadavg()``.

    .venv/bin/python benchmarks/bench_pacs_batch.py --studies 4 --reps 3 \
        --out benchmarks/results/pacs_batch.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_orthanc(folder: Path) -> tuple[subprocess.Popen, str]:
    http, dicom = _port(), _port()
    cfg = {
        "Name": "bench",
        "HttpPort": http,
        "DicomPort": dicom,
        "StorageDirectory": str(folder / "db"),
        "IndexDirectory": str(folder / "db"),
        "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    exe = shutil.which("Orthanc")
    if exe is None:
        raise SystemExit("Orthanc not found: apt-get install orthanc orthanc-dicomweb")
    log = open(folder / "orthanc.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([exe, str(folder / "config.json")], stdout=log, stderr=log)
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{http}/system", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    return proc, f"http://127.0.0.1:{http}/dicom-web"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shape", default="16,64,64", help="phantom shape z,y,x")
    ap.add_argument("--out", help="write the JSON here")
    args = ap.parse_args()

    import medseg
    from medseg.io import remote
    from medseg.io.dicom_write import write_dicom_series
    from medseg.phantom import make_phantom
    from medseg.predict import unet as unet_mod
    from medseg.predict.unet import UNetSegmenter

    shape = tuple(int(v) for v in args.shape.split(","))
    tmp = Path(tempfile.mkdtemp(prefix="bench_pacs_"))
    (tmp / "orthanc").mkdir()
    proc, root = start_orthanc(tmp / "orthanc")
    try:
        for i in range(args.studies):
            vol, _ = make_phantom(i, shape, (5.0, 3.0, 3.0))
            folder = tmp / "local" / f"s{i}"
            write_dicom_series(vol, folder, uid_seed=f"bench-{i}", patient_id="BENCH")
            remote.push_files(sorted(folder.iterdir()), root)
        query = f"{root}/studies?PatientID=BENCH&Modality=CT"
        # warm: imports, the model, the DICOMweb cache (what every later round finds)
        medseg.batch(query, "unet-demo", tmp / "warm", plots=False)

        per: dict[str, list[float]] = {"batch": [], "batch_push": []}
        for rep in range(args.reps):
            for name, push in (("batch", False), ("batch_push", True)):
                t = time.perf_counter()
                res = medseg.batch(query, "unet-demo", tmp / f"{name}{rep}", push=push, plots=False)
                wall = time.perf_counter() - t
                assert res.ok and len(res.studies) == args.studies, res.counts()
                assert all(bool(r.pushed) == push for r in res.studies)
                per[name].append(wall / args.studies)

        from medseg import batches

        real_keep = unet_mod.keep_loaded
        kept: dict[str, list[float]] = {"batch_kept": [], "batch_reload": []}
        for rep in range(args.reps):
            for name in kept:
                batches._WORKER_MODELS.clear()
                unet_mod._KEPT.clear()
                unet_mod.keep_loaded = real_keep if name == "batch_kept" else (lambda s, *a: s)
                t = time.perf_counter()
                res = medseg.batch(query, "unet-demo", tmp / f"{name}{rep}", plots=False)
                kept[name].append((time.perf_counter() - t) / args.studies)
                assert res.ok
        unet_mod.keep_loaded = real_keep

        loads, segs = [], []
        image = medseg.read_volume(tmp / "local" / "s0")
        for _ in range(max(5, args.reps)):
            t = time.perf_counter()
            UNetSegmenter.load("unet-demo")
            loads.append(time.perf_counter() - t)
            t = time.perf_counter()
            medseg.segment(image, model="unet-demo")
            segs.append(time.perf_counter() - t)
        med = {k: round(statistics.median(v), 4) for k, v in per.items()}
        out = {
            "studies": args.studies,
            "shape": list(shape),
            "reps": args.reps,
            "loadavg": [round(x, 2) for x in os.getloadavg()],
            "cpu_count": os.cpu_count(),
            "seconds_per_study_median": med,
            "seconds_per_study_all": {k: [round(x, 4) for x in v] for k, v in per.items()},
            "push_cost_per_study_s": round(med["batch_push"] - med["batch"], 4),
            "kept_vs_reload_seconds_per_study_median": {
                k: round(statistics.median(v), 4) for k, v in kept.items()
            },
            "kept_vs_reload_all": {k: [round(x, 4) for x in v] for k, v in kept.items()},
            "unet_load_s_median": round(statistics.median(loads), 4),
            "segment_s_median": round(statistics.median(segs), 4),
            "unet_load_share_of_segment": round(
                statistics.median(loads) / statistics.median(segs), 3
            ),
        }
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
