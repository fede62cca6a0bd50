"""`convert`: source + spec -> artifact, through the spec's backend, atomically and cached."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edgequant import __version__
from edgequant.artifact import MANIFEST, SCHEMA_VERSION, Artifact, folder_size, is_artifact, open_artifact
from edgequant.atomic import atomic_dir, ensure_writable_parent
from edgequant.errors import DISK_FULL_FIX, EdgequantError
from edgequant.fingerprint import file_sha256
from edgequant.locks import building
from edgequant.paths import cache_dir
from edgequant.progress import note, step
from edgequant.registry import BASELINE_FORMAT, backends, get_backend, parse_spec
from edgequant.sources.tasks import TEXT_GENERATION
from edgequant.spec import Spec


@dataclass(frozen=True)
class ConvertConfig:
    spec: Spec
    model: Path | None = None  # None: the embedded default model
    output: Path | None = None  # None: a folder under the cache named after source and spec
    force: bool = False


def convert(model: str | Path | None = None, spec: str | Spec = "gguf:q4_k_m", output: str | Path | None = None,
            force: bool = False) -> Artifact:
    """Convert `model` to `spec`. Reuses an existing artifact of the same source and spec."""
    spec = parse_spec(spec) if isinstance(spec, str) else spec
    config = ConvertConfig(spec, Path(model) if model else None, Path(output) if output else None, force)
    return run_convert(config)


def run_convert(config: ConvertConfig) -> Artifact:
    from edgequant.sources.source import load_source

    backend = get_backend(config.spec.format)
    missing = backend.missing_modules()
    if missing:
        raise EdgequantError(f"cannot convert to {config.spec}: its engine is not installed ({', '.join(missing)} missing)",
                             backend.install_hint())
    source = load_source(config.model)
    out = (config.output or default_artifact_dir(source.fingerprint, config.spec)).expanduser().resolve()
    ensure_writable_parent(out)
    with building(out, f"converting {source.name} to {config.spec} in {out}"):
        return _convert_held(config, backend, source, out)


def _convert_held(config: ConvertConfig, backend, source, out: Path) -> Artifact:
    """The conversion, once this process holds `out`'s lock: reuse what is there, else build it."""
    existing = _existing(out)
    inputs = {str(path): file_sha256(path) for path in backend.input_files(config.spec)}
    same_target = existing is not None and existing.source_fingerprint == source.fingerprint and existing.spec == config.spec
    stale = [] if not same_target else [why for why, changed in (
        ("it was made by an older recipe of the backend", existing.manifest.get("recipe_version") != backend.recipe_version),
        ("a file the spec names has changed", existing.manifest.get("inputs", {}) != inputs)) if changed]
    if same_target and not stale and not config.force:
        note(f"cache hit: {out} already holds {config.spec} of this source (--force rebuilds)")
        return existing
    if same_target:
        note(f"rebuilding {out}" + (f": {stale[0]}" if stale else ""))
    elif out.exists() and any(out.iterdir()) and not config.force:
        raise EdgequantError(f"{out} exists and holds something else", "choose another -o folder, or pass --force to replace it")
    check_task(backend, source, config.spec)
    if source.task == TEXT_GENERATION:
        backend.check_source(source)  # an unsupported architecture is refused before any long step
    shortfall = memory_shortfall(backend, source, config.spec)
    if shortfall and not config.force:
        raise EdgequantError(shortfall, "free memory or use a machine with more; --force converts anyway")
    started = time.perf_counter()
    with step(f"converting {source.name} to {config.spec}"), atomic_dir(out, replace=True) as tmp:
        convert_hook = backend.convert if source.task == TEXT_GENERATION else backend.convert_task
        try:
            info = convert_hook(source, config.spec, tmp)
        except Exception:
            _refuse_if_disk_full(tmp, out)  # an engine that ran out of space says so in its own words, or not at all
            raise
        manifest = _manifest(source, config.spec, backend, info, tmp, time.perf_counter() - started, inputs)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return open_artifact(out)


