"""Commands that run artifacts: calibrate, predict, tune, doctor (bench has its own module)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ExitCode
from ..precision import CPU_HINT_PRECISIONS, Precision
from ._common import (
    HelpFormatter,
    add_engine_args,
    fraction,
    positive_float,
    positive_int,
)

OPENVINO_PRECISIONS = CPU_HINT_PRECISIONS  # the inference-precision hints predict passes


def expand_images(paths) -> list[Path]:
    """Files as given; directories expanded to the image files under them (any depth, sorted)."""
    from ..data.layout import IMAGE_SUFFIXES

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            # every entry with an image name, whatever it is: a FIFO or a link to /dev/zero gets its own error
            # line from the decoder ("not a regular file") instead of vanishing from the results
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and not f.is_dir())
        else:
            out.append(p)  # files of any name: the decoder judges by content and reports per item
    return out


def printable(text: object) -> str:
    """One line of text whatever a file name holds: control characters (a newline in a name forged a
    result line) and other non-printables are shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def predict_header(info, threshold: float | None, operating_point: str | None, band: float) -> str:
    """What decides the labels below, said once: the threshold, how it was chosen, the borderline band."""
    where = f"# {info.backend} / {info.provider} / {info.precision}"
    if info.self_check is not None:
        where += f"\n# {info.self_check.text()}"
        if info.self_check.failed:
            where += "\n# SELF-CHECK FAILED: results below are marked UNCHECKED (run with --self-check warn)"
    if threshold is None:
        return f"{where}; no COVID threshold: each label is the most probable class"
    op = f" ({operating_point})" if operating_point else ""
    return (f"{where}\n# COVID when p(COVID) >= {threshold:.2f}{op}, even when another class is more probable; "
            f"otherwise the most probable other class. BORDERLINE: within {band:.2f} of the threshold.")


def result_line(r) -> str:
    """One human-readable line per image: the label, the probabilities, why, and where its heatmap is."""
    if not r.ok:
        return f"ERROR  {printable(r.source)}: {printable(r.error)}"
    probs = "  ".join(f"{c} {p:.2f}" for c, p in r.probabilities.items())
    why = ""
    if r.decision and r.decision.rule == "threshold":
        d = r.decision
        why = f"  [p(COVID) {d.covid_probability:.2f} {'>=' if d.margin >= 0 else '<'} {d.threshold:.2f}" + \
              (" BORDERLINE]" if d.borderline else "]")
    extra = f"  heatmap {printable(r.explanation.files.get('overlay', ''))}" if r.explanation else ""
    if r.self_check and r.self_check["status"] == "failed":
        extra += "  UNCHECKED (engine failed its self-check)"
    return f"{r.label:16s} {probs}{why}  ({r.timings_ms['infer']:.1f} ms)  {printable(r.source)}{extra}"


def cmd_predict(a) -> int:
    from ..errors import InputError
    from ..runtime import Screener
    from .predict_stream import ResultStream

    items = expand_images(a.images)
    if not items:
        raise InputError("images", "no image files found in the files or directories given")
    device = "cuda" if a.require_gpu else a.device
    graphs: dict[str, Any] = {"cuda_graph": True} if a.cuda_graph else {}  # passed only when asked for
    if a.dicom_out:
        from ..node.result_objects import parse_kinds

        kinds = parse_kinds(a.dicom_objects)
    explain = a.explain or bool(a.dicom_out and {"sc", "seg"} & set(kinds))
    with Screener(a.artifact, backend=a.backend, device=device, batch_size=a.batch_size,
                  threshold=a.threshold, precision=a.precision, trusted_keys=a.trusted_key,
                  allow_failed_gate=a.allow_failed_gate, preprocess=a.preprocess, tuning=a.tuning,
                  self_check=a.self_check, **graphs) as s:
        if not a.json:
            print(predict_header(s.engine.info, s.threshold, s.step.operating_point, s.step.band), flush=True)
        per_result = None
        if a.dicom_out:
            writer = DicomResultWriter(items, s, Path(a.dicom_out), kinds)
            per_result = writer.write
        stream = ResultStream(len(items), result_line, Path(a.out) if a.out else None, a.json, per_result,
                              progress=False if a.no_progress else None)
        try:
            s.predict(items, explain=explain, out_dir=(a.out if a.explain else None), cam_scale=a.cam_scale,
                      on_result=stream)
        except KeyboardInterrupt:
            stream.close(interrupted=True)
            print(stream.interrupted_message(), file=sys.stderr)
            return ExitCode.INTERRUPTED
        results = stream.close()
    failed = sum(not r.ok for r in results)
    if failed == len(results):
        return ExitCode.INPUT
    return ExitCode.SOME_ITEMS_FAILED if failed else ExitCode.OK


