"""Recipes: checked before any work (errors name the line and the field), planned by --dry-run,
and resumable: a run killed with SIGKILL and run again redoes no finished step."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgequant.decisions.recipe import load_recipe, optimize_config
from edgequant.errors import EdgequantError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.unit
@pytest.mark.parametrize("text, message", [
    ("target: x86-cpu\ngatez: [kld<=0.1]\n", "line 2: unknown key 'gatez'"),
    ("eval:\n  windows: four\n", "line 2: eval.windows must be a whole number, not 'four'"),
    ("eval:\n  window: 4\n", "line 2: unknown key 'eval.window'"),
    ("gates:\n  - kld<=0.1\n  - size<<3MB\n", "line 3: gates[1]: gate 'size<<3MB' does not parse"),
    ("gates: [kld<=0.1, kld>=0.2]\n", "line 1: gates: gates 'kld<=0.1' and 'kld>=0.2' contradict"),
    ("specs: [gguf:q4_0, gguf:q9]\n", "line 1: specs[1]: unknown precision 'q9'"),
    ("specs: []\n", "specs: the list is empty"),
    ("target: toaster\n", "line 1: target: unknown hardware profile 'toaster'"),
    ("search: {objective: cheapest}\n", "search.objective: unknown objective 'cheapest'"),
    ("search: {budget: 0}\n", "search.budget: must be at least 1"),
    ("search: {objective: size\n", "not valid YAML"),
    ("gates: kld<=0.1\n", "line 1: gates must be a list of text"),
    ("source: no/such/folder\n", "line 1: source: no such file or folder"),
    ("- source: default\n", "a recipe is a mapping of keys"),
    ('source: "model\\0x"\n', "NUL character"),  # found by bench/hardening.py's fuzzing
    ("eval: {{ctx: 64}}\n", "line 1: eval: a key must be a plain word"),
    ("eval: {ctx: 8}\n", "eval: eval context 8 is too short"),
])
def test_a_bad_recipe_is_refused_naming_the_line_and_the_field(tmp_path, text, message):
    with pytest.raises(EdgequantError) as caught:
        optimize_config(load_recipe(_write(tmp_path, text)))
    assert message in caught.value.problem and caught.value.fix


@pytest.mark.unit
def test_paths_in_a_recipe_are_relative_to_its_folder(tmp_path):
    (tmp_path / "text.txt").write_text("some words")
    config = optimize_config(load_recipe(_write(tmp_path, "eval: {data: text.txt, windows: 2}\noutput: out\n")))
    assert config.eval.data == tmp_path / "text.txt" and config.eval.windows == 2 and config.output == tmp_path / "out"
    assert config.model is None and config.search and config.specs is None


def test_a_recipe_killed_mid_run_resumes_without_redoing_finished_steps(tiny_model, tmp_path):
    pytest.importorskip("llama_cpp", reason="its extra is not installed")
    home = tmp_path / "home"  # its own cache, so the first run builds everything itself
    recipe = _write(tmp_path, f"source: {tiny_model}\ntarget: arm-cpu\nspecs: [gguf:q8_0, gguf:q6_k, gguf:q4_0]\n"
                              "gates: [kld<=0.5]\neval: {ctx: 64, windows: 2, prompt_tokens: 16, gen_tokens: 16, "
                              "repeats: 2}\noutput: out\ndb: results.sqlite\n")
    env = {**os.environ, "EDGEQUANT_HOME": str(home), "EDGEQUANT_QUIET": "0"}
    first = subprocess.Popen([sys.executable, "-m", "edgequant", "run", str(recipe)], env=env,
                             stdout=subprocess.DEVNULL, stderr=open(tmp_path / "first.log", "w"))
    manifest = _wait_for_an_evaluated_artifact(home, first)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    finished = json.loads(manifest.read_text())
    assert not (tmp_path / "out").exists()

    plan = subprocess.run([sys.executable, "-m", "edgequant", "run", str(recipe), "--dry-run", "--json"], env=env,
                          capture_output=True, text=True, timeout=300)
    cached = [c["spec"] for c in json.loads(plan.stdout)["candidates"] if c["evaluation_cached"]]
    assert cached == [finished["spec_text"]]

    again = subprocess.run([sys.executable, "-m", "edgequant", "run", str(recipe)], env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"cache hit: {manifest.parent}" in again.stderr
    assert f"cached evaluation: {finished['spec_text']}" in again.stderr
    assert json.loads(manifest.read_text())["created"] == finished["created"]  # not rebuilt
    assert (tmp_path / "out" / "certificate.json").is_file()


def _wait_for_an_evaluated_artifact(home: Path, process: subprocess.Popen, timeout: float = 300) -> Path:
    """The manifest of the first artifact the results store holds an evaluation of, as soon as there is one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (home / "results.sqlite").is_file():
            with sqlite3.connect(f"file:{home / 'results.sqlite'}?mode=ro", uri=True, timeout=10) as conn:
                try:
                    found = conn.execute("SELECT artifact_path FROM stored_evaluations LIMIT 1").fetchone()
                except sqlite3.OperationalError:
                    found = None  # the schema is being created right now
            if found:
                return Path(found[0]) / "edgequant.json"
        if process.poll() is not None:
            pytest.fail(f"the run ended (exit {process.returncode}) before any artifact was evaluated")
        time.sleep(0.02)
    process.kill()
    pytest.fail("no artifact was evaluated in time")


