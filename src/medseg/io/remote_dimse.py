"""Classic DIMSE (C-FIND, C-GET, C-STORE) through ``pynetdicom`` for archives without DICOMweb.

Addresses: ``dimse://AET@HOST:PORT`` (the archive's application entity) and, for one series,
``dimse://AET@HOST:PORT/studies/<StudyInstanceUID>/series/<SeriesInstanceUID>``. Our own AE
title is ``MEDSEG_DIMSE_AET`` (default ``MEDSEG``). A series is fetched instance by instance
(C-FIND at IMAGE level lists them, C-GET retrieves the missing ones) into the same kind of cache
as DICOMweb series (:func:`medseg.io.remote.cache_folder`), each file written atomically.
Failures become one-line :class:`~medseg.io.remote.RemoteError`. ``pynetdicom`` is imported
only inside the functions.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.errors import InputError, MedsegError
from medseg.io.remote import RemoteError

__all__ = [
    "DimseAddress",
    "dimse_fetch_series",
    "dimse_search",
    "dimse_store",
    "is_dimse_url",
    "parse_dimse_url",
]

_UID = r"[0-9]+(?:\.[0-9]+)*"
_RE = re.compile(
    rf"^dimse://(?P<aet>[^@/\s]{{1,16}})@(?P<host>[^:/\s]+):(?P<port>[0-9]{{1,5}})"
    rf"(?:/studies/(?P<study>{_UID})(?:/series/(?P<series>{_UID}))?)?/?$"
)


@dataclass(frozen=True)
class DimseAddress:
    """A parsed ``dimse://`` address (``study``/``series`` empty when not given)."""

    aet: str
    host: str
    port: int
    study: str = ""
    series: str = ""

    @property
    def root(self) -> str:
        """``dimse://AET@HOST:PORT``."""
        return f"dimse://{self.aet}@{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The address with its study/series path."""
        path = f"/studies/{self.study}" if self.study else ""
        return self.root + path + (f"/series/{self.series}" if self.series else "")


def is_dimse_url(text: Any) -> bool:
    """Whether ``text`` is a ``dimse://`` address."""
    return isinstance(text, str) and text.lower().startswith("dimse://")


def parse_dimse_url(url: str, series: bool = False) -> DimseAddress:
    """Parse ``dimse://AET@HOST:PORT[/studies/<uid>[/series/<uid>]]``.

    Raises:
        InputError: malformed, or ``series`` is asked for and the series path is missing.
    """
    m = _RE.match(url)
    if m is None or (series and not m.group("series")):
        want = "/studies/<StudyUID>/series/<SeriesUID>" if series else "[/studies/<StudyUID>]"
        raise InputError(f"{url}: not a DIMSE address; expected dimse://AET@HOST:PORT{want}")
    return DimseAddress(
        m.group("aet"), m.group("host"), int(m.group("port")), m["study"] or "", m["series"] or ""
    )


def _local_aet() -> str:
    return os.environ.get("MEDSEG_DIMSE_AET", "MEDSEG")[:16]


def _timeout() -> float:
    from medseg.io.remote import _timeout as t

    return t()


@contextlib.contextmanager
def _association(addr: DimseAddress, contexts: Sequence[Any], **kw: Any) -> Iterator[Any]:
    try:
        from pynetdicom import AE
    except ImportError:
        raise MedsegError("DIMSE needs pynetdicom: pip install 'medseg[pacs]'") from None
    ae = AE(ae_title=_local_aet())
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = _timeout()
    ae.connection_timeout = _timeout()
    for cx in contexts:
        ae.add_requested_context(cx)
    assoc = ae.associate(addr.host, addr.port, ae_title=addr.aet, **kw)
    if not assoc.is_established:
        raise RemoteError(
            f"{addr.root}: association refused or server unreachable; check that it runs, the "
            f"AE title and port, and that it accepts our AE title {_local_aet()}"
        )
    try:
        yield assoc
    finally:
        assoc.release()


def _find(assoc: Any, addr: DimseAddress, query: Any) -> list[Any]:
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    out = []
    for status, ident in assoc.send_c_find(query, FIND):
        if status is None:
            raise RemoteError(f"{addr.root}: the C-FIND got no answer (timeout or abort)")
        if status.Status in (0xFF00, 0xFF01) and ident is not None:
            out.append(ident)
        elif status.Status != 0x0000:
            raise RemoteError(f"{addr.root}: C-FIND failed with status 0x{status.Status:04X}")
    return out