DISK_FULL_BYTES = 64 * 2**20  # a conversion that failed with less free space than this most likely ran out of it


def _refuse_if_disk_full(tmp: Path, out: Path) -> None:
    """Raise the disk-full error when the folder being written has (almost) no space left."""
    import shutil

    free = shutil.disk_usage(tmp).free
    if free < DISK_FULL_BYTES:
        raise EdgequantError(f"the disk holding {out.parent} filled up during the conversion ({free / 2**20:.1f} MiB left)",
                             DISK_FULL_FIX) from None


def check_task(backend, source, spec: Spec) -> None:
    """Refuse a format or precision that does not apply to what the source model does."""
    offered = backend.precisions_for(source.task)
    if spec.precision in offered:
        return
    if offered:
        raise EdgequantError(f"{spec} does not apply to {source.task} models such as {source.name}",
                             f"use {backend.name}:{'|'.join(offered)}")
    others = [name for name, other in backends().items() if other.precisions_for(source.task) and name != BASELINE_FORMAT]
    raise EdgequantError(f"the {backend.name} format does not take {source.task} models such as {source.name}",
                         f"use one of: {', '.join(others)}" if others else "no installed format takes them")


def memory_shortfall(backend, source, spec: Spec) -> str | None:
    """Why converting `source` to `spec` will not fit in this machine's free memory (the backend's
    measured peak, scaled to the model), or None when it fits or the backend has no measurement.
    EDGEQUANT_MEMORY_LIMIT (e.g. 8GB) sets the memory to plan for instead of what is free now."""
    parameters = sum(t.numel for t in source.tensors)
    needed = backend.conversion_peak_bytes(parameters)
    if needed is None:
        return None
    free, where = available_memory()
    if needed <= free:
        return None
    factor, fixed_gb = backend.conversion_peak
    return (f"converting {source.name} ({parameters / 1e9:.2f}B parameters) to {spec} needs about {needed / 1e9:.1f} GB "
            f"of memory at its peak ({factor}x the model's 16-bit size + {fixed_gb} GB, fitted to {backend.name}'s "
            f"conversions measured by bench/scale.py), and {where} is {free / 1e9:.1f} GB")


def available_memory() -> tuple[int, str]:
    """Bytes a job may use, and what that figure is."""
    import os

    limit = os.environ.get("EDGEQUANT_MEMORY_LIMIT")
    if limit:
        from edgequant.decisions.gates import parse_size

        return parse_size(limit, "EDGEQUANT_MEMORY_LIMIT"), "EDGEQUANT_MEMORY_LIMIT"
    import psutil

    return psutil.virtual_memory().available, "the memory free here"


def default_artifact_dir(fingerprint: str, spec: Spec) -> Path:
    return cache_dir("artifacts", fingerprint[:16]) / spec.slug


def _existing(out: Path) -> Artifact | None:
    """The artifact already at `out`, if there is a readable one."""
    if not is_artifact(out):
        return None
    try:
        return open_artifact(out)
    except EdgequantError:
        return None


def _manifest(source, spec: Spec, backend, info: dict, folder: Path, seconds: float, inputs: dict[str, str]) -> dict:
    import numpy

    return {
        "schema": SCHEMA_VERSION,
        "spec": spec.to_json(),
        "spec_text": str(spec),
        "recipe_version": backend.recipe_version,
        "source": source.to_json(),
        "inputs": inputs,  # files the spec names, by sha256: the cache reuses the artifact only while they match
        "model_file": info["model_file"],
        "size_bytes": folder_size(folder),
        "model_bytes": (folder / info["model_file"]).stat().st_size,
        "tools": {"edgequant": __version__, "python": platform.python_version(), "numpy": numpy.__version__,
                  **backend.tool_versions()},
        "timings": {"total_s": round(seconds, 3), **info.get("timings", {})},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "details": {k: v for k, v in info.items() if k not in ("model_file", "timings", "limitations")},
        # the backend's on this source, and what this conversion found (`info["limitations"]`)
        "limitations": backend.limitations(source) + info.get("limitations", []),
    }
