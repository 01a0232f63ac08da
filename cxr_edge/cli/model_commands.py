"""Commands that make models and artifacts: demo, recipes, train, evaluate, export, build."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import ExitCode
from ..precision import EXPORTED_PRECISIONS, Int8Target
from ._common import INT8_TAGS, HelpFormatter, add_engine_args, comma_list, csv_text, default_of, fraction, positive_int

SPLITS = ("auto", "train", "val", "test", "all")
ENGINE_PRECISIONS = tuple(p.value for p in EXPORTED_PRECISIONS)
EXPORT_PRECISIONS = (*ENGINE_PRECISIONS, *INT8_TAGS)  # "int8" for every --int8-target, or one INT8 variant by tag
INT8_TARGETS = tuple(t.value for t in Int8Target)


def cmd_demo(a) -> None:
    from ..demo import run_demo

    run_demo(a.out, a.data, per_class=a.per_class, seed=a.seed)


def cmd_recipes(a) -> None:
    from ..train.recipes import RECIPES

    for r in RECIPES.values():
        print(f"{r.name:16s} {r.description}; classes {', '.join(r.classes)}; {r.image_size}px, {r.mode.value}, "
              f"{r.optimizer} lr {r.learning_rate}, batch {r.batch_size}, {r.epochs} epochs")


def one_data_dir(a) -> str:
    """DATA given once, positionally (as every command takes it) or by --data; both and different is a usage error."""
    from ..errors import UsageError

    if a.data and a.data_option and a.data != a.data_option:
        raise UsageError(f"DATA given twice ({a.data} and --data {a.data_option}); give it once.")
    data = a.data or a.data_option
    if not data:
        raise UsageError("train needs DATA: cxr-edge train DATA --recipe small_cnn --out runs/model")
    return data


def cmd_train(a) -> None:
    from ..train.trainer import TrainConfig, train

    data = one_data_dir(a)
    cfg = TrainConfig(recipe=a.recipe, epochs=a.epochs, batch_size=a.batch_size, learning_rate=a.lr,
                      image_size=a.image_size, fine_tune_epochs=a.fine_tune_epochs, weights=a.weights,
                      seed=a.seed, target_sensitivity=a.target_sensitivity, metadata_csv=a.metadata,
                      max_images=a.max_images, verbose=1 if sys.stdout.isatty() else 2)
    r = train(cfg, data, a.out)
    print(f"Model: {r.model_path}\nManifest: {r.manifest_path}\nHistory: {r.history_path}")
    print(json.dumps(r.val_metrics))


def cmd_evaluate(a) -> None:
    """A .keras model through Keras (train extra); any other artifact through the TensorFlow-free runtime."""
    from ..errors import ConfigError

    model = str(a.model)
    out = a.out or (str(Path(model).parent / ("report" if model.endswith(".keras") else f"report-{Path(model).name}"))
                    if not model.startswith("triton://") else "report-triton")
    kw = dict(split=a.split, threshold=a.threshold, common_size=a.common_size, n_boot=a.bootstrap)
    if model.endswith(".keras"):
        if a.backend or a.device != "auto":
            raise ConfigError("--backend and --device apply to exported artifacts; a .keras model runs on Keras.")
        from ..train.evaluate import evaluate_model

        report, m = evaluate_model(model, a.data, out, **kw)
    else:
        from ..workflows.evaluate import evaluate_artifact

        report, m = evaluate_artifact(model, a.data, out, backend=a.backend, device=a.device, self_check=a.self_check,
                                      **kw)
    cov = m.get("covid") or {}

    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    auc = m["roc_auc_macro"]
    line = f"accuracy {pct(m['accuracy'])}  macro ROC-AUC {'n/a' if auc is None else f'{auc:.3f}'}  n={m['n']}"
    if cov:
        ci_s, ci_p = cov.get("sensitivity_ci95") or [None, None], cov.get("specificity_ci95") or [None, None]
        line += (f"\nCOVID sensitivity {pct(cov.get('sensitivity'))} (95% CI {pct(ci_s[0])}-{pct(ci_s[1])}), "
                 f"specificity {pct(cov.get('specificity'))} (95% CI {pct(ci_p[0])}-{pct(ci_p[1])}) "
                 f"at threshold {cov['threshold']:.2f}")
    print(line)
    print(f"Report: {report}")


def cmd_export(a) -> int:
    from ..export.pipeline import ExportConfig, export_model

    # comma_list (and the dataclass default) give tuples: the fields' own type, no text to split again
    cfg = ExportConfig(precisions=tuple(a.precision), int8_targets=tuple(a.int8_target), calib_data=a.calib,
                       calib_method=a.calib_method, calib_size=a.calib_size, force=a.force, opset=a.opset,
                       fold_preprocessing=not a.no_fold, bundles=not a.no_bundles)
    s = export_model(a.model, a.out, cfg)
    print((s.out_dir / "export_report.md").read_text())
    if not s.ok:
        failed = [x.variant for x in s.artifacts if x.gate and not x.gate.passed]
        print(f"error: {', '.join(failed)} failed the accuracy gate" + (" (kept, marked failed, --force)" if a.force else ""),
              file=sys.stderr)
        return ExitCode.GATE_FAILED
    return ExitCode.OK


def cmd_build(a) -> None:
    from ..export.tensorrt_build import BuildConfig, build_engine

    cfg = BuildConfig.from_batch_text(a.precision, a.batch, workspace_mb=a.workspace, dla_core=a.dla,
                                      timing_cache=a.timing_cache, allow_tf32=a.allow_tf32, gate=a.gate,
                                      gate_data=a.gate_data, force=a.force)
    from ..bundle import make_bundle

    engine = build_engine(a.artifact, cfg, a.out, calib_data=a.calib)
    print(f"Engine: {engine}\nBundle (copy this folder to the GPU box): {make_bundle(engine, replace=True)}")


def register(sub) -> None:
    _add_demo_parser(sub)
    _add_recipes_parser(sub)
    _add_train_parser(sub)
    _add_evaluate_parser(sub)
    _add_export_parser(sub)
    _add_build_parser(sub)


def _add_demo_parser(sub) -> None:
    import inspect

    from ..demo import run_demo

    demo_defaults = {k: v.default for k, v in inspect.signature(run_demo).parameters.items()}
    d = sub.add_parser("demo", help="synthesise data, train the small CNN, evaluate, export, bench (minutes on a CPU)",
                       formatter_class=HelpFormatter)
    d.add_argument("--data", help="use this data directory instead of synthetic images")
    d.add_argument("--out", default=str(demo_defaults["out_dir"]), help="output directory")
    d.add_argument("--per-class", type=positive_int, default=demo_defaults["per_class"],
                   help="synthetic images per class")
    d.add_argument("--seed", type=int, default=demo_defaults["seed"], help="random seed")
    d.set_defaults(func=cmd_demo)


def _add_recipes_parser(sub) -> None:
    r = sub.add_parser("recipes", help="list the training recipes", formatter_class=HelpFormatter)
    r.set_defaults(func=cmd_recipes)


def _add_train_parser(sub) -> None:
    from ..train.recipes import RECIPES
    from ..train.trainer import TrainConfig

    t = sub.add_parser("train", help="train a recipe on a data directory", formatter_class=HelpFormatter)
    t.add_argument("--recipe", default=default_of(TrainConfig, "recipe"), choices=list(RECIPES), help="recipe")
    t.add_argument("data", nargs="?", help="labelled data directory (class folders), as for evaluate and calibrate")
    t.add_argument("--data", dest="data_option", metavar="DATA", help="the same, as a flag (older scripts)")
    t.add_argument("--out", default="runs/model", help="output directory")
    t.add_argument("--epochs", type=positive_int, help="epochs (default: the recipe's)")
    t.add_argument("--batch-size", type=positive_int, help="batch size (default: the recipe's)")
    t.add_argument("--lr", type=float, help="learning rate (default: the recipe's)")
    t.add_argument("--image-size", type=positive_int, help="input size in pixels (default: the recipe's)")
    t.add_argument("--fine-tune-epochs", type=int, help="fine-tuning epochs (default: the recipe's)")
    t.add_argument("--weights", default=default_of(TrainConfig, "weights"),
                   help="backbone recipes: imagenet (Keras cache) | path/to/notop.h5 | none")
    t.add_argument("--target-sensitivity", type=fraction, default=default_of(TrainConfig, "target_sensitivity"),
                   help="COVID sensitivity the operating threshold is chosen for, on the validation split")
    t.add_argument("--metadata", help="CSV with per-image patient ids / sources (SOURCES.csv is found automatically)")
    t.add_argument("--max-images", type=positive_int, help="cap per split, for smoke runs")
    t.add_argument("--seed", type=int, default=default_of(TrainConfig, "seed"), help="random seed")
    t.set_defaults(func=cmd_train)


def _add_evaluate_parser(sub) -> None:
    from ..runtime.backends.registry import all_backends

    e = sub.add_parser("evaluate", help="evaluate a model or a deployable artifact: report.json/.md and plots",
                       formatter_class=HelpFormatter)
    e.add_argument("model", help="a .keras model (needs the train extra), or an exported artifact (ONNX, TensorRT "
                                 ".plan) or triton://host:port/model, evaluated on the engine that would screen")
    e.add_argument("data", help="labelled data directory")
    e.add_argument("--out", help="report directory (default: <model dir>/report)")
    e.add_argument("--split", default="auto", choices=SPLITS,
                   help="auto: the model's test split when DATA is its training data, else all images")
    e.add_argument("--threshold", type=float, help="COVID threshold (default: the manifest's operating point)")
    e.add_argument("--common-size", type=positive_int, help="down-sample every image to NxN first (size-leak check)")
    e.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the ROC-AUC interval "
                                                               "(sensitivity/specificity use exact intervals)")
    add_engine_args(e, all_backends())  # exported artifacts only: a .keras model runs on Keras
    e.set_defaults(func=cmd_evaluate)


def _add_export_parser(sub) -> None:
    from ..export.pipeline import ExportConfig
    from ..export.quantize import CALIBRATION_METHODS

    x = sub.add_parser("export", help="Keras model -> gated FP32/FP16/INT8 ONNX artifacts with manifests",
                       formatter_class=HelpFormatter)
    x.add_argument("model", help="a .keras model from cxr-edge train")
    x.add_argument("--out", required=True, help="artifact directory")
    x.add_argument("--precision", type=comma_list(EXPORT_PRECISIONS), default=default_of(ExportConfig, "precisions"),
                   help=f"comma list of {', '.join(EXPORT_PRECISIONS)}")
    x.add_argument("--int8-target", type=comma_list(INT8_TARGETS), default=default_of(ExportConfig, "int8_targets"),
                   help="INT8 flavours for 'int8': trt (S8S8, TensorRT), cpu (U8S8, ONNX Runtime), "
                   "ov (signed tensors S8, the rest U8: OpenVINO)")
    x.add_argument("--calib", help="labelled data dir: calibration from its train split, gates on its val split "
                   "(default: the model's training data, else synthetic)")
    x.add_argument("--calib-method", default=default_of(ExportConfig, "calib_method"), choices=CALIBRATION_METHODS,
                   help="first INT8 calibration method (the others are tried if the gate fails)")
    x.add_argument("--calib-size", type=positive_int, default=default_of(ExportConfig, "calib_size"),
                   help="calibration images")
    x.add_argument("--opset", type=int, default=default_of(ExportConfig, "opset"), help="ONNX opset (>= 17)")
    x.add_argument("--force", action="store_true", help="keep artifacts that fail their gate, marked failed")
    x.add_argument("--no-bundles", action="store_true",
                   help="do not write OUT/bundles/ (one folder per gate-passing artifact with everything a kiosk needs)")
    x.add_argument("--no-fold", action="store_true",
                   help="keep the exported preprocessing as it is instead of folding it into the first convolution "
                        "where that is exact (for comparing the two)")
    x.set_defaults(func=cmd_export)


def _add_build_parser(sub) -> None:
    from ..export.tensorrt_build import BuildConfig

    b = sub.add_parser("build", help="TensorRT engine from an exported ONNX artifact (GPU + TensorRT)",
                       formatter_class=HelpFormatter)
    b.add_argument("artifact", help="model.fp32.onnx, model.fp16.onnx or model.int8-trt.onnx")
    b.add_argument("--precision", required=True, choices=ENGINE_PRECISIONS,
                   help="engine precision (int8 needs the int8-trt artifact)")
    b.add_argument("--batch", default=csv_text((default_of(BuildConfig, "min_batch"), default_of(BuildConfig, "opt_batch"),
                                                default_of(BuildConfig, "max_batch"))),
                   help="optimisation profile MIN,OPT,MAX")
    b.add_argument("--workspace", type=positive_int, default=default_of(BuildConfig, "workspace_mb"),
                   help="builder workspace in MB")
    b.add_argument("--dla", type=int, help="Jetson DLA core")
    b.add_argument("--timing-cache", help="persistent timing cache file")
    b.add_argument("--calib", help="calibration data for INT8 on DLA (implicit calibration); unused otherwise")
    b.add_argument("--out", help="engine path (default: beside the ONNX)")
    b.add_argument("--allow-tf32", action="store_true",
                   help="let FP32 layers use TF32 tensor cores (TF32 rounds inputs to 10 mantissa bits)")
    b.add_argument("--gate", action=argparse.BooleanOptionalAction, default=default_of(BuildConfig, "gate"),
                   help="run the built engine against the FP32 ONNX with the export gate's criteria")
    b.add_argument("--gate-data", help="labelled images for the engine gate (default: the artifact's calibration "
                   "data when present, else synthetic images)")
    b.add_argument("--force", action="store_true", help="keep an engine that fails its gate, marked failed")
    b.set_defaults(func=cmd_build)
