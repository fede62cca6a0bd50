"""`--trust-pickle`: a folder of pickle weights is refused by default, converted once to a cached
safetensors copy with torch's weights_only loader when the flag is given, and a pickle that carries
code is refused without running it."""

import argparse
import json
import os
import shutil

import pytest

import edgequant
from edgequant.commands.common import model_path
from edgequant.errors import EdgequantError
from edgequant.sources.pickled import safetensors_copy

torch = pytest.importorskip("torch", reason="its extra is not installed")
pytest.importorskip("gguf", reason="its extra is not installed")
from gguf import GGUFReader  # noqa: E402
from safetensors.numpy import load_file as load_numpy  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


def pickled_folder(tiny_model, folder, weights) -> str:
    """The tiny model's config and tokenizer beside `weights` saved as pytorch_model.bin."""
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.save(weights, folder / "pytorch_model.bin")
    return str(folder)


def test_a_pickle_folder_is_refused_on_the_command_line_with_the_flag_to_pass(tiny_model, tmp_path, cli):
    folder = pickled_folder(tiny_model, tmp_path / "pickled", load_file(tiny_model / "model.safetensors"))
    refused = cli("inspect", folder)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "pickle" in refused.stderr and "--trust-pickle" in refused.stderr


def test_with_trust_pickle_it_converts_to_the_same_gguf_as_the_safetensors_folder(tiny_model, tmp_path, cli):
    folder = pickled_folder(tiny_model, tmp_path / "pickled", load_file(tiny_model / "model.safetensors"))
    done = cli("convert", folder, "--trust-pickle", "--to", "gguf:q8_0", "-o", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    copy = safetensors_copy(tmp_path / "pickled")  # built by the command above, found in the cache
    assert copy.name == "pickled" and not list(copy.glob("*.bin"))
    assert (copy / "tokenizer.model").is_file() and (copy / "config.json").is_file()
    original, converted = load_numpy(tiny_model / "model.safetensors"), load_numpy(copy / "model.safetensors")
    assert original.keys() == converted.keys()
    for name, tensor in original.items():
        assert converted[name].dtype == tensor.dtype and (converted[name] == tensor).all(), name
    reference = {t.name: bytes(t.data) for t in GGUFReader(edgequant.convert(tiny_model, "gguf:q8_0").model_path).tensors}
    ours = {t.name: bytes(t.data) for t in GGUFReader(edgequant.open_artifact(tmp_path / "out").model_path).tensors}
    assert ours == reference


def test_a_pickle_carrying_code_is_refused_and_the_code_never_runs(tiny_model, tmp_path, cli):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    folder = pickled_folder(tiny_model, tmp_path / "hostile", {"model.embed_tokens.weight": Payload()})
    refused = cli("inspect", folder, "--trust-pickle")
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "weights_only=True" in refused.stderr and "pytorch_model.bin" in refused.stderr
    assert not marker.exists()


def test_shards_and_tied_weights_become_one_safetensors_file_of_the_same_tensors(tiny_model, tmp_path):
    """Shards listed in the .bin index are read into one file; tied weights (one storage in the
    pickle) are written as two equal tensors, and a bfloat16 tensor stays bfloat16."""
    weights = load_file(tiny_model / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"]  # tied: one storage
    weights["model.norm.weight"] = weights["model.norm.weight"].to(torch.bfloat16)
    names = sorted(weights)
    folder = tmp_path / "sharded"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2], "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    for shard, shard_names in shards.items():
        torch.save({n: weights[n] for n in shard_names}, folder / shard)
    index = {"weight_map": {n: shard for shard, shard_names in shards.items() for n in shard_names}}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    (folder / "training_args.bin").write_bytes(b"\x80\x04a trainer's state, never read")

    copy = model_path(argparse.Namespace(model=str(folder), trust_pickle=True, adapter=None))
    converted = load_file(copy / "model.safetensors")
    assert sorted(converted) == names and not (copy / "pytorch_model.bin.index.json").exists()
    for name in names:
        assert converted[name].dtype == weights[name].dtype and torch.equal(converted[name], weights[name]), name
    assert edgequant.load_source(copy).name == "sharded"
    assert safetensors_copy(folder) == copy  # built once, then found


def test_paths_that_are_not_pickle_folders_pass_unchanged(tiny_model, tmp_path):
    assert safetensors_copy(tiny_model) == tiny_model
    checkpoint = tmp_path / "weights.pt"
    torch.save(load_file(tiny_model / "model.safetensors"), checkpoint)
    assert safetensors_copy(checkpoint) == checkpoint
    with pytest.raises(EdgequantError, match="weights.pt is a pickle checkpoint"):  # a state dict alone is no model
        edgequant.load_source(checkpoint)
