"""transformers' AutoTokenizer for a local model folder, without a false alarm."""

from __future__ import annotations

import json
from pathlib import Path

# transformers 4.57.3-4.57.x warns that any folder its own version saved holds "an incorrect regex
# pattern" that "will lead to incorrect tokenization": a check meant for Mistral's tokenizers that
# fires for every model type (every GGUF import, Gemma's included). For other types no fix applies,
# and saying so (fix_mistral_regex=False) is what silences it. Our ids are checked against the
# source's (and llama.cpp's, at import) anyway.
_MISTRAL_TOKENIZER_TYPES = {"mistral", "mistral3", "voxtral", "ministral", "pixtral"}


def auto_tokenizer(folder: Path):
    """transformers' AutoTokenizer for a local model folder."""
    from transformers import AutoTokenizer

    config = folder / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    extra = {} if model_type in _MISTRAL_TOKENIZER_TYPES else {"fix_mistral_regex": False}
    return AutoTokenizer.from_pretrained(folder, **extra)
