"""The real embedded default model (SmolLM2-135M-Instruct): quality, sizes and types per precision."""

import json

import pytest

import edgequant
from edgequant.measurement.settings import EvalConfig

pytest.importorskip("gguf", reason="its extra is not installed")
pytest.importorskip("llama_cpp", reason="its extra is not installed")
from gguf import GGUFReader  # noqa: E402

pytestmark = pytest.mark.slow

LADDER = ["f16", "q8_0", "q4_k_m", "q3_k_m", "q2_k"]
FTYPE = {"f16": 1, "q8_0": 7, "q4_k_m": 15, "q3_k_m": 12, "q2_k": 10}


@pytest.fixture(scope="module")
def ladder():
    config = EvalConfig(ctx=512, windows=4, speed=False)
    results = {}
    for precision in LADDER:
        artifact = edgequant.convert(None, f"gguf:{precision}")
        results[precision] = (artifact, edgequant.evaluate(artifact.path, config=config))
    return results


def test_float16_and_q8_0_stay_close_to_the_pytorch_baseline(ladder):
    assert abs(ladder["f16"][1]["ppl_increase_pct"]) < 0.5
    assert abs(ladder["q8_0"][1]["ppl_increase_pct"]) < 1.0


def test_fewer_bits_cost_more_quality(ladder):
    ppl = [ladder[p][1]["perplexity"] for p in LADDER[1:]]
    assert ppl == sorted(ppl) and len(set(ppl)) == len(ppl), ppl
    kld = [ladder[p][1]["kld_mean"] for p in LADDER]
    assert kld == sorted(kld), kld


def test_file_sizes_follow_the_bits_and_match_the_estimates(ladder):
    sizes = [ladder[p][0].model_path.stat().st_size for p in LADDER]
    assert sizes == sorted(sizes, reverse=True), sizes
    estimates = edgequant.inspect_model()["estimated_bytes"]
    for precision, size in zip(LADDER, sizes):
        assert abs(estimates[f"gguf:{precision}"] / size - 1) < 0.1, precision


def test_every_output_is_a_llama_gguf_of_the_requested_type(ladder):
    for precision in LADDER:
        reader = GGUFReader(ladder[precision][0].model_path)
        assert reader.fields["general.architecture"].contents() == "llama"
        assert reader.fields["general.file_type"].contents() == FTYPE[precision]
        assert reader.fields["tokenizer.ggml.pre"].contents() == "smollm"
        types = {t.tensor_type.name for t in reader.tensors}
        assert "F32" in types and len(types) >= 2


def test_import_keeps_the_original_tokenizer(ladder):
    """The dequantized import must tokenize exactly like llama.cpp on the original Q4_1 file."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from edgequant.measurement.evaldata import default_eval_text

    source = edgequant.load_source()
    text = default_eval_text()[:20000]
    original = Llama(str(source.path), n_ctx=64, verbose=False, vocab_only=True)
    hf = AutoTokenizer.from_pretrained(source.hf_dir)
    assert hf(text, add_special_tokens=False).input_ids == original.tokenize(text.encode(), add_bos=False)
    assert hf.eos_token == "<|im_end|>" and not hf("hi").input_ids[0] == hf.bos_token_id


def test_imported_model_answers_sensibly():
    from edgequant.registry import open_runner
    from edgequant.runner import GenerateParams

    with open_runner(None, n_ctx=64) as runner:
        ids = list(runner.generate(runner.tokenize("The capital of France is"), GenerateParams(max_tokens=4)))
        assert "Paris" in runner.detokenize(ids)


def test_cli_convert_and_eval_on_the_default_model(cli, tmp_path):
    out = tmp_path / "q4"
    assert cli("convert", "--to", "gguf:q4_k_m", "-o", str(out)).returncode == 0
    result = cli("eval", str(out), "--windows", "2", "--repeats", "2", "--json")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert 0 < metrics["ppl_increase_pct"] < 25
    assert metrics["decode_tps"] > 0 and metrics["ttft_ms"] > 0
    assert metrics["peak_rss_mb"] < 1500  # a ~100 MB model in llama.cpp, measured in its own process
