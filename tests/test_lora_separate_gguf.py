"""`gguf:PREC?lora=separate`: the base model converted, the LoRA adapter beside it as adapter.gguf,
applied by llama.cpp to every context the GGUF runner creates (generation, scoring, the server's
batch decoder).

The adapter is random and non-zero, written in PEFT's layout straight from tensors (no training),
so its effect is large: the checks tell base + adapter from the base alone. llama.cpp applying it
at run time and edgequant merging it into the float weights are two implementations of the same
`W + (alpha / r) B A`: on f32 they must agree to float rounding.
"""

from __future__ import annotations

import filecmp

import numpy as np
import pytest

import edgequant
from edgequant.adaptation.merge import adapted_model
from edgequant.errors import EdgequantError
from edgequant.measurement.settings import EvalConfig
from edgequant.registry import open_runner
from edgequant.runner import GenerateParams
from lora_adapters import decode_together, projections
from lora_adapters import write_random_adapter as random_adapter

QUICK = EvalConfig(ctx=64, windows=2, speed=False)
IDS = [1, 45, 300, 17, 99, 250, 3, 480, 12, 77, 301, 5, 260, 33, 140, 8]
GREEDY = GenerateParams(max_tokens=12, temperature=0.0, stop_at_eos=False)
MODULES = projections(512)  # the tiny Llama's (tests/conftest.py)


def write_random_adapter(out, base, **options):
    """A PEFT LoRA folder for the tiny Llama with random non-zero A and B on every projection."""
    return random_adapter(out, base, MODULES, **options)


@pytest.fixture(scope="module")
def merged(tiny_model, tmp_path_factory):
    """The tiny Llama with a random adapter merged in (what `--adapter` hands every command)."""
    return adapted_model(tiny_model, write_random_adapter(tmp_path_factory.mktemp("lora") / "adapter", tiny_model))


@pytest.fixture(scope="module")
def f32_pair(merged):
    return edgequant.convert(merged, "gguf:f32?lora=separate"), edgequant.convert(merged, "gguf:f32")


def _logits(artifact) -> np.ndarray:
    with open_runner(artifact.path, n_ctx=64, need_logits=True) as runner:
        return runner.logits(IDS)


def _exact_logits(artifact) -> np.ndarray:
    """Logits through a context with a float32 KV cache and no flash attention: no f16 rounding
    of K and V, which moves logits by up to ~1e-3 between two ways of computing the same K."""
    import llama_cpp

    from edgequant.backends.gguf.lora import LoadedAdapter, adapter_file
    from edgequant.backends.gguf.tools import silence_llama_logs

    silence_llama_logs()
    model = llama_cpp.llama_model_load_from_file(str(artifact.model_path).encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = 64
    params.type_k = params.type_v = 0  # GGML_TYPE_F32
    params.flash_attn_type = 0  # disabled
    ctx = llama_cpp.llama_init_from_model(model, params)
    lora = LoadedAdapter(model, adapter_file(artifact)) if adapter_file(artifact) else None
    batch = llama_cpp.llama_batch_init(len(IDS), 0, 1)
    try:
        if lora:
            lora.apply(ctx)
        for j, token in enumerate(IDS):
            batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = token, j, 1, True
            batch.seq_id[j][0] = 0
        batch.n_tokens = len(IDS)
        assert llama_cpp.llama_decode(ctx, batch) == 0
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(ctx), shape=(len(IDS), 512)).copy()
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
        if lora:
            lora.free()
        llama_cpp.llama_model_free(model)


