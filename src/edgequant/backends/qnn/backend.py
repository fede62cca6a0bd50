"""QNN backend: a fixed-shape ONNX export quantized to QDQ with onnxruntime's QNN helpers, the form
Qualcomm's HTP (Snapdragon NPU) executes. The artifact always runs on the CPU execution provider,
so it is evaluated like every other artifact; with onnxruntime-qnn installed, each conversion also
runs one calibration window on the simulated HTP and records how well it agrees with the CPU run,
and `?context=1` writes the compiled QNN context model next to the ONNX file.

Shapes are fixed (`?seq=N`): the HTP wants static shapes, so the graph takes exactly N tokens and
has no KV cache; the runner pads to N and re-runs the window for every generated token.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from edgequant.backend import Backend
from edgequant.backends._shared.sliding_window import window_ignored
from edgequant.errors import EdgequantError
from edgequant.spec import Option, Precision


class QnnBackend(Backend):
    name = "qnn"
    display_name = "QNN (ONNX QDQ)"
    use_case = "Qualcomm Snapdragon NPU"
    extra = "qnn"
    requires = ("onnxruntime", "onnx", "torch")
    packages = ("onnxruntime", "onnxruntime-qnn")
    bench_specs = ("qnn:w8a16",)
    speed_note = "QNN artifacts ran on ONNX Runtime's CPU execution provider: quality is real, speed is not an NPU's."
    # 2: RMSNorm exported scale-free (see qnn_tools.scale_free_rms_norm); 3: w8a8 widens underflowing activations
    recipe_version = 3
    bench_seconds = 350
    precisions = {
        "w8a8": Precision("w8a8", 8, 8.0, "QDQ, uint8 weights and uint8 activations (uint16 where 8 bits underflow: act16)"),
        "w8a16": Precision("w8a16", 8, 8.0, "QDQ, uint8 weights and uint16 activations"),
        "w4a16": Precision("w4a16", 4, 4.0, "QDQ, int4 weights per channel and uint16 activations"),
    }
    options = {
        "seq": Option("seq", int, 512, "fixed sequence length of the graph (tokens)", minimum=8, maximum=8192),
        "samples": Option("samples", int, 4, "calibration sequences of seq tokens", minimum=1, maximum=256),
        "override": Option("override", str, "", "per-weight types, NAME:TYPE,... with TYPE u8|i8|u16|i16|u4|i4"),
        "context": Option("context", bool, False, "also write the compiled QNN context model (needs onnxruntime-qnn)"),
        "graphs": Option("graphs", str, "fixed", "fixed: one fixed-window graph, no KV cache; kv: a prompt graph "
                         "(ar tokens) and a decode graph (1 token) with an explicit KV cache at context ctx",
                         choices=("fixed", "kv")),
        "ar": Option("ar", int, 64, "graphs=kv: tokens the prompt graph takes at a time", minimum=2, maximum=1024),
        "ctx": Option("ctx", int, 1024, "graphs=kv: the fixed context (KV cache length)", minimum=16, maximum=16384),
        "act16": Option("act16", float, 0.1, "w8a8: activations with more than this share of values rounding to 0 "
                        "at 8 bits go to uint16 (0: every activation 8-bit)", minimum=0.0, maximum=1.0, applies_to=("w8a8",)),
    }

    def speed_is_representative(self) -> bool:
        return False  # the CPU execution provider stands in for the NPU

    def limitations(self, source) -> list[str]:
        # Measured on a tiny Mistral with a 32-token window over 64 tokens: w8a16 KLD 0.27, others ~0.005.
        return window_ignored(source.config, "the fixed-shape graph applies one causal mask to every layer")

    def validate(self, spec) -> None:
        from edgequant.backends.qnn.tools import parse_overrides

        opt = self.option_values(spec)
        parse_overrides(opt["override"])
        kv_only = [name for name in ("ar", "ctx") if name in spec.options]
        if opt["graphs"] == "fixed" and kv_only:
            raise EdgequantError(f"{', '.join(kv_only)} apply to graphs=kv only", "add graphs=kv, or drop them")
        if opt["graphs"] == "kv":
            if "seq" in spec.options:
                raise EdgequantError("seq is the fixed graph's length; graphs=kv takes ar and ctx", "drop seq")
            if opt["context"]:
                raise EdgequantError("context=1 is not available with graphs=kv yet", "drop context=1, or use graphs=fixed")
            if opt["ar"] >= opt["ctx"]:
                raise EdgequantError(f"ar={opt['ar']} must be below ctx={opt['ctx']}", "use a larger ctx or a smaller ar")

    def report_notes(self, spec_text: str, manifest: dict) -> list[str]:
        """The simulated-HTP agreement recorded at conversion, when onnxruntime-qnn was installed."""
        notes = super().report_notes(spec_text, manifest)
        graphs = (manifest.get("details") or {}).get("htp_graphs")
        if graphs:
            return notes + [f"{spec_text}: {name} graph on Qualcomm's HTP simulator (whole graph, CPU fallback off): "
                            + (f"could not run ({h['error']})" if "error" in h else
                               f"{100 * h['top1_agreement']:.1f}% top-1 agreement with its CPU run over {h['tokens']} "
                               f"tokens, KLD {h['kld_mean']:.4f}") for name, h in graphs.items()]
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

        opt = self.option_values(spec)
        if opt["graphs"] == "kv":
            return self._convert_kv(source, spec, opt, out_dir)
        request = qnn_tools.QnnRequest(spec.precision, opt["seq"], opt["samples"], qnn_tools.parse_overrides(opt["override"]),
                                       act16=opt["act16"] if spec.precision == "w8a8" else 0.0)
        if opt["context"]:
            qnn_tools.require_htp()  # before any long step
        feeds = qnn_tools.calibration_inputs(source.hf_dir, request.seq, request.samples)
        started = time.perf_counter()
        scratch = out_dir / ".fp32"
        scratch.mkdir()
        qnn_tools.export_fixed(source.hf_dir, request.seq, scratch / "model_fp32.onnx")
        exported = time.perf_counter()
        widened = qnn_tools.quantize_qdq(scratch / "model_fp32.onnx", out_dir / qnn_tools.MODEL_FILE, request, feeds)
        shutil.rmtree(scratch)
        copy_tokenizer(out_dir, source.hf_dir)
        info: dict[str, Any] = {"model_file": qnn_tools.MODEL_FILE, "seq": request.seq, "scheme": qnn_tools.SCHEMES[spec.precision],
                                "overrides": request.overrides, "calibration_samples": request.samples}
        if request.act16:
            info["activations_16bit"] = {"threshold": request.act16, "count": len(widened), "tensors": widened}
        if qnn_tools.htp_available():
            info["htp"] = qnn_tools.htp_agreement(out_dir / qnn_tools.MODEL_FILE, feeds)
        if opt["context"]:
            qnn_tools.compile_context(out_dir / qnn_tools.MODEL_FILE, out_dir / "model_ctx.onnx")
            info["context_model"] = "model_ctx.onnx"
        info["timings"] = {"export_s": round(exported - started, 3), "quantize_s": round(time.perf_counter() - exported, 3)}
        return info

    def _convert_kv(self, source, spec, opt: dict, out_dir: Path) -> dict[str, Any]:
        """Prompt and decode graphs: calibrated on the prompt graph, whose activation encodings the
        decode graph is then quantized with."""
        from dataclasses import replace

        from edgequant.backends._shared.calibration import calibration_windows
        from edgequant.backends._shared.ort import cpu_session
        from edgequant.backends._shared.side_files import copy_tokenizer
        from edgequant.backends.qnn import kv
        from edgequant.backends.qnn import tools as qnn_tools

        kv.check_architecture(source.config)
        request = qnn_tools.QnnRequest(spec.precision, opt["ar"], opt["samples"], qnn_tools.parse_overrides(opt["override"]),
                                       act16=opt["act16"] if spec.precision == "w8a8" else 0.0)
        windows = calibration_windows(source.hf_dir, opt["samples"], min(4 * opt["ar"], opt["ctx"]),
                                      fix="ask for samples<={fit} or a smaller ar")
        started = time.perf_counter()
        scratch = out_dir / ".fp32"
        scratch.mkdir()
        layout = kv.export_graphs(source.hf_dir, scratch, opt["ar"], opt["ctx"])
        exported = time.perf_counter()
        prompt_feeds, decode_feeds = kv.calibration_feeds(scratch, windows, cpu_session)
        widened = qnn_tools.quantize_qdq(scratch / kv.PROMPT_FILE, out_dir / kv.PROMPT_FILE, request, prompt_feeds)
        encodings = kv.activation_encodings(out_dir / kv.PROMPT_FILE)
        qnn_tools.quantize_qdq(scratch / kv.DECODE_FILE, out_dir / kv.DECODE_FILE, replace(request, act16=0.0), decode_feeds,
                               encodings=kv.as_overrides(encodings))
        decode_encodings = kv.activation_encodings(out_dir / kv.DECODE_FILE)
        for name in (kv.LAYOUT_FILE, kv.INV_FREQ_FILE):
            shutil.copy(scratch / name, out_dir / name)
        shutil.rmtree(scratch)
        copy_tokenizer(out_dir, source.hf_dir)
        same = sum(name in encodings and all((a == b).all() for a, b in zip(encodings[name], pair))
                   for name, pair in decode_encodings.items())
        info: dict[str, Any] = {
            "model_file": kv.PROMPT_FILE, "graphs": "kv", "layout": layout, "scheme": qnn_tools.SCHEMES[spec.precision],
            "overrides": request.overrides, "calibration_samples": opt["samples"],
            "calibration": {"graph": "prompt", "prompt_feeds": len(prompt_feeds), "decode_feeds": len(decode_feeds)},
            "decode_encodings": {"activations": len(decode_encodings), "same_as_prompt": int(same)},
            "timings": {"export_s": round(exported - started, 3), "quantize_s": round(time.perf_counter() - exported, 3)}}
        if request.act16:
            info["activations_16bit"] = {"threshold": request.act16, "count": len(widened), "tensors": widened}
        if qnn_tools.htp_available():  # each graph on the simulated HTP, one calibration step each
            info["htp_graphs"] = {"prompt": qnn_tools.htp_agreement(out_dir / kv.PROMPT_FILE, prompt_feeds),
                                  "decode": qnn_tools.htp_agreement(out_dir / kv.DECODE_FILE, decode_feeds, steps=16)}
        return info

    def open(self, artifact, *, n_ctx: int, need_logits: bool, threads: int):
        from edgequant.backends.qnn.runner import FixedShapeRunner, KVRunner

        if artifact.manifest["details"].get("graphs") == "kv":
            return KVRunner(artifact.path, name=str(artifact.spec), n_ctx=n_ctx, threads=threads)

        seq = int(artifact.manifest["details"]["seq"])
        return FixedShapeRunner(artifact.path, artifact.manifest["model_file"], seq=seq, name=str(artifact.spec),
                                n_ctx=min(n_ctx, seq), threads=threads)

    def estimated_bytes(self, precision: str, tensors, tied_embeddings: bool = False) -> int:
        # The exporter keeps one copy of a tied matrix; every 2-D weight is quantized (embedding too).
        bpw = self.precisions[precision].bpw
        bits = 0.0
        for tensor in tensors:
            if tied_embeddings and "lm_head" in tensor.name:
                continue
            bits += tensor.numel * (bpw if len(tensor.shape) >= 2 else 32.0)
        return int(bits / 8)
