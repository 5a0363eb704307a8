"""PACS over DICOMweb against a real Orthanc (started per module on free loopback ports).

Orthanc and its DICOMweb plugin come from Debian (``apt-get install orthanc orthanc-dicomweb``);
without them these tests skip with one line (a failure under ``MEDSEG_REQUIRE_SYSTEM_TOOLS=1``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest

import medseg
from conftest import require_program
from medseg.errors import InputError, MedsegError
from medseg.io import remote

pytest.importorskip("dicomweb_client")

ORTHANC_HINT = "apt-get install orthanc orthanc-dicomweb"
PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
USER, PASSWORD = "alice", "s3cret-pw"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Orthanc:
    """A running Orthanc: ``root`` is its DICOMweb root URL."""

    def __init__(self, folder: Path, auth: bool = False, port: int | None = None) -> None:
        exe = require_program("Orthanc", ORTHANC_HINT)
        if not PLUGIN.is_file():
            require_program("orthanc-dicomweb-plugin", f"{PLUGIN} missing: {ORTHANC_HINT}")
        self.folder = folder
        self.http = port or _free_port()
        self.dicom = _free_port()
        config = {
            "Name": "medseg-test",
            "HttpPort": self.http,
            "DicomPort": self.dicom,
            "DicomAet": "ORTHANC",
            "DicomAlwaysAllowFind": True,  # DIMSE tests: C-FIND/C-GET from our unknown AE title
            "DicomAlwaysAllowGet": True,
            "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"),
            "Plugins": [str(PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": auth,
            "RegisteredUsers": {USER: PASSWORD} if auth else {},
        }
        (folder / "config.json").write_text(json.dumps(config))
        self.log = open(folder / "orthanc.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [exe, str(folder / "config.json")], stdout=self.log, stderr=subprocess.STDOUT
        )
        self.root = f"http://127.0.0.1:{self.http}/dicom-web"
        self.dimse = f"dimse://ORTHANC@127.0.0.1:{self.dicom}"
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.http}/system", timeout=1)
                break
            except urllib.error.HTTPError:  # 401: it answers
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = (folder / "orthanc.log").read_text(errors="replace")[-2000:]
                    pytest.fail(f"Orthanc did not start:\n{log}")
                time.sleep(0.1)

    def stop(self) -> None:
        """Kill it (a crash, as far as clients know; its storage is a temporary folder)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    server = Orthanc(tmp_path_factory.mktemp("orthanc"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def ct5n(pydicom_test_files: Path, orthanc: Orthanc) -> tuple[Path, str]:
    """pydicom's real 5-slice CT series, stored in the Orthanc; returns (folder, series URL)."""
    folder = pydicom_test_files / "dicomdirtests" / "98892001" / "CT5N"
    remote.push_files(sorted(folder.iterdir()), orthanc.root)
    ds = pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True)
    return folder, f"{orthanc.root}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medseg", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
    )


def test_parse_series_url() -> None:
    ref = remote.parse_series_url(
        "https://pacs.example.org/orthanc/dicom-web/studies/1.2.3/series/4.5/"
    )
    assert (ref.root, ref.study, ref.series) == (
        "https://pacs.example.org/orthanc/dicom-web",
        "1.2.3",
        "4.5",
    )
    assert remote.server_root(ref.url) == ref.root
    assert remote.server_root("http://h/dicom-web/studies/1.2") == "http://h/dicom-web"
    with pytest.raises(InputError, match="series URL"):
        remote.parse_series_url("http://h/dicom-web/studies/1.2.3")
    with pytest.raises(InputError, match="must not carry a user name"):
        remote.parse_series_url("http://bob:pw@h/dicom-web/studies/1/series/2")


def test_search_finds_the_series(ct5n: tuple[Path, str], orthanc: Orthanc) -> None:
    _, url = ct5n
    rows = remote.search(orthanc.root, patient="98890234", modality="CT")
    assert [r["url"] for r in rows] == [url]
    assert rows[0]["instances"] == 5 and rows[0]["study_date"] == "20010101"
    assert remote.search(orthanc.root, patient="nobody") == []
    assert remote.search(orthanc.root, modality="MR") == []
    assert [r["url"] for r in remote.search(orthanc.root, study_date="20010101-20010131")] == [url]
    assert remote.search(orthanc.root, study_date="20020101-") == []
    res = _cli("search", orthanc.root, "--modality", "CT", "--json")
    assert res.returncode == 0, res.stderr
    assert [r["series_uid"] for r in json.loads(res.stdout)] == [url.rsplit("/", 1)[1]]