def test_base_plus_adapter_matches_the_merged_model(f32_pair, merged, tiny_gguf_f32):
    separate, merged_f32 = f32_pair
    assert (separate.path / "adapter.gguf").is_file() and separate.path != merged_f32.path
    assert filecmp.cmp(separate.model_path, tiny_gguf_f32.model_path, shallow=False)  # the base, converted as gguf:f32 is
    lora = separate.manifest["details"]["adapter"]
    assert lora["file"] == "adapter.gguf" and lora["type"] == "f32" and lora["scale"] == 1.0 and lora["factor"] == 2.0
    assert separate.manifest["source"]["path"] == str(merged)  # evaluation's baseline: the adapted float model
    exact = np.abs(_exact_logits(separate) - _exact_logits(merged_f32)).max()
    assert exact < 1e-4, exact  # measured 5e-6: the adapter's scale is applied once, exactly
    got, want, base = _logits(separate), _logits(merged_f32), _logits(tiny_gguf_f32)
    assert np.abs(got - want).max() < 3e-3, np.abs(got - want).max()  # the runner's f16 KV cache: measured 8.5e-4
    assert np.abs(base - want).max() > 0.1  # the adapter matters
    for artifact in (separate, merged_f32):
        metrics = edgequant.evaluate(artifact.path, config=QUICK)
        assert metrics["kld_mean"] < 1e-4 and metrics["top1_agreement"] >= 0.95, (artifact.spec, metrics)  # measured 3e-7


def test_the_batch_decoder_of_the_server_applies_the_adapter(f32_pair, tiny_gguf_f32):
    prompts = [IDS[2:9], IDS[10:]]  # greedy steps won by 0.05 and 0.1 or more: no near-tie the f16 KV cache could flip

    def batched(artifact) -> list[list[int]]:
        with open_runner(artifact.path, n_ctx=64, need_logits=False) as runner:
            together = decode_together(runner, prompts, GREEDY)
            alone = list(runner.generate(prompts[0], GREEDY))
        assert alone == together[0]  # the generation context has the adapter too
        return together

    separate, merged_f32 = f32_pair
    assert batched(separate) == batched(merged_f32) != batched(tiny_gguf_f32)


def test_a_quantized_base_with_its_adapter_converts_and_generates(merged):
    artifact = edgequant.convert(merged, "gguf:q8_0?lora=separate")
    assert {"model.gguf", "adapter.gguf"} <= {p.name for p in artifact.path.iterdir()}
    assert artifact.manifest["details"]["adapter"]["type"] == "f16"
    assert set(artifact.manifest["details"]["tensor_types"].values()) >= {"q8_0"}
    with open_runner(artifact.path, n_ctx=64, need_logits=False) as runner:
        tokens = list(runner.generate(IDS[:6], GREEDY))
        assert len(tokens) == GREEDY.max_tokens and runner.detokenize(tokens)
    metrics = edgequant.evaluate(artifact.path, config=QUICK)
    assert metrics["kld_mean"] < 0.01, metrics


def test_rslora_and_per_module_alpha_are_applied_as_peft_applies_them(tiny_model, tmp_path):
    adapter = write_random_adapter(tmp_path / "rslora", tiny_model, seed=1, use_rslora=True, alpha_pattern={"down_proj": 2})
    merged = adapted_model(tiny_model, adapter)
    separate = edgequant.convert(merged, "gguf:f32?lora=separate")
    assert separate.manifest["details"]["adapter"]["rescaled"] is True
    got, want = _exact_logits(separate), _exact_logits(edgequant.convert(merged, "gguf:f32"))
    assert np.abs(got - want).max() < 1e-4, np.abs(got - want).max()  # rsLoRA at r = 4: twice the plain alpha / r


def test_an_adapter_for_another_base_is_refused_when_loaded(f32_pair, onnx_tiny):
    from edgequant.backends.gguf.lora import AdapterFile
    from edgequant.backends.gguf.runner import LlamaRunner

    other = edgequant.convert(onnx_tiny, "gguf:f32")  # its MLP is 768 wide, the adapter's base 512
    with pytest.raises(EdgequantError, match="llama.cpp refused the LoRA adapter") as refused:
        LlamaRunner(other.model_path, name="other", n_ctx=64, logits_all=True, threads=1,
                    adapter=AdapterFile(f32_pair[0].path / "adapter.gguf"))
    assert "ffn" in refused.value.problem


