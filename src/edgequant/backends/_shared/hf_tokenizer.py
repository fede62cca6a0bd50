"""Tokenization from the Hugging Face tokenizer files an artifact folder carries, through the
`tokenizers` library alone: a runner must not load transformers (and with it torch, ~400 MB of
RSS) just to turn text into ids, or its peak memory would be ours, not the model's.

Every artifact holds a `tokenizer.json` (`write_tokenizer_json` makes one at conversion when the
source ships only a sentencepiece model), so ids match the source model's exactly whatever engine
runs the weights; evaluation checks that on real text before scoring.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Sequence

TOKENIZER_JSON = "tokenizer.json"


class HFTokenizerMixin:
    """tokenize/detokenize/is_eos/chat_template for a Runner, from the artifact's tokenizer files."""

    def _load_hf_tokenizer(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        # One instance (a 49k-token vocabulary holds ~25 MB): `encode_special_tokens` is switched per
        # call under a lock, since the server tokenizes on one thread while a worker decodes on another.
        self._tokenizer = Tokenizer.from_str(_tokenizer_definition(folder))
        self._tokenizer_lock = threading.Lock()
        config = _read_json(folder / "tokenizer_config.json")
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._eos_ids = eos_ids(folder, config, self._tokenizer)
        self.bos_id = bos_id(config, self._tokenizer)
        self._chat_template = chat_template(folder, config)

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        with self._tokenizer_lock:
            self._tokenizer.encode_special_tokens = not special  # False: "<|im_start|>" in text becomes its id
            return self._tokenizer.encode(text, add_special_tokens=False).ids

    def detokenize(self, ids: Sequence[int]) -> str:
        text = self._tokenizer.decode(list(ids), skip_special_tokens=False)
        return _clean_up_spaces(text) if self._clean_up_spaces else text

    def is_eos(self, token: int) -> bool:
        return token in self._eos_ids

    def chat_template(self) -> str | None:
        return self._chat_template


def eos_ids(folder: Path, config: dict, tokenizer) -> set[int]:
    """End-of-generation ids: the tokenizer's EOS token and generation_config.json's eos_token_id."""
    ids = set()
    eos = config.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if eos and tokenizer.token_to_id(eos) is not None:
        ids.add(tokenizer.token_to_id(eos))
    generation = _read_json(folder / "generation_config.json").get("eos_token_id")
    ids.update(generation if isinstance(generation, list) else [generation] if generation is not None else [])
    return ids


def bos_id(config: dict, tokenizer) -> int | None:
    """The BOS id when tokenizer_config.json says prompts start with it (`add_bos_token`), else None."""
    bos = config.get("bos_token")
    bos = bos.get("content") if isinstance(bos, dict) else bos
    return tokenizer.token_to_id(bos) if config.get("add_bos_token") and bos else None


def chat_template(folder: Path, config: dict) -> str | None:
    """The Jinja chat template: chat_template.jinja, else tokenizer_config.json's (the default one
    when it holds several named templates)."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text()
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default") or next(iter(named.values()), None)
    return template


def _tokenizer_definition(folder: Path) -> str:
    """The folder's tokenizer.json; a source folder with only a sentencepiece model (run by the
    PyTorch baseline, where transformers is loaded anyway) gets it converted in memory."""
    if (folder / TOKENIZER_JSON).is_file():
        return (folder / TOKENIZER_JSON).read_text()
    from edgequant.sources.auto_tokenizer import auto_tokenizer

    return auto_tokenizer(folder).backend_tokenizer.to_str()


def write_tokenizer_json(source_dir: Path, out_dir: Path) -> None:
    """Give `out_dir` a tokenizer.json, the source's own or converted from its sentencepiece model
    (at conversion time, where transformers is loaded anyway)."""
    if not (out_dir / TOKENIZER_JSON).is_file():
        (out_dir / TOKENIZER_JSON).write_text(_tokenizer_definition(source_dir))


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _clean_up_spaces(text: str) -> str:
    """transformers' clean_up_tokenization for tokenizers configured with it."""
    for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                          (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(before, after)
    return text
