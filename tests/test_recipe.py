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
