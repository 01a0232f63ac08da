"""``cxr-edge loadgen``: MLPerf LoadGen's SingleStream / MultiStream / Server / Offline runs of one artifact, against
the engine directly, the HTTP service or the DICOM node, with LoadGen's own logs kept beside our table."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from ._common import (
    HelpFormatter,
    add_engine_args,
    comma_list,
    csv_text,
    default_of,
    fraction,
    new_results_dir,
    positive_float,
    positive_int,
)

#: the scenarios and modes, as LoadGen's words are typed here (bench/loadgen_settings.py maps them to LoadGen's)
SCENARIO_WORDS = ("single-stream", "multi-stream", "server", "offline")
MODE_WORDS = ("performance", "accuracy", "both")
TARGET_WORDS = ("direct", "serve", "node")


def loadgen_out_dir(out: str | None, force: bool) -> Path:
    """A new Path("loadgen")/DATE-TIME folder by default; an --out holding results is refused unless --force."""
    return new_results_dir(Path("loadgen"), out, force, "LoadGen results")

def cmd_loadgen(a) -> None:
    import shutil

    from ..bench.loadgen import LoadgenConfig, require_loadgen, run_loadgen
    from ..bench.loadgen_report import write_results
    from ..bench.loadgen_settings import RunSettings

    require_loadgen()  # the missing extra named before anything loads
    run = RunSettings(duration_s=a.duration, official=a.official, multi_stream_samples=a.samples_per_query,
                      server_qps=a.server_qps, server_load=a.server_load, server_latency_ms=a.server_latency_ms,
                      max_query_count=a.max_queries or 0, find_peak=a.find_peak)
    cfg = LoadgenConfig(scenarios=a.scenarios, mode=a.mode, target=a.target, backend=a.backend, device=a.device,
                        precision=a.precision, threads=a.threads, self_check=a.self_check,
                        allow_failed_gate=a.allow_failed_gate, data=a.data, max_samples=a.max_samples,
                        batch_size=a.batch_size, max_batch=a.max_batch, max_delay_ms=a.max_delay_ms,
                        concurrency=a.concurrency, url=a.url, dicom=a.dicom,
                        service_args=tuple(shlex.split(a.service_args or "")), run=run)
    out = loadgen_out_dir(a.out, a.force)
    if a.force and (out / "logs").is_dir():
        shutil.rmtree(out / "logs")  # the old run's LoadGen logs would sit beside the new table otherwise
    res = run_loadgen(a.artifact, cfg, out)
    md = write_results(res, out, " ".join(["cxr-edge", *sys.argv[1:]]))
    print(md.read_text())
    print(f"Results: {md.parent}")


def _add_loadgen_parser(sub) -> None:
    from ..bench.loadgen import LoadgenConfig
    from ..bench.loadgen_settings import RunSettings
    from ..runtime.backends.registry import all_backends
    from .run_commands import OPENVINO_PRECISIONS

    L, R = LoadgenConfig, RunSettings
    lg = sub.add_parser("loadgen", formatter_class=HelpFormatter,
                        help="MLPerf LoadGen scenarios (SingleStream, MultiStream, Server, Offline) for one artifact",
                        description="Runs MLPerf Inference's own load generator (pip install 'cxr-edge[loadgen]') on "
                                    "one artifact, under MLPerf's ResNet-50 rules (LoadGen's embedded mlperf.conf) with "
                                    "the minimum duration shortened unless --official. Writes LoadGen's summary and "
                                    "detail logs per run, results.json, results.md and loadgen.png to --out.")
    lg.add_argument("artifact", help="the artifact to run (a bundle, its model file, or a model file with its manifest)")
    lg.add_argument("--scenario", "--scenarios", dest="scenarios", metavar="LIST", type=comma_list(SCENARIO_WORDS),
                    default=csv_text(default_of(L, "scenarios")), help=f"comma list of {', '.join(SCENARIO_WORDS)}")
    lg.add_argument("--mode", choices=MODE_WORDS, default=default_of(L, "mode"),
                    help="LoadGen's PerformanceOnly, AccuracyOnly (every sample once, scored against the labels and "
                         "the FP32 artifact), or both")
    lg.add_argument("--target", choices=TARGET_WORDS, default=default_of(L, "target"),
                    help="the system under test: the engine in this process, the HTTP service (cxr-edge serve) or "
                         "the DICOM node (cxr-edge node) over loopback, decode included; started here unless --url")
    add_engine_args(lg, all_backends(), failed_gate="measure")
    lg.add_argument("--precision", choices=OPENVINO_PRECISIONS,
                    help="OpenVINO only (--target direct): its inference-precision hint, fp32 or bf16")
    lg.add_argument("--threads", type=positive_int, help="engine threads (default: the runtime's or the service's)")
    lg.add_argument("--data", help="labelled images, one folder per class (default: synthetic radiographs, unlabelled); "
                                   "the model's test split when it is its training data")
    lg.add_argument("--max-samples", type=positive_int, help="use at most this many images of --data")
    lg.add_argument("--batch-size", type=positive_int, default=default_of(L, "batch_size"),
                    help="Offline: samples per engine call")
    lg.add_argument("--max-batch", type=positive_int,
                    help="Server: the largest dynamic batch (default: 8 direct; the service's own default)")
    lg.add_argument("--max-delay-ms", type=float,
                    help="Server: the longest wait for a batch to fill (default: 2 direct; the service's own default)")
    lg.add_argument("--duration", type=positive_float, default=default_of(R, "duration_s"),
                    help="minimum seconds per performance run (MLPerf's rules: 600; see --official)")
    lg.add_argument("--official", action="store_true",
                    help="MLPerf's minimums as they are (600 s per run, every query count): slow, but the numbers "
                         "are then run the way submissions are")
    lg.add_argument("--samples-per-query", type=positive_int, help="MultiStream: samples per query (rules: 8)")
    lg.add_argument("--server-qps", type=positive_float,
                    help="Server: LoadGen's target QPS (default: --server-load x a throughput timed just before)")
    lg.add_argument("--server-load", type=fraction, default=default_of(R, "server_load"),
                    help="Server: the fraction of the timed throughput offered when --server-qps is not given")
    lg.add_argument("--server-latency-ms", type=positive_float,
                    help="Server: the latency bound at p99 (default: the ResNet-50 rules' 15 ms direct; ours for a whole "
                         "service, decode and transport included: 100 ms serve, 1000 ms node)")
    lg.add_argument("--find-peak", action="store_true",
                    help="Server: LoadGen's FindPeakPerformance mode, which raises the target QPS from --server-qps "
                         "(default: 0.1 x the timed throughput) and bisects to the highest that keeps the latency bound; "
                         "each step is a full run of --duration")
    lg.add_argument("--max-queries", type=positive_int, help="stop each run after this many queries (quick checks)")
    lg.add_argument("--concurrency", type=positive_int, default=default_of(L, "concurrency"),
                    help="serve: HTTP connections at most; node: C-STORE associations (at most 4)")
    lg.add_argument("--url", help="a running service (serve) or node (its HTTP port) instead of starting one")
    lg.add_argument("--dicom", metavar="HOST:PORT", help="with --target node --url: the node's DICOM port")
    lg.add_argument("--service-args", metavar="FLAGS",
                    help="extra flags for the started serve/node, after an = sign and quoted: "
                         "--service-args=\"--decode-workers 2\"")
    lg.add_argument("--out", help="results directory (default: a new ./loadgen/DATE-TIME folder per run)")
    lg.add_argument("--force", action="store_true", help="replace the results already in --out")
    lg.set_defaults(func=cmd_loadgen)


def register(sub) -> None:
    _add_loadgen_parser(sub)
