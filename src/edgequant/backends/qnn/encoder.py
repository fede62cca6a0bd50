"""QNN sentence encoders: the shared float32 ONNX export (pooling inside) made static for Qualcomm's
HTP, then QDQ through the same onnxruntime QNN helpers as the LLM graphs (`tools.quantize_qdq`).

Shape. The HTP compiles a graph for fixed shapes, so the graph takes one text of exactly the
encoder's own token limit (`max_tokens`, 256 for all-MiniLM-L6-v2), padded: every text the source
accepts fits without a further cut. A shorter length (128) would halve the work but cut texts the
source keeps (2% of the evaluation texts run to 154 tokens). One text per run, as a device embeds a
query; the runner pads each text and loops over a batch.

Padding. The export adds float32's minimum to masked attention scores; as a quantized activation
that range would leave every real score on one step, so it becomes `tools.MASK_VALUE` (-100), where
exp() still vanishes. Each conversion checks that the padded static float graph gives the dynamic
export's embeddings (calibration sentences; all-MiniLM-L6-v2's 250 evaluation texts: cosine
0.9999999 at worst).

The simulated HTP refuses LayerNormalization with an int8 symmetric gamma (the weights' default),
so gammas are uint8; weights are int8 per output channel, scales searched (weights.py).

w8a8. With every activation uint8, all-MiniLM-L6-v2 loses most of its embedding: cosine to PyTorch
0.832 mean and 0.717 at the 1st percentile on the CPU EP (on the simulated HTP, 3 sentences agree
with the CPU run at cosine 0.64-0.78). BERT's residual stream carries one outlier feature (#99, up
to 223 after a feed-forward block, where 99.9% of the values stay within 6-35), so one uint8 range
per tensor leaves the feed-forward outputs and the residual sums after them with 30-90% of their
nonzero values rounding to 0. No single kind of activation (one op, in every layer) costs more than
0.003 of cosine at 8 bits with the rest 16-bit, yet all together cost 0.17: errors compound through
the layers. So, as the LLM w8a8 does by KLD (sensitivity.py), the graph is quantized once
all-16-bit and groups of activations (one op at one place in every layer, tied where the HTP needs
one width in and out: MatMul, Gemm, LayerNorm) go to 8 bits, cheapest first, while the cosine to
the float graph on held-out calibration sentences stays within `COSINE_BUDGET` of the all-16-bit
graph's. On all-MiniLM-L6-v2 two groups stay 16-bit (81 of 204 activations): each layer's
feed-forward block with the residual sum and LayerNorm before it (cosine cost 0.065 at 8 bits) and
the residual sum and LayerNorm after it, tied to the next layer's Q/K/V inputs (0.097). Evaluation
cosine 0.994 mean, 0.983 at the 1st percentile.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgequant.errors import EdgequantError
from edgequant.measurement.task_scores import row_cosines as cosines
from edgequant.runner import TaskRunner
from edgequant.sources.tasks import SENTENCE_EMBEDDING

CALIBRATION_BATCHES = 8  # of 16 sentences (the `samples` option), as onnx:int8-static
HELD_OUT_SENTENCES = 16  # after the calibration ones: the w8a8 choice and the checks
HTP_TEXTS = 2  # run on the simulated HTP at conversion (256 tokens: ~4 s each at w8a16, ~7 s at w8a8)
# w8a8: the cosine (held-out sentences) the 8-bit activations may cost together, against the all-16-bit graph's
COSINE_BUDGET = 0.01
PADDING_TOLERANCE = 1e-4  # 1 - cosine between the padded static float graph and the dynamic export
OPTIONS = ("samples", "htp_arch", "soc")  # what the encoder path reads
ONE_WIDTH = ("LayerNormalization", "Gemm")  # ops the HTP refuses with 8 bits on one side and 16 on the other


def convert_encoder(source, spec, opt, out_dir: Path) -> dict:
    from edgequant.backends._shared.encoder import MODEL_FILE, calibration_feeds, copy_runtime_files, float_encoder_onnx, refuse_options
    from edgequant.backends._shared.ort import qdq_counts
    from edgequant.backends.qnn import tools as qnn_tools
    from edgequant.backends.qnn import weights
    from edgequant.progress import Stopwatch

    refuse_options(spec, OPTIONS, source)
    exported = float_encoder_onnx(source)
    tokens = source.encoder.max_tokens
    batches = opt.samples if "samples" in spec.options else CALIBRATION_BATCHES  # the LLM default counts windows
    clock = Stopwatch()
    scratch = out_dir / ".fp32"
    scratch.mkdir()
    fp32 = scratch / "model_fp32.onnx"
    with clock("static", f"fixing the float graph's shape at 1 x {tokens} tokens"):
        shape = static_graph(exported / MODEL_FILE, fp32, tokens)
        feeds = [f for batch in calibration_feeds(exported, batches) for f in fixed_feeds(batch, tokens)]
        held_out = fixed_feeds(_held_out(exported, batches), tokens)
        shape["padding_cosine_min"] = _padding_check(exported / MODEL_FILE, fp32, held_out)
    request = qnn_tools.QnnRequest(spec.precision, tokens, len(feeds), weights=_layernorm_gammas(fp32))
    solved: dict = {}
    with clock("importance", f"input statistics of every weight over {len(feeds)} sentences"):
        importance = weights.input_importance(fp32, feeds)
    choice = None
    if spec.precision == "w8a8":
        with clock("choice", "choosing the activations that stay 16-bit by cosine on held-out sentences"):
            choice = widen_by_cosine(fp32, scratch / "choice", request, feeds, held_out, importance, solved,
                                     int(source.config.get("num_hidden_layers") or 1))
    with clock("quantize", f"quantizing the graph ({spec.precision})"):
        qnn_tools.quantize_qdq(fp32, out_dir / MODEL_FILE, request, feeds, importance=importance, solved=solved,
                               pinned=choice.pop("pinned") if choice else None)
    copy_runtime_files(exported, out_dir)
    info: dict = {"model_file": MODEL_FILE, "task": SENTENCE_EMBEDDING, "shape": shape,
                  "scheme": qnn_tools.SCHEMES[spec.precision],
                  "weights": "int8 per output channel, scales searched; LayerNorm gammas uint8 (the HTP's LayerNorm)",
                  "calibration": {"text": "lee_background.cor sentences (gensim)", "batches": batches,
                                  "sentences": len(feeds)},
                  "qdq_nodes": qdq_counts(out_dir / MODEL_FILE)}
    if choice:
        info["activations_16bit"] = choice
    if qnn_tools.htp_available():
        with clock("htp_check", f"running {HTP_TEXTS} sentences on Qualcomm's HTP simulator"):
            info["htp_embeddings"] = htp_agreement(out_dir, fp32, held_out[:HTP_TEXTS], qnn_tools.htp_target(opt))
    shutil.rmtree(scratch)
    info["timings"] = clock.seconds
    return info


def static_graph(dynamic: Path, out: Path, tokens: int) -> dict:
    """The export with its inputs fixed at 1 x `tokens`, the attention mask's fill value finite, and
    the shape arithmetic folded away (onnxruntime's basic optimizations, as qnn_preprocess_model
    runs them), written to `out`."""
    import onnx
    from onnxruntime.tools.onnx_model_utils import make_input_shape_fixed

    from edgequant.backends.qnn.tools import MASK_VALUE, save_static

    model = onnx.load(str(dynamic))
    for graph_input in model.graph.input:
        make_input_shape_fixed(model.graph, graph_input.name, [1, tokens])
    replaced = _finite_mask_fill(model, MASK_VALUE)
    if not replaced:
        raise EdgequantError(f"{dynamic} has no attention-mask fill constant (float32's minimum) to make finite",
                             "report this encoder: its export masks padding otherwise than by adding that minimum")
    save_static(model, out)
    return {"batch": 1, "tokens": tokens, "mask_value": MASK_VALUE}


def _finite_mask_fill(model, value: float) -> int:
    """Replace every float scalar at or below -1e30 (the mask's fill) by `value`; how many there were."""
    from onnx import numpy_helper

    tensors = [a.t for node in model.graph.node if node.op_type == "Constant" for a in node.attribute if a.name == "value"]
    count = 0
    for tensor in [*tensors, *model.graph.initializer]:
        array = numpy_helper.to_array(tensor)
        if array.dtype == np.float32 and array.size == 1 and float(array.reshape(-1)[0]) <= -1e30:
            tensor.CopyFrom(numpy_helper.from_array(np.full(array.shape, value, np.float32), tensor.name))
            count += 1
    return count


def fixed_feeds(batch: dict, tokens: int) -> list[dict]:
    """A tokenized batch (padded to its longest text) as one feed per text, padded to `tokens`."""
    feeds = []
    for row in range(len(batch["input_ids"])):
        feed = {name: np.zeros((1, tokens), np.int64) for name in batch}
        for name, values in batch.items():
            feed[name][0, :values.shape[1]] = values[row]
        feeds.append(feed)
    return feeds


def _held_out(exported: Path, batches: int) -> dict:
    """The sentences after the calibration ones, tokenized as the runners will."""
    from edgequant.backends._shared.encoder import CALIBRATION_BATCH, EncoderTokenizer
    from edgequant.measurement.taskdata import calibration_sentences

    start = batches * CALIBRATION_BATCH
    sentences = calibration_sentences(start + HELD_OUT_SENTENCES)[start:]
    if len(sentences) < HELD_OUT_SENTENCES:
        raise EdgequantError(f"the calibration text has too few sentences for {batches} batches and "
                             f"{HELD_OUT_SENTENCES} held-out ones", "ask for fewer samples")
    return EncoderTokenizer.of_artifact(exported)(sentences)


def _padding_check(dynamic: Path, static: Path, feeds: list[dict]) -> float:
    """The least cosine between the dynamic export on each text alone and the static graph on it
    padded; an error when padding changes an embedding."""
    from edgequant.backends._shared.ort import cpu_session

    plain, padded = cpu_session(dynamic), cpu_session(static)
    unpadded = [{name: v[:, :int(f["attention_mask"].sum())] for name, v in f.items()} for f in feeds]
    worst = float(np.min(cosines(_embed(plain, unpadded), _embed(padded, feeds))))
    if 1 - worst > PADDING_TOLERANCE:
        raise EdgequantError(f"padding a text to the fixed length changes its embedding (cosine {worst:.6f} to the "
                             "dynamic graph): the attention mask does not hide the padding",
                             "report this encoder; its mask is not the additive one edgequant makes finite")
    return round(worst, 7)


def _layernorm_gammas(model_path: Path) -> dict[str, str]:
    """Every LayerNormalization's scale -> uint8: the HTP refuses the int8 symmetric default."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    return {node.input[1]: "u8" for node in graph.node if node.op_type == "LayerNormalization"}


def widen_by_cosine(fp32: Path, work: Path, request, feeds: list[dict], held_out: list[dict], importance,
                    solved: dict, layers: int) -> dict:
    """w8a8's activations kept 16-bit, chosen as sensitivity.widen_by_kld chooses an LLM's, with the
    cosine of the embeddings on held-out sentences for the KLD and BERT's `layer.N` module paths
    grouped by role across layers. Returns the counts, the costs behind them and `pinned` (every
    activation's type, scale and zero point, for quantize_qdq)."""
    from edgequant.backends.qnn import kv, sensitivity, tools

    work.mkdir()
    all_16bit = work / "all16.onnx"
    quantized = tools.quantize_qdq(fp32, all_16bit, replace(request, precision="w8a16"), feeds,
                                   importance=importance, solved=solved)  # the same int8 weights as w8a8's
    splicer = sensitivity.EightBitSplicer(all_16bit, layers)
    splicer.groups = sensitivity.tie(_by_role(splicer.groups), _one_width_pairs(all_16bit))
    chosen = sensitivity.choose_eight_bit(splicer, cosine_loss_meter(fp32, held_out), COSINE_BUDGET)
    model = work / "chosen.onnx"
    model.write_bytes(splicer.model_bytes(chosen["eight_bit"]))
    return {"method": "cosine", "count": len(chosen["sixteen_bit"]), "count_8bit": len(chosen["eight_bit"]),
            "budget": COSINE_BUDGET, "held_out_sentences": len(held_out),
            "cosine_all_16bit": round(1 - chosen["kld_all_16bit"], 5), "cosine_chosen": round(1 - chosen["kld_chosen"], 5),
            "eight_bit_groups": chosen["eight_bit_groups"],
            "group_cosine_cost": chosen["group_cost"], "pinned": kv.pinned_overrides(model, quantized.overrides)}


def _by_role(groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """sensitivity's groups merged across BERT's layers (`layer.3` -> `layer.N`)."""
    merged: dict[str, list[str]] = {}
    for role, tensors in groups.items():
        merged.setdefault(re.sub(r"layer\.\d+", "layer.N", role), []).extend(tensors)
    return merged


def _one_width_pairs(qdq_path: Path) -> list[tuple[str, str]]:
    """The (input, output) activations of the nodes the simulated HTP takes only at one width in and
    out besides sensitivity's MatMuls: LayerNormalization and the Gemms onnxruntime fuses from a
    MatMul and its bias (a 16-bit input and an 8-bit output is refused)."""
    import onnx

    graph = onnx.load(str(qdq_path), load_external_data=False).graph
    producers = {out: node for node in graph.node for out in node.output}
    pairs = []
    for node in graph.node:
        dq = producers.get(node.input[0]) if node.op_type in ONE_WIDTH else None
        q = producers.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            pairs.append((q.input[0], node.output[0]))
    return pairs


def cosine_loss_meter(fp32: Path, feeds: list[dict]):
    """model bytes -> 1 - mean cosine of its embeddings to the float graph's over `feeds`. Unfused
    sessions: a spliced 8-bit input keeps the int32 bias its 16-bit scale was quantized for, which
    the CPU EP's fused 8-bit Gemm would read at the new scale (on all-MiniLM-L6-v2 the feed-forward
    group then measured cosine 0.03; quantized at 8 bits it is 0.84)."""
    from edgequant.backends._shared.ort import cpu_session

    reference = _embed(cpu_session(fp32), feeds)
    return lambda model: float(1 - cosines(_embed(cpu_session(model, optimize=False), feeds), reference).mean())


def htp_agreement(folder: Path, fp32: Path, feeds: list[dict], target: dict) -> dict:
    """The QDQ graph on the simulated HTP (CPU fallback off) and on the CPU EP, a few sentences: how
    their embeddings agree, and each one's cosine to the float graph."""
    from edgequant.backends._shared.encoder import MODEL_FILE
    from edgequant.backends.qnn.tools import outputs_on_htp

    record, outputs = outputs_on_htp(folder / MODEL_FILE, fp32, lambda session: _embed(session, feeds), target,
                                     {"texts": len(feeds), "tokens": int(feeds[0]["input_ids"].shape[1])})
    if outputs is None:
        return record
    on_htp, on_cpu, on_float = outputs
    agreement = cosines(on_htp, on_cpu)
    return {**record, "cosine_htp_vs_cpu": {"mean": round(float(agreement.mean()), 5), "min": round(float(agreement.min()), 5)},
            "cosine_vs_float": {"htp": round(float(cosines(on_htp, on_float).mean()), 5),
                                "cpu": round(float(cosines(on_cpu, on_float).mean()), 5)}}


def _embed(session, feeds: list[dict]) -> np.ndarray:
    from edgequant.backends._shared.encoder import OUTPUT

    return np.concatenate([session.run([OUTPUT], feed)[0] for feed in feeds]).astype(np.float32, copy=False)



class QnnEncoderRunner(TaskRunner):
    """The QDQ graph on ONNX Runtime's CPU execution provider, one text per run, padded to the
    graph's fixed length (`htp=True`: on the simulated HTP instead, with onnxruntime-qnn)."""

    task = SENTENCE_EMBEDDING

    def __init__(self, folder: Path, model_file: str, *, name: str, threads: int, htp: bool = False):
        from edgequant.backends._shared.encoder import EncoderTokenizer

        self.name, self._htp = name, htp
        self._tokenizer = EncoderTokenizer.of_artifact(folder)
        from edgequant.backends.qnn.tools import qdq_session

        self._session = qdq_session(folder / model_file, threads, htp)
        self._tokens = int(self._session.get_inputs()[0].shape[1])

    def token_count(self, batch) -> int:
        return self._tokenizer.count(batch)

    def run(self, batch) -> np.ndarray:
        return _embed(self._session, fixed_feeds(self._tokenizer(batch), self._tokens))

    def arithmetic(self) -> str | None:
        from edgequant.backends.qnn.tools import qdq_arithmetic

        return qdq_arithmetic(self._htp)

    def close(self) -> None:
        self._session = None
