"""`openvino:PREC?lora=separate`: the base model's IR as `openvino:PREC` makes it, and the adapter
beside it as `adapter.safetensors`, in the form `openvino_genai.Adapter` reads.

The file holds PEFT's tensor names (`base_model.model.<module>.lora_A.weight`, `...lora_B.weight`)
in float32, each B multiplied by PEFT's factor for its module (lora_alpha / r, / sqrt(r) with
rsLoRA, per-module alpha and rank patterns honoured): GenAI reads no adapter_config.json and
multiplies B A by the alpha it is given, so with the factors folded in that alpha is 1.0, its
default (`AdapterConfig(Adapter(path))`).

GenAI adds the update beside each MatMul whose node name contains an adapted module's name (its
LLM pipelines strip `base_model.model.` first), as `x A^T alpha B^T` on the MatMul's own input,
added to its output. Every OpenVINO runner path applies the same file:
- generation: `LLMPipeline(..., adapters=AdapterConfig)`, and `GenerationConfig.adapters` per call;
- the server's batch decoder: `ContinuousBatchingPipeline` built with the adapters, which only its
  `generate` applies (`add_request`/`step` never call GenAI's adapter controller), so the decoder
  runs one `generate` of one token first; the adapter's tensors then stay in the pipeline's infer
  request, whose LoRA states the pipeline never resets (batch.py). Another such `generate`, with
  another adapter or none, switches them: a base several artifacts share serves each one's
  requests that way, one adapter at a time;
- the scorer (logits through the raw IR, which GenAI's machinery does not reach): `add_branches`
  builds the graph of GenAI's static mode on the `ov.Model` before it is compiled, the same
  MatMuls found by the same name rule, A and B as constants read from the same file.

The IR's MatMuls stay as `openvino:PREC` quantized them, AWQ included; the branches are float.
AWQ (int4's default) divides up_proj's output rows by per-channel scales s and multiplies
down_proj's input columns by them, so on the IR (for GenAI as for the scorer) up_proj's branch
adds B A x to W x / s where (W x + B A x) / s is needed, and down_proj's branch reads x / s: exact
only where s is 1 (`awq=0` gives the exact update on a data-free int4 base).
Measured on the default model, that costs less than AWQ gains: KLD against the adapted float model
0.060 with AWQ, 0.163 without (the merged int4, AWQ: 0.064).
"""

from __future__ import annotations

from pathlib import Path

from edgequant.adaptation.merge import MERGED_FIX
from edgequant.errors import EdgequantError

ADAPTER_FILE = "adapter.safetensors"
FORMAT = "openvino_genai"
ALPHA = 1.0  # PEFT's factors are folded into B: GenAI's alpha (its default) multiplies nothing more
PREFIX = "base_model.model."  # GenAI's LLM pipelines strip it from the tensor names before matching nodes
_A, _B = ".lora_A.weight", ".lora_B.weight"


def write_adapter(adapter, out_file: Path) -> dict:
    """`adapter` (PEFT) as GenAI's safetensors LoRA file `out_file`; returns the manifest's record of it."""
    import torch
    from safetensors.torch import load_file, save_file

    from edgequant.adaptation.adapter import WEIGHTS_FILE, scale_of

    peft = load_file(adapter.path / WEIGHTS_FILE)  # torch: an adapter may be stored in bfloat16
    tensors = {}
    for pair in adapter.pairs:
        tensors[PREFIX + pair.module + _A] = peft[pair.a].to(torch.float32).contiguous()
        tensors[PREFIX + pair.module + _B] = (peft[pair.b].to(torch.float32) * pair.scale).contiguous()
    save_file(tensors, str(out_file), metadata={"format": "pt"})
    return {"file": out_file.name, "format": FORMAT, "scale": ALPHA, "factor": scale_of(adapter.config, "", adapter.rank),
            "fingerprint": adapter.fingerprint, "rank": max(pair.rank for pair in adapter.pairs),
            "modules": len(adapter.pairs), "peft_adapter": adapter.to_json()}


