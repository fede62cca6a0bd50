"""The GGUF backend on the tiny model: real converter, real llama_model_quantize, real llama.cpp."""

import json
import shutil

import numpy as np
import pytest

import edgequant
from edgequant.errors import EdgequantError

pytest.importorskip("gguf", reason="its extra is not installed")
pytest.importorskip("llama_cpp", reason="its extra is not installed")
from gguf import GGMLQuantizationType, GGUFReader  # noqa: E402
from gguf.quants import quantize as reference_quantize  # noqa: E402


def tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


@pytest.mark.parametrize("precision, expected", [("f16", "F16"), ("q8_0", "Q8_0"), ("q4_0", "Q4_0"), ("q4_k_m", "Q4_K"),
                                                 ("q2_k", "Q2_K"), ("iq4_nl", "IQ4_NL"), ("tq1_0", "TQ1_0")])
def test_quantized_gguf_has_expected_architecture_and_types(tiny_model, precision, expected):
    artifact = edgequant.convert(tiny_model, f"gguf:{precision}")
    reader = GGUFReader(artifact.model_path)
    assert reader.fields["general.architecture"].contents() == "llama"
    types = tensor_types(artifact.model_path)
    assert types["blk.0.attn_q.weight"] == expected
    assert types["blk.0.attn_norm.weight"] == "F32"  # 1-D tensors are never quantized
    manifest = json.loads((artifact.path / "edgequant.json").read_text())
    assert manifest["spec"] == {"format": "gguf", "precision": precision, "options": {}}
    assert manifest["source"]["fingerprint"] == edgequant.load_source(tiny_model).fingerprint
    assert manifest["size_bytes"] >= artifact.model_path.stat().st_size
    assert "llama-cpp-python" in manifest["tools"]


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0])
def test_blocks_are_byte_identical_to_gguf_py_reference(tiny_model, tiny_gguf_f32, qtype):
    artifact = edgequant.convert(tiny_model, f"gguf:{qtype.name.lower()}")
    name = "blk.1.ffn_up.weight"
    source = next(t for t in GGUFReader(tiny_gguf_f32.model_path).tensors if t.name == name)
    quantized = next(t for t in GGUFReader(artifact.model_path).tensors if t.name == name)
    assert quantized.tensor_type == qtype
    expected = reference_quantize(np.asarray(source.data, dtype=np.float32), qtype)
    assert np.asarray(quantized.data).tobytes() == expected.tobytes()


def test_same_spec_is_a_cache_hit_and_force_rebuilds(tiny_model):
    first = edgequant.convert(tiny_model, "gguf:q5_0")
    created = first.manifest["created"]
    mtime = first.model_path.stat().st_mtime_ns
    again = edgequant.convert(tiny_model, "gguf:q5_0")
    assert again.path == first.path and again.model_path.stat().st_mtime_ns == mtime
    rebuilt = edgequant.convert(tiny_model, "gguf:q5_0", force=True)
    assert rebuilt.model_path.stat().st_mtime_ns != mtime or rebuilt.manifest["created"] != created


def test_float_intermediate_is_converted_once_and_reused(tiny_model, edgequant_home):
    edgequant.convert(tiny_model, "gguf:q6_k")
    edgequant.convert(tiny_model, "gguf:q5_k_m")
    intermediates = list((edgequant_home / "intermediates").glob("*/model-*.gguf"))  # float GGUFs, not imatrices
    fingerprint = edgequant.load_source(tiny_model).fingerprint[:16]
    assert len([p for p in intermediates if fingerprint in str(p)]) == 1


def test_types_needing_an_imatrix_are_refused_cleanly(tiny_model, tmp_path):
    out = tmp_path / "iq2"
    with pytest.raises(EdgequantError, match="importance matrix"):
        edgequant.convert(tiny_model, "gguf:iq2_xxs", output=out)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unsupported_architecture_leaves_nothing_behind(tiny_model, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_model, odd)
    config = json.loads((odd / "config.json").read_text())
    config["architectures"] = ["MadeUpForCausalLM"]
    (odd / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out" / "odd-q4"
    with pytest.raises(EdgequantError, match="MadeUpForCausalLM") as err:
        edgequant.convert(odd, "gguf:q4_0", output=out)
    assert "LlamaForCausalLM" in err.value.fix
    assert not out.exists() and not [p for p in out.parent.iterdir()]


def test_output_that_is_another_folder_is_not_overwritten(tiny_model, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(EdgequantError, match="holds something else"):
        edgequant.convert(tiny_model, "gguf:q8_0", output=out)
    assert (out / "keep.txt").read_text() == "mine"


def test_artifact_generates_in_llama_cpp(tiny_model):
    from edgequant.registry import open_runner
    from edgequant.runner import GenerateParams

    artifact = edgequant.convert(tiny_model, "gguf:q8_0")
    with open_runner(artifact.path, n_ctx=128, need_logits=False) as runner:
        prompt = runner.tokenize("The history of")
        first = list(runner.generate(prompt, GenerateParams(max_tokens=8, stop_at_eos=False)))
        second = list(runner.generate(prompt, GenerateParams(max_tokens=8, stop_at_eos=False)))
    assert len(first) == 8 and first == second  # greedy decoding is deterministic


def test_artifacts_of_an_older_recipe_are_rebuilt(tiny_model):
    from edgequant.registry import get_backend

    first = edgequant.convert(tiny_model, "gguf:q4_1")
    backend = get_backend("gguf")
    backend.recipe_version += 1
    try:
        rebuilt = edgequant.convert(tiny_model, "gguf:q4_1")
    finally:
        backend.recipe_version -= 1
    assert rebuilt.manifest["recipe_version"] == first.manifest["recipe_version"] + 1
    assert rebuilt.manifest["created"] >= first.manifest["created"]


def test_an_unknown_bpe_pre_tokenizer_is_refused_with_the_converters_log_kept(tiny_model, tmp_path):
    """A byte-level BPE tokenizer llama.cpp's converter has never seen: the error says why and
    where the converter's log is, and that log outlives the failed conversion's temp folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from edgequant.measurement.evaldata import default_eval_text

    model = tmp_path / "unknown-bpe"
    shutil.copytree(tiny_model, model, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens*"))
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.train_from_iterator([default_eval_text()[:50_000]], trainers.BpeTrainer(vocab_size=512, special_tokens=["<s>", "</s>"],
                                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>").save_pretrained(model)
    with pytest.raises(EdgequantError, match="pre-tokenizer") as err:
        edgequant.convert(model, "gguf:q8_0")
    log = err.value.fix.rsplit(": ", 1)[1]
    assert "pre-tokenizer" in open(log).read()


def test_a_conversion_that_will_not_fit_in_memory_is_refused_before_any_work(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEQUANT_MEMORY_LIMIT", "200MB")  # below the engine's own measured 0.55 GB
    out = tmp_path / "q5"
    with pytest.raises(EdgequantError, match="needs about 0.6 GB") as err:
        edgequant.convert(tiny_model, "gguf:q5_0", out)
    assert "EDGEQUANT_MEMORY_LIMIT is 0.2 GB" in err.value.problem and "--force" in err.value.fix
    assert not out.exists()
    assert edgequant.convert(tiny_model, "gguf:q5_0", out, force=True).path == out.resolve()
