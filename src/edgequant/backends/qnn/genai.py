"""Run a graphs=kv QNN artifact (see kv.py) with onnxruntime-genai, as a `decoder-pipeline` model.

onnxruntime-genai runs Qualcomm NPU LLMs as a pipeline of ONNX sessions that exchange tensors by
name. Two of its pieces fit our prompt and decode graphs:

* `sliding_window` with `slide_inputs` cuts the prompt into windows of `window_size` tokens
  (padding the last window after the prompt with `pad_token_id`, `alignment: left`), runs the
  pipeline once per window, then one token at a time. With `run_on_prompt` / `run_on_token_gen`
  our prompt graph takes the windows and our decode graph the single tokens.
* with `slide_key_value_cache: false` genai keeps its default KV cache. When a cache input has a
  fixed length it shares one buffer per key and value between past and present, [1, K, ctx, D],
  which genai never moves: slot j holds position j, as in our layout. (Its windowed cache, the
  other choice, is right-aligned, slides on every step and insists on uint8 entries, while our
  graphs read and write float32 entries.)

What genai does not produce is our graphs' inputs: cos and sin, the additive mask, the past cut to
ctx - N slots, and the writing of the N new entries into the cache. Two small CPU graphs do that:

    genai_positions.onnx  (first)  token ids, past_sequence_length, the cache buffers
                                   -> input_ids, cos, sin, mask, past_key_i, past_value_i
    genai_kv_update.onnx  (last)   past_sequence_length, new_key_i, new_value_i, the buffers
                                   -> the same buffers with the new entries written in place

The position comes from genai's `past_sequence_length` input, not from its position_ids or
attention_mask: with left alignment those count the pad tokens of the last prompt window as real
tokens, while `past_sequence_length` is the index of the newest real token (for a prompt window,
of the window's last slot). So the window starts at past_sequence_length - N + 1.

The pad id is vocab_size, an id no prompt contains: genai finds the prompt's length and the row of
logits to sample from by looking for the pad id, so a pad id that is also a real token (eos in a
chat prompt, say) would cut the prompt short. The positions graph maps it back to id 0 before the
embedding lookup.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CONFIG_FILE = "genai_config.json"
POSITIONS_FILE = "genai_positions.onnx"
KV_UPDATE_FILE = "genai_kv_update.onnx"
OPSET = 17

# genai's own names for what it feeds and keeps; the graphs' names come from kv.py.
TOKEN_IDS = "token_ids"
PAST_LENGTH = "past_sequence_length"
TOTAL_LENGTH = "total_sequence_length"
PAST_TEMPLATE = "past_key_values.%d.{kind}"
PRESENT_TEMPLATE = "present.%d.{kind}"


def write_genai_config(folder: Path, layout: dict, config: dict) -> list[str]:
    """Write genai_config.json and the two CPU side graphs into `folder`, a graphs=kv artifact;
    return the names of the files written. `layout` is kv_layout.json, `config` the Hugging Face
    config.json (token ids, vocabulary and hidden sizes)."""
    from edgequant.backends.qnn.kv import INV_FREQ_FILE, cache_names, rope
    from edgequant.errors import EdgequantError

    folder = Path(folder)
    vocab = int(config["vocab_size"])
    eos = config.get("eos_token_id")
    if eos is None:  # genai stops on it and finds no other source for it
        raise EdgequantError("config.json has no eos_token_id; onnxruntime-genai needs one", "add eos_token_id to config.json")
    if layout["graphs"]["decode"]["tokens"] != 1:  # genai feeds one token per step after the prompt
        raise EdgequantError(f"the decode graph takes {layout['graphs']['decode']['tokens']} tokens, genai feeds 1",
                             "export the graphs again with kv.export_graphs")
    cos, sin = rope(np.load(folder / INV_FREQ_FILE), np.arange(layout["ctx"]), layout["attention_scaling"])
    _save(_positions_graph(layout, vocab, cos, sin), folder / POSITIONS_FILE)
    _save(_kv_update_graph(layout), folder / KV_UPDATE_FILE)

    layers = layout["layers"]
    buffers = _buffer_names("past", layers)
    presents = _buffer_names("present", layers)
    graphs = layout["graphs"]
    pipeline = [
        {"positions": {"filename": POSITIONS_FILE, "inputs": [TOKEN_IDS, PAST_LENGTH, TOTAL_LENGTH, *buffers],
                       "outputs": ["input_ids", "cos", "sin", "mask", *cache_names("past", layers)]}},
        {"prompt": {"filename": graphs["prompt"]["file"], "run_on_token_gen": False,
                    "inputs": ["input_ids", "cos", "sin", "mask", *cache_names("past", layers)],
                    "outputs": ["logits", *cache_names("new", layers)]}},
        {"decode": {"filename": graphs["decode"]["file"], "run_on_prompt": False,
                    "inputs": ["input_ids", "cos", "sin", "mask", *cache_names("past", layers)],
                    "outputs": ["logits", *cache_names("new", layers)]}},
        {"kv_update": {"filename": KV_UPDATE_FILE, "inputs": [PAST_LENGTH, *cache_names("new", layers), *buffers],
                       "outputs": presents}},
    ]
    genai = {
        "model": {
            "type": "decoder-pipeline",
            "bos_token_id": config.get("bos_token_id") if config.get("bos_token_id") is not None else eos,
            "eos_token_id": eos,
            "pad_token_id": vocab,  # outside the vocabulary on purpose, see the module docstring
            "vocab_size": vocab,
            "context_length": layout["ctx"],
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "head_size": layout["head_dim"],
                "hidden_size": int(config.get("hidden_size", layout["heads"] * layout["head_dim"])),
                "num_attention_heads": layout["heads"],
                "num_key_value_heads": layout["kv_heads"],
                "num_hidden_layers": layers,
                "inputs": {"input_ids": TOKEN_IDS, "past_sequence_length": PAST_LENGTH,
                           "total_sequence_length": TOTAL_LENGTH,
                           "past_key_names": PAST_TEMPLATE.format(kind="key"),
                           "past_value_names": PAST_TEMPLATE.format(kind="value")},
                "outputs": {"logits": "logits", "present_key_names": PRESENT_TEMPLATE.format(kind="key"),
                            "present_value_names": PRESENT_TEMPLATE.format(kind="value")},
                # pad_value only fills genai's windowed (uint8) cache, which this pipeline does not use.
                "sliding_window": {"window_size": graphs["prompt"]["tokens"], "pad_value": 0, "alignment": "left",
                                   "slide_inputs": True, "slide_key_value_cache": False},
                "pipeline": pipeline,
            },
        },
        # genai keeps the pads of the last prompt window in its sequence, so they count toward
        # max_length; a prompt that fills max_length once padded (0.14.1) aborts the process on the
        # first generate_next_token, writing one slot past its sequence buffer. Callers must keep
        # the prompt, rounded up to a multiple of window_size, below max_length.
        "search": {"max_length": layout["ctx"], "min_length": 0, "num_beams": 1, "num_return_sequences": 1,
                   "do_sample": False, "top_k": 1, "top_p": 1.0, "temperature": 1.0, "repetition_penalty": 1.0,
                   "length_penalty": 1.0, "diversity_penalty": 0.0, "no_repeat_ngram_size": 0,
                   "early_stopping": True, "past_present_share_buffer": True},
    }
    (folder / CONFIG_FILE).write_text(json.dumps(genai, indent=2))
    return [CONFIG_FILE, POSITIONS_FILE, KV_UPDATE_FILE]


def _buffer_names(side: str, layers: int) -> list[str]:
    template = PAST_TEMPLATE if side == "past" else PRESENT_TEMPLATE
    return [template.format(kind=kind) % i for i in range(layers) for kind in ("key", "value")]


class _Graph:
    """A few helpers over onnx.helper for writing small graphs by hand."""

    def __init__(self):
        self.nodes, self.inits = [], []
        self._count = 0

    def const(self, value, dtype=np.int64) -> str:
        from onnx import numpy_helper

        self._count += 1
        name = f"const_{self._count}"
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        from onnx import helper

        self._count += 1
        out = out or f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], **attrs))
        return out

    def window(self, length: str) -> tuple[str, str, str]:
        """(start, steps, positions) of a window of N tokens: its first position (int64 [1]),
        0..N-1 and its positions (int64 [N]), from the newest position (past_sequence_length) and
        N (int64 [1])."""
        from onnx import TensorProto

        newest = self.op("Reshape", self.op("Cast", PAST_LENGTH, to=TensorProto.INT64), self.const([1]))
        start = self.op("Add", self.op("Sub", newest, length), self.const([1]))
        steps = self.op("Range", self.const(0), self.op("Squeeze", length, self.const([0])), self.const(1))
        return start, steps, self.op("Add", steps, start)

    def model(self, name: str, inputs: list, outputs: list):
        from onnx import helper

        graph = helper.make_graph(self.nodes, name, inputs, outputs, self.inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgequant")


def _tensor(name: str, elem_type: int, shape: list):
    from onnx import helper

    return helper.make_tensor_value_info(name, elem_type, shape)


def _positions_graph(layout: dict, vocab: int, cos: np.ndarray, sin: np.ndarray):
    """Token ids and the position -> everything the prompt or the decode graph reads (N tokens,
    N taken from the ids' shape, so one graph serves both)."""
    from onnx import TensorProto

    from edgequant.backends.qnn.kv import cache_names

    ctx, heads, dim = layout["ctx"], layout["kv_heads"], layout["head_dim"]
    g = _Graph()
    length = g.op("Slice", g.op("Shape", TOKEN_IDS), g.const([1]), g.const([2]))  # N, int64 [1]
    start, steps, positions = g.window(length)
    # pads (the out-of-vocabulary pad id) become id 0; their entries land after the prompt, masked
    ids = g.op("Cast", TOKEN_IDS, to=TensorProto.INT64)
    g.op("Where", g.op("Less", ids, g.const(vocab)), ids, g.const(0), out="input_ids")
    rows = g.op("Unsqueeze", positions, g.const([0]))  # [1, N]
    g.op("Gather", g.const(cos, np.float32), rows, out="cos", axis=0)
    g.op("Gather", g.const(sin, np.float32), rows, out="sin", axis=0)
    # the mask's columns are the ctx - N past slots, then the N new tokens (the graphs concatenate
    # past and new keys in that order): a past slot is seen if it holds an earlier position, a new
    # token if it is not after the row's own token
    columns = g.const(np.arange(ctx))
    past_slots = g.op("Sub", g.const([ctx]), length)  # ctx - N, int64 [1]
    seen_past = g.op("Less", columns, start)
    new_index = g.op("Sub", columns, past_slots)  # column - (ctx - N): the new token's index, or negative
    row = g.op("Unsqueeze", steps, g.const([1]))  # [N, 1]
    seen_new = g.op("And", g.op("GreaterOrEqual", new_index, g.const(0)), g.op("LessOrEqual", new_index, row))
    allowed = g.op("Or", seen_past, seen_new)  # [N, ctx]
    additive = g.op("Where", allowed, g.const(0.0, np.float32), g.const(layout["mask_value"], np.float32))
    g.op("Unsqueeze", additive, g.const([0, 1]), out="mask")
    # the graphs' past inputs are the first ctx - N slots of genai's buffers
    for buffer, past in zip(_buffer_names("past", layout["layers"]), cache_names("past", layout["layers"])):
        g.op("Slice", buffer, g.const([0]), past_slots, g.const([2]), out=past)

    cache = [1, heads, ctx, dim]
    inputs = [_tensor(TOKEN_IDS, TensorProto.INT32, [1, "tokens"]), _tensor(PAST_LENGTH, TensorProto.INT32, [1, 1]),
              # genai feeds past_sequence_length only to a pipeline that also takes this one
              _tensor(TOTAL_LENGTH, TensorProto.INT32, [1]),
              *[_tensor(name, TensorProto.FLOAT, cache) for name in _buffer_names("past", layout["layers"])]]
    outputs = [_tensor("input_ids", TensorProto.INT64, [1, "tokens"]),
               _tensor("cos", TensorProto.FLOAT, [1, "tokens", dim]), _tensor("sin", TensorProto.FLOAT, [1, "tokens", dim]),
               _tensor("mask", TensorProto.FLOAT, [1, 1, "tokens", ctx]),
               *[_tensor(name, TensorProto.FLOAT, [1, heads, "past", dim]) for name in cache_names("past", layout["layers"])]]
    return g.model("edgequant_genai_positions", inputs, outputs)


def _kv_update_graph(layout: dict):
    """Write the N new entries of each layer at their positions (pads of the last prompt window
    too: they land after the prompt, masked, and generated tokens overwrite them). genai binds one
    buffer as both the past input and the present output, and onnxruntime's CPU ScatterND copies
    its data input to its output only when they are different buffers, so a step writes N slots
    rather than copying the cache."""
    from onnx import TensorProto

    from edgequant.backends.qnn.kv import cache_names

    ctx, heads, dim, layers = layout["ctx"], layout["kv_heads"], layout["head_dim"], layout["layers"]
    new = cache_names("new", layers)
    g = _Graph()
    length = g.op("Slice", g.op("Shape", new[0]), g.const([2]), g.const([3]))  # N, int64 [1]
    _, _, positions = g.window(length)
    # ScatterND indices [1, K, N, 3]: (batch 0, head h, position) for every head and new token
    grid = g.op("Concat", g.const([1, heads]), length, g.const([1]), axis=0)
    batch = g.op("Expand", g.const(np.zeros((1, 1, 1, 1), np.int64)), grid)
    head = g.op("Expand", g.const(np.arange(heads).reshape(1, heads, 1, 1)), grid)
    slot = g.op("Expand", g.op("Unsqueeze", positions, g.const([0, 1, 3])), grid)
    indices = g.op("Concat", batch, head, slot, axis=3)
    for entries, buffer, present in zip(new, _buffer_names("past", layers), _buffer_names("present", layers)):
        g.op("ScatterND", buffer, indices, entries, out=present)

    cache = [1, heads, ctx, dim]
    inputs = [_tensor(PAST_LENGTH, TensorProto.INT32, [1, 1]),
              *[_tensor(name, TensorProto.FLOAT, [1, heads, "tokens", dim]) for name in new],
              *[_tensor(name, TensorProto.FLOAT, cache) for name in _buffer_names("past", layers)]]
    outputs = [_tensor(name, TensorProto.FLOAT, cache) for name in _buffer_names("present", layers)]
    return g.model("edgequant_genai_kv_update", inputs, outputs)


def _save(model, path: Path) -> None:
    import onnx

    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
