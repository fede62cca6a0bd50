"""`mlx:PREC?lora=separate`: the base model's MLX artifact plus the LoRA adapter in mlx-lm's format,
applied by the runner when it loads the model.

The adapter is PEFT's, random and non-zero (no training: its arithmetic is what is checked), on the
tiny Llama, with one module at its own alpha and one at a lower rank, the two things mlx-lm's
single-rank, single-scale format has to fold in.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgequant
from edgequant.adaptation.merge import adapted_model
from edgequant.errors import EdgequantError
from edgequant.registry import open_runner
from lora_adapters import assert_served_with_their_adapters

pytest.importorskip("mlx.core", reason="its extra is not installed")
pytest.importorskip("mlx_lm", reason="its extra is not installed")
pytest.importorskip("peft", reason="the torch extra (peft) is not installed")

IDS = [1, 45, 300, 17, 99, 250, 3, 480, 12, 7]  # under 16 tokens: every product on MLX's own kernels


def peft_adapter(model, out, targets=("q_proj", "v_proj", "down_proj"), seed: int = 0, **options):
    """A random PEFT adapter (A and B both non-zero) of rank 4, alpha 8, saved to `out`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False, lora_dropout=0.0, **options)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(model), config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.2)  # PEFT's random B is large; keep the update of the order of the weights'
    peft_model.save_pretrained(out, save_embedding_layers=False)
    return out


@pytest.fixture(scope="module")
def adapter(tiny_model, tmp_path_factory):
    """q/v/down projections, down_proj at its own alpha and v_proj at a lower rank."""
    return peft_adapter(tiny_model, tmp_path_factory.mktemp("lora") / "adapter",
                        alpha_pattern={"down_proj": 16}, rank_pattern={"v_proj": 2})


@pytest.fixture(scope="module")
def merged(tiny_model, adapter):
    return adapted_model(tiny_model, adapter)


def logits(path) -> np.ndarray:
    with open_runner(path, n_ctx=64) as runner:
        return runner.logits(IDS)


def peft_logits_on_float16_base(model, adapter) -> np.ndarray:
    """PEFT's model of `adapter` on `model` with its weights rounded to float16, computed in float32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model).eval()
    with torch.no_grad():
        for param in base.parameters():
            param.copy_(param.half().float())
        return PeftModel.from_pretrained(base, adapter).eval()(input_ids=torch.tensor([IDS])).logits[0].numpy()


def mlx_lm_logits(artifact) -> np.ndarray:
    """The artifact loaded by mlx-lm itself, its adapter by mlx-lm's own loader, computed in float32
    as our runner does off Apple silicon."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(artifact.path)
    load_adapters(model, str(artifact.path / "adapters"))
    model.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype == mx.float16 else p, model.parameters()))
    assert sum(type(m).__name__ == "LoRALinear" for _, m in model.named_modules()) == 6  # 3 projections x 2 layers
    return np.array(model(mx.array([IDS]))[0].astype(mx.float32))


def test_separate_float_artifact_computes_what_peft_and_the_merged_one_do(tiny_model, adapter, merged):
    separate = edgequant.convert(merged, "mlx:fp16?lora=separate")
    details = separate.manifest["details"]["adapter"]
    assert details["format"] == "mlx-lm" and details["rank"] == 4 and details["scale"] == 2.0
    assert details["fingerprint"] == separate.manifest["source"]["adaptation"]["adapter"]["fingerprint"]
    assert separate.manifest["source"]["path"] == str(merged)  # evaluation's baseline: the adapted float model
    config = json.loads((separate.path / "adapters" / "adapter_config.json").read_text())
    assert config["lora_parameters"]["keys"] == ["mlp.down_proj", "self_attn.q_proj", "self_attn.v_proj"]
    ours = logits(separate.path)
    # exact: PEFT's own model on the base's float16 weights (what mlx:fp16 stores), in float32 (measured 8e-6)
    assert np.abs(ours - peft_logits_on_float16_base(tiny_model, adapter)).max() < 1e-4
    # the merged artifact rounds W + scale B A to float16, the separate one W alone (measured 5.0e-3,
    # logits within +-5); without the adapter the logits move by 2.6
    want = logits(edgequant.convert(merged, "mlx:fp16").path)
    assert np.abs(ours - want).max() < 2e-2, np.abs(ours - want).max()
    assert np.abs(logits(edgequant.convert(tiny_model, "mlx:fp16").path) - want).max() > 0.5
    # mlx-lm's own loader reads the adapter files and computes the same logits (measured: identical)
    assert np.abs(mlx_lm_logits(separate) - ours).max() < 1e-4


