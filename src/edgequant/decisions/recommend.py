"""`recommend`: a framework and precision for a target device and constraints, with the path of
rules that chose it and why each runner-up lost.

The rules, in order (each step is recorded in words a user can check):
1. the target profile: `--target`, or the profile closest to this machine;
2. its formats, best first; a format whose engine is not installed here stays a candidate (the
   user deploys elsewhere) but cannot be measured here, and the extra that installs it is named;
   so does a spec whose conversion would not fit in this machine's memory (the backend's
   measured peak, scaled to the model), with the estimate;
3. its candidate specs in the profile's order, each with its expected size (the backend's
   estimate for this model) and expected peak memory (the measured figure when there is one,
   else size plus the runtime's usual overhead);
4. constraints: size and memory on the expected figures; speed-up and quality only on
   measurements (results database, this source and this machine), where a quality bound passes
   only when its whole 95% interval does; `--measured` measures what is missing first;
5. the first candidate, in the profile's order, that meets every constraint wins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgequant.decisions.gates import Gate, check, derived_metrics, missed_words, parse_gate, passes, source_check
from edgequant.decisions.hardware import Profile, closest, detect, get_profile
from edgequant.errors import EdgequantError
from edgequant.measurement import metric_table
from edgequant.registry import BASELINE_SPEC, get_backend, parse_spec
from edgequant.sources.tasks import TEXT_GENERATION

# Peak memory beyond the weights when nothing was measured: the runtime, tokenizer and KV cache of
# a small model, from bench/results/memory.json (engine-only peak RSS minus model file, ~80-180 MB).
RUNTIME_OVERHEAD_MB = 150.0


@dataclass(frozen=True)
class RecommendConfig:
    model: Path | None = None
    target: str | None = None  # a profile name; None: the detected one
    max_memory: str | None = None  # e.g. "1GB"
    max_size: str | None = None  # e.g. "150MB"
    min_speedup: float | None = None
    max_kld: float | None = None
    max_ppl_increase: float | None = None  # percent
    measured: bool = False
    db: Path | None = None
    gates: tuple[str, ...] = ()  # any other bound, as optimize's gates: e.g. cosine>=0.99 for an encoder


@dataclass
class Candidate:
    spec: str
    format: str
    installed: bool
    expected_size_bytes: int
    expected_peak_mb: float
    too_large_here: str = ""  # why converting it would not fit in this machine's memory, if it would not
    measured: dict | None = None
    verdicts: list[dict] = field(default_factory=list)
    lost_because: str = ""

    @property
    def passes(self) -> bool:
        return passes(self.verdicts)


def constraints(config: RecommendConfig) -> list[Gate]:
    """The constraints as gates (their parser checks units and ranges)."""
    if config.max_kld is not None and config.max_ppl_increase is not None:
        raise EdgequantError("give one quality bound, --max-kld or --max-ppl-increase, not both", "drop one of them")
    texts = [f"size<={config.max_size}" if config.max_size else None,
             f"peak_rss<={config.max_memory}" if config.max_memory else None,
             f"speedup>={config.min_speedup}" if config.min_speedup is not None else None,
             f"kld<={config.max_kld}" if config.max_kld is not None else None,
             f"ppl_increase<={config.max_ppl_increase}%" if config.max_ppl_increase is not None else None,
             *config.gates]
    return [parse_gate(t) for t in texts if t]


def recommend(config: RecommendConfig) -> dict:
    from edgequant.sources.source import load_source

    gates = constraints(config)
    path, profile = target_profile(config.target)
    source = load_source(config.model)
    candidates = [_candidate(text, source) for text in _specs_for(profile, source)]
    path.append(f"candidates: {', '.join(c.spec for c in candidates)} (the profile's specs, in its order"
                + (")" if source.task == TEXT_GENERATION else f", that apply to {source.task} models, then the "
                   "other precisions its formats offer them)"))
    missing = sorted({c.format for c in candidates if not c.installed})
    if missing:
        hints = "; ".join(f"{f}: {get_backend(f).install_hint()}" for f in missing)
        path.append(f"not installed here, so not measurable here: {hints}")
    too_large = [c for c in candidates if c.too_large_here]
    if too_large:
        path.append("too large to convert on this machine, so not measurable here (--force on convert tries anyway): "
                    + "; ".join(f"{c.spec}: {c.too_large_here}" for c in too_large))
    measurements = _measurements(config.db, source.fingerprint)
    if config.measured and _measure_missing(config, candidates, measurements):
        measurements = _measurements(config.db, source.fingerprint)
    baseline = measurements.get(BASELINE_SPEC)
    for candidate in candidates:
        candidate.measured = measurements.get(candidate.spec)
        expected = {"size_bytes": candidate.expected_size_bytes, "peak_rss_mb": candidate.expected_peak_mb}
        figures = derived_metrics({**expected, **(candidate.measured or {})}, baseline)  # measured figures win
        candidate.verdicts = [check(g, figures) for g in gates]
        if source.task == TEXT_GENERATION:
            candidate.verdicts.append(source_check(figures))
    winner = next((c for c in candidates if c.passes), None)
    for rank, candidate in enumerate(candidates):
        if candidate is not winner:
            candidate.lost_because = _why_lost(candidate, winner, rank)
    if gates:
        path.append("constraints: " + ", ".join(g.text for g in gates) + " (quality bounds pass only when the whole "
                    "95% interval does; speed and quality need measurements)")
    if winner:
        path.append(f"chosen: {winner.spec}, the first candidate in the profile's order that meets every constraint")
    else:
        near = _closest(candidates)
        path.append(f"no candidate meets every constraint; the closest is {near.spec} ({near.lost_because})")
    return {"profile": profile.name, "profile_title": profile.title, "model": source.name,
            "source_fingerprint": source.fingerprint, "decision_path": path,
            "recommendation": winner.spec if winner else None,
            "candidates": [_as_json(c) for c in candidates], "speed_here": profile.speed}


def _specs_for(profile: Profile, source) -> list[str]:
    """The profile's specs; for a model of another task, those that apply to it, then every other
    precision the profile's formats offer it."""
    if source.task == TEXT_GENERATION:
        return list(profile.precisions)
    offered = [f"{fmt}:{p}" for fmt in profile.formats for p in get_backend(fmt).precisions_for(source.task)]
    listed = [text for text in profile.precisions if text in offered]
    return listed + [text for text in offered if text not in listed]


