"""Recipes: an `optimize` run written down as YAML, checked before any work, and resumable.

    source: default            # or a Hugging Face folder / .gguf file, relative to the recipe
    target: x86-cpu            # a hardware profile; left out: the one closest to this machine
    specs: [gguf:q4_k_m, onnx:int4]   # exactly these candidates; left out: the profile's
    search: {objective: size, budget: 20, neighbours: true}
    gates: ["ppl_increase<=5%", "size<=120MB"]   # left out: the production-readiness defaults
    eval: {windows: 4, ctx: 512, data: text.txt, prompt_tokens: 128, gen_tokens: 64, repeats: 3, threads: 0}
    output: optimized          # the winner and its certificate
    db: results.sqlite         # left out: the cache's results database

`output` and `db` are written, so they must lie inside the recipe's folder: a recipe is a file
people share, and running someone else's must not write anywhere else. The person running it
chooses other places on the command line (`edgequant run RECIPE -o PATH --db PATH`).

Every key and type is checked, and every spec, gate, profile and file resolved, before the first
conversion; an error names the line and the field. A run is resumable because each step's
result is kept where it is made: artifacts are renamed into place only when complete, and each
evaluation is stored in its artifact's manifest, so a run killed at any point and run again redoes
only the step it was in.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from edgequant.errors import EdgequantError

_EVAL_KEYS = {"windows": int, "ctx": int, "data": str, "speed": bool, "prompt_tokens": int, "gen_tokens": int,
              "repeats": int, "threads": int}
_SEARCH_KEYS = {"objective": str, "budget": int, "neighbours": bool}
# key -> a type, [type] for a list of it, or a dict of sub-keys
SCHEMA: dict[str, Any] = {"version": int, "source": str, "target": str, "specs": [str], "search": _SEARCH_KEYS,
                          "gates": [str], "eval": _EVAL_KEYS, "output": str, "db": str}
VERSION = 1
DEFAULT_OUTPUT = "edgequant-optimized"
_CHOOSE = {"output": "-o PATH", "db": "--db PATH"}  # the `run` flags that place a written path
_TYPE_WORDS = {int: "a whole number", str: "text", bool: "true or false", float: "a number"}


@dataclass(frozen=True)
class Recipe:
    path: Path
    data: dict
    lines: dict[str, int]  # dotted field -> line number (1-based), for errors found after parsing

    def error(self, field: str, problem: str, fix: str) -> EdgequantError:
        line = self.lines.get(field)
        return EdgequantError(f"{self.path}{f' line {line}' if line else ''}: {field}: {problem}", fix)


def load_recipe(path: Path) -> Recipe:
    """Read and check a recipe: YAML syntax, keys, types (with line numbers), then meaning."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise EdgequantError(f"no such recipe: {path}", "pass a YAML recipe file (`edgequant optimize --save-recipe` writes one)")
    try:
        root = yaml.compose(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise EdgequantError(f"{path}{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})",
                             "fix the YAML syntax there") from None
    except UnicodeDecodeError:
        raise EdgequantError(f"{path} is not UTF-8 text", "save the recipe as UTF-8") from None
    if root is None or not isinstance(root, yaml.MappingNode):
        raise EdgequantError(f"{path}: a recipe is a mapping of keys (source:, target:, gates:, ...)",
                             f"start from `edgequant optimize --save-recipe FILE`; keys: {', '.join(SCHEMA)}")
    lines: dict[str, int] = {}
    data = _checked(root, SCHEMA, "", path, lines)
    recipe = Recipe(path, data, lines)
    _check_meaning(recipe)
    return recipe


def _checked(node, schema, prefix: str, path: Path, lines: dict[str, int]):
    """The node's value, checked against `schema`; every field's line is recorded."""
    import yaml

    if isinstance(schema, dict):
        if not isinstance(node, yaml.MappingNode):
            raise _type_error(path, node, prefix, "a mapping of " + ", ".join(schema))
        out = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise EdgequantError(f"{path} line {key_node.start_mark.line + 1}: {prefix.rstrip('.') or 'the top level'}: "
                                     "a key must be a plain word", f"keys here: {', '.join(schema)}")
            key = key_node.value
            field = f"{prefix}{key}"
            lines[field] = key_node.start_mark.line + 1
            if key not in schema:
                raise EdgequantError(f"{path} line {lines[field]}: unknown key {field!r}",
                                     f"known keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(schema)}")
            if key in out:
                raise EdgequantError(f"{path} line {lines[field]}: {field} is given twice", "keep one of them")
            out[key] = _checked(value_node, schema[key], f"{field}.", path, lines)
        return out
    if isinstance(schema, list):
        if not isinstance(node, yaml.SequenceNode):
            raise _type_error(path, node, prefix, f"a list of {_TYPE_WORDS[schema[0]]}")
        field = prefix.rstrip(".")
        for i, item in enumerate(node.value):
            lines[f"{field}[{i}]"] = item.start_mark.line + 1
        return [_checked(item, schema[0], prefix, path, lines) for item in node.value]
    return _scalar(node, schema, prefix, path)


def _scalar(node, kind: type, prefix: str, path: Path):
    import yaml

    if not isinstance(node, yaml.ScalarNode):
        raise _type_error(path, node, prefix, _TYPE_WORDS[kind])
    value = yaml.safe_load(yaml.serialize(node))
    if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise _type_error(path, node, prefix, _TYPE_WORDS[kind], value)


def _type_error(path: Path, node, prefix: str, wanted: str, value: Any = None) -> EdgequantError:
    field = prefix.rstrip(".")
    shown = f", not {value!r}" if value is not None else ""
    return EdgequantError(f"{path} line {node.start_mark.line + 1}: {field} must be {wanted}{shown}",
                          f"write {field} as {wanted}")


def _check_meaning(recipe: Recipe) -> None:
    """Specs, gates, profile, objective and files: everything that would fail later, found now."""
    from edgequant.decisions.gates import parse_gate, parse_gates
    from edgequant.decisions.hardware import get_profile
    from edgequant.decisions.optimize import objective_metric
    from edgequant.registry import parse_specs

    data = recipe.data
    if data.get("version", VERSION) != VERSION:
        raise recipe.error("version", f"this edgequant reads version {VERSION} recipes", f"write version: {VERSION}")
    checks = [("target", lambda: get_profile(data["target"]) if "target" in data else None)]
    checks += [(f"gates[{i}]", lambda t=t: parse_gate(t)) for i, t in enumerate(data.get("gates", []))]
    checks += [("gates", lambda: parse_gates(data.get("gates", [])))]  # bounds that contradict each other
    checks += [(f"specs[{i}]", lambda t=t: parse_specs(t)) for i, t in enumerate(data.get("specs", []))]
    for field, run in checks:
        try:
            run()
        except EdgequantError as exc:
            raise recipe.error(field, exc.problem, exc.fix) from None
    if data.get("specs") == []:
        raise recipe.error("specs", "the list is empty", "list at least one spec, or drop specs: to use the profile's")
    objective = data.get("search", {}).get("objective", "size")
    try:
        objective_metric(objective)
    except EdgequantError as exc:
        raise recipe.error("search.objective", exc.problem, exc.fix) from None
    if data.get("search", {}).get("budget", 1) < 1:
        raise recipe.error("search.budget", "must be at least 1", "give the most evaluations to spend, e.g. 20")
    paths = {"source": data.get("source"), "eval.data": data.get("eval", {}).get("data"), "output": data.get("output"),
             "db": data.get("db")}
    for field, value in paths.items():
        if value is not None and "\0" in value:  # found by fuzzing: the OS refuses it with a bare ValueError
            raise recipe.error(field, "holds a NUL character, which no file name can", "write a plain path")
    for field in ("source", "eval.data"):
        value = paths[field]
        if value not in (None, "default") and not recipe_path(recipe, value).exists():
            raise recipe.error(field, f"no such file or folder: {recipe_path(recipe, value)}",
                               "paths are relative to the recipe's folder")


def recipe_path(recipe: Recipe, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (recipe.path.parent / path).resolve()


def _inside(path: Path, folder: Path) -> bool:
    """Whether `path` lies within `folder` (not the folder itself), after `..` and symlinks."""
    return folder.resolve() in Path(path).expanduser().resolve().parents


def _written_path(recipe: Recipe, field: str, value: str) -> Path:
    """Where the recipe writes `field`, refused outside the recipe's folder."""
    folder = recipe.path.parent.resolve()
    path = (folder / Path(value).expanduser()).resolve()
    if not _inside(path, folder):
        where = "is the recipe's folder itself" if path == folder else f"is outside the recipe's folder {folder}"
        raise recipe.error(field, f"{path} {where}; a recipe writes only inside its folder",
                           "write a path inside the recipe's folder, or choose the place on the command line: "
                           f"edgequant run {recipe.path} {_CHOOSE[field]}")
    return path


def optimize_config(recipe: Recipe, output: Path | None = None, db: Path | None = None):
    """The OptimizeConfig the recipe describes; `output` and `db`, when given, replace the recipe's
    (a place chosen by the person running it is trusted, so it may be anywhere)."""
    from edgequant.decisions.optimize import DEFAULT_BUDGET, OptimizeConfig
    from edgequant.measurement.settings import DEFAULT_EVAL, EvalConfig

    data = recipe.data
    search = data.get("search", {})
    eval_values = {f.name: getattr(DEFAULT_EVAL, f.name) for f in fields(EvalConfig)}
    eval_values.update(data.get("eval", {}))
    if eval_values.get("data"):
        eval_values["data"] = recipe_path(recipe, eval_values["data"])
    try:
        eval_config = EvalConfig(**eval_values)
    except EdgequantError as exc:
        raise recipe.error("eval", exc.problem, exc.fix) from None
    source = data.get("source", "default")
    output = output or _written_path(recipe, "output", data.get("output", DEFAULT_OUTPUT))
    db = db or (_written_path(recipe, "db", data["db"]) if "db" in data else None)
    return OptimizeConfig(
        model=None if source == "default" else recipe_path(recipe, source), target=data.get("target"),
        gates=tuple(data.get("gates", ())), objective=search.get("objective", "size"),
        budget=search.get("budget", DEFAULT_BUDGET),
        specs=tuple(data["specs"]) if "specs" in data else None,
        search=search.get("neighbours", "specs" not in data), eval=eval_config,
        output=output, db=db)


def check_recipe_path(path: Path) -> None:
    from edgequant.atomic import ensure_writable_parent

    ensure_writable_parent(Path(path).expanduser().resolve(), folder=False)


def save_recipe(config, path: Path, profile: str) -> None:
    """Write the recipe that reproduces an optimize run (the profile it used, inputs absolute,
    gates spelled out). Output and db are written relative to the recipe's folder; one outside it
    is left out, as a recipe may not write there."""
    from dataclasses import asdict

    import yaml

    from edgequant.atomic import write_text_atomic
    from edgequant.decisions.gates import DEFAULT_GATES

    data: dict[str, Any] = {"version": VERSION, "source": str(config.model.resolve()) if config.model else "default"}
    data["target"] = profile
    if config.specs is not None:
        from edgequant.registry import parse_specs

        data["specs"] = [str(spec) for spec in parse_specs(config.specs)]
    data["search"] = {"objective": config.objective, "budget": config.budget, "neighbours": config.search}
    data["gates"] = list(config.gates or DEFAULT_GATES)
    data["eval"] = {k: (str(Path(v).resolve()) if k == "data" else v) for k, v in asdict(config.eval).items() if v is not None}
    data.update(_written_fields(config, Path(path).expanduser().resolve().parent, path))
    header = "# edgequant recipe: `edgequant run THIS_FILE` reproduces the optimize run that wrote it\n"
    write_text_atomic(Path(path).expanduser(), header + yaml.safe_dump(data, sort_keys=False))


def _written_fields(config, folder: Path, path: Path) -> dict[str, str]:
    """The recipe's `output` and `db`, relative to its folder (posix, as recipes are shared); a
    place outside the folder is left out with a note, as running the recipe would refuse it."""
    from edgequant.progress import note

    fallback = {"output": str(folder / DEFAULT_OUTPUT), "db": "the cache's results database"}
    found = {}
    for field, value in (("output", config.output), ("db", config.db)):
        if value is None:
            continue
        place = Path(value).expanduser().resolve()
        if _inside(place, folder):
            found[field] = place.relative_to(folder).as_posix()
        else:
            note(f"the recipe leaves out {field}: {place} is outside its folder {folder}, where a recipe may not write; "
                 f"running it uses {fallback[field]}, or choose the place: edgequant run {path} {_CHOOSE[field]}")
    return found