class DicomResultWriter:
    """``predict --dicom-out``: the node's SR / heatmap SC / map SEG for each screened DICOM input, written to ``out``
    as ``<source SOP Instance UID>-<kind>.dcm`` (unique, whatever folders the inputs came from) as each result is
    made, so a site can inspect them before connecting anything. An input that gets no objects says why and the
    others go on."""

    def __init__(self, items, screener, out: Path, kinds):
        from ..node import result_objects as ro

        self.items, self.out, self.kinds = items, out, kinds
        self.model = ro.model_record(screener.manifest, screener.engine.info, screener.threshold,
                                     screener.step.operating_point)

    def write(self, r) -> None:
        from ..decode import decode_image
        from ..node import result_objects as ro

        item = self.items[r.index]
        errors: dict[str, str] = {}
        try:
            source = ro.read_source(Path(item).read_bytes())
            cam = r.explanation.cam if r.explanation is not None else None
            preview = decode_image(str(item)).pixels if cam is not None else None
            objs = ro.build(source, r.to_dict(), self.model, preview=preview, cam=cam, kinds=self.kinds, errors=errors)
            for o in objs:
                path = o.write(self.out, str(source.SOPInstanceUID))
                print(f"wrote {o.kind.upper()} {o.sop_instance_uid} {path}", flush=True)
        except Exception as exc:
            errors["all"] = f"{type(exc).__name__}: {exc}"
        for why in errors.values():
            print(f"no DICOM objects for {printable(str(item))}: {printable(why)}", file=sys.stderr)


def decode_gate_sources(artifact: Path, data: str | None, max_images: int) -> tuple[list, str]:
    """The images the decode gate judges on: DATA's validation split when DATA is the training data (else all of
    DATA), the training data's validation split by default, synthetic images when neither is here."""
    from ..data import scan_dataset
    from ..data.split import is_training_data, training_split
    from ..manifest import read_manifest

    doc = read_manifest(artifact, verify=False)
    root = data or (doc.data.root if doc.data.root and Path(doc.data.root).is_dir() else None)
    if root is None:
        from ..synthetic import synthetic_parity_images

        return list(synthetic_parity_images(doc.preprocess))[:max_images], "synthetic"
    ds = scan_dataset(root, classes=list(doc.classes))
    if is_training_data(ds, doc.data):
        return [i.path for i in training_split(ds, doc.data)["val"]][:max_images], "val"
    return [i.path for i in ds.items][:max_images], "site"


def cmd_decode_gate(a) -> int:
    from ..bundle import is_bundle, refresh_index
    from ..runtime.decode_gate import decode_mode, gate_artifact
    from ..signing import signature_path

    art = Path(a.artifact)
    sources, split = decode_gate_sources(art, a.data, a.max_images)
    record = gate_artifact(art, sources, split, backend=a.backend, device=a.device)
    print(f"decode gate on {record.n_images} {split} images: " + ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in record.metrics.items()))
    from ..manifest import read_manifest

    print(("PASSED: " if record.passed else "FAILED: ") + decode_mode(read_manifest(art, verify=False))[1])
    if is_bundle(art.parent):
        refresh_index(art.parent)
    if signature_path(art).is_file():
        print(f"note: the signature no longer matches the manifest; re-sign it: cxr-edge sign {art} --key KEY.key",
              file=sys.stderr)
    return ExitCode.OK if record.passed else ExitCode.GATE_FAILED


