"""DICOMweb (QIDO-RS search, WADO-RS retrieve, STOW-RS store) through ``dicomweb-client``.

A series is addressed by its standard WADO-RS URL
``http(s)://HOST/.../studies/<StudyInstanceUID>/series/<SeriesInstanceUID>``. :func:`fetch_series`
copies it into a cache under the medseg home, one file per instance named by its
SOPInstanceUID, each written atomically, so an interrupted download resumes with only the missing
instances; the cache folder of a series is keyed by the SHA-256 of its address (server without
credentials + UIDs). The folder is then read by the ordinary DICOM reader.

Credentials never appear in URLs, messages, logs or reports: they come from the environment
(``MEDSEG_DICOMWEB_TOKEN`` for a bearer token, or ``MEDSEG_DICOMWEB_USER`` and
``MEDSEG_DICOMWEB_PASSWORD`` for basic auth) or a netrc file (``MEDSEG_DICOMWEB_NETRC``, else
``~/.netrc`` as requests reads it). TLS is verified (``MEDSEG_DICOMWEB_CA_BUNDLE`` names a CA
file); every request has a timeout (``MEDSEG_DICOMWEB_TIMEOUT`` seconds, default 30) and
connection failures and 502/503/504 are retried a bounded number of times.

Every failure (server down, 401, 403, 404, a series that changes while it is fetched) becomes a
one-line :class:`~medseg.errors.RemoteError`. ``requests`` and ``dicomweb_client`` are imported
only inside the functions.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import InputError, MedsegError

__all__ = [
    "NON_IMAGE_MODALITIES",
    "PushRecord",
    "RemoteError",
    "SeriesURL",
    "cache_folder",
    "dicomweb_client",
    "fetch_series",
    "is_dicomweb_url",
    "is_remote_url",
    "parse_remote_series",
    "parse_series_url",
    "pull_series",
    "push_files",
    "push_result",
    "push_target",
    "query_series",
    "read_remote_volume",
    "search",
    "server_root",
]

_UID = r"[0-9]+(?:\.[0-9]+)*"
_SERIES_RE = re.compile(
    rf"^(?P<root>https?://[^/?#]+(?:/[^?#]*?)?)/studies/(?P<study>{_UID})/series/(?P<series>{_UID})/?$"
)
_ENV_USER = "MEDSEG_DICOMWEB_USER"
_ENV_PASSWORD = "MEDSEG_DICOMWEB_PASSWORD"
_ENV_TOKEN = "MEDSEG_DICOMWEB_TOKEN"
_ENV_NETRC = "MEDSEG_DICOMWEB_NETRC"
_ENV_CA = "MEDSEG_DICOMWEB_CA_BUNDLE"
_ENV_TIMEOUT = "MEDSEG_DICOMWEB_TIMEOUT"
_CRED_HINT = (
    f"set {_ENV_USER} and {_ENV_PASSWORD} (or {_ENV_TOKEN}, or a netrc file in {_ENV_NETRC})"
)


class RemoteError(InputError):
    """A DICOMweb server could not be reached or refused/failed a request."""


@dataclass(frozen=True)
class SeriesURL:
    """A parsed WADO-RS series address: ``root`` is the DICOMweb service root (no credentials)."""

    root: str
    study: str
    series: str

    @property
    def url(self) -> str:
        """The series URL again."""
        return f"{self.root}/studies/{self.study}/series/{self.series}"


def is_dicomweb_url(text: Any) -> bool:
    """Whether ``text`` is an ``http(s)://`` address (a DICOMweb URL is expected then)."""
    return isinstance(text, str) and text.lower().startswith(("http://", "https://"))


def is_remote_url(text: Any) -> bool:
    """Whether ``text`` is a DICOMweb (``http(s)://``) or DIMSE (``dimse://``) address."""
    return is_dicomweb_url(text) or (isinstance(text, str) and text.lower().startswith("dimse://"))


