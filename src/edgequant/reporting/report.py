"""Reports of a benchmark run: one data dict, rendered as JSON, Markdown or a self-contained HTML page.

The HTML page needs no network and no script: styles and the SVG charts (reporting.charts, the
certificate's too) are inline, and the report data travels with it as JSON. The Pareto front is
over (size, perplexity increase): the candidates no other candidate beats on both.
"""

from __future__ import annotations

import html
import json

from edgequant.decisions.gates import derived_metrics
from edgequant.measurement import metric_table
from edgequant.measurement.metric_table import Metric
from edgequant.registry import get_format
from edgequant.sources.tasks import TEXT_GENERATION
from edgequant.spec import format_and_precision


def pareto_front(points: list[tuple[float, ...]]) -> list[int]:
    """Indices of the points no other point dominates (no worse in every coordinate, better in
    one), every coordinate minimised; sorted by the points."""
    def dominates(a: tuple, b: tuple) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    front = [i for i, p in enumerate(points) if not any(dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: points[i])


def build_report(result) -> dict:
    base = result.baseline.metrics
    task = base.get("task", TEXT_GENERATION)
    figures = metric_table.TASK_FIGURES[task]
    rows = [_row(result.baseline, base, figures)] + [_row(r, base, figures) for r in result.rows]
    usable = [r for r in rows if r["status"] == "ok" and r["usable"]]
    front = pareto_front([(r["size_mb"], r["quality_loss"]) for r in usable])
    for i in front:
        usable[i]["pareto"] = True
    ok = [r for r in rows if r["status"] == "ok"]
    return {
        "title": f"edgequant benchmark: {result.model}", "task": task,
        "model": result.model, "fingerprint": result.fingerprint, "run_id": result.run_id, "db": str(result.db_path),
        "machine": result.machine, "settings": result.settings, "wall_s": round(result.wall_s, 1), "rows": rows,
        "summary": [_summary(r) for r in ok],
        "notes": _notes(result, rows, task),
    }


def _quality_loss(value: float, base_value: float, metric: Metric) -> float:
    """How far a quality figure is from the baseline's, in its worse direction (0: as good or better)."""
    return max(metric.order(value) - metric.order(base_value), 0.0)


def _row(row, base: dict, figures: metric_table.TaskFigures) -> dict:
    m = row.metrics or {}
    fmt = format_and_precision(row.spec)[0]
    out = {"spec": row.spec, "format": fmt, "status": row.status, "error": row.error, "baseline": row.baseline,
           "pareto": False, "seconds": round(row.seconds, 1), "notes": list(row.notes)}
    if row.status == "ok":
        out.update({metric.key: m.get(metric.key) for metric in metric_table.measured()})
        out.update({
            "size_mb": round(m["size_bytes"] / 1e6, 2), "interpreter_rss_mb": m.get("interpreter_rss_mb"),
            "probe_imported": m.get("probe_imported", []), "ci95": m.get("ci95", {}),
            "decode_tps_range": m.get("decode_tps_range"), "arithmetic": m.get("arithmetic"),
            "data": (m.get("settings") or {}).get("data"),
            "size_reduction_pct": round(100 * (1 - m["size_bytes"] / base["size_bytes"]), 1),
            "speedup": _rounded(derived_metrics(m, base).get("speedup"), 2),
            # a Ray task that shared its node with another measured its speed beside other work
            "speed_representative": _speed_representative(fmt) and not (m.get("ray") or {}).get("concurrent"),
        })
        quality = metric_table.by_key(figures.quality)
        out["quality_loss"] = _quality_loss(m[quality.key], base[quality.key], quality)
        out["usable"] = quality.order(m[quality.key]) <= quality.order(figures.unusable_beyond)
    return out


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _speed_representative(fmt: str) -> bool:
    backend = get_format(fmt)  # None for a format no longer registered
    return backend is None or backend.speed_is_representative()


def _duration(result, rows: list[dict]) -> str:
    """What this run cost on this machine, measured: the wall time, and the specs that took most."""
    slowest = sorted((r for r in rows if r["seconds"]), key=lambda r: -r["seconds"])[:3]
    return (f"This run took {result.wall_s / 60:.1f} minutes here (cached artifacts and evaluations are reused); "
            "slowest: " + ", ".join(f"{r['spec']} {r['seconds']:.0f} s" for r in slowest) + ".")


def _summary(row: dict) -> dict:
    backend = get_format(row["format"])
    framework, use_case = (backend.display_name or backend.name, backend.use_case) if backend else (row["format"], "")
    return {"framework": framework, "quantization": row["spec"].partition(":")[2], "memory_mb": row["peak_rss_mb"],
            "size_mb": row["size_mb"], "size_reduction_vs_fp32_pct": row["size_reduction_pct"],
            "speedup_vs_fp32": row["speedup"], "speed_representative": row["speed_representative"], "use_case": use_case}


def _notes(result, rows: list[dict], task: str) -> list[str]:
    m, s = result.machine, result.settings["eval"]
    quality, speed, intervals = (_method_notes(result, s) if task == TEXT_GENERATION else _task_method_notes(rows, s, task))
    notes = [f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gb']} GB RAM, {m['os']}, Python {m['python']} "
             f"(1-minute load average {m['load_avg_1m']} at the start).",
             quality, _duration(result, rows), speed,
             "Size reduction is the file size against the fp32 source; memory use is measured peak RSS (optimize's "
             "memory_reduction gate compares peak RSS). "
             "'model MB' is that peak less the RSS of the same process before the engine loaded "
             f"({_interpreter_mb(rows)}): what the model and its engine cost.",
             intervals]
    stand_ins = [get_format(f) for f in sorted({r["format"] for r in rows if r["status"] == "ok"})
                 if not _speed_representative(f)]
    notes.extend(b.speed_note for b in stand_ins if b.speed_note)
    probe = result.settings.get("short_probe")
    if stand_ins and probe:
        notes.append(f"Formats whose speed is not representative here got a short speed probe "
                     f"({probe['gen_tokens']} tokens, {probe['repeats']} run).")
    notes.extend(n for r in rows for n in r["notes"])
    notes.extend(_arithmetic_notes(rows))
    notes.extend(_indistinguishable_notes(rows, task))
    heavy = [f"{r['spec']} ({', '.join(r['probe_imported'])})" for r in rows
             if r["status"] == "ok" and not r["baseline"] and r.get("probe_imported")]
    if heavy:
        notes.append(f"Warning: the speed probe of {', '.join(heavy)} loaded more than its engine; its memory is overstated.")
    figures = metric_table.TASK_FIGURES[task]
    quality = metric_table.by_key(figures.quality)
    broken = [f"{r['spec']} ({quality.label} {quality.show(r[quality.key])})" for r in rows if r["status"] == "ok" and not r["usable"]]
    if broken:
        notes.append(f"Unusable ({quality.label} past {quality.show(figures.unusable_beyond)}), left off the "
                     f"Pareto front and the size/quality chart: {', '.join(broken)}.")
    if result.caveat:
        notes.append(f"Model caveat: {result.caveat}.")
    return notes


def _method_notes(result, s: dict) -> tuple[str, str, str]:
    """How a causal LM's quality, speed and intervals were measured."""
    return (f"Quality: {s['windows']} windows of {s['ctx']} tokens of the evaluation text, identical for every candidate; "
            f"perplexity increase and KL divergence are relative to the PyTorch fp32 baseline on the source"
            + (" (the bench default)." if result.settings.get("eval_is_bench_default") else "."),
            f"Speed: median of {s['repeats']} runs after a warm-up, a different {s['prompt_tokens']}-token prompt each "
            f"(so no engine reuses a cached prefix), {s['gen_tokens']} tokens generated, {s['threads'] or 'all'} threads; "
            "peak memory is the RSS of a fresh process that loaded the model.",
            "Intervals are 95% block-bootstrap intervals over the scored tokens (blocks of 32 tokens, seeded); "
            "where two candidates' intervals overlap, the data cannot tell them apart on that figure.")


def _task_method_notes(rows: list[dict], s: dict, task: str) -> tuple[str, str, str]:
    """How a model of another task (a sentence encoder, an image classifier) was measured."""
    data = next((r.get("data") for r in rows if r.get("data")), "the task's inputs")
    if task == "image-classification":
        quality = (f"Quality: every candidate classifies the same images ({data}); top-1 agreement (the float32 "
                   "baseline's first class first), top-5 agreement (its first class among the candidate's five) and the "
                   "KL divergence of the class probabilities. Many views are of things no ImageNet class names (textures, "
                   "cells, text), where the float model is itself unsure and near-ties flip under any rounding.")
        unit = "image"
    else:
        quality = (f"Quality: every candidate embeds the same texts ({data}); cosine similarity per text to the PyTorch fp32 "
                   "baseline's embedding (mean and 1st percentile), and polarity accuracy of a linear probe trained on each "
                   "candidate's own embeddings by 10-fold cross-validation.")
        unit = "short sentence"
    return (quality,
            f"Speed: latency of one {unit} at a time (median and 95th percentile over 32 inputs x {s['repeats']} "
            f"repeats) and inputs per second at batch 1 and batch 8 (median of {s['repeats']} repeats), after a warm-up, "
            f"{s['threads'] or 'all'} threads; peak memory is the RSS of a fresh process that loaded the model.",
            "Intervals are 95% bootstrap intervals over the inputs (seeded); where two candidates' intervals overlap, "
            "the data cannot tell them apart on that figure.")


def _interpreter_mb(rows: list[dict]) -> str:
    values = sorted(r["interpreter_rss_mb"] for r in rows if r["status"] == "ok" and r.get("interpreter_rss_mb"))
    return f"{values[0]:.0f}-{values[-1]:.0f} MB here" if values else "not measured"


def _arithmetic_notes(rows: list[dict]) -> list[str]:
    """Which arithmetic a format's quality figures were computed in, where it is a stand-in's."""
    seen = {}
    for r in rows:
        if r["status"] == "ok" and r.get("arithmetic"):
            seen.setdefault(r["format"], (r["arithmetic"], []))[1].append(r["spec"])
    return [f"Quality of {', '.join(specs)}: {text}." for text, specs in seen.values()]


def _indistinguishable_notes(rows: list[dict], task: str) -> list[str]:
    """Candidates next to each other by the task's ranking figure whose intervals overlap."""
    from edgequant.measurement.intervals import compare

    metric = metric_table.by_key(metric_table.TASK_FIGURES[task].rank)
    ranked = sorted((r for r in rows if r["status"] == "ok" and not r["baseline"] and r["ci95"].get(metric.key)),
                    key=lambda r: metric.order(r[metric.key]))
    ties = [f"{a['spec']} ~ {b['spec']}" for a, b in zip(ranked, ranked[1:])
            if compare(a["ci95"][metric.key], b["ci95"][metric.key]) == "not distinguishable"]
    return [f"Not distinguishable by {metric.label} (95% intervals overlap): {', '.join(ties)}."] if ties else []


# ----------------------------------------------------------------------------------------- text

def _columns(rows: list[dict]) -> list[Metric]:
    """The metric table's report figures that some row has, in the table's order."""
    return [m for m in metric_table.TABLE if m.in_report and not m.derived and any(r.get(m.key) is not None for r in rows)]


def _header(metric: Metric) -> str:
    return metric.label + (" [95%]" if metric.interval else "")


def _spec_cell(row: dict) -> str:
    return row["spec"] + (" (baseline)" if row["baseline"] else (" *" if row["pareto"] else ""))


def _cell(row: dict, metric: Metric, first: bool) -> str:
    if row["status"] != "ok":
        return row["status"] if first else ""
    value = row.get(metric.key)
    text = "" if value is None else metric.show(value)
    interval = row.get("ci95", {}).get(metric.key) if metric.interval else None
    if interval and not row["baseline"]:
        text += f" [{metric.show(interval[0])}, {metric.show(interval[1])}]"
    return text


def _cells(row: dict, columns: list[Metric]) -> list[str]:
    return [_spec_cell(row)] + [_cell(row, m, i == 0) for i, m in enumerate(columns)]


def render_markdown(data: dict) -> str:
    columns = _columns(data["rows"])
    lines = [f"# {data['title']}", "", "| " + " | ".join(["spec"] + [_header(m) for m in columns]) + " |",
             "|" + "---|" * (len(columns) + 1)]
    lines += ["| " + " | ".join(_cells(r, columns)) + " |" for r in data["rows"]]
    lines += ["", "`*` on the size/quality Pareto front.", ""]
    failed = [r for r in data["rows"] if r["status"] != "ok"]
    lines += [f"- {r['spec']}: {r['status']}: {r['error']}" for r in failed]
    lines += ["", "## Summary by framework", "",
              "| framework | quantization | memory use | size reduction vs fp32 | speed-up vs fp32 | use case |",
              "|---|---|---|---|---|---|"]
    for s in data["summary"]:
        speed = f"{s['speedup_vs_fp32']}x" + ("" if s["speed_representative"] else " (not representative)") if s["speedup_vs_fp32"] else ""
        memory = f"{s['memory_mb']:.0f} MB RSS, " if s["memory_mb"] is not None else ""
        lines.append(f"| {s['framework']} | {s['quantization']} | {memory}{s['size_mb']:.0f} MB file | "
                     f"{s['size_reduction_vs_fp32_pct']:.0f}% | {speed} | {s['use_case']} |")
    lines += ["", "## Notes", ""] + [f"- {n}" for n in data["notes"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------- HTML

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px}
table{border-collapse:collapse;width:100%}th,td{padding:4px 8px;border-bottom:1px solid #ddd;text-align:right}
th:first-child,td:first-child{text-align:left}tr.baseline td{background:#eef4ff}tr.pareto td:first-child{font-weight:600}
tr.failed td,tr.skipped td{color:#999}.charts{display:flex;flex-wrap:wrap;gap:20px}.chart{border:1px solid #eee;padding:8px}
.point{fill:#3b6fd8}.point.baseline{fill:#d8543b}.point.pareto{fill:#1a9c4a}.pareto-front{fill:none;stroke:#1a9c4a;stroke-width:2}
.bar{fill:#3b6fd8}.bar.baseline{fill:#d8543b}.bar.unrepresentative{fill:#bbb}text{font-size:11px;fill:#333}
.notes li{margin:4px 0}
"""

def _charts(rows: list[dict], task: str) -> str:
    """Size against the quality loss with the Pareto front, the task's speed figure and peak memory."""
    from edgequant.reporting.charts import Point, bars, scatter

    figures = metric_table.TASK_FIGURES[task]
    quality, speed = metric_table.by_key(figures.quality), metric_table.by_key(figures.speed)
    ok = [r for r in rows if r["status"] == "ok"]
    points = [Point(r["size_mb"], r["quality_loss"], r["spec"], f"{r['spec']}: {r['size_mb']} MB, "
                    f"{quality.label} {quality.show(r[quality.key])}",
                    "point" + (" baseline" if r["baseline"] else "") + (" pareto" if r["pareto"] else ""), r["pareto"])
              for r in ok if r["usable"]]  # one broken candidate would flatten every other point

    def bar_rows(key: str) -> list[tuple[str, float, str]]:
        return [(r["spec"], r[key], "bar" + (" baseline" if r["baseline"] else "")
                 + ("" if r["speed_representative"] is not False else " unrepresentative")) for r in ok if r.get(key) is not None]

    charts = [scatter(points, "file size (MB)", figures.loss_label, chart_id="chart-pareto"),
              bars(bar_rows(speed.key), f"{speed.label} (grey: speed not representative here)", chart_id="chart-speed"),
              bars(bar_rows("peak_rss_mb"), "peak RSS (MB)", chart_id="chart-memory")]
    return "".join(f'<div class="chart">{chart}</div>' for chart in charts)


def render_html(data: dict) -> str:
    e = html.escape
    columns = _columns(data["rows"])
    head = "".join(f"<th>{e(h)}</th>" for h in ["spec"] + [_header(m) for m in columns])
    body = "".join(
        f"<tr class=\"{'baseline' if r['baseline'] else ''} {'pareto' if r['pareto'] else ''} {r['status']}\">"
        + "".join(f"<td>{e(cell)}</td>" for cell in _cells(r, columns)) + "</tr>"
        for r in data["rows"])
    failures = "".join(f"<li>{e(r['spec'])}: {e(r['status'])}: {e(r['error'] or '')}</li>" for r in data["rows"] if r["status"] != "ok")
    summary = "".join(
        f"<tr><td>{e(s['framework'])}</td><td>{e(s['quantization'])}</td>"
        f"<td>{s['memory_mb'] or 0:.0f} MB RSS, {s['size_mb']:.0f} MB file</td>"
        f"<td>{s['size_reduction_vs_fp32_pct']:.0f}%</td><td>{'' if s['speedup_vs_fp32'] is None else s['speedup_vs_fp32']}x"
        f"{'' if s['speed_representative'] else ' (not representative)'}</td><td>{e(s['use_case'])}</td></tr>"
        for s in data["summary"])
    notes = "".join(f"<li>{e(n)}</li>" for n in data["notes"])
    payload = json.dumps(data).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{e(data['title'])}</title><style>{_STYLE}</style></head>
<body>
<h1>{e(data['title'])}</h1>
<p>Run {data['run_id']} in {e(data['db'])}; source fingerprint {e(data['fingerprint'][:16])}.
Bold specs are on the size/quality Pareto front; the blue row is the PyTorch fp32 baseline.</p>
<h2>Results</h2>
<table id="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<ul class="failures">{failures}</ul>
<h2>Charts</h2>
<div class="charts">{_charts(data["rows"], data.get("task", TEXT_GENERATION))}</div>
<h2>Summary by framework</h2>
<table id="summary"><thead><tr><th>framework</th><th>quantization</th><th>memory use</th><th>size reduction vs fp32</th>
<th>speed-up vs fp32</th><th>use case</th></tr></thead><tbody>{summary}</tbody></table>
<h2>Notes</h2><ul class="notes">{notes}</ul>
<script id="report-data" type="application/json">{payload}</script>
</body></html>
"""