def cmd_calibrate(a) -> None:
    from ..workflows.calibrate import CalibrationRequest, run_calibration

    s = run_calibration(CalibrationRequest(Path(a.artifact), Path(a.data), target_sensitivity=a.target_sensitivity,
                                           temperature=a.temperature, out_dir=a.out, dry_run=a.dry_run,
                                           ci_width=a.ci_width, force=a.force,
                                           backend=a.backend, device=a.device, self_check=a.self_check))
    print(Path(s["report"]).read_text())
    if a.dry_run:
        print("Dry run: the manifest was not changed.")
    else:
        print(f"Wrote manifest v{s['manifest_version']}: {s['manifest']} (the previous version is kept beside it); "
              "predict and serve use it from now on.")


def tune_targets(paths: list[str]) -> list[Path]:
    """Artifacts named, and the gate-passing ONNX/TensorRT artifacts inside folders named."""
    from ..manifest import read_manifest

    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted([*p.glob("model.*.onnx"), *p.glob("model.*.plan")]):
                if ".failed." not in f.name and not read_manifest(f, verify=False).gate_failed:
                    out.append(f)
        elif p.is_file():
            out.append(p)
        else:
            raise ConfigError(f"{p} is neither an artifact nor a folder of artifacts.")
    if not out:
        raise ConfigError(f"No artifacts to tune in {', '.join(paths)} (expected model.*.onnx from cxr-edge export).")
    return out


def cmd_tune(a) -> None:
    from ..runtime.tuning import machine_fingerprint, tune

    fp = machine_fingerprint()
    print(f"# this machine: {fp['cpu']} ({fp['isa']}), {fp['usable_cores']} usable cores, {', '.join(fp['flags'])}; "
          f"onnxruntime {fp['onnxruntime']}, openvino {fp['openvino']} (fingerprint {fp['id']})")
    best: dict[str, tuple] = {}
    for art in tune_targets(a.artifacts):
        rec = tune(art, batch=a.batch, budget_s=a.budget, rounds=a.rounds)
        print(f"\n## {art}  (cached: {rec['cache_file']})")
        print(f"| backend | options | batch-1 p90 ms | batch-{a.batch} img/s | status |\n|---|---|---|---|---|")
        for c in rec["candidates"]:
            opts = ", ".join(f"{k}={v}" for k, v in sorted(c["options"].items()))
            p90, ips = c.get("single_p90_ms"), c.get("batched_ips")
            print(f"| {c['backend']} | {opts} | {'-' if p90 is None else f'{p90:.1f}'} | "
                  f"{'-' if ips is None else f'{ips:.1f}'} | {c['status']} |")
            if p90 is not None and (best.get("single") is None or p90 < best["single"][0]):
                best["single"] = (p90, art, c)
            if ips is not None and (best.get("batched") is None or ips > best["batched"][0]):
                best["batched"] = (ips, art, c)
        for use, w in rec["winners"].items():
            print(f"- {use}: {w['backend']} {w['options']} ({w['measured']})")
    if len(a.artifacts) > 1 or Path(a.artifacts[0]).is_dir():
        print("\n## Fastest here, across the artifacts (each passed its export gate)")
        for use, (v, art, c) in best.items():
            what = f"p90 {v:.1f} ms at batch 1" if use == "single" else f"{v:.1f} img/s at batch {a.batch}"
            print(f"- {use}: {art.name} on {c['backend']} {c['options']}: {what}")
        print(int8_advice(best, tune_targets(a.artifacts), fp["isa"]))
    print("\nScreener, predict and serve now use these winners for these artifacts when no --backend is given "
          "(--tuning off ignores them).")


