"""LoRA adapters: `finetune` trains one (PEFT on PyTorch), `--adapter` merges it into the float
source, and every format converts the merged model as it would any other.

The tiny ONNX-shaped Llama is the base (every format takes it); the data teaches it a fixed
answer pattern, so a few steps move the held-out loss a lot.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import edgequant
from edgequant.adaptation.finetune import FinetuneConfig, finetune
from edgequant.adaptation.merge import adapted_model
from edgequant.errors import EdgequantError
from edgequant.measurement.settings import EvalConfig

pytest.importorskip("peft", reason="the torch extra (peft) is not installed")

QUICK = EvalConfig(ctx=64, windows=2, speed=False)
# Float artifacts of the merged model against the merged PyTorch model: the bounds
# tests/test_architectures.py sets for each format's float spec, for the same reasons.
FLOAT_SPECS = {"gguf:f32": 1e-4, "onnx:fp32": 1e-4, "openvino:fp32?infer=f32&kv_cache=f32&dyn_quant=0": 1e-4, "mlx:fp16": 1e-3}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Prompt/completion pairs with one learnable rule: the answer repeats the prompt's animal twice."""
    animals = ["cat", "dog", "owl", "fox", "bee", "eel", "ant", "yak", "elk", "emu", "hen", "ram", "cow", "pig", "bat"]
    path = tmp_path_factory.mktemp("lora-data") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Say the {a} twice:", "completion": f" {a} {a}."}) + "\n" for a in animals))
    return path


