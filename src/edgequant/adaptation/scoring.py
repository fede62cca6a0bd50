"""A fine-tune's held-out loss, scored by any runner: did the adaptation survive conversion?

The fine-tune's held-out examples (the ones `finetune` never trained on) are tokenized once with
the source's own tokenizer, and every runner scores the same ids through `Runner.logits`, so the
loss of the adapted float model, of each merged artifact and of the base model are one figure on
one set of tokens. Loss is the mean negative log-likelihood of the tokens an example learns (its
completion, or its last assistant message), as training measured it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from edgequant.adaptation import data as datasets
from edgequant.adaptation.finetune import RECORD
from edgequant.atomic import write_text_atomic
from edgequant.measurement.logprobs import log_softmax
from edgequant.progress import note

REFERENCE_FILE = "finetune-reference.json"  # in a merged folder: the base's and the adapted float model's losses


def held_out_examples(hf_dir: Path, data: str | Path, max_tokens: int = 256) -> list[datasets.Example]:
    """The held-out examples of `data` (a .jsonl file or `zen`), tokenized by the model at `hf_dir`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    _, held = datasets.split(datasets.read_records(data))
    return datasets.tokenize(held, tokenizer, max_tokens)


def runner_loss(runner, examples: list[datasets.Example]) -> float:
    """Mean loss per learned token of `examples` under `runner` (each example scored alone)."""
    total, count = 0.0, 0
    for example in examples:
        first = max(example.learned_from, 1)  # the first token has no prediction
        log_probs = log_softmax(runner.logits(example.ids)[first - 1:len(example.ids) - 1])
        targets = np.asarray(example.ids[first:])
        total -= float(log_probs[np.arange(len(targets)), targets].sum(dtype=np.float64))
        count += len(targets)
    return total / count


def kept_share(base: float, adapted: float, artifact: float) -> float | None:
    """The share of the fine-tune's loss reduction an artifact keeps: 1 keeps it all, 0 is the base model."""
    gain = base - adapted
    return round((base - artifact) / gain, 4) if gain > 0 else None


def finetune_figures(source, target: Path | None, threads: int) -> dict:
    """For an artifact (or model) whose source has an adapter `finetune` trained merged in: its loss
    on the fine-tune's held-out examples, and the share of the fine-tune's loss reduction it keeps
    (against the base and the adapted float model, scored once per source and data and cached)."""
    from edgequant.registry import open_runner

    adaptation = source.adaptation
    record = Path(adaptation["adapter"]["path"]) / RECORD if adaptation else None
    if record is None or not record.is_file():
        if adaptation:
            note(f"no fine-tune record at {record}: the held-out loss is not measured (an adapter not trained by edgequant)")
        return {}
    data = json.loads(record.read_text())["data"]
    examples = held_out_examples(source.hf_dir, data)

    def loss_of(path) -> float:
        with open_runner(path, n_ctx=max(len(e.ids) for e in examples), threads=threads) as runner:
            return runner_loss(runner, examples)

    reference = _reference_losses(source, data, examples, loss_of)
    loss = loss_of(target)
    return {"finetune_loss": round(loss, 4), "finetune_kept": kept_share(reference["base"], reference["adapted"], loss),
            "finetune_reference": reference}


def _reference_losses(source, data: str, examples: list, loss_of) -> dict:
    key = hashlib.sha256(json.dumps([data, [e.ids for e in examples]]).encode()).hexdigest()[:16]
    path = source.path / REFERENCE_FILE
    known = json.loads(path.read_text()) if path.is_file() else {}
    if key not in known:
        known[key] = {"base": round(loss_of(source.adaptation["base"]["path"]), 4), "adapted": round(loss_of(source.path), 4),
                      "data": data, "examples": len(examples)}
        write_text_atomic(path, json.dumps(known, indent=2))
    return known[key]
