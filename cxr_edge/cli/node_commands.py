"""Commands of the DICOM node: node (Storage SCP + STOW-RS + job store + worker) and audit (query the trail)."""

from __future__ import annotations

import sys

from ._common import HelpFormatter, default_of, positive_float, positive_int
from .serve_commands import add_service_args, serve_config, transport_limits, warn_if_exposed


def node_config(a):
    from pathlib import Path

    from ..errors import ConfigError
    from ..node.config import AllowedPeer, NodeConfig, TlsConfig, check_ae_title

    if not a.allow and not a.allow_any_caller:
        raise ConfigError("no calling AE is allowed to store here: give --allow AE[@ADDRESS] for each X-ray room or "
                          "PACS (repeatable), or --allow-any-caller on a test bench")
    tls = None
    if a.tls_cert or a.tls_key:
        if not (a.tls_cert and a.tls_key):
            raise ConfigError("TLS needs both --tls-cert and --tls-key")
        for f in (a.tls_cert, a.tls_key, a.tls_ca):
            if f and not Path(f).is_file():
                raise ConfigError(f"TLS file {f} does not exist")
        tls = TlsConfig(Path(a.tls_cert), Path(a.tls_key), Path(a.tls_ca) if a.tls_ca else None)
    elif a.tls_ca:
        raise ConfigError("--tls-ca needs --tls-cert and --tls-key")
    from ..node.delivery import Destination
    from ..node.result_objects import parse_kinds

    destinations = tuple(Destination.parse(x) for x in a.send_to or ())
    if len({d.name for d in destinations}) != len(destinations):
        raise ConfigError("two --send-to destinations have the same name: name them NAME=URL")
    if a.redeliver and not destinations:
        raise ConfigError("--redeliver sends dead-lettered results again to the --send-to destinations: give them")
    kinds = parse_kinds(a.dicom_objects)
    if destinations and not kinds:
        raise ConfigError("--send-to needs at least one object kind in --dicom-objects (sr, sc, seg)")
    return NodeConfig(data_dir=Path(a.data), store_url=a.store, ae_title=check_ae_title(a.ae_title),
                      dicom_host=a.dicom_host, dicom_port=a.dicom_port,
                      allowed=tuple(AllowedPeer.parse(x) for x in a.allow or ()), allow_any_caller=a.allow_any_caller,
                      max_associations=a.max_associations, tls=tls, min_free_mb=a.min_free_mb,
                      max_instance_mb=a.max_instance_mb, rules=Path(a.rules) if a.rules else None,
                      stable_after_s=a.stable_after, keep_pixels=a.keep_pixels, lease_s=a.lease,
                      shared_storage=a.shared_storage, node_id=a.node_id, audit_patient_ids=a.audit_patient_ids,
                      screen_concurrency=a.screen_concurrency, heatmaps=a.heatmaps,
                      stow_from=tuple(a.stow_from or ("127.0.0.0/8", "::1/128")), destinations=destinations,
                      dicom_objects=kinds, send_attempts=a.send_attempts, send_backoff_s=a.send_backoff,
                      send_backoff_max_s=max(a.send_backoff, a.send_backoff_max), send_timeout_s=a.send_timeout,
                      send_concurrency=a.send_concurrency, redeliver=a.redeliver)


def cmd_node(a) -> None:
    from ..node.service import ScreeningNode
    from ..serve.http_guard import run_server
    from . import preflight

    preflight.port_free(a.host, a.port)
    cfg = node_config(a)
    preflight.port_free(cfg.dicom_host, cfg.dicom_port, "--dicom-port")
    warn_if_exposed(a.host)
    node = ScreeningNode(a.artifact, serve_config(a), cfg)
    node.open_store()  # before the engine loads: no audit trail, no node
    run_server(node.build_app(), a.host, a.port, limits=transport_limits(a), graceful_timeout_s=a.timeout)


