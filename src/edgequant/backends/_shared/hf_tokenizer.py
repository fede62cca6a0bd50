"""Tokenization from the Hugging Face tokenizer files an artifact folder carries."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


class HFTokenizerMixin:
    """tokenize/detokenize/is_eos/chat_template from the Hugging Face tokenizer files every artifact
    folder carries, so ids match the source model's exactly whatever engine runs the weights."""

    def _load_hf_tokenizer(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        self._hf_tokenizer = AutoTokenizer.from_pretrained(folder)
        self._eos_ids = {self._hf_tokenizer.eos_token_id} - {None}
        try:
            from transformers import GenerationConfig

            eos = GenerationConfig.from_pretrained(folder).eos_token_id
            self._eos_ids |= set(eos if isinstance(eos, list) else [eos]) - {None}
        except OSError:  # no generation_config.json: the tokenizer's EOS is all there is
            pass

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self._hf_tokenizer(text, add_special_tokens=False, split_special_tokens=not special, verbose=False).input_ids

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._hf_tokenizer.decode(list(ids), skip_special_tokens=False)

    def is_eos(self, token: int) -> bool:
        return token in self._eos_ids

    def chat_template(self) -> str | None:
        return self._hf_tokenizer.chat_template
