"""MLPerf LoadGen's TestSettings for each scenario, and its summary log read back into our JSON.

The settings start from the ResNet-50 rules LoadGen carries inside it (its embedded ``mlperf.conf``: the seeds, the
latency percentiles, the 15 ms Server bound, the query minimums), the benchmark the field's reference results use;
the default run then only shortens the minimum duration (and the Offline sample minimum sized for 600 s), and every
change from the rules is recorded, so a shortened result is never mistaken for an official one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

#: our scenario words -> LoadGen's TestScenario names
SCENARIOS: dict[str, str] = {"single-stream": "SingleStream", "multi-stream": "MultiStream", "server": "Server",
                             "offline": "Offline"}
#: our mode words -> LoadGen's TestMode names ("both": accuracy, then performance)
MODES: dict[str, tuple[str, ...]] = {"performance": ("PerformanceOnly",), "accuracy": ("AccuracyOnly",),
                                     "both": ("AccuracyOnly", "PerformanceOnly")}
#: the MLPerf Inference benchmark whose rules (LoadGen's embedded mlperf.conf) the settings start from
RULES_MODEL = "resnet50"
#: the Offline query holds this many times the samples the estimated throughput processes in the minimum duration
OFFLINE_MARGIN = 2.0
#: --find-peak starts from this fraction of the estimated throughput: LoadGen's search only climbs from a start that
#: keeps the latency bound (a start that misses it ends the search at once, INVALID)
FIND_PEAK_START = 0.1
#: shortened runs: the sample minimum of one Offline query (the rules' 24,576 are sized for 600 s)
SHORT_OFFLINE_MIN_SAMPLES = 1024
#: shortened runs: Server queries at least, so LoadGen's early-stopping check can pass (it needs ~460 at p99 when
#: no query is over the latency bound; the rules' minimum of 100 relies on the 600 s duration to get there)
SHORT_SERVER_MIN_QUERIES = 500


@dataclass(frozen=True)
class Estimate:
    """What a short timing before the run found, from which LoadGen sizes its queries and the Server load."""

    latency_s: float  # one sample, alone
    throughput_ips: float  # samples/s with the scenario's batching (Offline, Server)
    how: str  # what was timed, for the report

    def to_dict(self) -> dict[str, Any]:
        return {"latency_ms": round(self.latency_s * 1e3, 3), "throughput_ips": round(self.throughput_ips, 1),
                "how": self.how}


@dataclass(frozen=True)
class RunSettings:
    """The knobs the command line sets; None: from the rules or the estimate."""

    duration_s: float = 10.0
    official: bool = False
    multi_stream_samples: int | None = None  # None: the rules' 8
    server_qps: float | None = None  # None: server_load x the estimated throughput
    server_load: float = 0.5
    server_latency_ms: float | None = None  # None: the rules' 15 ms
    max_query_count: int = 0  # 0: no cap (tests cap it to stay fast)
    find_peak: bool = False  # Server: LoadGen's FindPeakPerformance search for the highest QPS within the bound


def scenario_name(word: str) -> str:
    try:
        return SCENARIOS[word]
    except KeyError:
        raise ConfigError(f"Unknown LoadGen scenario {word!r}; choose from {', '.join(SCENARIOS)}.") from None


def make_test_settings(lg, scenario: str, mode: str, run: RunSettings, est: Estimate) -> tuple[Any, dict[str, Any]]:
    """LoadGen's TestSettings for one run, and the record of what was set and why (what differs from the rules)."""
    name = scenario_name(scenario)
    ts = lg.TestSettings()
    ts.scenario = getattr(lg.TestScenario, name)
    if ts.FromConfig("", RULES_MODEL, name, 0) != 0:  # conf_type 0: only LoadGen's embedded mlperf.conf
        raise ConfigError(f"LoadGen could not read its embedded rules for {RULES_MODEL} {name}; reinstall "
                          "mlcommons-loadgen (pip install 'cxr-edge[loadgen]').")
    ts.mode = getattr(lg.TestMode, mode)
    ts.performance_sample_count_override = 0  # the QSL's own count: what fits in memory of our data
    changed: dict[str, Any] = {"performance_sample_count": "the QSL's (all the data that fits), not the rules' 1024"}
    _expected(ts, name, run, est)
    if not run.official:
        changed.update(_shorten(ts, name, run))
    if name == "Server":
        changed.update(_server(ts, run, est))
        if run.find_peak and mode == "PerformanceOnly":
            ts.mode = lg.TestMode.FindPeakPerformance  # from the target QPS up, then bisected, each step a full run
            ts.server_find_peak_qps_decimals_of_precision = 0
            changed["mode"] = "FindPeakPerformance (LoadGen's search for the peak Server QPS, whole QPS)"
    if name == "MultiStream" and run.multi_stream_samples:
        ts.multi_stream_samples_per_query = run.multi_stream_samples
        changed["multi_stream_samples_per_query"] = run.multi_stream_samples
    if run.max_query_count:
        ts.max_query_count = run.max_query_count
        changed["max_query_count"] = run.max_query_count
    used = {"rules": f"MLPerf Inference {RULES_MODEL} {name} (LoadGen's embedded mlperf.conf)",
            "official_minimums": run.official, "min_duration_s": ts.min_duration_ms / 1e3,
            "min_query_count": ts.min_query_count, "changed_from_rules": changed}
    if name == "Server":
        used.update({"server_target_qps": round(ts.server_target_qps, 2),
                     "server_target_latency_ms": ts.server_target_latency_ns / 1e6})
    if name == "MultiStream":
        used["samples_per_query"] = ts.multi_stream_samples_per_query
    return ts, used


