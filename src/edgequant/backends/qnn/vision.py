"""QNN image classifiers: the shared float32 graph (backends/_shared/vision.py) fixed at one image,
then QDQ through the same onnxruntime QNN helpers as the encoders and LLM graphs (`tools.quantize_qdq`):
uint8 (w8a8) or uint16 (w8a16) activations with MinMax ranges from calibration images, int8
symmetric weights per output channel, int32 biases.

Shape. The HTP compiles a graph for fixed shapes, so the graph takes exactly one image
(1, 3, size, size), as a camera app classifies a frame; the runner loops over a batch.

Bias correction. Rounding a depthwise edge kernel's taps moves its sum, and a constant input turns
that into an offset on every output position (`_shared/bias_correction.py`). With every activation float, the
int8 weights alone cost EfficientNet-Lite0 KLD 0.026 (top-1 agreement 0.85), 0.021 of it the first
depthwise Conv; taking each output channel's mean shift out of its bias left 0.004 (0.94).

Measured 2026-12-04 on EfficientNet-Lite0 (`edgequant eval --no-speed`, 176 photo views, on the CPU
execution provider; conversion on 2 cores with the float export cached, 29 s and 20 s while
another job shared the cores):

  qnn:w8a16  top-1 94.3% [90.3, 97.7]  top-5 100%  KLD 0.0036 [0.0028, 0.0045]  conversion 16 s
  qnn:w8a8   top-1 88.1% [83.0, 92.6]  top-5 100%  KLD 0.0130 [0.0111, 0.0150]  conversion 10 s

Without the bias correction w8a16 was 84.7% / 0.026 and w8a8 80.7% / 0.050 (onnx:int8-static's
figures exactly: the same ranges and weights). The float model itself is unsure (top-1 probability
below 0.2) on 41% of the views, and every view either artifact disagrees on is one where the float
model's top class has at most 0.36 of the probability, so KLD says more than top-1.

The conversion's HTP check (8 calibration images on the x86-64 simulator, CPU fallback off; 11 s
of w8a16's conversion, 5 s of w8a8's): w8a16 gives the CPU run's top class on 8 of 8 (KLD 4e-6
between the two); w8a8 on 6 of 8 (KLD 0.004), yet the simulator's KLD to the float graph was the
lower (0.009 against the CPU run's 0.012). Run on all 176 views once (QnnVisionRunner htp=True, 134 s and
268 s), the simulator scored w8a8 top-1 87.5% and KLD 0.0123, w8a16 94.3% and 0.0036: the CPU
execution provider stands in well for the HTP's arithmetic here.

w8a8 keeps every activation 8-bit: no search like the encoder's (encoder.widen_by_cosine). Each
activation of the w8a16 graph put at 8 bits alone (44 evaluation views) cost KLD 0.002 at most (the
stem's output), most under 0.0002, and all together 0.008: spread too thin for a few 16-bit
tensors to buy much.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from edgequant.backends._shared.bias_correction import correct_biases
from edgequant.backends._shared.vision import ArrayRunner
from edgequant.sources.tasks import IMAGE_CLASSIFICATION

HTP_IMAGES = 8  # calibration images run on the simulated HTP at conversion (~1 s each)
OPTIONS = ("samples", "htp_arch", "soc")  # what the image path reads


def convert_vision(source, spec, opt, out_dir: Path) -> dict:
    from edgequant.backends._shared import vision
    from edgequant.backends._shared.ort import qdq_counts
    from edgequant.backends.qnn import tools as qnn_tools
    from edgequant.progress import Stopwatch

    vision.refuse_options(spec, OPTIONS, source)
    exported = vision.float_vision_onnx(source)
    found = vision.settings(exported)
    images = opt.samples if "samples" in spec.options else vision.CALIBRATION_IMAGES  # the LLM default counts windows
    clock = Stopwatch()
    scratch = out_dir / ".fp32"
    scratch.mkdir()
    fp32 = scratch / "model_fp32.onnx"
    with clock("static", "fixing the float graph's batch at 1 image"):
        shape = static_graph(exported / vision.MODEL_FILE, fp32, found["input"], found["image"]["size"])
        feeds = vision.calibration_batches(source, exported, images, batch=1)
    request = qnn_tools.QnnRequest(spec.precision, 1, len(feeds))  # seq: the LLM graphs' tokens, unread here
    with clock("quantize", f"quantizing the graph ({spec.precision}) with {len(feeds)} calibration images"):
        qnn_tools.quantize_qdq(fp32, out_dir / vision.MODEL_FILE, request, feeds)
    with clock("bias_correction", "correcting the biases for the weights' rounding"):
        corrected = correct_biases(out_dir / vision.MODEL_FILE, _float_graph(fp32), feeds)
    vision.copy_settings(exported, out_dir)
    activation, _ = qnn_tools.SCHEMES[spec.precision]
    info: dict = {"model_file": vision.MODEL_FILE, "task": IMAGE_CLASSIFICATION, "shape": shape,
                  "scheme": qnn_tools.SCHEMES[spec.precision],
                  "post_quantization": f"QDQ for the HTP: {'uint16' if activation == 'QUInt16' else 'uint8'} "
                                       "activations (MinMax ranges), int8 symmetric weights per output channel, "
                                       "biases corrected for the weights' rounding",
                  "calibration": {"images": len(feeds), "what": "seeded random-resized crops of the sample photos"},
                  "bias_correction": {"biases": corrected, "images": len(feeds),
                                      "what": "each bias less the mean output shift its int8 weights' rounding causes"},
                  "qdq_nodes": qdq_counts(out_dir / vision.MODEL_FILE)}
    if qnn_tools.htp_available():
        with clock("htp_check", f"running {HTP_IMAGES} images on Qualcomm's HTP simulator"):
            info["htp_logits"] = htp_agreement(out_dir, fp32, found, feeds[:HTP_IMAGES], qnn_tools.htp_target(opt))
    shutil.rmtree(scratch)
    info["timings"] = clock.seconds
    return info


def static_graph(dynamic: Path, out: Path, input_name: str, size: int) -> list[int]:
    """The float graph taking one image (1, 3, size, size), with the shape arithmetic folded away
    (onnxruntime's basic optimizations, as qnn_preprocess_model runs them), written to `out`; the
    input's shape. Every dimension is fixed, not only the batch: an `.onnx` source may leave the
    image's sides symbolic too."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import make_input_shape_fixed

    from edgequant.backends.qnn.tools import save_static

    model = onnx.load(str(dynamic))
    shape = [1, 3, size, size]  # the layout every image runner feeds (backends/_shared/vision.py)
    make_input_shape_fixed(model.graph, input_name, shape)
    save_static(model, out)
    return shape


def _float_graph(fp32: Path) -> Path:
    """The float graph quantize_qdq quantized (after qnn_preprocess_model), whose tensor names the
    QDQ graph keeps."""
    prepared = fp32.with_name("prepared.onnx")
    return prepared if prepared.exists() else fp32


def htp_agreement(folder: Path, fp32: Path, found: dict, feeds: list[dict], target: dict) -> dict:
    """The QDQ graph on the simulated HTP (CPU fallback off) and on the CPU EP, a few images: how
    often their top classes agree and how far apart their distributions are, and each one's
    distance to the float graph."""
    from edgequant.backends._shared.vision import MODEL_FILE
    from edgequant.backends.qnn.tools import outputs_on_htp

    record, outputs = outputs_on_htp(folder / MODEL_FILE, fp32, lambda session: _logits(session, found["output"], feeds),
                                     target, {"images": len(feeds)})
    if outputs is None:
        return record
    on_htp, on_cpu, on_float = outputs
    return {**record, "top1_htp_vs_cpu": _top1(on_htp, on_cpu), "kld_htp_vs_cpu": _kld(on_cpu, on_htp),
            "top1_vs_float": {"htp": _top1(on_htp, on_float), "cpu": _top1(on_cpu, on_float)},
            "kld_vs_float": {"htp": _kld(on_float, on_htp), "cpu": _kld(on_float, on_cpu)},
            "max_abs_logit_diff": round(float(np.abs(on_htp - on_cpu).max()), 4)}


def _logits(session, output: str, feeds: list[dict]) -> np.ndarray:
    return np.concatenate([session.run([output], feed)[0] for feed in feeds]).astype(np.float64)


def _top1(a: np.ndarray, b: np.ndarray) -> float:
    return round(float((a.argmax(-1) == b.argmax(-1)).mean()), 4)


def _kld(reference: np.ndarray, other: np.ndarray) -> float:
    from edgequant.measurement.logprobs import kl_divergence, log_softmax

    return round(float(np.maximum(kl_divergence(log_softmax(reference), log_softmax(other)), 0.0).mean()), 6)



class QnnVisionRunner(ArrayRunner):
    """The QDQ graph on ONNX Runtime's CPU execution provider, one image per run, as the HTP graph
    takes them (`htp=True`: on the simulated HTP instead, with onnxruntime-qnn)."""

    def __init__(self, folder: Path, model_file: str, *, name: str, threads: int, htp: bool = False):
        from edgequant.backends._shared.vision import settings

        self.name, self._htp = name, htp
        found = settings(folder)
        self._input, self._output = found["input"], found["output"]
        from edgequant.backends.qnn.tools import qdq_session

        self._session = qdq_session(folder / model_file, threads, htp)

    def _infer(self, batch: np.ndarray) -> np.ndarray:
        rows = [self._session.run([self._output], {self._input: batch[i:i + 1]})[0] for i in range(len(batch))]
        return np.concatenate(rows)

    def arithmetic(self) -> str | None:
        from edgequant.backends.qnn.tools import qdq_arithmetic

        return qdq_arithmetic(self._htp)

    def close(self) -> None:
        self._session = None
