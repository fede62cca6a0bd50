"""Every format serves: the real server on one artifact per backend, checked against the runner.

test_serve.py covers the API in depth on GGUF; here each other backend must answer a completion
with exactly the tokens its own runner generates, parse special-token text in prompts into ids,
and answer a chat request.
"""

import openai
import pytest

import edgequant
from edgequant.registry import open_runner
from edgequant.runner import GenerateParams
from serve_helpers import running_server

pytest.importorskip("fastapi", reason="its extra is not installed")
pytest.importorskip("uvicorn", reason="its extra is not installed")
pytest.importorskip("onnxruntime_genai", reason="its extra is not installed")
pytest.importorskip("openvino_genai", reason="its extra is not installed")
pytest.importorskip("mlx_lm", reason="its extra is not installed")

PROMPT = "The history of the river</s> begins"  # "</s>" must reach the model as the EOS id


def _artifact(request, spec: str):
    model = request.getfixturevalue("onnx_tiny" if spec.startswith("onnx:") else "tiny_model")
    return edgequant.convert(model, spec)


@pytest.mark.parametrize("spec", ["onnx:int8", "qnn:w8a16?ar=16&ctx=128&samples=2", "openvino:int8", "mlx:8bit"])
def test_each_format_serves_what_its_runner_generates(request, spec):
    artifact = _artifact(request, spec)
    with open_runner(artifact.path, n_ctx=256) as runner:
        prompt_ids = runner.tokenize(PROMPT, special=True)
        assert len(prompt_ids) < len(runner.tokenize(PROMPT)), "special-token text was not parsed"
        expected = runner.detokenize(list(runner.generate(prompt_ids, GenerateParams(max_tokens=8, stop_at_eos=False))))

    with running_server(str(artifact.path), "--ctx", "256") as (base, _proc):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        answer = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
        assert answer.usage.prompt_tokens == len(prompt_ids)
        if answer.choices[0].finish_reason == "length":  # an early EOS is fine; then the text is a prefix
            assert answer.choices[0].text == expected
        else:
            assert expected.startswith(answer.choices[0].text)
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello"}],
                                              max_tokens=4, temperature=0)
        assert chat.usage.completion_tokens >= 1 and chat.choices[0].message.role == "assistant"
