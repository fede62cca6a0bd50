"""Engine calls for the ONNX backend: the onnxruntime-genai model builder and onnxruntime.quantization.

Everything heavy is imported inside the functions; the backend imports this module only when it
converts or opens an artifact.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from edgequant import children
from edgequant.errors import EdgequantError
from edgequant.progress import engine_warnings_hidden

MODEL_FILE = "model.onnx"
DATA_SUFFIX = ".data"


@dataclass(frozen=True)
class BuildRequest:
    """One run of the genai model builder: what precision, with which `--extra_options`."""

    hf_dir: Path
    out_dir: Path
    precision: str  # the builder's -p: fp32, fp16, int4
    extra: tuple[tuple[str, str], ...] = ()


def genai_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("onnxruntime-genai")
    except PackageNotFoundError:
        raise EdgequantError("onnxruntime-genai is not installed; the ONNX backend needs it",
                             "pip install 'edgequant[onnx]' (onnxruntime-genai==0.14.1, onnxruntime, onnx-ir)") from None


def builder_architectures() -> list[str]:
    """Architectures the installed builder maps to an ONNX graph, read from its own dispatch code,
    so the list follows whatever builder version is installed."""
    import importlib.util

    spec = importlib.util.find_spec("onnxruntime_genai")
    if spec is None or not spec.submodule_search_locations:
        genai_version()  # raises the install hint
    text = (Path(next(iter(spec.submodule_search_locations))) / "models" / "builder.py").read_text()
    names = re.findall(r'config\.architectures\[0\]\s*==\s*"(\w+)"', text)
    return sorted(set(n for n in names if n.endswith("CausalLM")))


def check_supported(config: dict) -> None:
    """Refuse, before any work, a model the builder cannot export or would export wrongly."""
    arch = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    supported = builder_architectures()
    if arch not in supported:
        raise EdgequantError(
            f"the onnxruntime-genai model builder does not support architecture {arch!r}",
            "ONNX export works for: " + ", ".join(supported),
        )
    heads, kv_heads = config.get("num_attention_heads"), config.get("num_key_value_heads", config.get("num_attention_heads"))
    if arch == "Phi3ForCausalLM" and kv_heads != heads:
        # Measured on a tiny Phi-3: exact with num_key_value_heads == num_attention_heads, top-1
        # agreement 0% with 2 of 4 (the fused qkv projection is split as if every head had its K/V).
        raise EdgequantError(
            f"the onnxruntime-genai builder exports Phi3ForCausalLM with grouped-query attention "
            f"({kv_heads} key/value heads for {heads} query heads) wrongly: its logits do not match the model's",
            "convert this model to gguf or openvino; Phi-3 models with as many key/value heads as query heads export correctly",
        )
    # The builder finds the LM head as "a Linear with vocab_size outputs", so an MLP projection of
    # that same width is taken for it and the graph silently computes the wrong logits.
    if config.get("intermediate_size") == config.get("vocab_size"):
        raise EdgequantError(
            f"this model's intermediate_size equals its vocab_size ({config.get('vocab_size')}); the genai builder "
            "would mistake an MLP projection for the LM head and export wrong logits",
            "use a model whose MLP width differs from its vocabulary size, or another format (gguf)",
        )


def run_builder(request: BuildRequest, log_path: Path) -> None:
    """The builder as a subprocess: it prints a lot and loads the full torch model, and a child
    process gives that memory back when it ends. Offline: a local folder and no hub token."""
    import os

    cache = Path(tempfile.mkdtemp(prefix="eq-genai-cache-"))
    extra = [("hf_token", "false"), ("hf_remote", "false"), *request.extra]
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(request.hf_dir),
               "-o", str(request.out_dir), "-p", request.precision, "-e", "cpu", "-c", str(cache),
               "--extra_options", *[f"{k}={v}" for k, v in extra]]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TQDM_DISABLE": "1"}
    try:
        with open(log_path, "w") as log:
            done = children.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if done.returncode != 0 or not (request.out_dir / MODEL_FILE).is_file():
        tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-4:])
        raise EdgequantError(f"the onnxruntime-genai builder failed (exit {done.returncode}):\n{tail}",
                             f"see the full log in {log_path}; check the model loads with transformers")


_LAYER_MATMULS = ("attn/qkv_proj", "attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj",
                  "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj")


def layer_matmul_names(config: dict) -> list[str]:
    """The builder's node names of every decoder-layer MatMul (names it does not create are harmless)."""
    layers = int(config.get("num_hidden_layers", 0))
    return [f"/model/layers.{i}/{part}/MatMul" for i in range(layers) for part in _LAYER_MATMULS]


