"""`bench`: convert and evaluate one model at many specs, store every result, report.

One artifact at a time (so memory figures do not mix), through the same convert and evaluate
calls users make. A spec that fails is recorded with its error and the run goes on; a spec whose
engine is not installed is skipped with the reason (or stops the run with `strict`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from edgequant.errors import EdgequantError
from edgequant.measurement.measure import SHORT_PROBE, measure, store
from edgequant.measurement.ray_grid import RayConfig, cluster
from edgequant.measurement.settings import DEFAULT_EVAL, EvalConfig
from edgequant.progress import note
from edgequant.registry import BASELINE_SPEC, backends, bench_specs, get_backend, parse_specs
from edgequant.spec import Spec

# 4 windows of 512 tokens: the main job (every default spec, from a cold cache) ran in 25.9 minutes
# on the 2-core reference machine (2026-12-03; qnn:w8a16 13 of them); 8 windows would add ~4 more.


@dataclass(frozen=True)
class BenchConfig:
    model: Path | None = None
    # A spec list as `registry.parse_specs` reads it (a comma-separated string, or strings and
    # Specs); None: every backend's representative specs (registry.bench_specs).
    specs: str | tuple[str | Spec, ...] | None = None
    db: Path | None = None
    report_html: Path | None = None
    report_markdown: Path | None = None
    report_json: Path | None = None
    strict: bool = False
    force: bool = False
    eval: EvalConfig = DEFAULT_EVAL
    # Reuse an evaluation stored earlier of the same artifact bytes with the same settings, text
    # and baseline: a run that was killed goes on where it stopped.
    resume: bool = False
    # Run each spec as a task on this Ray cluster (measurement/ray_grid.py); None: one at a time here.
    ray: RayConfig | None = None


@dataclass
class BenchRow:
    spec: str
    status: str  # "ok", "failed" or "skipped"
    metrics: dict | None = None
    error: str | None = None
    artifact: str | None = None
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # the backend's sentences about this artifact
    baseline: bool = False


@dataclass
class BenchResult:
    run_id: int
    db_path: Path
    model: str
    fingerprint: str
    baseline: BenchRow
    rows: list[BenchRow]
    settings: dict
    machine: dict
    caveat: str | None = None
    wall_s: float = 0.0  # the whole run, baseline and reports' inputs included


def run_bench(config: BenchConfig) -> BenchResult:
    from edgequant.measurement.evaluation import machine_info
    from edgequant.measurement.results import ResultsDB
    from edgequant.sources.source import DEFAULT_MODEL_CAVEAT, load_source

    source = load_source(config.model)
    specs = _plan(config, source)  # every spec is checked before any work starts
    for path in (config.report_html, config.report_markdown, config.report_json):
        if path is not None:
            _check_writable(path)
    with cluster(config.ray) as grid:  # a bad Ray address fails here, before any work
        db = ResultsDB.open(config.db)
        machine = machine_info()
        settings = {"eval": _eval_settings(config.eval), "specs": [str(s) for s, _ in specs],
                    "eval_is_bench_default": config.eval == DEFAULT_EVAL, "short_probe": SHORT_PROBE,
                    **({"ray": _ray_settings(config.ray)} if config.ray else {})}
        run_id = db.start_run(source.name, source.fingerprint, machine, settings, tool_versions())
        started = time.perf_counter()
        baseline = _evaluate_baseline(config, source)
        _store(db, run_id, source, baseline)
        if grid is None:
            rows = _bench_here(config, source, specs, db, run_id, started)
        else:
            rows = _bench_on_ray(grid, config, source, specs)
            for row in rows:  # the driver alone writes the store, in the order of the specs
                _store(db, run_id, source, row)
        db.close()
    result = BenchResult(run_id, db.path, source.name, source.fingerprint, baseline, rows, settings, machine,
                         DEFAULT_MODEL_CAVEAT if source.is_default_model else None, time.perf_counter() - started)
    _write_reports(config, result)
    return result


def _bench_here(config: BenchConfig, source, specs: list[tuple[Spec, str | None]], db, run_id: int,
                started: float) -> list[BenchRow]:
    """One spec after another on this machine, each row stored as it is measured."""
    rows = []
    specs_started = time.perf_counter()  # the time-left estimate leaves the baseline out
    weights = [0.0 if skip else get_backend(spec.format).bench_seconds for spec, skip in specs]
    for index, (spec, skip_reason) in enumerate(specs):
        _progress(index, len(specs), spec, time.perf_counter() - started, time.perf_counter() - specs_started, weights)
        row = BenchRow(str(spec), "skipped", error=skip_reason) if skip_reason else _bench_one(config, source, spec)
        rows.append(row)
        _store(db, run_id, source, row)
        note(f"{row.spec}: {row.status}" + (f" ({row.error})" if row.error else ""))
    return rows


def _bench_on_ray(grid, config: BenchConfig, source, specs: list[tuple[Spec, str | None]]) -> list[BenchRow]:
    """Every spec as a Ray task at once; the rows in the order of the specs."""
    from edgequant.measurement.ray_grid import Job

    todo = [spec for spec, skip in specs if not skip]
    note(f"{len(todo)} specs as Ray tasks")
    done = []

    def progress(index: int, found) -> None:
        done.append(index)
        note(f"[{len(done)}/{len(todo)}] {found.spec}: {found.status} ({found.seconds:.0f} s)"
             + (f" ({found.error})" if found.error else ""))

    measured = iter(grid.measure([Job(source, spec) for spec in todo], config.eval, force=config.force, reuse=config.resume,
                                 strict=config.strict, on_done=progress))
    return [BenchRow(str(spec), "skipped", error=skip) if skip else _row_of(next(measured)) for spec, skip in specs]


def _ray_settings(config: RayConfig) -> dict:
    from dataclasses import asdict

    return asdict(config)


def _plan(config: BenchConfig, source) -> list[tuple[Spec, str | None]]:
    """(spec, reason to skip or None) for every spec, validated against the source's task before any work."""
    from edgequant.conversion import check_task

    plan = []
    for spec in parse_specs(config.specs if config.specs is not None else bench_specs(source.task)):
        check_task(get_backend(spec.format), source, spec)
        reason = get_backend(spec.format).missing_engine()
        if reason and config.strict:
            raise EdgequantError(f"cannot run {spec}: {reason}", "install the engine, or drop --strict to skip it")
        plan.append((spec, reason))
    return plan