def test_separate_without_an_adapter_is_refused(cli, tiny_model):
    with pytest.raises(EdgequantError, match="has no adapter merged into it"):
        edgequant.convert(tiny_model, "gguf:q8_0?lora=separate")
    done = cli("convert", str(tiny_model), "--to", "gguf:q8_0?lora=separate")
    assert done.returncode == 2 and "--adapter" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_the_merge_keeps_the_adapter_so_its_first_folder_may_go(tiny_model, tmp_path):
    import shutil

    adapter = write_random_adapter(tmp_path / "adapter", tiny_model, rank=2)
    merged = adapted_model(tiny_model, adapter)
    shutil.rmtree(adapter)  # e.g. a download folder cleaned up after `convert --adapter`
    artifact = edgequant.convert(merged, "gguf:q8_0?lora=separate", output=tmp_path / "out")
    assert (artifact.path / "adapter.gguf").is_file()


# -- one base, an adapter per request (`serve NAME=ARTIFACT ...`) --------------------------------------

PROMPTS = ["Once upon a time", "The capital of"]


@pytest.fixture(scope="module")
def two_tasks(tiny_model, f32_pair, tiny_gguf_f32, tmp_path_factory):
    """Two adapters' separate artifacts on one base, and the base itself: three names, one model.gguf."""
    other = adapted_model(tiny_model, write_random_adapter(tmp_path_factory.mktemp("lora2") / "adapter", tiny_model, seed=3))
    return {"task_a": f32_pair[0], "task_b": edgequant.convert(other, "gguf:f32?lora=separate"), "base": tiny_gguf_f32}


def _alone(artifact, prompt: str) -> str:
    """The greedy answer of the artifact's own runner, by itself (what the server must give)."""
    with open_runner(artifact.path, n_ctx=128, need_logits=False) as runner:
        tokens = runner.generate(runner.prompt_ids(prompt), GenerateParams(max_tokens=12))
        return runner.detokenize([t for t in tokens if not runner.is_eos(t)])


def test_one_loaded_base_decodes_each_request_with_its_own_adapter(two_tasks):
    """Requests naming three artifacts of one base, batched together: each gets its artifact's answer."""
    import asyncio

    from edgequant.registry import open_shared_runner, serving_groups
    from edgequant.serving.metrics import Metrics
    from edgequant.serving.scheduling import ModelWorker
    from serve_helpers import submit_all

    paths = [a.path for a in two_tasks.values()]
    assert serving_groups(paths + [None]) == [[0, 1, 2], [3]]  # None: the default model, not an artifact
    want = {name: [_alone(a, p) for p in PROMPTS] for name, a in two_tasks.items()}
    assert len({tuple(texts) for texts in want.values()}) == 3  # each adapter changes the answers
    runner = open_shared_runner(dict(zip(two_tasks, paths)), n_ctx=128)
    worker = ModelWorker("shared", runner, 16, Metrics(), batch=6, adapters=tuple(two_tasks))
    try:
        requests = [(name, prompt) for prompt in PROMPTS for name in two_tasks]
        params = [GenerateParams(max_tokens=12, adapter=name) for name, _ in requests]
        got = asyncio.run(submit_all(worker, [prompt for _, prompt in requests], params))
    finally:
        worker.stop()
    assert [c.text for c in got] == [want[name][PROMPTS.index(prompt)] for name, prompt in requests]
    assert max(c.first for c in got) < min(c.last for c in got), "the requests did not overlap: nothing was batched"


def test_serve_names_each_artifact_and_loads_their_base_once(two_tasks, cli):
    import httpx

    from serve_helpers import running_server, scrape

    args = [f"{name}={artifact.path}" for name, artifact in two_tasks.items()]
    with running_server(*args, "--batch", "4", "--ctx", "128") as (base, proc):
        assert sorted(m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]) == sorted(two_tasks)
        for name, artifact in two_tasks.items():
            body = {"model": name, "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}
            answer = httpx.post(f"{base}/v1/completions", json=body, timeout=60).json()
            assert answer["model"] == name and answer["choices"][0]["text"] == _alone(artifact, PROMPTS[0])
        assert scrape(base, 'edgequant_batch_slots{model="task_a+task_b+base"}') == 4  # one worker for the three
    done = cli("serve", str(two_tasks["task_a"].path), str(two_tasks["task_b"].path))  # both folders: gguf-f32-loraseparate
    assert done.returncode == 2 and "NAME=FOLDER" in done.stderr and "Traceback" not in done.stderr, done.stderr
