"""Per-machine tuning: which backend and settings run *this* artifact fastest on *this* CPU.

The fastest backend differs by machine (OpenVINO INT8 is far ahead of ONNX Runtime INT8 on some CPUs and level with
it on others), and so do the OpenVINO stream count and the thread count that win. ``cxr-edge tune`` measures the
candidates once, for single-image latency (kiosk) and for batched throughput (service, folders), and caches the
winners under the machine's fingerprint and the artifact's sha256: a different CPU, a runtime upgrade or a re-
exported artifact is a new key, never a stale answer. Screener, predict, serve and bench read the cache when no
backend is named; a backend or setting given explicitly always wins. """

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..machine import usable_cores
from ..manifest import Manifest, read_manifest

log = logging.getLogger(__name__)

USES = ("single", "batched")
def machine_fingerprint() -> dict[str, Any]:
    """What decides which configuration wins: the CPU, its usable cores, and the runtimes' versions."""
    from ..machine import machine_facts

    return machine_facts().to_dict()


def cache_dir() -> Path:
    """Beside ONNX Runtime's engine caches (XDG_CACHE_HOME/cxr-edge), unless CXR_EDGE_CACHE says otherwise."""
    base = os.environ.get("CXR_EDGE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cxr-edge"
    return Path(base) / "tuning"


def tuning_file(artifact: str | Path, fingerprint: dict | None = None) -> Path:
    sha = read_manifest(artifact, verify=False).sha256 or ""
    fp = fingerprint or machine_fingerprint()
    return cache_dir() / f"{fp['id']}-{sha[:16]}.json"


@dataclass(frozen=True)
class Choice:
    backend: str
    options: dict
    measured: str  # e.g. "p90 6.1 ms at batch 1" / "412 img/s at batch 16"
    source: str  # the cache file it came from

    def describe(self) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.backend}" + (f" ({opts})" if opts else "") + f": {self.measured}, tuned ({Path(self.source).name})"


def tuned_choice(artifact: str | Path, use: str) -> Choice | None:
    """The cached winner for ``use`` on this machine, or None when this artifact was not tuned here."""
    if use not in USES:
        raise ConfigError(f"tuning use must be one of {', '.join(USES)}, got {use!r}.")
    try:
        path = tuning_file(artifact)
        doc = json.loads(path.read_text())
    except (OSError, ValueError, KeyError):
        return None
    win = (doc.get("winners") or {}).get(use)
    if not win:
        return None
    return Choice(win["backend"], dict(win.get("options") or {}), win.get("measured", ""), str(path))


@dataclass(frozen=True)
class TuningTarget:
    """An artifact as tuning times it: what a backend may look at to say which of its settings are worth measuring."""

    artifact: Path
    manifest: Manifest
    fmt: str
    batch: int  # the batched use's size; the single use is batch 1
    device: str = "auto"  # where the candidates run: open_backend's default, as Screener and serve use it


def candidates(target: TuningTarget, cores: int) -> list[tuple[str, dict]]:
    """(backend, options) worth measuring for ``target`` on ``cores`` cores: each backend that runs its format says
    which of its settings matter here (:meth:`~.backends.base.Backend.tuning_candidates`), so none is named here."""
    from .backends.registry import backend_class, backends_for

    return [(name, opts) for name in backends_for(target.fmt)
            for opts in backend_class(target.fmt, name).tuning_candidates(
                target.artifact, target.manifest, device=target.device, batch=target.batch, cores=cores)]


