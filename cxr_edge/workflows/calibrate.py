"""Site calibration: set an artifact's operating threshold on the site's own labelled images.

A threshold chosen on the training data's validation split does not travel: on another hospital's images a model
can keep its ranking while the validation threshold flags most normals. ``calibrate`` screens the site's images
with the deployed engine, chooses the threshold for the target sensitivity there, reports the old and the new
operating point side by side with exact intervals, and writes the artifact's next manifest version (the previous
one is kept beside it; the artifact file, and so its sha256, is untouched). ``predict`` and ``serve`` read the new
one; a signed deployment must re-sign it. Optionally a temperature is fitted so the probabilities themselves are
calibrated on the site's data (applied by every consumer of the manifest; see ``decision.calibrated``). """

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..bundle import CALIBRATION_DIR, is_bundle, refresh_index
from ..classes import COVID
from ..data import scan_dataset
from ..data.labelled import load_items
from ..data.overlap import training_overlap
from ..decision import calibrated, choose_threshold, decide, describe_operating_point
from ..errors import ConfigError, DatasetError
from ..evaluation.intervals import exact_ci, min_samples_for_width
from ..manifest import ArtifactManifest, manifest_path, read_manifest, write_manifest
from ..manifest_schema import OperatingPoint, SiteCalibration
from ..runtime.screener import Screener

log = logging.getLogger(__name__)


def _operating(p_covid: np.ndarray, is_covid: np.ndarray, threshold: float) -> dict:
    pred = p_covid >= threshold
    tp, tn = int((pred & is_covid).sum()), int((~pred & ~is_covid).sum())
    n_pos, n_neg = int(is_covid.sum()), int((~is_covid).sum())
    return {"threshold": float(threshold), "sensitivity": tp / n_pos if n_pos else None,
            "sensitivity_ci95": exact_ci(tp, n_pos), "true_positives": tp, "n_positive": n_pos,
            "specificity": tn / n_neg if n_neg else None, "specificity_ci95": exact_ci(tn, n_neg),
            "true_negatives": tn, "n_negative": n_neg}


def fit_temperature(probs: np.ndarray, y: np.ndarray) -> float:
    """The temperature T minimising the negative log-likelihood of softmax(log p / T) on these labels."""
    from ..extras import require

    optimize = require("scipy.optimize")
    logp = np.log(np.clip(probs, 1e-12, 1.0))

    def nll(log_t: float) -> float:
        q = calibrated(probs, float(np.exp(log_t)), logp)
        return float(-np.mean(np.log(np.clip(q[np.arange(len(y)), y], 1e-12, 1.0))))

    res = optimize.minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(res.x))


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    conf, pred = probs.max(1), probs.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += m.mean() * abs(float((pred[m] == y[m]).mean()) - float(conf[m].mean()))
    return float(ece)


