"""Files an artifact carries beside its weights so it runs and tokenizes on its own."""

from __future__ import annotations

import shutil
from pathlib import Path

# The Hugging Face tokenizer and chat template: every runner tokenizes with them (or checks its
# engine's tokenizer against them), so a prompt means the same ids on every format.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")
MODEL_CONFIG_FILES = ("config.json", "generation_config.json")


def copy_side_files(names: tuple[str, ...], dst: Path, *sources: Path) -> None:
    """Copy each named file from the first of `sources` that has it."""
    for name in names:
        found = next((base / name for base in sources if (base / name).is_file()), None)
        if found is not None:
            shutil.copyfile(found, dst / name)


def copy_tokenizer(dst: Path, *sources: Path) -> None:
    """The Hugging Face tokenizer files (from the first source that has each), and a tokenizer.json
    in any case: runners tokenize through it without transformers."""
    from edgequant.backends._shared.hf_tokenizer import write_tokenizer_json

    copy_side_files(TOKENIZER_FILES, dst, *sources)
    write_tokenizer_json(sources[-1], dst)
