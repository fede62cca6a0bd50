"""QNN backend: LLMs as Snapdragon apps run them on Qualcomm's HTP (NPU), as QDQ ONNX models.

By default (`graphs=kv`, kv.py) an artifact is two fixed-shape graphs at a fixed context: a prompt
graph taking `ar` tokens at a time and a one-token decode graph, with the KV cache as explicit
inputs and outputs. Both are calibrated once (on the prompt graph) and share one set of
encodings; weights are symmetric and blocked, their scales searched (weights.py); the KV cache is
8-bit. The folder also carries an onnxruntime-genai `genai_config.json` (genai.py), and
`?context=1` compiles both graphs into one QNN context binary with shared weights.

Artifacts run on ONNX Runtime's CPU execution provider, so they are evaluated like every other
artifact; with onnxruntime-qnn installed each conversion also runs prefill and decode on the
simulated HTP with CPU fallback off and records how it agrees with the CPU run and the float model.
`graphs=fixed` keeps the older single fixed-window graph without a KV cache (every architecture).
"""

from __future__ import annotations

import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgequant.backend import Backend
from edgequant.backends._shared.sliding_window import window_ignored
from edgequant.errors import EdgequantError
from edgequant.progress import Stopwatch
from edgequant.sources.tasks import IMAGE_CLASSIFICATION, SENTENCE_EMBEDDING
from edgequant.spec import Option, Precision

# w4a16's int4 blocks: on the default model's prompt graph (4 evaluation windows, GPTQ, the int8
# mix) blocks of 32 gave KLD 0.097 and blocks of 64 0.135, for 0.5 more bits per int4 weight.
W4_BLOCK = 32
# The conversion's check on the HTP simulator: on the default model both graphs took 99 s to load
# and each graph run ~35 s, so the former check (two prompt chunks, 16 decode steps: 759 s) was
# over half of qnn:w8a16's conversion. One chunk and one step still compare both graphs' output.
HTP_STEPS = 1
# w8a16's GPTQ statistics: its table figure (KLD 0.026 [0.023, 0.030]) was measured with 32 windows;
# 64 took w4a16's prompt graph from 0.097 to 0.085 and cost w8a16's conversion ~37 s more.
W8A16_GPTQ = 32
KV_ONLY = ("ar", "ctx", "kv", "htp_steps")  # options only the kv graphs read