def cmd_audit(a) -> None:
    import csv
    import json
    from pathlib import Path

    from ..node.config import NodeConfig
    from ..node.store import JobStore, parse_time

    url = a.store or NodeConfig(data_dir=Path(a.data)).url
    if not a.store and not (Path(a.data) / "jobs.sqlite").is_file():
        from ..errors import ConfigError

        raise ConfigError(f"no job store in {a.data} (jobs.sqlite); give the node's --workdir folder or --store URL")
    store = JobStore(url, "audit-reader")
    try:
        records = store.audit_records(study_uid=a.study, event=a.event, since=parse_time(a.since) if a.since else None,
                                      until=parse_time(a.until) if a.until else None, limit=a.limit)
    finally:
        store.close()
    import contextlib

    with (open(a.out, "w", newline="") if a.out else contextlib.nullcontext(sys.stdout)) as out:
        if a.format == "json":
            json.dump(records, out, indent=1)
            out.write("\n")
        else:
            keys = ("id", "at", "event", "node", "source", "study_uid", "series_uid", "sop_instance_uid", "job_id", "detail")
            w = csv.writer(out)
            w.writerow(keys)
            for r in records:
                w.writerow([json.dumps(r[k], sort_keys=True) if k == "detail" and r[k] is not None else r[k] for k in keys])
    if a.out:
        print(f"{len(records)} audit record(s) written to {a.out}", file=sys.stderr)


def register(sub) -> None:
    _add_node_parser(sub)
    _add_audit_parser(sub)