def parse_remote_series(url: str) -> Any:
    """A series address of either kind: a :class:`SeriesURL` or a
    :class:`medseg.io.remote_dimse.DimseAddress` (both have ``root``, ``study``, ``series`` and
    ``url``).

    Raises:
        InputError: not a series address.
    """
    if is_dicomweb_url(url):
        return parse_series_url(url)
    from medseg.io.remote_dimse import parse_dimse_url

    return parse_dimse_url(url, series=True)


def _check_no_credentials(url: str) -> None:
    netloc = url.split("://", 1)[1].split("/", 1)[0]
    if "@" in netloc:
        raise InputError(
            "a DICOMweb URL must not carry a user name or password (they would end up in "
            f"reports); remove them from the URL and {_CRED_HINT}"
        )


def server_root(url: str) -> str:
    """The DICOMweb service root of a series/study URL or of a root URL (trailing ``/`` removed).

    Raises:
        InputError: not http(s), or credentials in the URL.
    """
    if not is_dicomweb_url(url):
        raise InputError(f"{url}: not a DICOMweb address; expected http(s)://HOST/.../dicom-web")
    _check_no_credentials(url)
    root = url.split("?", 1)[0].rstrip("/")
    m = re.search(rf"/studies/{_UID}(?:/series/{_UID})?$", root)
    return root[: m.start()] if m else root


def parse_series_url(url: str) -> SeriesURL:
    """Split ``http(s)://HOST/.../studies/<StudyUID>/series/<SeriesUID>``.

    Raises:
        InputError: not that form, or credentials in the URL.
    """
    if not is_dicomweb_url(url):
        raise InputError(f"{url}: not a DICOMweb address")
    _check_no_credentials(url)
    m = _SERIES_RE.match(url)
    if m is None:
        raise InputError(
            f"{url}: not a DICOMweb series URL; expected "
            "http(s)://HOST/.../studies/<StudyInstanceUID>/series/<SeriesInstanceUID> "
            "(medseg search lists them)"
        )
    return SeriesURL(m.group("root"), m.group("study"), m.group("series"))


# --------------------------------------------------------------------------- session
def _timeout() -> float:
    try:
        value = float(os.environ.get(_ENV_TIMEOUT, "30"))
    except ValueError:
        raise InputError(f"{_ENV_TIMEOUT} must be a number of seconds") from None
    return value if value > 0 else 30.0


def _auth(root: str) -> Any:
    """``requests`` auth from the environment or a netrc file; ``None`` when none is set."""
    import requests

    token = os.environ.get(_ENV_TOKEN)
    user = os.environ.get(_ENV_USER)
    if token:
        return _Bearer(token)
    if user:
        return requests.auth.HTTPBasicAuth(user, os.environ.get(_ENV_PASSWORD, ""))
    path = os.environ.get(_ENV_NETRC)
    if path:
        import netrc

        host = root.split("://", 1)[1].split("/", 1)[0].split(":", 1)[0]
        try:
            entry = netrc.netrc(path).authenticators(host)
        except (OSError, netrc.NetrcParseError) as exc:
            raise InputError(
                f"{_ENV_NETRC}: cannot read the netrc file ({type(exc).__name__})"
            ) from None
        if entry is not None:
            return requests.auth.HTTPBasicAuth(entry[0], entry[2] or "")
    return None  # requests still reads ~/.netrc by itself


class _Bearer:
    def __init__(self, token: str) -> None:
        self._token = token

    def __call__(self, r: Any) -> Any:
        r.headers["Authorization"] = f"Bearer {self._token}"
        return r


def _session(root: str) -> Any:
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    timeout = _timeout()

    class _TimeoutAdapter(HTTPAdapter):
        def send(self, request: Any, **kw: Any) -> Any:  # type: ignore[override]
            if kw.get("timeout") is None:
                kw["timeout"] = timeout
            return super().send(request, **kw)

    retry = Retry(
        total=3,
        connect=2,
        read=2,
        status=2,
        backoff_factor=0.2,
        status_forcelist=(502, 503, 504),
        allowed_methods=frozenset({"GET", "HEAD"}),
        raise_on_status=False,
    )
    s = requests.Session()
    adapter = _TimeoutAdapter(max_retries=retry)
    s.mount("http://", adapter)
    s.mount("https://", adapter)
    s.verify = os.environ.get(_ENV_CA) or True
    auth = _auth(root)
    if auth is not None:
        s.auth = auth
    return s