class QnnBackend(Backend):
    name = "qnn"
    display_name = "QNN (ONNX QDQ)"
    use_case = "Qualcomm Snapdragon NPU"
    extra = "qnn"
    requires = ("onnxruntime", "onnx", "torch")
    packages = ("onnxruntime", "onnxruntime-qnn")
    bench_specs = ("qnn:w8a16",)
    speed_note = "QNN artifacts ran on ONNX Runtime's CPU execution provider: quality is real, speed is not an NPU's."
    # 2: RMSNorm exported scale-free (see qnn_tools.scale_free_rms_norm); 3: w8a8 widens underflowing activations;
    # 4: blocked symmetric weights with searched scales, 8-bit KV cache, graphs=kv by default, act16 0.02;
    # 5: kv weights stored once, HTP target v79/69; 6: w8a8 cache tensors act16 widens stay 16-bit;
    # 7: weights per output channel when not blocked (w8a8's default), w8a8 16-bit activations chosen by KLD,
    #    GPTQ rounding of blocked weights; 8: w4a16 blocks of 32, choices measured on a 512-token held-out window;
    #    9: GPTQ statistics from 64 windows; 10: w4a16's mix measured on 4 held-out windows, best set of kinds;
    #    11: w8a16's GPTQ statistics from 32 windows, min/max calibration by tools.calibrated
    recipe_version = 11
    bench_seconds = 500  # qnn:w8a16 from an empty cache, 2026-12-04 (conversion 470 s, of it HTP check 174 s)
    # bench/scale.py, 2026-12-04: qnn:w8a16 of random-initialised Llamas of 45M and 135M parameters
    # (bf16), process-tree PSS: 4.9 and 9.2 GB (float and quantized graphs in onnxruntime sessions
    # for calibration, GPTQ statistics and the HTP check); a 0.5B model would need ~34 GB.
    conversion_peak = (30.23, 1.06)
    precisions = {
        "w8a8": Precision("w8a8", 8, 8.0, "QDQ, int8 weights per output channel and uint8 activations (uint16 where "
                          "8 bits cost the most KLD: widen)"),
        "w8a16": Precision("w8a16", 8, 8.0, "QDQ, int8 weights per block of 64 and uint16 activations"),
        "w4a16": Precision("w4a16", 4, 4.0, "QDQ, int4 weights per block of 32 (LM head int8, and the kinds of matrix "
                           "int8 buys most for: mix) and uint16 activations"),
    }
    options = {
        "graphs": Option("graphs", str, "kv", "kv: a prompt graph (ar tokens) and a decode graph (1 token) with an explicit "
                         "KV cache at context ctx; fixed: one fixed-window graph, no KV cache", choices=("kv", "fixed")),
        "ar": Option("ar", int, 64, "graphs=kv: tokens the prompt graph takes at a time", minimum=2, maximum=1024),
        "ctx": Option("ctx", int, 1024, "graphs=kv: the fixed context (KV cache length)", minimum=16, maximum=16384),
        "kv": Option("kv", int, 8, "graphs=kv: bits of the KV cache inputs and outputs", choices=(8, 16)),
        "htp_steps": Option("htp_steps", int, HTP_STEPS, "graphs=kv, with onnxruntime-qnn installed: decode steps the "
                            "conversion runs on Qualcomm's HTP simulator after a one-chunk prefill, compared with the CPU "
                            "run and the float graphs (0: only check that both graphs load wholly on the HTP; each graph "
                            "run costs ~35 s on the x86-64 simulator)", minimum=0, maximum=64),
        "seq": Option("seq", int, 512, "graphs=fixed: sequence length of the graph (tokens)", minimum=8, maximum=8192),
        "block": Option("block", int, 64, "weights quantized per block of this many input rows, scales searched "
                        "(0: per output channel, w8a8's default, since the HTP runs blocked weights only between "
                        "16-bit activations; w4a16 defaults to 32)", choices=(0, 16, 32, 64, 128),
                        by_precision={"w4a16": W4_BLOCK, "w8a8": 0}),
        "gptq": Option("gptq", int, 64, "calibration windows whose input statistics (X^T X per MatMul) drive GPTQ's "
                       "rounding of the weights: each row's rounding error is fed into the rows not yet rounded "
                       "(0: round to nearest, scales still searched; w8a16 defaults to 32, the count its figures "
                       "were measured with, 64 windows mattering for int4 weights)", minimum=0, maximum=256,
                       by_precision={"w8a16": W8A16_GPTQ}),
        "mix": Option("mix", float, 0.35, "w4a16: share of the int4 weights that may be raised to int8, whole kinds "
                      "of matrix (v_proj, down_proj, ...) chosen by the KLD int8 buys each on held-out calibration "
                      "text (0: all int4)",
                      minimum=0.0, maximum=1.0, applies_to=("w4a16",)),
        "head": Option("head", int, 8, "w4a16: bits of the LM head", choices=(4, 8), applies_to=("w4a16",)),
        "samples": Option("samples", int, 4, "calibration sequences", minimum=1, maximum=256),
        "override": Option("override", str, "", "per-weight types, NAME:TYPE,... with TYPE u8|i8|u16|i16|u4|i4"),
        "context": Option("context", bool, False, "also compile QNN context binaries (needs onnxruntime-qnn); "
                          "graphs=kv: one binary, weights shared by both graphs"),
        "smooth": Option("smooth", float, 0.0, "w8a8: SmoothQuant migration strength alpha, activation outliers moved "
                         "into the (blocked) weights before calibration (0: off; 0.5 and 0.25 measured worse, see docs/qnn.md)",
                         minimum=0.0, maximum=1.0, applies_to=("w8a8",)),
        "htp_arch": Option("htp_arch", int, 79, "Hexagon architecture the HTP checks and context binaries target "
                           "(79: Snapdragon 8 Elite)", choices=(68, 69, 73, 75, 79, 81)),
        "soc": Option("soc", int, 69, "QNN SoC model id the HTP checks and context binaries target (69: SM8750)",
                      minimum=1, maximum=999),
        "widen": Option("widen", str, "kld", "w8a8: how activations are chosen to stay 16-bit: kld (by the KLD 8 bits "
                        "cost each group, measured on held-out calibration text; see budget) or underflow (see act16)",
                        choices=("kld", "underflow"), applies_to=("w8a8",)),
        "budget": Option("budget", float, 0.03, "w8a8, widen=kld: the KLD to the float model (held-out calibration "
                         "text) the 8-bit activations may add together to the all-16-bit graph's", minimum=0.0,
                         maximum=10.0, applies_to=("w8a8",)),
        "act16": Option("act16", float, 0.02, "w8a8, widen=underflow: activations with more than this share of values "
                        "rounding to 0 at 8 bits go to uint16 (0: every activation 8-bit)", minimum=0.0, maximum=1.0,
                        applies_to=("w8a8",)),
    }

    # A sentence encoder or an image classifier: the shared float32 export at a fixed shape, QDQ with
    # the same helpers (encoder.py, vision.py).
    task_precisions = {SENTENCE_EMBEDDING: ("w8a8", "w8a16"), IMAGE_CLASSIFICATION: ("w8a8", "w8a16")}

    def speed_is_representative(self) -> bool:
        return False  # the CPU execution provider stands in for the NPU

    def limitations(self, source) -> list[str]:
        # Measured on a tiny Mistral with a 32-token window over 64 tokens: w8a16 KLD 0.27, others ~0.005.
        return window_ignored(source.config, "the fixed-shape graph applies one causal mask to every layer")

    def validate(self, spec) -> None:
        from edgequant.backends.qnn.tools import parse_overrides

        opt = self.option_values(spec)
        parse_overrides(opt.override)
        kv_only = [name for name in KV_ONLY if name in spec.options]
        if opt.graphs == "fixed" and kv_only:
            raise EdgequantError(f"{', '.join(kv_only)} apply to graphs=kv only", "add graphs=kv, or drop them")
        if opt.graphs == "kv":
            if "seq" in spec.options:
                raise EdgequantError("seq is the fixed graph's length; graphs=kv (the default) takes ar and ctx",
                                     "drop seq, or add graphs=fixed")
            if opt.ar >= opt.ctx:
                raise EdgequantError(f"ar={opt.ar} must be below ctx={opt.ctx}", "use a larger ctx or a smaller ar")

    def report_notes(self, spec_text: str, manifest: dict) -> list[str]:
        """The layout a spec fell back to, and the simulated-HTP agreement recorded at conversion
        (with onnxruntime-qnn installed)."""
        notes = super().report_notes(spec_text, manifest)
        fallback = (manifest.get("details") or {}).get("fallback")
        if fallback:
            notes.append(f"{spec_text}: {fallback}")
        embeddings = (manifest.get("details") or {}).get("htp_embeddings")
        if embeddings:  # a sentence encoder's check
            if "error" in embeddings:
                return notes + [f"{spec_text}: Qualcomm's HTP simulator could not run the graph with CPU fallback off "
                                f"({embeddings['error']}); the figures are the CPU execution provider's."]
            agree, to_float = embeddings["cosine_htp_vs_cpu"], embeddings["cosine_vs_float"]
            return notes + [f"{spec_text} on Qualcomm's HTP simulator ({embeddings['texts']} sentences, wholly on the HTP): "
                            f"cosine to the CPU run's embeddings {agree['mean']:.4f} (min {agree['min']:.4f}), to the float "
                            f"graph's {to_float['htp']:.4f} (CPU run {to_float['cpu']:.4f})"]
        classes = (manifest.get("details") or {}).get("htp_logits")
        if classes:  # an image classifier's check
            if "error" in classes:
                return notes + [f"{spec_text}: Qualcomm's HTP simulator could not run the graph with CPU fallback off "
                                f"({classes['error']}); the figures are the CPU execution provider's."]
            to_float = classes["kld_vs_float"]
            return notes + [f"{spec_text} on Qualcomm's HTP simulator ({classes['images']} calibration images, wholly on the "
                            f"HTP): top-1 class the CPU run's on {100 * classes['top1_htp_vs_cpu']:.0f}% of them (KLD "
                            f"{classes['kld_htp_vs_cpu']:.4f}), KLD to the float graph {to_float['htp']:.4f} (CPU run "
                            f"{to_float['cpu']:.4f})"]
        check = (manifest.get("details") or {}).get("htp_pipeline")
        if check:
            if "error" in check:
                return notes + [f"{spec_text}: Qualcomm's HTP simulator could not run the graphs with CPU fallback off "
                                f"({check['error']}); the figures are the CPU execution provider's."]
            if "kld_vs_float" not in check:  # htp_steps=0
                return notes + [f"{spec_text}: both graphs load wholly on Qualcomm's HTP simulator (CPU fallback off); "
                                "their output there was not compared (htp_steps=0)."]
            kld = check["kld_vs_float"]
            return notes + [f"{spec_text} on Qualcomm's HTP simulator (prefill of {check['prompt_tokens']} tokens, then "
                            f"{check['decode_steps']} decode step{'s' if check['decode_steps'] != 1 else ''}, both graphs wholly on the "
                            "HTP): the first "
                            f"{check['greedy_tokens_same_as_cpu']} greedy tokens equal the CPU run's, KLD to the float model "
                            f"{kld['htp']['prefill']:.4f} in prefill and {kld['htp']['decode']:.4f} in decode (CPU run "
                            f"{kld['cpu']['prefill']:.4f} and {kld['cpu']['decode']:.4f})"
                            + ("" if check["within_tolerance"] else "; further from the float model than the CPU run")]
        h = (manifest.get("details") or {}).get("htp")
        if not h:
            return notes
        if "error" in h:
            return notes + [f"{spec_text}: Qualcomm's HTP simulator (htp_arch {h['htp_arch']}) could not run the whole "
                            f"graph with CPU fallback off ({h['error']}); the figures are the CPU execution provider's."]
        return notes + [f"{spec_text} on Qualcomm's HTP simulator (htp_arch {h['htp_arch']}, one {h['tokens']}-token calibration "
                f"window, whole graph on the HTP) agrees with its CPU run on {100 * h['top1_agreement']:.1f}% of top-1 "
                f"tokens (KLD {h['kld_mean']:.4f})."]

    def convert(self, source, spec, out_dir: Path) -> dict[str, Any]:
        from edgequant.backends._shared.side_files import copy_tokenizer
        from edgequant.backends.qnn import tools as qnn_tools
        from edgequant.backends.qnn import weights

        opt = self.option_values(spec)
        fallback = None
        if opt.graphs == "kv":
            fallback = _fixed_layout_reason(source, spec)
            if fallback is None:
                return self._convert_kv(source, spec, opt, out_dir)
        request = self._request(spec, opt, opt.seq)
        if opt.context:
            qnn_tools.require_htp()  # before any long step
        # the held-out window follows every window calibration and GPTQ read
        read = max(request.samples, opt.gptq)
        inputs = qnn_tools.calibration_inputs(source.hf_dir, request.seq, read + _held_out_windows(spec, opt),
                                              option="samples (and gptq)")
        feeds, held_out_feeds = inputs[:request.samples], inputs[read:]
        started = time.perf_counter()
        scratch = out_dir / ".fp32"
        scratch.mkdir()
        qnn_tools.export_fixed(source.hf_dir, request.seq, scratch / "model_fp32.onnx")
        exported = time.perf_counter()
        smoothing = _smooth(scratch, ["model_fp32.onnx"], feeds, opt) if spec.precision == "w8a8" else None
        importance = weights.input_importance(scratch / "model_fp32.onnx", inputs[:opt.gptq] or feeds,
                                              full=bool(opt.gptq))
        solved: dict = {}
        choice: dict = {}
        if held_out_feeds:
            request, choice = _choose_by_kld(spec, opt, request, scratch / "model_fp32.onnx", feeds, importance,
                                             lambda session: [session.run(["logits"], f)[0][0] for f in held_out_feeds],
                                             int(source.config["num_hidden_layers"]), solved)
        widened = qnn_tools.quantize_qdq(scratch / "model_fp32.onnx", out_dir / qnn_tools.MODEL_FILE, request, feeds,
                                         importance=importance, pinned=choice.get("pinned"), solved=solved).widened
        shutil.rmtree(scratch)
        copy_tokenizer(out_dir, source.hf_dir)
        info: dict[str, Any] = {"model_file": qnn_tools.MODEL_FILE, "seq": request.seq, "scheme": qnn_tools.SCHEMES[spec.precision],
                                "weights": {"block": request.block, "overrides": request.overrides},
                                "calibration_samples": request.samples}
        info.update(_choice_details(request, widened, choice))
        if smoothing:
            info["smoothquant"] = smoothing
        if qnn_tools.htp_available():
            info["htp"] = qnn_tools.htp_agreement(out_dir / qnn_tools.MODEL_FILE, feeds, qnn_tools.htp_target(opt))
        if opt.context:
            qnn_tools.compile_context(out_dir / qnn_tools.MODEL_FILE, out_dir / "model_ctx.onnx", qnn_tools.htp_target(opt))
            info["context_model"] = "model_ctx.onnx"
        info["timings"] = {"export_s": round(exported - started, 3), "quantize_s": round(time.perf_counter() - exported, 3)}
        if fallback:
            info["fallback"] = fallback
        return info

    def _convert_kv(self, source, spec, opt, out_dir: Path) -> dict[str, Any]:
        """Prompt and decode graphs: calibrated on the prompt graph, whose encodings (types, scales
        and zero points of every activation) the decode graph is then quantized with."""
        from edgequant.backends._shared.ort import cpu_session
        from edgequant.backends._shared.side_files import copy_tokenizer
        from edgequant.backends.qnn import genai, kv, weights
        from edgequant.backends.qnn import tools as qnn_tools

        kv.check_architecture(source.config)
        request = self._request(spec, opt, opt.ar)
        if opt.kv == 8:
            request = replace(request, activations=kv.cache_types(source.config, "u8"))
        if opt.context:
            qnn_tools.require_htp()  # before any long step
        windows, statistics_windows, held_out_windows = _kv_windows(source.hf_dir, opt, _held_out_windows(spec, opt))
        clock = Stopwatch()
        scratch = out_dir / ".fp32"
        scratch.mkdir()
        with clock("export", "exporting the float prompt and decode graphs"):
            layout = kv.export_graphs(source.hf_dir, scratch, opt.ar, opt.ctx)
        with clock("calibration_feeds", f"running {len(windows)} calibration windows through the float graphs"):
            prompt_feeds, decode_feeds = kv.calibration_feeds(scratch, windows, cpu_session)
            smoothing = _smooth(scratch, [kv.PROMPT_FILE, kv.DECODE_FILE], prompt_feeds, opt) if spec.precision == "w8a8" else None
        with clock("statistics", f"input statistics of every weight over {len(statistics_windows) or len(windows)} windows"):
            if opt.gptq:
                statistics = weights.InputStatistics(scratch / kv.PROMPT_FILE, full=True)
                kv.run_prompt_chunks(scratch, statistics_windows, statistics.run)
                importance = statistics.result()
            else:
                importance = weights.input_importance(scratch / kv.PROMPT_FILE, prompt_feeds)
        solved: dict = {}  # weights are solved once for every graph that holds them
        choice: dict = {}
        if held_out_windows:
            def logits_of(session):
                cache = kv.KVCache(scratch, lambda feed: session.run(None, feed), None)
                return [cache.prefill(window) for window in held_out_windows]

            with clock("choice", "choosing precisions by KLD on held-out windows"):
                request, choice = _choose_by_kld(spec, opt, request, scratch / kv.PROMPT_FILE, prompt_feeds, importance,
                                                 logits_of, layout["layers"], solved)
        with clock("quantize_prompt", "quantizing the prompt graph"):
            prompt = qnn_tools.quantize_qdq(scratch / kv.PROMPT_FILE, out_dir / kv.PROMPT_FILE, request, prompt_feeds,
                                            importance=importance, pinned=choice.get("pinned"), solved=solved)
        with clock("quantize_decode", "quantizing the decode graph with the prompt graph's encodings"):
            qnn_tools.quantize_qdq(scratch / kv.DECODE_FILE, out_dir / kv.DECODE_FILE, request, decode_feeds,
                                   pinned=kv.pinned_overrides(out_dir / kv.PROMPT_FILE, prompt.overrides),
                                   importance=importance, solved=solved)
            shared = kv.share_weights(out_dir)  # the graphs hold the same weights: one data file for both
        encodings = {name: kv.activation_encodings(out_dir / file) for name, file in (("prompt", kv.PROMPT_FILE),
                                                                                      ("decode", kv.DECODE_FILE))}
        for name in (kv.LAYOUT_FILE, kv.INV_FREQ_FILE):
            shutil.copy(scratch / name, out_dir / name)
        copy_tokenizer(out_dir, source.hf_dir)
        info: dict[str, Any] = {
            "model_file": kv.PROMPT_FILE, "graphs": "kv", "layout": layout, "scheme": qnn_tools.SCHEMES[spec.precision],
            "weights": {"block": request.block, "overrides": request.overrides, "stored_once": shared},
            "kv_cache_bits": opt.kv,
            "calibration_samples": opt.samples,
            "calibration": {"graph": "prompt", "prompt_feeds": len(prompt_feeds), "decode_feeds": len(decode_feeds)},
            "decode_encodings": kv.compare_encodings(*encodings.values()),
            "genai": {"config": genai.CONFIG_FILE, "files": genai.write_genai_config(out_dir, layout, source.config)}}
        info.update(_choice_details(request, prompt.widened, choice))
        if smoothing:
            info["smoothquant"] = smoothing
        if qnn_tools.htp_available():
            with clock("htp_check", "running both graphs on Qualcomm's HTP simulator"):
                info["htp_pipeline"] = kv.htp_pipeline_check(out_dir, scratch, windows[0][:opt.ar],
                                                             steps=opt.htp_steps, target=qnn_tools.htp_target(opt))
        if opt.context:
            with clock("context", "compiling the QNN context binary"):
                info["context"] = qnn_tools.compile_shared_contexts(out_dir, [kv.PROMPT_FILE, kv.DECODE_FILE], qnn_tools.htp_target(opt))
        shutil.rmtree(scratch)
        info["timings"] = clock.seconds
        return info

    def _request(self, spec, opt, tokens: int):
        """The quantization request both graph layouts share."""
        from edgequant.backends.qnn import tools as qnn_tools

        overrides = qnn_tools.parse_overrides(opt.override)
        if spec.precision == "w4a16" and opt.head == 8:
            overrides = {"lm_head": "i8" if opt.block else "u8", **overrides}
        return qnn_tools.QnnRequest(spec.precision, tokens, opt.samples, overrides,
                                    act16=opt.act16 if spec.precision == "w8a8" and opt.widen == "underflow" else 0.0,
                                    block=opt.block)

    def open(self, artifact, *, n_ctx: int, need_logits: bool, threads: int):
        from edgequant.backends.qnn.runner import FixedShapeRunner, KVRunner

        if artifact.manifest["details"].get("graphs") == "kv":
            return KVRunner(artifact.path, name=str(artifact.spec), n_ctx=n_ctx, threads=threads)

        seq = int(artifact.manifest["details"]["seq"])
        return FixedShapeRunner(artifact.path, artifact.manifest["model_file"], seq=seq, name=str(artifact.spec),
                                n_ctx=min(n_ctx, seq), threads=threads)

    def convert_task(self, source, spec, out_dir: Path) -> dict[str, Any]:
        if source.task == IMAGE_CLASSIFICATION:
            from edgequant.backends.qnn.vision import convert_vision as convert
        else:
            from edgequant.backends.qnn.encoder import convert_encoder as convert
        return convert(source, spec, self.option_values(spec), out_dir)

    def open_task(self, artifact, *, threads: int):
        if artifact.task == IMAGE_CLASSIFICATION:
            from edgequant.backends.qnn.vision import QnnVisionRunner as runner_class
        else:
            from edgequant.backends.qnn.encoder import QnnEncoderRunner as runner_class
        return runner_class(artifact.path, artifact.manifest["model_file"], name=str(artifact.spec), threads=threads)

    def estimated_bytes(self, precision: str, tensors, tied_embeddings: bool = False) -> int:
        """Weights once (the graphs share them): the embedding Gather at the activations' bits (it is
        quantized as one), the LM head as its own MatMul copy (at 8 bits for w4a16's default head), every other
        matrix at the precision's bits plus a float32 scale per block (w4a16: with the default mix's share at
        int8, its most), vectors float32."""
        block = self.options["block"].default_for(precision)
        bpw = self.precisions[precision].bpw + (32 / block if block else 0.0)  # per column: one scale per row, ~0
        if precision == "w4a16":
            bpw += 4 * self.options["mix"].default
        head_bpw = 8 + 32 / block if precision == "w4a16" and block else bpw
        embedding_bits = 8.0 if precision == "w8a8" else 16.0
        bits = 0.0
        for tensor in tensors:
            if len(tensor.shape) < 2:
                bits += tensor.numel * 32.0
            elif "embed_tokens" in tensor.name:
                bits += tensor.numel * (embedding_bits + (head_bpw if tied_embeddings else 0.0))
            else:
                bits += tensor.numel * (head_bpw if "lm_head" in tensor.name else bpw)
        return int(bits / 8)


