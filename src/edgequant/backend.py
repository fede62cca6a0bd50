"""The Backend contract: everything format-specific that the verbs (convert, eval, bench, report,
serve, inspect) need, behind one small class.

A format is a package under `edgequant.backends` (or a third-party package) holding a `Backend`
subclass that declares what it offers and implements two hooks:
- `convert(source, spec, out_dir)` writes the model files into `out_dir` (a temporary folder the
  caller renames into place) and returns the main model file's name plus facts for the manifest;
- `open(artifact, ...)` returns a `Runner` (see `edgequant.runner`).

Everything else has a default: display texts for reports, the specs `bench` runs, option checks,
source checks, tool versions, size estimates. The module imports nothing heavy, and a backend's
own module must stay light too: engines are imported inside its methods, so listing formats,
parsing specs and `edgequant --help` never load torch or llama.cpp. Backends are registered through
the `edgequant.backends` entry-point group (see `edgequant.registry`).
"""

from __future__ import annotations

import dataclasses
import functools
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgequant.spec import Option, Precision

if TYPE_CHECKING:
    from edgequant.artifact import Artifact
    from edgequant.runner import Runner, TaskRunner
    from edgequant.sources.source import Source
    from edgequant.spec import Spec


class Backend:
    """Base class: declare the class attributes, implement `convert` and `open`."""

    name: str = ""  # the format name users type in a spec
    display_name: str = ""  # how reports name the framework, e.g. "llama.cpp (GGUF)"
    use_case: str = ""  # where this format is deployed, one line for the report's summary
    precisions: dict[str, Precision] = {}
    options: dict[str, Option] = {}
    extra: str = ""  # the pip extra that installs this backend's engine
    requires: tuple[str, ...] = ()  # importable modules the engine needs
    packages: tuple[str, ...] = ()  # distributions whose versions go into manifests and results
    # The representative specs `edgequant bench` runs when the user names none.
    bench_specs: tuple[str, ...] = ()
    # Bump when a change of defaults or method makes old artifacts of the same spec stale: the
    # artifact cache only reuses artifacts built with the current recipe.
    recipe_version: int = 1
    # Seconds one bench spec (convert + evaluate) took in the default main job, cold cache, 2
    # cores: only the ratios between backends matter, to weigh the bench's time-left estimate.
    bench_seconds: float = 30.0
    # What a report says when this machine runs the format through a stand-in.
    speed_note: str = ""
    # Peak memory of a conversion, the whole process tree: (multiple of the source's parameters at
    # 16 bits, fixed GB), fitted to the default spec's conversions of several model sizes on this
    # kind of machine (bench/scale.py); None: not yet measured, so never refused up front.
    conversion_peak: tuple[float, float] | None = None
    # Tasks besides text generation (see edgequant.sources.tasks) this format takes, each with the
    # precisions that mean something for it; `convert_task` and `open_task` serve them.
    task_precisions: dict[str, tuple[str, ...]] = {}

    # -- the two hooks ------------------------------------------------------------------------

    def convert(self, source: "Source", spec: "Spec", out_dir: Path) -> dict[str, Any]:
        raise NotImplementedError

    def open(self, artifact: "Artifact", *, n_ctx: int, need_logits: bool, threads: int) -> "Runner":
        raise NotImplementedError

    def convert_task(self, source: "Source", spec: "Spec", out_dir: Path) -> dict[str, Any]:
        """`convert` for a source of another task (a sentence encoder, an image classifier)."""
        raise NotImplementedError

    def open_task(self, artifact: "Artifact", *, threads: int) -> "TaskRunner":
        """`open` for an artifact of another task: a runner mapping a batch of inputs to outputs."""
        raise NotImplementedError

    def precisions_for(self, task: str) -> tuple[str, ...]:
        """The precisions this format offers for models of `task` (none: it does not take them)."""
        from edgequant.sources.tasks import TEXT_GENERATION

        return tuple(self.precisions) if task == TEXT_GENERATION else self.task_precisions.get(task, ())

    # -- one base, many adapters (optional) ---------------------------------------------------

    def adapter_base(self, artifact: "Artifact") -> str | None:
        """Where this format's runtime switches LoRA adapters per request: the identity of the base
        model `artifact`'s runner loads, whatever adapter it applies, so artifacts with the same one
        can share one loaded base (`open_shared`); None where the runtime cannot switch."""
        return None

    def open_shared(self, artifacts: dict[str, "Artifact"], *, n_ctx: int, threads: int) -> "Runner":
        """One generation runner over the base that `artifacts` (served name -> artifact, one
        `adapter_base`) share, loaded once; a request decodes with the adapter of the artifact it
        names in `GenerateParams.adapter` (none for a plain base artifact)."""
        raise NotImplementedError

    # -- defaults a backend may override --------------------------------------------------------

    def validate(self, spec: "Spec") -> None:
        """Rules between options (e.g. one option needs another's value), checked when the spec
        is parsed, before any work. Which precisions an option applies to is declared on the
        Option itself and checked by the spec parser."""

    def check_source(self, source: "Source") -> None:
        """Refuse, before any work, a source this format cannot convert (an unsupported
        architecture), with an error naming the architecture and what is supported."""

    def limitations(self, source: "Source") -> list[str]:
        """What this format's artifact of `source` computes differently from the source, measured
        and known (e.g. an engine that ignores a sliding window): recorded in the manifest and
        repeated in reports, so a figure is never read without it."""
        return []

    def input_files(self, spec: "Spec") -> list[Path]:
        """Files a spec reads besides the source (e.g. an importance matrix given by path): their
        hashes go into the manifest, and a cached artifact is reused only while they are unchanged."""
        return []

    def importance_matrix(self, source: "Source", out: Path, *, text: str | None, dataset: str, tokens: int) -> dict:
        """Write this format's per-weight calibration statistics of `source` over `text` (None:
        the calibration text) to `out`, and return facts about them. Formats that keep such a file
        (llama.cpp's importance matrix) override this; `edgequant imatrix` uses the backend that does."""
        raise NotImplementedError

    @property
    def writes_importance_matrix(self) -> bool:
        return type(self).importance_matrix is not Backend.importance_matrix

    def search_specs(self, max_bytes: int | None) -> list[str]:
        """Specs that choose their own layout for a size budget (a per-tensor mix), which
        `optimize` tries beside the profile's fixed specs; `max_bytes` is the size gate's bound."""
        return []

    def neighbours(self, spec: "Spec") -> list[str]:
        """Specs one step away from `spec` (another group size, an importance matrix, sensitive
        layers kept at 8 bit) that `optimize` measures when `spec` is among the best."""
        return []

    def adjacent_choices(self, spec: "Spec", name: str) -> list["Spec"]:
        """`spec` with option `name` at each choice next to its current one (the option's
        `choices` in their declared order): the usual neighbours of a group or block size."""
        choices = self.options[name].choices
        at = choices.index(getattr(self.option_values(spec), name))
        return [spec.with_options(**{name: c}) for c in choices[max(at - 1, 0):at + 2] if c != choices[at]]

    def speed_is_representative(self) -> bool:
        """False where this machine runs the format through a stand-in (MLX off Apple silicon, QNN
        on the CPU execution provider): its speed here says little about the target device."""
        return True

    def report_notes(self, spec_text: str, manifest: dict) -> list[str]:
        """Sentences a report adds about one artifact: its limitations, and what a backend adds
        (e.g. a device check made at conversion)."""
        return [f"{spec_text}: {text}" for text in manifest.get("limitations", [])]

    def missing_modules(self) -> list[str]:
        """The engine modules this backend needs that are not installed here."""
        return [m for m in self.requires if not _importable(m)]

    def install_hint(self) -> str:
        return f"pip install 'edgequant[{self.extra or self.name}]'"

    def missing_engine(self) -> str | None:
        """Why this backend cannot run here (an engine module is not installed), or None."""
        missing = self.missing_modules()
        return f"{', '.join(missing)} not installed: `{self.install_hint()}`" if missing else None

    def tool_versions(self) -> dict[str, str]:
        """Installed versions of this backend's packages, read from metadata (no engine import)."""
        found = {}
        for package in self.packages:
            try:
                found[package] = version(package)
            except PackageNotFoundError:
                continue
        return found

    def conversion_peak_bytes(self, parameters: int) -> int | None:
        """Expected peak memory of converting a model of `parameters` weights, or None."""
        if self.conversion_peak is None:
            return None
        factor, fixed_gb = self.conversion_peak
        return int(factor * 2 * parameters + fixed_gb * 1e9)

    def option_values(self, spec: "Spec") -> Any:
        """Every option of this backend as a frozen record with one typed field per option
        (`opt.group`), as the spec gives it or at the default its precision uses: a misspelt
        option name fails where it is read, not silently as a missing key."""
        values = {name: spec.options.get(name, option.default_for(spec.precision)) for name, option in self.options.items()}
        return _options_record(type(self).__name__, tuple((name, option.kind) for name, option in self.options.items()))(**values)

    def estimated_bytes(self, precision: str, tensors, tied_embeddings: bool = False) -> int:
        """Estimated artifact size: 2-D weights at the precision's bpw, the rest in float32."""
        bpw = self.precisions[precision].bpw
        return int(sum(t.numel * (bpw if len(t.shape) >= 2 else 32.0) for t in tensors) / 8)


@functools.lru_cache(maxsize=None)
def _options_record(backend: str, fields: tuple[tuple[str, type], ...]) -> type:
    """The frozen dataclass of a backend's options (made once per backend and option set)."""
    return dataclasses.make_dataclass(f"{backend}Options", list(fields), frozen=True)


def _importable(module: str) -> bool:
    try:
        return find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is missing, or blocked in sys.modules
        return False
