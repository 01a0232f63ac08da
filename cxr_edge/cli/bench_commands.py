"""``cxr-edge bench``: latency/throughput/accuracy per backend x precision x batch, beside Keras and the peers."""

from __future__ import annotations

import sys
from pathlib import Path

from ._common import HelpFormatter, comma_list, csv_text, default_of, new_results_dir, positive_float, positive_int


def bench_out_dir(artifact_dir: str, out: str | None, force: bool) -> Path:
    """A new Path(artifact_dir) / "bench"/DATE-TIME folder by default; an --out holding results is refused unless --force."""
    return new_results_dir(Path(artifact_dir) / "bench", out, force, "benchmark results")

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


def precision_list(choices: tuple[str, ...]):
    """An argparse type for --precision: the values ``export --precision`` takes (``int8``: every INT8 flavour), and
    bf16 (OpenVINO's hint on the FP32 artifact); an unknown one is a usage error (exit 2)."""
    from ..bench.runner import expand_precisions

    flavours = tuple(c for c in choices if c.startswith("int8-"))
    parse_list = comma_list((*(c for c in choices if c not in flavours), "int8", *flavours))

    def parse(text: str) -> tuple[str, ...]:
        return expand_precisions(parse_list(text))

    parse.__name__ = "precision list"  # argparse names the type in its error messages
    return parse


def _add_bench_parser(sub) -> None:
    from ..bench.peers import PEERS
    from ..bench.runner import BENCH_BACKENDS, BENCH_PRECISIONS, BenchConfig

    bn = sub.add_parser("bench", help="latency/throughput/accuracy per backend x precision x batch, vs Keras",
                        formatter_class=HelpFormatter)
    bn.add_argument("artifact_dir", help="a cxr-edge export output directory")
    bn.add_argument("--data", help="labelled data for accuracy (default: the model's test split)")
    bn.add_argument("--batch", "--batch-size", dest="batch", metavar="LIST", type=comma_list(item=positive_int),
                    default=csv_text(default_of(BenchConfig, "batches")), help="comma list of batch sizes")
    bn.add_argument("--backend", "--backends", dest="backends", metavar="LIST", type=comma_list(BENCH_BACKENDS),
                    default=default_of(BenchConfig, "backends"),
                    help=f"comma list of {', '.join(BENCH_BACKENDS)} (default: those that can run on this machine; "
                         "one named here that cannot is reported as not run, with why)")
    floats = [p for p in BENCH_PRECISIONS if not p.startswith("int8")]
    bn.add_argument("--precision", "--precisions", dest="precisions", metavar="LIST",
                    type=precision_list(BENCH_PRECISIONS), default=csv_text(default_of(BenchConfig, "precisions")),
                    help=f"comma list of {', '.join(floats)}, int8 (every INT8 flavour), "
                         f"{', '.join(p for p in BENCH_PRECISIONS if p not in floats)}, as export --precision takes "
                         "them; bf16 is OpenVINO's hint on the FP32 artifact (default: all of them, those without an "
                         "artifact in ARTIFACT_DIR left out and named in one line of the report)")
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
