"""The backend registry, keyed by the format name users type in a spec.

Every backend, built-in or third-party, is found the same way: through the `edgequant.backends`
entry-point group (the built-ins are declared in edgequant's own pyproject.toml). A package that
declares

    [project.entry-points."edgequant.backends"]
    toy = "toy_backend:ToyBackend"

appears in `inspect`, `convert`, `eval`, `bench`, the report and `serve` without any edit to
edgequant. `register` adds a backend class at run time (for programs and tests).

This module also holds what needs the whole catalog: spec parsing and opening a runner for a
path (an artifact through its backend, a source model through the PyTorch baseline).
"""

from __future__ import annotations

from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

from edgequant.backend import Backend
from edgequant.errors import EdgequantError
from edgequant.sources.tasks import TEXT_GENERATION
from edgequant.spec import Spec
from edgequant.spec import parse_spec as _parse_spec
from edgequant.spec import parse_specs as _parse_specs

if TYPE_CHECKING:
    from edgequant.runner import Runner, TaskRunner

ENTRY_POINT_GROUP = "edgequant.backends"
# The format every figure is relative to: the source model run by PyTorch in float32.
BASELINE_FORMAT = "pytorch"
BASELINE_SPEC = "pytorch:fp32"

_REGISTRY: dict[str, Backend] = {}
_loaded = False


def register(cls: type[Backend]) -> type[Backend]:
    """Add a backend class under its `name` (replacing one of the same name)."""
    if not cls.name:
        raise EdgequantError(f"backend class {cls.__qualname__} has no name", "set the class attribute `name`")
    _REGISTRY[cls.name] = cls()
    return cls


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def _load_entry_points() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            cls = entry.load()
        except Exception as exc:  # one broken plugin must not take every format down
            from edgequant.progress import note

            note(f"warning: backend {entry.name!r} ({entry.value}) failed to load: {type(exc).__name__}: {exc}")
            continue
        _REGISTRY.setdefault(cls.name, cls())


def backends() -> dict[str, Backend]:
    """Every registered backend by format name."""
    _load_entry_points()
    if not _REGISTRY:  # even the built-ins come through entry points, which only an install declares
        raise EdgequantError("no backends are registered: edgequant's entry points are missing",
                             "install edgequant (`make setup` or `pip install -e .`) instead of running it from a source folder")
    return dict(sorted(_REGISTRY.items()))


def format_names() -> list[str]:
    return list(backends())


def get_format(name: str) -> Backend | None:
    return backends().get(name)


def get_backend(name: str) -> Backend:
    backend = get_format(name)
    if backend is None:
        raise EdgequantError(f"no backend for format {name!r}", "use one of: " + ", ".join(format_names()))
    return backend


def parse_spec(text: str) -> Spec:
    """Parse and validate `FORMAT:PRECISION[?key=value&...]` against the registered formats."""
    return _parse_spec(text, backends())


def parse_specs(specs: "str | Spec | Iterable[str | Spec]") -> list[Spec]:
    """Every reader of a list of specs comes here: a comma-separated string (an option value may
    hold commas), or a list of such strings and Specs; each is validated before any work."""
    return _parse_specs(specs, backends())


def bench_specs(task: str = TEXT_GENERATION) -> list[str]:
    """The representative specs of every registered format except the baseline, by format name; for
    a model of another task, every precision each format offers for it."""
    if task != TEXT_GENERATION:
        return [f"{name}:{p}" for name, backend in backends().items() if name != BASELINE_FORMAT
                for p in backend.precisions_for(task)]
    return [spec for name, backend in backends().items() if name != BASELINE_FORMAT for spec in backend.bench_specs]


def open_runner(path: str | Path | None, *, n_ctx: int = 2048, need_logits: bool = True, threads: int = 0) -> "Runner":
    """Open an artifact folder (through its backend) or a source model (the PyTorch baseline)."""
    from edgequant.artifact import is_artifact, open_artifact
    from edgequant.runner import default_threads

    threads = threads or default_threads()
    if path is not None and is_artifact(Path(path)):
        artifact = open_artifact(path)
        return get_backend(artifact.spec.format).open(artifact, n_ctx=n_ctx, need_logits=need_logits, threads=threads)
    from edgequant.sources.source import load_source

    return get_backend(BASELINE_FORMAT).open_source(load_source(path), n_ctx=n_ctx, threads=threads)


def serving_groups(paths: Sequence[Path | None]) -> list[list[int]]:
    """The indices of `paths` grouped by the base model their runners would load, where the
    format's runtime switches LoRA adapters per request (`Backend.adapter_base`): one loaded base
    serves a group. Every other path is a group of its own; groups in order of first appearance."""
    from edgequant.artifact import is_artifact, open_artifact

    artifacts = {i: open_artifact(p) for i, p in enumerate(paths) if p is not None and is_artifact(Path(p))}
    formats = [a.spec.format for a in artifacts.values() if a.task == TEXT_GENERATION]
    groups: dict[object, list[int]] = {}
    for i in range(len(paths)):
        artifact, base = artifacts.get(i), None
        if artifact is not None and artifact.task == TEXT_GENERATION and formats.count(artifact.spec.format) > 1:
            base = get_backend(artifact.spec.format).adapter_base(artifact)  # may hash the model: only when it may pay
        groups.setdefault(base or i, []).append(i)
    return list(groups.values())


def open_shared_runner(paths: dict[str, Path], *, n_ctx: int = 2048, threads: int = 0) -> "Runner":
    """One runner for artifacts of one `serving_groups` group (served name -> folder): their base
    loaded once, each one's adapter applied to the requests that name it."""
    from edgequant.artifact import open_artifact
    from edgequant.runner import default_threads

    artifacts = {name: open_artifact(path) for name, path in paths.items()}
    backend = get_backend(next(iter(artifacts.values())).spec.format)
    return backend.open_shared(artifacts, n_ctx=n_ctx, threads=threads or default_threads())


def open_task_runner(path: str | Path | None, *, threads: int = 0) -> "TaskRunner":
    """`open_runner` for a model of another task: an artifact through its backend's `open_task`, a
    source model through the PyTorch baseline."""
    from edgequant.artifact import is_artifact, open_artifact
    from edgequant.runner import default_threads

    threads = threads or default_threads()
    if path is not None and is_artifact(Path(path)):
        artifact = open_artifact(path)
        return get_backend(artifact.spec.format).open_task(artifact, threads=threads)
    from edgequant.sources.source import load_source

    return get_backend(BASELINE_FORMAT).open_task_source(load_source(path), threads=threads)


def model_task(path: str | Path | None) -> str:
    """What the model at `path` does: an artifact's recorded task, or its source's."""
    from edgequant.artifact import is_artifact, open_artifact

    if path is not None and is_artifact(Path(path)):
        return open_artifact(path).task
    from edgequant.sources.source import load_source

    return load_source(path).task