def test_pull_equals_local_series(ct5n: tuple[Path, str], tmp_path: Path) -> None:
    folder, url = ct5n
    res = _cli("pull", url, str(tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "out").iterdir())) == 5
    local = medseg.read_volume(folder)
    for vol in (medseg.read_volume(tmp_path / "out"), medseg.read_volume(url)):
        assert vol.array.shape == local.array.shape == (5, 16, 16)
        np.testing.assert_array_equal(vol.array, local.array)
        np.testing.assert_allclose(vol.spacing, local.spacing)
        np.testing.assert_allclose(vol.origin, local.origin)
    assert medseg.read_volume(url).meta["source"] == url
    info = _cli("info", url, "--json")  # every command takes a series URL
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["shape"] == list(local.shape)


def test_fetch_resumes_only_missing_instances(ct5n: tuple[Path, str], monkeypatch) -> None:
    _, url = ct5n
    folder = remote.fetch_series(url)
    files = sorted(folder.iterdir())
    before = {f.name: f.stat().st_mtime_ns for f in files}
    files[2].unlink()  # an interrupted download: one instance missing
    asked: list[str] = []
    real = remote.dicomweb_client

    def counting(u: str):  # the real client, recording which instances it retrieves
        client = real(u)
        orig = client.retrieve_instance
        client.retrieve_instance = lambda st, se, sop: asked.append(sop) or orig(st, se, sop)
        return client

    monkeypatch.setattr(remote, "dicomweb_client", counting)
    again = remote.fetch_series(url)
    assert again == folder
    assert asked == [files[2].name[: -len(".dcm")]]
    after = {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}
    assert after.keys() == before.keys()
    assert all(after[k] == before[k] for k in before if k != files[2].name)


def test_segment_push_stores_seg_equal_to_local_run(orthanc: Orthanc, tmp_path: Path) -> None:
    from medseg.io.dicom_write import write_dicom_series
    from medseg.phantom import make_phantom

    vol, _ = make_phantom(5, (16, 64, 64), (5.0, 3.0, 3.0))
    local = tmp_path / "phantom"
    write_dicom_series(vol, local, uid_seed="pacs-test", patient_id="PACSPHANTOM")
    remote.push_files(sorted(local.iterdir()), orthanc.root)
    (row,) = remote.search(orthanc.root, patient="PACSPHANTOM")
    url = row["url"]
    res = _cli(
        "segment",
        url,
        "--model",
        "unet-demo",
        "--out",
        "seg.dcm",
        "--push",
        "--quiet",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "seg.json").read_text())
    assert report["image"]["path"] == url
    # the same run on the local copy (in process: the CLI path is exercised above)
    expected = medseg.segment(local, model="unet-demo").labels
    assert expected.array.max() > 0  # the comparison below is about real segments

    rows = remote.search(orthanc.root, patient="PACSPHANTOM")
    segs = [r for r in rows if r["modality"] == "SEG"]
    assert len(segs) == 1 and segs[0]["study_uid"] == row["study_uid"]
    assert segs[0]["series_uid"] != row["series_uid"]
    pulled = tmp_path / "pulled_seg"
    remote.pull_series(segs[0]["url"], pulled)
    (seg_file,) = list(pulled.iterdir())
    back = medseg.read_labels(seg_file, reference=medseg.read_volume(local))
    np.testing.assert_array_equal(back.array, expected.array)


def test_push_needs_dcm_and_a_server(tmp_path: Path) -> None:
    res = _cli("segment", str(tmp_path), "--model", "unet-demo", "--out", "x.nii.gz", "--push")
    assert res.returncode == 2
    assert "give --out NAME.dcm" in res.stderr and "Traceback" not in res.stderr
    res = _cli("segment", str(tmp_path), "--model", "unet-demo", "--out", "x.dcm", "--push")
    assert res.returncode == 2 and "give --to URL" in res.stderr
    assert "Traceback" not in res.stderr
    res = _cli("segment", str(tmp_path), "--model", "unet-demo", "--to", "http://h/dicom-web")
    assert res.returncode == 2 and "add --push" in res.stderr
    assert not list(tmp_path.iterdir())


