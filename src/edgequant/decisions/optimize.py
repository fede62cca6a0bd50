"""`optimize`: the best artifact for a target under gates, chosen from measurements.

1. The target profile (`--target`, or the one closest to this machine) and the gates (the
   production-readiness defaults when none are given).
2. Candidates: the profile's specs, the built-in specs of its formats, and specs that build
   themselves to the size gate's budget (a per-tensor GGUF mix). A candidate whose expected size is
   far over a size gate is not built; one whose engine is missing here is listed with its extra.
3. Each candidate is converted (cached) and evaluated (cached in the results store by the
   artifact's content and the settings); the fp32 baseline's speed and memory are measured in
   this run, for `speedup` and `memory_reduction`.
4. Closed loop: the neighbours of the best two candidates (`Backend.neighbours`: another group
   size, an importance matrix, sensitive layers at 8 bit; for a model with a LoRA adapter merged
   in, the adapter kept separate) are measured while the budget of evaluations lasts; each
   neighbour says whether it measured better than its parent.
5. The Pareto front over KLD, size, peak memory and decode speed; the winner is the passing
   candidate best by the objective. Figures that came from the cache are measured again in this
   run before the winner is certified.

With `ray` (`--ray ADDRESS`), the candidates are measured as Ray tasks at once, and each round of
the closed loop's neighbours likewise (a round depends on the last one's figures, so rounds stay
in order); the baseline and the winner's re-measurement run on the driver.

When the target is not this kind of machine, speed gates are skipped and memory is estimated from
the artifact size: the output says which figures are such stand-ins and why.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from edgequant.decisions.gates import Gate, check, default_gates, derived_metrics, missed_words, parse_gates, passes, source_check
from edgequant.decisions.recommend import RUNTIME_OVERHEAD_MB
from edgequant.errors import EdgequantError
from edgequant.measurement import metric_table
from edgequant.measurement.benchmark import tool_versions
from edgequant.measurement.measure import eval_config_for, measure, store
from edgequant.measurement.metric_table import Metric
from edgequant.measurement.ray_grid import RayConfig, cluster
from edgequant.measurement.settings import DEFAULT_EVAL, EvalConfig
from edgequant.progress import note
from edgequant.registry import BASELINE_SPEC, get_backend, parse_spec, parse_specs
from edgequant.sources.tasks import TEXT_GENERATION

# An objective is a gateable figure of the metric table (the best passing candidate by it wins),
# or one of these names for the usual three (which figure each is depends on the task).
OBJECTIVE_NAMES = ("size", "speed", "quality")
DEFAULT_BUDGET = 20  # evaluations, neighbours included
EXPANDED_PER_ROUND = 2  # how many of the best candidates have their neighbours tried each round
# A candidate is built only if its expected size is within this factor of a size gate: the
# estimate is rough where a format keeps some tensors wider than its nominal precision.
SIZE_ESTIMATE_SLACK = 1.25
# Seconds the baseline's speed probe and a cached candidate's check take, for plan()'s estimate.
BASELINE_SECONDS = 60.0
CACHED_SECONDS = 3.0


@dataclass(frozen=True)
class OptimizeConfig:
    model: Path | None = None
    target: str | None = None  # a profile name; None: the one closest to this machine
    gates: tuple[str, ...] = ()  # empty: the task's default gates (gates.default_gates)
    objective: str = "size"
    budget: int = DEFAULT_BUDGET
    specs: str | tuple[str, ...] | None = None  # exactly these candidates instead of the profile's (registry.parse_specs)
    search: bool = True  # try neighbours of the best candidates
    eval: EvalConfig = DEFAULT_EVAL
    output: Path | None = None  # where the winner, its certificate and report go
    db: Path | None = None
    ray: RayConfig | None = None  # measure candidates as tasks on this Ray cluster (measurement/ray_grid.py)

    def __post_init__(self):
        objective_metric(self.objective)  # refuses an unknown one
        if self.budget < 1:
            raise EdgequantError(f"--budget {self.budget} must be at least 1 evaluation", "pass e.g. --budget 20")


@dataclass
class Candidate:
    spec: str
    origin: str  # why it was tried
    status: str = "planned"  # measured, too big (built, over a size gate), failed, not built, not installed
    reason: str = ""
    metrics: dict | None = None
    figures: dict = field(default_factory=dict)  # what gates read: measured, derived, estimated
    verdicts: list[dict] = field(default_factory=list)
    artifact: str | None = None
    cached: bool = False
    better_than_parent: bool | None = None

    @property
    def passes(self) -> bool:
        return self.status == "measured" and passes(self.verdicts)


@dataclass
class Context:
    """What every measurement of one run shares."""

    config: OptimizeConfig
    source: object
    gates: list[Gate]
    runs_here: bool
    baseline: dict
    db: object
    run_id: int
    evaluations: int = 0
    task: str = TEXT_GENERATION
    grid: object | None = None  # a ray_grid.Grid: candidates are measured as Ray tasks


def optimize(config: OptimizeConfig) -> dict:
    from edgequant.decisions.hardware import detect, runs_here
    from edgequant.decisions.recommend import target_profile
    from edgequant.measurement.evaluation import evaluate, machine_info
    from edgequant.measurement.results import ResultsDB
    from edgequant.sources.source import load_source

    started = time.perf_counter()
    if config.output is not None:
        from edgequant.decisions.certificate import check_output

        check_output(config.output)  # before any work, not after it
    source = load_source(config.model)
    gates = parse_gates(config.gates or default_gates(source.task))
    path, profile = target_profile(config.target)
    here = runs_here(profile, detect())
    candidates = _initial_candidates(config, profile, source, gates)
    _check_something_runs(candidates, profile)
    path.append(f"gates: {', '.join(g.text for g in gates)}" + ("" if config.gates else f" (the defaults for {source.task} models)"))
    path.append(f"objective: {config.objective} ({_objective_words(config.objective, source.task)})")
    if not here:
        path.append(f"{profile.name} is not this machine: quality is measured here for real; speed gates are skipped and "
                    f"peak memory is estimated as artifact size + {RUNTIME_OVERHEAD_MB:.0f} MB (stand-ins)")
    with ExitStack() as held:
        grid = held.enter_context(cluster(config.ray))  # a bad Ray address fails here, before any work
        db = ResultsDB.open(config.db)
        held.callback(db.close)
        settings = {"verb": "optimize", "target": profile.name, "gates": [g.text for g in gates], "objective": config.objective}
        run_id = db.start_run(source.name, source.fingerprint, machine_info(), settings, tool_versions())
        note("measuring the fp32 baseline's speed and memory in this run")
        baseline = evaluate(source.path, config=config.eval)
        store(db, run_id, source, BASELINE_SPEC, "ok", baseline, artifact=source.path, baseline=True)
        ctx = Context(config, source, gates, here, baseline, db, run_id, task=source.task, grid=grid)
        _measure_all(ctx, candidates)
        if config.search:
            _closed_loop(ctx, candidates)
        winner = _certified_winner(ctx, candidates)
    result = _result(ctx, profile, candidates, winner, path, time.perf_counter() - started)
    if winner is not None and config.output is not None:
        from edgequant.decisions.certificate import write_certificate

        result["certificate"] = str(write_certificate(result, winner.artifact, source, config.output))
    return result


def plan(config: OptimizeConfig) -> dict:
    """What `optimize` would do, without doing it: the candidates, which are cached, and an
    estimate of the time (each backend's `bench_seconds` for what is not cached)."""
    from edgequant.artifact import is_artifact
    from edgequant.conversion import default_artifact_dir
    from edgequant.decisions.recommend import target_profile
    from edgequant.measurement.evaluation import stored_evaluation
    from edgequant.sources.source import load_source

    source = load_source(config.model)
    gates = parse_gates(config.gates or default_gates(source.task))
    path, profile = target_profile(config.target)
    rows, seconds = [], BASELINE_SECONDS
    for candidate in _initial_candidates(config, profile, source, gates):
        spec = parse_spec(candidate.spec)
        backend = get_backend(spec.format)
        expected = backend.estimated_bytes(spec.precision, source.tensors, source.tied_embeddings)
        folder = default_artifact_dir(source.fingerprint, spec)
        built = is_artifact(folder)
        evaluated = built and stored_evaluation(folder, eval_config_for(config.eval, spec)) is not None
        too_big = _over_size_gate(gates, expected, SIZE_ESTIMATE_SLACK)
        skip = backend.missing_engine() or (f"expected size is over {too_big}" if too_big else None)
        cost = 0.0 if skip else CACHED_SECONDS if evaluated else backend.bench_seconds
        seconds += cost
        rows.append({"spec": candidate.spec, "origin": candidate.origin, "expected_size_mb": round(expected / 1e6, 1),
                     "artifact_cached": built, "evaluation_cached": evaluated, "skipped": skip, "estimated_s": cost})
    measured = [r for r in rows if not r["skipped"]]
    extra = max(0, config.budget - len(measured)) if config.search else 0
    average = sum(get_backend(parse_spec(r["spec"]).format).bench_seconds for r in measured) / max(len(measured), 1)
    return {"model": source.name, "profile": profile.name, "decision_path": path, "gates": [g.text for g in gates],
            "objective": config.objective, "budget": config.budget, "candidates": rows, "neighbours_at_most": extra,
            "estimated_s": round(seconds + extra * average), "estimate_basis": "each backend's bench_seconds for what is not "
            "cached, the neighbours at their average (a gguf:auto mix's first search takes ~3 minutes more)"}


def objective_metric(objective: str, task: str = TEXT_GENERATION) -> Metric:
    """The figure an objective ranks by: `size`, `speed` (decode tokens/s; other tasks: inputs/s at
    batch 8), `quality` (KLD; a sentence encoder: mean cosine), or a gate's name from the metric
    table (`top1`, `ttft`, ...)."""
    known = {m.gate: m for m in metric_table.TABLE if m.gate} | {m.key: m for m in metric_table.TABLE}
    figures = metric_table.TASK_FIGURES[task]
    named = {"size": "size", "speed": figures.speed, "quality": figures.rank}
    found = known.get(named.get(objective, objective))
    if found is None:
        names = [*OBJECTIVE_NAMES, *(m.gate for m in metric_table.TABLE if m.gate and not m.derived)]
        raise EdgequantError(f"unknown objective {objective!r}", f"use one of: {', '.join(dict.fromkeys(names))}")
    if found.derived:
        raise EdgequantError(f"objective {objective!r} is relative to the baseline, so it ranks like the figure it comes from",
                             "use speed for speedup, peak_rss for memory_reduction, ppl_increase for ppl_change")
    return found


def _objective_words(objective: str, task: str) -> str:
    metric = objective_metric(objective, task)
    return f"the {'lowest' if metric.lower_is_better else 'highest'} {metric.what} among those that pass every gate"


def _initial_candidates(config: OptimizeConfig, profile, source, gates: list[Gate]) -> list[Candidate]:
    from edgequant.conversion import check_task

    if config.specs is not None:
        listed = parse_specs(config.specs)
        for spec in listed:
            check_task(get_backend(spec.format), source, spec)
        return [Candidate(str(spec), "listed") for spec in listed]
    if source.task != TEXT_GENERATION:  # the profile's specs are for causal LMs: every precision its formats offer
        return [Candidate(f"{fmt}:{p}", "offered for the task") for fmt in profile.formats
                for p in get_backend(fmt).precisions_for(source.task)]
    size_bound = _size_bound(gates)
    found: list[Candidate] = []
    for text in profile.precisions:
        found.append(Candidate(text, "the profile's"))
    for fmt in profile.formats:
        backend = get_backend(fmt)
        found += [Candidate(t, "built-in") for t in backend.bench_specs]
        found += [Candidate(t, "sized to the budget" if size_bound else "a measured mix") for t in backend.search_specs(size_bound)]
    unique, seen = [], set()
    for candidate in found:
        key = spec_key(candidate.spec)
        if key not in seen:
            seen.add(key)
            unique.append(candidate)
    return unique


def spec_key(text: str) -> tuple:
    """Specs that build the same artifact (an option at its default written or not) share a key."""
    spec = parse_spec(text)
    values = dataclasses.asdict(get_backend(spec.format).option_values(spec))
    return spec.format, spec.precision, tuple(sorted((k, str(v)) for k, v in values.items()))


def _check_something_runs(candidates: list[Candidate], profile) -> None:
    missing = {}
    for candidate in candidates:
        backend = get_backend(parse_spec(candidate.spec).format)
        if backend.missing_engine():
            missing[backend.name] = backend.install_hint()
    if missing and len(missing) == len({parse_spec(c.spec).format for c in candidates}):
        raise EdgequantError(f"none of {profile.name}'s formats can be measured here: {', '.join(missing)} not installed",
                             "; ".join(f"{fmt}: {hint}" for fmt, hint in missing.items()))


def _measure(ctx: Context, candidate: Candidate) -> None:
    """Convert and evaluate one candidate (both cached), unless its engine is missing, it cannot
    fit a size gate, or the budget of evaluations is spent."""
    if not _ready(ctx, candidate):
        return
    note(f"[{ctx.evaluations + 1}/{ctx.config.budget}] {candidate.spec} ({candidate.origin})")
    _take(ctx, candidate, measure(ctx.source, parse_spec(candidate.spec), ctx.config.eval, reuse=True,
                                  max_bytes=_size_bound(ctx.gates)))


def _measure_all(ctx: Context, candidates: list[Candidate]) -> None:
    """`_measure` each candidate: one after another here, or all at once as Ray tasks (the budget
    counts each one sent as an evaluation until its figures come back)."""
    if ctx.grid is None:
        for candidate in candidates:
            _measure(ctx, candidate)
        return
    from edgequant.measurement.ray_grid import Job

    ready: list[Candidate] = []
    for candidate in candidates:
        if _ready(ctx, candidate, reserved=len(ready)):
            ready.append(candidate)
    if not ready:
        return
    note(f"measuring {len(ready)} candidates as Ray tasks: {', '.join(c.spec for c in ready)}")
    jobs = [Job(ctx.source, parse_spec(c.spec), _size_bound(ctx.gates)) for c in ready]
    for candidate, found in zip(ready, ctx.grid.measure(jobs, ctx.config.eval, reuse=True)):
        _take(ctx, candidate, found)


def _ready(ctx: Context, candidate: Candidate, reserved: int = 0) -> bool:
    """Whether the candidate is to be measured; if not, its status and reason say why."""
    spec = parse_spec(candidate.spec)
    backend = get_backend(spec.format)
    if backend.missing_engine():
        candidate.status, candidate.reason = "not installed", f"{backend.missing_engine()} (deployable, not measurable here)"
        return False
    too_big = _over_size_gate(ctx.gates, backend.estimated_bytes(spec.precision, ctx.source.tensors, ctx.source.tied_embeddings),
                              SIZE_ESTIMATE_SLACK)
    if too_big:
        candidate.status, candidate.reason = "not built", f"expected size is over {too_big}"
        return False
    shortfall = None if ctx.grid is not None else _cannot_build_here(ctx, backend, spec)  # Ray places by memory itself
    if shortfall:
        candidate.status, candidate.reason = "not built", shortfall
        return False
    if ctx.evaluations + reserved >= ctx.config.budget:
        candidate.status, candidate.reason = "not built", f"the budget of {ctx.config.budget} evaluations was spent"
        return False
    return True


def _take(ctx: Context, candidate: Candidate, found) -> None:
    """A candidate's measurement (`measure`'s result) into its status, figures and verdicts."""
    candidate.artifact = None if found.artifact is None else str(found.artifact)
    if found.status == "too big":
        candidate.status = "too big"
        candidate.reason = f"its size {found.size_bytes / 1e6:.1f} MB is over {_over_size_gate(ctx.gates, found.size_bytes, 1.0)}"
        candidate.figures = {"size_bytes": found.size_bytes}
        candidate.verdicts = [check(g, candidate.figures) for g in ctx.gates]
        return
    if found.artifact is not None:  # an evaluation ran (a failed conversion costs no evaluation)
        ctx.evaluations += 1
    if found.status == "failed":
        candidate.status, candidate.reason = "failed", found.error
        store(ctx.db, ctx.run_id, ctx.source, candidate.spec, "failed", error=found.error)
        return
    _record(ctx, candidate, found.metrics)


def _cannot_build_here(ctx: Context, backend, spec) -> str | None:
    """Why the candidate's conversion will not fit in this machine's memory (a built one always can be measured)."""
    from edgequant.artifact import is_artifact
    from edgequant.conversion import default_artifact_dir, memory_shortfall

    if is_artifact(default_artifact_dir(ctx.source.fingerprint, spec)):
        return None
    return memory_shortfall(backend, ctx.source, spec)


def _size_bound(gates: list[Gate]) -> int | None:
    """The tightest upper bound the size gates put on an artifact, if any."""
    return min((int(g.value) for g in gates if g.name == "size" and g.op in ("<=", "<")), default=None)


def _over_size_gate(gates: list[Gate], size: int, slack: float) -> str | None:
    for gate in gates:
        if gate.name == "size" and gate.op in ("<=", "<") and size > gate.value * slack:
            return gate.text
    return None


def _record(ctx: Context, candidate: Candidate, metrics: dict) -> None:
    candidate.status, candidate.metrics, candidate.cached = "measured", metrics, bool(metrics.get("cached"))
    candidate.figures = _figures(ctx, metrics)
    candidate.verdicts = [_verdict(ctx, candidate.spec, g, candidate.figures) for g in ctx.gates]
    if ctx.task == TEXT_GENERATION:  # never certify a model "better" than its source (by perplexity)
        candidate.verdicts.append(source_check(candidate.figures))
    if not candidate.cached:
        store(ctx.db, ctx.run_id, ctx.source, candidate.spec, "ok", metrics, artifact=candidate.artifact)


def _speed_stands_in(ctx: Context, spec_text: str) -> bool:
    return not ctx.runs_here or not get_backend(parse_spec(spec_text).format).speed_is_representative()


def _figures(ctx: Context, metrics: dict) -> dict:
    """The figures gates read; off the target, peak memory is estimated from size for both sides."""
    if ctx.runs_here:
        return derived_metrics(metrics, ctx.baseline)
    kept = [m.key for m in metric_table.measured((metric_table.QUALITY, metric_table.SIZE))] + ["ci95"]
    estimate = {k: metrics[k] for k in kept if k in metrics}
    estimate["peak_rss_mb"] = metrics["size_bytes"] / 1e6 + RUNTIME_OVERHEAD_MB
    base = {"peak_rss_mb": ctx.baseline["size_bytes"] / 1e6 + RUNTIME_OVERHEAD_MB}
    return derived_metrics(estimate, base)


def _verdict(ctx: Context, spec_text: str, gate: Gate, figures: dict) -> dict:
    if gate.metric.kind == metric_table.SPEED and _speed_stands_in(ctx, spec_text):
        return {"gate": gate.text, "verdict": "skipped", "value": None,
                "stand_in": "speed measured here is not the target's (the engine runs through a stand-in)"}
    verdict = check(gate, figures)
    if gate.metric.kind == metric_table.MEMORY and not ctx.runs_here:
        verdict["stand_in"] = f"estimated: artifact size + {RUNTIME_OVERHEAD_MB:.0f} MB runtime, not measured on the target"
    return verdict


# -- ranking and the closed loop ---------------------------------------------------------------

def _objective_key(objective: str, c: Candidate, task: str) -> tuple:
    """The objective's figure, best first; ties go to the task's quality figure (KLD), then the smaller artifact."""
    m = c.metrics or c.figures  # a candidate too big to evaluate has only its size
    quality = metric_table.by_key(metric_table.TASK_FIGURES[task].rank)
    return tuple(metric.order(m.get(metric.key)) for metric in
                 (objective_metric(objective, task), quality, metric_table.by_key("size_bytes")))


def _shortfall(c: Candidate) -> tuple[int, float]:
    """How far a candidate is from passing: gates missed, then their misses relative to the bounds."""
    misses = [v for v in c.verdicts if v["verdict"] not in ("pass", "skipped")]
    relative = sum(1.0 if v.get("missed_by") is None or not v["bound"] else v["missed_by"] / abs(v["bound"]) for v in misses)
    return len(misses), relative


def ranked(objective: str, candidates: list[Candidate], task: str = TEXT_GENERATION) -> list[Candidate]:
    """Measured candidates, best first: those that pass by the objective, then the rest (those
    too big to evaluate included) by how close they come to passing."""
    measured = [c for c in candidates if c.status in ("measured", "too big")]
    passing = sorted((c for c in measured if c.passes), key=lambda c: _objective_key(objective, c, task))
    failing = sorted((c for c in measured if not c.passes), key=lambda c: (_shortfall(c), _objective_key(objective, c, task)))
    return passing + failing


def _closed_loop(ctx: Context, candidates: list[Candidate]) -> None:
    """Measure neighbours of the best candidates while the budget lasts: the best two overall and
    the best of each format (a format's neighbour, e.g. its LM head at 4 bit, may fit a budget its
    own specs miss). A neighbour that measured better than its parent and is in that set gets its
    own neighbours tried next; the loop stops when the set has nothing left to expand."""
    expanded: set[tuple] = set()
    known = {spec_key(c.spec) for c in candidates}
    while ctx.evaluations < ctx.config.budget:
        order = ranked(ctx.config.objective, candidates, ctx.task)
        best_of_format = {}
        for c in order:
            best_of_format.setdefault(parse_spec(c.spec).format, c)
        best = order[:EXPANDED_PER_ROUND] + [c for c in best_of_format.values() if c not in order[:EXPANDED_PER_ROUND]]
        # a neighbour that did not beat its parent is kept as a result but not explored further
        parents = [c for c in best if spec_key(c.spec) not in expanded and c.better_than_parent is not False]
        if not parents:
            return
        if ctx.grid is not None:
            _expand_together(ctx, parents, candidates, known, expanded)
            continue
        for parent in parents:
            expanded.add(spec_key(parent.spec))
            for text in _neighbours(ctx, parent.spec):
                if spec_key(text) in known or ctx.evaluations >= ctx.config.budget:
                    continue
                known.add(spec_key(text))
                neighbour = Candidate(text, f"neighbour of {parent.spec}")
                candidates.append(neighbour)
                _measure(ctx, neighbour)
                _judge(ctx, parent, neighbour)


def _neighbours(ctx: Context, spec_text: str) -> list[str]:
    """The backend's neighbours of a spec and, for a model with a LoRA adapter merged in, the same
    spec with the adapter kept beside the base artifact (`?lora=separate`) where the format offers
    it: quantizing the merged weights can round a fine-tune away, a separate adapter never meets
    the base's grid (docs/lora.md)."""
    spec = parse_spec(spec_text)
    backend = get_backend(spec.format)
    found = list(backend.neighbours(spec))
    if ctx.source.adaptation and "lora" in backend.options and backend.option_values(spec).lora == "merged":
        try:
            found.append(str(parse_spec(str(spec.with_options(lora="separate")))))
        except EdgequantError:  # a precision that cannot keep it separate (e.g. calibrated on the merged graph)
            pass
    return found


def _judge(ctx: Context, parent: Candidate, neighbour: Candidate) -> None:
    if neighbour.status in ("measured", "too big"):
        neighbour.better_than_parent = ranked(ctx.config.objective, [parent, neighbour], ctx.task)[0] is neighbour


def _expand_together(ctx: Context, parents: list[Candidate], candidates: list[Candidate], known: set, expanded: set) -> None:
    """One round of the closed loop on Ray: every parent's neighbours, as far as the budget goes,
    measured at once."""
    batch: list[tuple[Candidate, Candidate]] = []
    for parent in parents:
        expanded.add(spec_key(parent.spec))
        for text in _neighbours(ctx, parent.spec):
            if spec_key(text) in known or ctx.evaluations + len(batch) >= ctx.config.budget:
                continue
            known.add(spec_key(text))
            batch.append((parent, Candidate(text, f"neighbour of {parent.spec}")))
    candidates.extend(neighbour for _, neighbour in batch)
    _measure_all(ctx, [neighbour for _, neighbour in batch])
    for parent, neighbour in batch:
        _judge(ctx, parent, neighbour)


def _certified_winner(ctx: Context, candidates: list[Candidate]) -> Candidate | None:
    """The best passing candidate, its figures measured in this run: a winner whose figures came
    from the cache is measured again, and the ranking redone if it no longer passes."""
    from edgequant.measurement.evaluation import evaluate

    while True:
        best = next(iter(ranked(ctx.config.objective, candidates, ctx.task)), None)
        if best is None or not best.passes or not best.cached:
            return best if best is not None and best.passes else None
        note(f"measuring {best.spec} again in this run: its figures came from the cache")
        spec = parse_spec(best.spec)
        _record(ctx, best, evaluate(best.artifact, config=eval_config_for(ctx.config.eval, spec)))


# -- the result --------------------------------------------------------------------------------

def _front(ctx: Context, candidates: list[Candidate]) -> list[Candidate]:
    """The Pareto front of the measured candidates: the task's quality figure (KLD), size, and (on
    the target itself) peak memory and its speed figure, each in its better direction."""
    from edgequant.reporting.report import pareto_front

    measured = [c for c in candidates if c.status == "measured"]

    figures = metric_table.TASK_FIGURES[ctx.task]
    quality, speed = metric_table.by_key(figures.rank), metric_table.by_key(figures.speed)

    def point(c: Candidate) -> tuple:
        m = c.metrics
        if not ctx.runs_here:
            return quality.order(m[quality.key]), m["size_bytes"]
        return quality.order(m[quality.key]), m["size_bytes"], m.get("peak_rss_mb") or 0.0, speed.order(m.get(speed.key) or 0.0)

    return [measured[i] for i in pareto_front([point(c) for c in measured])]


def _why(ctx: Context, winner: Candidate, candidates: list[Candidate], front: list[Candidate]) -> list[str]:
    passing = [c for c in ranked(ctx.config.objective, candidates, ctx.task) if c.passes]
    words = [f"it passes every gate ({', '.join(v['gate'] for v in winner.verdicts if v['verdict'] == 'pass')})"
             + (f"; skipped as stand-ins: {', '.join(v['gate'] for v in winner.verdicts if v['verdict'] == 'skipped')}"
                if any(v["verdict"] == "skipped" for v in winner.verdicts) else "")]
    words.append(f"of the {len(passing)} candidates that pass, it is the best by {objective_metric(ctx.config.objective, ctx.task).what} "
                 f"({_objective_figure(ctx.config.objective, winner, ctx.task)})")
    if len(passing) > 1:
        runner_up = passing[1]
        words.append(f"the runner-up {runner_up.spec} has {_objective_figure(ctx.config.objective, runner_up, ctx.task)}"
                     + _distinguishable(ctx.config.objective, winner, runner_up, ctx.task))
    words.append("it is on the Pareto front" if winner in front else
                 "it is not on the Pareto front: a candidate that fails a gate beats it on every figure")
    return words


def _distinguishable(objective: str, winner: Candidate, runner_up: Candidate, task: str = TEXT_GENERATION) -> str:
    """Where the objective's figure has a 95% interval (quality) or a range over the timed repeats
    (decode speed), whether the winner's and the runner-up's overlap."""
    from edgequant.measurement.intervals import compare

    metric = objective_metric(objective, task)
    if metric.interval:
        what, pick = "95% intervals", lambda m: (m.get("ci95") or {}).get(metric.key)
    elif metric.spread:
        what, pick = "ranges over the timed repeats", lambda m: m.get(metric.spread)
    else:
        return ""
    a, b = pick(winner.metrics), pick(runner_up.metrics)
    if not a or not b:
        return ""
    return (f"; not distinguishable from the winner's (their {what} overlap)" if compare(a, b) == "not distinguishable"
            else f"; the {what} do not overlap")


def _objective_figure(objective: str, c: Candidate, task: str) -> str:
    metric = objective_metric(objective, task)
    value = (c.metrics or {}).get(metric.key)
    return f"{metric.label} {metric.show(value)}" if value is not None else f"{metric.label} not measured"


def _result(ctx: Context, profile, candidates: list[Candidate], winner: Candidate | None, path: list[str],
            seconds: float) -> dict:
    front = _front(ctx, candidates)
    order = ranked(ctx.config.objective, candidates, ctx.task)
    if winner is not None:
        path.append(f"chosen: {winner.spec}, {_objective_words(ctx.config.objective, ctx.task)}")
    elif order:
        closest = order[0]
        path.append(f"no candidate passes every gate; the closest is {closest.spec}: {missed_words(closest.verdicts)}")
    else:
        path.append("no candidate could be measured")
    return {
        "model": ctx.source.name, "task": ctx.task, "source": str(ctx.source.path), "source_fingerprint": ctx.source.fingerprint,
        "profile": {"name": profile.name, "title": profile.title, "runs_here": ctx.runs_here},
        "objective": ctx.config.objective, "gates": [g.text for g in ctx.gates], "default_gates": not ctx.config.gates,
        "budget": ctx.config.budget, "evaluations": ctx.evaluations, "decision_path": path,
        "baseline": _figures_json(ctx.baseline),
        "winner": winner.spec if winner else None,
        "closest": None if winner or not order else {"spec": order[0].spec, "missed": missed_words(order[0].verdicts)},
        "why": _why(ctx, winner, candidates, front) if winner else [],
        "pareto_front": [c.spec for c in front],
        "candidates": [_candidate_json(c, c in front) for c in candidates],
        "eval_settings": (winner.metrics if winner else ctx.baseline).get("settings"),
        "seconds": round(seconds, 1), "run_id": ctx.run_id, "db": str(ctx.db.path),
    }


def _figures_json(m: dict) -> dict:
    return metric_table.figures(m, extra=("decode_tps_range", "inputs_per_s_b8_range", "arithmetic", "task"))


def _candidate_json(c: Candidate, on_front: bool) -> dict:
    out = {"spec": c.spec, "origin": c.origin, "status": c.status, "reason": c.reason or None, "passes": c.passes,
           "pareto": on_front, "cached": c.cached, "artifact": c.artifact, "verdicts": c.verdicts,
           "better_than_parent": c.better_than_parent}
    if c.metrics:
        out["figures"] = _figures_json(c.metrics)
        out["derived"] = {m.key: round(c.figures[m.key], 3) for m in metric_table.TABLE if m.derived and m.key in c.figures}
    return out
