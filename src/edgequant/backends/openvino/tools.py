"""OpenVINO building blocks: float IR export (cached), tokenizer IRs, NNCF weight compression.

The float IR is exported once per source through optimum-intel and cached, like the float GGUF:
every precision then starts from `ov.Model` and NNCF's `compress_weights`, which exposes every
knob (mode, group size, ratio, backup precision, AWQ, scale estimation, GPTQ, sensitivity).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgequant.errors import EdgequantError

TASK = "text-generation-with-past"  # offline export cannot infer the task (ENGINES.md)
MODEL_XML = "openvino_model.xml"
_TOKENIZER_IRS = ("openvino_tokenizer.xml", "openvino_tokenizer.bin", "openvino_detokenizer.xml", "openvino_detokenizer.bin")


@dataclass(frozen=True)
class CompressSettings:
    """What NNCF is asked to do; written into the manifest as is."""

    mode: str  # nncf CompressWeightsMode value, e.g. "int4_asym"
    group_size: int = -1  # -1: per output channel
    ratio: float = 1.0
    backup_mode: str = "int8_asym"
    all_layers: bool = False  # also put embeddings and the output layer at the primary precision
    awq: bool = False
    scale_estimation: bool = False
    gptq: bool = False
    sensitivity: str = ""  # "" lets NNCF choose
    samples: int = 0  # calibration sequences, 0 = data-free

    @property
    def data_aware(self) -> bool:
        """Needs calibration data: AWQ, scale estimation, GPTQ, or an activation-based sensitivity
        choosing which layers stay 8-bit (weight_quantization_error reads the weights only)."""
        activation_sensitivity = self.sensitivity not in ("", "weight_quantization_error")
        return self.awq or self.scale_estimation or self.gptq or (activation_sensitivity and self.ratio < 1)


def supported_model_types() -> list[str]:
    import optimum.exporters.openvino  # noqa: F401  (registers the openvino exporter's model types)
    from optimum.exporters.tasks import TasksManager

    return sorted(TasksManager.get_supported_model_type_for_task(TASK, exporter="openvino"))


def check_architecture(source) -> None:
    model_type = source.config.get("model_type")
    supported = supported_model_types()
    if model_type not in supported:
        raise EdgequantError(
            f"optimum-intel cannot export architecture {source.architecture!r} (model_type {model_type!r}) to OpenVINO",
            "convert a model of a supported model_type: " + ", ".join(supported),
        )


def float_ir(source) -> Path:
    """The source exported to a float IR with its tokenizer IRs, once per fingerprint (cached). The
    weights keep the source's float type: a bf16 or f16 model gives a 16-bit IR (a float32 one
    would double the export's memory and the IR's size for nothing the compression uses)."""
    from edgequant.backends._shared.intermediates import cached_intermediate

    dtype = ir_dtype(source)

    def build(tmp: Path) -> None:
        _export(source.hf_dir, tmp, dtype)
        write_tokenizers(source.hf_dir, tmp)

    # "-2": the tokenizer IRs made with it are bounded by the model's context (see write_tokenizers);
    # an intermediate made before would hand the old IRs to every new artifact.
    return cached_intermediate(source, f"openvino-{dtype}-2", MODEL_XML, build,
                               f"exporting {source.name} to an OpenVINO IR with optimum-intel")


def ir_dtype(source) -> str:
    """f32 for a float32 source (and anything unusual), else the 16-bit type it is stored in."""
    return {"BF16": "bf16", "F16": "f16"}.get(source.weight_dtype, "f32")


def _export(hf_dir: Path, out: Path, dtype: str) -> None:
    from optimum.exporters.openvino import main_export

    # An explicit OVConfig: without one optimum-intel compresses a model of 1B parameters or more to
    # int8 on its own. dtype "fp32" makes it load and trace a 16-bit model in float32; None keeps the
    # checkpoint's type (it traces 16-bit weights as they are and the IR stores them so).
    from optimum.intel import OVConfig

    from edgequant.progress import engine_warnings_hidden

    with engine_warnings_hidden():  # the tracer's warnings about constant shapes are expected; not the user's concern
        main_export(str(hf_dir), str(out), task=TASK, ov_config=OVConfig(dtype="fp32" if dtype == "f32" else None),
                    convert_tokenizer=False, library_name="transformers")


def write_tokenizers(hf_dir: Path, out: Path) -> None:
    """Tokenizer and detokenizer IRs for LLMPipeline. Special tokens are not added at tokenization,
    matching the Runner contract (the pipeline adds what the chat template asks for)."""
    import openvino as ov
    from openvino_tokenizers import convert_tokenizer

    from edgequant.sources.auto_tokenizer import auto_tokenizer

    tokenizer = auto_tokenizer(hf_dir)
    # The model's context as the IR's length bound: left unset, a tokenizer whose post-processor adds
    # BOS (Gemma's) gets INT32_MAX there, and LLMPipeline's own adjustment of it overflows
    # ("2147483648 assigned value out of range for i32") before the pipeline loads.
    context = json.loads((hf_dir / "config.json").read_text()).get("max_position_embeddings") or 2**20
    ov_tokenizer, ov_detokenizer = convert_tokenizer(tokenizer, with_detokenizer=True, add_special_tokens=False,
                                                     skip_special_tokens=True, max_length=int(context))
    ov.save_model(ov_tokenizer, str(out / "openvino_tokenizer.xml"))
    ov.save_model(ov_detokenizer, str(out / "openvino_detokenizer.xml"))
    _check_tokenizer_ir(ov.Core().compile_model(ov_tokenizer, "CPU"), tokenizer)


def _check_tokenizer_ir(compiled, tokenizer) -> None:
    """LLMPipeline tokenizes chat prompts with the IR while edgequant scores with the Hugging Face
    tokenizer: refuse an IR whose ids differ on real prose."""
    from edgequant.measurement.evaldata import default_calibration_text
    from edgequant.measurement.logprobs import first_difference

    text = default_calibration_text()[:4000]
    expected = tokenizer(text, add_special_tokens=False, verbose=False).input_ids
    got = [int(t) for t in compiled([text])["input_ids"][0]]
    if got != expected:
        raise EdgequantError(
            f"the OpenVINO tokenizer IR disagrees with the model's tokenizer at token {first_difference(got, expected)}",
            "upgrade openvino-tokenizers to the version in constraints.txt, or report this tokenizer",
        )


def copy_side_files(hf_dir: Path, intermediate: Path, out: Path) -> None:
    """The tokenizer IRs, and the config, generation settings and Hugging Face tokenizer, so
    optimum-intel and LLMPipeline find them; the export's config.json first (optimum-intel wrote it)."""
    from edgequant.backends._shared.side_files import MODEL_CONFIG_FILES, copy_side_files, copy_tokenizer

    copy_side_files(_TOKENIZER_IRS + MODEL_CONFIG_FILES, out, intermediate, hf_dir)
    copy_tokenizer(out, intermediate, hf_dir)