def tune(artifact: str | Path, batch: int = 16, budget_s: float = 2.0, rounds: int = 3,
         progress: bool = True) -> dict:
    """Measure every candidate on synthetic inputs of the artifact's shape; returns (and caches) the record.

    ``budget_s``: seconds of timing per candidate, split over the rounds and the two uses.

    Candidates run in interleaved rounds (each once per round, order rotated) so a noisy neighbour on a
    shared VM hits them alike. A candidate is eligible only if its load-time self-check passed: its answers
    on the artifact's reference images within the artifact's tolerance of the FP32 model's
    (:mod:`cxr_edge.self_check`), never merely close to another backend that may be wrong the same way.
    An artifact made before self-checks existed falls back to agreeing with the first backend loaded.
    """
    from .backends.registry import artifact_format

    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    target = TuningTarget(artifact, manifest, artifact_format(artifact, manifest), batch)
    x = _synthetic_inputs(manifest, batch)
    rows, loaded = _load_candidates(target, x, candidates(target, usable_cores()))
    try:
        _time_rounds(loaded, x, batch, budget_s, rounds, progress)
        _summarise(loaded, batch)
    finally:
        for m in loaded:
            m.engine.close()
    record = _record(artifact, manifest, rows, batch, rounds, budget_s)
    return _write_cache(artifact, record)


@dataclass
class _Loaded:
    """A candidate admitted for timing: its row in the record, its engine, and per batch size one array of seconds
    per call for each round."""

    row: dict[str, Any]
    engine: Any
    times: dict[int, list[np.ndarray]]


def _synthetic_inputs(manifest: Manifest, batch: int) -> np.ndarray:
    """Images of the artifact's shape; at least 8, so the fallback agreement check compares several answers."""
    from ..synthetic import synthetic_parity_images

    return synthetic_parity_images(manifest.preprocess, max(batch, 8))


def _load_candidates(target: TuningTarget, x: np.ndarray,
                     cands: list[tuple[str, dict]]) -> tuple[list[dict[str, Any]], list[_Loaded]]:
    """A row per candidate, and the loaded engines of those eligible to be timed; the others are closed at once."""
    from ..decision import borderline_band
    from .backends.registry import open_backend

    band = borderline_band(target.manifest)
    rows: list[dict[str, Any]] = []
    loaded: list[_Loaded] = []
    reference: np.ndarray | None = None
    for backend, opts in cands:
        row: dict[str, Any] = {"backend": backend, "options": opts}
        try:
            eng = open_backend(target.artifact, backend=backend, self_check="warn", **opts).load()
            check = eng.info.self_check
            judged = check is not None and check.status in ("passed", "failed")
            probs = None if judged else eng.infer(x, ["probs"], calibrated=False)["probs"]
        except Exception as exc:  # a candidate that cannot run here is a row, not a failed tuning
            why = str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__
            rows.append({**row, "status": f"could not run: {why}"})
            continue
        if probs is None:
            same = check.status == "passed"
            row.update({"status": "measured" if same else f"not eligible: {check.text()}",
                        "self_check": check.to_dict()})
        else:
            reference = probs if reference is None else reference
            same = _agrees_with_first(row, probs, reference, band)
        rows.append(row)
        if same:
            loaded.append(_Loaded(row, eng, {1: [], target.batch: []}))
        else:
            eng.close()
    return rows, loaded


def _agrees_with_first(row: dict[str, Any], probs: np.ndarray, reference: np.ndarray, band: float) -> bool:
    """An artifact made before self-checks: eligible when it agrees with the first backend loaded (noted in ``row``)."""
    dp = float(np.abs(probs - reference).max())
    same = bool((probs.argmax(1) == reference.argmax(1)).all()) and dp <= band
    row.update({"status": "measured" if same else
                f"not eligible: answers differ from the first backend (max |dp| {dp:.3g})",
                "max_abs_dprob_vs_first": dp})
    return same


