"""ONNX runner: onnxruntime-genai generates (streaming, KV cache), a raw onnxruntime session
scores (a window from an empty past, a slice of positions per run at a large vocabulary, each
continuing from the last one's KV cache) and serves batches (continuous.py), and the artifact's
Hugging Face tokenizer tokenizes, so ids match the source model's exactly.

Both engines load lazily: the quality pass and the batching server only need the session, the
speed probe and a one-at-a-time server only the generator, and holding both would double the
resident weights.

A `?lora=separate` artifact's adapter (lora.py) is applied by every path: run options on the
scorer's runs, its tensors bound as inputs in the batch decoder, og.Adapters on each generator.
A runner over a graph several such artifacts share holds each one's adapter and applies the one
a request names.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgequant.backends._shared.hf_tokenizer import HFTokenizerMixin
from edgequant.runner import GenerateParams, Runner


class OnnxRunner(HFTokenizerMixin, Runner):
    def __init__(self, folder: Path, model_file: str, *, name: str, n_ctx: int, threads: int, adapter: Path | None = None,
                 adapters: dict[str, Path | None] | None = None):
        """`adapter`: the adapter.onnx_adapter of a `?lora=separate` artifact, applied to every run;
        `adapters`: for a graph several artifacts share, each one's adapter file (None: the base
        alone) by served name, the one a request names applied (`GenerateParams.adapter`)."""
        self.name, self.n_ctx = name, n_ctx
        self._folder, self._model_path, self._threads = folder, folder / model_file, threads
        self._load_hf_tokenizer(folder)
        self._session = None
        self._genai = None
        self._adapter_paths: dict[str | None, Path | None] = {None: adapter, **(adapters or {})}
        self._adapters: dict[Path, object] = {}  # LoadedAdapter by file, loaded when first applied

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        return next(self._slices(ids, len(ids)))

    def logit_slices(self, ids: Sequence[int]) -> Iterator[np.ndarray]:
        from edgequant.backends._shared.slices import rows_per_slice

        return self._slices(ids, rows_per_slice(self._vocab_size()))

    def _slices(self, ids: Sequence[int], rows: int) -> Iterator[np.ndarray]:
        """Logits of `ids` in runs of `rows` positions, each run fed the KV cache the last one
        returned (on the default model's int4 artifact, identical to one whole-window run)."""
        from edgequant.backends.onnx.tools import kv_feeds

        if len(ids) > self.n_ctx:
            raise ValueError(f"{len(ids)} tokens exceed the context of {self.n_ctx}")
        session = self._ensure_session()
        own = self._loaded_adapter(None)
        options = own.run_options if own else None
        names = {i.name for i in session.get_inputs()}
        outputs = [o.name for o in session.get_outputs()]
        past = kv_feeds(session.get_inputs())
        for start in range(0, len(ids), rows):
            chunk = list(ids[start:start + rows])
            feeds = {"input_ids": np.asarray([chunk], np.int64), "attention_mask": np.ones((1, start + len(chunk)), np.int64),
                     "position_ids": np.arange(start, start + len(chunk), dtype=np.int64)[None], **past}
            found = dict(zip(outputs, session.run(outputs, {k: v for k, v in feeds.items() if k in names}, options)))
            past = {name.replace("present", "past_key_values", 1): value for name, value in found.items()
                    if name.startswith("present")}
            yield np.asarray(found.pop("logits")[0], dtype=np.float32)

    def _vocab_size(self) -> int:
        logits = next(o for o in self._ensure_session().get_outputs() if o.name == "logits")
        if isinstance(logits.shape[-1], int):
            return logits.shape[-1]
        return int(json.loads((self._folder / "genai_config.json").read_text())["model"]["vocab_size"])

    def generate(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        return self.bounded(prompt_ids, params, self._stream(prompt_ids, params))

    def _stream(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        import onnxruntime_genai as og

        model = self._ensure_genai()
        search = {"max_length": len(prompt_ids) + self.generation_budget(prompt_ids, params), "do_sample": params.temperature > 0}
        if params.temperature > 0:
            search.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k or 0,
                          random_seed=params.seed)
        gen_params = og.GeneratorParams(model)
        gen_params.set_search_options(**search)
        generator = og.Generator(model, gen_params)
        adapter = self._loaded_adapter(params.adapter)
        if adapter is not None:
            adapter.activate(model, generator)
        generator.append_tokens(list(prompt_ids))
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0])

    def batch_decoder(self, n_seq: int, n_ctx: int):
        """Continuous batching on this runner's onnxruntime session (see backends/onnx/continuous.py);
        None for a graph without GroupQueryAttention, whose cache cannot be shared in place."""
        from edgequant.backends.onnx.continuous import ContinuousDecoder
        from edgequant.backends.onnx.tools import op_types

        if "GroupQueryAttention" not in op_types(self._model_path):
            return None
        session = self._ensure_session()
        return ContinuousDecoder(session, n_seq=n_seq, n_ctx=n_ctx, seq_ctx=self.n_ctx, end_token=min(self._eos_ids, default=None),
                                 adapter=lambda name: getattr(self._loaded_adapter(name), "values", {}))

    def close(self) -> None:
        self._adapters = {}  # before the genai model their og.Adapters belong to
        self._session = None
        self._genai = None

    def _ensure_session(self):
        if self._session is None:
            from edgequant.backends._shared.ort import cpu_session

            self._session = cpu_session(self._model_path, self._threads)
            for adapter in self._adapters.values():
                adapter.check(self._session)
        return self._session

    def _loaded_adapter(self, name: str | None):
        """The adapter a request's `GenerateParams.adapter` names, read at its first use and
        checked against the graph; None for the base alone."""
        if name not in self._adapter_paths:
            raise ValueError(f"{self.name} has no adapter named {name!r}")
        path = self._adapter_paths[name]
        if path is None:
            return None
        if path not in self._adapters:
            from edgequant.backends.onnx.lora import LoadedAdapter

            self._adapters[path] = LoadedAdapter(path)
            if self._session is not None:
                self._adapters[path].check(self._session)
        return self._adapters[path]

    def _ensure_genai(self):
        if self._genai is None:
            import onnxruntime_genai as og

            config = og.Config(str(self._folder))
            config.clear_providers()  # CPU
            threads = {"model": {"decoder": {"session_options": {"intra_op_num_threads": self._threads}}}}
            config.overlay(json.dumps(threads))
            self._genai = og.Model(config)
        return self._genai

