"""Plain-text tables for people (the CLI's default output)."""

from __future__ import annotations

from edgequant.measurement import metric_table


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def format_inspect(info: dict) -> str:
    if "image" in info or "not_convertible" in info:
        return _format_graph_model(info)
    lines = [
        f"model           {info['model']}",
        f"architecture    {info['architecture']} ({info['model_type']})",
        f"task            {info['task']}" + (f" (pooling {info['encoder']['pooling']}, unit length "
                                             f"{info['encoder']['normalize']}, at most {info['encoder']['max_tokens']} tokens)"
                                             if "encoder" in info else ""),
        f"layers          {info['layers']}",
        f"hidden size     {info['hidden_size']}",
        f"heads / kv      {info['heads']} / {info['kv_heads']}",
        f"vocabulary      {info['vocab_size']}",
        f"context         {info['context_length']}",
        f"parameters      {info['parameters']:,} ({info['embedding_parameters']:,} in embeddings"
        f"{', tied' if info['tied_embeddings'] else ''})",
        f"dtype           {info['dtype']}",
        f"size on disk    {_mb(info['size_bytes'])}",
        f"tokenizer       {info['tokenizer']}",
        f"fingerprint     {info['fingerprint'][:16]}",
    ]
    if "gguf_tensor_types" in info:
        lines.append(f"GGUF types      {', '.join(info['gguf_tensor_types'])} (imported by dequantizing)")
    if "caveat" in info:
        lines.append(f"note            {info['caveat']}")
    return "\n".join(lines + _estimate_lines(info))


def _format_graph_model(info: dict) -> str:
    """`inspect` of an image classifier: its graph's inputs, outputs and operators."""
    image = info.get("image")
    ops = ", ".join(f"{op} {count}" for op, count in info.get("ops", {}).items())
    task = (f"{info['task']} ({image['size']} x {image['size']} images, shorter side scaled to {image['resize']}, "
            f"mean {image['mean']}, std {image['std']})" if image else f"none edgequant converts: {info['not_convertible']}")
    lines = [
        f"model           {info['model']}",
        f"architecture    {info['architecture']} ({info['kind']})",
        f"task            {task}",
        f"inputs          {_shapes(info['inputs'])}",
        f"outputs         {_shapes(info['outputs'])}",
        *([f"operators       {ops} (opset {info['opset']})"] if ops else []),
        f"parameters      {info['parameters']:,}",
        f"dtype           {info['dtype']}",
        f"size on disk    {_mb(info['size_bytes'])}",
        f"fingerprint     {info['fingerprint'][:16]}",
    ]
    return "\n".join(lines + (_estimate_lines(info) if image else []))


def _shapes(values: dict) -> str:
    return ", ".join(f"{name} [{' x '.join(str(d) for d in dims)}]" for name, dims in values.items())


def _estimate_lines(info: dict) -> list[str]:
    lines = ["", "estimated size per precision:"]
    for spec_text, size in info["estimated_bytes"].items():
        precision = info["precisions"][spec_text]
        flag = "  (needs an importance matrix)" if precision["needs_imatrix"] else ""
        lines.append(f"  {spec_text:<16} {precision['class']:<10} {precision['bpw']:>6.2f} bpw  {_mb(size):>12}{flag}")
    return lines


def format_hardware(found: dict, profile: dict) -> str:
    m = found["machine"]
    devices = "; ".join(f"{kind}: {', '.join(seen)}" for kind, seen in m["devices"].items()) or "none visible"
    chosen = next(v for v in found["verdicts"] if v["profile"] == found["profile"])
    lines = [
        f"os / machine    {m['os']} {m['machine']}",
        f"cpu             {m['cpu_vendor']} {m['cpu_model']}, {m['cores']} cores",
        f"memory          {m['ram_gb']} GB",
        f"isa             {' '.join(m['isa']) or 'none of note'}",
        *([f"int8 kernels    {found['int8_dot_product']}"
           + ("; build onnx:int8 with ?weights=u8 for it" if found["int8_dot_product"] != "vnni" else "")]
          if found.get("int8_dot_product") else []),
        f"accelerators    {devices}",
        "",
        f"closest profile {found['profile']}: {profile['title']}",
        f"  because       {'; '.join(chosen['evidence']) or 'it has no requirements'}",
        f"  formats       {', '.join(profile['formats'])} (best first)",
        f"  accelerates   {', '.join(profile['accelerates'])}",
        f"  speed here    {profile['speed']}",
        f"  notes         {profile['notes']}",
        "",
        "other profiles:",
    ]
    for v in found["verdicts"]:
        if v["profile"] != found["profile"]:
            why = "matches, lower priority" if v["matches"] else "; ".join(v["missing"])
            lines.append(f"  {v['profile']:<14} {why}")
    return "\n".join(lines)


