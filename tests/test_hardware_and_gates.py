"""Hardware profiles (data), detection and the closest profile; quality gates on hand-made metrics."""

import json
import subprocess
import sys

import pytest

from edgequant.decisions.gates import DEFAULT_GATES, check, derived_metrics, parse_gate, parse_gates, passes, source_check
from edgequant.decisions.hardware import Machine, closest, detect, get_profile, int8_dot_product, profiles
from edgequant.errors import EdgequantError
from edgequant.registry import format_names, parse_spec

pytestmark = pytest.mark.unit

REQUIRED = {"intel-cpu", "intel-gpu", "intel-npu", "apple-silicon", "qualcomm-npu", "nvidia-gpu", "arm-cpu", "x86-cpu"}


def machine(**facts) -> Machine:
    base = dict(os="Linux", machine="x86_64", cpu_vendor="AuthenticAMD", cpu_model="test", cores=8, ram_gb=16.0)
    return Machine(**{**base, **facts})


def test_every_required_profile_exists_and_names_real_formats_and_specs():
    assert REQUIRED <= set(profiles())
    for profile in profiles().values():
        assert set(profile.formats) <= set(format_names()), profile.name
        for text in profile.precisions:
            assert parse_spec(text).format in profile.formats, (profile.name, text)
        assert profile.speed in ("measured", "stand-in")


@pytest.mark.parametrize("facts, expected", [
    (dict(), "x86-cpu"),
    (dict(cpu_vendor="GenuineIntel"), "intel-cpu"),
    (dict(cpu_vendor="GenuineIntel", devices={"intel-gpu": ["renderD128 (driver xe)"]}), "intel-gpu"),
    (dict(cpu_vendor="GenuineIntel", devices={"intel-gpu": ["renderD128"], "intel-npu": ["accel0 (driver intel_vpu)"]}), "intel-npu"),
    (dict(devices={"nvidia-gpu": ["NVIDIA H100"]}), "nvidia-gpu"),
    (dict(os="Darwin", machine="arm64", cpu_vendor="Apple"), "apple-silicon"),
    (dict(machine="aarch64", cpu_vendor="Qualcomm", devices={"qualcomm-npu": ["/dev/fastrpc-cdsp"]}), "qualcomm-npu"),
    (dict(machine="aarch64", cpu_vendor="ARM"), "arm-cpu"),
])
def test_the_decision_path_for_every_profile(facts, expected):
    profile, verdicts = closest(machine(**facts))
    assert profile.name == expected
    chosen = next(v for v in verdicts if v["profile"] == expected)
    assert chosen["matches"] and chosen["evidence"] and not chosen["missing"]
    for v in verdicts:  # every other profile says why it lost
        assert v["profile"] == expected or v["missing"] or v["priority"] < chosen["priority"]


