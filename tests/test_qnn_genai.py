"""A graphs=kv QNN artifact run by onnxruntime-genai as a decoder-pipeline model (qnn/genai.py)
generates what edgequant's own KV runner generates."""

import numpy as np
import pytest

import edgequant
from edgequant.runner import GenerateParams

pytest.importorskip("onnx", reason="its extra is not installed")
pytest.importorskip("onnxruntime", reason="its extra is not installed")
og = pytest.importorskip("onnxruntime_genai", reason="its extra is not installed")

AR, CTX, NEW = 8, 64, 16
TEXT = "The old lighthouse keeper climbed the stairs every evening to light the lamp"


@pytest.fixture(scope="module")
def genai_folder(tiny_model):
    artifact = edgequant.convert(tiny_model, f"qnn:w8a16?ar={AR}&ctx={CTX}")  # graphs=kv, the default
    written = artifact.manifest["details"]["genai"]["files"]
    assert "genai_config.json" in written and all((artifact.path / name).is_file() for name in written)
    return artifact.path


def test_genai_pipeline_generates_what_the_kv_runner_generates(genai_folder):
    from edgequant.backends.qnn.runner import KVRunner

    runner = KVRunner(genai_folder, name="qnn-kv", n_ctx=CTX, threads=1)
    prompt = runner.tokenize(TEXT)[:20]
    assert len(prompt) == 20 and len(prompt) % AR  # three prompt windows, the last one padded
    want = list(runner.generate(prompt, GenerateParams(max_tokens=NEW, temperature=0.0)))
    first_logits = runner.logits(prompt)[-1]

    model = og.Model(str(genai_folder))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=CTX)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    np.testing.assert_allclose(np.asarray(generator.get_logits())[0, -1], first_logits, atol=1e-4)
    got = []
    while len(got) < NEW and not generator.is_done():
        generator.generate_next_token()
        got.append(int(generator.get_next_tokens()[0]))
    assert len(want) == NEW and got == want


def test_genai_tokenizer_reads_the_artifact(genai_folder):
    from edgequant.backends.qnn.runner import KVRunner

    runner = KVRunner(genai_folder, name="qnn-kv", n_ctx=CTX, threads=1)
    tokenizer = og.Tokenizer(og.Model(str(genai_folder)))
    assert [int(i) for i in tokenizer.encode(TEXT)] == runner.tokenize(TEXT)