def format_recommendation(r: dict) -> str:
    lines = [f"recommendation for {r['model']} on {r['profile']} ({r['profile_title']}): {r['recommendation'] or 'none'}", "",
             "decision path:"] + [f"  {i}. {step}" for i, step in enumerate(r["decision_path"], 1)] + ["", "candidates:"]
    for c in r["candidates"]:
        m = c["measured"]
        if m and _other_task(m):
            figures = _task_quality_words(m)
        elif m and m.get("kld_mean") is not None:
            figures = f"KLD {m['kld_mean']:.4f} {m['ci95'].get('kld_mean')}, ppl +{m['ppl_increase_pct']:.2f}%"
        else:
            figures = "not measured here"
        mark = "*" if c["spec"] == r["recommendation"] else " "
        size = f"{c['size_mb']:>7.1f} MB" if c["size_measured"] else f"~{c['size_mb']:>6.1f} MB"
        peak = f"peak {m['peak_rss_mb']:.0f} MB" if m and m.get("peak_rss_mb") else f"peak ~{c['expected_peak_mb']:.0f} MB"
        lines.append(f" {mark} {c['spec']:<22} {size}, {peak}; {figures}"
                     + ("" if c["installed_here"] else " (engine not installed here)"))
        if c["lost_because"]:
            lines.append(f"      lost: {c['lost_because']}")
    if r["speed_here"] == "stand-in":
        lines.append("\nspeed on this machine is a stand-in for the target's (see `edgequant hardware --profiles`)")
    return "\n".join(lines)


def _other_task(figures: dict) -> bool:
    """Figures of a model of another task than text generation (they may hold a KLD too)."""
    return figures.get("task", "text-generation") != "text-generation" and figures.get("task") in metric_table.TASK_FIGURES


def _task_quality_words(f: dict) -> str:
    """The task's quality figure with its interval, e.g. `cosine 0.9920 [0.9917, 0.9922]`."""
    quality = metric_table.by_key(metric_table.TASK_FIGURES[f["task"]].rank)
    interval = (f.get("ci95") or {}).get(quality.key)
    return f"{quality.label} {quality.show(f[quality.key])}" + (f" [{quality.show(interval[0])}, {quality.show(interval[1])}]"
                                                                if interval else "")


def _task_figures_line(f: dict) -> str:
    """Size, the task's quality figure with its interval, its speed figure and peak memory."""
    speed = metric_table.by_key(metric_table.TASK_FIGURES[f["task"]].speed)
    words = [f"{f['size_bytes'] / 1e6:7.1f} MB", _task_quality_words(f)]
    if f.get(speed.key):
        words.append(f"{speed.show(f[speed.key])} {speed.unit}")
    return ", ".join(words + [f"peak {f.get('peak_rss_mb', 0):.0f} MB"])


def format_optimize(r: dict) -> str:
    profile = r["profile"]
    lines = [f"optimize {r['model']} for {profile['name']} ({profile['title']}): "
             + (f"winner {r['winner']}" if r["winner"] else "no candidate passes every gate"),
             f"{r['evaluations']} of {r['budget']} evaluations, {r['seconds'] / 60:.1f} min", "", "decision path:"]
    lines += [f"  {i}. {step}" for i, step in enumerate(r["decision_path"], 1)]
    lines += ["", "candidates (* winner, + Pareto front):"]
    for c in r["candidates"]:
        f = c.get("figures") or {}
        mark = "*" if c["spec"] == r["winner"] else "+" if c["pareto"] else " "
        if _other_task(f):
            text = _task_figures_line(f) + (" (cached)" if c["cached"] else "")
        elif f.get("kld_mean") is not None:
            speed = f", {f['decode_tps']:.0f} tok/s" if f.get("decode_tps") else ""
            text = (f"{f['size_bytes'] / 1e6:7.1f} MB, KLD {f['kld_mean']:.4g} {f['ci95'].get('kld_mean')}, "
                    f"ppl {f['ppl_increase_pct']:+.2f}%{speed}, peak {f.get('peak_rss_mb', 0):.0f} MB"
                    + (" (cached)" if c["cached"] else ""))
        else:
            text = f"{c['status']}: {c['reason']}"
        lines.append(f" {mark} {c['spec']:<34} {text}")
        failed = [v for v in c["verdicts"] if v["verdict"] not in ("pass", "skipped")] if c["status"] == "measured" else []
        if failed:
            lines.append(f"      fails: {', '.join(v['gate'] + ' (' + v['verdict'] + ')' for v in failed)}")
        if c["better_than_parent"] is not None:
            lines.append(f"      {c['origin']}: {'better' if c['better_than_parent'] else 'not better'} than its parent")
    if r["why"]:
        lines += ["", "why:"] + [f"  - {w}" for w in r["why"]]
    if r["closest"]:
        lines += ["", f"closest: {r['closest']['spec']}: {r['closest']['missed']}"]
    if r.get("certificate"):
        lines += ["", f"certificate: {r['certificate']} (and certificate.html beside it)"]
    return "\n".join(lines)


