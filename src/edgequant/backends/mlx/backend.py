"""MLX backend: mlx-lm's converter with affine group quantization, uniform or mixed per layer.

mlx-lm writes the quantization it applied into the artifact's `config.json` (bits and group size,
per layer where they differ), so the artifact describes itself. mlx runs on Linux through
`mlx[cpu]`: quality figures are real there, speed is only representative on Apple silicon.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from edgequant.backend import Backend
from edgequant.backends._shared.sliding_window import window_ignored
from edgequant.backends.mlx.engine import INSTALL_HINT, is_apple_silicon, require_mlx
from edgequant.errors import EdgequantError
from edgequant.spec import Option, Precision

MODEL_FILE = "model.safetensors"
# Recipes: (low bits, high bits). Sensitive layers (v_proj and down_proj of the first and last
# eighth of the layers and every third in between, and the output layer) get the high bits,
# as mlx-lm's own mixed recipes do, modelled on llama.cpp's Q4_K_M.
_MIXED = {"mixed_3_6": (3, 6), "mixed_4_6": (4, 6), "mixed_2_6": (2, 6), "mixed_3_4": (3, 4)}
_UNIFORM = {"2bit": 2, "3bit": 3, "4bit": 4, "6bit": 6, "8bit": 8}

# Defaults chosen by measurement on the default model (bench/results/openvino_mlx.json).
DEFAULT_GROUP = 32  # measured: 4bit +24.2% ppl at g32 vs +31.0% at g64 (default model)
DEFAULT_EMBED_BITS = 8
# Grid of each group: "minmax" = scale (max - min) / (2^bits - 1), bias min (grid.py); "mlx" =
# mx.quantize's own rounding, which moves the grid off the weights' range (4-bit +24% ppl vs <1%).
DEFAULT_GRID = "minmax"


def _bpw(bits: int, group: int = DEFAULT_GROUP) -> float:
    return bits + 32 / group  # a float16 scale and a float16 bias per group


# mlx-lm applies a sliding window for these model types, and for llama-style models whose config
# lists "sliding_attention" layers; other models with a window (Mistral, Gemma-2) get full attention.
_APPLIES_SLIDING_WINDOW = ("gemma3", "gemma3_text")
_LLAMA_STYLE = ("llama", "mistral")  # mlx-lm runs both with models/llama.py
_QUANTIZED = tuple([*_UNIFORM, *_MIXED])


class MLXBackend(Backend):
    name = "mlx"
    display_name = "MLX"
    use_case = "Apple silicon Macs"
    extra = "mlx"
    requires = ("mlx", "mlx_lm")
    packages = ("mlx", "mlx-lm")
    bench_specs = ("mlx:8bit", "mlx:4bit")
    speed_note = "MLX ran on the CPU of a non-Apple machine: its quality figures are real, its speed is not representative."
    recipe_version = 2  # 2: min/max grids by default (was mx.quantize's rounding)
    bench_seconds = 38  # from an empty cache, 2026-12-04: conversion ~16 s, 4 windows scored through OpenBLAS
    # bench/scale.py, 2026-12-04: mlx:4bit of random-initialised Llamas of 135M-1.17B parameters
    # (bf16), process-tree PSS; 1.88 GB at 1.17B.
    conversion_peak = (0.47, 0.73)
    precisions = {
        **{name: Precision(name, bits, _bpw(bits), f"{bits}-bit affine, groups of {DEFAULT_GROUP}") for name, bits in _UNIFORM.items()},
        **{name: Precision(name, low, _bpw(low) + 0.5, f"{low}-bit affine, sensitive layers at {high}-bit")
           for name, (low, high) in _MIXED.items()},
        "fp16": Precision("fp16", 16, 16.0, "float16, no quantization"),
    }
    options = {
        "group": Option("group", int, DEFAULT_GROUP, "quantization group size", choices=(32, 64, 128), applies_to=_QUANTIZED),
        "embed_bits": Option("embed_bits", int, DEFAULT_EMBED_BITS,
                             "bits of the embedding and output layer (0 = same as the rest)", choices=(0, 4, 6, 8),
                             applies_to=_QUANTIZED),
        "grid": Option("grid", str, DEFAULT_GRID, "group grid: min/max of the weights, or mx.quantize's rounding",
                       choices=("minmax", "mlx"), applies_to=_QUANTIZED),
        "lora": Option("lora", str, "merged", "a LoRA adapter (--adapter) merged into the weights, or the base model "
                       "plus the adapter in mlx-lm's format, applied when the model loads", choices=("merged", "separate")),
    }

    def speed_is_representative(self) -> bool:
        return is_apple_silicon()

    def neighbours(self, spec) -> list[str]:
        """Quantized specs: the next group sizes."""
        if spec.precision not in _QUANTIZED:
            return []
        return [str(s) for s in self.adjacent_choices(spec, "group")]

    def install_hint(self) -> str:
        return INSTALL_HINT

    def check_source(self, source) -> None:
        check_architecture(source)

    def limitations(self, source) -> list[str]:
        config = source.config
        model_type = config.get("model_type")
        if model_type in _APPLIES_SLIDING_WINDOW or (
                model_type in _LLAMA_STYLE and "sliding_attention" in config.get("layer_types", ())):
            return []
        # Measured on the tiny models with a 32-token window over 64 tokens: Mistral KLD 0.27, Gemma-2 0.006.
        return window_ignored(config, f"mlx-lm's {model_type} model attends over the whole context")

    def convert(self, source, spec, out_dir: Path) -> dict[str, Any]:
        """`?lora=separate`: the base model the source's adapter was merged into, converted as
        always, plus the adapter in mlx-lm's format (lora.py); the artifact's source stays the
        merged folder, so evaluation compares it with the adapted float model."""
        if self.option_values(spec).lora == "merged":
            return self._convert_model(source, spec, out_dir)
        from edgequant.adaptation.merge import merged_parts
        from edgequant.backends.mlx.engine import load_model
        from edgequant.backends.mlx.lora import write_adapter

        base, adapter = merged_parts(source, blocks_only="MLX")
        check_architecture(base)
        info = self._convert_model(base, spec, out_dir)
        started = time.perf_counter()
        info["adapter"] = write_adapter(adapter, load_model(out_dir, info["mlx_model_type"]), out_dir)
        info["timings"]["adapter_s"] = round(time.perf_counter() - started, 3)
        return info

    def _convert_model(self, source, spec, out_dir: Path) -> dict[str, Any]:
        from edgequant.backends._shared.hf_tokenizer import write_tokenizer_json

        plan = quant_plan(spec, self.option_values(spec))
        started = time.perf_counter()
        _run_converter(source.hf_dir, out_dir, plan)
        write_tokenizer_json(source.hf_dir, out_dir)  # mlx-lm saves one for fast tokenizers only
        regridded = _regrid(source.hf_dir, out_dir, plan)
        return {
            "model_file": MODEL_FILE,
            "mlx_model_type": mlx_model_type(source),  # the mlx-lm model definition the runner loads
            "quantization": plan,
            **({"grid_layers": regridded} if regridded else {}),
            "speed_representative": is_apple_silicon(),
            "timings": {"convert_s": round(time.perf_counter() - started, 3)},
        }

    def open(self, artifact, *, n_ctx: int, need_logits: bool, threads: int):
        from edgequant.backends.mlx.runner import MLXRunner

        return MLXRunner(artifact.path, name=str(artifact.spec), n_ctx=n_ctx, model_type=_model_type(artifact),
                         threads=threads, adapter=artifact.adapter_path)

    def adapter_base(self, artifact) -> str | None:
        """The weights and the config mlx-lm builds the model from: the same for a `?lora=separate`
        artifact and the plain one of its base."""
        from edgequant.fingerprint import files_sha256

        return f"mlx:{files_sha256(sorted(artifact.path.glob('model*.safetensors')) + [artifact.path / 'config.json'])}"

    def open_shared(self, artifacts, *, n_ctx: int, threads: int):
        from edgequant.backends.mlx.runner import MLXRunner

        first = next(iter(artifacts.values()))
        return MLXRunner(first.path, name="+".join(artifacts), n_ctx=n_ctx, model_type=_model_type(first), threads=threads,
                         adapters={name: a.adapter_path for name, a in artifacts.items()})

    def estimated_bytes(self, precision: str, tensors, tied_embeddings: bool = False) -> int:
        """Default group size; embeddings and output layer at DEFAULT_EMBED_BITS; 1-D in float16."""
        base = self.precisions[precision].bpw
        edge = _bpw(DEFAULT_EMBED_BITS) if precision != "fp16" else 16.0
        total = 0.0
        for t in tensors:
            is_edge = "embed_tokens" in t.name or "lm_head" in t.name
            total += t.numel * (16.0 if len(t.shape) < 2 else max(edge, base) if is_edge else base)
        return int(total / 8)


def _model_type(artifact) -> str:
    """The mlx-lm model definition the artifact's weights load into."""
    details = artifact.manifest.get("details") or {}
    return details.get("mlx_model_type") or json.loads((artifact.path / "config.json").read_text())["model_type"]