def _expected(ts, name: str, run: RunSettings, est: Estimate) -> None:
    """The expectations LoadGen sizes a run from, on the safe side: a stream run pre-generates queries for
    min duration / expected latency and ends early (INVALID) when they run out, but stops at the minimum duration
    when there are more, so the latency given is a quarter of the estimate; the one Offline query is sized for
    twice the estimated throughput (a machine that speeds up after the estimate still fills the minimum duration)."""
    ts.single_stream_expected_latency_ns = max(1, int(est.latency_s * 1e9 / 4))
    per_query = est.latency_s * (run.multi_stream_samples or ts.multi_stream_samples_per_query) / 2
    ts.multi_stream_expected_latency_ns = max(1, int(max(est.latency_s, per_query) * 1e9 / 4))
    ts.offline_expected_qps = max(1.0, est.throughput_ips * OFFLINE_MARGIN)


def _shorten(ts, name: str, run: RunSettings) -> dict[str, Any]:
    """A run sized for a development machine: the minimum duration cut from the rules' 600 s."""
    ts.min_duration_ms = int(run.duration_s * 1000)
    out: dict[str, Any] = {"min_duration_s": f"{run.duration_s:g} (rules: 600)"}
    if name == "Offline" and ts.min_query_count > SHORT_OFFLINE_MIN_SAMPLES:
        out["min_query_count"] = f"{SHORT_OFFLINE_MIN_SAMPLES} samples (rules: {ts.min_query_count})"
        ts.min_query_count = SHORT_OFFLINE_MIN_SAMPLES
    if name == "Server" and ts.min_query_count < SHORT_SERVER_MIN_QUERIES:
        out["min_query_count"] = f"{SHORT_SERVER_MIN_QUERIES} (rules: {ts.min_query_count}; early stopping needs them)"
        ts.min_query_count = SHORT_SERVER_MIN_QUERIES
    return out


