"""Prompt and decode graphs with an explicit KV cache, as Snapdragon LLM apps run them.

Two fixed-shape graphs share the same weights and the same code path, at a fixed context `ctx`:
the prompt graph takes `ar` tokens at a time, the decode graph one. Layout (documented in the
artifact's `kv_layout.json`; L layers, H query heads, K key/value heads, D head size, N = ar or 1):

    inputs   input_ids int64 [1, N]; cos, sin float [1, N, D] (RoPE, computed outside the graph);
             mask float [1, 1, N, ctx] (additive: 0 attends, MASK_VALUE does not); for each layer
             i, past_key_i and past_value_i float [1, K, ctx - N, D] (the cache; slot j holds
             position j, slots at and after the current position are masked)
    outputs  logits float [1, N, vocab]; new_key_i, new_value_i float [1, K, N, D]: only the new
             entries, which the caller writes into its cache at the current position

The attention is written out here (Llama-style: q/k/v/o projections, rotate-half RoPE, grouped
query heads, the layer's own MLP and norms) instead of traced through transformers' cache
classes, so both graphs are static and their tensor names agree. Calibration runs on the prompt
graph only; the decode graph is quantized with the prompt graph's activation encodings (scale
and zero point per tensor), so the two compute on one grid.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgequant.backends.qnn.tools import MASK_VALUE  # see there why it is not float32's minimum
from edgequant.errors import EdgequantError
from edgequant.progress import track

LAYOUT_FILE = "kv_layout.json"
INV_FREQ_FILE = "rope_inv_freq.npy"
PROMPT_FILE, DECODE_FILE = "prompt.onnx", "decode.onnx"
# Llama-style decoders whose attention the graphs write out; others keep the fixed-window graph.
SUPPORTED = ("llama", "mistral", "qwen2")


def unsupported(config: dict) -> str | None:
    """Why the graphs cannot be written for this architecture, or None."""
    if config.get("model_type") in SUPPORTED:
        return None
    return f"graphs=kv supports {', '.join(SUPPORTED)} decoders, not {config.get('model_type')!r}"


def check_architecture(config: dict) -> None:
    reason = unsupported(config)
    if reason:
        raise EdgequantError(reason, "use graphs=fixed (one fixed-window graph) for this model")


def export_graphs(hf_dir: Path, out: Path, ar: int, ctx: int) -> dict:
    """Write the float prompt and decode graphs, the RoPE frequencies and the layout to `out`."""
    import warnings

    import torch

    from edgequant.backends.qnn.tools import model_for_export

    model = model_for_export(hf_dir)
    cfg = model.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = len(model.model.layers)
    layout = {"ctx": ctx, "layers": layers, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
              "graphs": {}, "mask_value": MASK_VALUE,
              "attention_scaling": float(getattr(model.model.rotary_emb, "attention_scaling", 1.0))}
    for name, file, tokens in (("prompt", PROMPT_FILE, ar), ("decode", DECODE_FILE, 1)):
        step = _kv_step(model, tokens, heads, kv_heads, head_dim)
        past = [torch.zeros(1, kv_heads, ctx - tokens, head_dim) for _ in range(2 * layers)]
        example = (torch.zeros(1, tokens, dtype=torch.long), torch.ones(1, tokens, head_dim), torch.zeros(1, tokens, head_dim),
                   torch.zeros(1, 1, tokens, ctx), *past)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(step, example, str(out / file), input_names=["input_ids", "cos", "sin", "mask", *cache_names("past", layers)],
                              output_names=["logits", *cache_names("new", layers)], opset_version=17, dynamo=False)
        layout["graphs"][name] = {"file": file, "tokens": tokens, "past": ctx - tokens}
    np.save(out / INV_FREQ_FILE, model.model.rotary_emb.inv_freq.numpy().astype(np.float32))
    (out / LAYOUT_FILE).write_text(json.dumps(layout, indent=2))
    return layout


def cache_names(prefix: str, layers: int) -> list[str]:
    return [f"{prefix}_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def _kv_step(model, tokens: int, heads: int, kv_heads: int, head_dim: int):
    """A module running `tokens` new tokens against the cache, returning logits and new K/V."""
    import torch

    group = heads // kv_heads

    def rotate_half(x):
        return torch.cat((-x[..., head_dim // 2:], x[..., : head_dim // 2]), dim=-1)

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, cos, sin, mask, *past):
            x = self.model.model.embed_tokens(input_ids)
            cos, sin = cos[:, None], sin[:, None]
            new = []
            for i, layer in enumerate(self.model.model.layers):
                attn, h = layer.self_attn, layer.input_layernorm(x)
                q = attn.q_proj(h).view(1, tokens, heads, head_dim).transpose(1, 2)
                k = attn.k_proj(h).view(1, tokens, kv_heads, head_dim).transpose(1, 2)
                v = attn.v_proj(h).view(1, tokens, kv_heads, head_dim).transpose(1, 2)
                q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
                new += [k, v]
                keys = torch.cat((past[2 * i], k), dim=2).repeat_interleave(group, dim=1)
                values = torch.cat((past[2 * i + 1], v), dim=2).repeat_interleave(group, dim=1)
                scores = q @ keys.transpose(2, 3) * head_dim ** -0.5 + mask
                out = (torch.softmax(scores, dim=-1) @ values).transpose(1, 2).reshape(1, tokens, heads * head_dim)
                x = x + attn.o_proj(out)
                x = x + layer.mlp(layer.post_attention_layernorm(x))
            return (self.model.lm_head(self.model.model.norm(x)), *new)

    return Step()


def rope(inv_freq: np.ndarray, positions: np.ndarray, scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """The graphs' cos and sin inputs for `positions`, [N, D] each (rotate-half layout). The one
    place they are computed, so the genai pipeline's tables (genai.py) feed the very same values."""
    angles = positions[:, None].astype(np.float32) * inv_freq[None]
    angles = np.concatenate([angles, angles], axis=-1)
    return (np.cos(angles) * scaling).astype(np.float32), (np.sin(angles) * scaling).astype(np.float32)


