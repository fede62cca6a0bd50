"""The backend registry, keyed by the format name users type in a spec.

A backend is one module per format. It registers a `Backend` subclass with `@register`; the
module itself must stay light at import time (heavy engines are imported inside its methods), so
listing formats, parsing specs and `edgequant --help` never load torch or llama.cpp.

The contract is deliberately small:
- `convert(source, spec, out_dir)` writes the model files into `out_dir` (a temporary folder the
  caller renames into place) and returns the name of the main model file plus any extra facts for
  the manifest;
- `open(artifact, ...)` returns a `Runner` (see `edgequant.runner`).
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgequant.spec import Option, Precision

if TYPE_CHECKING:
    from edgequant.artifact import Artifact
    from edgequant.runner import Runner
    from edgequant.source import Source
    from edgequant.spec import Spec

# Built-in backends, imported on first registry access. Third-party backends call `register`.
_BUILTIN_MODULES = ("edgequant.backends.gguf", "edgequant.backends.openvino", "edgequant.backends.mlx",
                    "edgequant.backends.onnx", "edgequant.backends.qnn")

_REGISTRY: dict[str, "Backend"] = {}
_loaded = False


class Backend:
    """Base class: declare `name`, `precisions`, `options`, `extra`; implement the two hooks."""

    name: str = ""
    precisions: dict[str, Precision] = {}
    options: dict[str, Option] = {}
    extra: str = ""  # the pip extra that installs this backend's engine
    requires: tuple[str, ...] = ()  # importable modules the engine needs
    # Bump when a change of defaults or method makes old artifacts of the same spec stale: the
    # artifact cache only reuses artifacts built with the current recipe.
    recipe_version: int = 1
    # Seconds one bench spec (convert + evaluate) took in the default main job, cold cache, 2
    # cores: only the ratios between backends matter, to weigh the bench's time-left estimate.
    bench_seconds: float = 30.0

    def missing_engine(self) -> str | None:
        """Why this backend cannot run here (an engine module is not installed), or None."""
        from importlib.util import find_spec

        missing = [m for m in self.requires if find_spec(m) is None]
        if not missing:
            return None
        return f"{', '.join(missing)} not installed: `pip install 'edgequant[{self.extra or self.name}]'`"

    def speed_is_representative(self) -> bool:
        """False where this machine runs the format through a stand-in (MLX off Apple silicon, QNN
        on the CPU execution provider): its speed here says little about the target device."""
        return True

    def convert(self, source: "Source", spec: "Spec", out_dir: Path) -> dict[str, Any]:
        raise NotImplementedError

    def open(self, artifact: "Artifact", *, n_ctx: int, need_logits: bool, threads: int) -> "Runner":
        raise NotImplementedError

    def tool_versions(self) -> dict[str, str]:
        return {}

    def estimated_bytes(self, precision: str, tensors, tied_embeddings: bool = False) -> int:
        """Estimated artifact size: 2-D weights at the precision's bpw, the rest in float32."""
        bpw = self.precisions[precision].bpw
        return int(sum(t.numel * (bpw if len(t.shape) >= 2 else 32.0) for t in tensors) / 8)


def register(cls: type[Backend]) -> type[Backend]:
    _REGISTRY[cls.name] = cls()
    return cls


def _load_builtins() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for module in _BUILTIN_MODULES:
            import_module(module)


def format_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_format(name: str) -> Backend | None:
    _load_builtins()
    return _REGISTRY.get(name)


def get_backend(name: str) -> Backend:
    backend = get_format(name)
    if backend is None:
        from edgequant.errors import EdgequantError

        raise EdgequantError(f"no backend for format {name!r}", "use one of: " + ", ".join(format_names()))
    return backend