def int8_advice(best: dict, artifacts, isa: str) -> str:
    """Say plainly when no INT8 artifact wins on this machine: the float one is then faster *and* closer to FP32."""
    from ..manifest import read_manifest

    int8 = [p for p in artifacts if read_manifest(p, verify=False).precision is Precision.INT8]
    if not int8 or not best:
        return ""
    losing = {use: art for use, (_v, art, _c) in best.items()
              if read_manifest(art, verify=False).precision is not Precision.INT8}
    if not losing:
        return "\nINT8 pays on this machine: an INT8 artifact is the fastest for every use."
    uses = " and ".join(sorted(losing))
    names = ", ".join(sorted({a.name for a in losing.values()}))
    return (f"\nINT8 does not pay on this machine ({isa}) for {uses}: {names} is faster than every INT8 artifact "
            "measured, and closer to FP32. Point predict/serve at it (each passed its export gate; its self-check "
            "runs at load like any other's).")


def cmd_doctor(a) -> None:
    from ..doctor import format_report, run_doctor

    r = run_doctor()
    print(json.dumps(r.to_dict(), indent=2) if a.json else format_report(r))


def _add_decode_gate_parser(sub) -> None:
    from ..runtime.backends.registry import all_backends

    dg = sub.add_parser("decode-gate", help="measure whether reduced-resolution JPEG decoding may feed an artifact",
                        formatter_class=HelpFormatter,
                        description="Screens images as 2048 px JPEGs decoded at full and at reduced DCT scale and "
                                    "records in the manifest whether the artifact answers the same (the export gates' "
                                    "criterion: top-class agreement and max |dp| as for FP16). Without a passed gate "
                                    "every command decodes at full resolution. export runs it for every artifact.",
                        epilog="exit status: 0 passed (reduced decoding on), 1 failed (stays off)")
    dg.add_argument("artifact", help="an artifact or bundle (the manifest is updated in place)")
    dg.add_argument("data", nargs="?", help="images to judge on (default: the training data's validation split)")
    dg.add_argument("--max-images", type=positive_int, default=200, help="images to judge on, at most")
    dg.add_argument("--backend", choices=all_backends(), help="backend (default: the artifact format's first)")
    dg.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="device")
    dg.set_defaults(func=cmd_decode_gate)


def register(sub) -> None:
    _add_calibrate_parser(sub)
    _add_decode_gate_parser(sub)
    _add_predict_parser(sub)
    _add_tune_parser(sub)
    _add_doctor_parser(sub)


def _add_calibrate_parser(sub) -> None:
    from ..runtime.backends.registry import all_backends

    ca = sub.add_parser("calibrate", help="set an artifact's COVID threshold on the site's own labelled images",
                        formatter_class=HelpFormatter,
                        description="Screens DATA (class folders) with the artifact, chooses the threshold for the target "
                                    "sensitivity there, reports old and new operating points with exact 95% intervals, "
                                    "and writes the artifact's next manifest version (the previous one is kept).")
    ca.add_argument("artifact", help="an exported artifact (ONNX or TensorRT .plan) with its manifest")
    ca.add_argument("data", help="the site's labelled images: COVID and at least one other class folder")
    ca.add_argument("--target-sensitivity", type=fraction, default=0.95, help="COVID sensitivity to reach on DATA")
    ca.add_argument("--temperature", action="store_true",
                    help="also fit a probability temperature on DATA (reliability plot; applied by every consumer)")
    ca.add_argument("--ci-width", type=fraction, default=0.20,
                    help="refuse site data too small for this: the exact 95%% intervals of the sensitivity (at the target) "
                         "and of the specificity (at 50%%) must be no wider (0.20 needs 33 COVID and 104 other images)")
    ca.add_argument("--out", help="report directory (default: beside the artifact, or in a bundle's calibration/)")
    ca.add_argument("--dry-run", action="store_true", help="report only; leave the manifest as it is")
    ca.add_argument("--force", action="store_true", help="replace a report already in --out")
    add_engine_args(ca, all_backends())
    ca.set_defaults(func=cmd_calibrate)