def read_adapter(path: Path) -> dict[str, tuple]:
    """The adapter file's (A, B) per module name (as GenAI matches them: without PEFT's prefix)."""
    from safetensors.numpy import load_file

    tensors = load_file(str(path))
    modules = sorted({name.removeprefix(PREFIX).removesuffix(_A).removesuffix(_B) for name in tensors})
    try:
        return {module: (tensors[PREFIX + module + _A], tensors[PREFIX + module + _B]) for module in modules}
    except KeyError as exc:
        raise EdgequantError(f"{path} lacks {exc.args[0]}: not an adapter edgequant wrote", "convert the artifact again") from None


def add_branches(model, adapter: dict[str, tuple]) -> int:
    """Add `x A^T B^T` beside every MatMul of `model` (an `ov.Model`) that GenAI would adapt with
    `adapter` (`read_adapter`), in place; returns how many were added. Every module must be found,
    in the shapes the adapter has."""
    from openvino import opset13 as ops

    found: dict[str, str] = {}
    for node in model.get_ordered_ops():
        module = _module_of(node, adapter) if node.get_type_name() == "MatMul" else None
        if module is None:
            continue
        if module in found:
            raise EdgequantError(f"adapter module {module} matches two MatMuls of the IR ({found[module]}, "
                                 f"{node.get_friendly_name()}); OpenVINO GenAI would adapt both", MERGED_FIX)
        found[module] = node.get_friendly_name()
        lora_a, lora_b = adapter[module]
        _check_shapes(node, module, lora_a.shape, lora_b.shape)
        activations, output = node.input_value(0), node.output(0)
        consumers = output.get_target_inputs()  # before the branch's Add becomes one of them
        kind = output.get_element_type()
        down = ops.matmul(activations, _constant(lora_a, kind), False, True)
        total = ops.add(output, ops.matmul(down, _constant(lora_b, kind), False, True))
        for consumer in consumers:
            consumer.replace_source_output(total.output(0))
    missing = sorted(adapter.keys() - found.keys())
    if missing:
        raise EdgequantError(f"the IR has no MatMul for {missing[0]} (of {len(missing)} adapted modules not found), "
                             "so OpenVINO GenAI would silently leave it unadapted", MERGED_FIX)
    model.validate_nodes_and_infer_types()
    return len(found)


def _module_of(node, adapter: dict) -> str | None:
    """GenAI's rule (lora/adapter.cpp, LoRAWeightGetterDefault): the first module, in name order,
    whose name is part of the node's friendly name (or of that name with dots as underscores)."""
    name = node.get_friendly_name()
    variants = (name, name.replace(".", "_"))
    return next((module for module in sorted(adapter) if any(module in v for v in variants)), None)


def _check_shapes(node, module: str, a_shape, b_shape) -> None:
    weight = node.get_input_partial_shape(1)
    if not weight.is_static or len(weight) != 2:
        raise EdgequantError(f"the IR's MatMul for {module} has weights of shape {weight}", MERGED_FIX)
    transposed = node.get_transpose_b()
    in_dim, out_dim = weight[1 if transposed else 0].get_length(), weight[0 if transposed else 1].get_length()
    if (a_shape[1], b_shape[0]) != (in_dim, out_dim):
        raise EdgequantError(f"the adapter expects {module} of {b_shape[0]} x {a_shape[1]}; the IR's MatMul has "
                             f"{out_dim} x {in_dim}", "re-create the artifact with --force")


def _constant(array, kind):
    from openvino import Type
    from openvino import opset13 as ops

    constant = ops.constant(array)
    return constant if kind == Type.f32 else ops.convert(constant, kind)


class GenAIAdapters:
    """GenAI's adapters for a runner: `every`, the AdapterConfig a pipeline is built with (all the
    adapters any request may use), and `of(name)`, the one a request's GenerationConfig names
    (an empty config for the base alone, which sets the pipeline's LoRA states to nothing)."""

    def __init__(self, paths: dict[str | None, Path | None]):
        import openvino_genai as genai

        loaded = {path: genai.Adapter(str(path)) for path in set(paths.values()) if path is not None}
        self.every = genai.AdapterConfig()
        for adapter in loaded.values():
            self.every.add(adapter, ALPHA)
        self._by_name = {name: genai.AdapterConfig(loaded[path], ALPHA) if path is not None else genai.AdapterConfig()
                         for name, path in paths.items()}

    def of(self, name: str | None):
        if name not in self._by_name:
            raise ValueError(f"no adapter named {name!r}")
        return self._by_name[name]
