"""`recommend` on the tiny model: the decision path, measurements from the results database,
constraints with intervals, runner-ups' reasons, and a target whose engines are missing here."""

import json
import subprocess
import sys

import pytest

from edgequant.decisions.recommend import RecommendConfig, recommend

pytest.importorskip("llama_cpp", reason="its extra is not installed")


@pytest.fixture(scope="module")
def measured(tiny_model, tmp_path_factory):
    """arm-cpu's candidates measured into a fresh database (--measured), with no constraint."""
    db = tmp_path_factory.mktemp("recommend") / "results.sqlite"
    return db, recommend(RecommendConfig(tiny_model, "arm-cpu", measured=True, db=db))


def test_measured_candidates_and_the_first_in_the_profiles_order_wins(measured):
    _, result = measured
    assert result["profile"] == "arm-cpu" and result["recommendation"] == "gguf:q4_0"
    by_spec = {c["spec"]: c for c in result["candidates"]}
    assert by_spec["gguf:q8_0"]["measured"]["kld_mean"] < by_spec["gguf:q4_0"]["measured"]["kld_mean"]
    assert "comes after gguf:q4_0" in by_spec["gguf:q8_0"]["lost_because"]
    assert any("as asked" in step for step in result["decision_path"])


def test_a_quality_bound_skips_candidates_whose_interval_crosses_it(measured, tiny_model):
    db, first = measured
    by_spec = {c["spec"]: c["measured"] for c in first["candidates"]}
    bound = (by_spec["gguf:q8_0"]["ci95"]["kld_mean"][1] + by_spec["gguf:q4_0"]["ci95"]["kld_mean"][0]) / 2
    result = recommend(RecommendConfig(tiny_model, "arm-cpu", max_kld=bound, db=db))
    assert result["recommendation"] in ("gguf:q4_k_m", "gguf:q8_0")
    q4 = next(c for c in result["candidates"] if c["spec"] == "gguf:q4_0")
    assert "kld<=" in q4["lost_because"] and ("missed by" in q4["lost_because"] or "crosses" in q4["lost_because"])


def test_impossible_constraints_exit_non_zero_and_name_the_closest(measured, tiny_model):
    db, _ = measured
    done = subprocess.run([sys.executable, "-m", "edgequant", "recommend", str(tiny_model), "--target", "arm-cpu",
                           "--max-size", "1KB", "--db", str(db), "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    result = json.loads(done.stdout)
    assert result["recommendation"] is None and "the closest is" in result["decision_path"][-1]
    assert all("size<=1KB: missed by" in c["lost_because"] for c in result["candidates"])


def test_a_target_whose_engine_is_missing_here_names_the_extra(tiny_model, monkeypatch, tmp_path):
    for name in ("mlx", "mlx.core", "mlx_lm"):
        monkeypatch.setitem(sys.modules, name, None)
    result = recommend(RecommendConfig(tiny_model, "apple-silicon", db=tmp_path / "none.sqlite"))
    mlx = [c for c in result["candidates"] if c["format"] == "mlx"]
    assert mlx and not any(c["installed_here"] for c in mlx)
    assert any("edgequant[mlx]" in step for step in result["decision_path"])
    assert result["recommendation"] == "mlx:4bit"  # no constraint: the profile's first choice, to deploy elsewhere


def test_bad_constraints_are_refused_before_any_work(tiny_model):
    from edgequant.errors import EdgequantError

    with pytest.raises(EdgequantError, match="not both"):
        recommend(RecommendConfig(tiny_model, "x86-cpu", max_kld=0.05, max_ppl_increase=5))
    with pytest.raises(EdgequantError, match="unknown hardware profile"):
        recommend(RecommendConfig(tiny_model, "tpu"))
    with pytest.raises(EdgequantError, match="not a unit of size"):
        recommend(RecommendConfig(tiny_model, "x86-cpu", max_size="12 parsecs"))


def test_candidates_too_large_to_convert_here_stay_listed_and_are_not_measured(tiny_model, monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEQUANT_MEMORY_LIMIT", "200MB")  # below every measured engine's fixed part
    db = tmp_path / "results.sqlite"
    result = recommend(RecommendConfig(tiny_model, "arm-cpu", measured=True, db=db))
    assert result["candidates"] and all("EDGEQUANT_MEMORY_LIMIT is 0.2 GB" in c["too_large_here"] for c in result["candidates"])
    assert any(step.startswith("too large to convert on this machine") for step in result["decision_path"])
    assert not db.exists()  # --measured converted nothing
    assert result["recommendation"] == "gguf:q4_0"  # still the profile's choice, to convert elsewhere
