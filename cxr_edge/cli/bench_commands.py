"""``cxr-edge bench``: latency/throughput/accuracy per backend x precision x batch, beside Keras and the peers."""

from __future__ import annotations

import sys
from pathlib import Path

from ._common import HelpFormatter, comma_list, csv_text, default_of, positive_float, positive_int

BENCH_BACKENDS = ("onnxruntime", "openvino", "tensorrt", "keras")


def bench_out_dir(artifact_dir: str, out: str | None, force: bool) -> Path:
    """A new run folder (ARTIFACT_DIR/bench/YYYYmmdd-HHMMSS) by default; an --out that already holds results
    is refused unless --force, so one run never silently replaces another."""
    import time

    from ..errors import ConfigError

    if out is None:
        path = Path(artifact_dir) / "bench" / time.strftime("%Y%m%d-%H%M%S")
        k = 1
        while path.exists():
            path = path.with_name(f"{path.name.split('.')[0]}.{k}")
            k += 1
        return path
    path = Path(out)
    if (path / "results.json").exists() and not force:
        raise ConfigError(f"{path} already holds benchmark results; choose another --out or pass --force to replace them.")
    return path


def cmd_bench(a) -> None:
    from ..bench.report import write_results
    from ..bench.runner import BenchConfig, run_bench

    peers = a.peers or ()
    cfg = BenchConfig(batches=a.batch, backends=a.backends, precisions=a.precisions, budget_s=a.budget, data=a.data,
                      threads=a.threads, e2e=not a.no_e2e, cuda_graph=a.cuda_graph, peers=peers,
                      rounds=a.rounds or (5 if peers else 1))
    out = bench_out_dir(a.artifact_dir, a.out, a.force)  # decided before the run: no overwrite discovered at the end
    res = run_bench(a.artifact_dir, cfg)
    md = write_results(res, out, " ".join(["cxr-edge", *sys.argv[1:]]))
    print(md.read_text())
    print(f"Results: {md.parent}")


def _add_bench_parser(sub) -> None:
    from ..bench.peers import PEERS
    from ..bench.runner import BENCH_PRECISIONS, BenchConfig

    bn = sub.add_parser("bench", help="latency/throughput/accuracy per backend x precision x batch, vs Keras",
                        formatter_class=HelpFormatter)
    bn.add_argument("artifact_dir", help="a cxr-edge export output directory")
    bn.add_argument("--data", help="labelled data for accuracy (default: the model's test split)")
    bn.add_argument("--batch", type=comma_list(item=positive_int), default=csv_text(default_of(BenchConfig, "batches")),
                    help="batch sizes")
    bn.add_argument("--backends", type=comma_list(BENCH_BACKENDS), default=csv_text(default_of(BenchConfig, "backends")),
                    help=f"comma list of {', '.join(BENCH_BACKENDS)}")
    bn.add_argument("--precisions", type=comma_list(BENCH_PRECISIONS),
                    default=csv_text(default_of(BenchConfig, "precisions")),
                    help=f"comma list of {', '.join(BENCH_PRECISIONS)}")
    bn.add_argument("--budget", type=positive_float, default=default_of(BenchConfig, "budget_s"),
                    help="seconds of timing per row")
    bn.add_argument("--threads", type=positive_int, help="threads per engine (default: all usable cores)")
    bn.add_argument("--peers", nargs="?", const=PEERS, type=comma_list(PEERS),
                    help=f"also time what a user would pick instead ({', '.join(PEERS)}; default all), built from the "
                         "same model and calibration images, in the same interleaved rounds, with per-round ratios")
    bn.add_argument("--rounds", type=positive_int,
                    help="interleaved timing rounds, the budget split over them (default: 5 with --peers, else 1)")
    bn.add_argument("--no-e2e", action="store_true", help="skip the end-to-end (decode+infer) measurement")
    bn.add_argument("--cuda-graph", action="store_true",
                    help="TensorRT engines: capture each batch size once as a CUDA graph and replay it")
    bn.add_argument("--out", help="results directory (default: a new ARTIFACT_DIR/bench/DATE-TIME folder per run)")
    bn.add_argument("--force", action="store_true", help="replace the results already in --out")
    bn.set_defaults(func=cmd_bench)


def register(sub) -> None:
    _add_bench_parser(sub)