def _check_writable(path: Path) -> None:
    from edgequant.atomic import ensure_writable_parent

    ensure_writable_parent(Path(path).expanduser().resolve(), folder=False)


def _evaluate_baseline(config: BenchConfig, source) -> BenchRow:
    from edgequant.measurement.evaluation import evaluate

    started = time.perf_counter()
    metrics = evaluate(source.path, config=config.eval)
    return BenchRow(BASELINE_SPEC, "ok", metrics, artifact=str(source.path), seconds=time.perf_counter() - started,
                    baseline=True)


def _bench_one(config: BenchConfig, source, spec: Spec) -> BenchRow:
    return _row_of(measure(source, spec, config.eval, force=config.force, reuse=config.resume, strict=config.strict))


def _row_of(found) -> BenchRow:
    notes = list(found.notes)
    if found.metrics and found.metrics.get("cached"):
        load = found.metrics.get("machine", {}).get("load_avg_1m")
        notes.append(f"{found.spec}: figures reused (--resume) from an earlier evaluation of the same artifact and "
                     f"settings; its speed was measured then, at a load average of {load}.")
    return BenchRow(found.spec, found.status, found.metrics, found.error, None if found.artifact is None else str(found.artifact),
                    found.seconds, notes=notes)


def _store(db, run_id: int, source, row: BenchRow) -> None:
    store(db, run_id, source, row.spec, row.status, row.metrics, row.error, row.artifact, baseline=row.baseline)


def _progress(index: int, total: int, spec, elapsed: float, specs_elapsed: float, weights: list[float]) -> None:
    left = time_left(specs_elapsed, index, weights)
    eta = f", about {left / 60:.1f} min left" if left is not None else ""
    note(f"[{index + 1}/{total}] {spec} (elapsed {elapsed / 60:.1f} min{eta})")


def time_left(specs_elapsed: float, index: int, weights: list[float]) -> float | None:
    """Seconds left once specs [0, index) took `specs_elapsed`: the pace so far applied to the
    remaining work, each spec weighed by its backend's `bench_seconds` (a QNN spec costs ~25 GGUF
    ones; counting specs said "0.5 min left" before a 6-minute one)."""
    done = sum(weights[:index])
    return specs_elapsed * sum(weights[index:]) / done if done else None


def _eval_settings(config: EvalConfig) -> dict:
    from dataclasses import asdict

    return {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}


def tool_versions() -> dict:
    from edgequant import __version__

    found = {"edgequant": __version__}
    for backend in backends().values():
        found.update(backend.tool_versions())
    return found


def _write_reports(config: BenchConfig, result: BenchResult) -> None:
    import json

    from edgequant.atomic import write_text_atomic
    from edgequant.reporting.report import build_report, render_html, render_markdown

    data = build_report(result)

    outputs = ((config.report_html, render_html), (config.report_markdown, render_markdown),
               (config.report_json, lambda d: json.dumps(d, indent=2)))
    for path, render in outputs:
        if path is not None:
            write_text_atomic(Path(path).expanduser(), render(data))
            note(f"wrote {path}")
