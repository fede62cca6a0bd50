"""OpenVINO backend: optimum-intel exports a float IR, NNCF compresses its weights.

The artifact is a folder `openvino_genai.LLMPipeline` runs as is: the model IR, the tokenizer and
detokenizer IRs (openvino-tokenizers) and the source's config and generation settings.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgequant.backend import Backend
from edgequant.errors import EdgequantError
from edgequant.sources.tasks import IMAGE_CLASSIFICATION, SENTENCE_EMBEDDING
from edgequant.spec import Option, Precision

SENSITIVITY = ("auto", "weight_quantization_error", "hessian_input_activation", "mean_activation_variance",
               "max_activation_variance", "mean_activation_magnitude")
_INT4 = ("int4",)
SEQ_LEN = 128  # tokens per calibration sequence

# Defaults chosen by measurement on the default model (bench/results/openvino_mlx.json).
DEFAULT_GROUP = 32
DEFAULT_SYM = False
DEFAULT_RATIO = 0.4  # 40% of layers int4, the rest int8: 120 MiB; all-int4 loses +28% ppl
# Data-aware by default, AWQ alone on 16 sequences: measured on the default model at group 32, ratio
# 0.4 (8 windows of 512): data-free +9.46% ppl (over the target's +9.17%); AWQ, 16 samples +3.50%,
# KLD 0.053, ~30 s; AWQ + scale estimation, 64 samples +4.29%, KLD 0.058, ~300 s; scale estimation
# alone, 32 samples +4.21%, ~110 s. Scale estimation is the slow part and did not help here.
DEFAULT_AWQ = True
DEFAULT_SCALE_ESTIMATION = False
DEFAULT_SAMPLES = 16


class OpenVINOBackend(Backend):
    name = "openvino"
    display_name = "OpenVINO"
    use_case = "Intel CPU, integrated GPU and NPU"
    extra = "openvino"
    requires = ("openvino", "openvino_genai", "openvino_tokenizers", "nncf", "optimum.intel")
    packages = ("openvino", "openvino-genai", "openvino-tokenizers", "nncf", "optimum-intel")
    bench_specs = ("openvino:int8", "openvino:int4")
    # 2: int4 default AWQ alone on 16 samples (was AWQ + scale estimation on 64); 3: tokenizer IRs bounded
    # by the model's context (LLMPipeline could not load a BOS-adding tokenizer's IR)
    recipe_version = 3
    bench_seconds = 45
    # bench/scale.py, 2026-12-04: openvino:int4 of random-initialised Llamas of 135M-1.17B parameters
    # (bf16), process-tree PSS; 5.34 GB at 1.17B, most of it NNCF's data-aware statistics, which run
    # the model on the CPU plugin (data-free compression of the 0.5B peaked at 2.19 GB, not 3.02).
    conversion_peak = (1.89, 0.91)
    # A sentence encoder: the shared float32 ONNX export read by OpenVINO; its int8 is NNCF's
    # post-training quantization of weights and activations (encoder.py), not weight-only.
    # An image classifier the same way, with NNCF's accuracy-controlled variant as an option (vision.py).
    task_precisions = {SENTENCE_EMBEDDING: ("fp32", "fp16", "int8"), IMAGE_CLASSIFICATION: ("fp32", "fp16", "int8")}
    precisions = {
        "fp32": Precision("fp32", 32, 32.0, "float32 weights, inference in the plugin's precision"),
        "fp16": Precision("fp16", 16, 16.0, "float16 weights, inference in the plugin's precision"),
        "int8": Precision("int8", 8, 8.1, "8-bit weights per output channel (NNCF), activations float"),
        "int4": Precision("int4", 4, 6.5, "4-bit weights in groups (NNCF), sensitive layers and embeddings at 8-bit"),
    }
    options = {
        "group": Option("group", int, DEFAULT_GROUP, "int4 group size", choices=(32, 64, 128), applies_to=_INT4),
        "ratio": Option("ratio", float, DEFAULT_RATIO, "share of int4 layers, the rest at 8-bit", minimum=0.0, maximum=1.0,
                        applies_to=_INT4),
        "sym": Option("sym", bool, DEFAULT_SYM, "symmetric quantization (no zero point)", applies_to=("int8", "int4")),
        "awq": Option("awq", bool, DEFAULT_AWQ, "activation-aware weight scaling (data-aware)", applies_to=_INT4),
        "scale_estimation": Option("scale_estimation", bool, DEFAULT_SCALE_ESTIMATION,
                                   "fit int4 scales on calibration data (slow)", applies_to=_INT4),
        "gptq": Option("gptq", bool, False, "GPTQ error-compensating rounding (data-aware, slow)", applies_to=_INT4),
        "sensitivity": Option("sensitivity", str, "auto", "metric choosing which layers stay 8-bit when ratio<1",
                              choices=SENSITIVITY, applies_to=_INT4),
        "all_layers": Option("all_layers", bool, False, "put embeddings and the output layer at int4 too", applies_to=_INT4),
        "samples": Option("samples", int, DEFAULT_SAMPLES, f"calibration sequences of {SEQ_LEN} tokens", minimum=1, maximum=1024,
                          applies_to=_INT4),
        "calib": Option("calib", str, "", "calibration text file (default: gensim's lee_background.cor)", applies_to=_INT4),
        "infer": Option("infer", str, "auto", "CPU inference precision hint", choices=("auto", "f32", "bf16")),
        "kv_cache": Option("kv_cache", str, "auto", "KV cache precision (auto: the plugin's, u8 on CPUs today)",
                           choices=("auto", "f32", "f16", "u8")),
        "max_drop": Option("max_drop", float, 0.0, "int8 of an image classifier: NNCF's accuracy-controlled quantization, "
                           "layers back to float until top-1 agreement with fp32 on held-out views drops by at most this "
                           "(0: off, plain quantize)", minimum=0.0, maximum=1.0, applies_to=("int8",)),
        "dyn_quant": Option("dyn_quant", int, -1, "dynamic activation quantization group size (-1: the plugin's, 0: off)",
                            minimum=-1, maximum=4096),
        "lora": Option("lora", str, "merged", "with --adapter: merged into the float weights before converting, or separate "
                       "(the base model's IR, the adapter beside it as adapter.safetensors, applied by OpenVINO GenAI and "
                       "by the scorer)", choices=("merged", "separate")),
    }

    def neighbours(self, spec) -> list[str]:
        """int4: the next group sizes, and a fifth more or fewer layers kept at 8 bit."""
        if spec.precision != "int4":
            return []
        opt = self.option_values(spec)
        found = self.adjacent_choices(spec, "group")
        found += [spec.with_options(ratio=round(r, 2)) for r in (opt.ratio - 0.2, opt.ratio + 0.2) if 0 <= r <= 1]
        return [str(s) for s in found]

    def validate(self, spec) -> None:
        settings = self.compress_settings(spec)
        if (settings is None or settings.samples == 0) and ("calib" in spec.options or "samples" in spec.options):
            raise EdgequantError("calib= and samples= only apply to data-aware compression",
                                 "add awq=1, scale_estimation=1, gptq=1, or a data-aware sensitivity with ratio<1")

    def check_source(self, source) -> None:
        from edgequant.backends.openvino.tools import check_architecture

        check_architecture(source)

    def convert(self, source, spec, out_dir: Path) -> dict[str, Any]:
        """`?lora=separate`: the base model the source's adapter was merged into, converted as
        always, plus the adapter in OpenVINO GenAI's form (lora.py), checked to reach every module
        it adapts in the IR; the artifact's source stays the merged folder, so evaluation compares
        it with the adapted float model."""
        if self.option_values(spec).lora == "merged":
            return self._convert_model(source, spec, out_dir)
        from edgequant.adaptation.merge import merged_parts
        from edgequant.backends.openvino.lora import ADAPTER_FILE, write_adapter

        base, adapter = merged_parts(source, blocks_only="OpenVINO")
        info = self._convert_model(base, spec, out_dir)
        started = time.perf_counter()
        info["adapter"] = write_adapter(adapter, out_dir / ADAPTER_FILE)
        info["adapter"]["branches"] = _check_adapter(out_dir)
        info["timings"]["adapter_s"] = round(time.perf_counter() - started, 3)
        return info

    def _convert_model(self, source, spec, out_dir: Path) -> dict[str, Any]:
        from edgequant.backends.openvino import tools

        if "max_drop" in spec.options:
            raise EdgequantError(f"max_drop= of {spec} applies to image classifiers, not to the causal LM {source.name}",
                                 "drop max_drop=")

        settings = self.compress_settings(spec)
        samples = _calibration(source, spec, settings)  # a short text fails here, before the export
        started = time.perf_counter()
        intermediate = tools.float_ir(source)
        exported = time.perf_counter()
        _write_model(intermediate, out_dir, settings, samples, to_fp16=spec.precision != "fp32")
        tools.copy_side_files(source.hf_dir, intermediate, out_dir)
        return {
            "model_file": tools.MODEL_XML,
            "intermediate": {"path": str(intermediate), "type": tools.ir_dtype(source)},
            "compression": settings.__dict__ if settings else {"mode": spec.precision},
            "calibration": {"sequences": len(samples), "tokens_each": SEQ_LEN,
                            "text": spec.options.get("calib") or "lee_background.cor (gensim)"} if samples else None,
            "weight_constants": tools.weight_constant_types(out_dir / tools.MODEL_XML),
            **tools.inference_precision(),
            **({"inference_precision": spec.options["infer"]} if "infer" in spec.options else {}),
            "timings": {"export_s": round(exported - started, 3), "compress_s": round(time.perf_counter() - exported, 3)},
        }

    def convert_task(self, source, spec, out_dir: Path) -> dict[str, Any]:
        if self.option_values(spec).lora == "separate":
            raise EdgequantError(f"?lora=separate applies to text-generation models; {source.name} is a {source.task} model",
                                 "drop ?lora=separate: the adapter is then merged into the float weights")
        if source.task == IMAGE_CLASSIFICATION:
            from edgequant.backends.openvino.vision import convert_vision

            return convert_vision(source, spec, out_dir)
        from edgequant.backends.openvino.encoder import convert_encoder

        return convert_encoder(source, spec, out_dir)

    def open_task(self, artifact, *, threads: int):
        if artifact.task == IMAGE_CLASSIFICATION:
            from edgequant.backends.openvino.vision import OpenVINOVisionRunner

            return OpenVINOVisionRunner(artifact.path, artifact.manifest["model_file"], name=str(artifact.spec), threads=threads,
                                        infer=self.option_values(artifact.spec).infer)
        from edgequant.backends.openvino.encoder import OpenVINOEncoderRunner

        return OpenVINOEncoderRunner(artifact.path, artifact.manifest["model_file"], name=str(artifact.spec), threads=threads)

    def open(self, artifact, *, n_ctx: int, need_logits: bool, threads: int):
        from edgequant.backends.openvino.runner import OpenVINORunner

        return OpenVINORunner(artifact.path, name=str(artifact.spec), n_ctx=n_ctx, threads=threads,
                              runtime=runtime_properties(self.option_values(artifact.spec)), adapter=artifact.adapter_path)

    def adapter_base(self, artifact) -> str | None:
        """The IR and the properties the plugin compiles it with. `openvino:PREC?lora=separate`
        writes the base's weights byte for byte, and its graph but for the names OpenVINO numbers
        as it builds nodes (`Convert_125005`), which are left out of the graph's identity."""
        import hashlib
        import re

        from edgequant.fingerprint import file_sha256

        xml = (artifact.path / "openvino_model.xml").read_text(encoding="utf-8")
        graph = hashlib.sha256(re.sub(r' name="[^"]*_\d+"', "", xml).encode()).hexdigest()
        runtime = sorted(runtime_properties(self.option_values(artifact.spec)).items())
        return f"openvino:{file_sha256(artifact.path / 'openvino_model.bin')}:{graph}:{runtime}"

    def open_shared(self, artifacts, *, n_ctx: int, threads: int):
        from edgequant.backends.openvino.runner import OpenVINORunner

        first = next(iter(artifacts.values()))
        return OpenVINORunner(first.path, name="+".join(artifacts), n_ctx=n_ctx, threads=threads,
                              runtime=runtime_properties(self.option_values(first.spec)),
                              adapters={name: a.adapter_path for name, a in artifacts.items()})

    def compress_settings(self, spec):
        """The NNCF settings a spec asks for (None for the float precisions)."""
        from edgequant.backends.openvino.tools import CompressSettings

        if spec.precision in ("fp32", "fp16"):
            return None
        opts = self.option_values(spec)
        mode = f"{spec.precision}_{'sym' if opts.sym else 'asym'}"
        if spec.precision == "int8":
            return CompressSettings(mode=mode)
        settings = CompressSettings(
            mode=mode, group_size=opts.group, ratio=opts.ratio, all_layers=opts.all_layers, awq=opts.awq,
            scale_estimation=opts.scale_estimation, gptq=opts.gptq,
            sensitivity="" if opts.sensitivity == "auto" else opts.sensitivity,
        )
        return replace(settings, samples=opts.samples if settings.data_aware else 0)

    def estimated_bytes(self, precision: str, tensors, tied_embeddings: bool = False) -> int:
        """Default settings: int4 groups with an f16 scale (and a u4 zero point when asymmetric),
        embeddings and output layer at int8 per channel; 1-D tensors in f16."""
        if precision != "int4":
            bpw = self.precisions[precision].bpw
            return int(sum(t.numel * (bpw if len(t.shape) >= 2 else 16.0) for t in tensors) / 8)
        int4_bpw = 4 + (16 + (0 if DEFAULT_SYM else 4)) / DEFAULT_GROUP
        int4_bpw = DEFAULT_RATIO * int4_bpw + (1 - DEFAULT_RATIO) * self.precisions["int8"].bpw
        total = 0.0
        for t in tensors:
            edge = "embed_tokens" in t.name or "lm_head" in t.name or "wte" in t.name
            total += t.numel * (16.0 if len(t.shape) < 2 else self.precisions["int8"].bpw if edge else int4_bpw)
        return int(total / 8)


