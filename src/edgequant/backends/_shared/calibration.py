"""Calibration windows: token ids of the calibration text (gensim's news prose, never the
evaluation text, unless the user gives a file), cut into equal windows for every format."""

from __future__ import annotations

from pathlib import Path

from edgequant.errors import EdgequantError


def calibration_windows(tokenizer_dir: Path, count: int, length: int, text: str | None = None, *,
                        fix: str = "ask for fewer or shorter calibration samples (at most {fit} fit)") -> list[list[int]]:
    """`count` windows of `length` tokens of `text` (default: the calibration text), tokenized by
    the model's own tokenizer. Too little text is an error; `fix` may use `{fit}`, the number of
    windows that would fit."""
    from edgequant.measurement.evaldata import default_calibration_text
    from edgequant.sources.auto_tokenizer import auto_tokenizer

    text = text if text is not None else default_calibration_text()
    ids = auto_tokenizer(tokenizer_dir)(text, add_special_tokens=False, verbose=False).input_ids
    if len(ids) < count * length:
        raise EdgequantError(f"the calibration text has {len(ids)} tokens; {count} windows of {length} need {count * length}",
                             fix.format(fit=len(ids) // length))
    return [ids[i * length:(i + 1) * length] for i in range(count)]
