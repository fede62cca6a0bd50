import json
import shutil

import pytest

import edgequant
from edgequant.errors import EdgequantError

pytest.importorskip("torch", reason="its extra is not installed")
pytest.importorskip("gguf", reason="its extra is not installed")


def test_hf_folder_is_fingerprinted_and_stable(tiny_model):
    first = edgequant.load_source(tiny_model)
    assert first.kind == "hf" and len(first.fingerprint) == 64
    assert edgequant.load_source(tiny_model).fingerprint == first.fingerprint


def test_inspect_reports_architecture_and_estimates(tiny_model):
    info = edgequant.inspect_model(tiny_model)
    assert info["architecture"] == "LlamaForCausalLM"
    assert (info["layers"], info["hidden_size"], info["heads"], info["kv_heads"], info["vocab_size"]) == (2, 256, 4, 2, 512)
    assert info["embedding_parameters"] == 2 * 512 * 256  # untied: embed_tokens + lm_head
    assert info["dtype"] == "F32" and info["tokenizer"] == "sentencepiece"
    sizes = info["estimated_bytes"]
    assert sizes["gguf:f32"] > sizes["gguf:f16"] > sizes["gguf:q8_0"] > sizes["gguf:q4_k_m"] > sizes["gguf:q2_k"]


def test_missing_path(tmp_path):
    with pytest.raises(EdgequantError, match="no such file or folder"):
        edgequant.load_source(tmp_path / "nope")


def test_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(EdgequantError, match="not a Hugging Face model folder"):
        edgequant.load_source(tmp_path)


def test_a_pickle_checkpoint_is_refused_with_how_to_convert_it(tiny_model, tmp_path):
    """A folder whose weights are pytorch_model.bin, or a .pt file, is never unpickled: the error
    says why and gives the one-line conversion to safetensors."""
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(EdgequantError, match="pytorch_model.bin is a pickle checkpoint") as refused:
        edgequant.load_source(folder)
    assert "safe_serialization=True" in refused.value.fix and str(folder) in refused.value.fix
    checkpoint = tmp_path / "weights.pt"
    checkpoint.write_bytes(b"\x80\x04not loaded")
    with pytest.raises(EdgequantError, match="weights.pt is a pickle checkpoint") as refused:
        edgequant.load_source(checkpoint)
    assert "weights_only=True" in refused.value.fix


def test_truncated_safetensors(tiny_model, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(EdgequantError, match="truncated"):
        edgequant.load_source(broken)


def test_garbage_safetensors_header(tiny_model, tmp_path):
    broken = tmp_path / "garbage"
    shutil.copytree(tiny_model, broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    with pytest.raises(EdgequantError, match="corrupt safetensors header"):
        edgequant.load_source(broken)


def test_config_without_model_type(tiny_model, tmp_path):
    broken = tmp_path / "noconfig"
    shutil.copytree(tiny_model, broken)
    config = json.loads((broken / "config.json").read_text())
    del config["model_type"]
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(EdgequantError, match="no model_type"):
        edgequant.load_source(broken)


def test_gguf_with_bad_magic(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"NOPE" + b"\0" * 100)
    with pytest.raises(EdgequantError, match="not a GGUF file"):
        edgequant.load_source(fake)


def test_truncated_gguf(tiny_gguf_f32, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = tiny_gguf_f32.model_path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(EdgequantError, match="truncated|corrupt"):
        edgequant.load_source(cut)


def test_corrupt_gguf_header(tiny_gguf_f32, tmp_path):
    bad = tmp_path / "bad.gguf"
    data = bytearray(tiny_gguf_f32.model_path.read_bytes()[:4096])
    data[8:24] = b"\xff" * 16  # tensor and key-value counts become absurd
    bad.write_bytes(bytes(data))
    with pytest.raises(EdgequantError, match="corrupt|truncated"):
        edgequant.load_source(bad)
