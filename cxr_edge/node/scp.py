"""The DICOM Storage SCP (pynetdicom): C-ECHO, C-STORE into the one intake path, the association policy.

Policy, in the order an association meets it: TLS (optional, mutual with a CA), the cap on simultaneous
associations (pynetdicom answers "local limit exceeded"), the calling-AE allowlist (AE title and address;
"calling AE title not recognised" otherwise), then per instance the intake's statuses.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from ..extras import require
from .config import NodeConfig, TlsConfig
from .intake import SUCCESS, Intake, Sender

log = logging.getLogger("cxr_edge.node")

#: Storage SOP classes accepted. Images: CR, DX for presentation and for processing, Secondary Capture (and its
#: multi-frame forms, so a multi-frame object is recorded as skipped rather than refused at negotiation).
#: Non-images a modality or PACS sends along with a study (reports, presentation states, key objects) are
#: accepted so they are recorded as skipped, not bounced back to the sender as failures.
STORAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "Computed Radiography Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection Document Storage",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State Storage",
}

#: transfer syntaxes accepted, all decoded by pydicom with the pylibjpeg plugins (docs/dicom-conformance.md)
TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2": "Implicit VR Little Endian",
    "1.2.840.10008.1.2.1": "Explicit VR Little Endian",
    "1.2.840.10008.1.2.1.99": "Deflated Explicit VR Little Endian",
    "1.2.840.10008.1.2.4.50": "JPEG Baseline (Process 1)",
    "1.2.840.10008.1.2.4.51": "JPEG Extended (Process 2 & 4)",
    "1.2.840.10008.1.2.4.57": "JPEG Lossless, Non-Hierarchical (Process 14)",
    "1.2.840.10008.1.2.4.70": "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
    "1.2.840.10008.1.2.4.80": "JPEG-LS Lossless Image Compression",
    "1.2.840.10008.1.2.4.81": "JPEG-LS Lossy (Near-Lossless) Image Compression",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Image Compression (Lossless Only)",
    "1.2.840.10008.1.2.4.91": "JPEG 2000 Image Compression",
    "1.2.840.10008.1.2.5": "RLE Lossless",
}
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"
#: the largest P-DATA PDU the node asks peers to send: fewer PDUs per image than pynetdicom's 16 kB default
MAX_PDU = 256 * 1024


def ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server-side TLS context (TLS 1.2 or later; with a CA, callers must present a certificate it signed)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    if tls.ca is not None:
        ctx.load_verify_locations(str(tls.ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class StorageSCP:
    """A running Storage SCP: its own threads (one per association), feeding ``intake``."""

    def __init__(self, config: NodeConfig, intake: Intake, store, metrics):
        self.config, self.intake, self.store, self.metrics = config, intake, store, metrics
        self.server: Any = None

    def _requested(self, event) -> None:
        """EVT_REQUESTED: the allowlist (AE title and address), before any presentation context is accepted."""
        requestor = event.assoc.requestor
        primitive = requestor.primitive  # the A-ASSOCIATE-RQ: negotiation has not copied its titles yet
        ae, address = str(getattr(primitive, "calling_ae_title", "") or "").strip(), str(requestor.address)
        if self.config.allow_any_caller or any(p.admits(ae, address) for p in self.config.allowed):
            return  # pynetdicom's own checks follow (called AE title, association limit, contexts)
        self.metrics.associations.labels("rejected").inc()
        log.warning("rejected an association from %s@%s: calling AE title not on the allowlist", ae, address)
        try:
            self.store.record("association_rejected", source=f"{ae}@{address}",
                              detail={"reason": "calling AE title / address not on the allowlist"})
        except Exception as exc:
            log.error("could not record a rejected association: %s", exc)
        event.assoc.acse.send_reject(0x01, 0x01, 0x03)  # rejected permanent, service user, calling AE not recognised
        # as pynetdicom's own rejections do: kill() lets the DUL send the A-ASSOCIATE-RJ before the socket closes
        # (without it the caller saw the connection drop, "peer aborted", instead of a rejection it can report)
        event.assoc.kill()

    def _accepted(self, event) -> None:
        self.metrics.associations.labels("accepted").inc()

    def _rejected(self, event) -> None:
        """pynetdicom's own rejections (called AE title, association limit): counted and recorded like ours."""
        self.metrics.associations.labels("rejected").inc()
        requestor = event.assoc.requestor
        primitive = event.assoc.acceptor.primitive
        reasons: dict[tuple, str] = {(0x01, 0x07): "called AE title not recognised",
                                     (0x03, 0x02): "local limit of associations exceeded"}
        why = reasons.get((getattr(primitive, "result_source", None), getattr(primitive, "diagnostic", None)), "rejected")
        title = str(getattr(requestor.primitive, "calling_ae_title", "") or "").strip()
        try:
            self.store.record("association_rejected", source=f"{title}@{requestor.address}", detail={"reason": why})
        except Exception as exc:
            log.error("could not record a rejected association: %s", exc)

    def _echo(self, event) -> int:
        self.metrics.echoes.inc()
        return SUCCESS

    def _store(self, event):
        """EVT_C_STORE: the intake answers; a failure carries its reason as the Error Comment (64 characters)."""
        from pydicom.dataset import Dataset

        requestor = event.assoc.requestor
        sender = Sender("dicom", str(requestor.address), str(requestor.ae_title).strip())
        try:
            data = event.encoded_dataset(include_meta=True)
            rq = event.request
            outcome = self.intake.receive(data, sender, str(rq.AffectedSOPInstanceUID or "") or None,
                                          str(rq.AffectedSOPClassUID or "") or None)
        except Exception as exc:  # never let one instance take the association (or the node) down
            log.exception("C-STORE from %s failed", sender.label)
            status = Dataset()
            status.Status = 0xA700
            status.ErrorComment = f"node error: {type(exc).__name__}"[:64]
            return status
        if outcome.accepted:
            return SUCCESS
        status = Dataset()
        status.Status = outcome.status
        status.ErrorComment = (outcome.reason or "refused")[:64]
        return status

    def start(self) -> StorageSCP:
        pynetdicom = require("pynetdicom")
        from pynetdicom import AE, evt

        ae = AE(ae_title=self.config.ae_title)
        ae.maximum_associations = self.config.max_associations
        ae.maximum_pdu_size = MAX_PDU
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        ae.require_called_aet = True  # a misaddressed sender learns so at once, not after sending a study
        ts = list(TRANSFER_SYNTAXES)
        for uid in STORAGE_SOP_CLASSES:
            ae.add_supported_context(uid, ts)
        ae.add_supported_context(VERIFICATION_SOP_CLASS, ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"])
        handlers: list[Any] = [(evt.EVT_REQUESTED, self._requested), (evt.EVT_ACCEPTED, self._accepted),
                               (evt.EVT_REJECTED, self._rejected), (evt.EVT_C_ECHO, self._echo),
                               (evt.EVT_C_STORE, self._store)]
        ctx = ssl_context(self.config.tls) if self.config.tls else None
        self.server = ae.start_server((self.config.dicom_host, self.config.dicom_port), block=False,
                                      evt_handlers=handlers, ssl_context=ctx)
        log.info("DICOM Storage SCP %s listening on %s:%d%s (pynetdicom %s)", self.config.ae_title, self.config.dicom_host,
                 self.port, " with TLS" if ctx else "", pynetdicom.__version__)
        return self

    @property
    def port(self) -> int:
        return int(self.server.server_address[1]) if self.server is not None else self.config.dicom_port

    def stop(self) -> None:
        """No new associations; those in progress end (an instance not yet committed gets no success)."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None