def dicomweb_client(url: str) -> Any:
    """A ``dicomweb_client.DICOMwebClient`` for the service root of ``url`` (auth, TLS,
    timeouts and retries set as the module docstring says).

    Raises:
        InputError: bad URL; MedsegError: dicomweb-client not installed.
    """
    root = server_root(url)
    try:
        from dicomweb_client.api import DICOMwebClient
    except ImportError:
        raise MedsegError(
            "DICOMweb needs dicomweb-client: pip install 'medseg[pacs]' (or dicomweb-client)"
        ) from None
    client = DICOMwebClient(url=root, session=_session(root), timeout=_timeout())
    client.set_http_retry_params(retry=False)  # retries: the session's bounded urllib3 Retry
    return client


@contextlib.contextmanager
def _errors(root: str, what: str) -> Iterator[None]:
    """Turn ``requests`` failures into one-line :class:`RemoteError` naming ``root`` only."""
    import requests

    try:
        yield
    except MedsegError:
        raise
    except requests.exceptions.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        raise RemoteError(_http_message(root, what, code)) from None
    except requests.exceptions.SSLError:
        raise RemoteError(
            f"{root}: TLS certificate verification failed while trying to {what}; give the "
            f"server's CA file in {_ENV_CA}"
        ) from None
    except (requests.exceptions.Timeout, requests.exceptions.ConnectionError) as exc:
        if not isinstance(exc, requests.exceptions.Timeout) and "timed out" not in str(exc):
            raise RemoteError(
                f"{root}: cannot reach the DICOMweb server to {what} (connection failed); "
                "check that it is running and the URL is right"
            ) from None
        raise RemoteError(
            f"{root}: no answer within {_timeout():g} s while trying to {what}; try again later "
            f"or raise {_ENV_TIMEOUT}"
        ) from None
    except requests.exceptions.RetryError:
        raise RemoteError(
            f"{root}: cannot reach the DICOMweb server to {what} (connection failed); check that "
            "it is running and the URL is right"
        ) from None
    except requests.exceptions.RequestException as exc:
        raise RemoteError(f"{root}: request failed to {what} ({type(exc).__name__})") from None
    except (ValueError, KeyError, TypeError) as exc:  # malformed answers
        raise RemoteError(
            f"{root}: the server's answer cannot be read while trying to {what} "
            f"({type(exc).__name__}); is this a DICOMweb URL?"
        ) from None


def _http_message(root: str, what: str, code: int) -> str:
    if code == 401:
        return f"{root}: 401 unauthorized (cannot {what}); {_CRED_HINT}"
    if code == 403:
        return f"{root}: 403 forbidden (cannot {what}); ask the archive for access rights"
    if code == 404:
        return f"{root}: 404 not found (cannot {what}); check the UIDs and root (medseg search)"
    return f"{root}: HTTP {code} (cannot {what}); try again later or ask the archive's admin"


# --------------------------------------------------------------------------- QIDO-RS
def _tag(obj: dict[str, Any], tag: str) -> Any:
    value = obj.get(tag, {}).get("Value")
    if not value:
        return None
    v = value[0]
    if isinstance(v, dict):  # person name
        return v.get("Alphabetic")
    return v


_STUDY_FIELDS = {
    "study_uid": "0020000D",
    "patient_id": "00100020",
    "study_date": "00080020",
    "study_description": "00081030",
}
_SERIES_FIELDS = {
    "series_uid": "0020000E",
    "modality": "00080060",
    "series_number": "00200011",
    "series_description": "0008103E",
    "instances": "00201209",
}


