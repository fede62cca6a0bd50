"""MLX artifacts decode several greedy requests together (mlx-lm's BatchGenerator, backends/mlx/batch.py).

The real engine on the tiny Llama at mlx:8bit (mlx[cpu] off Apple silicon): the worker itself checks
that batched text is the text each request gets alone, that a sampled request (run beside the batch
on the runner's own loop) draws the same tokens with or without company, and that a cancelled
request frees its slot.
"""

import asyncio

import pytest

import edgequant
from edgequant.registry import open_runner
from edgequant.runner import GenerateParams
from edgequant.serving.metrics import Metrics
from edgequant.serving.scheduling import Job, ModelWorker
from serve_helpers import assert_batched_as_alone, collect, metric_value, submit_all, wait_until

pytest.importorskip("mlx_lm", reason="its extra is not installed")

CTX = 256
PROMPTS = [
    "The history of the river",
    "Once upon a time",
    "Rain falls on the hills and " * 6,
    "A",
]


@pytest.fixture(scope="module")
def artifact(tiny_model):
    return edgequant.convert(tiny_model, "mlx:8bit")


@pytest.fixture(scope="module")
def batched(artifact):
    worker = _worker(artifact, batch=4)
    yield worker
    worker.stop()


def _worker(artifact, batch: int) -> ModelWorker:
    return ModelWorker("mlx-8bit", open_runner(artifact.path, n_ctx=CTX, need_logits=False), 8, Metrics(), batch=batch)


def test_the_worker_batches_mlx(batched):
    assert type(batched._decoder).__name__ == "MLXBatchDecoder" and batched.slots == 4


def test_greedy_requests_decoded_together_get_the_text_each_gets_alone(artifact, batched):
    params = [GenerateParams(max_tokens=n) for n in (40, 24, 32, 40)]  # different lengths: slots free at different steps
    # Exact on this model: each prompt is prefilled on its own (never padded beside another), and
    # float32 decode rows of one batch came out as alone; a model where a batched matmul rounds
    # otherwise could part ways at a near tie, which this test would then report.
    assert_batched_as_alone(batched, _worker(artifact, batch=1), PROMPTS, params)  # batch 1: the runner's own loop


def test_a_seeded_sampled_request_draws_the_same_tokens_with_or_without_company(batched):
    sampled = GenerateParams(max_tokens=24, temperature=0.9, top_p=0.9, seed=42)
    alone = asyncio.run(submit_all(batched, PROMPTS[:1], [sampled]))[0][0]
    with_company = asyncio.run(submit_all(batched, PROMPTS, [sampled] + [GenerateParams(max_tokens=24)] * 3))[0][0]
    assert alone == with_company and alone


def test_finish_takes_a_running_request_out_of_the_batch(artifact):
    """The engine side of a cancel: a sequence finished midway leaves the generator's batch, the
    other keeps its tokens, and its slot starts clean."""
    with open_runner(artifact.path, n_ctx=CTX, need_logits=False) as runner:
        decoder = runner.batch_decoder(2, 2 * CTX)
        ids = runner.prompt_ids(PROMPTS[0])
        decoder.start(0, ids, GenerateParams(max_tokens=100))
        decoder.start(1, ids, GenerateParams(max_tokens=100))
        first = [decoder.step() for _ in range(3)]
        assert all(set(tokens) == {0, 1} for tokens in first)
        decoder.finish(0)  # mid-generation, as for a cancelled request
        assert [set(decoder.step()) for _ in range(2)] == [{1}, {1}]
        assert len(decoder._generator.active_batch) == 1
        decoder.finish(1)
        decoder.start(0, ids, GenerateParams(max_tokens=3))  # the slot again: same tokens as the first time
        assert [decoder.step()[0] for _ in range(3)] == [tokens[0] for tokens in first]
        decoder.close()


def test_a_cancelled_request_frees_its_slot(artifact):
    worker = _worker(artifact, batch=2)
    long = GenerateParams(max_tokens=CTX - 16, stop_at_eos=False)
    try:
        async def scenario():
            loop = asyncio.get_running_loop()
            ids = worker.runner.prompt_ids("The history of the river")
            running, cancelled = (Job(ids, long, [], loop, asyncio.Queue()) for _ in range(2))
            worker.submit(running)
            worker.submit(cancelled)
            await cancelled.out.get()
            cancelled.cancelled.set()  # as the app does when a client goes away
            # Both slots were taken: this request can start only in the one the cancel frees.
            after = Job(worker.runner.prompt_ids("Still there"), GenerateParams(max_tokens=4), [], loop, asyncio.Queue())
            worker.submit(after)
            return await asyncio.gather(collect(after), collect(running)), cancelled

        ((text, _, after_done), (_, _, running_done)), cancelled = asyncio.run(scenario())
        wait_until(lambda: worker.in_flight == 0, 60, "the worker to retire every request")
        assert not cancelled.completed
        assert metric_value(worker.metrics.render(), 'edgequant_cancelled_requests_total{model="mlx-8bit"}') == 1
    finally:
        worker.stop()
    assert text and after_done < running_done, "the new request waited for the running one"


