"""The ``cxr-edge`` command line. Flags map one-to-one onto the config dataclasses."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from .errors import CxrEdgeError, EngineError


def _quiet_tensorflow() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def cmd_demo(a):
    from .demo import run_demo

    run_demo(a.out, a.data, per_class=a.per_class, seed=a.seed)


def cmd_train(a):
    from .train.trainer import TrainConfig, train

    cfg = TrainConfig(recipe=a.recipe, epochs=a.epochs, batch_size=a.batch_size, learning_rate=a.lr,
                      image_size=a.image_size, fine_tune_epochs=a.fine_tune_epochs, weights=a.weights,
                      seed=a.seed, target_sensitivity=a.target_sensitivity, metadata_csv=a.metadata,
                      max_images=a.max_images, verbose=1 if sys.stdout.isatty() else 2)
    r = train(cfg, a.data, a.out)
    print(f"Model: {r.model_path}\nManifest: {r.manifest_path}\nHistory: {r.history_path}")
    print(json.dumps(r.val_metrics))


def cmd_evaluate(a):
    from .train.evaluate import evaluate_model

    report, m = evaluate_model(a.model, a.data, a.out, split=a.split, threshold=a.threshold,
                               common_size=a.common_size, n_boot=a.bootstrap)
    cov = m.get("covid") or {}
    print(f"accuracy {m['accuracy']:.4f}  macro ROC-AUC {m['roc_auc_macro']}  "
          f"COVID sens {cov.get('sensitivity')}  spec {cov.get('specificity')}  n={m['n']}")
    print(f"Report: {report}")


def cmd_export(a):
    from .export.pipeline import ExportConfig, export_model

    cfg = ExportConfig(precisions=a.precision, int8_targets=a.int8_target, calib_data=a.calib,
                       calib_method=a.calib_method, calib_size=a.calib_size, force=a.force, opset=a.opset)
    s = export_model(a.model, a.out, cfg)
    print((s.out_dir / "export_report.md").read_text())
    if not s.ok:
        failed = [x.variant for x in s.artifacts if x.gate and not x.gate.passed]
        print(f"error: {', '.join(failed)} failed the accuracy gate" + (" (kept, marked failed, --force)" if a.force else ""),
              file=sys.stderr)
        raise SystemExit(1)


def cmd_build(a):
    from .export.tensorrt_build import BuildConfig, build_engine

    cfg = BuildConfig.from_batch_text(a.precision, a.batch, workspace_mb=a.workspace, dla_core=a.dla,
                                      timing_cache=a.timing_cache, allow_tf32=a.allow_tf32, gate=a.gate,
                                      gate_data=a.gate_data, force=a.force)
    print(f"Engine: {build_engine(a.artifact, cfg, a.out, calib_data=a.calib)}")


def cmd_doctor(a):
    from .doctor import format_report, run_doctor

    r = run_doctor()
    print(json.dumps(r.to_dict(), indent=2) if a.json else format_report(r))


def _expand_images(paths):
    from pathlib import Path

    from .data.layout import IMAGE_SUFFIXES

    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        else:
            out.append(p)  # files of any name: the decoder judges by content and reports per item
    return out


def cmd_predict(a):
    from .runtime import Screener

    items = _expand_images(a.images)
    if not items:
        raise SystemExit("error: no images given (files or directories)")
    device = "cuda" if a.require_gpu else a.device
    with Screener(a.artifact, backend=a.backend, device=device, batch_size=a.batch_size,
                  threshold=a.threshold, precision=a.precision, trusted_keys=a.trusted_key,
                  **({"cuda_graph": True} if a.cuda_graph else {})) as s:
        results = s.predict(items, explain=a.explain, out_dir=(a.out if a.explain else None), cam_scale=a.cam_scale)
        info = s.engine.info
    if a.out:
        from pathlib import Path

        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "predictions.json").write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    if a.json:
        for r in results:
            print(json.dumps(r.to_dict()))
    else:
        print(f"# {info.backend} / {info.provider} / {info.precision}; threshold {results[0].threshold if results else None}")
        for r in results:
            if not r.ok:
                print(f"ERROR  {r.source}: {r.error}")
                continue
            probs = "  ".join(f"{c} {p:.3f}" for c, p in r.probabilities.items())
            extra = f"  heatmap {r.explanation.files.get('overlay', '')}" if r.explanation else ""
            print(f"{r.label:16s} {probs}  ({r.timings_ms['infer']:.1f} ms)  {r.source}{extra}")
    if any(not r.ok for r in results):
        raise SystemExit(3)


def cmd_bench(a):
    from .bench.report import write_results
    from .bench.runner import BenchConfig, run_bench

    split = lambda t: tuple(x.strip() for x in t.split(",") if x.strip())
    cfg = BenchConfig(batches=tuple(int(b) for b in split(a.batch)), backends=split(a.backends),
                      precisions=split(a.precisions), budget_s=a.budget, data=a.data, threads=a.threads,
                      e2e=not a.no_e2e, cuda_graph=a.cuda_graph)
    res = run_bench(a.artifact_dir, cfg)
    md = write_results(res, a.out or os.path.join(a.artifact_dir, "bench"), " ".join(["cxr-edge", *sys.argv[1:]]))
    print(md.read_text())
    print(f"Results: {md.parent}")


def cmd_serve(a):
    from .serve.app import ServeConfig, create_app, default_engine_threads
    from .serve.http_guard import run_server

    if a.host not in ("127.0.0.1", "localhost", "::1"):
        logging.getLogger("cxr_edge.serve").warning(
            "binding to %s: the service has no authentication; put it behind the clinic's reverse proxy", a.host)
    threads = a.threads or default_engine_threads(a.artifact)
    cfg = ServeConfig(max_batch=a.max_batch, max_delay_ms=a.max_delay_ms, max_queue=a.max_queue, timeout_s=a.timeout,
                      max_body_mb=a.max_body_mb, device=a.device, backend=a.backend, threads=threads,
                      cors_origins=tuple(o for o in (a.cors or "").split(",") if o),
                      trusted_keys=tuple(a.trusted_key or ()), body_timeout_s=a.body_timeout, save_dir=a.save_dir,
                      engine_spin=a.engine_spin, cuda_graph=a.cuda_graph)
    run_server(create_app(a.artifact, cfg), a.host, a.port, header_timeout_s=a.header_timeout,
               graceful_timeout_s=a.timeout, limit_concurrency=a.max_connections)


def cmd_keygen(a):
    from .signing import generate_keypair

    priv, pub = generate_keypair(a.out, overwrite=a.force)
    print(f"private key: {priv} (keep it off the screening box)\npublic key:  {pub} (give to --trusted-key)")


def cmd_sign(a):
    from .signing import sign_artifact

    for art in a.artifacts:
        print(f"signed: {sign_artifact(art, a.key)}")


def cmd_export_triton(a):
    from .export.triton import TritonConfig, export_triton

    cfg = TritonConfig(max_batch_size=a.max_batch, preferred_batch_sizes=tuple(int(b) for b in a.preferred.split(",")),
                       max_queue_delay_us=a.delay_us, instances=a.instances, kind=a.kind)
    for d in export_triton(a.artifacts, a.out, cfg):
        print(f"{d}: config.pbtxt validated against Triton's ModelConfig")


def cmd_serve_triton(a):
    from .serve.triton_server import serve_triton

    serve_triton(a.artifact, a.host, a.http_port, a.grpc_port, a.metrics_port, a.max_batch, a.delay_us, a.name)


def cmd_synth(a):
    from .synthetic import write_synthetic_dataset

    out = write_synthetic_dataset(a.out, per_class=a.per_class, seed=a.seed)
    print(f"Wrote synthetic dataset to {out}")


def cmd_scan(a):
    from .data import scan_dataset, split_dataset
    from .data.split import split_counts

    ds = scan_dataset(a.data, classes=a.classes.split(",") if a.classes else None, metadata_csv=a.metadata)
    print(ds.summary())
    print("split counts:", json.dumps(split_counts(split_dataset(ds, seed=a.seed), ds.classes)))
    if a.decode:
        from .data.loading import load_images
        from .preprocess import PreprocessSpec

        res = load_images([i.path for i in ds.items], PreprocessSpec(64, 64, "raw"), progress=True)
        print(f"decoded {len(res.kept)} of {len(ds.items)}; {len(res.errors)} bad:")
        for e in res.errors:
            print(f"  {e}")


def cmd_recipes(a):
    from .train.recipes import RECIPES

    for r in RECIPES.values():
        print(f"{r.name:16s} {r.description}; classes {', '.join(r.classes)}; {r.image_size}px, {r.mode.value}, "
              f"{r.optimizer} lr {r.learning_rate}, batch {r.batch_size}, {r.epochs} epochs")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cxr-edge", description="Chest X-ray screening: train, evaluate, export, run.")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="synthesise data, train the small CNN, evaluate (minutes on a CPU)")
    d.add_argument("--data", help="use this data directory instead of synthetic images")
    d.add_argument("--out", default="cxr-edge-demo")
    d.add_argument("--per-class", type=int, default=150)
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="train a recipe on a data directory")
    t.add_argument("--recipe", default="small_cnn", help="small_cnn | resnet50_tl | resnet152v2_tl")
    t.add_argument("--data", required=True)
    t.add_argument("--out", default="runs/model")
    t.add_argument("--epochs", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float, help="learning rate (overrides the recipe's)")
    t.add_argument("--image-size", type=int)
    t.add_argument("--fine-tune-epochs", type=int)
    t.add_argument("--weights", default="imagenet", help="imagenet | path/to/notop.h5 | none (backbone recipes)")
    t.add_argument("--target-sensitivity", type=float, default=0.95)
    t.add_argument("--metadata", help="CSV with per-image patient ids / sources (SOURCES.csv is found automatically)")
    t.add_argument("--max-images", type=int, help="cap per split, for smoke runs")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="evaluate a trained model and write report.json/.md and plots")
    e.add_argument("model")
    e.add_argument("data")
    e.add_argument("--out", default=None, help="report directory (default: <model dir>/report)")
    e.add_argument("--split", default="auto", help="auto | train | val | test | all")
    e.add_argument("--threshold", type=float)
    e.add_argument("--common-size", type=int, help="down-sample every image to NxN first (size-leak check)")
    e.add_argument("--bootstrap", type=int, default=1000)
    e.set_defaults(func=cmd_evaluate)

    x = sub.add_parser("export", help="Keras model -> gated FP32/FP16/INT8 ONNX artifacts with manifests")
    x.add_argument("model")
    x.add_argument("--out", required=True)
    x.add_argument("--precision", default="fp32,fp16,int8", help="comma list of fp32, fp16, int8, int8-trt, int8-cpu")
    x.add_argument("--int8-target", default="trt,cpu", help="INT8 flavours for 'int8': trt (S8S8), cpu (U8S8)")
    x.add_argument("--calib", help="labelled data dir: calibration from its train split, gates on its val split "
                   "(default: the model's training data, else synthetic)")
    x.add_argument("--calib-method", default="minmax", help="minmax | entropy | percentile")
    x.add_argument("--calib-size", type=int, default=200)
    x.add_argument("--opset", type=int, default=17)
    x.add_argument("--force", action="store_true", help="keep artifacts that fail their gate, marked failed")
    x.set_defaults(func=cmd_export)

    b = sub.add_parser("build", help="TensorRT engine from an exported ONNX artifact (GPU + TensorRT)")
    b.add_argument("artifact")
    b.add_argument("--precision", required=True, help="fp32 | fp16 | int8 (int8 needs the int8-trt artifact)")
    b.add_argument("--batch", default="1,8,32", help="optimisation profile MIN,OPT,MAX")
    b.add_argument("--workspace", type=int, default=2048, help="builder workspace in MB")
    b.add_argument("--dla", type=int, help="Jetson DLA core")
    b.add_argument("--timing-cache", help="persistent timing cache file")
    b.add_argument("--calib", help="calibration data for INT8 on DLA (implicit calibration); unused otherwise")
    b.add_argument("--out", help="engine path (default: beside the ONNX)")
    b.add_argument("--allow-tf32", action="store_true",
                   help="let FP32 layers use TF32 tensor cores (default: off; TF32 rounds inputs to 10 mantissa bits)")
    b.add_argument("--gate", action=argparse.BooleanOptionalAction, default=True,
                   help="run the built engine against the FP32 ONNX with the export gate's criteria (default: on)")
    b.add_argument("--gate-data", help="labelled images for the engine gate (default: the artifact's calibration "
                   "data when present, else synthetic images)")
    b.add_argument("--force", action="store_true", help="keep an engine that fails its gate, marked failed")
    b.set_defaults(func=cmd_build)

    dr = sub.add_parser("doctor", help="what this machine can run (GPU, CUDA, TensorRT, ONNX Runtime providers) and fixes")
    dr.add_argument("--json", action="store_true")
    dr.set_defaults(func=cmd_doctor)

    pr = sub.add_parser("predict", help="screen images with an artifact (ONNX, TensorRT engine or .keras)")
    pr.add_argument("artifact")
    pr.add_argument("images", nargs="+", help="image files (PNG/JPEG/BMP/TIFF/DICOM) or directories")
    pr.add_argument("--explain", action="store_true", help="Grad-CAM heatmaps (PNG overlay + raw .npy in --out)")
    pr.add_argument("--json", action="store_true", help="one JSON object per image")
    pr.add_argument("--out", help="directory for predictions.json and heatmaps")
    pr.add_argument("--backend", help="onnxruntime | openvino | tensorrt | keras (default: the format's first)")
    pr.add_argument("--device", default="auto", help="auto | cpu | cuda")
    pr.add_argument("--require-gpu", action="store_true", help="fail instead of falling back to the CPU")
    pr.add_argument("--precision", help="OpenVINO only: fp32 (forced f32) or bf16")
    pr.add_argument("--batch-size", type=int, default=8)
    pr.add_argument("--cuda-graph", action="store_true",
                    help="TensorRT engines: capture each batch size once as a CUDA graph and replay it")
    pr.add_argument("--threshold", type=float, help="override the manifest's COVID threshold")
    pr.add_argument("--cam-scale", type=float, help="fixed heatmap scale (default: each map's own max)")
    pr.add_argument("--trusted-key", action="append", metavar="PUB",
                    help="only run artifacts signed by this Ed25519 public key (repeatable)")
    pr.set_defaults(func=cmd_predict)

    bn = sub.add_parser("bench", help="latency/throughput/accuracy per backend x precision x batch, vs Keras")
    bn.add_argument("artifact_dir", help="a cxr-edge export output directory")
    bn.add_argument("--data", help="labelled data for accuracy (default: the model's test split)")
    bn.add_argument("--batch", default="1,8,32")
    bn.add_argument("--backends", default="onnxruntime,openvino,tensorrt,keras")
    bn.add_argument("--precisions", default="fp32,fp16,bf16,int8-trt,int8-cpu")
    bn.add_argument("--budget", type=float, default=3.0, help="seconds of timing per row")
    bn.add_argument("--threads", type=int, help="threads per engine (default: all usable cores)")
    bn.add_argument("--no-e2e", action="store_true", help="skip the end-to-end (decode+infer) measurement")
    bn.add_argument("--cuda-graph", action="store_true",
                    help="TensorRT engines: capture each batch size once as a CUDA graph and replay it")
    bn.add_argument("--out", help="results directory (default: ARTIFACT_DIR/bench)")
    bn.set_defaults(func=cmd_bench)

    sv = sub.add_parser("serve", help="HTTP screening service with dynamic batching and a kiosk page")
    sv.add_argument("artifact")
    sv.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost only)")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--max-batch", type=int, default=32)
    sv.add_argument("--max-delay-ms", type=float, default=5.0)
    sv.add_argument("--max-queue", type=int, default=256, help="images waiting before 503 + Retry-After")
    sv.add_argument("--timeout", type=float, default=30.0, help="per-request timeout (s)")
    sv.add_argument("--max-body-mb", type=float, default=64.0)
    sv.add_argument("--device", default="auto")
    sv.add_argument("--backend")
    sv.add_argument("--cors", help="comma-separated allowed origins (default: none)")
    sv.add_argument("--threads", type=int,
                    help="engine threads (default: all usable cores for models over 1 GMAC/image, half of them "
                         "for lighter ones, whose requests cost more decoding than inference)")
    sv.add_argument("--engine-spin", action=argparse.BooleanOptionalAction, default=False,
                    help="let ONNX Runtime threads busy-wait between calls (default: off; spinning took ~25%% "
                         "more CPU per request from the decoders on 2 cores)")
    sv.add_argument("--trusted-key", action="append", metavar="PUB",
                    help="only serve an artifact signed by this Ed25519 public key (repeatable)")
    sv.add_argument("--body-timeout", type=float, default=30.0, help="seconds for a request body to arrive (408)")
    sv.add_argument("--header-timeout", type=float, default=10.0,
                    help="seconds for request headers to arrive before the connection is closed")
    sv.add_argument("--max-connections", type=int, default=512, help="open connections before answering 503")
    sv.add_argument("--save-dir", help="keep received images under this directory (default: nothing is written)")
    sv.add_argument("--cuda-graph", action="store_true",
                    help="TensorRT engines: capture each batch size once as a CUDA graph and replay it")
    sv.set_defaults(func=cmd_serve)

    kg = sub.add_parser("keygen", help="make an Ed25519 key pair for signing artifacts")
    kg.add_argument("out", help="path stem: writes STEM.key (private, 0600) and STEM.pub")
    kg.add_argument("--force", action="store_true", help="overwrite existing key files")
    kg.set_defaults(func=cmd_keygen)

    sg = sub.add_parser("sign", help="sign artifact manifests so --trusted-key services accept them")
    sg.add_argument("artifacts", nargs="+")
    sg.add_argument("--key", required=True, help="private key from cxr-edge keygen")
    sg.set_defaults(func=cmd_sign)

    tx = sub.add_parser("export-triton", help="write a Triton model repository from artifacts")
    tx.add_argument("artifacts", nargs="+")
    tx.add_argument("--out", required=True, help="model repository directory")
    tx.add_argument("--max-batch", type=int, default=32)
    tx.add_argument("--preferred", default="8,16,32", help="preferred batch sizes")
    tx.add_argument("--delay-us", type=int, default=5000, help="max queue delay (microseconds)")
    tx.add_argument("--instances", type=int, default=1)
    tx.add_argument("--kind", default="auto", help="auto | KIND_CPU | KIND_GPU")
    tx.set_defaults(func=cmd_export_triton)

    st = sub.add_parser("serve-triton", help="serve an artifact inside Triton Inference Server (PyTriton)")
    st.add_argument("artifact")
    st.add_argument("--host", default="127.0.0.1")
    st.add_argument("--http-port", type=int, default=8000)
    st.add_argument("--grpc-port", type=int, default=8001)
    st.add_argument("--metrics-port", type=int, default=8002)
    st.add_argument("--max-batch", type=int, default=32)
    st.add_argument("--delay-us", type=int, default=5000)
    st.add_argument("--name", help="model name (default: cxr_<recipe>_<precision>)")
    st.set_defaults(func=cmd_serve_triton)

    s = sub.add_parser("synth", help="write a synthetic CXR-like dataset")
    s.add_argument("out")
    s.add_argument("--per-class", type=int, default=100)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    sc = sub.add_parser("scan", help="report what a data directory holds, its split, and bad files")
    sc.add_argument("data")
    sc.add_argument("--classes", help="comma-separated, e.g. COVID,Normal")
    sc.add_argument("--metadata")
    sc.add_argument("--decode", action="store_true", help="decode every file and list the bad ones")
    sc.add_argument("--seed", type=int, default=0)
    sc.set_defaults(func=cmd_scan)

    r = sub.add_parser("recipes", help="list the training recipes")
    r.set_defaults(func=cmd_recipes)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    _quiet_tensorflow()
    if getattr(args, "out", "x") is None and args.command == "evaluate":
        from pathlib import Path

        args.out = str(Path(args.model).parent / "report")
    try:
        args.func(args)
    except EngineError as exc:  # the machine or library failed (build, device, remote): exit 4
        print(f"error: {exc}", file=sys.stderr)
        return 4
    except CxrEdgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