class KVCache:
    """The caller's side of the layout: the cache, positions, RoPE and masks, on numpy."""

    def __init__(self, folder: Path, run_prompt, run_decode):
        self.layout = json.loads((folder / LAYOUT_FILE).read_text())
        self.inv_freq = np.load(folder / INV_FREQ_FILE)
        self._run = {"prompt": run_prompt, "decode": run_decode}
        lay = self.layout
        self.cache = np.zeros((2 * lay["layers"], 1, lay["kv_heads"], lay["ctx"], lay["head_dim"]), np.float32)
        self.position = 0

    @property
    def chunk(self) -> int:
        return self.layout["graphs"]["prompt"]["tokens"]

    def reset(self) -> None:
        self.position = 0  # stale entries stay, masked out

    def step(self, ids, graph: str | None = None) -> np.ndarray:
        """Run `ids` (at most the graph's size) at the current position; returns their logits
        and writes their K/V into the cache. One id goes to the decode graph unless told."""
        graph = graph or ("decode" if len(ids) == 1 else "prompt")
        size = self.layout["graphs"][graph]["tokens"]
        past = self.layout["ctx"] - size
        count = len(ids)
        if count > size or self.position > past:  # the cached positions must fit the graph's past input
            raise EdgequantError(f"{self.position + count} tokens do not fit the {graph} graph at context {self.layout['ctx']}",
                                 "use a larger ?ctx= or a shorter input")
        padded = np.zeros((1, size), np.int64)
        padded[0, :count] = ids
        cos, sin = self._rope(self.position + np.arange(size))
        feed = {"input_ids": padded, "cos": cos, "sin": sin, "mask": self._mask(size, past)}
        for j, name in enumerate(cache_names("past", self.layout["layers"])):
            feed[name] = self.cache[j, :, :, :past]
        outputs = self._run[graph](feed)
        for j, new in enumerate(outputs[1:]):
            self.cache[j, :, :, self.position:self.position + count] = new[:, :, :count]
        self.position += count
        return np.asarray(outputs[0][0, :count], dtype=np.float32)

    def prefill(self, ids) -> np.ndarray:
        """Logits of every id, through the prompt graph in chunks of its size, from position 0."""
        self.reset()
        return np.concatenate([self.step(ids[i:i + self.chunk], "prompt") for i in range(0, len(ids), self.chunk)])

    def _rope(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cos, sin = rope(self.inv_freq, positions, self.layout["attention_scaling"])
        return cos[None], sin[None]

    def _mask(self, size: int, past: int) -> np.ndarray:
        mask = np.full((1, 1, size, self.layout["ctx"]), MASK_VALUE, np.float32)
        mask[..., :self.position] = 0.0  # every cached position
        mask[0, 0, :, past:] = np.triu(np.full((size, size), MASK_VALUE, np.float32), 1)  # causal among the new
        return mask


def cache_types(config: dict, kind: str) -> dict[str, str]:
    """Every KV cache input and output -> `kind` (a tools override type key, e.g. u8)."""
    layers = int(config["num_hidden_layers"])
    return {name: kind for name in cache_names("past", layers) + cache_names("new", layers)}


def calibration_feeds(folder: Path, windows: list[list[int]], session) -> tuple[RecordedFeeds, RecordedFeeds]:
    """Feeds for both float graphs, recorded while running calibration windows through them: each
    window's first half by prompt chunks, then a few decode steps."""
    prompt_feeds, decode_feeds = RecordedFeeds(), RecordedFeeds()

    def recorder(graph_session, kept: RecordedFeeds):
        def run(feed):
            kept.record(feed)
            return graph_session.run(None, feed)
        return run

    cache = KVCache(folder, recorder(session(folder / PROMPT_FILE), prompt_feeds),
                    recorder(session(folder / DECODE_FILE), decode_feeds))
    for window in track(windows, "calibration windows through the float graphs"):
        cache.reset()
        half = _first_half(window, cache.chunk)
        for i in range(0, half, cache.chunk):
            cache.step(window[i:i + cache.chunk], "prompt")
        for token in window[half:half + 4]:
            cache.step([token], "decode")
    return prompt_feeds, decode_feeds


class RecordedFeeds(Sequence):
    """Feeds a graph was run with, read back exactly as they were. A past-cache input is kept only
    up to its last non-zero position and padded back with zeros when read: calibration writes a few
    hundred of the context's positions, and full-length copies of the cache in every feed held
    about 1 GB of zeros on the default model (ctx 1024: 47 MB per feed)."""

    def __init__(self) -> None:
        self._kept: list[dict] = []

    def record(self, feed: dict) -> None:
        self._kept.append({name: _trimmed(value) if name.startswith("past_") else np.array(value)
                           for name, value in feed.items()})

    def __len__(self) -> int:
        return len(self._kept)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [_padded(kept) for kept in self._kept[index]]
        return _padded(self._kept[index])


def _trimmed(cache: np.ndarray) -> tuple[np.ndarray, int]:
    """A [1, K, positions, D] cache cut after its last position holding anything, and its length."""
    used = np.flatnonzero(cache.any(axis=(0, 1, 3)))
    end = int(used[-1]) + 1 if used.size else 0
    return np.array(cache[:, :, :end]), cache.shape[2]


def _padded(kept: dict) -> dict:
    feed = {}
    for name, value in kept.items():
        if isinstance(value, tuple):
            part, length = value
            value = np.zeros((*part.shape[:2], length, *part.shape[3:]), part.dtype)
            value[:, :, :part.shape[2]] = part
        feed[name] = value
    return feed


def run_prompt_chunks(folder: Path, windows: list[list[int]], run) -> None:
    """Each window's first half through the prompt graph, one chunk at a time, by `run` (a feed ->
    the graph's outputs; weights.InputStatistics.run gathers GPTQ's statistics on the way). The
    feeds are not kept: each chunk's KV cache (~44 MB on the default model) would not fit in memory
    past a few hundred chunks."""
    cache = KVCache(folder, run, None)
    for window in track(windows, "windows through the prompt graph"):
        cache.reset()
        for i in range(0, _first_half(window, cache.chunk), cache.chunk):
            cache.step(window[i:i + cache.chunk], "prompt")


def _first_half(window: list[int], chunk: int) -> int:
    """The tokens of a calibration window prefilled in chunks (at least one chunk)."""
    return max(len(window) // 2 // chunk, 1) * chunk


def activation_encodings(qdq_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Tensor name -> (scale, zero point) of every activation's QuantizeLinear in a QDQ model (a
    graph output's tensor is renamed `<name>_QuantizeLinear_Input` by the quantizer)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(qdq_path), load_external_data=False).graph
    constants = {i.name: i for i in graph.initializer}
    found = {}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in constants:
            name = node.input[0].removesuffix("_QuantizeLinear_Input")
            found[name] = (numpy_helper.to_array(constants[node.input[1]]), numpy_helper.to_array(constants[node.input[2]]))
    return found


def compare_encodings(prompt: dict, decode: dict) -> dict:
    """How many of the decode graph's activation encodings equal the prompt graph's."""
    same = sum(name in prompt and all((a == b).all() for a, b in zip(prompt[name], pair)) for name, pair in decode.items())
    return {"activations": len(decode), "same_as_prompt": int(same)}


def pinned_overrides(qdq_path: Path, overrides: dict) -> dict:
    """The tensor overrides that make onnxruntime quantize another graph with the same tensor
    names exactly as `qdq_path` was: `overrides` (what that graph was quantized with, including
    the type conversions mixed precision added, such as an 8-bit KV cache) with every activation's
    scale and zero point read from the model, for its own type and for its converted one."""
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import QuantType

    types = {np.dtype(np.uint8): QuantType.QUInt8, np.dtype(np.uint16): QuantType.QUInt16,
             np.dtype(np.int8): QuantType.QInt8, np.dtype(np.int16): QuantType.QInt16}
    graph = onnx.load(str(qdq_path), load_external_data=False).graph
    constants = {i.name: i for i in graph.initializer}
    weights = {name.removesuffix("_quantized") for name in constants if name.endswith("_quantized")}

    def encoding(scale_name: str, zero_name: str) -> dict:
        zero = numpy_helper.to_array(constants[zero_name])
        return {"quant_type": types[zero.dtype], "scale": np.asarray(numpy_helper.to_array(constants[scale_name]), np.float32),
                "zero_point": zero}

    pinned = {name: value for name, value in overrides.items() if name in weights}
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants or node.input[1].endswith("_convert"):
            continue  # weights, and the second Q of a type conversion (pinned with its tensor below)
        tensor = node.input[0].removesuffix("_QuantizeLinear_Input")  # a graph output's tensor is renamed
        entry = encoding(node.input[1], node.input[2])
        convert = (overrides.get(tensor) or [{}])[0].get("convert")
        if convert:
            entry["convert"] = {**encoding(f"{tensor}_scale_convert", f"{tensor}_zero_point_convert"),
                                **({"recv_nodes": convert["recv_nodes"]} if convert.get("recv_nodes") else {})}
        pinned[tensor] = [entry]
    return pinned


def htp_pipeline_check(folder: Path, float_folder: Path, prompt_ids: list[int], steps: int,
                       target: dict | None = None) -> dict:
    """The artifact as an app runs it, on Qualcomm's simulated HTP with CPU fallback off: prefill
    `prompt_ids` in chunks, then `steps` greedy decode steps. Compared over the same tokens (those
    the CPU execution provider's run generates) with that CPU run and with the float graphs in
    `float_folder`. The tolerance: the HTP run may not be further from the float model than the CPU
    run is, beyond 1.5x its KLD + 0.01 (the HTP computes in fixed point where the CPU dequantizes)."""
    import onnxruntime as ort

    from edgequant.backends._shared.ort import cpu_session
    from edgequant.backends.qnn.tools import htp_options, htp_refusal, htp_session_options
    from edgequant.measurement.logprobs import first_difference, kl_divergence, log_softmax

    def pipeline(graph_folder: Path, session) -> KVCache:
        prompt, decode = session(graph_folder / PROMPT_FILE), session(graph_folder / DECODE_FILE)
        return KVCache(graph_folder, lambda feed: prompt.run(None, feed), lambda feed: decode.run(None, feed))

    def teacher_forced(cache: KVCache, tokens: list[int]) -> np.ndarray:
        rows = [cache.prefill(prompt_ids)]
        rows += [cache.step([token]) for token in tokens[:-1]]
        return np.concatenate(rows)

    report = {"backend": "QNN HTP simulator (x86-64)", **htp_options(target), "prompt_tokens": len(prompt_ids),
              "decode_steps": steps}
    started = time.perf_counter()
    try:
        htp = pipeline(folder, lambda path: ort.InferenceSession(str(path), htp_session_options(target=target)))
    except Exception as exc:  # the graphs still run on the CPU EP; the HTP's refusal is the finding
        return {**report, "error": htp_refusal(exc)}
    report["seconds"] = {"htp_load": round(time.perf_counter() - started, 1)}
    if steps == 0:
        return report
    cpu = pipeline(folder, cpu_session)
    tokens = [int(cpu.prefill(prompt_ids)[-1].argmax())]
    for _ in range(steps):
        tokens.append(int(cpu.step([tokens[-1]])[-1].argmax()))
    runs = {"cpu": teacher_forced(cpu, tokens)}
    del cpu  # each pair of sessions goes once its run is done (three pairs at once: the default model's 9.6 GB peak)
    started = time.perf_counter()
    runs["htp"] = teacher_forced(htp, tokens)
    report["seconds"]["htp_run"] = round(time.perf_counter() - started, 1)
    del htp
    runs["float"] = teacher_forced(pipeline(float_folder, cpu_session), tokens)
    reference = log_softmax(runs["float"])
    kld = {name: kl_divergence(reference, log_softmax(runs[name])) for name in ("cpu", "htp")}
    split = len(prompt_ids)
    generated = runs["htp"][split - 1:].argmax(-1).tolist()
    report.update({
        "greedy_tokens_same_as_cpu": first_difference(generated, tokens),
        "top1_agreement_with_cpu": round(float((runs["htp"].argmax(-1) == runs["cpu"].argmax(-1)).mean()), 4),
        "kld_vs_float": {name: {"prefill": round(float(k[:split].mean()), 6), "decode": round(float(k[split:].mean()), 6)}
                         for name, k in kld.items()},
        "max_abs_logit_diff_vs_cpu": round(float(np.abs(runs["htp"] - runs["cpu"]).max()), 4)})
    report["within_tolerance"] = bool(kld["htp"].mean() <= 1.5 * kld["cpu"].mean() + 0.01)
    return report


def share_weights(folder: Path, primary: str = PROMPT_FILE, secondary: str = DECODE_FILE) -> dict:
    """Store once what both graphs hold: every external initializer of `secondary` whose bytes
    equal the same-named one of `primary` is pointed at `primary`'s data file, and `secondary`'s own
    data file is rewritten with only the rest. The graphs share their weights by construction
    (same names, same values), so this halves the artifact; onnxruntime resolves each graph's
    external data relative to the folder, so both still load on their own."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    def locations(model) -> dict[str, dict]:
        return {i.name: {e.key: e.value for e in i.external_data} for i in model.graph.initializer if uses_external_data(i)}

    def read(where: dict) -> bytes:
        with open(folder / where["location"], "rb") as f:
            f.seek(int(where.get("offset", 0)))
            return f.read(int(where["length"]))

    shared_from = locations(onnx.load(str(folder / primary), load_external_data=False))
    model = onnx.load(str(folder / secondary), load_external_data=False)
    own_file = secondary + ".data"
    kept, shared_bytes = bytearray(), 0
    for tensor in model.graph.initializer:
        if not uses_external_data(tensor):
            continue
        where = {e.key: e.value for e in tensor.external_data}
        data = read(where)
        other = shared_from.get(tensor.name)
        if other is not None and int(other["length"]) == len(data) and read(other) == data:
            target, shared_bytes = other, shared_bytes + len(data)
        else:
            target = {"location": own_file, "offset": str(len(kept)), "length": str(len(data))}
            kept += data
        del tensor.external_data[:]
        for key, value in target.items():
            tensor.external_data.add(key=key, value=value)
    (folder / own_file).unlink(missing_ok=True)
    if kept:
        (folder / own_file).write_bytes(bytes(kept))
    onnx.save(model, str(folder / secondary))
    return {"shared_bytes": shared_bytes, "own_bytes": len(kept), "data_file": primary + ".data"}
