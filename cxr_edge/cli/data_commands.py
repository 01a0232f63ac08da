"""Commands about data: synth (a synthetic dataset), scan (what a folder holds and what is wrong with it)."""

from __future__ import annotations

import json

from ._common import HelpFormatter, comma_list, positive_int


def cmd_synth(a) -> None:
    from ..synthetic import write_synthetic_dataset

    out = write_synthetic_dataset(a.out, per_class=a.per_class, seed=a.seed)
    print(f"Wrote synthetic dataset to {out}")


def cmd_scan(a) -> None:
    from ..data import scan_dataset, split_dataset
    from ..data.split import split_counts

    ds = scan_dataset(a.data, classes=list(a.classes) if a.classes else None, metadata_csv=a.metadata)
    print(ds.summary())
    print("split counts:", json.dumps(split_counts(split_dataset(ds, seed=a.seed), ds.classes)))
    if a.decode:
        from ..data.loading import load_images
        from ..preprocess import NormMode, PreprocessSpec

        res = load_images([i.path for i in ds.items], PreprocessSpec(64, 64, NormMode.RAW), progress=True)
        print(f"decoded {len(res.kept)} of {len(ds.items)}; {len(res.errors)} bad:")
        for e in res.errors:
            print(f"  {e}")


def register(sub) -> None:
    _add_synth_parser(sub)
    _add_scan_parser(sub)


def _add_synth_parser(sub) -> None:
    import inspect

    from ..synthetic import write_synthetic_dataset

    synth = {k: v.default for k, v in inspect.signature(write_synthetic_dataset).parameters.items()}
    s = sub.add_parser("synth", help="write a synthetic CXR-like dataset", formatter_class=HelpFormatter)
    s.add_argument("out", help="output directory")
    s.add_argument("--per-class", type=positive_int, default=synth["per_class"], help="images per class")
    s.add_argument("--seed", type=int, default=synth["seed"], help="random seed")
    s.set_defaults(func=cmd_synth)


def _add_scan_parser(sub) -> None:
    sc = sub.add_parser("scan", help="report what a data directory holds, its split, and bad files",
                        formatter_class=HelpFormatter)
    sc.add_argument("data", help="data directory (class folders)")
    sc.add_argument("--classes", type=comma_list(), help="comma-separated, e.g. COVID,Normal (default: all found)")
    sc.add_argument("--metadata", help="CSV with per-image patient ids / sources")
    sc.add_argument("--decode", action="store_true", help="decode every file and list the bad ones")
    sc.add_argument("--seed", type=int, default=0, help="split seed")
    sc.set_defaults(func=cmd_scan)
