"""Quality gates: `kld<=0.05`, `ppl_increase<=5%`, `ppl_change<=5%`, `top1>=0.9`, `size<=120MB`,
`peak_rss<=400MB`, `speedup>=2`, `memory_reduction>=50%`, `ttft<=300ms`, checked against an
evaluation's metrics.

A gate on a quality figure passes only when its whole 95% interval passes: a point estimate
inside the bound with an interval that crosses it is "uncertain", which does not pass. Speed
figures use the median of the timed repeats, and `speedup` and `memory_reduction` compare with
the fp32 baseline measured in the same run. Every verdict says by how much the figure missed.

Besides the gates a user writes, `source_check` is always applied: a candidate whose perplexity
is below its own source's beyond the 95% interval is "suspect" (a quantized model does not beat
the model it was made from; a broken baseline or a different model does) and never passes.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass

from edgequant.errors import EdgequantError
from edgequant.measurement import metric_table
from edgequant.measurement.metric_table import BYTE_UNITS, Metric

# The production-readiness defaults: perplexity within 5% of the baseline's in either direction,
# output distributions close to the baseline's, at least twice its decode speed, at least half its
# memory. A one-sided perplexity bound passed a model 7% *below* its source with KLD 0.59 (Gemma-3-270M,
# onnx:int4?head8=0); on the default model a perplexity change of 5% goes with a KLD of about 0.05-0.065
# (gguf:q4_k_m 0.065 at +7%, openvino:int4 0.053 at +3.5%), so kld<=0.1 never binds before the perplexity
# bound on a faithful candidate and refuses one whose next-token distributions are far off.
DEFAULT_GATES = ("ppl_change<=5%", "kld<=0.1", "speedup>=2", "memory_reduction>=50%")
# A sentence encoder's: embeddings within cosine 0.98 of the float model's (the bar int8 meets on
# all-MiniLM-L6-v2: onnx:int8 0.992, onnx:int8-static 0.989), twice its throughput at batch 8, half its memory.
# An image classifier's: the float model's first class among the target's five on 95% of the photo
# views and class probabilities close to its (KLD), not top-1 agreement: on these photos (textures,
# cells, text as well as objects) the float model is unsure of its first class on about 40% of
# the views, and near-ties flip under any rounding (bf16 arithmetic alone: 95.5% top-1 agreement on
# EfficientNet-Lite0; int8 0.81-0.88, every change on a view whose top probability is under 0.4).
DEFAULT_TASK_GATES = {"sentence-embedding": ("cosine>=0.98", "speedup>=2", "memory_reduction>=50%"),
                      "image-classification": ("top5>=0.95", "kld<=0.1", "speedup>=2", "memory_reduction>=50%")}


def default_gates(task: str) -> tuple[str, ...]:
    return DEFAULT_TASK_GATES.get(task, DEFAULT_GATES)


_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
_PATTERN = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=|<|>)\s*([0-9]*\.?[0-9]+)\s*([a-z%]*)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Gate:
    name: str
    op: str
    value: float  # in the metric's own unit (bytes for size, MB for peak_rss, ms for ttft)
    text: str

    @property
    def metric(self) -> Metric:
        return metric_table.gateable()[self.name]


def parse_gate(text: str) -> Gate:
    """One gate, e.g. `size<=120MB`; an error shows where the text went wrong."""
    found, known = _PATTERN.match(text), metric_table.gateable()
    if not found:
        raise EdgequantError(f"gate {text!r} does not parse: expected METRIC OP NUMBER[UNIT], e.g. kld<=0.05",
                             f"metrics: {', '.join(known)}; operators: <=, >=, <, >")
    name, op, number, unit = found.group(1).lower(), found.group(2), float(found.group(3)), found.group(4).lower()
    if name not in known:
        raise EdgequantError(f"gate {text!r}: unknown metric {name!r}", f"use one of: {', '.join(known)}")
    units = known[name].gate_units
    if unit not in units:
        raise EdgequantError(f"gate {text!r}: {unit!r} is not a unit of {name} ({known[name].what})",
                             f"write it in {' or '.join(u or 'no unit' for u in units)}")
    return Gate(name, op, number * units[unit], text.strip())


def parse_size(text: str, name: str = "size") -> int:
    """`120MB`, `0.5GiB`, `900KB` or a byte count, in bytes (MB = 10^6, MiB = 2^20); `name` is
    what the error calls the value (an option's name)."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-z]*)\s*", text, re.IGNORECASE)
    if not found or found.group(2).lower() not in BYTE_UNITS:
        raise EdgequantError(f"{name}={text!r} is not a size", f"write e.g. {name}=120MB, {name}=0.5GiB or a byte count")
    return int(float(found.group(1)) * BYTE_UNITS[found.group(2).lower()])


def parse_gates(texts: list[str] | tuple[str, ...]) -> list[Gate]:
    gates = [parse_gate(t) for t in texts]
    _check_consistent(gates)
    return gates


def _check_consistent(gates: list[Gate]) -> None:
    """Refuse bounds on one metric that no value can meet together (e.g. kld<=0.01 and kld>=0.05)."""
    for a in gates:
        for b in gates:
            if a.name == b.name and a.op in ("<=", "<") and b.op in (">=", ">") and (
                    a.value < b.value or (a.value == b.value and (a.op == "<" or b.op == ">"))):
                raise EdgequantError(f"gates {a.text!r} and {b.text!r} contradict each other: no {a.name} meets both",
                                     "drop or loosen one of them")


def derived_metrics(metrics: dict, baseline: dict | None) -> dict:
    """`metrics` plus the figures gates derive: the perplexity change either way (with its
    interval), and those compared with the fp32 baseline (speedup, memory reduction)."""
    out = dict(metrics)
    if metrics.get("ppl_increase_pct") is not None:
        out["ppl_change_pct"] = abs(metrics["ppl_increase_pct"])
        interval = (metrics.get("ci95") or {}).get("ppl_increase_pct")
        if interval:
            out["ci95"] = {**metrics["ci95"], "ppl_change_pct": _absolute(interval)}
    speed = next((key for key in metric_table.HEADLINE_SPEED if metrics.get(key)), None)
    if baseline and speed and baseline.get(speed):
        out["speedup"] = metrics[speed] / baseline[speed]
    if baseline and metrics.get("peak_rss_mb") and baseline.get("peak_rss_mb"):
        out["memory_reduction_pct"] = 100 * (1 - metrics["peak_rss_mb"] / baseline["peak_rss_mb"])
    return out


def _absolute(interval: list[float]) -> list[float]:
    """The interval of |x| for x in [low, high]."""
    low, high = interval
    if low <= 0 <= high:
        return [0.0, max(-low, high)]
    return sorted([abs(low), abs(high)])


SOURCE_CHECK = "perplexity not below the source's"


def source_check(metrics: dict) -> dict:
    """Suspect when the whole 95% interval of the perplexity increase is below zero: the
    candidate scores better than the model it was made from, which points at a broken baseline
    or another model, not at a better quantization."""
    interval = (metrics.get("ci95") or {}).get("ppl_increase_pct")
    value = metrics.get("ppl_increase_pct")
    if not interval or interval[1] >= 0:
        return {"gate": SOURCE_CHECK, "verdict": "pass", "value": value, "ci95": interval, "bound": 0.0, "missed_by": None}
    return {"gate": SOURCE_CHECK, "verdict": "suspect", "value": value, "ci95": interval, "bound": 0.0,
            "missed_by": -interval[1],
            "reason": f"perplexity {value:+.2f}% {interval} is below its source's beyond the 95% interval: check the "
                      "baseline (is it the model this one was made from, and does it score as its engine scores it?)"}


def check(gate: Gate, metrics: dict) -> dict:
    """The gate's verdict on `metrics` (after derived_metrics): pass, fail, uncertain or not measured."""
    metric = gate.metric
    value = metrics.get(metric.key)
    if value is None:
        return {"gate": gate.text, "verdict": "not measured", "value": None}
    compare = _OPS[gate.op]
    interval = (metrics.get("ci95") or {}).get(metric.key) if metric.interval else None
    if interval:
        low, high = interval
        passes = [compare(low, gate.value), compare(high, gate.value)]
        verdict = "pass" if all(passes) else "fail" if not any(passes) else "uncertain"
    else:
        verdict = "pass" if compare(value, gate.value) else "fail"
    worst = (interval[1] if gate.op in ("<=", "<") else interval[0]) if interval else value
    return {"gate": gate.text, "verdict": verdict, "value": value, "ci95": interval, "bound": gate.value,
            "missed_by": None if verdict == "pass" else abs(worst - gate.value)}


def verdict_words(v: dict, not_measured: str = "not measured") -> str:
    """One sentence for a verdict that did not pass: why, and by how much."""
    if v["verdict"] == "not measured":
        return f"{v['gate']}: {not_measured}"
    if v["verdict"] == "uncertain":
        return f"{v['gate']}: its 95% interval {v['ci95']} crosses the bound"
    if v["verdict"] == "suspect":
        return f"suspect: {v['reason']}"
    missed = f"{v['missed_by'] / 1e6:.1f} MB" if v["gate"].startswith("size") else f"{v['missed_by']:.4g}"
    return f"{v['gate']}: missed by {missed}"


def missed_words(verdicts: list[dict], not_measured: str = "not measured") -> str:
    """Every verdict that did not pass, in one line: what bench, recommend and optimize print."""
    return "; ".join(verdict_words(v, not_measured) for v in verdicts if v["verdict"] not in ("pass", "skipped"))


def check_all(gates: list[Gate], metrics: dict) -> list[dict]:
    return [check(g, metrics) for g in gates]


def passes(verdicts: list[dict]) -> bool:
    """Every verdict is "pass", or "skipped" (a speed gate optimize could not measure on a stand-in
    for the target): an uncertain interval or a figure not measured does not pass."""
    return all(v["verdict"] in ("pass", "skipped") for v in verdicts)
