"""How fast a PACS takes the node's result objects over one association and over several at once.

    python benchmarks/pacs_ingest.py [--n 40] [--associations 1,2,4] [--out benchmarks/results/pacs_ingest]

The reason `--send-concurrency` exists: a PACS answers each C-STORE after its own commit, so one association
waits out that latency per instance. Real components only: Orthanc (Debian `orthanc`, started by
tests/orthanc_server.py on free ports), the node's own writer for the objects (a synthetic DX source, SR + SC + SEG
per image) and its own sender (`cxr_edge.node.delivery.send`, pynetdicom C-STORE), batches of 8 as the node sends.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _source(i: int):
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = f"1.2.826.0.1.99.{i}.3", f"1.2.826.0.1.99.{i}.1", \
        f"1.2.826.0.1.99.{i}.2"
    ds.PatientID, ds.PatientName, ds.Modality, ds.PatientOrientation = f"P{i}", "Test^Ingest", "DX", ["L", "F"]
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = "20260101", "120000", "", "", ""
    ds.PatientBirthDate, ds.PatientSex, ds.InstanceNumber, ds.SeriesNumber = "", "", 1, 1
    ds.Rows = ds.Columns = 512
    return ds


def make_objects(folder: Path, n: int) -> list[tuple[str, str]]:
    """(kind, path) of n images' SR, SC and SEG, made by the node's writer."""
    from cxr_edge.node import result_objects as ro

    model = {"artifact": "m.onnx", "recipe": "small_cnn", "version": "v1", "sha256": "ab" * 32, "precision": "int8",
             "backend": "onnxruntime", "provider": "CPUExecutionProvider", "threshold": 0.5, "operating_point": "x"}
    result = {"label": "COVID", "probabilities": {"COVID": 0.8, "Normal": 0.2}, "threshold": 0.5, "decision": {}}
    rng = np.random.default_rng(0)
    preview = rng.integers(0, 255, (512, 512), dtype=np.uint8)
    cam = np.outer(np.hanning(8), np.hanning(8)).astype(np.float32)
    out = []
    for i in range(n):
        for o in ro.build(_source(i), result, model, preview=preview, cam=cam):
            out.append((o.kind, str(o.write(folder, f"img{i}"))))
    return out


def run(n: int, associations: list[int], work: Path) -> dict:
    from orthanc_server import OrthancServer

    from cxr_edge.node.delivery import Destination, Item, send

    files = make_objects(work / "objects", n)
    rows = []
    for k in associations:
        pacs = OrthancServer(work / f"pacs{k}").start()  # fresh storage: every instance is new to it
        try:
            dest = Destination.parse(pacs.dicom_url)
            items = [Item(j, "", "", path) for j, (_, path) in enumerate(files)]
            batches = [items[i:i + 8] for i in range(0, len(items), 8)]
            failed: list[str] = []
            lock = threading.Lock()

            def worker(mine, dest=dest, lock=lock, failed=failed):
                for b in mine:
                    res = send(dest, b, calling_ae="CXREDGE", timeout_s=30)
                    with lock:
                        failed.extend(r for r in res if r is not None)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=worker, args=(batches[w::k],)) for w in range(k)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - t0
            held = pacs.count_instances()
        finally:
            pacs.stop(hard=True)
        rows.append({"associations": k, "objects": len(items), "seconds": round(seconds, 2),
                     "objects_per_s": round(len(items) / seconds, 1), "ms_per_object_per_association":
                     round(1e3 * seconds * k / len(items), 1), "held_by_pacs": held, "failed": len(failed)})
        print(rows[-1])
    return {"rows": rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=40, help="images (3 objects each)")
    p.add_argument("--associations", default="1,2,4")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "pacs_ingest")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cxr-pacs-ingest-"))
    try:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from node_delivery import _versions
        from node_durability import _machine

        doc = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": _machine(), "versions": _versions(),
               **run(a.n, [int(x) for x in a.associations.split(",")], work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    base = doc["rows"][0]["objects_per_s"]
    lines = [f"# Result objects into Orthanc: one association vs several ({doc['date']})", "",
             f"Command: `{doc['command']}`", "", f"Machine: {doc['machine']}", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()), "",
             "| associations at once | objects | s | objects/s | x one association | ms per object per association |"
             " held by Orthanc | failed |", "|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        lines.append(f"| {r['associations']} | {r['objects']} | {r['seconds']} | {r['objects_per_s']} | "
                     f"{r['objects_per_s'] / base:.2f} | {r['ms_per_object_per_association']} | {r['held_by_pacs']} | "
                     f"{r['failed']} |")
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["failed"] == 0 and r["held_by_pacs"] == r["objects"] for r in doc["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
