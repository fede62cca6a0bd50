"""One spec measured: converted (cached) and evaluated, an engine's failure caught and recorded,
and the row stored in the results store. `bench` (and so `recommend --measured`) and `optimize`
measure through here, so a row means the same thing whichever verb wrote it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgequant.errors import EdgequantError
from edgequant.measurement.settings import EvalConfig
from edgequant.registry import get_backend
from edgequant.spec import Spec

# Formats whose speed here is only a stand-in's get a short speed probe: their figures are marked
# "not representative" anyway, and the full probe of a fixed-shape QNN graph (which re-runs the
# whole window per token) alone took 4.5 minutes of the main job.
SHORT_PROBE = {"gen_tokens": 16, "repeats": 1}


@dataclass
class Measured:
    spec: str
    status: str  # "ok", "failed", or "too big" (built, over `max_bytes`, not evaluated)
    metrics: dict | None = None
    error: str | None = None
    artifact: Path | None = None  # None when the conversion failed
    seconds: float = 0.0
    size_bytes: int | None = None
    notes: list[str] = field(default_factory=list)  # the backend's report notes on the artifact


def eval_config_for(config: EvalConfig, spec: Spec) -> EvalConfig:
    """The evaluation settings for `spec`: a short speed probe where its speed is a stand-in's."""
    if not config.speed or get_backend(spec.format).speed_is_representative():
        return config
    return replace(config, gen_tokens=min(config.gen_tokens, SHORT_PROBE["gen_tokens"]), repeats=SHORT_PROBE["repeats"])


def measure(source, spec: Spec, config: EvalConfig, *, force: bool = False, reuse: bool = False,
            strict: bool = False, max_bytes: int | None = None, record: bool = True) -> Measured:
    """Convert and evaluate `spec` of `source`. With `reuse`, a stored evaluation of the same bytes
    and settings is returned instead of measuring again; with `max_bytes`, an artifact bigger than
    that is not evaluated; with `record` false, the results store is not written (a Ray worker).
    Failures become a "failed" row unless `strict`."""
    from edgequant.conversion import convert
    from edgequant.measurement.evaluation import evaluate

    started = time.perf_counter()
    artifact = None
    try:
        artifact = convert(source.path, spec, force=force)
        if max_bytes is not None and artifact.size_bytes > max_bytes:
            return Measured(str(spec), "too big", artifact=artifact.path, size_bytes=artifact.size_bytes,
                            seconds=time.perf_counter() - started)
        metrics = evaluate(artifact.path, config=eval_config_for(config, spec), reuse=reuse, record=record)
    except Exception as exc:  # an engine's own failure must not end the other specs' runs
        if strict:
            raise
        error = exc.problem if isinstance(exc, EdgequantError) else f"{type(exc).__name__}: {exc}"[:500]
        return Measured(str(spec), "failed", error=error, artifact=artifact and artifact.path,  # set: evaluation failed
                        seconds=time.perf_counter() - started)
    notes = get_backend(spec.format).report_notes(str(spec), artifact.manifest)
    return Measured(str(spec), "ok", metrics, artifact=artifact.path, seconds=time.perf_counter() - started,
                    size_bytes=artifact.size_bytes, notes=notes)


def store(db, run_id: int, source, spec: str, status: str, metrics: dict | None = None, error: str | None = None,
          artifact: str | Path | None = None, baseline: bool = False) -> None:
    """One row of the run in the results store; an artifact's row carries its model file's sha256."""
    fingerprint = None
    if status == "ok" and artifact is not None and not baseline:
        from edgequant.artifact import open_artifact
        from edgequant.fingerprint import file_sha256

        fingerprint = file_sha256(open_artifact(artifact).model_path)
    db.add(run_id, source.name, source.fingerprint, spec, status, metrics, error, None if artifact is None else str(artifact),
           fingerprint)
