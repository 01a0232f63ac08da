"""Where results go and how they are sent: C-STORE (pynetdicom) or STOW-RS (dicomweb-client), one batch at a time.

A send answers, per object, None (the destination holds it: success, a warning status, or "already stored") or the
reason it did not. It never decides what happens next; the outbox (``outbox.py``) retries with backoff and jitter
or dead-letters, so the policy survives a restart.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from ..errors import ConfigError
from ..extras import require
from .config import check_ae_title

log = logging.getLogger("cxr_edge.node.delivery")

_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


@dataclass(frozen=True)
class Destination:
    """One place results are delivered: ``dicom://AE@host:port`` (C-STORE) or ``http(s)://host/dicom-web`` (STOW-RS).

    ``name`` is what the outbox records: a destination fixed in place (a corrected AE title) keeps its name, so
    ``--redeliver`` sends its dead letters to the fixed address."""

    name: str
    kind: str  # "dicom" (C-STORE) | "stow" (STOW-RS) | "mllp" (HL7 v2 ORU^R01 to a RIS/EHR)
    url: str
    host: str
    port: int
    called_ae: str | None = None
    receiving_application: str = ""  # MSH-5 / MSH-6 of an HL7 destination (mllp://HOST:PORT?app=RIS&facility=HOSP)
    receiving_facility: str = ""

    @property
    def takes(self) -> tuple[str, ...]:
        """The result kinds this destination receives: the DICOM objects, or the HL7 message."""
        return ("hl7",) if self.kind == "mllp" else ("sr", "sc", "seg")

    @classmethod
    def parse(cls, text: str) -> Destination:
        name, sep, url = text.partition("=")
        if not sep or "://" in name:
            name, url = "", text
        url = url.strip()
        u = urlsplit(url)
        try:
            u.port  # noqa: B018  (an out-of-range or non-numeric port raises here)
        except ValueError as exc:
            raise ConfigError(f"destination {text!r}: {exc}") from exc
        if u.scheme == "dicom":
            if not u.username or not u.hostname or not u.port:
                raise ConfigError(f"destination {text!r}: write dicom://CALLED_AE@HOST:PORT, e.g. dicom://PACS@10.1.2.3:104")
            ae = check_ae_title(u.username, "destination AE title")
            dest = cls(name or f"{u.hostname}:{u.port}", "dicom", url, u.hostname, int(u.port), ae)
        elif u.scheme in ("http", "https"):
            if not u.hostname:
                raise ConfigError(f"destination {text!r}: write http(s)://HOST:PORT/DICOMWEB-ROOT, "
                                  "e.g. http://10.1.2.3:8042/dicom-web")
            port = int(u.port or (443 if u.scheme == "https" else 80))
            dest = cls(name or f"{u.hostname}:{port}", "stow", url.rstrip("/"), u.hostname, port)
        elif u.scheme == "mllp":
            if not u.hostname or not u.port:
                raise ConfigError(f"destination {text!r}: write mllp://HOST:PORT[?app=RIS&facility=HOSPITAL] (HL7 v2 "
                                  "ORU^R01 to a RIS or EHR interface)")
            q = parse_qs(u.query)
            dest = cls(name or f"{u.hostname}:{u.port}", "mllp", url, u.hostname, int(u.port),
                       receiving_application=(q.get("app") or [""])[0], receiving_facility=(q.get("facility") or [""])[0])
        else:
            raise ConfigError(f"destination {text!r}: use dicom://AE@HOST:PORT (C-STORE), http(s)://HOST/PATH "
                              "(STOW-RS) or mllp://HOST:PORT (HL7 v2 to a RIS), optionally named NAME=URL")
        if not _NAME.match(dest.name):
            raise ConfigError(f"destination name {dest.name!r}: 1-64 letters, digits, '_', '.', ':' or '-'")
        return dest

    def __str__(self) -> str:
        return f"{self.name} ({self.url})"


@dataclass(frozen=True)
class Item:
    """One object to send: what the outbox row says."""

    outbox_id: int
    sop_class_uid: str
    sop_instance_uid: str
    path: str


def backoff_s(attempt: int, base_s: float, max_s: float) -> float:
    """Seconds before attempt ``attempt + 1``: tenacity's exponential backoff plus up to ``base_s`` of random jitter
    (Google's storage retry strategy), fed the attempt count the outbox keeps, so the schedule survives a restart."""
    tenacity = require("tenacity")
    state = tenacity.RetryCallState(None, None, (), {})
    state.attempt_number = max(1, attempt)
    wait = tenacity.wait_exponential_jitter(multiplier=base_s, max=max_s, jitter=base_s)
    return float(wait(state))


def send(dest: Destination, items: list[Item], *, calling_ae: str, timeout_s: float) -> list[str | None]:
    """Send ``items`` to ``dest``; per item None (held there) or why not. Never raises for a peer's failure."""
    readable: list[tuple[Item, object]] = []
    out: dict[int, str | None] = {}
    for it in items:
        try:
            if dest.kind == "mllp":
                # bytes, decoded: read_text's universal newlines would turn the segment separator CR into LF
                readable.append((it, Path(it.path).read_bytes().decode("utf-8")))
            else:
                readable.append((it, require("pydicom").dcmread(it.path)))
        except Exception as exc:  # the object file is gone or damaged: no retry will bring it back
            out[it.outbox_id] = f"PERMANENT: result object file {it.path} unreadable ({type(exc).__name__}: {exc})"
    if readable:
        senders = {"dicom": lambda: _cstore(dest, readable, calling_ae, timeout_s),
                   "stow": lambda: _stow(dest, readable, timeout_s), "mllp": lambda: _mllp(dest, readable, timeout_s)}
        try:  # each sender records per item and catches per item; this catches only what escapes (a bug)
            sent = senders[dest.kind]()
        except Exception as exc:
            sent = {it.outbox_id: f"{type(exc).__name__}: {exc}" for it, _ in readable}
        out.update(sent)
    return [out.get(it.outbox_id, "not sent") for it in items]


#: C-STORE statuses that mean the destination holds the object: success, the warnings (coercion, elements
#: discarded, data set does not match SOP class: 0x0001, 0x0107, 0x0116, 0xBxxx) and "duplicate SOP instance"
#: (0x0111): a PACS that refuses a second copy already has the first, which is what a resend after a crash sends
HELD_STATUSES = (0x0000, 0x0001, 0x0107, 0x0116, 0x0111)


def _cstore(dest: Destination, readable, calling_ae: str, timeout_s: float) -> dict[int, str | None]:
    pynetdicom = require("pynetdicom")
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ae = pynetdicom.AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = min(timeout_s, 10.0)
    # one context per (class, compressed syntax) so the acceptor can take the file as it is, and one with plain
    # little endian as the fallback (an acceptor picks one syntax per context, and often the uncompressed one)
    contexts: set[tuple[str, tuple[str, ...]]] = set()
    for _, ds in readable:
        ts = ds.file_meta.TransferSyntaxUID
        if ts.is_compressed:
            contexts.add((ds.SOPClassUID, (ts,)))
        contexts.add((ds.SOPClassUID, (ExplicitVRLittleEndian, ImplicitVRLittleEndian)))
    for sop_class, syntaxes in sorted(contexts):
        ae.add_requested_context(sop_class, list(syntaxes))
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.called_ae)
    if not assoc.is_established:
        # the answer itself first: a peer that rejects and closes at once can leave pynetdicom saying "aborted"
        p = assoc.acceptor.primitive
        rejected = assoc.is_rejected or getattr(p, "result", None) in (0x01, 0x02)
        why = ("rejected" if rejected else "could not be opened, or was aborted before an answer" if p is None
               else "aborted")
        detail = ""
        if rejected and p is not None:
            detail = f" (result {p.result_str}, source {p.source_str}, reason {p.reason_str})"
        msg = f"association to {dest.called_ae}@{dest.host}:{dest.port} {why}{detail}"
        return {it.outbox_id: msg for it, _ in readable}
    out: dict[int, str | None] = {}
    try:
        for it, ds in readable:
            if not assoc.is_established:
                out[it.outbox_id] = "association ended before this object was sent"
                continue
            accepted = {c.transfer_syntax[0] for c in assoc.accepted_contexts if c.abstract_syntax == ds.SOPClassUID}
            if not accepted:
                out[it.outbox_id] = f"the destination accepts no presentation context for SOP class {ds.SOPClassUID}"
                continue
            try:
                if ds.file_meta.TransferSyntaxUID not in accepted and ds.file_meta.TransferSyntaxUID.is_compressed:
                    # e.g. the RLE Segmentation to a PACS that takes only uncompressed objects: the same instance,
                    # so the same SOP Instance UID (pydicom's decompress makes a new one unless told not to)
                    ds.decompress(generate_instance_uid=False)
                status = assoc.send_c_store(ds)
            except Exception as exc:  # this object only; the association goes on if it still can
                out[it.outbox_id] = f"C-STORE not sent: {type(exc).__name__}: {exc}"
                continue
            code = getattr(status, "Status", None)
            if code is None:
                out[it.outbox_id] = "no C-STORE response (timeout or aborted association)"
            elif code in HELD_STATUSES or 0xB000 <= code <= 0xBFFF:
                out[it.outbox_id] = None  # success, a warning, or "already held": the object is there
            else:
                comment = getattr(status, "ErrorComment", None)
                out[it.outbox_id] = f"C-STORE status 0x{code:04X}" + (f": {comment}" if comment else "")
    finally:
        if assoc.is_established:
            assoc.release()
    return out