def dimse_search(
    url: str,
    patient: str | None = None,
    modality: str | None = None,
    study_date: str | None = None,
) -> list[dict[str, Any]]:
    """C-FIND: the series of matching studies, rows as :func:`medseg.io.remote.search` (``url`` is
    the ``dimse://.../studies/<uid>/series/<uid>`` address).

    Raises:
        RemoteError: unreachable, association refused, a failed C-FIND.
    """
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    addr = parse_dimse_url(url)
    rows: list[dict[str, Any]] = []
    with _association(addr, [FIND]) as assoc:
        q = Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = addr.study or ""
        q.PatientID = patient or ""
        q.StudyDate = study_date or ""
        q.StudyDescription = ""
        for st in _find(assoc, addr, q):
            s = Dataset()
            s.QueryRetrieveLevel = "SERIES"
            s.StudyInstanceUID = st.StudyInstanceUID
            s.SeriesInstanceUID = ""
            s.Modality = modality or ""
            s.SeriesNumber = ""
            s.SeriesDescription = ""
            s.NumberOfSeriesRelatedInstances = ""
            for se in _find(assoc, addr, s):
                n = se.get("NumberOfSeriesRelatedInstances")
                num = se.get("SeriesNumber")
                row = {
                    "study_uid": str(st.StudyInstanceUID),
                    "patient_id": str(st.get("PatientID", "")) or None,
                    "study_date": str(st.get("StudyDate", "")) or None,
                    "study_description": str(st.get("StudyDescription", "")) or None,
                    "series_uid": str(se.SeriesInstanceUID),
                    "modality": str(se.get("Modality", "")) or None,
                    "series_number": int(num) if num not in (None, "") else None,
                    "series_description": str(se.get("SeriesDescription", "")) or None,
                    "instances": int(n) if n not in (None, "") else None,
                }
                row["url"] = f"{addr.root}/studies/{row['study_uid']}/series/{row['series_uid']}"
                rows.append(row)
    rows.sort(key=lambda r: (r["study_date"] or "", r["study_uid"], r["series_number"] or 0))
    return rows


def _instances(assoc: Any, addr: DimseAddress) -> list[str]:
    from pydicom.dataset import Dataset

    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = addr.study
    q.SeriesInstanceUID = addr.series
    q.SOPInstanceUID = ""
    return sorted({str(i.SOPInstanceUID) for i in _find(assoc, addr, q) if "SOPInstanceUID" in i})


def dimse_fetch_series(url: str, progress: Any = None) -> Path:
    """C-GET a series into the cache (only missing instances) and return its folder.

    Raises:
        RemoteError: unreachable, refused, empty series, an instance that does not come, or a
            series that changed while it was fetched (its cache is removed then).
    """
    from pynetdicom import StoragePresentationContexts, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET

    from medseg.io.atomic import atomic_path

    addr = parse_dimse_url(url, series=True)
    from medseg.io.remote import cache_folder

    folder = cache_folder(addr.url) / "instances"
    storage = [cx.abstract_syntax for cx in StoragePresentationContexts][:126]
    roles = [build_role(a, scp_role=True) for a in storage]

    def on_store(event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        sop = str(ds.SOPInstanceUID)
        if not re.fullmatch(_UID, sop) or str(ds.SeriesInstanceUID) != addr.series:
            return 0xC211
        with atomic_path(folder / f"{sop}.dcm") as tmp:
            ds.save_as(tmp, enforce_file_format=True)
        return 0x0000

    with _association(
        addr, [FIND, GET, *storage], ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    ) as assoc:
        uids = _instances(assoc, addr)
        if not uids:
            raise RemoteError(
                f"{addr.root}: series {addr.series} of study {addr.study} not found (no "
                "instances); check the UIDs (medseg search)"
            )
        folder.mkdir(parents=True, exist_ok=True)
        wanted = {f"{u}.dcm": u for u in uids}
        for f in folder.iterdir():
            if f.name not in wanted:
                with contextlib.suppress(OSError):
                    f.unlink()
        try:
            for n, (name, sop) in enumerate(sorted(wanted.items()), 1):
                if not (folder / name).is_file():
                    from pydicom.dataset import Dataset

                    q = Dataset()
                    q.QueryRetrieveLevel = "IMAGE"
                    q.StudyInstanceUID = addr.study
                    q.SeriesInstanceUID = addr.series
                    q.SOPInstanceUID = sop
                    for status, _ in assoc.send_c_get(q, GET):
                        if status is None:
                            raise RemoteError(f"{addr.root}: the C-GET got no answer")
                    if not (folder / name).is_file():
                        raise RemoteError(
                            f"{addr.root}: series {addr.series} changed while it was fetched "
                            f"(instance {sop} did not come); nothing was kept, try again"
                        )
                if progress is not None:
                    progress(n, len(wanted))
            if _instances(assoc, addr) != uids:
                raise RemoteError(
                    f"{addr.root}: series {addr.series} changed while it was fetched; nothing "
                    "was kept, try again"
                )
        except RemoteError as exc:
            if "changed" in str(exc):
                shutil.rmtree(folder.parent, ignore_errors=True)
            raise
    return folder


def dimse_store(files: Sequence[str | os.PathLike[str]], url: str) -> list[str]:
    """C-STORE DICOM files on the archive at ``url``; returns the stored SOPInstanceUIDs.

    Raises:
        InputError: a file is not DICOM; RemoteError: refused or a failed C-STORE.
    """
    import pydicom

    addr = parse_dimse_url(url)
    datasets = []
    for f in files:
        try:
            datasets.append(pydicom.dcmread(f))
        except Exception as exc:
            raise InputError(f"{f}: not a DICOM file ({type(exc).__name__})") from None
    if not datasets:
        raise InputError("nothing to push: give at least one DICOM file")
    contexts = sorted({str(d.SOPClassUID) for d in datasets})
    with _association(addr, contexts) as assoc:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            if status is None or getattr(status, "Status", -1) != 0x0000:
                code = "no answer" if status is None else f"status 0x{status.Status:04X}"
                raise RemoteError(f"{addr.root}: C-STORE of {ds.SOPInstanceUID} failed ({code})")
    return [str(d.SOPInstanceUID) for d in datasets]
