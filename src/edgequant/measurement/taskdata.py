"""Evaluation and calibration inputs for tasks other than text generation, from installed packages.

Sentence encoders are scored on gensim's test data: the 200 labelled sentences of
`pang_lee_polarity.cor` (movie-review snippets, 100 negative then 100 positive), for
agreement with the float model and a polarity probe, then the 50 news documents of `lee.cor`,
longer texts that reach the encoder's length limit. Both files are cp1252 text. Calibration uses sentences of
`lee_background.cor`, kept apart from both.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from edgequant.measurement.evaldata import default_calibration_text, gensim_test_data

POLARITY_FILE = "pang_lee_polarity.cor"
DOCUMENTS_FILE = "lee.cor"


@dataclass(frozen=True)
class EncoderTexts:
    texts: list[str]  # the labelled sentences first, then the documents
    labels: np.ndarray  # 0 negative / 1 positive, one per labelled sentence (the first len(labels) texts)
    name: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256("\n".join(self.texts).encode()).hexdigest()


def encoder_eval_texts() -> EncoderTexts:
    folder = gensim_test_data()
    labelled = [line.split(" ", 1) for line in (folder / POLARITY_FILE).read_text(encoding="cp1252").splitlines() if line.strip()]
    documents = [line.strip() for line in (folder / DOCUMENTS_FILE).read_text(encoding="cp1252").splitlines() if line.strip()]
    labels = np.array([1 if tag == "__label__pos" else 0 for tag, _ in labelled], dtype=np.int64)
    name = f"{POLARITY_FILE} ({len(labelled)} labelled sentences) + {DOCUMENTS_FILE} ({len(documents)} documents), gensim"
    return EncoderTexts([text for _, text in labelled] + documents, labels, name)


def calibration_sentences(count: int) -> list[str]:
    """`count` sentences of the calibration news prose (five words or more), in order."""
    pieces = re.split(r"(?<=[.!?])\s+", default_calibration_text())
    sentences = [p.strip() for p in pieces if len(p.split()) >= 5]
    return sentences[:count]


def write_inputs(inputs, stem):
    """Inputs for a child process (the speed probe): texts as a JSON list, images (an array) as an
    .npy; returns the file written (`stem` with its suffix)."""
    import json

    if isinstance(inputs, np.ndarray):
        path = stem.with_suffix(".npy")
        np.save(path, inputs)
    else:
        path = stem.with_suffix(".json")
        path.write_text(json.dumps(list(inputs)))
    return path


def load_inputs(path: str):
    import json
    from pathlib import Path

    return np.load(path) if path.endswith(".npy") else json.loads(Path(path).read_text())