def calibration_samples(hf_dir: Path, count: int, seq_len: int, text: str | None = None) -> list[dict]:
    """`count` windows of `seq_len` tokens of the calibration text, as the IR's input dicts."""
    import numpy as np

    from edgequant.backends._shared.calibration import calibration_windows

    windows = np.asarray(calibration_windows(
        hf_dir, count, seq_len, text,
        fix="lower samples= to at most {fit}, give a longer calib= file, or drop the data-aware options"), dtype=np.int64)
    return [{"input_ids": w[None, :], "attention_mask": np.ones((1, seq_len), dtype=np.int64),
             "position_ids": np.arange(seq_len, dtype=np.int64)[None, :], "beam_idx": np.zeros(1, dtype=np.int32)}
            for w in windows]


def compress(model, settings: CompressSettings, samples: list[dict] | None):
    """Apply NNCF weight compression to an `ov.Model` in place of its float weights."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    from edgequant.progress import engine_stdout_to_stderr

    kwargs = {"mode": nncf.CompressWeightsMode(settings.mode)}
    if settings.mode.startswith("int4"):
        kwargs.update(group_size=settings.group_size, ratio=settings.ratio, all_layers=settings.all_layers,
                      backup_mode=nncf.BackupMode(settings.backup_mode), awq=settings.awq,
                      scale_estimation=settings.scale_estimation, gptq=settings.gptq)
        if settings.sensitivity:
            kwargs["sensitivity_metric"] = nncf.SensitivityMetric(settings.sensitivity)
        # Rows not divisible by the group (hidden 576 with group 128) get the largest power-of-two
        # group that divides them, instead of an error.
        kwargs["advanced_parameters"] = AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST)
    if samples:
        kwargs.update(dataset=nncf.Dataset(samples), subset_size=len(samples))
    with engine_stdout_to_stderr():
        return nncf.compress_weights(model, **kwargs)


def weight_constant_types(xml: Path) -> dict[str, int]:
    """How many weight constants of each element type the IR holds (the proof of compression)."""
    import openvino as ov

    counts: dict[str, int] = {}
    for op in ov.Core().read_model(str(xml)).get_ops():
        if op.get_type_name() == "Constant" and len(op.get_output_partial_shape(0)) >= 2:
            name = op.get_output_element_type(0).get_type_name()
            counts[name] = counts.get(name, 0) + 1
    return counts


def inference_precision() -> dict[str, str]:
    """What the CPU plugin computes in on this machine by default: f32, or bf16 where the CPU has
    AVX512-BF16/AMX; the KV cache's precision; the group size of its dynamic activation
    quantization (0: off). Each moves quality figures between machines (on the default model they
    account for about half of openvino:int8's KLD), so the manifest records them."""
    import openvino as ov

    core = ov.Core()
    caps = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    kv_cache, group = _cpu_property(core, "KV_CACHE_PRECISION"), _cpu_property(core, "DYNAMIC_QUANTIZATION_GROUP_SIZE")
    return {"inference_precision": short_type_name(core.get_property("CPU", "INFERENCE_PRECISION_HINT")),
            "runtime": {"kv_cache_precision": short_type_name(kv_cache) if kv_cache is not None else None,
                        "dynamic_quantization_group_size": int(group) if group is not None else None},
            "cpu_capabilities": " ".join(str(c) for c in caps)}


def _cpu_property(core, name: str):
    """A CPU plugin property, or None where this OpenVINO version does not have it."""
    try:
        return core.get_property("CPU", name)
    except RuntimeError:
        return None


def short_type_name(element_type) -> str:
    """`<Type: 'bfloat16'>` -> "bf16"."""
    name = element_type.get_type_name() if hasattr(element_type, "get_type_name") else str(element_type)
    return {"bf16": "bf16", "f32": "f32", "f16": "f16", "bfloat16": "bf16", "float32": "f32", "float16": "f16"}.get(name, name)
