"""The import graph of src/edgequant, read with ast (every import, also those inside functions):
no cycles, no import from a lower layer to a higher one, and no verb naming a format.

Layers, lowest first: base helpers; the model of the domain (spec, artifact, runner and backend
contracts, sources); the format packages; the registry; the verbs; the command line. A format
package imports only itself, `_shared` and lower layers; verbs reach formats only through the
registry. A new module must be placed in a layer below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SRC = Path(__file__).resolve().parents[1] / "src"
# Folders group modules by what they are about (sources, measurement, decisions, reporting,
# serving, backends); layers order them by what may import what. A folder spans layers where its
# helpers sit below its verbs (measurement's intervals are a base helper, its evaluation a verb).
LAYERS = {
    "base": ["edgequant", "edgequant.errors", "edgequant.atomic", "edgequant.locks", "edgequant.paths", "edgequant.scratch",
             "edgequant.children", "edgequant.progress",
             "edgequant.fingerprint", "edgequant.sources.safetensors_info",
             "edgequant.sources.gguf_header", "edgequant.sources.auto_tokenizer",
             "edgequant.measurement.logprobs", "edgequant.measurement.intervals", "edgequant.measurement.metric_table",
             "edgequant.measurement.settings", "edgequant.reporting.charts", "edgequant.sources.tasks",
             "edgequant.measurement.task_scores",
             "edgequant.adaptation.data",
             "edgequant.sources", "edgequant.measurement", "edgequant.decisions", "edgequant.reporting", "edgequant.adaptation"],
    "model": ["edgequant.spec", "edgequant.artifact", "edgequant.runner", "edgequant.backend",
              "edgequant.sources.source", "edgequant.sources.gguf_import", "edgequant.sources.pickled", "edgequant.measurement.evaldata",
              "edgequant.measurement.taskdata", "edgequant.sources.vision", "edgequant.measurement.imagedata",
              "edgequant.decisions.hardware", "edgequant.decisions.gates", "edgequant.adaptation.adapter",
              "edgequant.adaptation.merge"],
    "formats": ["edgequant.backends"],
    "registry": ["edgequant.registry"],
    "verbs": ["edgequant.conversion", "edgequant.sources.inspection", "edgequant.sources.importance",
              "edgequant.measurement.evaluation", "edgequant.measurement.speed_probe", "edgequant.measurement.results",
              "edgequant.measurement.measure", "edgequant.measurement.task_evaluation",
              "edgequant.measurement.ray_grid", "edgequant.measurement.benchmark", "edgequant.reporting.report",
              "edgequant.reporting.report_text",
              "edgequant.decisions.recommend", "edgequant.decisions.optimize", "edgequant.decisions.certificate",
              "edgequant.decisions.recipe", "edgequant.serving", "edgequant.adaptation.finetune",
              "edgequant.adaptation.scoring"],
    "cli": ["edgequant.cli", "edgequant.__main__", "edgequant.commands"],
}
RANK = {name: i for i, name in enumerate(LAYERS)}
FOLDERS = ("edgequant.sources", "edgequant.measurement", "edgequant.decisions", "edgequant.reporting", "edgequant.adaptation")
# What stays at the top of the package: the helpers and contracts every folder uses, and the
# verbs that are one module each. Anything else belongs in a folder.
TOP_LEVEL = {"edgequant", "edgequant.__main__", "edgequant.cli", "edgequant.errors", "edgequant.atomic",
             "edgequant.locks", "edgequant.paths", "edgequant.scratch", "edgequant.children",
             "edgequant.progress", "edgequant.fingerprint", "edgequant.spec", "edgequant.artifact", "edgequant.runner",
             "edgequant.backend", "edgequant.registry", "edgequant.conversion"}


def module_names() -> dict[str, Path]:
    found = {}
    for path in (SRC / "edgequant").rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def layer_of(module: str) -> str:
    """The layer whose longest listed prefix matches the module."""
    best = None
    for layer, prefixes in LAYERS.items():
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[1])):
                best = (layer, prefix)
    if best is None or (best[1] in ("edgequant", *FOLDERS) and module != best[1]):
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}")
    return best[0]


def imports_of(module: str, path: Path, modules: set[str]) -> set[str]:
    """edgequant modules that `module` imports anywhere in its file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from pkg import module` imports the module itself
                targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {t for t in targets if t in modules and t != module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = module_names()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def format_package(module: str) -> str | None:
    """'gguf' for edgequant.backends.gguf.tools; '_shared' for the shared helpers; None elsewhere."""
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["edgequant", "backends"] else None


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_the_top_level_holds_only_the_core_and_the_rest_is_in_folders(graph):
    top = {m for m in graph if m.count(".") <= 1}
    assert top - set(FOLDERS) - {"edgequant.backends", "edgequant.serving", "edgequant.commands"} == TOP_LEVEL


def test_no_module_imports_a_higher_layer(graph):
    wrong = [f"{m} ({layer_of(m)}) imports {t} ({layer_of(t)})"
             for m, targets in graph.items() for t in targets if RANK[layer_of(t)] > RANK[layer_of(m)]]
    assert not wrong, "\n".join(wrong)


def test_formats_import_only_themselves_and_the_shared_helpers(graph):
    wrong = []
    for module, targets in graph.items():
        own = format_package(module)
        for target in targets:
            other = format_package(target)
            if own and other and other not in (own, "_shared"):
                wrong.append(f"{module} imports another format's {target}")
            if own == "_shared" and other and other != "_shared":
                wrong.append(f"shared helper {module} imports the format module {target}")
            if RANK[layer_of(module)] > RANK["registry"] and other:
                wrong.append(f"{module} names a format ({target}); go through edgequant.registry")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