def test_this_machine_is_detected_and_matched():
    found = detect()
    assert found.cores >= 1 and found.ram_gb > 0 and found.os
    profile, _ = closest(found)
    assert profile.name in profiles()
    done = subprocess.run([sys.executable, "-m", "edgequant", "hardware", "--json"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and json.loads(done.stdout)["profile"] == profile.name
    assert json.loads(done.stdout)["int8_dot_product"] == int8_dot_product(set(found.isa))
    text = subprocess.run([sys.executable, "-m", "edgequant", "hardware"], capture_output=True, text=True, timeout=60).stdout
    if int8_dot_product(set(found.isa)) not in (None, "vnni"):
        assert "?weights=u8" in text  # an x86 CPU without VNNI is told which int8 artifact to build


def test_an_unknown_profile_lists_the_known_ones():
    with pytest.raises(EdgequantError, match="unknown hardware profile") as err:
        get_profile("tpu")
    assert "x86-cpu" in err.value.fix and "apple-silicon" in err.value.fix


def test_gates_parse_with_units():
    assert parse_gate("size<=120MB").value == 120e6 and parse_gate("size<=0.5GiB").value == 2**29
    assert parse_gate("ttft<=0.3s").value == 300 and parse_gate("ttft<=300ms").value == 300
    assert parse_gate(" ppl_increase <= 5% ").value == 5 and parse_gate("speedup>=2x").op == ">="
    assert [g.name for g in parse_gates(DEFAULT_GATES)] == ["ppl_change", "kld", "speedup", "memory_reduction"]


def test_the_default_gates_refuse_a_model_far_from_its_source_in_either_direction():
    # Gemma-3-270M's onnx:int4?head8=0, certified by the one-sided defaults: perplexity 7.4% below its
    # source, KLD 0.59 [0.54, 0.65]
    wrong = derived_metrics({"ppl_increase_pct": -7.4, "kld_mean": 0.59, "top1_agreement": 0.54,
                             "ci95": {"ppl_increase_pct": [-9.0, -5.8], "kld_mean": [0.54, 0.65],
                                      "top1_agreement": [0.52, 0.56]}}, None)
    verdicts = {v["gate"]: v["verdict"] for v in (check(g, wrong) for g in parse_gates(DEFAULT_GATES))}
    assert verdicts["ppl_change<=5%"] == "fail" and verdicts["kld<=0.1"] == "fail"
    assert source_check(wrong)["verdict"] == "suspect" and "below its source" in source_check(wrong)["reason"]
    # a faithful 4-bit candidate passes both quality defaults, and the source check
    faithful = derived_metrics({"ppl_increase_pct": 3.2, "kld_mean": 0.042,
                                "ci95": {"ppl_increase_pct": [2.1, 4.2], "kld_mean": [0.038, 0.046]}}, None)
    assert [check(g, faithful)["verdict"] for g in parse_gates(DEFAULT_GATES[:2])] == ["pass", "pass"]
    assert source_check(faithful)["verdict"] == "pass"


def test_the_perplexity_change_interval_is_that_of_its_absolute_value():
    straddles = derived_metrics({"ppl_increase_pct": -0.5, "ci95": {"ppl_increase_pct": [-2.0, 1.0]}}, None)
    assert straddles["ppl_change_pct"] == 0.5 and straddles["ci95"]["ppl_change_pct"] == [0.0, 2.0]
    below = derived_metrics({"ppl_increase_pct": -6.0, "ci95": {"ppl_increase_pct": [-7.0, -4.0]}}, None)
    assert below["ci95"]["ppl_change_pct"] == [4.0, 7.0]
    assert check(parse_gate("ppl_change<=5%"), below)["verdict"] == "uncertain"
    assert source_check(straddles)["verdict"] == "pass"  # below the source only within noise


def test_a_suspect_candidate_is_never_certified():
    from edgequant.decisions.optimize import Candidate, ranked

    suspect = source_check({"ppl_increase_pct": -3.0, "ci95": {"ppl_increase_pct": [-4.0, -2.0]}})
    better_than_source = Candidate("suspect", "test", "measured", metrics={"size_bytes": 10, "kld_mean": 0.2},
                                   verdicts=[{"gate": "kld<=0.5", "verdict": "pass"}, suspect])
    honest = Candidate("honest", "test", "measured", metrics={"size_bytes": 50, "kld_mean": 0.3},
                       verdicts=[{"gate": "kld<=0.5", "verdict": "pass"}])
    assert not better_than_source.passes and ranked("size", [better_than_source, honest])[0] is honest


@pytest.mark.parametrize("text, message", [("kld=<0.05", "does not parse"), ("recall<=3", "unknown metric"),
                                           ("size<=12MW", "not a unit of size"), ("kld<=", "does not parse")])
def test_bad_gates_say_what_is_wrong(text, message):
    with pytest.raises(EdgequantError, match=message):
        parse_gate(text)


def test_contradictory_gates_are_refused():
    with pytest.raises(EdgequantError, match="contradict"):
        parse_gates(["kld<=0.01", "kld>=0.05"])
    parse_gates(["kld<=0.05", "kld>=0.01"])  # a band is fine


def test_a_quality_gate_passes_only_when_its_whole_interval_does():
    gate = parse_gate("kld<=0.05")
    inside = {"kld_mean": 0.04, "ci95": {"kld_mean": [0.03, 0.045]}}
    straddles = {"kld_mean": 0.045, "ci95": {"kld_mean": [0.04, 0.06]}}
    outside = {"kld_mean": 0.07, "ci95": {"kld_mean": [0.06, 0.08]}}
    assert check(gate, inside)["verdict"] == "pass"
    assert check(gate, straddles)["verdict"] == "uncertain" and not passes([check(gate, straddles)])
    missed = check(gate, outside)
    assert missed["verdict"] == "fail" and missed["missed_by"] == pytest.approx(0.03)
    assert check(parse_gate("top1>=0.9"), {"top1_agreement": 0.95, "ci95": {"top1_agreement": [0.89, 0.97]}})["verdict"] == "uncertain"


def test_speed_and_memory_gates_compare_with_the_baseline():
    metrics = derived_metrics({"decode_tps": 30.0, "peak_rss_mb": 200.0}, {"decode_tps": 10.0, "peak_rss_mb": 500.0})
    assert metrics["speedup"] == 3.0 and metrics["memory_reduction_pct"] == pytest.approx(60.0)
    verdicts = [check(g, metrics) for g in parse_gates(["speedup>=2", "memory_reduction>=50%", "ttft<=300ms"])]
    assert [v["verdict"] for v in verdicts] == ["pass", "pass", "not measured"] and not passes(verdicts)


def test_the_pareto_front_keeps_what_nothing_beats_on_every_figure():
    from edgequant.reporting.report import pareto_front

    # (kld, size, peak, -speed): b is beaten by a everywhere; c and d trade off; e ties a exactly
    points = [(0.01, 100, 200, -50), (0.02, 110, 210, -40), (0.005, 150, 250, -45), (0.05, 80, 190, -60),
              (0.01, 100, 200, -50)]
    assert pareto_front(points) == [2, 0, 4, 3]
    assert pareto_front([(1.0, 2.0), (2.0, 1.0), (2.0, 2.0)]) == [0, 1]


def test_optimize_ranks_passing_candidates_by_the_objective_then_the_closest_failures():
    from edgequant.decisions.optimize import Candidate, ranked

    def candidate(spec, size, kld, tps, verdicts):
        return Candidate(spec, "test", "measured", metrics={"size_bytes": size, "kld_mean": kld, "decode_tps": tps},
                         verdicts=[{"gate": "g", "verdict": v, "missed_by": 1.0, "bound": 2.0} for v in verdicts])

    small = candidate("small", 80, 0.04, 100, ["pass", "skipped"])  # a stand-in's skipped speed gate does not block
    good = candidate("good", 120, 0.01, 90, ["pass"])
    fast = candidate("fast", 100, 0.03, 150, ["pass"])
    unsure = candidate("unsure", 60, 0.045, 200, ["uncertain"])
    worse = candidate("worse", 50, 0.2, 210, ["fail", "fail"])
    too_big = Candidate("too big", "test", "too big", figures={"size_bytes": 500}, verdicts=[
        {"gate": "size<=120MB", "verdict": "fail", "missed_by": 380.0, "bound": 120.0}])
    pool = [worse, unsure, good, fast, small, too_big]
    assert [c.spec for c in ranked("size", pool)][:3] == ["small", "fast", "good"]
    assert [c.spec for c in ranked("quality", pool)][:3] == ["good", "fast", "small"]
    assert [c.spec for c in ranked("speed", pool)][:3] == ["fast", "small", "good"]
    assert [c.spec for c in ranked("size", pool)][3:] == ["unsure", "too big", "worse"]


def test_optimize_says_when_the_winner_cannot_be_told_from_the_runner_up():
    from edgequant.decisions.optimize import Candidate, _distinguishable

    def candidate(kld_ci, tps_range):
        return Candidate("c", "test", "measured", metrics={"ci95": {"kld_mean": kld_ci}, "decode_tps_range": tps_range})

    winner, close, far = candidate([0.03, 0.04], [90, 110]), candidate([0.035, 0.05], [120, 130]), candidate([0.06, 0.07], [100, 105])
    assert "not distinguishable" in _distinguishable("quality", winner, close)
    assert "do not overlap" in _distinguishable("quality", winner, far)
    assert "not distinguishable" in _distinguishable("speed", winner, far) and _distinguishable("size", winner, far) == ""