def test_segment_local_series_push_to(orthanc: Orthanc, tmp_path: Path) -> None:
    """A local DICOM series with ``--push --to ROOT``: the SEG lands in that series' study."""
    from medseg.io.dicom_write import write_dicom_series
    from medseg.phantom import make_phantom

    vol, _ = make_phantom(6, (12, 48, 48), (5.0, 3.0, 3.0))
    local = tmp_path / "phantom"
    write_dicom_series(vol, local, uid_seed="pacs-to", patient_id="PACSTO")
    remote.push_files(sorted(local.iterdir()), orthanc.root)
    res = _cli(
        "segment", str(local), "--model", "unet-demo", "--out", "seg.dcm", "--push",
        "--to", orthanc.root, "--quiet", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    rows = remote.search(orthanc.root, patient="PACSTO")
    (image,) = [r for r in rows if r["modality"] != "SEG"]
    (seg,) = [r for r in rows if r["modality"] == "SEG"]
    assert seg["study_uid"] == image["study_uid"] and seg["series_uid"] != image["series_uid"]
    pulled = tmp_path / "pulled"
    remote.pull_series(seg["url"], pulled)
    (seg_file,) = list(pulled.iterdir())
    back = medseg.read_labels(seg_file, reference=medseg.read_volume(local))
    expected = medseg.read_labels(tmp_path / "seg.dcm", reference=medseg.read_volume(local))
    assert expected.array.max() > 0
    np.testing.assert_array_equal(back.array, expected.array)


def test_stopped_server_fails_in_one_line(
    tmp_path_factory: pytest.TempPathFactory, pydicom_test_files: Path, tmp_path: Path
) -> None:
    server = Orthanc(tmp_path_factory.mktemp("orthanc_stop"))
    folder = pydicom_test_files / "dicomdirtests" / "98892001" / "CT5N"
    remote.push_files(sorted(folder.iterdir()), server.root)
    (row,) = remote.search(server.root)
    server.stop()
    out = tmp_path / "OUT"
    res = _cli("pull", row["url"], str(out))
    assert res.returncode == 2
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "cannot reach the DICOMweb server" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_authentication(
    tmp_path_factory: pytest.TempPathFactory, pydicom_test_files: Path, monkeypatch, tmp_path
) -> None:
    server = Orthanc(tmp_path_factory.mktemp("orthanc_auth"), auth=True)
    try:
        files = sorted((pydicom_test_files / "dicomdirtests" / "98892001" / "CT5N").iterdir())
        for var in ("MEDSEG_DICOMWEB_USER", "MEDSEG_DICOMWEB_PASSWORD", "MEDSEG_DICOMWEB_TOKEN"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))  # requests must not find one
        with pytest.raises(MedsegError, match="401 unauthorized") as err:
            remote.push_files(files, server.root)
        assert PASSWORD not in str(err.value)
        monkeypatch.setenv("MEDSEG_DICOMWEB_USER", USER)
        monkeypatch.setenv("MEDSEG_DICOMWEB_PASSWORD", "wrong")
        with pytest.raises(MedsegError, match="401"):
            remote.search(server.root)
        monkeypatch.setenv("MEDSEG_DICOMWEB_PASSWORD", PASSWORD)
        assert len(remote.push_files(files, server.root)) == 5
        (row,) = remote.search(server.root)
        res = _cli("pull", row["url"], str(tmp_path / "out"))
        assert res.returncode == 0, res.stderr
        assert PASSWORD not in res.stdout + res.stderr
        # a netrc file instead of the environment
        monkeypatch.delenv("MEDSEG_DICOMWEB_USER")
        monkeypatch.delenv("MEDSEG_DICOMWEB_PASSWORD")
        netrc = tmp_path / "netrc"
        netrc.write_text(f"machine 127.0.0.1 login {USER} password {PASSWORD}\n")
        netrc.chmod(0o600)
        monkeypatch.setenv("MEDSEG_DICOMWEB_NETRC", str(netrc))
        assert [r["url"] for r in remote.search(server.root)] == [row["url"]]
    finally:
        server.stop()


def _orthanc_delete_instance(server: Orthanc, sop_uid: str) -> None:
    """Delete one instance through Orthanc's own REST API (a real change on the server)."""
    base = f"http://127.0.0.1:{server.http}"
    req = urllib.request.Request(f"{base}/tools/lookup", data=sop_uid.encode(), method="POST")
    (hit,) = json.loads(urllib.request.urlopen(req, timeout=5).read())
    req = urllib.request.Request(f"{base}/instances/{hit['ID']}", method="DELETE")
    urllib.request.urlopen(req, timeout=5).read()


def test_series_changing_mid_download_leaves_nothing(
    ct5n: tuple[Path, str], orthanc: Orthanc, tmp_path: Path
) -> None:
    folder, url = ct5n
    shutil.rmtree(remote.cache_folder(url), ignore_errors=True)
    last = max(str(pydicom.dcmread(f).SOPInstanceUID) for f in folder.iterdir())

    def delete_after_first(done: int, total: int) -> None:
        if done == 1:
            _orthanc_delete_instance(orthanc, last)

    try:
        with pytest.raises(MedsegError, match="changed while it was fetched"):
            remote.pull_series(url, tmp_path / "out", progress=delete_after_first)
        assert not remote.cache_folder(url).exists()
        assert not (tmp_path / "out").exists()
    finally:
        remote.push_files(sorted(folder.iterdir()), orthanc.root)  # restore for other tests


def test_unknown_series_is_a_one_line_404(ct5n: tuple[Path, str], tmp_path: Path) -> None:
    _, url = ct5n
    res = _cli("pull", url + "9", str(tmp_path / "out"), "--quiet")
    assert res.returncode == 2
    assert res.stderr.count("\n") == 1 and "404 not found" in res.stderr
    assert not (tmp_path / "out").exists()