def _server(ts, run: RunSettings, est: Estimate) -> dict[str, Any]:
    """The Server load (target QPS) and its latency bound."""
    out: dict[str, Any] = {}
    load = min(run.server_load, FIND_PEAK_START) if run.find_peak else run.server_load
    ts.server_target_qps = run.server_qps or max(1.0, load * est.throughput_ips)
    out["server_target_qps"] = (f"{run.server_qps:g} (given)" if run.server_qps
                                else f"{load:g} x the estimated {est.throughput_ips:.1f} samples/s")
    if run.server_latency_ms is not None:
        ts.server_target_latency_ns = int(run.server_latency_ms * 1e6)
        out["server_target_latency_ms"] = f"{run.server_latency_ms:g} (rules: 15, for inference on a preprocessed tensor)"
    return out


# ------------------------------------------------------------------ the summary log

_KEY_VALUE = re.compile(r"^\s*([^:*]+?)\s*:\s*(.+?)\s*$")
#: scenario -> (the summary line holding its result, MLPerf's name of the metric, the unit we report it in)
RESULT_LINES: dict[str, tuple[str, str, str]] = {
    "SingleStream": ("90.0th percentile latency (ns)", "90th percentile latency", "ms"),
    "MultiStream": ("99.0th percentile latency (ns)", "99th percentile latency", "ms"),
    "Server": ("Completed samples per second", "completed samples per second", "samples/s"),
    "Offline": ("Samples per second", "samples per second", "samples/s"),
}
_CHECKS = ("Min duration satisfied", "Min queries satisfied", "Early stopping satisfied",
           "Performance constraints satisfied")


def parse_summary(text: str) -> dict[str, Any]:
    """LoadGen's ``mlperf_log_summary.txt`` as a dict: scenario, mode, VALID/INVALID, the scenario's result in MLPerf's
    name and our units, which checks passed, latency percentiles (ms), QPS, and LoadGen's recommendations."""
    fields: dict[str, str] = {}
    notes: list[str] = []
    for line in text.splitlines():
        if line.strip().startswith("*"):
            notes.append(line.strip().lstrip("* ").strip())
            continue
        m = _KEY_VALUE.match(line)
        if m and m.group(1) not in fields:
            fields[m.group(1)] = m.group(2)
    scenario = fields.get("Scenario")
    out: dict[str, Any] = {"scenario": scenario, "mode": fields.get("Mode"), "result": fields.get("Result is"),
                           "checks": {k: fields[k].lower() == "yes" for k in _CHECKS if k in fields},
                           "notes": notes, "latency_ms": _percentiles(fields)}
    for key, name in (("QPS w/ loadgen overhead", "qps_with_loadgen_overhead"),
                      ("QPS w/o loadgen overhead", "qps_without_loadgen_overhead"),
                      ("Scheduled samples per second", "scheduled_samples_per_second"),
                      ("samples_per_query", "samples_per_query"), ("target_qps", "target_qps"),
                      ("target_latency (ns)", "target_latency_ns"), ("performance_sample_count", "performance_sample_count"),
                      ("min_duration (ms)", "min_duration_ms"), ("min_query_count", "min_query_count")):
        if key in fields:
            out[name] = _number(fields[key])
    if scenario in RESULT_LINES and RESULT_LINES[scenario][0] in fields:
        line, metric, unit = RESULT_LINES[scenario]
        value = _number(fields[line])
        out.update({"metric": metric, "unit": unit, "value": value / 1e6 if line.endswith("(ns)") else value})
    return out


def _percentiles(fields: dict[str, str]) -> dict[str, float]:
    """The per-sample (or per-query) latency statistics LoadGen adds, in ms."""
    out = {}
    for key, value in fields.items():
        m = re.fullmatch(r"(\d+\.\d+) percentile latency \(ns\)", key)
        if m:
            out[f"p{float(m.group(1)):g}"] = _number(value) / 1e6
        elif key in ("Min latency (ns)", "Max latency (ns)", "Mean latency (ns)"):
            out[key.split()[0].lower()] = _number(value) / 1e6
    return out


def _number(text: str) -> float:
    try:
        return float(text.split()[0])
    except (ValueError, IndexError):
        return float("nan")
