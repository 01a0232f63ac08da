"""Write an evaluation as report.json, report.md and PNG plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from ..extras import require

CAVEAT = (
    "Caveat on public CXR data: in the public COVID collections, Normal and Viral Pneumonia images are "
    "mostly pediatric and COVID images adult, and image size differs by class. A model can score well "
    "by learning age or resize artefacts rather than COVID. Read the per-source table and the size-only "
    "probe before trusting these numbers; they are not a clinical validation."
)


def _plt():
    mpl = require("matplotlib")
    mpl.use("Agg")
    return require("matplotlib.pyplot")


def plot_confusion(cm, classes, path: Path, subtitle: str = "") -> None:
    plt = _plt()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(4 + len(classes), 3.5 + len(classes)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black", fontsize=14)
    ax.set_title("Confusion matrix" + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roc(curves: dict, aucs: dict, path: Path, operating: dict | None = None, subtitle: str = "") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    for c, r in curves.items():
        if r:
            ax.plot(r["fpr"], r["tpr"], label=f"{c} (AUC {aucs[c]:.3f})")
    if operating and operating.get("sensitivity") is not None and operating.get("specificity") is not None:
        ax.plot(1 - operating["specificity"], operating["sensitivity"], "ko",
                label=f"COVID operating point (t={operating['threshold']:.3g})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_title("ROC, one-vs-rest" + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_history(path: Path) -> dict[str, list[float]] | None:
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return None
    return {k: [float(r[k]) for r in rows if r.get(k) not in (None, "")] for k in rows[0]}


def training_note(hist: dict) -> dict | None:
    """Which epoch the checkpoint kept (lowest validation loss, as ModelCheckpoint saves) and whether the
    loss was still falling when training stopped (then more epochs would likely help)."""
    val = hist.get("val_loss") or []
    if not val:
        return None
    best = int(np.argmin(val))
    tail = val[-3:]
    falling = len(val) >= 3 and all(b < a for a, b in zip(tail, tail[1:]))
    text = f"saved epoch {best + 1} of {len(val)} (lowest validation loss {val[best]:.3f})"
    if falling:
        text += "; validation loss was still falling at the last epoch: more epochs would likely help"
    elif best + 1 == len(val):
        text += "; it was the last epoch"
    return {"saved_epoch": best + 1, "epochs": len(val), "still_falling": falling, "text": text}


def plot_history(hist: dict, path: Path, fine_tune_start: int | None = None) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    note = training_note(hist)
    epochs = [e + 1 for e in hist.get("epoch", range(len(hist.get("loss", []))))]
    for ax, metric in zip(axes, ("accuracy", "loss")):
        for key, style in ((metric, "-o"), (f"val_{metric}", "-s")):
            if key in hist:
                ax.plot(epochs[: len(hist[key])], hist[key], style, label=key.replace("_", " "), ms=3)
        if fine_tune_start:
            ax.axvline(fine_tune_start + 0.5, color="grey", ls=":", label="fine-tuning starts")
        if note:
            ax.axvline(note["saved_epoch"], color="green", ls="--", lw=1, label=f"saved (epoch {note['saved_epoch']})")
        ax.set_xlabel("epoch")
        ax.set_title(metric + (" (still falling at the end)" if note and note["still_falling"] and metric == "loss" else ""))
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v, pct=False):
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.3f}"


def render_markdown(r: dict, context: dict) -> str:
    classes = r["classes"]
    lines = [f"# Evaluation: {context.get('model', '')}", ""]
    for k in ("engine", "data", "split", "n_images", "skipped", "common_size", "training"):
        if context.get(k) is not None:
            lines.append(f"- {k.replace('_', ' ')}: {context[k]}")
    if context.get("operating_point"):
        lines.append(f"- operating point: {context['operating_point']}")
    lines += [f"- decision rule: {r['decision_rule']}", "", CAVEAT, "", "## Summary", "",
              f"- accuracy: {_fmt(r['accuracy'], True)} (argmax: {_fmt(r['accuracy_argmax'], True)}), "
              f"macro F1 {_fmt(r['macro_f1'])}, macro ROC-AUC {_fmt(r['roc_auc_macro'])}"]
    cov = r.get("covid")
    if cov:
        def ci(v):
            return f" (95% CI {_fmt(v[0], True)}-{_fmt(v[1], True)})" if v else ""
        tp = f"{cov['true_positives']}/{cov['n_positive']} " if "true_positives" in cov else ""
        tn = f"{cov['true_negatives']}/{cov['n_negative']} " if "true_negatives" in cov else ""
        lines.append(f"- COVID sensitivity {tp}= {_fmt(cov['sensitivity'], True)}{ci(cov['sensitivity_ci95'])}, "
                     f"specificity {tn}= {_fmt(cov['specificity'], True)}{ci(cov['specificity_ci95'])} "
                     f"at threshold {cov['threshold']:.2f}")
        if cov.get("auc_ci95"):
            lines.append(f"- COVID ROC-AUC {_fmt(r['roc_auc'].get('COVID'))} (95% CI {_fmt(cov['auc_ci95'][0])}-"
                         f"{_fmt(cov['auc_ci95'][1])}); intervals: {cov.get('interval_method', 'bootstrap')}")
    lines += ["", "## Per class", "", "| class | precision | recall | F1 | support | ROC-AUC |", "|---|---|---|---|---|---|"]
    for c in classes:
        p = r["per_class"][c]
        lines.append(f"| {c} | {_fmt(p['precision'])} | {_fmt(p['recall'])} | {_fmt(p['f1-score'])} | "
                     f"{int(p['support'])} | {_fmt(r['roc_auc'][c])} |")
    lines += ["", "## Confusion matrix (rows: true, columns: predicted)", "",
              "| | " + " | ".join(classes) + " |", "|---" * (len(classes) + 1) + "|"]
    for c, row in zip(classes, r["confusion_matrix"]):
        lines.append(f"| **{c}** | " + " | ".join(str(v) for v in row) + " |")
    if r.get("per_source"):
        lines += ["", "## Per source", "", "| source | n | counts | accuracy | COVID sens. | COVID spec. | COVID AUC |",
                  "|---|---|---|---|---|---|---|"]
        for s, e in r["per_source"].items():
            counts = ", ".join(f"{k}: {v}" for k, v in e["counts"].items() if v)
            lines.append(f"| {s} | {e['n']} | {counts} | {_fmt(e['accuracy'], True)} | "
                         f"{_fmt(e.get('covid_sensitivity'), True)} | {_fmt(e.get('covid_specificity'), True)} | "
                         f"{_fmt(e.get('covid_auc'))} |")
        lines.append("")
        lines.append("A source holding a single class cannot tell whether the model learned the disease or the source.")
    probe = r.get("size_probe")
    if probe:
        lines += ["", "## Size-only probe", "",
                  f"Accuracy from image size alone: {_fmt(probe['accuracy_from_size_only'], True)} "
                  f"(majority class: {_fmt(probe['majority_class_rate'], True)}, {probe['folds']}-fold CV). "
                  + probe["explanation"]]
    lines += ["", "Plots: confusion_matrix.png, roc.png" + (", training_curves.png" if context.get("curves") else ""), ""]
    return "\n".join(lines)


def write_report(result: dict, out_dir: str | Path, context: dict, history_path: Path | None = None,
                 fine_tune_start: int | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # every plot says what it was measured on: split, n and the decision threshold
    cov = result.get("covid") or {}
    subtitle = f"split {context.get('split', '?')}, n={result.get('n')}" + (
        f", COVID threshold {cov['threshold']:.2f}" if cov.get("threshold") is not None else ", argmax")
    plot_confusion(result["confusion_matrix"], result["classes"], out / "confusion_matrix.png", subtitle)
    plot_roc(result["roc_curves"], result["roc_auc"], out / "roc.png", result.get("covid"), subtitle)
    hist = read_history(history_path) if history_path else None
    if hist:
        plot_history(hist, out / "training_curves.png", fine_tune_start)
        context = {**context, "curves": True}
        if (note := training_note(hist)) is not None:
            context["training"] = note["text"]
    doc = {**context, "metrics": {k: v for k, v in result.items() if k != "roc_curves"},
           "roc_curves": result["roc_curves"], "history": hist, "caveat": CAVEAT}
    (out / "report.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (out / "report.md").write_text(render_markdown(result, context))
    return out / "report.md"
