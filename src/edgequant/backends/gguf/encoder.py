"""GGUF sentence encoders: llama.cpp's converter on the Hugging Face folder (it registers BertModel
and writes the pooling that modules.json names), quantized by `llama_model_quantize` like a causal
LM's GGUF, and run by llama.cpp in embedding mode.

The runner tokenizes with the GGUF's own WordPiece vocabulary (llama.cpp's tokenizer, not the
`tokenizers` library the other formats use): on all-MiniLM-L6-v2 it gives the same ids as
tokenizer.json on all 250 evaluation texts; one difference is known, a word of over 100
characters, which `tokenizers` makes [UNK] and llama.cpp splits into pieces. It cuts a long text as the other runners do, to
`max_tokens` ids with [CLS] first and [SEP] last (llama-cpp-python's own `embed(truncate=True)`
would cut at the batch size and drop [SEP]).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import numpy as np

from edgequant.errors import EdgequantError
from edgequant.runner import TaskRunner
from edgequant.sources.tasks import SENTENCE_EMBEDDING

MODEL_FILE = "model.gguf"
# Spec options the encoder path reads: how `llama_model_quantize` runs and which tensors it keeps
# at which type. The importance matrix (computed from a causal LM's next-token statistics) and the
# output matrix (an encoder has none) do not apply.
ENCODER_OPTIONS = ("nthread", "pure", "embd", "tensor")
_POOLING = {"mean": 1, "cls": 2}  # llama.cpp's enum llama_pooling_type
_GGUF_POOLING = {1: "mean", 2: "cls", 3: "last", 4: "rank"}


def convert_encoder(source, spec, out_dir: Path, quantize: Callable[[Path, Path], str]) -> dict:
    """The float GGUF of `source` (cached per source), copied as is or `quantize(float, target)`
    (which returns llama.cpp's log) into `out_dir`, beside `encoder.json`."""
    from edgequant.backends._shared.encoder import refuse_options, write_settings
    from edgequant.backends.gguf import tools as gguf_tools

    refuse_options(spec, ENCODER_OPTIONS, source)
    gguf_tools.llama_cpp_version()  # fail fast if the engine is missing
    gguf_tools.check_architecture(source.architecture)  # e.g. MPNetModel: not registered by the converter
    started = time.perf_counter()
    intermediate = gguf_tools.float_intermediate(source)
    converted = time.perf_counter()
    info: dict = {"model_file": MODEL_FILE, "task": SENTENCE_EMBEDDING,
                  "intermediate": {"path": str(intermediate), "type": gguf_tools.intermediate_type(source)},
                  "pooling": _checked_pooling(intermediate, source)}
    target = out_dir / MODEL_FILE
    if spec.precision == gguf_tools.intermediate_type(source):
        shutil.copyfile(intermediate, target)
    else:
        (out_dir / "quantize.log").write_text(quantize(intermediate, target))
    info["tensor_types"] = gguf_tools.tensor_types(target)
    write_settings(source.encoder, out_dir)
    info["timings"] = {"intermediate_s": round(converted - started, 3), "quantize_s": round(time.perf_counter() - converted, 3)}
    return info


def _checked_pooling(gguf: Path, source) -> str:
    """The pooling the GGUF declares, which must be the source's; a GGUF that declares none (a bare
    encoder folder without modules.json) is run with the source's pooling by `LlamaEncoderRunner`."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf).fields
    field = fields.get(f"{fields['general.architecture'].contents()}.pooling_type")
    if field is None:
        return f"none in the GGUF ({source.encoder.pooling} applied by the runner; other llama.cpp tools need --pooling)"
    declared = _GGUF_POOLING.get(int(field.contents()), str(field.contents()))
    if declared != source.encoder.pooling:
        raise EdgequantError(f"llama.cpp's converter wrote pooling {declared!r} into the GGUF of {source.name}, "
                             f"whose folder declares {source.encoder.pooling!r}",
                             "check the folder's modules.json and 1_Pooling/config.json")
    return declared


class LlamaEncoderRunner(TaskRunner):
    """Texts -> pooled (and, where the source normalizes, unit-length) embeddings from llama.cpp,
    one llama.cpp call per text."""

    task = SENTENCE_EMBEDDING

    def __init__(self, folder: Path, model_file: str, *, name: str, threads: int):
        import llama_cpp

        from edgequant.backends._shared.encoder import SETTINGS_FILE
        from edgequant.backends.gguf.tools import QuantizeLog, silence_llama_logs

        settings = json.loads((folder / SETTINGS_FILE).read_text())
        self.name, self._lib = name, llama_cpp
        self._max_tokens, self._normalize = int(settings["max_tokens"]), bool(settings["normalize"])
        pooling = _POOLING[settings["pooling"]]
        with QuantizeLog() as log:
            try:
                # A non-causal encoder takes a whole text in one micro-batch: n_ubatch >= max_tokens.
                self._llm = llama_cpp.Llama(
                    model_path=str(folder / model_file), embedding=True, n_ctx=self._max_tokens,
                    n_batch=self._max_tokens, n_ubatch=self._max_tokens, pooling_type=pooling,
                    n_threads=threads, n_threads_batch=threads, verbose=False)
            except ValueError:
                tail = "\n".join(log.text().strip().splitlines()[-3:])
                raise EdgequantError(f"llama.cpp could not load {folder / model_file}:\n{tail}",
                                     "re-create the artifact with --force") from None
        silence_llama_logs()
        if self._llm.pooling_type() != pooling:
            raise EdgequantError(f"llama.cpp pools {folder / model_file} with type {self._llm.pooling_type()}, "
                                 f"not {settings['pooling']}", "re-create the artifact with --force")
        vocab = self._llm._model.vocab
        self._ends = {llama_cpp.llama_vocab_sep(vocab), llama_cpp.llama_vocab_eos(vocab)}
        self._dim = self._llm.n_embd()

    def ids(self, text: str) -> list[int]:
        """[CLS] text [SEP] as llama.cpp tokenizes it, cut to `max_tokens` keeping [SEP] last."""
        ids = self._llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
        if len(ids) <= self._max_tokens:
            return ids
        return ids[:self._max_tokens - 1] + ids[-1:] if ids[-1] in self._ends else ids[:self._max_tokens]

    def token_count(self, batch) -> int:
        return sum(len(self.ids(text)) for text in batch)

    def run(self, batch) -> np.ndarray:
        out = np.zeros((len(batch), self._dim), dtype=np.float32)
        for row, text in enumerate(batch):
            out[row] = self._pooled(self.ids(text))
        if self._normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out

    def _pooled(self, ids: list[int]) -> np.ndarray:
        """One text through llama.cpp: its pooled token states. Texts are not packed into one call:
        on a CPU (llama-cpp-python 0.3.36, all-MiniLM-L6-v2 q8_0, 1 thread) one call per text ran
        62 texts/s at batch 8, packing them up to 256 tokens per call 39/s."""
        batch, ctx = self._llm._batch, self._llm._ctx
        batch.reset()
        batch.add_sequence(ids, 0, True)
        ctx.encode(batch)
        pointer = self._lib.llama_get_embeddings_seq(ctx.ctx, 0)
        if not pointer:
            raise EdgequantError(f"llama.cpp returned no pooled embedding for {self.name}", "re-create the artifact with --force")
        return np.ctypeslib.as_array(pointer, shape=(self._dim,))

    def close(self) -> None:
        if getattr(self, "_llm", None) is not None:
            self._llm.close()
        self._llm = None
