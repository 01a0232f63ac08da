"""What INT8 buys on this machine: each row against its FP32 artifact on the same backend, said plainly when it loses.

On a CPU without VNNI (AVX2), INT8 kernels gain little or nothing over FP32 and can be slower, so a table of img/s
alone would let a reader deploy the slower and less accurate artifact; these ratios are taken inside one run, free of
the VM's drift between runs.
"""

from __future__ import annotations

from pathlib import Path

from ..manifest import read_manifest
from ..precision import MOSTLY_FLOAT_BELOW, Precision

#: how every FP32 artifact's file name starts (``model.fp32.onnx``, ``model.fp32.plan``)
_FP32_FILE_PREFIX = f"model.{Precision.FP32.value}."
#: target options that change how the same artifact runs: rows differing in them are not compared with each other
COMPARED_OPTIONS: tuple[str, ...] = ("streams", "cuda_graph")


def is_int8(precision: object) -> bool:
    """Whether a row's precision (``int8``, or an artifact tag such as ``int8-cpu``) is an INT8 one."""
    return str(precision).startswith(Precision.INT8.value)


def self_check_failed(row: dict) -> bool:
    """Whether a row's (or contender base's) engine failed its self-check on this machine."""
    return (row.get("self_check") or {}).get("status") == "failed"


def _same_backend(row: dict) -> tuple:
    """Rows comparable as "the same backend": backend, the provider actually used, batch and options (streams...)."""
    return row.get("backend"), row.get("provider"), row.get("batch"), tuple(sorted((row.get("options") or {}).items()))


def int8_mac_share(artifact: Path) -> float | None:
    """The share of an INT8 artifact's MACs that run in INT8, as export measured it (``quantization.int8_mac_share``
    in its manifest; a TensorRT engine's from the ONNX it was built from); None when not recorded."""
    doc = read_manifest(artifact, verify=False)
    if doc.quantization is not None and doc.quantization.int8_mac_share is not None:
        return doc.quantization.int8_mac_share
    source = artifact.parent / doc.source_onnx.file if doc.source_onnx is not None and doc.source_onnx.file else None
    if source is not None and source != artifact and source.is_file():
        return int8_mac_share(source)
    return None


def _is_fp32_artifact_row(row: dict) -> bool:
    """A timed row of our FP32 artifact run in FP32 (not OpenVINO's bf16 hint on it, not Keras, not a peer)."""
    return (not row.get("peer") and row.get("precision") == Precision.FP32.value and "throughput_ips" in row
            and str(row.get("artifact", "")).startswith(_FP32_FILE_PREFIX))


def add_fp32_ratios(rows: list[dict]) -> None:
    """Each row's throughput over its FP32 artifact's on the same backend, provider and batch, timed in the same run
    (None without one): what a lower precision buys on this machine, free of the VM's drift between runs."""
    fp32: dict[tuple, float] = {}
    for r in rows:
        if _is_fp32_artifact_row(r):
            fp32.setdefault(_same_backend(r), r["throughput_ips"])
    for r in rows:
        ref = fp32.get(_same_backend(r)) if "throughput_ips" in r else None
        r["x_fp32_same_backend"] = r["throughput_ips"] / ref if ref else None
        r["fp32_same_backend_ips"] = ref


def _ours_int8(row: dict) -> bool:
    """One of our INT8 artifacts with a same-backend FP32 ratio (peers are compared elsewhere)."""
    return (not row.get("peer") and is_int8(row.get("precision", ""))
            and row.get("x_fp32_same_backend") is not None)


def _on_what(row: dict, machine: dict) -> str:
    """Where a row's INT8 kernels ran, in words: the CPU's ISA (saying when it lacks exact INT8 dot products), or the device."""
    provider = str(row.get("provider") or "")
    if provider and "CPU" not in provider:
        return provider
    facts = machine.get("isa_facts") or {"isa": machine.get("isa", "?"), "exact_int8_dot_products": True}
    if facts.get("exact_int8_dot_products"):
        return facts["isa"]
    return f"{facts['isa']}, no {'INT8 dot-product instructions' if facts['isa'].startswith('ARM') else 'VNNI'}"


