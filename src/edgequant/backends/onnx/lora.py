"""`onnx:PREC?lora=separate`: the base model's graph with empty LoRA branches, and the adapter beside
it as `adapter.onnx_adapter`, applied per run by onnxruntime and per generator by onnxruntime-genai.

The genai builder, given the PEFT adapter (`adapter_path`), exports the base model with a branch
`MatMul(MatMul(x, A^T), (s B)^T)` added to each adapted projection (packed QKV off; s = PEFT's
factor, alpha / r, folded into B by the builder). Those A and B initializers are then declared
graph inputs too, which makes them overridable, and set to zeros: the graph alone computes the
base model exactly, and the adapter file (onnxruntime's AdapterFormat, the same tensor names)
supplies the values at run time:
- onnxruntime: `RunOptions.add_active_adapter(LoraAdapter)` on `session.run` (the scorer). It has no
  effect on `run_with_iobinding` (onnxruntime 1.32 warns "won't have an effect"), so the server's
  batch decoder binds the adapter's tensors as inputs of its IO bindings instead;
- onnxruntime-genai: `og.Adapters` + `Generator.set_active_adapter`, per generator.
The branch MatMuls stay float at every precision: the builder's int4 and edgequant's HQQ and int8
passes skip them. The artifact's source stays the merged folder, so evaluation compares base +
adapter against the adapted float model.
"""

from __future__ import annotations

from pathlib import Path

from edgequant.adaptation.merge import MERGED_FIX
from edgequant.errors import EdgequantError

ADAPTER_FILE = "adapter.onnx_adapter"
FORMAT = "onnx_adapter"
BRANCH_PARTS = ("/lora_A/MatMul", "/lora_B/MatMul")  # the builder's branch node names end so: .../q_proj/lora_A/MatMul


def branch_matmul_names(config: dict) -> list[str]:
    """The builder's node names of every LoRA branch MatMul it may create, beside each decoder-layer
    projection (unused names are harmless)."""
    from edgequant.backends.onnx.tools import layer_matmul_names

    return [name.removesuffix("/MatMul") + end for name in layer_matmul_names(config) for end in BRANCH_PARTS]


def split_adapter(model_path: Path, adapter, out_file: Path) -> dict:
    """Move the LoRA branch weights of the exported graph `model_path` into `out_file` (AdapterFormat)
    and leave zeros as their overridable defaults; returns the manifest's record of the adapter."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from edgequant.adaptation.adapter import scale_of
    from edgequant.backends.onnx.tools import DATA_SUFFIX, save_model

    model = onnx.load(str(model_path))
    graph = model.graph
    names = {node.input[1] for node in graph.node if node.op_type == "MatMul" and node.name.endswith(BRANCH_PARTS)}
    values = {}
    for init in graph.initializer:
        if init.name in names:
            values[init.name] = numpy_helper.to_array(init).copy()
            init.CopyFrom(numpy_helper.from_array(np.zeros_like(values[init.name]), init.name))
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    if len(values) != 2 * len(adapter.pairs):  # every adapted projection has its A and B
        raise EdgequantError(f"the onnxruntime-genai builder made {len(values) // 2} LoRA branches for the "
                             f"{len(adapter.pairs)} layers adapter {adapter.name} adapts", MERGED_FIX)
    model_path.with_name(model_path.name + DATA_SUFFIX).unlink(missing_ok=True)
    save_model(model, model_path)
    _write_adapter_file(values, out_file)
    return {"file": out_file.name, "format": FORMAT, "scale": 1.0, "factor": scale_of(adapter.config, "", adapter.rank),
            "fingerprint": adapter.fingerprint, "rank": max(pair.rank for pair in adapter.pairs),
            "branches": len(adapter.pairs), "peft_adapter": adapter.to_json()}


def _write_adapter_file(values: dict, out_file: Path) -> None:
    import onnxruntime as ort

    writer = ort.AdapterFormat()
    writer.set_adapter_version(1)
    writer.set_model_version(1)
    writer.set_parameters({name: ort.OrtValue.ortvalue_from_numpy(value) for name, value in values.items()})
    writer.export_adapter(str(out_file))


class LoadedAdapter:
    """An artifact's adapter file, read once for every way it is applied: run options for
    `session.run`, the tensors themselves for IO bindings, and the file for onnxruntime-genai."""

    def __init__(self, path: Path):
        import onnxruntime as ort

        self.path = path
        self._genai = None  # (the genai model, its og.Adapters), loaded at the first generator
        self.values = ort.AdapterFormat.read_adapter(str(path)).get_parameters()  # name -> OrtValue, memory-mapped
        self._lora = ort.LoraAdapter()
        self._lora.Load(str(path))
        self.run_options = ort.RunOptions()
        self.run_options.add_active_adapter(self._lora)

    def check(self, session) -> None:
        """Refuse an adapter whose tensors are not the graph's overridable LoRA weights, in their shapes."""
        slots = {item.name: item.shape for item in session.get_overridable_initializers()}
        for name, value in self.values.items():
            if slots.get(name) != value.shape():
                found = "no such input" if name not in slots else f"shape {slots[name]}"
                raise EdgequantError(f"the adapter {self.path} does not fit its graph: {name} of shape {value.shape()}, "
                                     f"the graph has {found}", "re-create the artifact with --force")

    def activate(self, model, generator) -> None:
        """Apply the adapter to one onnxruntime-genai generator of `model` (loaded once per model)."""
        import onnxruntime_genai as og

        if self._genai is None or self._genai[0] is not model:
            adapters = og.Adapters(model)
            adapters.load(str(self.path), "adapter")
            self._genai = (model, adapters)
        generator.set_active_adapter(self._genai[1], "adapter")
