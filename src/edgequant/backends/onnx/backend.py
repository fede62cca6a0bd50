"""ONNX backend: the onnxruntime-genai model builder (what Olive uses for LLMs), then
onnxruntime.quantization where the builder has no option (int8 dynamic, int8 static QDQ).

The artifact folder is what onnxruntime-genai loads as is: model.onnx + model.onnx.data,
genai_config.json and the tokenizer files.

int4 defaults were chosen by measurement on the default model (ppl increase over PyTorch, 2
windows of 512 tokens; gguf:q4_k_m is +6.1%): builder int4 as is (k_quant, sym) +468%; rtn sym with
an 8-bit LM head +36%; rtn or k_quant asym with an 8-bit LM head +21%; HQQ (float zero points)
block 32 with an 8-bit LM head shared with the tied embedding +0.13% at 109 MiB. Float zero points
matter here because the default model's weights came from a Q4_1 (min + scale) GGUF; they are
folded out afterwards so onnxruntime's packed kernels run them (see `hqq.py`).

int8 and int8-static defaults, measured the same way (gguf:q8_0 is +0.26%): onnxruntime's
quantize_dynamic (one activation scale per tensor) +70%, with all down_proj float +5.4%; int8
weights alone (activations float) KLD 0.005, so activations were the loss. Per-token activation
scales (`int8.py`) +2.5% over 4 windows with every MatMul int8. Static QDQ cannot scale per
token; see `tools.quantize_static_qdq` for the exclusions and calibration settings tried.
SmoothQuant (`smooth`, alpha 0.5, _shared/smoothquant.py) before calibration took int8-static
from KLD 0.119 [0.104, 0.135] (+8.5% ppl) to 0.073 [0.064, 0.082] (+4.6%), 2 windows; with
down_proj and the LM head quantized too it still lost +193%.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from edgequant.backend import Backend
from edgequant.backends._shared.sliding_window import window_ignored
from edgequant.errors import EdgequantError
from edgequant.sources.tasks import IMAGE_CLASSIFICATION, SENTENCE_EMBEDDING
from edgequant.spec import Option, Precision

# The builder's own -p for each precision; int8 variants start from its fp32 export.
_BUILDER_PRECISION = {"fp32": "fp32", "fp16": "fp16", "int4": "int4", "int8": "fp32", "int8-static": "fp32"}
_INT4 = ("int4",)
_STATIC = ("int8-static",)
_INT8 = ("int8",)


class OnnxBackend(Backend):
    name = "onnx"
    display_name = "ONNX Runtime"
    use_case = "cross-platform apps, Windows (DirectML), ORT-GenAI"
    extra = "onnx"
    requires = ("onnxruntime", "onnxruntime_genai", "onnx")
    packages = ("onnxruntime-genai", "onnxruntime", "onnx")
    bench_specs = ("onnx:int8", "onnx:int4")
    # 2: int8 per-token activations (was quantize_dynamic), int8-static keeps down_proj/lm_head
    # float, fp16 drops the builder's wrong shape annotations
    recipe_version = 5  # 3: HQQ zero points folded (fast kernels); 4: int8-static smoothed (SmoothQuant alpha 0.5);
    # 5: an image classifier's int8-static has its biases corrected
    bench_seconds = 28
    # bench/scale.py, 2026-12-04: onnx:int4 of random-initialised Llamas of 135M-1.17B parameters
    # (bf16), process-tree PSS; 11.9 GB at 1.17B: the genai builder loads the model in float32
    # (transformers' default when given no dtype) and serializes all of it again for its int4 pass,
    # then the HQQ pass loads the float32 decoder weights whole (6 GB at 1.17B).
    conversion_peak = (4.76, 0.59)
    # A sentence encoder or an image classifier: the shared float32 export, then onnxruntime's own
    # conversions (encoder.py, vision.py).
    task_precisions = {SENTENCE_EMBEDDING: ("fp32", "fp16", "int8", "int8-static"),
                       IMAGE_CLASSIFICATION: ("fp32", "fp16", "int8", "int8-static")}
    precisions = {
        "fp32": Precision("fp32", 32, 32.0, "float32 export by the onnxruntime-genai builder"),
        "fp16": Precision("fp16", 16, 16.0, "float16 export by the onnxruntime-genai builder"),
        "int8": Precision("int8", 8, 8.0, "dynamic int8 MatMuls: weights per channel, activations per token at run time"),
        "int8-static": Precision("int8-static", 8, 8.0, "static int8 QDQ, calibrated on prefill and decode steps"),
        "int4": Precision("int4", 4, 6.0, "weight-only int4 MatMulNBits (HQQ); tied embedding / LM head kept at 8 bit"),
    }
    options = {
        "block": Option("block", int, 32, "int4 block size (weights sharing one scale)", choices=(16, 32, 64, 128),
                        applies_to=_INT4),
        "sym": Option("sym", bool, False, "int4 symmetric (no zero point); rtn only", applies_to=_INT4),
        "accuracy_level": Option("accuracy_level", int, 4, "int4 MatMul compute type: 0 default, 1 fp32, 2 fp16, 3 bf16, 4 int8",
                                 minimum=0, maximum=4, applies_to=_INT4),
        "algo": Option("algo", str, "hqq", "int4 rounding: hqq (half-quadratic, float zero points), rtn, k_quant",
                       choices=("hqq", "rtn", "k_quant"), applies_to=_INT4),
        "head8": Option("head8", bool, True, "keep the LM head (and a tied embedding) at 8 bit", applies_to=_INT4),
        "mixed": Option("mixed", bool, False, "k_quant only: also keep qkv/v/down projections of sensitive layers at 8 bit",
                        applies_to=_INT4),
        "samples": Option("samples", int, 8, "int8-static: calibration sequences (a sentence encoder: batches of 16 sentences)",
                          minimum=1, maximum=512, applies_to=_STATIC),
        "calib_tokens": Option("calib_tokens", int, 128, "int8-static: tokens per calibration sequence", minimum=8, maximum=4096,
                               applies_to=_STATIC),
        "keep_float": Option("keep_float", str, "down_proj,lm_head",
                             "int8-static: MatMuls kept float, by node-name part, comma-separated (none: quantize all); "
                             "a sentence encoder's default is ffn_out, its feed-forward output projections",
                             applies_to=_STATIC),
        "smooth": Option("smooth", float, 0.5, "int8-static: SmoothQuant migration strength alpha, activation outliers "
                         "moved into the weights before calibration (0: off)", minimum=0.0, maximum=1.0, applies_to=_STATIC),
        "weights": Option("weights", str, "s8", "int8: weight codes signed (s8: onnxruntime's u8 x s8 kernels, fastest "
                          "with VNNI) or unsigned around zero point 128 (u8: u8 x u8 kernels, which do not saturate on x86 "
                          "CPUs without VNNI)", choices=("s8", "u8"), applies_to=_INT8),
        "lora": Option("lora", str, "merged", "with --adapter: merged into the float weights before converting, or separate "
                       "(the base model's graph with float LoRA branches, the adapter beside it as adapter.onnx_adapter, "
                       "applied by onnxruntime per run and by onnxruntime-genai per generator)", choices=("merged", "separate")),
    }

    def neighbours(self, spec) -> list[str]:
        """int4: other block sizes, the LM head at 4 bit too, and k_quant with sensitive layers at 8 bit."""
        if spec.precision != "int4":
            return []
        opt = self.option_values(spec)
        found = self.adjacent_choices(spec, "block")
        found.append(spec.with_options(head8=not opt.head8))
        if opt.algo != "k_quant":
            found.append(spec.with_options(algo="k_quant", mixed=True))
        return [str(s) for s in found]

    def validate(self, spec) -> None:
        opt = self.option_values(spec)
        if opt.mixed and opt.algo != "k_quant":
            raise EdgequantError(f"option mixed=1 in {spec} needs algo=k_quant", "add algo=k_quant or drop mixed=1")
        if opt.sym and opt.algo != "rtn":
            # hqq is asymmetric by construction; the builder's k_quant with sym=1 was measured to export
            # wrong zero points (ppl x5 on the default model), so both are refused rather than run.
            raise EdgequantError(f"sym=1 in {spec} is supported with algo=rtn only", "drop sym=1, or add algo=rtn")
        if opt.lora == "separate" and spec.precision in _STATIC:
            raise EdgequantError(f"{spec}: int8-static calibrates its activation ranges (and SmoothQuant folds its scales) "
                                 "on the base model's graph, which a separate adapter changes at run time",
                                 "use onnx:int8?lora=separate, or drop ?lora=separate (the adapter is then merged "
                                 "before calibrating)")

    def check_source(self, source) -> None:
        from edgequant.backends.onnx.tools import check_supported

        check_supported(source.config)

    def limitations(self, source) -> list[str]:
        if source.config.get("model_type") != "gemma2":
            return []
        # Measured on a tiny Gemma-2 with a 32-token window: exact up to 33 tokens, KLD 0.008 at 64.
        return window_ignored(source.config, "the onnxruntime-genai builder's Gemma-2 graph scores a whole "
                                             "window at once with full attention")

    def convert(self, source, spec, out_dir: Path) -> dict[str, Any]:
        """`?lora=separate`: the base model the source's adapter was merged into, exported with the
        adapter's branches, whose weights then move to adapter.onnx_adapter (lora.py); the
        artifact's source stays the merged folder, so evaluation compares it with the adapted float model."""
        if self.option_values(spec).lora == "merged":
            return self._convert_model(source, spec, out_dir)
        from edgequant.adaptation.merge import merged_parts
        from edgequant.backends.onnx.lora import ADAPTER_FILE, split_adapter
        from edgequant.backends.onnx.tools import MODEL_FILE

        base, adapter = merged_parts(source, blocks_only="ONNX")  # the builder gives an LM head or embedding no branch
        info = self._convert_model(base, spec, out_dir, adapter)
        started = time.perf_counter()
        info["adapter"] = split_adapter(out_dir / MODEL_FILE, adapter, out_dir / ADAPTER_FILE)
        info["timings"]["adapter_s"] = round(time.perf_counter() - started, 3)
        return info

    def _convert_model(self, source, spec, out_dir: Path, adapter=None) -> dict[str, Any]:
        """`source` to `spec`'s precision; with `adapter` (PEFT), its LoRA branches in the graph, kept float."""
        from edgequant.backends.onnx import tools as onnx_tools
        from edgequant.backends.onnx.hqq import quantize_hqq
        from edgequant.backends.onnx.lora import BRANCH_PARTS

        started = time.perf_counter()
        opt = self.option_values(spec)
        lora = (("adapter_path", str(adapter.path)),) if adapter else ()
        keep_float = BRANCH_PARTS if adapter else ()
        if spec.precision in ("fp32", "fp16", "int4"):
            request = onnx_tools.BuildRequest(source.hf_dir, out_dir, _BUILDER_PRECISION[spec.precision],
                                              int4_extra(spec.precision, opt, source.config, bool(adapter)) + lora)
            onnx_tools.run_builder(request, out_dir / "build.log")
            info = {"model_file": onnx_tools.MODEL_FILE, "builder_options": _loggable(request.extra),
                    "timings": {"build_s": round(time.perf_counter() - started, 3)}}
            if spec.precision == "fp16":
                onnx_tools.drop_shape_annotations(out_dir / onnx_tools.MODEL_FILE)
                info["post_processing"] = "shape annotations dropped (the builder mislabels repeat_kv for CPU fp16)"
            if spec.precision == "int4" and opt.algo == "hqq":
                folded = quantize_hqq(out_dir / onnx_tools.MODEL_FILE, opt.block, opt.accuracy_level, keep_float)
                info["post_quantization"] = (f"HQQ int4, block {opt.block}, on every decoder-layer MatMul"
                                             f"{' (LoRA branches kept float)' if adapter else ''}; "
                                             f"float zero points folded into a block-sum correction on {folded}")
                info["timings"]["total_quantize_s"] = round(time.perf_counter() - started, 3)
            return info
        return _convert_int8(source, spec.precision, opt, out_dir, started, lora)

    def convert_task(self, source, spec, out_dir: Path) -> dict[str, Any]:
        if self.option_values(spec).lora == "separate":
            raise EdgequantError(f"?lora=separate applies to text-generation models; {source.name} is a {source.task} model",
                                 "drop ?lora=separate: the adapter is then merged into the float weights")
        if source.task == IMAGE_CLASSIFICATION:
            from edgequant.backends.onnx.vision import convert_vision

            return convert_vision(source, spec, self.option_values(spec), out_dir)
        from edgequant.backends.onnx.encoder import convert_encoder

        return convert_encoder(source, spec, self.option_values(spec), out_dir)

    def open_task(self, artifact, *, threads: int):
        if artifact.task == IMAGE_CLASSIFICATION:
            from edgequant.backends._shared.vision import OrtVisionRunner as runner_class
        else:
            from edgequant.backends.onnx.encoder import OnnxEncoderRunner as runner_class
        return runner_class(artifact.path, artifact.manifest["model_file"], name=str(artifact.spec), threads=threads)

    def open(self, artifact, *, n_ctx: int, need_logits: bool, threads: int):
        from edgequant.backends.onnx.runner import OnnxRunner

        return OnnxRunner(artifact.path, artifact.manifest["model_file"], name=str(artifact.spec), n_ctx=n_ctx, threads=threads,
                          adapter=artifact.adapter_path)

    def adapter_base(self, artifact) -> str | None:
        """The graph's content: `?lora=separate` artifacts converted from one base at one spec
        share it (its LoRA inputs default to zero; each adapter file fills them)."""
        from edgequant.backends.onnx.tools import DATA_SUFFIX
        from edgequant.fingerprint import files_sha256

        graph = [artifact.model_path, artifact.model_path.with_name(artifact.model_path.name + DATA_SUFFIX)]
        return f"onnx:{files_sha256([p for p in graph if p.is_file()])}"

    def open_shared(self, artifacts, *, n_ctx: int, threads: int):
        from edgequant.backends.onnx.runner import OnnxRunner

        first = next(iter(artifacts.values()))
        return OnnxRunner(first.path, first.manifest["model_file"], name="+".join(artifacts), n_ctx=n_ctx, threads=threads,
                          adapters={name: a.adapter_path for name, a in artifacts.items()})

    def estimated_bytes(self, precision: str, tensors, tied_embeddings: bool = False) -> int:
        return _estimated_bytes(precision, tensors, tied_embeddings)


