"""Certificates: what `optimize` chose, the evidence it chose from, and hashes to check it later.

`write_certificate` copies the winning artifact to `<out>/model` and writes `certificate.json`
and a self-contained `certificate.html` (no network, no script) beside it, all atomically.
`verify` hashes an artifact folder again and compares every file with the certificate.

The artifact's manifest (`edgequant.json`) is listed but not certified: every evaluation appends
to it. The model files, tokenizer and configuration are what is certified, byte for byte.
"""

from __future__ import annotations

import html
import json
import shutil
from datetime import datetime, timezone
from pathlib import Path

from edgequant.errors import EdgequantError
from edgequant.measurement import metric_table

CERTIFICATE = "certificate.json"
PAGE = "certificate.html"
MODEL_FOLDER = "model"
KIND = "edgequant-certificate"
VERSION = 1


def hash_folder(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, dict]:
    """Every file under `folder` (the manifest included: artifacts are never rewritten), by
    relative path: its sha256 and size. `skip`: names an older certificate left out."""
    from edgequant.fingerprint import fresh_sha256

    return {str(p.relative_to(folder)): {"sha256": fresh_sha256(p), "bytes": p.stat().st_size}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def check_output(out: Path) -> None:
    """Refuse, before any work, a folder that cannot be written or holds something else."""
    from edgequant.atomic import ensure_writable_parent

    out = Path(out).expanduser().resolve()
    ensure_writable_parent(out)
    if out.exists() and any(out.iterdir()) and not (out / CERTIFICATE).is_file():
        raise EdgequantError(f"{out} exists and holds something other than an edgequant certificate",
                             "choose another --output folder, or empty it")


def write_certificate(result: dict, artifact_path: str, source, out: Path) -> Path:
    """Copy the winner to `out/model`, certify it there (replacing an earlier certificate);
    returns the certificate's path."""
    from edgequant.atomic import atomic_dir

    out = Path(out).expanduser().resolve()
    check_output(out)
    with atomic_dir(out, replace=True) as tmp:
        shutil.copytree(artifact_path, tmp / MODEL_FOLDER)
        certificate = build_certificate(result, tmp / MODEL_FOLDER, source)
        (tmp / CERTIFICATE).write_text(json.dumps(certificate, indent=2))
        (tmp / PAGE).write_text(render_html(certificate))
    return out / CERTIFICATE


def build_certificate(result: dict, model_dir: Path, source) -> dict:
    from edgequant import __version__
    from edgequant.artifact import open_artifact
    from edgequant.decisions.hardware import detect
    from edgequant.measurement.benchmark import tool_versions
    from edgequant.measurement.evaluation import machine_info

    artifact = open_artifact(model_dir)
    winner = next(c for c in result["candidates"] if c["spec"] == result["winner"])
    return {
        "kind": KIND, "version": VERSION, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "verdict": "pass" if winner["passes"] else "fail",
        "spec": result["winner"], "model": result["model"], "task": result.get("task", "text-generation"),
        "artifact": {"folder": MODEL_FOLDER, "files": hash_folder(model_dir), "not_certified": [],
                     "built": artifact.manifest.get("created"), "details": artifact.manifest.get("details", {}),
                     "limitations": artifact.manifest.get("limitations", [])},
        "source": {"path": result["source"], "fingerprint": result["source_fingerprint"], "files": _source_files(source)},
        "tools": {"edgequant": __version__, **artifact.manifest.get("tools", {}), **tool_versions()},
        "machine": {**machine_info(), "detected": detect().to_json()},
        "profile": result["profile"],
        "evaluation": result["eval_settings"],
        "gates": winner["verdicts"], "default_gates": result["default_gates"], "objective": result["objective"],
        "figures": winner["figures"], "derived": winner.get("derived", {}), "baseline": result["baseline"],
        "stand_ins": [v for v in winner["verdicts"] if v.get("stand_in")],
        "pareto_front": [_brief(c) for c in result["candidates"] if c["pareto"]],
        "candidates": [_brief(c) for c in result["candidates"]],
        "why": result["why"], "decision_path": result["decision_path"],
    }


def _source_files(source) -> dict[str, str]:
    from edgequant.fingerprint import file_sha256

    path = Path(source.path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {(p.name if path.is_file() else str(p.relative_to(path))): file_sha256(p) for p in files}


def _brief(c: dict) -> dict:
    """A candidate's line: its state and every figure of the metric table it has."""
    f = c.get("figures") or {}
    return {"spec": c["spec"], "status": c["status"], "passes": c["passes"], "pareto": c["pareto"], "origin": c["origin"],
            "size_mb": round(f["size_bytes"] / 1e6, 2) if f.get("size_bytes") else None,
            **{m.key: f.get(m.key) for m in metric_table.measured()}, "reason": c.get("reason")}


def read_certificate(path: Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_file():
        raise EdgequantError(f"no such certificate: {path}", "pass the certificate.json written by `edgequant optimize`")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        raise EdgequantError(f"{path} is not JSON", "pass the certificate.json written by `edgequant optimize`") from None
    if not isinstance(data, dict) or data.get("kind") != KIND:
        raise EdgequantError(f"{path} is not an edgequant certificate", "pass the certificate.json written by `edgequant optimize`")
    if data.get("version") != VERSION:
        raise EdgequantError(f"{path} is a version {data.get('version')} certificate; this edgequant reads version {VERSION}",
                             "verify it with the edgequant that wrote it")
    return data


def verify(certificate_path: Path, artifact: Path) -> dict:
    """Compare every file of `artifact` with the certificate: same, changed, missing or extra."""
    certificate = read_certificate(certificate_path)
    folder = Path(artifact).expanduser()
    if not folder.is_dir():
        raise EdgequantError(f"{folder} is not a folder", "pass the artifact folder the certificate names (its model/ folder)")
    expected = certificate["artifact"]["files"]
    found = hash_folder(folder, skip=tuple(certificate["artifact"].get("not_certified", ())))  # older certificates left the manifest out
    files = []
    for name in sorted(set(expected) | set(found)):
        want, got = expected.get(name), found.get(name)
        status = "missing" if got is None else "extra" if want is None else "same" if want["sha256"] == got["sha256"] else "changed"
        files.append({"path": name, "status": status, "expected": want and want["sha256"], "actual": got and got["sha256"]})
    return {"certificate": str(certificate_path), "artifact": str(folder), "spec": certificate["spec"],
            "ok": all(f["status"] == "same" for f in files), "files": files}


# -- the page ----------------------------------------------------------------------------------

_STYLE = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.5em}table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
th{background:#f3f3f3}.pass{color:#176f2c;font-weight:600}.fail,.uncertain{color:#a31515;font-weight:600}
.skipped,.not{color:#8a6d00}.banner{padding:.8em 1em;border-radius:6px;font-size:1.2em;margin:1em 0}
.banner.pass{background:#e3f4e7}.banner.fail{background:#fbe4e4}code{font-size:.9em}
.front{fill:#1f6fb2}.pareto-front{fill:none;stroke:#1f6fb2}.point{fill:#bbb}.winner{fill:#d9480f}svg text{font-size:11px}"""


def render_html(c: dict) -> str:
    e = html.escape
    gates = "".join(
        f"<tr class=\"gate\"><td><code>{e(v['gate'])}</code></td><td>{e(_value(v))}</td><td>{e(str(v.get('ci95') or ''))}</td>"
        f"<td class=\"{e(v['verdict'].split()[0])}\">{e(v['verdict'])}</td><td>{e(v.get('stand_in', ''))}</td></tr>"
        for v in c["gates"])
    figures = "".join(f"<tr><td>{e(k)}</td><td>{e(json.dumps(v))}</td></tr>" for k, v in {**c["figures"], **c["derived"]}.items())
    columns = [m for m in metric_table.TABLE if m.in_report and not m.derived
               and any(x.get(m.key) is not None for x in c["candidates"])]
    candidates = "".join(
        f"<tr class=\"candidate\"><td><code>{e(x['spec'])}</code></td><td>{e(x['origin'])}</td><td>{e(x['status'])}</td>"
        + "".join(f"<td>{'' if x.get(m.key) is None else e(m.show(x[m.key]))}</td>" for m in columns)
        + f"<td>{'yes' if x['passes'] else 'no'}</td><td>{'yes' if x['pareto'] else ''}</td>"
        f"<td>{e(x['reason'] or '')}</td></tr>" for x in c["candidates"])
    candidate_head = "".join(f"<th>{e(m.label)}</th>" for m in columns)
    hashes = "".join(f"<tr class=\"hash\"><td><code>{e(name)}</code></td><td><code>{e(h['sha256'])}</code></td><td>{h['bytes']}</td></tr>"
                     for name, h in c["artifact"]["files"].items())
    sources = "".join(f"<tr><td><code>{e(name)}</code></td><td><code>{e(h)}</code></td></tr>" for name, h in c["source"]["files"].items())
    tools = ", ".join(f"{e(k)} {e(str(v))}" for k, v in c["tools"].items())
    why = "".join(f"<li>{e(w)}</li>" for w in c["why"])
    path = "".join(f"<li>{e(s)}</li>" for s in c["decision_path"])
    machine = c["machine"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edgequant certificate: {e(c['spec'])}</title><style>{_STYLE}</style></head>
<body>
<h1>edgequant certificate: <code>{e(c['spec'])}</code> of {e(c['model'])}</h1>
<div class="banner {e(c['verdict'])}" id="verdict">Verdict: {e(c['verdict'].upper())} for {e(c['profile']['name'])}
({e(c['profile']['title'])}){'' if c['profile']['runs_here'] else ' - measured on a stand-in machine, see the gates'}</div>
<h2>Why this one</h2><ul id="why">{why}</ul>
<h2>Gates</h2>
<table id="gates"><thead><tr><th>gate</th><th>measured</th><th>95% interval</th><th>verdict</th><th>stand-in</th></tr></thead>
<tbody>{gates}</tbody></table>
<h2>Pareto front</h2>
{_chart(c['candidates'], c['spec'], c.get('task', 'text-generation'))}
<table id="candidates"><thead><tr><th>spec</th><th>origin</th><th>status</th>{candidate_head}
<th>passes</th><th>front</th><th>note</th></tr></thead><tbody>{candidates}</tbody></table>
<h2>Figures of the winner</h2><table id="figures"><tbody>{figures}</tbody></table>
<h2>Artifact files (sha256)</h2>
<table id="hashes"><thead><tr><th>file</th><th>sha256</th><th>bytes</th></tr></thead><tbody>{hashes}</tbody></table>
<p>Every file is certified, the manifest included. Check a copy with <code>edgequant verify certificate.json FOLDER</code>.</p>
<h2>Source</h2><p>{e(c['source']['path'])}, fingerprint <code>{e(c['source']['fingerprint'])}</code></p>
<table id="source"><tbody>{sources}</tbody></table>
<h2>Evaluation</h2><p><code>{e(json.dumps(c['evaluation']))}</code></p>
<h2>Machine and tools</h2><p>{e(str(machine.get('cpu')))}, {machine.get('cores')} cores, {machine.get('ram_gb')} GB,
{e(str(machine.get('os')))}, load {machine.get('load_avg_1m')}. Tools: {tools}.</p>
<h2>Decision path</h2><ol>{path}</ol>
<p>Written {e(c['created'])}.</p>
</body></html>
"""


def _value(v: dict) -> str:
    value = v.get("value")
    if value is None:
        return "-"
    return f"{value / 1e6:.2f} MB" if v["gate"].startswith("size") else f"{value:.4g}"


def _chart(candidates: list[dict], winner: str, task: str) -> str:
    """Size against the task's quality figure (KLD on a log scale; a sentence encoder's 1 - cosine),
    the front in blue, the winner in orange."""
    from edgequant.reporting.charts import Point, scatter

    metric = metric_table.by_key(metric_table.TASK_FIGURES[task].rank)
    lower = metric.lower_is_better

    def y(c):  # how far from the baseline, whichever way the figure improves
        return c[metric.key] if lower else 1.0 - c[metric.key]

    points = [Point(c["size_mb"], y(c), c["spec"], f"{c['spec']}: {c['size_mb']:.1f} MB, {metric.label} {metric.show(c[metric.key])}",
                    "winner" if c["spec"] == winner else "front" if c["pareto"] else "point", c["pareto"])
              for c in candidates if c["size_mb"] and c.get(metric.key) is not None]
    label = f"{metric.label} (log scale)" if lower else f"1 - {metric.label} (log scale)"
    return scatter(points, "size (MB)", label, log_y=True, chart_id="front-chart", width=640, height=320)