def _time_rounds(loaded: list[_Loaded], x: np.ndarray, batch: int, budget_s: float, rounds: int,
                 progress: bool) -> None:
    """Each candidate once per round at batch 1 and at ``batch``, the order rotated per round."""
    from .timing import measure

    pool = [np.roll(x, k, axis=0)[:batch] for k in range(2)]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(loaded) * rounds * 2, desc="tune", unit="run")
    for r in range(rounds):
        k = r % max(1, len(loaded))
        for m in loaded[k:] + loaded[:k]:
            for b in (1, batch):
                sample = [p[:b] for p in pool]
                m.times[b].append(measure(lambda v, e=m.engine: e.infer(v, ["probs"], calibrated=False), sample,
                                          budget_s / rounds / 2, warmup=1, min_iters=3))
                if bar:
                    bar.update(1)
    if bar:
        bar.close()


def _summarise(loaded: list[_Loaded], batch: int) -> None:
    """Medians over the rounds, so one noisy round does not decide the winner."""
    for m in loaded:
        m.row["single_p90_ms"] = float(np.median([1e3 * np.percentile(t, 90) for t in m.times[1]]))
        m.row["batched_ips"] = float(np.median([batch / np.median(t) for t in m.times[batch]]))


def _record(artifact: Path, manifest: Manifest, rows: list[dict[str, Any]], batch: int, rounds: int,
            budget_s: float) -> dict:
    """What the cache keeps: every candidate's row and the winner per use; no winner at all is a ConfigError."""
    ok = [r for r in rows if "single_p90_ms" in r]
    if not ok:
        raise ConfigError(f"No backend could run {artifact.name} on this machine: "
                          + "; ".join(f"{r['backend']}: {r['status']}" for r in rows))
    single = min(ok, key=lambda r: r["single_p90_ms"])
    batched = max(ok, key=lambda r: r["batched_ips"])
    return {
        "artifact": artifact.name, "sha256": manifest.sha256, "machine": machine_fingerprint(),
        "tuned_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "batch": batch, "rounds": rounds, "budget_s": budget_s,
        "candidates": rows,
        "winners": {
            "single": {"backend": single["backend"], "options": single["options"],
                       "measured": f"p90 {single['single_p90_ms']:.1f} ms at batch 1"},
            "batched": {"backend": batched["backend"], "options": batched["options"],
                        "measured": f"{batched['batched_ips']:.1f} img/s at batch {batch}"},
        },
    }


def _write_cache(artifact: Path, record: dict) -> dict:
    """Written beside the others under this machine's fingerprint; the record returned says where."""
    path = tuning_file(artifact, record["machine"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)  # never a half-written cache file
    record["cache_file"] = str(path)
    return record


TUNING_MODES = ("cached", "auto", "off")


def apply_tuning(artifact, backend: str | None, device: str, options: dict, use: str,
                 mode: str = "cached") -> tuple[str | None, dict, str | None]:
    """The backend and options to open ``artifact`` with, after this machine's tuning, and a note saying so.

    Tuning applies only where the caller left the choice open (no backend named, device auto or cpu);
    an option the caller gave explicitly (threads, streams) overrides the tuned one. ``mode``: ``cached``
    uses a tuning already done here, ``auto`` measures now when there is none (seconds, once per machine and
    artifact), ``off`` ignores tuning.
    """
    if mode not in TUNING_MODES:
        raise ConfigError(f"tuning must be one of {', '.join(TUNING_MODES)}, got {mode!r}.")
    if mode == "off" or backend not in (None, "auto") or device not in ("auto", "cpu") \
            or str(artifact).startswith("triton://"):
        return (None if backend == "auto" else backend), options, None
    choice = tuned_choice(artifact, use)
    if choice is None and mode == "auto":
        log.info("no tuning for %s on this machine: measuring the candidates once (cxr-edge tune)", Path(artifact).name)
        try:
            tune(artifact, progress=False)
        except ConfigError as exc:
            log.warning("tuning %s failed (%s); using the default backend", Path(artifact).name, exc)
        choice = tuned_choice(artifact, use)
    if choice is None:
        return None, options, None
    merged = {**choice.options, **{k: v for k, v in options.items() if v is not None}}
    return choice.backend, merged, f"{use}: {choice.describe()}"