def _fixed_layout_reason(source, spec) -> str | None:
    """None when the default layout (graphs=kv) takes the source; else why the fixed-window graph
    is built instead. Options that only the KV graphs read are refused rather than ignored."""
    from edgequant.backends.qnn import kv
    from edgequant.progress import note

    reason = kv.unsupported(source.config)
    if reason is None:
        return None
    kv_only = [name for name in KV_ONLY if name in spec.options]
    if kv_only:
        raise EdgequantError(f"{reason}, and {', '.join(kv_only)} apply to graphs=kv only",
                             "drop them: this model gets the fixed-window graph (graphs=fixed, seq=...)")
    fallback = f"{reason}: built the fixed-window graph (graphs=fixed) instead"
    note(fallback)
    return fallback


def _smooth(folder: Path, files: list[str], feeds: list[dict], opt) -> dict | None:
    """SmoothQuant on the float graphs in `folder`, in place, with factors measured on the first
    (graphs sharing tensor names get the same factors, so they stay one model)."""
    if not opt.smooth:
        return None
    from edgequant.backends._shared import smoothquant

    factors = smoothquant.smoothing_factors(folder / files[0], feeds, opt.smooth)
    sites = [smoothquant.apply_smoothing(folder / name, folder / name, factors) for name in files]
    return {"alpha": opt.smooth, "sites": sites[0]}


