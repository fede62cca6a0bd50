"""The GGUF batch decoder (backends/gguf/batch.py) on the real llama.cpp: sequences that join and
leave a running batch answer as each does alone, exactly with a cache stream per sequence (the
server's default cache), and for their first tokens with one unified stream (a `--cache-tokens`
bound), where llama.cpp's results depend on the batch by rounding.

The server side (slots, cancellation, 429s, metrics) is tested on GGUF in test_serve.py.
"""

import pytest

import edgequant
from edgequant.registry import open_runner
from edgequant.runner import GenerateParams
from serve_helpers import UNEVEN_PROMPTS as PROMPTS
from serve_helpers import drive_decoder

pytest.importorskip("llama_cpp", reason="its extra is not installed")

CTX = 256


@pytest.fixture(scope="module")
def artifact(tiny_model):
    return edgequant.convert(tiny_model, "gguf:q8_0")


def _together_and_alone(artifact, cache: int) -> tuple[dict, dict]:
    """Sequences start while others decode and end at different steps, the first to end holding a
    stream before the last one (whose cache then moves into it): each one's tokens, and its tokens
    decoded alone. Greedy but one, which samples with a seed."""
    sampled = GenerateParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=42)
    with open_runner(artifact.path, n_ctx=CTX, need_logits=False) as runner:
        prompts = [runner.prompt_ids(text) for text in PROMPTS]
        plan = {0: (prompts[0], GenerateParams(max_tokens=30), 0), 1: (prompts[1], GenerateParams(max_tokens=6), 0),
                2: (prompts[2], sampled, 2), 3: (prompts[3], GenerateParams(max_tokens=24), 9)}
        decoder = runner.batch_decoder(4, cache)
        try:
            together = drive_decoder(decoder, plan)
            alone = {seq_id: drive_decoder(decoder, {seq_id: (prompt, params, 0)})[seq_id]
                     for seq_id, (prompt, params, _) in plan.items()}
        finally:
            decoder.close()
    return together, alone


def test_with_a_stream_per_sequence_batched_tokens_equal_each_sequence_alone(artifact):
    together, alone = _together_and_alone(artifact, 4 * CTX)  # each sequence's share holds a whole context
    assert together == alone


def test_in_one_unified_stream_batched_tokens_start_as_each_sequence_alone(artifact):
    """In one stream all the batch's queries go through one attention product, whose kernel and
    summation order depend on how many rows it has: the logits differ from a sequence's alone by
    rounding, and a tiny random model's near-tied greedy picks drift apart after some tokens
    (measured: after 7 to 21 of them; nothing leaks between sequences, or they would differ at once)."""
    together, alone = _together_and_alone(artifact, 2 * CTX)  # a share of half a context: unified
    assert all(together[s][:6] == alone[s][:6] for s in alone), (together, alone)
