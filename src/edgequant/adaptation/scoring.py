"""A fine-tune's held-out loss, scored by any runner: did the adaptation survive conversion?

The fine-tune's held-out examples (the ones `finetune` never trained on) are tokenized once with
the source's own tokenizer, and every runner scores the same ids through `Runner.logits`, so the
loss of the adapted float model, of each merged artifact and of the base model are one figure on
one set of tokens. Loss is the mean negative log-likelihood of the tokens an example learns (its
completion, or its last assistant message), as training measured it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgequant.adaptation import data as datasets


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
        logits = np.asarray(runner.logits(example.ids), dtype=np.float64)
        first = max(example.learned_from, 1)  # the first token has no prediction
        rows = logits[first - 1:len(example.ids) - 1]
        targets = np.asarray(example.ids[first:])
        shifted = rows - rows.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        total -= float(log_probs[np.arange(len(targets)), targets].sum())
        count += len(targets)
    return total / count


def kept_share(base: float, adapted: float, artifact: float) -> float | None:
    """The share of the fine-tune's loss reduction an artifact keeps: 1 keeps it all, 0 is the base model."""
    gain = base - adapted
    return (base - artifact) / gain if gain > 0 else None
