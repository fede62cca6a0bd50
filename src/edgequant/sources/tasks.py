"""What a model does, read from its files: the task decides how it is exported, scored and served.

- text-generation: a causal LM (the default; every format's LLM path);
- sentence-embedding: a BERT-family encoder whose token states are pooled into one vector per
  text (a sentence-transformers folder: modules.json names the pooling);
- image-classification: a vision model whose output is one logit per class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from edgequant.errors import EdgequantError

TEXT_GENERATION = "text-generation"
SENTENCE_EMBEDDING = "sentence-embedding"
IMAGE_CLASSIFICATION = "image-classification"
TASKS = (TEXT_GENERATION, SENTENCE_EMBEDDING, IMAGE_CLASSIFICATION)

# Hugging Face classes that are encoders with no language-model head: their output is token states.
_ENCODER_ARCHITECTURES = ("BertModel", "RobertaModel", "XLMRobertaModel", "DistilBertModel", "MPNetModel")


def task_of_folder(folder: Path, config: dict) -> str:
    """The task of a Hugging Face folder: an encoder class, or a sentence-transformers folder,
    is a sentence encoder; anything else is taken to be a causal LM."""
    architecture = (config.get("architectures") or [""])[0]
    if architecture in _ENCODER_ARCHITECTURES or (folder / "modules.json").is_file():
        return SENTENCE_EMBEDDING
    return TEXT_GENERATION


@dataclass(frozen=True)
class EncoderSettings:
    """How a sentence encoder turns token states into one vector, as its folder declares it."""

    max_tokens: int  # longer texts are cut here (sentence-transformers' max_seq_length)
    pooling: str  # "mean" or "cls"
    normalize: bool  # the vector is scaled to unit length


def encoder_settings(folder: Path, config: dict) -> EncoderSettings:
    """Read sentence-transformers' modules.json and pooling config; a bare encoder gets mean
    pooling over its attention mask and unit length, what most sentence encoders use."""
    st_config = _json(folder / "sentence_bert_config.json")
    max_tokens = int(st_config.get("max_seq_length") or min(config.get("max_position_embeddings", 512), 512))
    pooling, normalize = "mean", True
    modules = _json(folder / "modules.json") or []
    if modules:
        kinds = [m.get("type", "") for m in modules]
        normalize = any(k.endswith("Normalize") for k in kinds)
        pool_dir = next((m.get("path", "") for m in modules if m.get("type", "").endswith("Pooling")), None)
        pool = _json(folder / pool_dir / "config.json") if pool_dir else {}
        if pool.get("pooling_mode_cls_token"):
            pooling = "cls"
        elif pool and not pool.get("pooling_mode_mean_tokens", True):
            raise EdgequantError(f"{folder} pools token states in a way edgequant does not export ({pool})",
                                 "use an encoder with mean or CLS pooling")
    return EncoderSettings(max_tokens, pooling, normalize)


def _json(path: Path):
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise EdgequantError(f"{path} is not valid JSON ({exc})", "repair or re-create the file") from None