def test_separate_four_bit_artifact_loads_in_mlx_lm_and_generates(merged):
    from edgequant.runner import GenerateParams

    artifact = edgequant.convert(merged, "mlx:4bit?lora=separate")
    assert json.loads((artifact.path / "config.json").read_text())["quantization"]["bits"] == 4
    with open_runner(artifact.path, n_ctx=64) as runner:
        ours = runner.logits(IDS)
        assert sum(type(m).__name__ == "LoraLinear" for _, m in runner._model.named_modules()) == 6
        prompt = runner.tokenize("The history of")
        params = GenerateParams(max_tokens=6, stop_at_eos=False)
        alone = list(runner.generate(prompt, params))
        decoder = runner.batch_decoder(n_seq=2, n_ctx=64)  # the server's decoder: the same adapted model
        decoder.start(0, prompt, params)
        together = [decoder.step()[0] for _ in range(6)]
        decoder.close()
    assert len(alone) == 6 and together == alone
    assert np.abs(mlx_lm_logits(artifact) - ours).max() < 1e-4


def test_separate_without_an_adapter_is_refused(cli, tiny_model, tmp_path):
    done = cli("convert", str(tiny_model), "--to", "mlx:4bit?lora=separate", "-o", str(tmp_path / "out"))
    assert done.returncode == 2 and "--adapter" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


def test_an_adapter_changed_since_the_merge_is_refused(tiny_model, adapter, tmp_path):
    """The merge keeps the adapter it merged (edgequant-adapter/); that copy edited afterwards no
    longer matches the merged weights, and is refused."""
    import shutil

    from edgequant.adaptation.merge import ADAPTER_COPY

    copy = shutil.copytree(adapter, tmp_path / "adapter")
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 12}))  # not the cached merge of `adapter`
    merged = adapted_model(tiny_model, copy)
    (merged / ADAPTER_COPY / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 32}))
    with pytest.raises(EdgequantError, match="has changed since .* was merged from it") as refused:
        edgequant.convert(merged, "mlx:4bit?lora=separate", output=tmp_path / "out")
    assert "--adapter" in refused.value.fix and not (tmp_path / "out").exists()


def test_an_adapted_output_layer_is_refused_before_converting(tiny_model, tmp_path):
    merged = adapted_model(tiny_model, peft_adapter(tiny_model, tmp_path / "adapter", targets=("q_proj", "lm_head")))
    with pytest.raises(EdgequantError, match="lm_head, outside the transformer blocks") as refused:
        edgequant.convert(merged, "mlx:4bit?lora=separate", output=tmp_path / "out")
    assert "lora=merged" in refused.value.fix and not (tmp_path / "out").exists()


def test_one_base_serves_each_artifacts_adapter_one_adapter_at_a_time(tiny_model, merged, tmp_path_factory):
    """Two adapters' 4-bit separate artifacts and the plain 4-bit base: one set of weights, loaded
    once. The model computes with one adapter at a time, switched between requests, so the worker
    admits one adapter's requests at a time; each gets its own artifact's answer."""
    other = adapted_model(tiny_model, peft_adapter(tiny_model, tmp_path_factory.mktemp("lora2") / "adapter", seed=3))
    assert_served_with_their_adapters({"task_a": edgequant.convert(merged, "mlx:4bit?lora=separate"),
                                       "task_b": edgequant.convert(other, "mlx:4bit?lora=separate"),
                                       "base": edgequant.convert(tiny_model, "mlx:4bit")},
                                      ["Once upon a time", "The capital of"])
