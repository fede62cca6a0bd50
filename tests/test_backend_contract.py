"""The Backend contract, checked for every registered format the same way: what it declares for the
verbs, spec parsing and option validation, then convert on a tiny model, open, and the Runner's
tokenize / logits / generate shapes and the manifest. A new format that passes this shows up in
inspect, bench, the report, eval and serve without edits to those modules."""

from __future__ import annotations

import numpy as np
import pytest

from edgequant.errors import EdgequantError
from edgequant.registry import BASELINE_FORMAT, backends, get_backend, parse_spec
from edgequant.runner import GenerateParams
from edgequant.spec import Spec

FORMATS = sorted(backends())


def _text(value) -> str:
    return ("1" if value else "0") if isinstance(value, bool) else str(value)


@pytest.mark.unit
def test_the_builtin_formats_are_registered():
    assert {"gguf", "onnx", "openvino", "mlx", "qnn", BASELINE_FORMAT} <= set(FORMATS)


@pytest.mark.unit
@pytest.mark.parametrize("fmt", FORMATS)
def test_declares_what_the_verbs_need(fmt):
    backend = get_backend(fmt)
    assert backend.name == fmt and backend.display_name and backend.use_case and backend.extra
    assert backend.precisions and all(p.bits > 0 and p.bpw > 0 for p in backend.precisions.values())
    assert all(o.help and o.name == key for key, o in backend.options.items())
    assert all(set(o.applies_to) <= set(backend.precisions) for o in backend.options.values())
    for text in backend.bench_specs:
        assert parse_spec(text).format == fmt
    assert isinstance(backend.speed_is_representative(), bool)
    assert backend.speed_is_representative() or backend.speed_note  # a stand-in says so in reports


@pytest.mark.unit
@pytest.mark.parametrize("fmt", FORMATS)
def test_every_precision_parses_and_misapplied_options_are_refused(fmt):
    backend = get_backend(fmt)
    for name, precision in backend.precisions.items():
        if precision.needs_imatrix:  # refused without one, before any work
            with pytest.raises(EdgequantError, match="needs an importance matrix"):
                parse_spec(f"{fmt}:{name}")
            continue
        assert parse_spec(f"{fmt}:{name}") == Spec(fmt, name, {})
    with pytest.raises(EdgequantError, match="unknown option"):
        parse_spec(f"{fmt}:{next(iter(backend.precisions))}?no_such_option=1")
    for option in backend.options.values():
        elsewhere = [p for p in backend.precisions if not option.applies(p)]
        if elsewhere:
            with pytest.raises(EdgequantError, match=f"option '{option.name}' does not apply to {fmt}:{elsewhere[0]}"):
                parse_spec(f"{fmt}:{elsewhere[0]}?{option.name}={_text(option.default)}")


def _contract_spec(backend) -> str:
    """The first spec `bench` runs for the format (what a user gets by default), else its first precision."""
    return backend.bench_specs[0] if backend.bench_specs else f"{backend.name}:{next(iter(backend.precisions))}"


@pytest.fixture(scope="module")
def converted(request, tiny_model, onnx_tiny):
    """One artifact per format, from the first tiny model the format accepts."""
    import edgequant
    from edgequant.sources.source import load_source

    cache = {}

    def make(fmt):
        if fmt not in cache:
            backend = get_backend(fmt)
            reason = backend.missing_engine()
            if reason:
                pytest.skip(reason)
            source = _accepted_source(backend, [load_source(tiny_model), load_source(onnx_tiny)])
            cache[fmt] = (edgequant.convert(source.path, _contract_spec(backend)), source)
        return cache[fmt]

    return make


def _accepted_source(backend, sources):
    refusals = []
    for source in sources:
        try:
            backend.check_source(source)
            return source
        except EdgequantError as exc:
            refusals.append(exc.problem)
    pytest.fail(f"{backend.name} refused every tiny model: {refusals}")


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_writes_a_complete_manifest(fmt, converted):
    artifact, source = converted(fmt)
    backend = get_backend(fmt)
    manifest = artifact.manifest
    assert manifest["spec_text"] == _contract_spec(backend) and artifact.spec.format == fmt
    assert manifest["source"]["fingerprint"] == source.fingerprint
    assert manifest["recipe_version"] == backend.recipe_version
    assert artifact.model_path.is_file() and manifest["size_bytes"] >= manifest["model_bytes"] > 0
    assert set(backend.tool_versions()) <= set(manifest["tools"]) and "edgequant" in manifest["tools"]
    assert isinstance(backend.report_notes(manifest["spec_text"], manifest), list)


@pytest.mark.parametrize("fmt", FORMATS)
def test_runner_tokenizes_scores_and_generates(fmt, converted):
    from edgequant.measurement.evaldata import default_eval_text
    from edgequant.registry import open_runner

    artifact, source = converted(fmt)
    vocab = source.config["vocab_size"]
    with open_runner(artifact.path, n_ctx=64, need_logits=True, threads=2) as runner:
        ids = runner.tokenize(default_eval_text()[:400])[:32]
        assert len(ids) == 32 and all(0 <= i < vocab for i in ids)
        assert isinstance(runner.detokenize(ids), str)
        logits = runner.logits(ids)
        assert logits.shape[0] == len(ids) and logits.shape[1] >= vocab and np.isfinite(logits).all()
        params = GenerateParams(max_tokens=4, stop_at_eos=False)
        first = list(runner.generate(ids[:8], params))
        assert len(first) == 4 and all(isinstance(t, int) for t in first)
        assert list(runner.generate(ids[:8], params)) == first  # greedy is deterministic
        filling = (ids * (runner.n_ctx // len(ids) + 1))[:runner.n_ctx - 2]
        assert len(list(runner.generate(filling, GenerateParams(max_tokens=10, stop_at_eos=False)))) == 2  # the room left
        assert list(runner.generate(filling + ids[:2], params)) == []  # a full context generates nothing


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != BASELINE_FORMAT])
def test_speed_probe_loads_the_engine_and_nothing_of_ours(fmt, converted):
    """The probe child measures what an app of that engine would hold: no torch, no transformers."""
    from edgequant.measurement.speed_probe import SpeedRequest, run_in_child

    artifact, _ = converted(fmt)
    prompts = [list(range(10, 26)), list(range(30, 46))]
    result = run_in_child(SpeedRequest(str(artifact.path), prompts, gen_tokens=4, repeats=1, threads=2, n_ctx=64))
    assert result["probe_imported"] == []
    assert 0 < result["interpreter_rss_mb"] < result["peak_rss_mb"]
    assert result["model_rss_mb"] == pytest.approx(result["peak_rss_mb"] - result["interpreter_rss_mb"], abs=0.2)
    assert result["decode_tps_range"][0] <= result["decode_tps"] <= result["decode_tps_range"][1]
