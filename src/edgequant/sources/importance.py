"""`imatrix`: per-weight calibration statistics of a model, written in the file format of the
backend that quantizes with them (llama.cpp's importance matrix), atomically."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from edgequant.atomic import ensure_writable_parent, temp_sibling
from edgequant.errors import EdgequantError
from edgequant.measurement.evaldata import read_text_file
from edgequant.progress import step
from edgequant.registry import backends


@dataclass(frozen=True)
class ImatrixConfig:
    output: Path
    model: Path | None = None  # None: the embedded default model
    calibration: Path | None = None  # None: the calibration text, never the evaluation text
    tokens: int = 32768


def compute_imatrix(config: ImatrixConfig) -> dict:
    """Compute the importance matrix of `config.model` and write it to `config.output`; returns
    what was written (tensors, chunks, seconds)."""
    from edgequant.sources.source import load_source

    if config.tokens < 1:
        raise EdgequantError(f"--tokens {config.tokens} must be positive", "pass e.g. --tokens 32768")
    writer = _writer()
    out = config.output.expanduser().resolve()
    ensure_writable_parent(out, folder=False)
    source = load_source(config.model)
    writer.check_source(source)
    text = read_text_file(config.calibration) if config.calibration else None
    dataset = str(config.calibration) if config.calibration else "edgequant calibration text"
    tmp = temp_sibling(out)
    started = time.perf_counter()
    try:
        with step(f"computing the importance matrix of {source.name}"):
            facts = writer.importance_matrix(source, tmp, text=text, dataset=dataset, tokens=config.tokens)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"output": str(out), "dataset": dataset, **facts, "seconds": round(time.perf_counter() - started, 1)}


def _writer():
    found = [b for b in backends().values() if b.writes_importance_matrix]
    if not found:
        raise EdgequantError("no installed format writes an importance matrix",
                             "install the GGUF backend: pip install 'edgequant[gguf]'")
    missing = found[0].missing_engine()
    if missing:
        raise EdgequantError(f"cannot compute an importance matrix: {missing}", found[0].install_hint())
    return found[0]