def int4_extra(precision: str, opt: dict[str, Any], config: dict, lora: bool = False) -> tuple[tuple[str, str], ...]:
    """The builder's --extra_options for an int4 spec (empty for the float precisions).

    With algo=hqq the builder quantizes only the LM head (8 bit, shared with a tied embedding):
    the decoder-layer MatMuls are excluded and left float for `quantize_hqq` afterwards, because
    the builder has no HQQ option and HQQ's float zero points measured far better (see module doc).
    With `lora` the LoRA branches' MatMuls are excluded too: their weights are the adapter's,
    replaced at run time, and stay float.
    """
    if precision != "int4":
        return ()
    if opt.mixed:
        algo = "k_quant_mixed"  # the builder's mix always keeps the LM head at 8 bit too
    elif opt.algo == "hqq":
        algo = "rtn_last" if opt.head8 else "rtn"
    elif opt.head8:
        algo = opt.algo + "_last"
    else:
        algo = opt.algo
    extra = [("int4_block_size", str(opt.block)), ("int4_is_symmetric", "true" if opt.sym else "false"),
             ("int4_accuracy_level", str(opt.accuracy_level)), ("int4_algo_config", algo)]
    from edgequant.backends.onnx.lora import branch_matmul_names
    from edgequant.backends.onnx.tools import layer_matmul_names

    excluded = (layer_matmul_names(config) if opt.algo == "hqq" else []) + (branch_matmul_names(config) if lora else [])
    if excluded:
        extra.append(("int4_nodes_to_exclude", ",".join(excluded)))
    return tuple(extra)