def _x(ratio: float) -> str:
    """A ratio to print: two decimals, three where two would round a ratio below 1 up to 1.00."""
    return f"{ratio:.3f}x" if 0.995 <= ratio < 1 else f"{ratio:.2f}x"


def int8_does_not_pay(rows: list[dict], machine: dict) -> list[dict]:
    """Our INT8 rows slower than their FP32 artifact on the same backend and batch, each said plainly: quantising then
    costs speed as well as accuracy here (typically a CPU without VNNI, whose INT8 kernels gain little over FP32)."""
    out = []
    for r in rows:
        if not _ours_int8(r) or r["x_fp32_same_backend"] >= 1.0:
            continue
        on = _on_what(r, machine)
        text = (f"INT8 does not pay on this machine ({on}): {r['label']} at batch {r['batch']} runs "
                f"{_x(r['x_fp32_same_backend'])} its FP32 artifact on the same backend ({_ips(r)}); the FP32 artifact "
                "is the faster choice here (and the more accurate).")
        out.append({"label": r["label"], "backend": r.get("backend"), "provider": r.get("provider"), "batch": r["batch"],
                    "x_fp32_same_backend": r["x_fp32_same_backend"], "on": on, "text": text})
    return out


def int8_pays(rows: list[dict], machine: dict) -> str | None:
    """One line when every INT8 row beats its FP32 artifact on the same backend, with the range of ratios; else None."""
    xs = [r["x_fp32_same_backend"] for r in rows if _ours_int8(r)]
    if not xs or min(xs) < 1.0:
        return None
    span = _x(min(xs)) if min(xs) == max(xs) else f"{_x(min(xs))} to {_x(max(xs))}"
    return (f"INT8 pays on this machine ({machine.get('isa', '?')}): every INT8 row with an FP32 row to compare runs "
            f"{span} its FP32 artifact on the same backend and batch.")


def _ips(row: dict) -> str:
    """A row's img/s beside its FP32 artifact's on the same backend, the numbers behind the ratio."""
    return f"{row['throughput_ips']:.1f} vs {row['fp32_same_backend_ips']:.1f} img/s"


def lower_precisions_slower(rows: list[dict]) -> list[str]:
    """Our FP16/BF16 rows slower than FP32 on the same backend and batch, each said plainly (INT8 ones are said by
    :func:`int8_does_not_pay`): a lower precision is picked for speed, so one that loses should not be picked here."""
    out = []
    for r in rows:
        x = r.get("x_fp32_same_backend")
        prec = str(r.get("precision", ""))
        if r.get("peer") or x is None or x >= 1.0 or is_int8(prec) or prec == Precision.FP32.value:
            continue
        out.append(f"{r['label']} at batch {r['batch']} is SLOWER than FP32 on the same backend: {_x(x)} ({_ips(r)}); "
                   f"{prec.upper()} does not pay here, FP32 is the faster choice.")
    return out


def mostly_float(rows: list[dict]) -> list[str]:
    """One warning per INT8 artifact with under :data:`MOSTLY_FLOAT_BELOW` of its MACs in INT8: its speed and its
    answers are mostly a float model's, whatever its name says (the export gate passes it all the same)."""
    seen: dict[str, list[str]] = {}
    share: dict[str, float] = {}
    for r in rows:
        s = r.get("int8_mac_share")
        if not r.get("peer") and s is not None and s < MOSTLY_FLOAT_BELOW:
            labels = seen.setdefault(r["artifact"], [])
            if r["label"] not in labels:
                labels.append(r["label"])
            share[r["artifact"]] = s
    return [f"only {percent(share[a])} of the MACs of {a} run in INT8 ({', '.join(labels)}): this artifact is mostly "
            f"float, so its speed is a float model's; its export report names the nodes kept float."
            for a, labels in seen.items()]


def percent(share: float) -> str:
    """A share as a percentage, with a decimal where a whole number would round it to 0% or 100%."""
    if share in (0.0, 1.0) or 0.01 <= share <= 0.99:
        return f"{100 * share:.0f}%"
    return f"{100 * share:.1f}%"
