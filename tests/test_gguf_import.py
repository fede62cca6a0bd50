"""Importing a GGUF another producer wrote: llama.cpp's own converter writes one from a tiny float
model, and the import must give back that model (its logits) and its tokenizer (its ids, and a
`tokenizer.model` the converter can read again). Special tokens follow the model's metadata."""

import json
import shutil

import numpy as np
import pytest

import edgequant
from edgequant.measurement.evaldata import default_eval_text
from edgequant.measurement.logprobs import kl_divergence, log_softmax
from edgequant.registry import open_runner

pytest.importorskip("torch", reason="its extra is not installed")
pytest.importorskip("llama_cpp", reason="its extra is not installed")
from tiny_archs import ARCHITECTURES, SLIDING  # noqa: E402


@pytest.fixture(scope="module")
def tiny_gemma3(tiny_model, tmp_path_factory):
    from tiny_archs import build

    return build("gemma3", tiny_model, tmp_path_factory.mktemp("gemma3") / "model")


def _as_their_gguf(hf_dir, tmp_path):
    """The float model as llama.cpp's converter writes it, handed over as a user's own file."""
    theirs = tmp_path / "theirs.gguf"
    shutil.copyfile(edgequant.convert(hf_dir, "gguf:f32").model_path, theirs)
    return edgequant.load_source(theirs)


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_an_imported_gguf_is_the_model_it_was_written_from(arch, tiny_model, tiny_gemma3, tmp_path):
    """Every architecture of the matrix: llama.cpp's converter writes it, the import must give it back."""
    from transformers import AutoTokenizer

    from tiny_archs import build

    original = tiny_gemma3 if arch == "gemma3" else build(arch, tiny_model, tmp_path / "model")
    source = _as_their_gguf(original, tmp_path)
    text = default_eval_text()[:3000]
    want = AutoTokenizer.from_pretrained(original)(text, add_special_tokens=False).input_ids
    assert AutoTokenizer.from_pretrained(source.hf_dir)(text, add_special_tokens=False).input_ids == want
    assert (source.hf_dir / "tokenizer.model").is_file()  # what llama.cpp's converter reads to go back to GGUF
    # llama.cpp's GGUF has no sliding window for Mistral (a limitation the backends record): past the
    # window the file itself is another model, so the import is compared within it
    ids = want[:SLIDING] if arch == "mistral" else want[:128]
    with open_runner(original, n_ctx=128) as ours, open_runner(source.path, n_ctx=128) as imported:
        kld = kl_divergence(log_softmax(ours.logits(ids)), log_softmax(imported.logits(ids)))
    assert float(np.mean(kld)) < 1e-4, arch  # Gemma: norms stored as w + 1, scaled embedding, query scale;
    # Phi-3: fused qkv and gate_up split back; Qwen: biases and q/k norms


def test_the_round_trip_closes_a_gguf_source_converts_back_to_gguf(tiny_gemma3, tmp_path):
    source = _as_their_gguf(tiny_gemma3, tmp_path)
    artifact = edgequant.convert(source.path, "gguf:q8_0")
    metrics = edgequant.evaluate(artifact.path, config=edgequant.EvalConfig(ctx=64, windows=2, speed=False))
    assert metrics["kld_mean"] < 0.01 and metrics["top1_agreement"] > 0.9


def test_a_model_that_adds_bos_gets_it_in_evaluation_prompts_and_every_runner(tiny_model, tmp_path):
    model = tmp_path / "bos-model"
    shutil.copytree(tiny_model, model)
    config_path = model / "tokenizer_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "add_bos_token": True}))
    config = edgequant.EvalConfig(ctx=64, windows=2, speed=False)
    metrics = edgequant.evaluate(model, config=config)
    assert metrics["tokens_scored"] == 2 * 63
    from edgequant.measurement.evaluation import _eval_text, _make_windows

    windows = _make_windows(edgequant.load_source(model), config, *_eval_text(config))
    assert list(windows.ids[:, 0]) == [1, 1]  # each window starts with BOS, as llama.cpp's perplexity does
    artifact = edgequant.convert(model, "gguf:q8_0")
    for path in (model, artifact.path):
        with open_runner(path, n_ctx=64) as runner:
            assert runner.prompt_ids("Hello")[0] == 1 and runner.prompt_ids("Hello")[1:] == runner.tokenize("Hello")
    with open_runner(tiny_model, n_ctx=64) as plain:  # the tiny model's own tokenizer adds none
        assert plain.prompt_ids("Hello") == plain.tokenize("Hello")


def test_a_tied_output_layer_is_found_where_the_config_leaves_it_unsaid(tiny_model, tiny_gemma3):
    """Gemma-3's config.json omits tie_word_embeddings (its class default): the size estimate must
    still count the embedding at the output layer's type (inspect was 30-110% off on Gemma-3-270M)."""
    from edgequant.registry import get_backend

    gemma, llama = edgequant.load_source(tiny_gemma3), edgequant.load_source(tiny_model)
    assert "tie_word_embeddings" not in gemma.config and gemma.tied_embeddings and not llama.tied_embeddings
    built = edgequant.convert(tiny_gemma3, "gguf:q4_k_m").size_bytes
    estimate = get_backend("gguf").estimated_bytes("q4_k_m", gemma.tensors, gemma.tied_embeddings)
    assert abs(estimate / built - 1) < 0.15, (estimate, built)


def test_an_imported_folder_loads_without_transformers_false_regex_alarm(tiny_gemma3, tmp_path, capfd):
    """transformers 4.57.3+ tells every folder its own version saved that its tokenizer has "an
    incorrect regex pattern" (a check meant for Mistral's); users saw it on every Gemma run."""
    from edgequant.sources.auto_tokenizer import auto_tokenizer

    source = _as_their_gguf(tiny_gemma3, tmp_path)
    capfd.readouterr()
    tokenizer = auto_tokenizer(source.hf_dir)
    assert "incorrect regex" not in capfd.readouterr().err
    assert tokenizer("The capital of France", add_special_tokens=False).input_ids
