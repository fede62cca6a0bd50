"""The server on the real default model: its own chat template, and cancellation on disconnect."""

import time

import httpx
import openai
import pytest
from serve_helpers import running_server

import edgequant

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server():
    artifact = edgequant.convert(None, "gguf:q4_k_m")
    with running_server(str(artifact.path), "--ctx", "2048") as (base, proc):
        yield base


def generated_tokens(base: str) -> float:
    for line in httpx.get(f"{base}/metrics").text.splitlines():
        if line.startswith("edgequant_generated_tokens_total"):
            return float(line.split()[-1])
    return 0.0


def test_chat_uses_the_models_template_and_answers(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)
    reply = client.chat.completions.create(model="gguf-q4_k_m", temperature=0, max_tokens=40,
                                           messages=[{"role": "user", "content": "Say hello."}])
    assert reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 20  # the template's system prompt was added


def test_client_disconnect_stops_generation(server):
    before = generated_tokens(server)
    body = {"model": "gguf-q4_k_m", "prompt": "Write a very long story:", "max_tokens": 1000, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as response:
        for _ in zip(range(3), response.iter_lines()):
            pass  # read a few events, then hang up
    time.sleep(3)
    # the worker is free again: a short request completes at once and few tokens were spent on the dropped one
    httpx.post(f"{server}/v1/completions", json={"model": "gguf-q4_k_m", "prompt": "Hi", "max_tokens": 2}, timeout=30)
    spent = generated_tokens(server) - before
    assert spent < 500, spent


def test_request_past_the_timeout_gets_504_and_is_cancelled():
    artifact = edgequant.convert(None, "gguf:q4_k_m")
    with running_server(str(artifact.path), "--request-timeout", "1", "--batch", "1") as (base, proc):
        response = httpx.post(f"{base}/v1/completions", timeout=60,
                              json={"model": "gguf-q4_k_m", "prompt": "Write a very long story:", "max_tokens": 1000, "temperature": 0})
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        time.sleep(1)
        metrics = httpx.get(f"{base}/metrics").text
        assert 'edgequant_cancelled_requests_total{model="gguf-q4_k_m"} 1' in metrics
        assert httpx.get(f"{base}/health").status_code == 200