def supported_model_types() -> list[str]:
    import mlx_lm.models

    folder = Path(next(iter(mlx_lm.models.__path__)))
    helpers = ("base", "cache", "rope_utils", "switch_layers", "activations", "pipeline", "ssm", "bitlinear_layers")
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_") and p.stem not in helpers)


def mlx_model_type(source) -> str:
    """The mlx-lm model definition that implements the source's model_type (mistral -> llama, ...)."""
    require_mlx()
    from mlx_lm.utils import MODEL_REMAPPING

    model_type = source.config.get("model_type")
    return MODEL_REMAPPING.get(model_type, model_type)


def check_architecture(source) -> None:
    model_type = source.config.get("model_type")
    supported = supported_model_types()
    if mlx_model_type(source) not in supported:
        raise EdgequantError(f"mlx-lm has no implementation of architecture {source.architecture!r} (model_type {model_type!r})",
                             "convert a model of a supported model_type: " + ", ".join(supported))


def quant_plan(spec, opt) -> dict:
    """Bits per layer class, validated before any work starts; recorded in the manifest."""
    group, embed, grid = opt.group, opt.embed_bits, opt.grid
    if spec.precision == "fp16":
        return {"bits": 16, "group_size": None, "recipe": None, "embed_bits": 16}
    low, high = _MIXED.get(spec.precision, (_UNIFORM.get(spec.precision), None))
    return {"bits": low, "high_bits": high, "group_size": group, "recipe": spec.precision if high else None,
            "embed_bits": max(embed, low) if embed else low, "grid": grid}