# Tokens of the held-out window precision choices are measured on: as long as an evaluation
# window, since some 8-bit costs grow with the context. Default model, w8a8: the attention softmax
# at 8 bits added KLD 0.001 over windows of 128 tokens and 0.028 over windows of 512 (its
# probabilities shrink toward the 1/255 step as positions are added).
HELD_OUT_TOKENS = 512


def _kv_windows(hf_dir: Path, opt, held_out: int) -> tuple[list[list[int]], ...]:
    """Windows of the calibration text for the kv graphs: for calibration (`samples` of 4 * ar
    tokens), for GPTQ's statistics (`gptq` of them, from the start too) and, after all of those,
    the `held_out` windows precision choices are measured on."""
    from edgequant.backends._shared.calibration import calibration_windows

    length, held_length = min(4 * opt.ar, opt.ctx), min(HELD_OUT_TOKENS, opt.ctx)
    read = max(opt.samples, opt.gptq) * length
    ids = calibration_windows(hf_dir, 1, read + held_out * held_length,
                              fix="ask for fewer samples or gptq windows, or a smaller ar")[0]

    def windows(start: int, size: int, count: int) -> list[list[int]]:
        return [ids[start + i * size:start + (i + 1) * size] for i in range(count)]

    return windows(0, length, opt.samples), windows(0, length, opt.gptq), windows(read, held_length, held_out)