def _stow(dest: Destination, readable, timeout_s: float) -> dict[int, str | None]:
    """One STOW-RS request per study. An instance counts as held only when the response lists it in Referenced
    SOP Sequence (or fails it with 0x0111, already stored); a 2xx answer that lists nothing readable (an HTML
    page from a proxy, a media type dicomweb-client does not parse) is checked instance by instance with QIDO-RS,
    and what QIDO-RS cannot confirm is retried."""
    require("dicomweb_client")
    from dicomweb_client.api import DICOMwebClient
    from requests.exceptions import HTTPError

    client = DICOMwebClient(dest.url, timeout=timeout_s)
    by_study: dict[str, list] = {}
    for it, ds in readable:
        by_study.setdefault(str(ds.StudyInstanceUID), []).append((it, ds))
    out: dict[int, str | None] = {}
    for study, group in by_study.items():
        try:
            resp = client.store_instances([ds for _, ds in group], study_instance_uid=study)
        except HTTPError as exc:
            code = exc.response.status_code if exc.response is not None else "?"
            body = (exc.response.text[:500] if exc.response is not None else "").strip()
            for it, _ in group:
                out[it.outbox_id] = f"STOW-RS HTTP {code}" + (f": {body}" if body else "")
            continue
        except Exception as exc:  # this study's request only (connection, media type, JSON): the others go on
            for it, _ in group:
                out[it.outbox_id] = f"STOW-RS request failed: {type(exc).__name__}: {exc}"
            continue
        failed = {str(f.ReferencedSOPInstanceUID): int(getattr(f, "FailureReason", 0) or 0)
                  for f in (resp.get("FailedSOPSequence") or []) if "ReferencedSOPInstanceUID" in f}
        stored = {str(r.ReferencedSOPInstanceUID) for r in (resp.get("ReferencedSOPSequence") or [])
                  if "ReferencedSOPInstanceUID" in r}
        for it, ds in group:
            uid = str(ds.SOPInstanceUID)
            if uid in stored or failed.get(uid) == 0x0111:
                out[it.outbox_id] = None
            elif uid in failed:
                out[it.outbox_id] = f"STOW-RS failure reason 0x{failed[uid]:04X}"
            else:
                out[it.outbox_id] = _confirm_by_qido(client, study, uid)
    return out