@pytest.fixture(scope="module")
def adapter(onnx_tiny, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "adapter"
    record = finetune(FinetuneConfig(out, onnx_tiny, str(data), steps=30, rank=4, alpha=8, learning_rate=3e-3, batch=4))
    return out, record


def test_finetune_lowers_the_held_out_loss_and_writes_a_peft_adapter(adapter):
    folder, record = adapter
    assert {"adapter_config.json", "adapter_model.safetensors", "edgequant-finetune.json"} <= {p.name for p in folder.iterdir()}
    loss = record["held_out_loss"]
    assert loss["after"] < 0.85 * loss["before"], loss  # held-out animals (measured 7.73 -> 5.66): the pattern, not the lines
    assert record["examples"] == {"train": 12, "held_out": 3} and len(record["train_loss"]) == 30
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"


def test_the_merged_folder_computes_what_peft_computes(onnx_tiny, adapter):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = adapted_model(onnx_tiny, adapter[0])
    assert adapted_model(onnx_tiny, adapter[0]) == merged  # cached: built once
    ids = torch.tensor([[1, 45, 300, 17, 99, 250, 3, 480]])
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(onnx_tiny), adapter[0]).eval()
        want = peft_model(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(merged).eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(onnx_tiny).eval()(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert (base - want).abs().max() > 0.1  # the adapter changed the model
    record = edgequant.load_source(merged).to_json()["adaptation"]
    assert record["adapter"]["rank"] == 4 and record["base"]["path"] == str(onnx_tiny.resolve())


@pytest.mark.parametrize("spec", list(FLOAT_SPECS))
def test_every_formats_float_artifact_of_the_merged_model_matches_it(onnx_tiny, adapter, spec):
    artifact = edgequant.convert(adapted_model(onnx_tiny, adapter[0]), spec)
    assert artifact.manifest["source"]["adaptation"]["adapter"]["path"] == str(adapter[0].resolve())
    metrics = edgequant.evaluate(artifact.path, config=QUICK)  # the baseline: the artifact's source, the merged model
    assert metrics["kld_mean"] < FLOAT_SPECS[spec] and metrics["top1_agreement"] >= 0.95, metrics
    # The fine-tune's held-out examples, scored by the artifact's runner: a float artifact keeps the whole gain.
    reference = metrics["finetune_reference"]
    assert reference["adapted"] < reference["base"] and metrics["finetune_kept"] == pytest.approx(1.0, abs=0.02), metrics


def test_a_quantized_artifact_reports_how_much_of_the_fine_tune_it_kept(onnx_tiny, adapter):
    from edgequant.decisions.gates import parse_gate

    artifact = edgequant.convert(adapted_model(onnx_tiny, adapter[0]), "gguf:q4_0")
    metrics = edgequant.evaluate(artifact.path, config=QUICK)
    assert metrics["finetune_loss"] > metrics["finetune_reference"]["adapted"] and metrics["finetune_kept"] < 1.0
    assert parse_gate("finetune_kept>=90%").value == pytest.approx(0.9)


def test_an_adapter_for_another_base_is_refused_with_the_reason(tiny_model, adapter):
    with pytest.raises(EdgequantError, match="different base model") as refused:
        adapted_model(tiny_model, adapter[0])  # the tiny Llama's MLP is 512 wide, the adapter's base 768
    assert "mlp" in refused.value.problem


def test_the_command_line_converts_with_an_adapter_and_refuses_a_bad_one(cli, onnx_tiny, adapter, tmp_path):
    done = cli("convert", str(onnx_tiny), "--adapter", str(adapter[0]), "--to", "gguf:q8_0", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["source"]["adaptation"]["adapter"]["fingerprint"]
    (tmp_path / "adapter_config.json").write_text("{}")
    bad = cli("convert", str(onnx_tiny), "--adapter", str(tmp_path), "--to", "gguf:q8_0")
    assert bad.returncode == 2 and "adapter_model.safetensors is missing" in bad.stderr and "Traceback" not in bad.stderr


def test_the_builtin_data_set_is_the_zen_of_python():
    from edgequant.adaptation.data import read_records, split, zen_lines

    lines = zen_lines()
    assert len(lines) == 19 and lines[0] == "Beautiful is better than ugly."
    train, held = split(read_records("zen"))
    assert len(train) == 16 and len(held) == 3
    assert np.all([r["messages"][1]["content"] in lines for r in train + held])


def test_optimize_picks_the_smallest_candidate_that_keeps_the_fine_tune(onnx_tiny, adapter, tmp_path):
    """The fine-tune's own gate, end to end: `optimize --adapter` on the merged model refuses the
    candidates that lost the fine-tune and certifies the smallest one that kept it."""
    from edgequant.decisions.optimize import OptimizeConfig, optimize

    # On this fine-tune q8_0 keeps 100.5% and q4_0 95.5% (3 held-out examples: q2_k's figure, 125%,
    # is noise), so a 98% bar refuses the smaller candidate.
    config = OptimizeConfig(adapted_model(onnx_tiny, adapter[0]), gates=("finetune_kept>=98%",), objective="size",
                            specs="gguf:q8_0,gguf:q4_0", search=False, eval=QUICK,
                            output=tmp_path / "out", db=tmp_path / "results.sqlite")
    result = optimize(config)
    measured = {c["spec"]: c for c in result["candidates"] if c["status"] == "measured"}
    kept = {spec: c["figures"]["finetune_kept"] for spec, c in measured.items()}
    assert set(kept) == {"gguf:q8_0", "gguf:q4_0"} and kept["gguf:q4_0"] < 0.98 <= kept["gguf:q8_0"], kept
    refused = measured["gguf:q4_0"]
    assert not refused["passes"] and [v["gate"] for v in refused["verdicts"] if v["verdict"] != "pass"] == ["finetune_kept>=98%"], refused
    assert result["winner"] == "gguf:q8_0"
    certificate = json.loads((tmp_path / "out" / "certificate.json").read_text())
    assert certificate["spec"] == "gguf:q8_0" and "finetune_kept>=98%" in json.dumps(certificate["gates"])


def test_optimize_tries_the_adapter_kept_separate_as_a_neighbour(onnx_tiny, adapter, tmp_path):
    """For an adapted model the closed loop also measures each best candidate with `?lora=separate`:
    the base artifact plus the adapter, which a quantization grid cannot round away."""
    from edgequant.artifact import open_artifact
    from edgequant.decisions.optimize import OptimizeConfig, optimize

    config = OptimizeConfig(adapted_model(onnx_tiny, adapter[0]), gates=("finetune_kept>=50%",), specs="gguf:q4_0",
                            budget=3, eval=QUICK, db=tmp_path / "results.sqlite")
    result = optimize(config)
    tried = {c["spec"]: c for c in result["candidates"]}
    separate = tried["gguf:q4_0?lora=separate"]
    assert separate["origin"] == "neighbour of gguf:q4_0" and separate["status"] == "measured", separate
    assert open_artifact(separate["artifact"]).manifest["details"]["adapter"]["mode"] == "separate"
    assert 0.5 < separate["figures"]["finetune_kept"] < 1.5, separate["figures"]
