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
    # 2: RMSNorm exported scale-free (see qnn_tools._scale_free_rms_norm); 3: w8a8 widens underflowing activations
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

        parse_overrides(self.option_values(spec)["override"])

    def report_notes(self, spec_text: str, manifest: dict) -> list[str]:
        """The simulated-HTP agreement recorded at conversion, when onnxruntime-qnn was installed."""
        notes = super().report_notes(spec_text, manifest)
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

    def open(self, artifact, *, n_ctx: int, need_logits: bool, threads: int):
        from edgequant.backends.qnn.runner import FixedShapeRunner

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