def search(
    url: str,
    patient: str | None = None,
    modality: str | None = None,
    study_date: str | None = None,
) -> list[dict[str, Any]]:
    """QIDO-RS: the series of the studies matching the filters, one row per series.

    Args:
        url: DICOMweb service root (or a study URL: only that study), or a ``dimse://AET@HOST:PORT``
            address (C-FIND).
        patient: PatientID (wildcards ``*``/``?`` as the server allows).
        modality: series Modality (``CT``, ``MR``, ``SEG``...).
        study_date: ``YYYYMMDD`` or a range ``YYYYMMDD-YYYYMMDD``.

    Returns:
        Rows with ``study_uid``, ``patient_id``, ``study_date``, ``study_description``,
        ``series_uid``, ``modality``, ``series_number``, ``series_description``, ``instances``
        and ``url`` (the series URL), sorted by study date, study and series number.

    Raises:
        RemoteError: the server cannot be reached or refuses.
    """
    if is_remote_url(url) and not is_dicomweb_url(url):
        from medseg.io.remote_dimse import dimse_search

        return dimse_search(url, patient=patient, modality=modality, study_date=study_date)
    root = server_root(url)
    m = re.search(rf"/studies/({_UID})", url.split("?", 1)[0])
    client = dicomweb_client(root)
    filters: dict[str, Any] = {}
    if patient:
        filters["PatientID"] = patient
    if study_date:
        filters["StudyDate"] = study_date
    if m:
        filters["StudyInstanceUID"] = m.group(1)
    rows: list[dict[str, Any]] = []
    with _errors(root, "search"):
        studies = client.search_for_studies(
            search_filters=filters,
            fields=["StudyDescription", "PatientID", "StudyDate"],
            get_remaining=True,
        )
        for st in studies:
            study = {k: _tag(st, t) for k, t in _STUDY_FIELDS.items()}
            series_filters = {"Modality": modality} if modality else {}
            found = client.search_for_series(
                study["study_uid"],
                search_filters=series_filters,
                fields=["SeriesDescription", "NumberOfSeriesRelatedInstances", "SeriesNumber"],
                get_remaining=True,
            )
            for se in found:
                row = {**study, **{k: _tag(se, t) for k, t in _SERIES_FIELDS.items()}}
                row["url"] = f"{root}/studies/{row['study_uid']}/series/{row['series_uid']}"
                rows.append(row)
    rows.sort(
        key=lambda r: (str(r["study_date"] or ""), r["study_uid"], int(r["series_number"] or 0))
    )
    return rows


def _instance_uids(client: Any, ref: SeriesURL) -> list[str]:
    found = client.search_for_instances(
        ref.study, ref.series, fields=["SOPInstanceUID"], get_remaining=True
    )
    uids = sorted({str(_tag(i, "00080018")) for i in found if _tag(i, "00080018")})
    return uids


# --------------------------------------------------------------------------- WADO-RS
def cache_folder(url: str) -> Path:
    """The cache folder of a series address (DICOMweb or DIMSE):
    ``medseg_home()/dicomweb/<sha256 of root, study and series>``; the instances are in its
    ``instances`` sub-folder."""
    from medseg.models.weights import medseg_home

    ref = parse_remote_series(url)
    key = hashlib.sha256(f"{ref.root}\n{ref.study}\n{ref.series}".encode()).hexdigest()[:32]
    return medseg_home() / "dicomweb" / key


def _safe_name(uid: str) -> str:
    if not re.fullmatch(_UID, uid):
        raise RemoteError(f"the server listed a malformed SOPInstanceUID {uid[:64]!r}")
    return f"{uid}.dcm"