def target_profile(target: str | None) -> tuple[list[str], Profile]:
    """The profile asked for, or the one closest to this machine, and the decision step naming it."""
    if target:
        profile = get_profile(target)
        return [f"target: {profile.name} ({profile.title}), as asked"], profile
    profile, verdicts = closest(detect())
    evidence = "; ".join(next(v for v in verdicts if v["profile"] == profile.name)["evidence"])
    return [f"target: {profile.name} ({profile.title}), the profile closest to this machine ({evidence})"], profile


def _candidate(text: str, source) -> Candidate:
    from edgequant.conversion import memory_shortfall

    spec = parse_spec(text)
    backend = get_backend(spec.format)
    size = backend.estimated_bytes(spec.precision, source.tensors, source.tied_embeddings)
    installed = backend.missing_engine() is None
    return Candidate(text, spec.format, installed, size, size / 1e6 + RUNTIME_OVERHEAD_MB,
                     too_large_here=(memory_shortfall(backend, source, spec) or "") if installed else "")


def _measurements(db_path: Path | None, fingerprint: str) -> dict[str, dict]:
    """The latest successful metrics per spec for this source, measured on this machine."""
    from edgequant.measurement.evaluation import machine_info
    from edgequant.measurement.results import ResultsDB, default_db_path

    path = Path(db_path or default_db_path()).expanduser()
    if not path.is_file():
        return {}
    here = machine_info()
    db = ResultsDB.open(path, create=False)
    try:
        rows = db.query(fingerprint)
    finally:
        db.close()
    latest = {}
    for row in rows:
        same_machine = all(row["machine"].get(k) == here[k] for k in ("cpu", "cores", "os"))
        if row["status"] == "ok" and row["metrics"] and same_machine:
            latest[row["spec"]] = row["metrics"]  # rows come oldest first
    return latest


def _measure_missing(config: RecommendConfig, candidates: list[Candidate], have: dict) -> bool:
    """Bench the installed candidates (and the fp32 baseline) `have` has no figures for; whether it ran."""
    from edgequant.measurement.benchmark import BenchConfig, run_bench

    wanted = tuple(c.spec for c in candidates if c.installed and not c.too_large_here and c.spec not in have)
    if wanted:
        run_bench(BenchConfig(config.model, wanted, config.db))
    return bool(wanted)


def _why_lost(candidate: Candidate, winner: Candidate | None, rank: int) -> str:
    failed = [v for v in candidate.verdicts if v["verdict"] != "pass"]
    if failed:
        return missed_words(failed, "not measured here (--measured measures it)")
    return f"meets every constraint but comes after {winner.spec} in the profile's order" if winner else ""


def _closest(candidates: list[Candidate]) -> Candidate:
    """The candidate that fails the fewest constraints (the profile's order breaks ties)."""
    return min(candidates, key=lambda c: sum(v["verdict"] != "pass" for v in c.verdicts))


def _as_json(c: Candidate) -> dict:
    figures = metric_table.figures(c.measured, extra=("task",)) if c.measured else None
    size = (c.measured or {}).get("size_bytes") or c.expected_size_bytes
    return {"spec": c.spec, "format": c.format, "installed_here": c.installed, "too_large_here": c.too_large_here or None,
            "size_mb": round(size / 1e6, 1),
            "size_measured": bool((c.measured or {}).get("size_bytes")), "expected_size_mb": round(c.expected_size_bytes / 1e6, 1),
            "expected_peak_mb": round(c.expected_peak_mb, 1), "measured": figures, "verdicts": c.verdicts,
            "passes": c.passes, "lost_because": c.lost_because}
