"""llama.cpp runner (llama-cpp-python) for GGUF artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from edgequant.backends.gguf.lora import AdapterFile, LoadedAdapter, set_adapter
from edgequant.errors import EdgequantError
from edgequant.runner import GenerateParams, Runner


class LlamaRunner(Runner):
    def __init__(self, model_path: Path, *, name: str, n_ctx: int, logits_all: bool, threads: int,
                 adapter: AdapterFile | None = None, adapters: dict[str, AdapterFile | None] | None = None):
        """`logits_all`: this runner will score every position (`logits`), through a context of
        its own that decodes a slice of rows at a time (see scoring.py). `adapter`: a LoRA adapter
        llama.cpp applies to every context of this model (see lora.py). `adapters`: for a base
        shared by several artifacts, each one's adapter (None: the base alone) by served name, the
        one a request names applied to its tokens (`GenerateParams.adapter`)."""
        import llama_cpp

        from edgequant.backends.gguf.tools import QuantizeLog, silence_llama_logs

        self.name, self.n_ctx, self._threads = name, n_ctx, threads
        self._scorer = None
        self._loras: dict[str | None, LoadedAdapter | None] = {None: None}  # None: the artifact's own
        self._llama_cpp = llama_cpp
        with QuantizeLog() as log:
            try:
                # Flash attention, as llama.cpp's own tools and this backend's other contexts (batch
                # decoder, scorer) compute: llama-cpp-python turns it off unless asked. On, the
                # default model decoded 1.12x the tokens/s (10 interleaved rounds of 128 tokens,
                # 1.05x-1.21x; 2 cores, 2026-12-06), and `--batch 1` answers as a batched server.
                self._llm = llama_cpp.Llama(
                    model_path=str(model_path), n_ctx=n_ctx, n_batch=min(n_ctx, 512), logits_all=False,
                    n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=False,
                )
            except ValueError:
                tail = "\n".join(log.text().strip().splitlines()[-3:])
                raise EdgequantError(f"llama.cpp could not load {model_path}:\n{tail}", "re-create the artifact with --force") from None
        try:
            self._load_adapters(adapter, adapters or {})
            self._open_contexts(logits_all)
        except BaseException:
            self.close()
            raise
        silence_llama_logs()
        self._vocab = self._llm._model.vocab
        self._eog: dict[int, bool] = {}  # is_eos's answers so far
        self.bos_id = next(iter(self._llm.tokenize(b"", add_bos=True)), None)  # the GGUF's add_bos_token decides

    def _load_adapters(self, own: AdapterFile | None, named: dict[str, AdapterFile | None]) -> None:
        """Each adapter file loaded once, however many names share it."""
        loaded: dict[AdapterFile, LoadedAdapter] = {}
        for name, file in [(None, own), *named.items()]:
            if file is not None and file not in loaded:
                loaded[file] = LoadedAdapter(self._llm.model, file)
            self._loras[name] = loaded[file] if file is not None else None

    def _open_contexts(self, logits_all: bool) -> None:
        """The own adapter on the generation context, and the scoring context (with it too)."""
        set_adapter(self._llm.ctx, self._loras[None])
        if logits_all:
            from edgequant.backends.gguf.scoring import LogitScorer

            self._scorer = LogitScorer(self._llm.model, n_ctx=self.n_ctx, threads=self._threads, lora=self._loras[None])

    def _adapter(self, name: str | None) -> LoadedAdapter | None:
        if name not in self._loras:
            raise ValueError(f"{self.name} has no adapter named {name!r}")
        return self._loras[name]

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._llm.detokenize(list(ids)).decode("utf-8", errors="replace")

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        return np.concatenate([block.copy() for block in self._scoring().slices(list(ids))])

    def logit_slices(self, ids: Sequence[int]) -> Iterator[np.ndarray]:
        return self._scoring().slices(list(ids))

    def _scoring(self):
        if self._scorer is None:
            raise RuntimeError(f"{self.name}: open the runner with need_logits=True to score positions")
        return self._scorer

    def generate(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        return self.bounded(prompt_ids, params, self._stream(prompt_ids, params))

    def _stream(self, prompt_ids: Sequence[int], params: GenerateParams) -> Iterator[int]:
        llm = self._llm
        set_adapter(llm.ctx, self._adapter(params.adapter))
        llm.reset()  # no prefix reuse between calls: every request pays its own prefill
        llm.set_seed(params.seed)
        yield from llm.generate(list(prompt_ids), temp=params.temperature, top_p=params.top_p, top_k=params.top_k,
                                min_p=0.0, repeat_penalty=1.0, reset=True)

    def is_eos(self, token: int) -> bool:
        # Remembered per token: the server asks for every token it streams, and the ctypes call
        # took 1.2% of its worker's time at 4 clients (py-spy, 2026-12-05).
        known = self._eog.get(token)
        if known is None:
            known = self._eog[token] = bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))
        return known

    def chat_template(self) -> str | None:
        return self._llm.metadata.get("tokenizer.chat_template")

    def batch_decoder(self, n_seq: int, n_ctx: int):
        """A decoder that advances several sequences per llama.cpp call, sharing this model's weights."""
        from edgequant.backends.gguf.batch import BatchDecoder

        return BatchDecoder(self._llm.model, n_seq=n_seq, n_ctx=n_ctx, seq_ctx=self.n_ctx, threads=self._threads, adapter=self._adapter)

    def close(self) -> None:
        """Contexts first, then the adapter, then the model (the server closes its batch decoder before)."""
        if getattr(self, "_scorer", None) is not None:
            self._scorer.close()
            self._scorer = None
        for lora in {id(a): a for a in getattr(self, "_loras", {}).values() if a is not None}.values():
            lora.free()
        self._loras = {None: None}
        if getattr(self, "_llm", None) is not None:
            self._llm.close()
            self._llm = None