def _held_out_windows(spec, opt) -> int:
    """How many held-out windows the precision choices are measured on. w4a16's weight choices
    are few (one measurement per kind of matrix) but each gain is small beside the noise of one
    window: on the default model, one window of 512 tokens ranked q_proj above down_proj, which
    the evaluation text ranks the other way (KLD 0.140 against 0.098). w8a8's make ~80
    measurements, each a full pass."""
    if not _measures_kld(spec, opt):
        return 0
    return 4 if spec.precision == "w4a16" else 1


def _measures_kld(spec, opt) -> bool:
    """Whether the conversion chooses precisions by measured KLD (w8a8's widen, w4a16's mix)."""
    return (spec.precision == "w8a8" and opt.widen == "kld") or (spec.precision == "w4a16" and opt.mix > 0)


def _choose_by_kld(spec, opt, request, fp32_path: Path, feeds: list[dict], importance, logits_of,
                   layers: int, solved: dict):
    """w8a8: the activations that stay 16-bit; w4a16: the weights raised to int8. Both measured
    on held-out calibration windows (`logits_of`). Returns the request to build with and the choice."""
    from edgequant.backends.qnn import sensitivity

    kld_of = sensitivity.kld_meter(fp32_path, logits_of)
    work = fp32_path.parent / "choice"
    if spec.precision == "w8a8":
        return request, sensitivity.widen_by_kld(fp32_path, work, request, feeds, importance, kld_of, layers, opt.budget,
                                                 solved)
    choice = sensitivity.mix_int8_by_kld(fp32_path, work, request, feeds, importance, kld_of, opt.mix, solved)
    return replace(request, weights={**dict.fromkeys(choice["int8"], "i8"), **request.weights}), choice


def _choice_details(request, widened: list[str], choice: dict) -> dict:
    """The manifest's account of the precisions chosen beyond the request, and why."""
    if "int8" in choice:
        return {"weights_int8": {"method": "kld", "count": len(choice["int8"]),
                                 **{k: v for k, v in choice.items() if k != "int8"}}}
    if choice:
        return {"activations_16bit": {"method": "kld", "count": len(choice["sixteen_bit"]), "count_8bit": len(choice["eight_bit"]),
                                      **{k: v for k, v in choice.items() if k not in ("sixteen_bit", "eight_bit", "pinned")},
                                      "tensors": choice["sixteen_bit"]}}
    if request.act16:
        return {"activations_16bit": {"method": "underflow", "threshold": request.act16, "count": len(widened),
                                      "tensors": widened}}
    return {}