def format_plan(p: dict) -> str:
    lines = [f"plan: optimize {p['model']} for {p['profile']}, objective {p['objective']}, gates {', '.join(p['gates'])}",
             f"estimated time: about {p['estimated_s'] / 60:.0f} min ({p['estimate_basis']})", "", "candidates:"]
    for c in p["candidates"]:
        state = (f"skipped: {c['skipped']}" if c["skipped"] else "evaluation cached" if c["evaluation_cached"]
                 else "artifact cached, to evaluate" if c["artifact_cached"] else "to build and evaluate")
        lines.append(f"  {c['spec']:<34} ~{c['expected_size_mb']:>7.1f} MB  {state}")
    if p["neighbours_at_most"]:
        lines.append(f"then up to {p['neighbours_at_most']} neighbours of the best, within the budget of {p['budget']}")
    return "\n".join(lines)


def format_verify(found: dict) -> str:
    lines = [f"{found['artifact']}: {'matches' if found['ok'] else 'does NOT match'} the certificate of {found['spec']}"]
    lines += [f"  {f['status']:<8} {f['path']}" for f in found["files"] if f["status"] != "same"]
    if found["ok"]:
        lines.append(f"  {len(found['files'])} files, every sha256 the same")
    return "\n".join(lines)


def format_profiles(listed: dict) -> str:
    lines = []
    for name, p in listed.items():
        lines += [f"{name}: {p['title']}", f"  formats {', '.join(p['formats'])}; accelerates {', '.join(p['accelerates'])}",
                  f"  memory {p['memory']}; speed {p['speed']}", f"  {p['notes']}", ""]
    return "\n".join(lines).rstrip()


def format_metrics(metrics: dict) -> str:
    lines = [f"{metrics['target']}  vs  {metrics['baseline']}"]
    intervals = metrics.get("ci95", {})
    for m in metric_table.TABLE:  # the figures as the bench table prints them, each with its interval
        if metrics.get(m.key) is not None and not m.derived:
            value = m.show(metrics[m.key])
            if m.key in intervals:
                value += f"   95% interval [{m.show(intervals[m.key][0])}, {m.show(intervals[m.key][1])}]"
            lines.append(f"  {m.label:<16} {value}")
    if "model_rss_mb" in metrics:
        lines.append(f"  model MB: peak RSS less the {metrics['interpreter_rss_mb']:,.0f} MB the process held before the engine loaded")
    if "baseline_perplexity" in metrics:
        lines.append(f"  baseline perplexity {metrics['baseline_perplexity']:.4f}, {metrics['tokens_scored']:,} tokens scored")
    for key in ("arithmetic", "caveat"):
        if key in metrics:
            lines.append(f"  {key}: {metrics[key]}")
    s = metrics["settings"]
    if metrics.get("task", "text-generation") != "text-generation":
        lines.append(f"  inputs: {metrics.get('inputs_scored')} of {s['data']}; {s['threads']} threads; "
                     f"speed: median of {s['repeats']} runs")
    else:
        lines.append(f"  windows: {s['windows']} x {s['ctx']} tokens of {s['data']}; {s['threads']} threads; speed: median of "
                     f"{s['repeats']} runs, a different {s['prompt_tokens']}-token prompt each, {s['gen_tokens']} generated")
    return "\n".join(lines)


def _result_fields() -> tuple[str, ...]:
    """The results store's identifying columns, then each metric column the metric table declares."""
    from edgequant.measurement.results import metric_columns

    return ("id", "run_id", "created", "model", "spec", "status", *(c for c, _, end in metric_columns() if end is None), "error")


def format_results(rows: list[dict], style: str) -> str:
    """Rows of the results database as a table, CSV or JSON."""
    import csv
    import io
    import json

    if style == "json":
        return json.dumps(rows, indent=2)
    if style == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=_result_fields(), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue().rstrip("\n")
    lines = [f"{'id':>4} {'run':>4} {'spec':<24} {'status':<8} {'size MB':>8} {'ppl':>9} {'ppl +%':>8} {'KLD':>8} {'tok/s':>7}"]
    for r in rows:
        def num(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else ""
        lines.append(f"{r['id']:>4} {r['run_id']:>4} {r['spec']:<24} {r['status']:<8} "
                     f"{(format(r['size_bytes'] / 1e6, '.1f') if r.get('size_bytes') else ''):>8} {num('perplexity', '.3f'):>9} "
                     f"{num('ppl_increase_pct', '+.2f'):>8} {num('kld_mean', '.4f'):>8} {num('decode_tps', '.1f'):>7}")
    return "\n".join(lines)