def _reliability_plot(probs_before, probs_after, y, path: Path, title: str) -> None:
    from ..extras import require

    mpl = require("matplotlib")
    mpl.use("Agg")
    plt = require("matplotlib.pyplot")
    fig, ax = plt.subplots(figsize=(5, 5))
    edges = np.linspace(0, 1, 11)
    for probs, name in ((probs_before, "before"), (probs_after, "after temperature")):
        conf, ok = probs.max(1), probs.argmax(1) == y
        xs, ys = [], []
        for lo, hi in zip(edges[:-1], edges[1:]):
            m = (conf > lo) & (conf <= hi)
            if m.sum() >= 3:
                xs.append(conf[m].mean())
                ys.append(ok[m].mean())
        ax.plot(xs, ys, "o-", label=f"{name} (ECE {expected_calibration_error(probs, y):.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@dataclass(frozen=True)
class CalibrationRequest:
    """What ``cxr-edge calibrate`` was asked: the artifact, the site's labelled images, and how to run and report.

    Checked when made, so a bad request fails before any image is screened."""

    artifact: Path
    data_dir: Path
    target_sensitivity: float = 0.95
    temperature: bool = False  # also fit a probability temperature on the site's images
    out_dir: Path | None = None  # the report's folder (default: calibration-<artifact>-v<version> beside it)
    dry_run: bool = False  # report only; leave the manifest as it is
    ci_width: float = 0.20  # the widest 95% exact interval the site's counts may leave (see minimum_counts)
    force: bool = False  # replace a report already in the report folder
    backend: str | None = None
    device: str = "auto"
    progress: bool = True
    self_check: str = "refuse"

    def __post_init__(self):
        if str(self.artifact).startswith("triton:/"):
            raise ConfigError("calibrate writes the artifact's manifest, so it needs the local file; calibrate it on the "
                              "Triton host and re-export the repository.")
        if not 0 < self.target_sensitivity < 1:
            raise ConfigError(f"--target-sensitivity must be between 0 and 1, got {self.target_sensitivity}.")
        if not 0 < self.ci_width <= 1:
            raise ConfigError(f"--ci-width is a fraction between 0 and 1 (0.2 for 20 points), got {self.ci_width}.")
        object.__setattr__(self, "artifact", Path(self.artifact))
        object.__setattr__(self, "data_dir", Path(self.data_dir))
        if self.out_dir is not None:
            object.__setattr__(self, "out_dir", Path(self.out_dir))


def minimum_counts(target_sensitivity: float, ci_width: float) -> tuple[int, int]:
    """(COVID images, other images) a calibration needs: enough that the exact 95% interval of the sensitivity at
    the target, and of the specificity at its least favourable value (50%), are each no wider than ``ci_width``.
    At the defaults (0.95, 0.20): 33 COVID and 104 others."""
    return min_samples_for_width(target_sensitivity, ci_width), min_samples_for_width(0.5, ci_width)


def check_counts(counts: dict[str, int], target_sensitivity: float, ci_width: float) -> None:
    """Refuse, before screening anything, a site set too small to support the threshold it would set."""
    need_pos, need_neg = minimum_counts(target_sensitivity, ci_width)
    pos = counts.get(COVID, 0)
    neg = sum(v for k, v in counts.items() if k != COVID)
    if pos >= need_pos and neg >= need_neg:
        return
    wider = min(1.0, round(ci_width + 0.1, 2))
    p2, n2 = minimum_counts(target_sensitivity, wider)
    raise DatasetError(
        f"{pos} {COVID} and {neg} other images cannot support a threshold: the exact 95% intervals are at most "
        f"{ci_width:.2f} wide only with at least {need_pos} {COVID} images (for the sensitivity, at {target_sensitivity:.2f}) "
        f"and {need_neg} other images (for the specificity). Collect more labelled site images, or accept a wider "
        f"interval (--ci-width {wider} needs {p2} and {n2}).")


def calibrate_artifact(artifact: str | Path, data_dir: str | Path, **options) -> dict:
    """Choose the site's operating point and write the artifact's next manifest version; returns the summary.
    ``options``: the other fields of :class:`CalibrationRequest`."""
    return run_calibration(CalibrationRequest(Path(artifact), Path(data_dir), **options))


@dataclass(frozen=True)
class _SiteScreening:
    """The deployed engine's own answers (before any earlier temperature) on the site's labelled images."""

    ds: Any
    probs: np.ndarray
    y: np.ndarray
    n_images: int
    n_skipped: int
    engine: str


@dataclass(frozen=True)
class _Choice:
    """The operating point before (as deployed) and after (chosen on the site's images), on the same images."""

    raw: np.ndarray  # what the deployed artifact reports today
    site_probs: np.ndarray  # with the new temperature, if any
    temperature: float | None
    before: dict
    after: dict
    accuracy: dict


def run_calibration(req: CalibrationRequest) -> dict:
    """Screen the site's images, choose the threshold there, report before/after, and write the next manifest."""
    old = read_manifest(req.artifact, verify=False)  # fail fast; the Screener verifies the hash when it loads
    classes = list(old.classes)
    if COVID not in classes:
        raise ConfigError(f"{req.artifact.name} has no {COVID} class ({classes}); there is no threshold to calibrate.")
    ds = scan_dataset(req.data_dir, classes=classes)
    check_counts(ds.class_counts(), req.target_sensitivity, req.ci_width)
    version = old.revision + 1
    out = _report_dir(req, version)
    if not req.dry_run:
        _check_history(req.artifact, version)
    overlap = training_overlap(ds, old.data, classes)
    if overlap.warning():
        log.warning(overlap.warning())
    screened = _screen_site(req, classes, ds)
    is_covid = screened.y == classes.index(COVID)  # images that could not be read do not count
    check_counts({COVID: int(is_covid.sum()), "other": int((~is_covid).sum())}, req.target_sensitivity, req.ci_width)
    choice = _choose(req, old, screened, classes)
    today = _dt.date.today().isoformat()
    site = SiteCalibration(data=str(req.data_dir.resolve()), fingerprint=screened.ds.fingerprint(),
                           n_images=screened.n_images, skipped=screened.n_skipped,
                           counts={c: int((screened.y == k).sum()) for k, c in enumerate(classes)}, date=today,
                           engine=screened.engine)
    new_op = OperatingPoint.from_dict({**choice.after, "target_sensitivity": req.target_sensitivity,
                                       "chosen_on": f"site data ({req.data_dir.name}, {today})"}, "operating_point")
    out.mkdir(parents=True, exist_ok=True)
    summary = {"artifact": req.artifact.name, "artifact_sha256": old.sha256, "manifest_version": version,
               "site": site.to_dict(),
               "target_sensitivity": req.target_sensitivity, "training_overlap": overlap.to_dict(),
               "minimum_counts": dict(zip((COVID, "other"), minimum_counts(req.target_sensitivity, req.ci_width))),
               "ci_width": req.ci_width, "dry_run": req.dry_run,
               "before": {**choice.before, "described": describe_operating_point(old.operating_point),
                          "accuracy": choice.accuracy["before"], "temperature": old.probability_temperature},
               "after": {**choice.after, "described": describe_operating_point(new_op), "accuracy": choice.accuracy["after"],
                         "temperature": choice.temperature}}
    _write_report(req, out, summary, choice, screened.y)
    if not req.dry_run:
        summary["manifest"] = str(_write_next_manifest(req.artifact, old, version, new_op, site, choice.temperature))
        from ..signing import signature_path

        if signature_path(req.artifact).is_file():
            summary["signature"] = ("the previous signature no longer matches this manifest: re-sign it with "
                                    f"cxr-edge sign {req.artifact} --key KEY.key before serving with --trusted-key")
            log.warning(summary["signature"])
    if is_bundle(req.artifact.parent) and not req.dry_run:  # a dry run's report is not part of what is deployed
        refresh_index(req.artifact.parent)  # the new manifest, the kept one and the report are part of the bundle
        summary["bundle"] = str(req.artifact.parent)
    return summary


def _report_dir(req: CalibrationRequest, version: int) -> Path:
    """Where the report goes: inside a bundle, its calibration/ folder; a dry run gets its own dated folder. A folder
    that already holds a report is refused unless ``force``: an earlier calibration's evidence is never overwritten."""
    base = req.artifact.parent / CALIBRATION_DIR if is_bundle(req.artifact.parent) else req.artifact.parent
    name = f"calibration-{req.artifact.name}-v{version}"
    if req.dry_run:
        name += "-dry-run-" + _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = req.out_dir or base / name
    if (out / "calibration.json").exists() and not req.force:
        raise ConfigError(f"{out} already holds a calibration report; choose another --out, or pass --force to "
                          "replace it.")
    return out


def _screen_site(req: CalibrationRequest, classes: list[str], ds) -> _SiteScreening:
    labels = {i.label for i in ds.items}
    if COVID not in labels or len(labels) < 2:
        raise DatasetError(f"{req.data_dir} must hold labelled {COVID} images and at least one other class "
                           f"({classes}); found {sorted(labels) or 'none'}.")
    with Screener(req.artifact, backend=req.backend, device=req.device, isolation=None, batch_size=32,
                  self_check=req.self_check) as s:
        data = load_items(ds.items, classes, s.engine.spec, progress=req.progress)
        # the engine's own output, before any temperature an earlier calibration set
        probs = s.engine.infer_all(data.x, 32, calibrated=False).astype(np.float64)
        info = s.engine.info
    return _SiteScreening(ds, probs, data.y, len(data.items), len(data.loaded.errors),
                          f"{info.backend} / {info.provider} / {info.precision}")


def _choose(req: CalibrationRequest, old: ArtifactManifest, screened: _SiteScreening, classes: list[str]) -> _Choice:
    probs, y = screened.probs, screened.y
    old_t = old.probability_temperature
    raw = calibrated(probs, old_t) if old_t else probs  # what the deployed artifact reports today
    t_new = fit_temperature(probs, y) if req.temperature else old_t
    site_probs = calibrated(probs, t_new) if t_new else probs
    ci = classes.index(COVID)
    is_covid = y == ci
    chosen = choose_threshold(is_covid, site_probs[:, ci], req.target_sensitivity)
    old_threshold = old.threshold if old.threshold is not None else 0.5
    before = _operating(raw[:, ci], is_covid, old_threshold)
    after = _operating(site_probs[:, ci], is_covid, chosen["threshold"])
    accuracy = {"before": float((decide(raw, classes, old_threshold) == y).mean()),
                "after": float((decide(site_probs, classes, chosen["threshold"]) == y).mean())}
    return _Choice(raw, site_probs, t_new, before, after, accuracy)


def _write_report(req: CalibrationRequest, out: Path, summary: dict, choice: _Choice, y: np.ndarray) -> None:
    """calibration.json/.md (and, with a fitted temperature, the reliability plot) in ``out``."""
    if req.temperature:
        summary["calibration_error"] = {"ece_before": expected_calibration_error(choice.raw, y),
                                        "ece_after": expected_calibration_error(choice.site_probs, y)}
        _reliability_plot(choice.raw, choice.site_probs, y, out / "reliability.png",
                          f"{req.artifact.name} on {req.data_dir.name} (n={len(y)})")
    (out / "calibration.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "calibration.md").write_text(render(summary))
    summary["report"] = str(out / "calibration.md")


def _check_history(artifact: Path, version: int) -> Path:
    """Where the current manifest will be kept; a different file already there (a manifest restored or edited by
    hand) is refused before anything is screened, never overwritten."""
    mpath = manifest_path(artifact)
    kept = mpath.with_name(f"{artifact.name}.manifest.v{version - 1}.json")
    if kept.exists() and kept.read_bytes() != mpath.read_bytes():
        raise ConfigError(f"{kept.name} already exists and differs from the current manifest (v{version - 1}): a manifest "
                          "was restored or edited by hand. Move the old file away, then calibrate again.")
    return kept


def _write_next_manifest(artifact: Path, old: ArtifactManifest, version: int, new_op: OperatingPoint,
                         site: SiteCalibration, temperature: float | None) -> Path:
    """Keep the current manifest as ``.manifest.v<N>.json`` and write version N+1: same file, same sha256, the new
    operating point (the old one moves to the history), the site and the temperature."""
    mpath = manifest_path(artifact)
    kept = _check_history(artifact, version)
    shutil.copy2(mpath, kept)
    previous = dataclasses.replace(old.operating_point or OperatingPoint(), manifest_version=version - 1)
    new = dataclasses.replace(old, manifest_version=version, operating_point=new_op,
                              operating_point_history=(*old.operating_point_history, previous), site_calibration=site,
                              probability_temperature=temperature or old.probability_temperature)
    write_manifest(artifact, new, stamp=False)  # checks the sha256 still matches and parses its own text back
    return mpath


def _overlap_line(ov: dict) -> str:
    if not ov:
        return "not checked"
    if ov.get("checked") == "not possible":
        return f"could not be checked ({ov.get('note', '')})"
    counts = ", ".join(f"{v} in its {k} split" if k != "all" else f"{v}" for k, v in ov.get("counts", {}).items() if v)
    return f"{counts or 'none'} of the {ov.get('n_site')} site images ({ov.get('note', '')})"


def render(s: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    def ci(v):
        return f"{pct(v[0])}-{pct(v[1])}" if v else "n/a"

    def temp(t):
        return f"{t:.3f}" if t else "none"

    def rate(d, k, n, name):
        return f"{d[k]}/{d[n]} = {pct(d[name])} (95% CI {ci(d[name + '_ci95'])})"

    b, a = s["before"], s["after"]
    lines = [f"# Site calibration of {s['artifact']} (manifest v{s['manifest_version']}"
             + (", dry run: not applied)" if s.get("dry_run") else ")"), ""]
    ov = s.get("training_overlap") or {}
    if ov.get("seen"):
        where = ", ".join(f"{v} in {k}" for k, v in ov["counts"].items() if v)
        lines += [f"**WARNING: {ov['seen']} of the {ov['n_site']} site images were in this model's training data "
                  f"({where}).** A threshold chosen on them measures what the model memorised, not this site; "
                  "calibrate on images the model never saw.", ""]
    lines += [
             f"- site data: {s['site']['data']} ({s['site']['n_images']} images: "
             + ", ".join(f"{k} {v}" for k, v in s["site"]["counts"].items() if v) + f"; {s['site']['skipped']} skipped)",
             f"- engine: {s['site']['engine']}", f"- target: {100 * s['target_sensitivity']:.0f}% COVID sensitivity",
             f"- images the model was trained on: {_overlap_line(ov)}",
             f"- minimum accepted: {s['minimum_counts'][COVID]} COVID and {s['minimum_counts']['other']} other images "
             f"(exact 95% intervals no wider than {s['ci_width']:.2f})" if "minimum_counts" in s else "", "",
             "| | before (as deployed) | after (this site) |", "|---|---|---|",
             f"| threshold | {b['threshold']:.3f} ({b['described'] or 'default'}) | {a['threshold']:.3f} ({a['described']}) |",
             f"| sensitivity | {rate(b, 'true_positives', 'n_positive', 'sensitivity')} | "
             f"{rate(a, 'true_positives', 'n_positive', 'sensitivity')} |",
             f"| specificity | {rate(b, 'true_negatives', 'n_negative', 'specificity')} | "
             f"{rate(a, 'true_negatives', 'n_negative', 'specificity')} |",
             f"| accuracy (decision rule) | {pct(b['accuracy'])} | {pct(a['accuracy'])} |",
             f"| probability temperature | {temp(b['temperature'])} | {temp(a['temperature'])} |", ""]
    if "calibration_error" in s:
        e = s["calibration_error"]
        lines += [f"Expected calibration error {e['ece_before']:.3f} -> {e['ece_after']:.3f} (reliability.png).", ""]
    lines += ["Intervals are exact (Clopper-Pearson) 95% intervals: with few site images they are wide, and the "
              "new threshold is only as good as the site data is representative. Re-calibrate when the equipment, "
              "protocol or population changes.", ""]
    if s.get("signature"):
        lines += [f"**Signature:** {s['signature']}.", ""]
    return "\n".join(lines)