def fetch_series(url: str, progress: Any = None) -> Path:
    """Download a DICOMweb series into the cache (only missing instances) and return its folder.

    A ``dimse://`` address goes to :func:`medseg.io.remote_dimse.dimse_fetch_series`.

    Each instance is checked (its Study/Series/SOP Instance UIDs are the ones asked for) and
    written atomically; instances the server no longer lists are removed from the cache. The
    instance list is asked again at the end: a series that changed while it was fetched is an
    error and its cache folder is removed.

    Args:
        url: series URL ``.../studies/<StudyUID>/series/<SeriesUID>``.
        progress: optional ``progress(done, total)`` callback.

    Returns:
        The folder holding one ``<SOPInstanceUID>.dcm`` per instance.

    Raises:
        RemoteError: server down, 401/403/404, an empty or changing series.
    """
    import pydicom

    from medseg.io.atomic import atomic_path

    if is_remote_url(url) and not is_dicomweb_url(url):
        from medseg.io.remote_dimse import dimse_fetch_series

        return dimse_fetch_series(url, progress=progress)
    ref = parse_series_url(url)
    client = dicomweb_client(ref.root)
    folder = cache_folder(url) / "instances"
    with _errors(ref.root, "list the series' instances"):
        uids = _instance_uids(client, ref)
    if not uids:
        raise RemoteError(
            f"{ref.root}: 404 not found: series {ref.series} of study {ref.study} has no "
            "instances there; check the UIDs (medseg search)"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RemoteError(
            f"{folder}: cannot create the DICOMweb cache folder ({exc.strerror})"
        ) from None
    wanted = {_safe_name(u): u for u in uids}
    for f in folder.iterdir():  # instances gone from the server, or stale temporary files
        if f.name not in wanted:
            with contextlib.suppress(OSError):
                f.unlink() if f.is_file() else shutil.rmtree(f)
    try:
        for n, (name, sop) in enumerate(sorted(wanted.items()), 1):
            target = folder / name
            if not target.is_file():
                with _errors(ref.root, "retrieve an instance"):
                    try:
                        ds = client.retrieve_instance(ref.study, ref.series, sop)
                    except Exception as exc:
                        resp = getattr(exc, "response", None)
                        if resp is not None and resp.status_code == 404:
                            raise RemoteError(
                                f"{ref.root}: series {ref.series} changed while it was fetched "
                                "(an instance disappeared); nothing was kept, try again"
                            ) from None
                        raise
                got = (
                    str(ds.get("StudyInstanceUID", "")),
                    str(ds.get("SeriesInstanceUID", "")),
                    str(ds.get("SOPInstanceUID", "")),
                )
                if got != (ref.study, ref.series, sop):
                    raise RemoteError(
                        f"{ref.root}: the server sent instance {got[2] or '?'} of series "
                        f"{got[1] or '?'} when asked for {sop}; nothing was kept"
                    )

                def _check(p: Path, sop: str = sop) -> None:
                    back = pydicom.dcmread(p, stop_before_pixels=True)
                    assert str(back.SOPInstanceUID) == sop

                with atomic_path(target, verify=_check) as tmp:
                    ds.save_as(tmp, enforce_file_format=True)
            if progress is not None:
                progress(n, len(wanted))
        with _errors(ref.root, "list the series' instances"):
            again = _instance_uids(client, ref)
        if again != uids:
            raise RemoteError(
                f"{ref.root}: series {ref.series} changed while it was fetched ({len(uids)} "
                f"instances, now {len(again)}); nothing was kept, try again"
            )
    except RemoteError as exc:
        if "changed" in str(exc) or "sent instance" in str(exc):
            shutil.rmtree(folder.parent, ignore_errors=True)
        raise
    return folder


def read_remote_volume(url: str, series: str | None = None) -> Any:
    """Fetch a DICOMweb or DIMSE series (see :func:`fetch_series`) and read it like a DICOM folder.

    The volume's ``meta['source']`` is the URL and ``meta['dicom_folder']`` the cached folder.
    """
    from medseg.io.dicom import read_dicom_series

    folder = fetch_series(url)
    vol = read_dicom_series(folder, series=series)
    vol.meta["dicom_folder"] = str(folder)
    vol.meta["source"] = parse_remote_series(url).url
    return vol


def pull_series(
    url: str, out: str | os.PathLike[str], overwrite: bool = False, progress: Any = None
) -> list[Path]:
    """Download a series into the folder ``out`` (atomically: all instances or nothing).

    Returns:
        The written files, sorted.

    Raises:
        RemoteError: as :func:`fetch_series`; OutputError: ``out`` is unusable.
    """
    from medseg.io.atomic import atomic_dir, prepare_output_dir

    prepare_output_dir(out, overwrite=overwrite)  # fail before any download
    src = fetch_series(url, progress=progress)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        for f in sorted(src.iterdir()):
            shutil.copy2(f, tmp / f.name)
    return sorted(Path(out).iterdir())


# --------------------------------------------------------------------------- STOW-RS
def push_files(
    files: Sequence[str | os.PathLike[str]], url: str, study: str | None = None
) -> list[str]:
    """STOW-RS: store DICOM files on the server of ``url``.

    Args:
        files: DICOM files (a DICOM-SEG, an RTSTRUCT, a series' slices...).
        url: DICOMweb service root, or a study/series URL of that server; or a ``dimse://``
            address (C-STORE).
        study: StudyInstanceUID all files must belong to (checked) — default: no check.

    Returns:
        The SOPInstanceUIDs stored.

    Raises:
        InputError: a file is not DICOM or belongs to another study; RemoteError: the server
            refuses or reports failed instances.
    """
    import pydicom

    if is_remote_url(url) and not is_dicomweb_url(url):
        from medseg.io.remote_dimse import dimse_store

        for f in files if study is not None else ():
            got = str(pydicom.dcmread(f, stop_before_pixels=True).get("StudyInstanceUID", ""))
            if got != study:
                raise InputError(f"{f}: belongs to study {got}, not {study}")
        return dimse_store(files, url)
    root = server_root(url)
    datasets = []
    for f in files:
        try:
            ds = pydicom.dcmread(f)
        except Exception as exc:
            raise InputError(f"{f}: not a DICOM file ({type(exc).__name__})") from None
        if study is not None and str(ds.get("StudyInstanceUID", "")) != study:
            raise InputError(f"{f}: belongs to study {ds.get('StudyInstanceUID')}, not {study}")
        datasets.append(ds)
    if not datasets:
        raise InputError("nothing to push: give at least one DICOM file")
    client = dicomweb_client(root)
    with _errors(root, "store"):
        answer = client.store_instances(datasets)
    failed = answer.get("FailedSOPSequence") if answer is not None else None
    if failed:
        raise RemoteError(f"{root}: the server refused {len(failed)} of {len(datasets)} instances")
    return [str(d.SOPInstanceUID) for d in datasets]


# --------------------------------------------------------------------------- results back
#: Series modalities that hold no image: :func:`query_series` skips them unless the query names
#: the modality (so a batch rerun over a study does not try to segment the SEGs it pushed).
NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "SR", "PR", "KO", "REG", "DOC"}
)

