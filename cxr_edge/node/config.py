"""The node's settings: a plain frozen dataclass (the CLI reads its defaults without pynetdicom installed)."""

from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

#: AE titles: up to 16 characters of the default repertoire, no backslash or control characters (PS3.5 6.2)
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")


def check_ae_title(title: str, what: str = "AE title") -> str:
    t = title.strip()
    if not t or not _AE_TITLE.match(title):
        raise ConfigError(f"{what} {title!r} is not a DICOM AE title (1-16 printable characters, no backslash)")
    return t


@dataclass(frozen=True)
class AllowedPeer:
    """One calling AE allowed to store here, optionally only from one address or network (``AE@10.0.0.0/24``)."""

    ae_title: str
    network: str | None = None

    @classmethod
    def parse(cls, text: str) -> AllowedPeer:
        ae, _, host = text.partition("@")
        ae = check_ae_title(ae, "allowed calling AE title")
        if not host:
            return cls(ae, None)
        try:
            return cls(ae, str(ipaddress.ip_network(host.strip(), strict=False)))
        except ValueError:
            pass
        try:  # a host name: resolved once, at start (the allowlist is about addresses, not names)
            addrs = {a[4][0] for a in socket.getaddrinfo(host.strip(), None)}
        except OSError as exc:
            raise ConfigError(f"allowed peer {text!r}: cannot resolve {host!r} ({exc}); give an IP address") from exc
        if len(addrs) != 1:
            raise ConfigError(f"allowed peer {text!r}: {host!r} resolves to {sorted(addrs)}; give one IP address")
        return cls(ae, str(ipaddress.ip_network(addrs.pop())))

    def admits(self, ae_title: str, address: str) -> bool:
        if ae_title.strip() != self.ae_title:
            return False
        if self.network is None:
            return True
        try:
            return ipaddress.ip_address(address) in ipaddress.ip_network(self.network)
        except ValueError:
            return False

    def __str__(self) -> str:
        return self.ae_title + (f"@{self.network}" if self.network else "")


@dataclass(frozen=True)
class TlsConfig:
    """DICOM over TLS (PS3.15 B.1): the node's certificate and key; with ``ca``, callers must present a
    certificate signed by it (mutual TLS)."""

    cert: Path
    key: Path
    ca: Path | None = None


@dataclass(frozen=True)
class NodeConfig:
    data_dir: Path
    store_url: str | None = None  # default: sqlite:///<data_dir>/jobs.sqlite
    ae_title: str = "CXREDGE"
    dicom_host: str = "0.0.0.0"
    dicom_port: int = 11112
    allowed: tuple[AllowedPeer, ...] = ()
    allow_any_caller: bool = False  # no allowlist: any calling AE from any address (a test bench, never a clinic)
    max_associations: int = 8
    tls: TlsConfig | None = None
    min_free_mb: float = 1024.0  # below this much free disk, new instances get "out of resources" (0xA700)
    max_instance_mb: float = 64.0  # also the decode byte limit (the HTTP body limit is raised to it)
    rules: Path | None = None
    stable_after_s: float = 10.0  # a study with no new instance for this long is complete
    keep_pixels: bool = False  # keep received instances after screening (default: delete them, keep results)
    lease_s: float = 300.0  # a claim older than this (a node died mid-screening) may be taken by another node
    shared_storage: bool = False  # instance files are on storage every node of the fleet reads (NFS...)
    node_id: str | None = None  # default: host name + AE title + port
    audit_patient_ids: bool = False  # record Patient ID in jobs and the audit trail (off: UIDs only)
    heatmaps: str = "all"  # all | flagged (COVID or borderline) | none: which results get a Grad-CAM overlay
    screen_concurrency: int = 64  # jobs screened at once (the batcher batches across them)
    stow_from: tuple[str, ...] = ("127.0.0.0/8", "::1/128")  # networks allowed to STOW-RS (no HTTP authentication)
    ack_timeout_s: float = 30.0  # decode + commit of one instance before the C-STORE answer
    # results back to the PACS: destinations (delivery.Destination), which objects (sr, sc, seg), and the retry policy
    destinations: tuple = ()
    dicom_objects: tuple[str, ...] = ("sr", "sc", "seg")
    send_attempts: int = 8  # then the object is dead-lettered (``--redeliver`` sends dead letters again)
    send_backoff_s: float = 2.0  # first retry after ~this (exponential, with as much jitter), capped at send_backoff_max_s
    send_backoff_max_s: float = 300.0
    send_timeout_s: float = 30.0  # one association or STOW-RS request
    send_batch: int = 8  # objects claimed per association / request
    send_concurrency: int = 4  # associations / requests at once (all destinations together)
    redeliver: bool = False  # at start, dead letters for the configured destinations are sent again

    @property
    def url(self) -> str:
        return self.store_url or f"sqlite:///{(Path(self.data_dir) / 'jobs.sqlite').resolve()}"

    @property
    def instance_dir(self) -> Path:
        return Path(self.data_dir) / "instances"

    @property
    def result_dir(self) -> Path:
        return Path(self.data_dir) / "results"

    @property
    def identity(self) -> str:
        return self.node_id or f"{socket.gethostname()}/{self.ae_title}:{self.dicom_port}"