def drop_shape_annotations(model_path: Path) -> int:
    """Remove the builder's intermediate shape annotations (graph.value_info); onnxruntime infers
    shapes itself. Needed for its fp16 CPU export: it labels the repeat_kv outputs (past + new
    tokens long) with the new tokens' length only, and on the first decode step onnxruntime's
    buffer planner trusts that label next to the fp32 Casts it inserts on CPU and fails ("Shape
    mismatch attempting to re-use buffer {1,1,576} != {1,4,576}"). The weights file is untouched."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    count = len(model.graph.value_info)
    del model.graph.value_info[:]
    onnx.save_model(model, str(model_path))
    return count


def copy_builder_side_files(src: Path, dst: Path) -> None:
    """What onnxruntime-genai needs beside the model to run it as is: its config and the tokenizer."""
    from edgequant.backends._shared.side_files import copy_side_files, copy_tokenizer

    copy_side_files(("genai_config.json",), dst, src)
    copy_tokenizer(dst, src)


def save_model(model, path: Path) -> None:
    """Save with all weights in one external data file beside the graph (protobuf's 2 GB limit)."""
    import onnx

    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + DATA_SUFFIX, size_threshold=1024)


@dataclass(frozen=True)
class Calibration:
    samples: int = 8  # calibration sequences
    tokens: int = 128  # tokens per sequence (prefill length)
    decode_steps: int = 4  # single-token steps run after each prefill, with the KV cache


def op_types(model_path: Path) -> set[str]:
    """The operator types of a graph's main body, read without its external weights."""
    import onnx

    return {node.op_type for node in onnx.load(str(model_path), load_external_data=False).graph.node}


def kv_feeds(session_inputs, batch: int = 1) -> dict:
    """Empty past key/values (past length 0) for every cache input the builder's graph declares."""
    import numpy as np

    feeds = {}
    for item in session_inputs:
        if item.name.startswith("past_key_values"):
            dtype = np.float16 if "float16" in item.type else np.float32
            heads, head_dim = item.shape[1], item.shape[3]
            feeds[item.name] = np.zeros((batch, heads, 0, head_dim), dtype=dtype)
    return feeds


def calibration_feeds(fp32_model: Path, windows: list[list[int]], decode_steps: int) -> Iterator[dict]:
    """Prefill feeds (a whole window, empty past) and the decode feeds that follow it (one token,
    the real KV cache from the fp32 model), so the static ranges cover both regimes."""
    import numpy as np

    from edgequant.backends._shared.ort import cpu_session

    session = cpu_session(fp32_model)
    inputs = session.get_inputs()
    out_names = [o.name for o in session.get_outputs()]
    for window in windows:
        prefill = window[: len(window) - decode_steps]
        feeds = {"input_ids": np.asarray([prefill], np.int64), "attention_mask": np.ones((1, len(prefill)), np.int64),
                 **kv_feeds(inputs)}
        yield feeds
        for step in range(decode_steps):
            outputs = dict(zip(out_names, session.run(None, feeds)))
            past = {name.replace("present", "past_key_values"): value for name, value in outputs.items() if name.startswith("present")}
            total = len(prefill) + step + 1
            feeds = {"input_ids": np.asarray([[window[len(prefill) + step]]], np.int64),
                     "attention_mask": np.ones((1, total), np.int64), **past}
            yield feeds


def quantize_static_qdq(fp32_model: Path, out_model: Path, feeds: list[dict], keep_float: tuple[str, ...] = ()) -> int:
    """Static int8 in QDQ form: uint8 activations with asymmetric MinMax ranges, int8 weights per
    channel, only around MatMuls (the builder's fused attention and norms stay float); MatMuls
    whose node name contains a `keep_float` part stay float. Returns how many stay float.

    One fixed range per activation tensor has to cover every token of every prompt, and the
    default model's down_proj inputs carry massive first-token activations (|x| up to 2900 where
    other tokens stay under 2): with them quantized the model lost +283% perplexity, with the 30
    down_proj and the LM head float +8.5% (2 windows of 512). Measured and rejected: symmetric
    activations (+19%), MinMax moving average (+47%: decode steps shrink the prefill ranges);
    Percentile/Entropy calibration fail in onnxruntime 1.32 on feeds of different lengths
    (prefill and decode), which the calibration must mix."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    from edgequant.backends._shared.ort import FeedReader

    matmuls = [n.name for n in onnx.load(str(fp32_model), load_external_data=False).graph.node if n.op_type == "MatMul"]
    excluded = [name for name in matmuls if any(part in name for part in keep_float)]
    with engine_warnings_hidden():
        quantize_static(str(fp32_model), str(out_model), FeedReader(feeds), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        per_channel=True, calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True,
                        nodes_to_exclude=excluded, extra_options={"MatMulConstBOnly": True, "ActivationSymmetric": False})
    return len(excluded)


# onnxruntime implements these in the default ONNX domain, but the ONNX standard has no such op,
# so onnx.checker rejects them; they are checked as contrib ops instead.
_ORT_DEFAULT_DOMAIN_OPS = {"SimplifiedLayerNormalization"}


def check_model(model_path: Path) -> None:
    """Run onnx.checker on the graph (external weights are not loaded: the checker validates
    structure, types and standard ops, not weight values)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for node in model.graph.node:
        if node.domain in ("", "ai.onnx") and node.op_type in _ORT_DEFAULT_DOMAIN_OPS:
            node.domain = "com.microsoft"
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    # The in-memory checker resolves external data paths against the working directory.
    with contextlib.chdir(model_path.parent):
        onnx.checker.check_model(model)