#: QIDO query keys :func:`query_series` understands, and the :func:`search` filter each sets.
_QUERY_KEYS = {
    "patientid": "patient",
    "patient": "patient",
    "modality": "modality",
    "studydate": "study_date",
    "study_date": "study_date",
    "studyinstanceuid": "study",
}


def query_series(url: str) -> list[dict[str, Any]]:
    """Every image series a query address matches, as :func:`search` rows (``url`` is the series
    URL).

    ``url`` is a QIDO-RS address with filters, e.g.
    ``http://host/dicom-web/studies?PatientID=X&Modality=CT&StudyDate=20200101-20201231``
    (also ``StudyInstanceUID=``, or a study URL ``.../studies/<uid>``), the bare service root (all
    series), a ``dimse://AET@HOST:PORT`` address with the same ``?filters`` (C-FIND), or one
    series URL (that series alone). Without a ``Modality`` filter, series of
    :data:`NON_IMAGE_MODALITIES` (SEG, RTSTRUCT, ...) are left out.

    Raises:
        InputError: an unknown filter; RemoteError: the server cannot be reached or refuses.
    """
    from urllib.parse import parse_qsl

    base, _, query = str(url).partition("?")
    with contextlib.suppress(InputError):
        ref = parse_remote_series(base)
        return [{"url": ref.url, "study_uid": ref.study, "series_uid": ref.series}]
    base = re.sub(r"/(?:studies|series)$", "", base.rstrip("/"))  # QIDO ".../studies?..."
    filters: dict[str, str] = {}
    for key, value in parse_qsl(query, keep_blank_values=False):
        name = _QUERY_KEYS.get(key.lower())
        if name is None:
            raise InputError(
                f"{key}: unknown query filter; use PatientID, Modality, StudyDate or "
                "StudyInstanceUID (e.g. .../dicom-web/studies?Modality=CT&PatientID=X)"
            )
        filters[name] = value
    study = filters.pop("study", None)
    if study:
        if not re.fullmatch(_UID, study):
            raise InputError(f"StudyInstanceUID={study[:64]!r}: not a DICOM UID")
        base = f"{base.rstrip('/')}/studies/{study}"
    rows = search(base, **filters)
    if "modality" not in filters:
        rows = [r for r in rows if str(r.get("modality") or "").upper() not in NON_IMAGE_MODALITIES]
    return rows


