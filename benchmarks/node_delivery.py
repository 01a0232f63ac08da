"""Results into a real PACS exactly once: `cxr-edge node` delivering to Orthanc through outages and SIGKILLs.

    python benchmarks/node_delivery.py [--studies 500] [--kills 3] [--pacs-restarts 2] [--outage-studies 100]
                                       [--seed 0] [--artifact PATH] [--out benchmarks/results/node_delivery]
                                       [--scenarios outage,steady,soak,overload] [--rate 3]

Only real components: the node is its own process group (`python -m cxr_edge.cli node --send-to ...`), DCMTK's
`/usr/bin/storescu` is the X-ray room, Orthanc (Debian's `orthanc` + `orthanc-dicomweb`, started by
tests/orthanc_server.py on free ports with its own storage) is the PACS. Test instances come from
tests/dicom_studies.py (one frontal DX per study), written under a temporary folder, never in the repository.

Scenarios (each returns a dict of counts with a list of `problems`; a pytest test asserts on it):

* outage: Orthanc is down while `n` studies are sent and screened; every result object waits in the outbox
  (retrying with backoff); Orthanc starts; every object must arrive exactly once.
* steady: the soak's load (`--rate` studies/s) without kills or restarts (the baseline for its latency).
* overload: the same studies sent as fast as the node acknowledges them: the node's capacity with every result
  sent on, and the queue (and latency) an arrival rate above it builds.
* soak: `n` studies sent in chunks while the node is killed with SIGKILL at random moments (`kills` times, each
  restarted at once with the same --data and --node-id) and Orthanc is restarted `pacs_restarts` times; what the
  room saw no success for is sent again. At the end every acknowledged study must have exactly its expected objects
  in Orthanc (its report, and its heatmap SC and map SEG when it was flagged), none twice, none dead-lettered; and
  the study-to-result-in-PACS latency (instance committed at the node -> its report held by Orthanc) p50/p99.

"Exactly once" is checked in Orthanc itself: per study, the number of SR / SC / SEG instances it holds equals what
the node's outbox says it made for that study. Orthanc keeps one copy of a SOP Instance UID sent twice; a second copy
can only appear if a resend had a *different* UID, which is what the result objects' derived UIDs prevent.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from node_durability import (
    REPO,
    Node,
    Send,
    Sqlite,
    _machine,
    _tests_on_path,
    _wait_drained,
    make_test_files,
    tiny_artifact,
)

#: modality of each object kind in Orthanc's series tags
MODALITY = {"sr": "SR", "sc": "OT", "seg": "SEG"}


def _pacs(folder: Path):
    _tests_on_path()
    from orthanc_server import DICOMWEB_PLUGIN, ORTHANC, OrthancServer

    if not ORTHANC or not DICOMWEB_PLUGIN:
        raise RuntimeError("Orthanc and its DICOMweb plugin are needed (Debian: orthanc, orthanc-dicomweb)")
    return OrthancServer(folder)


def _delivering_node(artifact: Path, data: Path, node_id: str, pacs, log_dir: Path, *, stow: bool = False) -> Node:
    node = Node(artifact, data, node_id, log_dir=log_dir, stable_after=1.0)
    url = pacs.stow_url if stow else pacs.dicom_url
    # retries every 0.5-4 s for as long as an outage lasts here (a site sets hours); a heatmap for every result, so
    # every image gives all three objects (SR, SC, SEG) and each kind is checked
    node.cmd += ["--send-to", f"pacs={url}", "--send-backoff", "0.5", "--send-backoff-max", "4", "--send-attempts",
                 "500", "--heatmaps", "all"]
    return node


def _outbox(db) -> dict[str, int]:
    got = {s: int(n) for s, n in db.query("SELECT state, COUNT(*) FROM outbox GROUP BY state")}
    return {s: got.get(s, 0) for s in ("pending", "sending", "delivered", "dead")}


def _wait_outbox_settled(db, timeout_s: float, alive: Callable[[], bool] = lambda: True) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if not alive():
            raise RuntimeError("the node died while its outbox drained")
        c = _outbox(db)
        if c["pending"] == 0 and c["sending"] == 0 and c["delivered"] + c["dead"] > 0:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise RuntimeError(f"outbox not settled after {timeout_s:.0f} s: {_outbox(db)}")


def _expected(db) -> dict[str, dict[str, int]]:
    """Per study, the objects the node made (the outbox rows of its one destination), by kind."""
    out: dict[str, dict[str, int]] = {}
    for study, kind, n in db.query("SELECT study_uid, kind, COUNT(*) FROM outbox GROUP BY study_uid, kind"):
        out.setdefault(study, {})[kind] = int(n)
    return out


def _held(pacs, study_uid: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for inst in pacs.instances_of_study(study_uid):
        counts[inst["modality"]] = counts.get(inst["modality"], 0) + 1
    return counts


def _check_pacs(db, pacs, acked_studies: set[str]) -> dict[str, Any]:
    """Lost / duplicated / dead objects, counted in Orthanc against the outbox, and acknowledged studies with no
    report at all."""
    expected = _expected(db)
    lost = duplicated = 0
    examples: list[str] = []
    for study, kinds in expected.items():
        held = _held(pacs, study)
        for kind, n in kinds.items():
            have = held.get(MODALITY[kind], 0)
            if have < n:
                lost += n - have
                examples.append(f"{study}: {kind} {have}/{n}")
            elif have > n:
                duplicated += have - n
                examples.append(f"{study}: {kind} {have} copies, {n} made")
    no_report = sorted(s for s in acked_studies if "sr" not in expected.get(s, {}))
    return {"objects_made": sum(sum(k.values()) for k in expected.values()), "objects_lost": lost,
            "objects_duplicated": duplicated, "dead_letters": _outbox(db)["dead"],
            "studies_without_a_report": len(no_report), "examples": examples[:10] + no_report[:5]}


def _latency(db) -> dict[str, Any]:
    """Instance committed at the node (job received_at) -> its report held by the PACS (outbox delivered_at), and
    its two parts: waiting for and being screened (-> screened_at, objects written) and delivery (-> delivered_at);
    with the arrival and report rates, which say which side was the bottleneck."""
    rows = db.query("""SELECT j.received_at, j.screened_at, o.delivered_at FROM outbox o JOIN jobs j ON j.id = o.job_id
                       WHERE o.kind = 'sr' AND o.state = 'delivered'""")
    if not rows:
        return {"p50_s": None, "p99_s": None, "max_s": None, "n": 0}
    a = np.array(rows, float)
    total, screen, send = a[:, 2] - a[:, 0], a[:, 1] - a[:, 0], a[:, 2] - a[:, 1]

    def pct(v):
        return {"p50_s": round(float(np.percentile(v, 50)), 3), "p99_s": round(float(np.percentile(v, 99)), 3)}

    span = lambda col: max(1e-9, float(a[:, col].max() - a[:, col].min()))
    return {**pct(total), "max_s": round(float(total.max()), 3), "n": int(len(a)),
            "received_to_screened": pct(screen), "screened_to_report_in_pacs": pct(send),
            "arrivals_per_s": round(len(a) / span(0), 2), "screened_per_s": round(len(a) / span(1), 2),
            "reports_delivered_per_s": round(len(a) / span(2), 2)}


def _problems(check: dict[str, Any], extra: dict[str, int]) -> list[str]:
    keys = ("objects_lost", "objects_duplicated", "dead_letters", "studies_without_a_report")
    return [f"{k}={check[k]}" for k in keys if check[k]] + [f"{k}={v}" for k, v in extra.items() if v]


# --------------------------------------------------------------------------------------------- scenario 1: outage
def outage(n: int = 100, *, seed: int = 0, artifact: Path | None = None, work: Path | None = None, stow: bool = False,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """The PACS is down while `n` studies are screened; it comes back; every object arrives once."""
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="cxr-delivery-outage-")) if work is None else work
    pacs = node = None
    try:
        artifact = artifact or tiny_artifact(work / "artifact")
        files = make_test_files(work / "dicom", n, seed)
        study_of = _study_of(files)
        pacs = _pacs(work / "pacs")  # configured (ports known), not started: the outage
        data = work / "outage-data"
        node = _delivering_node(artifact, data, "outage-node", pacs, work, stow=stow)
        db = Sqlite(data)
        node.start()
        s = Send(sorted(files), node.dicom_port, work / "storescu.outage.log").start().wait()
        alive = lambda: node.proc is not None and node.proc.poll() is None
        _wait_drained(db, len(files), alive=alive)
        time.sleep(3.0)  # a few retry rounds against the closed port
        during = _outbox(db)
        failed_attempts = int(db.query("SELECT COUNT(*) FROM audit WHERE event = 'delivery_failed'")[0][0])
        log(f"outage: {len(s.acked)} acknowledged, screened; outbox during the outage {during}, "
            f"{failed_attempts} failed attempts")
        t0 = time.monotonic()
        pacs.start()
        settle_s = _wait_outbox_settled(db, 600, alive)
        check = _check_pacs(db, pacs, {study_of[f] for f in s.acked})
        out = {"scenario": "outage", "transport": "STOW-RS" if stow else "C-STORE", "studies": n,
               "acknowledged": len(s.acked), "outbox_during_outage": during,
               "failed_attempts_during_outage": failed_attempts,
               "pacs_back_to_all_delivered_s": round(time.monotonic() - t0, 2), "settle_s": round(settle_s, 2),
               **check}
        out["problems"] = _problems(check, {"not_acknowledged": n - len(s.acked),
                                            "delivered_during_outage": during["delivered"]})
        return out
    finally:
        _tear_down(node, pacs, work if own else None)


def _tear_down(node: Node | None, pacs, work: Path | None) -> None:
    """Stop the node and the PACS, and remove the scenario's own work folder (None: the caller's, kept)."""
    if node is not None:
        node.stop()
    if pacs is not None:
        pacs.stop(hard=True)
    if work is not None:
        shutil.rmtree(work, ignore_errors=True)


def _study_of(files: dict[Path, str]) -> dict[Path, str]:
    import pydicom

    return {f: str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}


# ----------------------------------------------------------------------------------------------- scenario 2: soak
def soak(n: int = 500, kills: int = 3, pacs_restarts: int = 2, *, seed: int = 0, artifact: Path | None = None,
         work: Path | None = None, chunk: int = 25, rate: float | None = None,
         log: Callable[[str], None] = print) -> dict[str, Any]:
    """`n` studies in chunks; the node SIGKILLed `kills` times at random acknowledgements (restarted at once), the
    PACS restarted `pacs_restarts` times at random moments; unacknowledged studies sent again. Exactly once?
    ``rate``: studies per second offered (chunks paced to it); None sends as fast as the node acknowledges."""
    rng = random.Random(seed)
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="cxr-delivery-soak-")) if work is None else work
    pacs = node = None
    try:
        artifact = artifact or tiny_artifact(work / "artifact")
        files = make_test_files(work / "dicom", n, seed)
        study_of = _study_of(files)
        order = sorted(files)
        pacs = _pacs(work / "pacs").start()
        data = work / "soak-data"
        node = _delivering_node(artifact, data, "soak-node", pacs, work)
        db = Sqlite(data)
        node.start()
        kill_at = sorted(rng.sample(range(n // 10, (9 * n) // 10), kills))  # after this many acknowledged studies
        restart_at = sorted(rng.sample(range(n // 5, (4 * n) // 5), pacs_restarts))
        acked: set[Path] = set()
        events: list[dict[str, Any]] = []
        lock = threading.Lock()
        t_start = time.monotonic()

        def chaos(total: int) -> None:  # called on each acknowledgement, from the sender's reader thread
            with lock:
                if kill_at and total >= kill_at[0]:
                    kill_at.pop(0)
                    time.sleep(rng.uniform(0.0, 0.2))  # somewhere in screening, committing or sending
                    node.kill9()
                    events.append({"event": "node SIGKILL", "after_acks": total,
                                   "outbox": _outbox(db), "t_s": round(time.monotonic() - t_start, 2)})
                    threading.Thread(target=node.start, daemon=True).start()  # restarted at once, like systemd
                if restart_at and total >= restart_at[0] and pacs.proc is not None:  # (not while it is down)
                    restart_at.pop(0)
                    pacs.stop()
                    events.append({"event": "PACS restart", "after_acks": total, "t_s": round(time.monotonic() - t_start, 2)})
                    threading.Timer(rng.uniform(2.0, 6.0), pacs.start).start()  # down for a few seconds

        rounds = 0
        while len(acked) < n and rounds < 50:
            rounds += 1
            todo = [f for f in order if f not in acked]
            for k in range(0, len(todo), chunk):
                batch = todo[k:k + chunk]
                deadline = time.monotonic() + 180
                while not (node.proc is not None and node.proc.poll() is None and _ready(node)):
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"the node did not come back:\n{node.log_tail()}")
                    time.sleep(0.2)
                base = len(acked)
                s = Send(batch, node.dicom_port, work / f"storescu.soak{rounds}.log",
                         on_ack=lambda c, base=base: chaos(base + c)).start().wait()
                acked |= set(s.acked)
                if rate:  # paced: the next chunk when the offered rate says so
                    time.sleep(max(0.0, t_start + len(acked) / rate - time.monotonic()))
                else:
                    time.sleep(rng.uniform(0.0, 0.3))
        t_sent = time.monotonic() - t_start
        deadline = time.monotonic() + 180
        while not _ready(node):  # a kill may have come with the last acknowledgement
            if time.monotonic() > deadline:
                raise RuntimeError(f"the node did not come back:\n{node.log_tail()}")
            time.sleep(0.2)
        while pacs.proc is None:
            time.sleep(0.2)
        alive = lambda: node.proc is not None and node.proc.poll() is None
        _wait_drained(db, n, alive=alive)
        settle = _wait_outbox_settled(db, 900, alive)
        check = _check_pacs(db, pacs, {study_of[f] for f in acked})
        resent = int(db.query("SELECT COUNT(*) FROM audit WHERE event = 'delivery_failed'")[0][0])
        out = {"scenario": "soak", "studies": n, "offered_rate_per_s": rate, "acknowledged": len(acked),
               "send_rounds": rounds,
               "node_kills": sum(e["event"] == "node SIGKILL" for e in events),
               "pacs_restarts": sum(e["event"] == "PACS restart" for e in events), "events": events,
               "failed_delivery_attempts": resent, "node_processes_alive_after_sigkill": node.leftovers,
               "sent_s": round(t_sent, 2), "settle_after_last_send_s": round(settle, 2),
               "study_to_report_in_pacs": _latency(db), **check,
               "latencies_s": [round(r[0], 3) for r in db.query(
                   """SELECT o.delivered_at - j.received_at FROM outbox o JOIN jobs j ON j.id = o.job_id
                      WHERE o.kind = 'sr' AND o.state = 'delivered' ORDER BY j.id""")]}
        out["problems"] = _problems(check, {"not_acknowledged": n - len(acked),
                                            "node_processes_alive_after_sigkill": node.leftovers})
        return out
    finally:
        _tear_down(node, pacs, work if own else None)


def _ready(node: Node) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.http_port}/readyz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------------ report
def write_report(out: Path, doc: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# Results into Orthanc exactly once ({doc['date']})", "", f"Command: `{doc['command']}`", "",
             f"Machine: {doc['machine']}", "", "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()), ""]
    for r in doc["scenarios"]:
        lines += [f"## {r['scenario']}", ""]
        if r["scenario"] == "outage":
            lines += [f"- {r['studies']} studies sent and screened with the PACS down ({r['transport']}); outbox during "
                      f"the outage: {r['outbox_during_outage']}; {r['failed_attempts_during_outage']} failed attempts",
                      f"- PACS back -> every object delivered in {r['pacs_back_to_all_delivered_s']} s"]
        else:  # steady and soak
            lat = r["study_to_report_in_pacs"]
            offered = f"offered at {r['offered_rate_per_s']}/s" if r.get("offered_rate_per_s") else "sent flat out"
            lines += [f"- {r['studies']} studies {offered}, {r['node_kills']} node SIGKILLs, {r['pacs_restarts']} PACS restarts, "
                      f"{r['send_rounds']} send rounds; {r['failed_delivery_attempts']} failed delivery attempts retried",
                      f"- study -> report in the PACS: p50 {lat['p50_s']} s, p99 {lat['p99_s']} s, max {lat['max_s']} s "
                      f"(n={lat['n']}); of which received -> screened p50 {lat['received_to_screened']['p50_s']} s / "
                      f"p99 {lat['received_to_screened']['p99_s']} s, screened -> report in the PACS p50 "
                      f"{lat['screened_to_report_in_pacs']['p50_s']} s / p99 {lat['screened_to_report_in_pacs']['p99_s']} s",
                      f"- rates over the run: {lat['arrivals_per_s']} studies/s arrived, {lat['screened_per_s']}/s "
                      f"screened, {lat['reports_delivered_per_s']}/s reports delivered (3 objects per study)"]
            for e in r["events"]:
                lines.append(f"  - {e['t_s']} s, after {e['after_acks']} acknowledged: {e['event']}")
        lines += [f"- objects made {r['objects_made']}: lost {r['objects_lost']}, duplicated {r['objects_duplicated']}, "
                  f"dead letters {r['dead_letters']}, acknowledged studies without a report {r['studies_without_a_report']}",
                  f"- problems: {r['problems'] or 'none'}", ""]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        runs = [r for r in doc["scenarios"] if r.get("latencies_s")]
        if runs:
            fig, ax = plt.subplots(figsize=(6.5, 3.5))
            bins = np.linspace(0, max(max(r["latencies_s"]) for r in runs), 80)
            for r in runs:
                ax.hist(r["latencies_s"], bins=bins, histtype="step", linewidth=1.6,
                        label=f"{r['scenario']}: {r['node_kills']} kills, {r['pacs_restarts']} PACS restarts")
            ax.set_xlabel("instance committed at the node -> its report held by Orthanc (s)")
            ax.set_ylabel("studies")
            ax.legend()
            fig.tight_layout()
            fig.savefig(out / "latency.png", dpi=120)
            plt.close(fig)
    except ImportError:
        pass


def _versions() -> dict[str, str]:
    import subprocess

    import highdicom
    import pydicom
    import pynetdicom

    orthanc = subprocess.run(["/usr/sbin/Orthanc", "--version"], capture_output=True, text=True).stdout.splitlines()
    return {"python": platform.python_version(), "pydicom": pydicom.__version__, "pynetdicom": pynetdicom.__version__,
            "highdicom": highdicom.__version__, "orthanc": orthanc[0] if orthanc else "?"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--studies", type=int, default=500)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--pacs-restarts", type=int, default=2)
    p.add_argument("--outage-studies", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--artifact", type=Path)
    p.add_argument("--scenarios", default="outage,steady,soak,overload")
    p.add_argument("--rate", type=float, default=3.0,
                   help="studies/s offered in steady and soak (below the node's capacity here; overload sends flat out)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "node_delivery")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cxr-delivery-"))
    try:
        artifact = a.artifact or tiny_artifact(work / "artifact")
        doc: dict[str, Any] = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               "machine": _machine(), "versions": _versions(), "artifact": str(artifact.name),
                               "scenarios": []}
        wanted = a.scenarios.split(",")
        if "outage" in wanted:
            doc["scenarios"].append(outage(a.outage_studies, seed=a.seed, artifact=artifact, work=work / "outage"))
        if "steady" in wanted:  # the same load without kills or restarts: what the chaos costs, and what it does not
            r = soak(a.studies, 0, 0, seed=a.seed, artifact=artifact, work=work / "steady", rate=a.rate)
            r["scenario"] = "steady"
            doc["scenarios"].append(r)
        if "soak" in wanted:
            r = soak(a.studies, a.kills, a.pacs_restarts, seed=a.seed, artifact=artifact, work=work / "soak",
                     rate=a.rate)
            doc["scenarios"].append(r)
        if "overload" in wanted:  # as fast as the room can send: the node's capacity, and the queue it builds
            r = soak(a.studies, 0, 0, seed=a.seed, artifact=artifact, work=work / "overload")
            r["scenario"] = "overload"
            doc["scenarios"].append(r)
        write_report(a.out, doc)
        print((a.out / "results.md").read_text())
        return 1 if any(r["problems"] for r in doc["scenarios"]) else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