def _add_node_parser(sub) -> None:
    from ..node.config import NodeConfig

    N = NodeConfig
    nd = sub.add_parser("node", help="DICOM node: Storage SCP + STOW-RS in, durable job store, audit trail, screening",
                        formatter_class=HelpFormatter,
                        description="Receives studies by C-STORE (and STOW-RS on the HTTP port), screens every frontal "
                                    "chest radiograph once, keeps every job in a durable store and every action in an "
                                    "audit trail. See README 'Connect an X-ray room / PACS' and docs/dicom-conformance.md.")
    nd.add_argument("artifact", help="an artifact with its manifest")
    nd.add_argument("--workdir", "--data", dest="data", required=True, metavar="DIR",
                    help="the node's working folder: received instances, results, jobs.sqlite (--data: the older name; "
                         "elsewhere DATA means labelled images)")
    nd.add_argument("--store", help="job store URL: postgresql://USER@HOST:PORT/DB for a fleet sharing one store "
                                    "(default: sqlite under --data)")
    nd.add_argument("--ae-title", default=default_of(N, "ae_title"), help="the node's AE title")
    nd.add_argument("--dicom-host", default=default_of(N, "dicom_host"), help="DICOM bind address")
    nd.add_argument("--dicom-port", type=int, default=default_of(N, "dicom_port"), help="DICOM port (0: any free port)")
    nd.add_argument("--allow", action="append", metavar="AE[@ADDRESS]",
                    help="a calling AE allowed to store, optionally only from an address or network "
                         "(e.g. XRAY1@10.1.2.3, PACS@10.1.0.0/16); repeatable")
    nd.add_argument("--allow-any-caller", action="store_true", help="no allowlist (a test bench, never a clinic)")
    nd.add_argument("--max-associations", type=positive_int, default=default_of(N, "max_associations"),
                    help="simultaneous associations; more are rejected (local limit exceeded)")
    nd.add_argument("--tls-cert", help="PEM certificate: DICOM over TLS (PS3.15 B.1) on --dicom-port")
    nd.add_argument("--tls-key", help="PEM private key of --tls-cert")
    nd.add_argument("--tls-ca", help="PEM CA: callers must present a certificate it signed (mutual TLS)")
    nd.add_argument("--min-free-mb", type=positive_float, default=default_of(N, "min_free_mb"),
                    help="disk watermark: below this much free space new instances get 'out of resources' (A700)")
    nd.add_argument("--max-instance-mb", type=positive_float, default=default_of(N, "max_instance_mb"),
                    help="largest instance accepted")
    nd.add_argument("--rules", help="series selection rules (TOML; default: the built-in CXR rules, "
                                    "cxr_edge/node/default_rules.toml)")
    nd.add_argument("--stable-after", type=positive_float, default=default_of(N, "stable_after_s"),
                    help="seconds without a new instance after which a study is complete")
    nd.add_argument("--keep-pixels", action="store_true",
                    help="keep received instances after screening (default: delete them, keep the results)")
    nd.add_argument("--lease", type=positive_float, default=default_of(N, "lease_s"),
                    help="seconds after which a job claimed by a node that died may be screened by another")
    nd.add_argument("--shared-storage", action="store_true",
                    help="--data/instances is storage every node of the fleet reads: any node screens any job")
    nd.add_argument("--node-id", help="this node's name in the store and the audit trail (default: host/AE:port; "
                                      "keep it stable: a restarted node resumes the jobs claimed under its name)")
    nd.add_argument("--audit-patient-ids", action="store_true",
                    help="record Patient ID in jobs and audit records (default: study/series/instance UIDs only)")
    nd.add_argument("--heatmaps", choices=("all", "flagged", "none"), default=default_of(N, "heatmaps"),
                    help="which results get a Grad-CAM overlay: all, flagged (COVID or borderline: a third of the "
                         "screening cost on a mostly negative worklist) or none")
    nd.add_argument("--screen-concurrency", type=positive_int, default=default_of(N, "screen_concurrency"),
                    help="jobs screened at once (the dynamic batcher batches across them)")
    nd.add_argument("--stow-from", action="append", metavar="NETWORK",
                    help="networks allowed to POST /studies (STOW-RS; default: localhost only); repeatable")
    out = nd.add_argument_group("results back to the PACS (TID 1500 report, heatmap SC, map SEG; docs/dicom-conformance.md)")
    out.add_argument("--send-to", action="append", metavar="[NAME=]URL",
                     help="deliver result objects here: dicom://CALLED_AE@HOST:PORT (C-STORE, calling AE = --ae-title) "
                          "or http(s)://HOST:PORT/DICOMWEB-ROOT (STOW-RS); repeatable. NAME keeps a destination's "
                          "outbox when its address is corrected (default: host:port)")
    out.add_argument("--dicom-objects", default="sr,sc,seg", metavar="KINDS",
                     help="which objects each screened image gives: sr (the report), sc (captioned heatmap), seg (the "
                          "raw map); SC and SEG only for results with a heatmap (see --heatmaps)")
    out.add_argument("--send-attempts", type=positive_int, default=default_of(N, "send_attempts"),
                     help="attempts per object before it is dead-lettered")
    out.add_argument("--send-backoff", type=positive_float, default=default_of(N, "send_backoff_s"),
                     help="seconds before the first retry; doubles each attempt, with as much jitter")
    out.add_argument("--send-backoff-max", type=positive_float, default=default_of(N, "send_backoff_max_s"),
                     help="longest wait between attempts, in seconds")
    out.add_argument("--send-timeout", type=positive_float, default=default_of(N, "send_timeout_s"),
                     help="seconds for one association or STOW-RS request")
    out.add_argument("--send-concurrency", type=positive_int, default=default_of(N, "send_concurrency"),
                     help="associations / STOW-RS requests at once (a PACS answers each instance after its own commit, "
                          "so several at once deliver several times faster)")
    out.add_argument("--redeliver", action="store_true",
                     help="at start, send dead-lettered objects again (after fixing a destination), then run as usual")
    nd.add_argument("--host", default="127.0.0.1", help="HTTP bind address (kiosk, STOW-RS, /v1/jobs, /metrics)")
    nd.add_argument("--port", type=int, default=8000, help="HTTP port")
    add_service_args(nd)
    nd.set_defaults(func=cmd_node)


def _add_audit_parser(sub) -> None:
    au = sub.add_parser("audit", help="query and export a node's audit trail (CSV or JSON)", formatter_class=HelpFormatter)
    src = au.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", "--data", dest="data", metavar="DIR", help="the node's working folder (its jobs.sqlite)")
    src.add_argument("--store", help="job store URL (postgresql://...)")
    au.add_argument("--study", help="only this StudyInstanceUID")
    au.add_argument("--event", help="only this event (received, skipped, refused, duplicate, screened, failed, "
                                    "study_complete, association_rejected, node_started, ...)")
    au.add_argument("--since", help="from this time (ISO 8601, UTC unless an offset is given)")
    au.add_argument("--until", help="before this time (ISO 8601)")
    au.add_argument("--limit", type=positive_int, help="at most this many records (oldest first)")
    au.add_argument("--format", choices=("csv", "json"), default="csv", help="output format")
    au.add_argument("--out", help="write here instead of standard output")
    au.set_defaults(func=cmd_audit)



