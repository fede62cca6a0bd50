"""OpenVINO runner: `generate` through `openvino_genai.LLMPipeline`, `logits` through the raw IR.

Each engine object is built on first use, so the speed probe (generate only) loads one copy of the
weights and the quality pass (logits only) another, never both.

A `?lora=separate` artifact's adapter (lora.py) is applied by every path: GenAI's adapters on the
LLMPipeline (and on each call's GenerationConfig) and on the batch decoder's pipeline, and the
same file's tensors as branches added to the raw IR before the scorer compiles it.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgequant.backends._shared.hf_tokenizer import HFTokenizerMixin
from edgequant.backends.openvino.signal_stack import kept_signal_stack
from edgequant.runner import GenerateParams, Runner

_DONE = object()


class OpenVINORunner(HFTokenizerMixin, Runner):
    def __init__(self, folder: Path, *, name: str, n_ctx: int, threads: int, runtime: dict | None = None,
                 adapter: Path | None = None, adapters: dict[str, Path | None] | None = None):
        """`adapter`: the adapter.safetensors of a `?lora=separate` artifact, applied by every path;
        `adapters`: for an IR several artifacts share, each one's adapter (None: the base alone) by
        served name, the one a request names applied to it (`GenerateParams.adapter`)."""
        import openvino as ov

        self.name, self.n_ctx = name, n_ctx
        self._folder, self._threads = folder, threads
        self._adapter_paths = {None: adapter, **(adapters or {})}  # None: the artifact's own, the scorer's
        self._adapters = None  # GenAIAdapters, made at first use where any path is given
        self._properties = {"INFERENCE_NUM_THREADS": threads}
        self._properties.update(runtime or {})  # what the spec sets; the rest stays the plugin's default
        self._core = ov.Core()
        self._load_hf_tokenizer(folder)  # the tokenizer IRs are checked against it at conversion
        self._request = None
        self._pipeline = None
        self._decoders: list = []

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        return next(self._slices(ids, len(ids))).copy()

    def logit_slices(self, ids: Sequence[int]) -> Iterator[np.ndarray]:
        from edgequant.backends._shared.slices import rows_per_slice

        return self._slices(ids, rows_per_slice(self._vocab_size()))

    def _slices(self, ids: Sequence[int], rows: int) -> Iterator[np.ndarray]:
        """Logits of `ids` in runs of `rows` positions, each a view of the request's output (valid
        until the next run); the IR keeps its KV cache as state, so each run continues the last
        one (reset at the start of every window)."""
        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
        request = self._logits_request()
        request.reset_state()
        for start in range(0, len(ids), rows):
            chunk = list(ids[start:start + rows])
            request.infer({"input_ids": np.asarray([chunk], dtype=np.int64),
                           "attention_mask": np.ones((1, start + len(chunk)), dtype=np.int64),
                           "position_ids": np.arange(start, start + len(chunk), dtype=np.int64)[None, :],
                           "beam_idx": np.zeros(1, dtype=np.int32)})
            yield np.asarray(request.get_tensor("logits").data[0], dtype=np.float32)  # a view when already float32

    def _vocab_size(self) -> int:
        return int(self._logits_request().get_compiled_model().output("logits").get_partial_shape()[-1].get_length())

    def generate(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        budget = self.generation_budget(prompt_ids, params)  # the engine stops itself (max_new_tokens, EOS)
        if budget == 0:
            return
        tokens: queue.Queue = queue.Queue()
        stop = threading.Event()
        worker = threading.Thread(target=self._generate_into, args=(list(prompt_ids), params, budget, tokens, stop),
                                  daemon=True)
        worker.start()
        try:
            while (item := tokens.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # A caller that stops reading (its last token, a cancelled request) must not leave this
            # generation running: the next call on the same pipeline would race it inside GenAI.
            stop.set()
            worker.join()

    def inference_precision(self) -> str:
        request = self._logits_request()
        from edgequant.backends.openvino.tools import short_type_name

        return short_type_name(request.get_compiled_model().get_property("INFERENCE_PRECISION_HINT"))

    def batch_decoder(self, n_seq: int, n_ctx: int):
        """A decoder that advances up to `n_seq` requests per step on GenAI's continuous-batching
        pipeline, its KV cache bounded to `n_ctx` tokens in all; built now, so the server's start
        pays for compiling it, not its first request. It holds its own copy of the weights (not
        the one `generate` loads)."""
        from edgequant.backends.openvino.batch import OpenVINOBatchDecoder

        eos = min(self._eos_ids) if self._eos_ids else None  # any of them makes is_eos end the request
        decoder = OpenVINOBatchDecoder(self._folder, n_seq=n_seq, n_ctx=n_ctx, properties=self._properties, eos_id=eos,
                                      generation_config=generation_config, adapters=self._genai_adapters())
        self._decoders.append(decoder)
        return decoder

    def close(self) -> None:
        for decoder in self._decoders:
            decoder.close()
        self._decoders.clear()
        with kept_signal_stack():  # the pipeline's destructor may unload the CPU plugin
            self._request = self._pipeline = self._adapters = None

    def _logits_request(self):
        if self._request is None:
            model = str(self._folder / "openvino_model.xml")
            if self._adapter_paths[None] is not None:
                from edgequant.backends.openvino.lora import add_branches, read_adapter

                model = self._core.read_model(model)
                add_branches(model, read_adapter(self._adapter_paths[None]))
            with kept_signal_stack():  # it may load the CPU plugin
                self._request = self._core.compile_model(model, "CPU", self._properties).create_infer_request()
        return self._request

    def _genai_adapters(self):
        """GenAI's adapters of this runner (None without any), made once."""
        if self._adapters is None and any(self._adapter_paths.values()):
            from edgequant.backends.openvino.lora import GenAIAdapters

            self._adapters = GenAIAdapters(self._adapter_paths)
        return self._adapters

    def _generate_into(self, prompt: list[int], params: GenerateParams, budget: int, out: queue.Queue,
                       stop: threading.Event) -> None:
        """Runs in a worker thread: LLMPipeline's streamer pushes each token as it is sampled, and
        stops the generation at the next one once `stop` is set."""
        import openvino as ov
        import openvino_genai as genai

        class Streamer(genai.StreamerBase):
            def write(self, token):
                for t in token if isinstance(token, (list, tuple)) else [token]:
                    out.put(int(t))
                return genai.StreamingStatus.STOP if stop.is_set() else genai.StreamingStatus.RUNNING

            def end(self):
                pass

        try:
            ids = np.asarray([prompt], dtype=np.int64)
            inputs = genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids)))
            config = generation_config(params, budget)
            if self._genai_adapters() is not None:
                config.adapters = self._genai_adapters().of(params.adapter)  # unset, the pipeline keeps the last ones
            self._llm_pipeline().generate(inputs, config, Streamer())
        except BaseException as exc:  # surfaced to the caller's thread by generate()
            out.put(exc)
        finally:
            out.put(_DONE)

    def _llm_pipeline(self):
        if self._pipeline is None:
            import openvino_genai as genai

            adapters = {"adapters": self._genai_adapters().every} if self._genai_adapters() is not None else {}
            with kept_signal_stack():  # it may load the CPU plugin
                self._pipeline = genai.LLMPipeline(str(self._folder), "CPU", **self._properties, **adapters)
        return self._pipeline


def generation_config(params: GenerateParams, budget: int):
    """GenAI's settings for one request, shared by `generate` and the batch decoder: greedy at
    temperature 0, else seeded sampling; at most `budget` tokens; EOS ends it unless the caller
    decodes a fixed number of tokens."""
    import openvino_genai as genai

    config = genai.GenerationConfig()
    config.max_new_tokens = budget
    config.ignore_eos = not params.stop_at_eos
    config.do_sample = params.temperature > 0
    if config.do_sample:
        config.temperature = params.temperature
        config.top_p = params.top_p
        config.top_k = params.top_k if params.top_k > 0 else 0
        config.rng_seed = params.seed
    return config