def _predicate(plan: dict, num_layers: int):
    """Which bits each module gets: mlx-lm's convert calls this per quantizable module."""
    low, high, group, embed = plan["bits"], plan["high_bits"], plan["group_size"], plan["embed_bits"]

    def sensitive(index: int) -> bool:  # the layer pattern of mlx-lm's mixed recipes
        return index < num_layers // 8 or index >= 7 * num_layers // 8 or (index - num_layers // 8) % 3 == 2

    def choose(path: str, module, config=None):
        if "embed_tokens" in path or "lm_head" in path:
            return {"group_size": group, "bits": max(embed, high or 0)}
        parts = [p for p in path.split(".") if p.isdigit()]
        if high and parts and ("v_proj" in path or "down_proj" in path) and sensitive(int(parts[0])):
            return {"group_size": group, "bits": high}
        return {"group_size": group, "bits": low}

    return choose


def _regrid(hf_dir: Path, out_dir: Path, plan: dict) -> dict | None:
    """Replace mlx's rounding with min/max grids (grid.py) unless the spec asks for grid=mlx."""
    if plan["bits"] >= 16 or plan.get("grid") != "minmax":
        return None
    from edgequant.backends.mlx.grid import regrid
    from edgequant.progress import step

    with step("re-quantizing onto min/max grids"):
        return regrid(out_dir, hf_dir, MODEL_FILE)


def _run_converter(hf_dir: Path, out_dir: Path, plan: dict) -> None:
    """mlx-lm refuses an existing output folder, so it writes to a fresh subfolder we then empty."""
    import contextlib
    import io

    from mlx_lm import convert

    staging = out_dir / "_mlx"
    quantize = plan["bits"] < 16
    num_layers = json.loads((hf_dir / "config.json").read_text()).get("num_hidden_layers", 0)
    with contextlib.redirect_stdout(io.StringIO()):  # mlx-lm prints progress we replace with our own
        convert(str(hf_dir), str(staging), quantize=quantize, q_bits=plan["bits"] if quantize else 4,
                q_group_size=plan["group_size"] or 64, dtype="float16",
                quant_predicate=_predicate(plan, num_layers) if quantize else None)
    for item in staging.iterdir():
        shutil.move(str(item), out_dir / item.name)
    staging.rmdir()
    if not (out_dir / MODEL_FILE).is_file():
        shards = sorted(out_dir.glob("model*.safetensors"))
        raise EdgequantError(f"mlx-lm wrote {[s.name for s in shards]}, not one {MODEL_FILE}", "report this model")
