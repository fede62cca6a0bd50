"""`optimize` on the tiny model: candidates, gates with intervals, the closed loop, the Pareto
front, the certificate and `verify`, impossible gates, and the plan for every profile."""

import hashlib
import json
import shutil
import subprocess
import sys

import pytest

from edgequant.decisions.hardware import profiles
from edgequant.decisions.optimize import OptimizeConfig, optimize, plan
from edgequant.errors import EdgequantError
from edgequant.measurement.settings import EvalConfig

pytest.importorskip("llama_cpp", reason="its extra is not installed")

SMALL_EVAL = EvalConfig(ctx=64, windows=2, prompt_tokens=16, gen_tokens=16, repeats=2)
EVAL_FLAGS = ["--ctx", "64", "--windows", "2", "--prompt-tokens", "16", "--gen-tokens", "16", "--repeats", "2"]


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    """arm-cpu (not this machine) with one quality gate, a budget of 12, certified into out/."""
    folder = tmp_path_factory.mktemp("optimize")
    config = OptimizeConfig(tiny_model, "arm-cpu", ("kld<=0.5",), "size", budget=12, eval=SMALL_EVAL,
                            output=folder / "out", db=folder / "results.sqlite")
    return folder, config, optimize(config)


def test_the_winner_is_the_smallest_candidate_passing_the_gate_with_its_whole_interval(run):
    _, _, result = run
    measured = [c for c in result["candidates"] if c["status"] == "measured"]
    winner = next(c for c in measured if c["spec"] == result["winner"])
    assert winner["figures"]["ci95"]["kld_mean"][1] <= 0.5
    passing = [c for c in measured if c["figures"]["ci95"]["kld_mean"][1] <= 0.5]
    assert winner["figures"]["size_bytes"] == min(c["figures"]["size_bytes"] for c in passing)
    assert all(not c["passes"] for c in measured if c["figures"]["ci95"]["kld_mean"][1] > 0.5)
    assert result["evaluations"] <= 12


def test_the_front_holds_exactly_the_candidates_nothing_dominates(run):
    _, _, result = run
    points = {c["spec"]: (c["figures"]["kld_mean"], c["figures"]["size_bytes"])  # arm-cpu is not this machine: 2 figures
              for c in result["candidates"] if c["status"] == "measured"}

    def dominated(p):
        return any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points.values())

    assert set(result["pareto_front"]) == {s for s, p in points.items() if not dominated(p)}
    assert result["winner"] in result["pareto_front"]


def test_the_closed_loop_measures_neighbours_of_the_best_and_says_if_they_did_better(run):
    _, _, result = run
    neighbours = [c for c in result["candidates"] if c["origin"].startswith("neighbour of")]
    assert neighbours and all(c["better_than_parent"] is not None for c in neighbours if c["status"] == "measured")
    assert any(c["spec"].startswith("gguf:auto?bpw=") for c in neighbours)  # the measured mix's budget steps


def test_a_target_that_is_not_this_machine_says_which_figures_are_stand_ins(run):
    _, _, result = run
    assert result["profile"] == {"name": "arm-cpu", "title": profiles()["arm-cpu"].title, "runs_here": False}
    assert any("stand-ins" in step for step in result["decision_path"])


def test_the_certificate_hashes_every_file_and_verify_catches_a_flipped_byte(run, tmp_path):
    folder, _, result = run
    out = folder / "out"
    cert = json.loads((out / "certificate.json").read_text())
    assert cert["spec"] == result["winner"] and cert["verdict"] == "pass" and cert["profile"]["name"] == "arm-cpu"
    files = cert["artifact"]["files"]
    model_files = {str(p.relative_to(out / "model")) for p in (out / "model").rglob("*") if p.is_file()}
    assert set(files) == model_files and "edgequant.json" in files  # the manifest too: artifacts are never rewritten
    for name, entry in files.items():
        assert hashlib.sha256((out / "model" / name).read_bytes()).hexdigest() == entry["sha256"]
    assert cert["source"]["fingerprint"] == result["source_fingerprint"] and cert["source"]["files"]
    assert cert["evaluation"]["data_sha256"] and cert["gates"][0]["verdict"] == "pass" and cert["tools"]["llama-cpp-python"]
    copy = tmp_path / "copy"
    shutil.copytree(out / "model", copy)
    ok = _cli("verify", str(out / "certificate.json"), str(copy), "--json")
    assert ok.returncode == 0 and json.loads(ok.stdout)["ok"]
    model = next(copy / name for name in files if name.endswith(".gguf"))
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0x01
    model.write_bytes(bytes(data))
    bad = _cli("verify", str(out / "certificate.json"), str(copy), "--json")
    assert bad.returncode == 1
    assert [f["path"] for f in json.loads(bad.stdout)["files"] if f["status"] == "changed"] == [model.name]