def test_silent_server_times_out(tmp_path: Path, monkeypatch) -> None:
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections, never answers
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("MEDSEG_DICOMWEB_TIMEOUT", "0.3")
        root = f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web"
        with pytest.raises(MedsegError, match=r"no answer within 0.3 s"):
            remote.pull_series(f"{root}/studies/1.2/series/1.2.3", tmp_path / "out")
        assert not (tmp_path / "out").exists()
        assert len(held) == 3  # the first try and two bounded retries
    finally:
        stop.set()
        thread.join()
        for s in held:
            s.close()
        listener.close()


def test_session_security_defaults(monkeypatch, tmp_path: Path) -> None:
    for var in ("MEDSEG_DICOMWEB_CA_BUNDLE", "MEDSEG_DICOMWEB_USER", "MEDSEG_DICOMWEB_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    s = remote._session("https://pacs.example.org/dicom-web")
    assert s.verify is True and s.auth is None
    monkeypatch.setenv("MEDSEG_DICOMWEB_CA_BUNDLE", str(tmp_path / "ca.pem"))
    monkeypatch.setenv("MEDSEG_DICOMWEB_TOKEN", "tok-123")
    s = remote._session("https://pacs.example.org/dicom-web")
    assert s.verify == str(tmp_path / "ca.pem")
    import requests

    req = requests.Request("GET", "https://pacs.example.org/x", auth=s.auth).prepare()
    assert req.headers["Authorization"] == "Bearer tok-123"


def test_server_stopped_mid_download_then_resumed(
    tmp_path_factory: pytest.TempPathFactory, pydicom_test_files: Path, tmp_path: Path
) -> None:
    folder = tmp_path_factory.mktemp("orthanc_mid")
    server = Orthanc(folder)
    src = pydicom_test_files / "dicomdirtests" / "98892001" / "CT5N"
    remote.push_files(sorted(src.iterdir()), server.root)
    (row,) = remote.search(server.root)
    shutil.rmtree(remote.cache_folder(row["url"]), ignore_errors=True)

    def stop_after_two(done: int, total: int) -> None:
        if done == 2:
            server.stop()

    with pytest.raises(MedsegError, match="cannot reach the DICOMweb server") as err:
        remote.pull_series(row["url"], tmp_path / "out", progress=stop_after_two)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
    cached = remote.cache_folder(row["url"]) / "instances"
    assert len([f for f in cached.iterdir() if f.suffix == ".dcm"]) == 2  # whole ones kept
    assert [f for f in cached.iterdir() if ".part" in f.name] == []
    kept = {f.name: f.stat().st_mtime_ns for f in cached.iterdir()}
    server = Orthanc(folder, port=server.http)  # the same storage and address, a new process
    try:
        vol = medseg.read_volume(row["url"])  # resumes: only the 3 missing instances come
        np.testing.assert_array_equal(vol.array, medseg.read_volume(src).array)
        now = {f.name: f.stat().st_mtime_ns for f in cached.iterdir()}
        assert len(now) == 5 and all(now[k] == v for k, v in kept.items())
    finally:
        server.stop()


def test_dimse_store_find_get_and_stopped(
    tmp_path_factory: pytest.TempPathFactory, pydicom_test_files: Path, tmp_path: Path
) -> None:
    pytest.importorskip("pynetdicom")
    from medseg.io.remote_dimse import dimse_store

    server = Orthanc(tmp_path_factory.mktemp("orthanc_dimse"))
    src = pydicom_test_files / "dicomdirtests" / "98892001" / "CT5N"
    try:
        assert len(dimse_store(sorted(src.iterdir()), server.dimse)) == 5  # C-STORE
        res = _cli("search", server.dimse, "--modality", "CT", "--json")  # C-FIND
        assert res.returncode == 0, res.stderr
        (row,) = json.loads(res.stdout)
        assert row["instances"] == 5 and row["url"].startswith(server.dimse + "/studies/")
        assert remote.search(server.dimse, modality="MR") == []
        res = _cli("pull", row["url"], str(tmp_path / "out"), "--quiet")  # C-GET
        assert res.returncode == 0, res.stderr
        np.testing.assert_array_equal(
            medseg.read_volume(tmp_path / "out").array, medseg.read_volume(src).array
        )
        assert medseg.read_volume(row["url"]).meta["source"] == row["url"]
    finally:
        server.stop()
    shutil.rmtree(remote.cache_folder(row["url"]), ignore_errors=True)
    res = _cli("pull", row["url"], str(tmp_path / "out2"), "--quiet")
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
    assert "association refused or server unreachable" in res.stderr
    assert not (tmp_path / "out2").exists()