def _confirm_by_qido(client, study: str, uid: str) -> str | None:
    try:
        found = client.search_for_instances(study_instance_uid=study, search_filters={"SOPInstanceUID": uid})
    except Exception as exc:
        return f"STOW-RS response did not list this instance, and QIDO-RS could not confirm it ({type(exc).__name__})"
    return None if found else "STOW-RS response did not list this instance, and QIDO-RS does not find it"


def _mllp(dest: Destination, readable, timeout_s: float) -> dict[int, str | None]:
    """HL7 v2 messages over one MLLP connection (python-hl7's asyncio client), each answered by its ACK."""
    import asyncio

    hl7 = require("hl7")
    mllp = require("hl7.mllp")

    from .hl7_report import ack_outcome

    out: dict[int, str | None] = {}

    async def run() -> None:
        try:
            reader, writer = await asyncio.wait_for(mllp.open_hl7_connection(dest.host, dest.port, encoding="utf-8"),
                                                    timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            for it, _ in readable:
                out[it.outbox_id] = f"MLLP connection to {dest.host}:{dest.port} failed: {type(exc).__name__}: {exc}"
            return
        try:
            for it, text in readable:
                try:
                    writer.writemessage(hl7.parse(text))
                    await writer.drain()
                    ack = await asyncio.wait_for(reader.readmessage(), timeout_s)
                except Exception as exc:  # this message failed; the stream is in an unknown state, so stop here
                    out[it.outbox_id] = (f"MLLP exchange with {dest.host}:{dest.port} broke off: "
                                         f"{type(exc).__name__}: {exc}")
                    break
                out[it.outbox_id] = ack_outcome(str(ack))
            for it, _ in readable:  # the ones after a broken exchange were not sent
                out.setdefault(it.outbox_id, "not sent: the MLLP connection broke off on an earlier message")
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    asyncio.run(run())
    return out


def permanent(reason: str | None) -> bool:
    """A failure no retry can fix (the object itself is unreadable): dead-lettered at once."""
    return bool(reason) and str(reason).startswith("PERMANENT:")