def _shared(tmp_path: Path, text: str) -> Path:
    """A recipe in its own folder, with tmp_path/outside beside it: a place it must not write."""
    (tmp_path / "shared").mkdir()
    (tmp_path / "outside").mkdir()
    return _write(tmp_path / "shared", text)


@pytest.mark.unit
@pytest.mark.parametrize("text, field", [
    ("output: {outside}/out\n", "output"),
    ("output: ../escape\n", "output"),
    ("output: .\n", "output"),  # the recipe's folder itself: the winner would land beside the recipe
    ("db: ../x.sqlite\n", "db"),
    ("output: link/out\n", "output"),  # shared/link -> outside
    ("db: link/x.sqlite\n", "db"),
])
def test_a_recipe_that_would_write_outside_its_folder_is_refused(tmp_path, cli, text, field):
    recipe = _shared(tmp_path, text.format(outside=tmp_path / "outside"))
    (recipe.parent / "link").symlink_to(tmp_path / "outside")
    done = cli("run", str(recipe), "--dry-run")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"line 1: {field}: " in done.stderr and "the recipe's folder" in done.stderr and str(recipe.parent) in done.stderr
    assert {"output": "-o PATH", "db": "--db PATH"}[field] in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["outside", "shared"] and not any((tmp_path / "outside").iterdir())


@pytest.mark.unit
def test_a_recipe_may_write_into_a_subfolder_of_its_own(tmp_path):
    config = optimize_config(load_recipe(_shared(tmp_path, "output: sub/out\ndb: sub/results.sqlite\n")))
    assert config.output == tmp_path / "shared" / "sub" / "out" and config.db == tmp_path / "shared" / "sub" / "results.sqlite"


def test_places_chosen_on_the_command_line_replace_a_recipes_and_show_in_the_plan(tmp_path, cli, tiny_model):
    recipe = _shared(tmp_path, f"source: {tiny_model}\nspecs: [gguf:q8_0]\noutput: ../escape\ndb: ../x.sqlite\n")
    out, db = tmp_path / "outside" / "out", tmp_path / "outside" / "x.sqlite"
    done = cli("run", str(recipe), "--dry-run", "--json", "-o", str(out), "--db", str(db))
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert (found["output"], found["db"]) == (str(out), str(db))
    assert [c["spec"] for c in found["candidates"]] == ["gguf:q8_0"]


@pytest.mark.unit
@pytest.mark.parametrize("inside", [True, False])
def test_a_saved_recipe_keeps_only_the_places_inside_its_folder(tmp_path, monkeypatch, capsys, inside):
    from edgequant.decisions.optimize import OptimizeConfig
    from edgequant.decisions.recipe import save_recipe

    monkeypatch.setenv("EDGEQUANT_QUIET", "0")
    recipe = _shared(tmp_path.resolve(), "")
    where = recipe.parent if inside else recipe.parent.parent / "outside"
    config = OptimizeConfig(target="x86-cpu", gates=("kld<=0.1",), output=where / "out", db=where / "results.sqlite")
    save_recipe(config, recipe, "x86-cpu")
    saved = load_recipe(recipe)
    note = capsys.readouterr().err
    if inside:
        assert (saved.data["output"], saved.data["db"]) == ("out", "results.sqlite") and not note
        assert optimize_config(saved) == config
    else:
        assert "output" not in saved.data and "db" not in saved.data
        assert "leaves out output" in note and f"edgequant run {recipe} -o PATH" in note and "--db PATH" in note
        assert optimize_config(saved).output == recipe.parent / "edgequant-optimized"
        assert optimize_config(saved, output=config.output, db=config.db) == config