def runtime_properties(opts) -> dict:
    """CPU plugin properties the spec sets; what it leaves at auto keeps the plugin's default for
    this CPU (bf16 inference where it has AMX/AVX512-BF16, a u8 KV cache, dynamic quantization)."""
    chosen = {"INFERENCE_PRECISION_HINT": opts.infer, "KV_CACHE_PRECISION": opts.kv_cache,
              "DYNAMIC_QUANTIZATION_GROUP_SIZE": opts.dyn_quant}
    return {k: v for k, v in chosen.items() if v not in ("auto", -1)}


def _check_adapter(out_dir: Path) -> int:
    """How many MatMuls of the artifact's IR the adapter reaches; every module it adapts must be one
    (lora.add_branches refuses otherwise, before GenAI would silently leave a module unadapted)."""
    import openvino as ov

    from edgequant.backends.openvino.lora import ADAPTER_FILE, add_branches, read_adapter
    from edgequant.backends.openvino.tools import MODEL_XML

    return add_branches(ov.Core().read_model(str(out_dir / MODEL_XML)), read_adapter(out_dir / ADAPTER_FILE))


def _calibration(source, spec, settings) -> list[dict]:
    from edgequant.backends.openvino.tools import calibration_samples
    from edgequant.measurement.evaldata import read_text_file

    if settings is None or settings.samples == 0:
        return []
    text = read_text_file(spec.options["calib"]) if spec.options.get("calib") else None
    return calibration_samples(source.hf_dir, settings.samples, SEQ_LEN, text)


def _write_model(intermediate: Path, out_dir: Path, settings, samples: list[dict], to_fp16: bool) -> None:
    import openvino as ov

    from edgequant.backends.openvino.tools import MODEL_XML, compress
    from edgequant.progress import step

    model = ov.Core().read_model(str(intermediate / MODEL_XML))
    if settings is None:
        ov.save_model(model, str(out_dir / MODEL_XML), compress_to_fp16=to_fp16)
        return
    with step(f"compressing weights with NNCF ({settings.mode}{', data-aware' if samples else ''})"):
        model = compress(model, settings, samples or None)
    ov.save_model(model, str(out_dir / MODEL_XML), compress_to_fp16=True)