def _loggable(extra) -> dict[str, str]:
    """Builder options for the manifest, with the long node-exclusion list summarised."""
    out = dict(extra)
    if "int4_nodes_to_exclude" in out:
        out["int4_nodes_to_exclude"] = f"{out['int4_nodes_to_exclude'].count(',') + 1} MatMuls, by node name"
    return out


def _convert_int8(source, precision: str, opt: dict[str, Any], out_dir: Path, started: float,
                  lora: tuple[tuple[str, str], ...] = ()) -> dict[str, Any]:
    """Export fp32 with the builder into a scratch folder, quantize into the artifact, copy the
    genai config and tokenizer next to it; the scratch fp32 model never reaches the artifact.
    `lora`: the builder's adapter option; its branches' MatMuls stay float (int8 only; validate
    refuses int8-static with a separate adapter)."""
    from edgequant.backends._shared.calibration import calibration_windows
    from edgequant.backends.onnx import tools as onnx_tools
    from edgequant.backends.onnx.int8 import quantize_per_token_int8

    scratch = out_dir / ".fp32"
    onnx_tools.run_builder(onnx_tools.BuildRequest(source.hf_dir, scratch, "fp32", lora), out_dir / "build.log")
    built = time.perf_counter()
    info: dict[str, Any] = {"model_file": onnx_tools.MODEL_FILE}
    fp32_model, target = scratch / onnx_tools.MODEL_FILE, out_dir / onnx_tools.MODEL_FILE
    if precision == "int8":
        from edgequant.backends.onnx.lora import BRANCH_PARTS

        count = quantize_per_token_int8(fp32_model, target, BRANCH_PARTS if lora else (), unsigned_weights=opt.weights == "u8")
        info["post_quantization"] = (f"int8 weights per channel ({opt.weights} codes), int8 activations per token, "
                                     f"{count} MatMuls")
    else:
        calib = onnx_tools.Calibration(samples=opt.samples, tokens=opt.calib_tokens)
        windows = calibration_windows(scratch, calib.samples, calib.tokens + calib.decode_steps,
                                      fix="ask for fewer samples (samples<={fit}) or shorter ones (calib_tokens)")
        feeds = list(onnx_tools.calibration_feeds(fp32_model, windows, calib.decode_steps))
        keep = () if opt.keep_float == "none" else tuple(p for p in opt.keep_float.split(",") if p)
        if opt.smooth:  # the feeds stay valid: smoothing changes no graph input
            from edgequant.backends._shared import smoothquant

            smoothed = scratch / "smoothed.onnx"
            info["smoothquant"] = {"alpha": opt.smooth, "sites": smoothquant.apply_smoothing(
                fp32_model, smoothed, smoothquant.smoothing_factors(fp32_model, feeds, opt.smooth))}
            fp32_model = smoothed
        floats = onnx_tools.quantize_static_qdq(fp32_model, target, feeds, keep)
        info["post_quantization"] = f"QDQ int8, MinMax asymmetric uint8 activations; {floats} MatMuls kept float ({opt.keep_float})"
        info["calibration"] = {"text": "lee_background.cor (gensim)", "samples": calib.samples,
                               "prefill_tokens": calib.tokens, "decode_steps": calib.decode_steps}
    onnx_tools.copy_builder_side_files(scratch, out_dir)
    shutil.rmtree(scratch)
    info["timings"] = {"build_s": round(built - started, 3), "quantize_s": round(time.perf_counter() - built, 3)}
    return info


def _estimated_bytes(precision: str, tensors, tied_embeddings: bool) -> int:
    """Estimated size following what the builder does: 1-D tensors float32; for int4, MatMul
    weights at 4 bit plus a float32 scale per block of 32 and the LM head at 8 bit (shared with
    the embedding when tied), HQQ's float scale + zero point per block of 32; for int8, MatMuls at 8 bit
    and the embedding Gather left float32."""
    bits = 0.0
    for tensor in tensors:
        is_embedding = "embed_tokens" in tensor.name
        is_head = "lm_head" in tensor.name or (tied_embeddings and is_embedding)
        if len(tensor.shape) < 2:
            bpw = 32.0
        elif precision in ("fp32", "fp16"):
            bpw = float(OnnxBackend.precisions[precision].bits)
        elif precision == "int4":
            bpw = 9.0 if is_head else 32.0 if is_embedding else 6.0
        else:
            bpw = 32.0 if is_embedding else 8.0
            if tied_embeddings and is_embedding:
                bits += tensor.numel * 8.0  # the LM head's int8 copy beside the float embedding
        bits += tensor.numel * bpw
    return int(bits / 8)
