"""`onnx:PREC?lora=separate`: the base model's graph with zero-default LoRA branches, the adapter beside
it as adapter.onnx_adapter, applied by onnxruntime (the scorer's runs, the server's batch decoder) and
by onnxruntime-genai (generation).

The adapter is random and non-zero, written in PEFT's layout straight from tensors (no training), on
the ONNX tiny model (its MLP is 768 wide), with one module at its own alpha and one at a lower rank.
The builder applies PEFT's factors itself, edgequant's merge applies them its own way: on fp32 the
two must agree to float rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

import edgequant
from edgequant.adaptation.merge import adapted_model
from edgequant.registry import open_runner
from edgequant.runner import GenerateParams
from lora_adapters import assert_served_with_their_adapters, projections
from lora_adapters import write_random_adapter as random_adapter

IDS = [1, 45, 300, 17, 99, 250, 3, 480, 12, 77, 301, 5, 260, 33, 140, 8]
GREEDY = GenerateParams(max_tokens=10, temperature=0.0, stop_at_eos=False)
MODULES = projections(768)  # the ONNX tiny model's (tests/conftest.py)
RANKS = {"v_proj": 2}  # rank_pattern: v_proj at a lower rank than r = 4


def write_random_adapter(out, base):
    """A PEFT LoRA folder for the ONNX tiny model: random non-zero A and B on every projection,
    alpha 8 at rank 4 (down_proj at alpha 16, v_proj at rank 2)."""
    return random_adapter(out, base, MODULES, rank_pattern=RANKS, alpha_pattern={"down_proj": 16})


@pytest.fixture(scope="module")
def merged(onnx_tiny, tmp_path_factory):
    """The ONNX tiny model with a random adapter merged in (what `--adapter` hands every command)."""
    return adapted_model(onnx_tiny, write_random_adapter(tmp_path_factory.mktemp("lora") / "adapter", onnx_tiny))


def _logits(artifact) -> np.ndarray:
    with open_runner(artifact.path, n_ctx=64) as runner:
        return runner.logits(IDS)


def _graph_alone(artifact) -> np.ndarray:
    """The separate artifact's graph run with no adapter: its LoRA weights at their zero defaults."""
    from edgequant.backends._shared.ort import cpu_session
    from edgequant.backends.onnx.tools import kv_feeds

    session = cpu_session(artifact.path / "model.onnx", 1)
    feeds = {"input_ids": np.asarray([IDS], np.int64), "attention_mask": np.ones((1, len(IDS)), np.int64),
             "position_ids": np.arange(len(IDS), dtype=np.int64)[None], **kv_feeds(session.get_inputs())}
    names = {item.name for item in session.get_inputs()}
    return np.asarray(session.run(["logits"], {k: v for k, v in feeds.items() if k in names})[0][0], np.float32)


def test_fp32_base_plus_adapter_matches_the_merged_model(merged, onnx_tiny):
    separate = edgequant.convert(merged, "onnx:fp32?lora=separate")
    adapter = separate.manifest["details"]["adapter"]
    assert adapter["file"] == "adapter.onnx_adapter" and adapter["format"] == "onnx_adapter" and adapter["rank"] == 4
    assert adapter["scale"] == 1.0 and adapter["factor"] == 2.0 and adapter["branches"] == 14
    assert adapter["fingerprint"] == separate.manifest["source"]["adaptation"]["adapter"]["fingerprint"]
    assert separate.manifest["source"]["path"] == str(merged)  # evaluation's baseline: the adapted float model
    ours, want = _logits(separate), _logits(edgequant.convert(merged, "onnx:fp32"))
    assert np.abs(ours - want).max() < 1e-4, np.abs(ours - want).max()  # measured 3e-6
    base, alone = _logits(edgequant.convert(onnx_tiny, "onnx:fp32")), _graph_alone(separate)
    assert np.abs(alone - base).max() < 1e-4, np.abs(alone - base).max()  # zero defaults: the graph alone is the base
    assert np.abs(base - want).max() > 0.5  # the adapter matters


def test_int4_keeps_the_branches_float_and_every_path_applies_the_adapter(merged):
    import onnx

    artifact = edgequant.convert(merged, "onnx:int4?lora=separate")
    graph = onnx.load(str(artifact.path / "model.onnx"), load_external_data=False).graph
    branches = [node for node in graph.node if "/lora_A/" in node.name or "/lora_B/" in node.name]
    assert len(branches) == 28 and {node.op_type for node in branches} == {"MatMul"}  # float, not MatMulNBits
    overridable = {item.name for item in graph.input} & {init.name for init in graph.initializer}
    assert overridable == {node.input[1] for node in branches}
    assert sum(node.op_type == "MatMulNBits" for node in graph.node) == 15  # 14 projections (HQQ) + the 8-bit LM head
    with open_runner(artifact.path, n_ctx=64) as runner:
        alone = list(runner.generate(IDS[:6], GREEDY))  # onnxruntime-genai, og.Adapters
        decoder = runner.batch_decoder(2, 128)  # raw onnxruntime, the adapter bound in its IO bindings
        decoder.start(0, IDS[:6], GREEDY)
        together = [decoder.step()[0] for _ in range(GREEDY.max_tokens)]
        decoder.close()
        scored = runner.logits(IDS[:6])
    assert len(alone) == GREEDY.max_tokens and together == alone
    assert int(np.argmax(scored[-1])) == alone[0]  # the scorer (run options) agrees on the first token
    assert np.abs(_graph_alone(artifact) - _logits(edgequant.convert(merged, "onnx:fp32"))).max() > 0.5


def test_separate_without_an_adapter_is_refused(cli, onnx_tiny, tmp_path):
    done = cli("convert", str(onnx_tiny), "--to", "onnx:int4?lora=separate", "-o", str(tmp_path / "out"))
    assert done.returncode == 2 and "--adapter" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()
    done = cli("convert", str(onnx_tiny), "--to", "onnx:int8-static?lora=separate", "-o", str(tmp_path / "out"))
    assert done.returncode == 2 and "int8-static" in done.stderr and "Traceback" not in done.stderr, done.stderr


def test_one_graph_serves_each_artifacts_adapter_one_adapter_at_a_time(merged, onnx_tiny, tmp_path_factory):
    """Two adapters of one configuration on one base: their int4 graphs are the same bytes, so the
    server loads it once. The batch decoder binds one adapter's tensors per step, so the worker
    admits one adapter's requests at a time; each request still gets its own artifact's answer."""
    other = adapted_model(onnx_tiny, random_adapter(tmp_path_factory.mktemp("lora2") / "adapter", onnx_tiny, MODULES,
                                                    rank_pattern=RANKS, alpha_pattern={"down_proj": 16}, seed=3))
    assert_served_with_their_adapters({"task_a": edgequant.convert(merged, "onnx:int4?lora=separate"),
                                       "task_b": edgequant.convert(other, "onnx:int4?lora=separate")},
                                      ["Once upon a time", "The capital of"])