def _add_predict_parser(sub) -> None:
    from ..runtime.backends.registry import all_backends

    pr = sub.add_parser("predict", help="screen images with an artifact (ONNX, TensorRT engine or .keras)",
                        formatter_class=HelpFormatter,
                        epilog="exit status: 0 all answered, 3 some images failed (each is reported), "
                               "7 none could be used; see cxr-edge --help for the others")
    pr.add_argument("artifact", help="an artifact with its manifest, or triton://host:port/model")
    pr.add_argument("images", nargs="+", help="image files (PNG/JPEG/BMP/TIFF/DICOM) or directories")
    pr.add_argument("--explain", action="store_true", help="Grad-CAM heatmaps (PNG overlay + raw .npy in --out)")
    pr.add_argument("--json", action="store_true", help="one JSON object per image (JSON lines), as each is made")
    pr.add_argument("--no-progress", action="store_true", help="no progress bar (shown on a terminal only)")
    pr.add_argument("--dicom-out", metavar="DIR",
                    help="DICOM inputs: write the result objects the node sends to a PACS (TID 1500 SR, heatmap SC, "
                         "map SEG) here, to inspect before connecting anything (node extra)")
    pr.add_argument("--dicom-objects", default="sr,sc,seg", metavar="KINDS", help="with --dicom-out: which objects")
    pr.add_argument("--out", help="directory for predictions.jsonl (appended as results are made; kept on Ctrl-C), "
                                  "predictions.json (at the end) and heatmaps")
    add_engine_args(pr, all_backends(), preprocess_default="auto", failed_gate="run", tuning_default="cached")
    pr.add_argument("--require-gpu", action="store_true", help="fail instead of falling back to the CPU")
    pr.add_argument("--precision", choices=OPENVINO_PRECISIONS, help="OpenVINO only: fp32 (forced f32) or bf16")
    pr.add_argument("--batch-size", type=positive_int, default=8, help="images per engine call")
    pr.add_argument("--cuda-graph", action="store_true",
                    help="TensorRT engines: capture each batch size once as a CUDA graph and replay it")
    pr.add_argument("--threshold", type=float, help="override the manifest's COVID threshold")
    pr.add_argument("--cam-scale", type=positive_float,
                    help="absolute heatmap scale: the raw Grad-CAM value drawn as full red, the same for every image, so "
                         "maps can be compared (default: each map's own maximum, which makes a weak map look as hot as "
                         "a strong one; overlays then say so and flag weak maps)")
    pr.add_argument("--trusted-key", action="append", metavar="PUB",
                    help="only run artifacts signed by this Ed25519 public key (repeatable)")
    pr.set_defaults(func=cmd_predict)


def _add_tune_parser(sub) -> None:
    tu = sub.add_parser("tune", help="measure which backend / streams / threads run an artifact fastest on this machine",
                        formatter_class=HelpFormatter,
                        description="Times every backend x threads x OpenVINO streams candidate for single-image latency "
                                    "and batched throughput (interleaved rounds, synthetic inputs of the artifact's shape), "
                                    "checks each answers like the first, and caches the winners under this machine's "
                                    "fingerprint and the artifact's sha256 for Screener, predict and serve.")
    tu.add_argument("artifacts", nargs="+", help="artifacts, or export folders (every gate-passing model.*.onnx/.plan)")
    tu.add_argument("--batch", type=positive_int, default=16, help="batch size for the batched (service) use")
    tu.add_argument("--budget", type=positive_float, default=2.0, help="seconds of timing per candidate")
    tu.add_argument("--rounds", type=positive_int, default=3, help="interleaved rounds")
    tu.set_defaults(func=cmd_tune)


def _add_doctor_parser(sub) -> None:
    dr = sub.add_parser("doctor", help="what this machine can run (GPU, CUDA, TensorRT, ONNX Runtime providers) and fixes",
                        formatter_class=HelpFormatter)
    dr.add_argument("--json", action="store_true", help="machine-readable report")
    dr.set_defaults(func=cmd_doctor)