def test_verify_refuses_a_file_that_is_not_a_certificate(tmp_path):
    (tmp_path / "c.json").write_text("{}")
    done = _cli("verify", str(tmp_path / "c.json"), str(tmp_path))
    assert done.returncode == 2 and "not an edgequant certificate" in done.stderr and "Traceback" not in done.stderr


def test_the_certificate_page_renders_in_headless_chromium(run, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian chromium is not installed (make setup installs it when run as root)")
    folder, _, result = run
    page = (folder / "out" / "certificate.html").resolve()
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert 'id="verdict"' in dom and "PASS" in dom
    assert dom.count('class="gate"') == 2 and dom.count('class="winner"') == 1  # kld<=0.5 and the source check
    assert "perplexity not below the source" in dom
    measured = sum(c["status"] == "measured" for c in result["candidates"])
    assert dom.count("<circle") == measured and dom.count('class="candidate"') == len(result["candidates"])


def test_impossible_gates_exit_non_zero_and_name_the_closest_candidate_and_its_miss(run, tiny_model):
    folder, _, _ = run
    done = _cli("optimize", str(tiny_model), "--target", "arm-cpu", "--gate", "kld<=0.000001", "--no-search", "--budget", "4",
                "--db", str(folder / "results.sqlite"), "-o", str(folder / "never"), "--json", *EVAL_FLAGS)
    assert done.returncode == 1, done.stderr
    result = json.loads(done.stdout)
    assert result["winner"] is None and not (folder / "never").exists()
    assert result["closest"]["spec"] == min((c for c in result["candidates"] if c["status"] == "measured"),
                                            key=lambda c: c["figures"]["kld_mean"])["spec"]
    assert "kld<=0.000001: missed by" in result["closest"]["missed"]


def test_a_saved_recipe_reproduces_the_run_config(run):
    from edgequant.decisions.recipe import load_recipe, optimize_config, save_recipe

    folder, config, result = run  # the recipe beside the run's output and db, where it may write them
    save_recipe(config, folder / "r.yaml", result["profile"]["name"])
    again = optimize_config(load_recipe(folder / "r.yaml"))
    assert again == config


@pytest.mark.parametrize("name", sorted(profiles()))
def test_the_plan_for_every_profile_lists_candidates_and_what_cannot_run_here(name, tiny_model, monkeypatch):
    for module in ("mlx", "mlx.core", "mlx_lm"):  # as on a machine without the MLX extra
        monkeypatch.setitem(sys.modules, module, None)
    found = plan(OptimizeConfig(tiny_model, name, eval=SMALL_EVAL))
    assert found["profile"] == name and found["candidates"] and found["estimated_s"] > 0
    specs = [c["spec"] for c in found["candidates"]]
    assert list(profiles()[name].precisions) == specs[:len(profiles()[name].precisions)]
    for c in found["candidates"]:
        if c["spec"].startswith("mlx:"):
            assert "edgequant[mlx]" in c["skipped"]


def test_a_target_none_of_whose_engines_is_installed_is_refused_with_the_extras(tiny_model, monkeypatch):
    for module in ("mlx", "mlx.core", "mlx_lm", "llama_cpp"):
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(EdgequantError) as caught:
        optimize(OptimizeConfig(tiny_model, "apple-silicon", eval=SMALL_EVAL))
    assert "edgequant[mlx]" in caught.value.fix and "edgequant[gguf]" in caught.value.fix


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edgequant", *args], capture_output=True, text=True, timeout=600)


def test_an_output_folder_holding_something_else_is_refused_before_any_work(tiny_model, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    done = _cli("optimize", str(tiny_model), "--target", "arm-cpu", "-o", str(tmp_path / "mine"), "--db", str(tmp_path / "r.sqlite"))
    assert done.returncode == 2 and "holds something other than an edgequant certificate" in done.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me" and not (tmp_path / "r.sqlite").exists()