@dataclass(frozen=True)
class PushRecord:
    """What :func:`push_result` stored: the server (no credentials) and the stored object's UIDs."""

    to: str
    study: str
    series: str
    sop_instance: str

    def to_json(self) -> dict[str, str]:
        """JSON-ready dict (keys ``to``, ``study_uid``, ``series_uid``, ``sop_instance_uid``)."""
        return {
            "to": self.to,
            "study_uid": self.study,
            "series_uid": self.series,
            "sop_instance_uid": self.sop_instance,
        }


def push_target(source: Any = None, to: str | None = None) -> str:
    """The server a result made on ``source`` is stored on: ``to`` when given (its DICOMweb root
    or ``dimse://AET@HOST:PORT``), else the server ``source`` (a series or query URL) is on.

    Raises:
        InputError: ``source`` is local and no ``to`` is given; a malformed ``to``.
    """
    if to:
        if is_dicomweb_url(to):
            return server_root(to)
        from medseg.io.remote_dimse import parse_dimse_url

        return parse_dimse_url(str(to)).root
    if is_dicomweb_url(str(source or "")):
        return server_root(str(source))
    if is_remote_url(str(source or "")):
        from medseg.io.remote_dimse import parse_dimse_url

        return parse_dimse_url(str(source).split("?", 1)[0]).root
    raise InputError(
        f"{source}: was read from local files, so there is no server to push to; give --to URL "
        "(a DICOMweb root or dimse://AET@HOST:PORT)"
    )


def push_result(
    file: str | os.PathLike[str], source: Any = None, to: str | None = None
) -> PushRecord:
    """Store a DICOM-SEG or RTSTRUCT made on ``source`` as a new series of the source's study.

    Args:
        file: the DICOM-SEG / RTSTRUCT file (it references the source series).
        source: the series it was made on (a series URL: its server is the default target and its
            study must be the file's), or a local folder/file.
        to: the server to store on (see :func:`push_target`); needed when ``source`` is local.

    Returns:
        The :class:`PushRecord` (the SOPInstanceUID stored).

    Raises:
        InputError: no target, not a DICOM file, another study; RemoteError: the server is down or
            refuses.
    """
    import pydicom

    target = push_target(source, to)
    try:
        ds = pydicom.dcmread(file, stop_before_pixels=True)
    except Exception as exc:
        raise InputError(f"{file}: not a DICOM file ({type(exc).__name__})") from None
    study = str(ds.get("StudyInstanceUID", ""))
    if is_remote_url(str(source or "")):
        want = parse_remote_series(str(source)).study
        if study != want:
            raise InputError(f"{file}: belongs to study {study}, not {want} of {source}")
    (sop,) = push_files([file], target, study=study)
    return PushRecord(target, study, str(ds.get("SeriesInstanceUID", "")), sop)
