"""`finetune`: LoRA training of a model on a small data set, on the CPU, with PEFT on PyTorch.

The output is a PEFT adapter folder (`adapter_config.json`, `adapter_model.safetensors`), the
format every runtime's adapter tooling starts from, plus `edgequant-finetune.json` with the
held-out loss before and after, the steps, time and tokens/s. Pass the folder as `--adapter` to
any command that takes a MODEL.

Why PyTorch and not mlx-lm: on this 2-core x86 CPU, mlx[cpu] trained the tests' tiny Llama at
about 555 tokens/s against PEFT's 8,700 (same adapter, batch and length; mlx-lm's own trainer),
so about 15x slower; mlx-lm trains well on Apple silicon, which is not where edgequant runs here.

Training: AdamW on the LoRA matrices only (the base is frozen, in float32), examples shuffled with
a fixed seed and padded per batch, the loss on the tokens an example learns (see data.py). The
held-out loss is the same loss on the examples `data.split` holds out, never trained on.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from edgequant.adaptation import data as datasets
from edgequant.atomic import atomic_dir, ensure_writable_parent
from edgequant.errors import EdgequantError
from edgequant.progress import note, step, track

TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RECORD = "edgequant-finetune.json"


@dataclass(frozen=True)
class FinetuneConfig:
    output: Path
    model: Path | None = None  # None: the embedded default model
    data: str = datasets.BUILTIN  # a .jsonl file, or the built-in set
    steps: int = 60
    rank: int = 8
    alpha: float = 16.0
    learning_rate: float = 1e-3
    batch: int = 4
    max_tokens: int = 256
    seed: int = 0
    threads: int | None = None
    force: bool = False


def finetune(config: FinetuneConfig) -> dict:
    """Train a LoRA adapter; returns (and writes next to it) the training record."""
    import torch

    from edgequant.sources.source import load_source

    _check(config)
    out = config.output.expanduser().resolve()
    ensure_writable_parent(out)
    if out.exists() and any(out.iterdir()) and not config.force:
        raise EdgequantError(f"{out} exists and is not empty", "choose another -o folder, or pass --force to replace it")
    source = load_source(config.model)
    if source.kind not in ("hf", "gguf") or source.task != "text-generation":
        raise EdgequantError(f"{source.name} is not a language model; finetune trains text generators", "pass a causal LM")
    records = datasets.read_records(config.data)
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    with step(f"loading {source.name} for training"):
        model, tokenizer = _load(source.hf_dir)
        train, held = (datasets.tokenize(part, tokenizer, config.max_tokens) for part in datasets.split(records))
        model = _with_lora(model, config)
    before = held_out_loss(model, held, tokenizer.pad_token_id)
    note(f"held-out loss before: {before:.4f} ({len(held)} examples; {len(train)} to train on)")
    started, tokens, losses = time.perf_counter(), 0, []
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate)
    model.train()
    for batch in track(_batches(train, config), "training", total=config.steps):
        loss = _loss(model, batch, tokenizer.pad_token_id)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        tokens += sum(len(e.ids) for e in batch)
        losses.append(round(loss.item(), 4))
    seconds = time.perf_counter() - started
    after = held_out_loss(model, held, tokenizer.pad_token_id)
    note(f"held-out loss after: {after:.4f} (before {before:.4f}); {tokens / seconds:.0f} tokens/s")
    record = {"engine": "torch+peft", "base": source.to_json(), "data": str(config.data),
              "examples": {"train": len(train), "held_out": len(held)},
              "steps": config.steps, "rank": config.rank, "alpha": config.alpha, "learning_rate": config.learning_rate,
              "batch": config.batch, "seed": config.seed, "held_out_loss": {"before": round(before, 4), "after": round(after, 4)},
              "train_loss": losses, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}
    with atomic_dir(out, replace=True) as tmp:
        model.save_pretrained(tmp)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's empty model card
        (tmp / RECORD).write_text(json.dumps(record, indent=2))
    return record


def _check(config: FinetuneConfig) -> None:
    for name, value in (("--steps", config.steps), ("--rank", config.rank), ("--batch", config.batch),
                        ("--max-tokens", config.max_tokens)):
        if value < 1:
            raise EdgequantError(f"{name} must be at least 1, not {value}", f"pass a positive {name}")
    if not config.learning_rate > 0:
        raise EdgequantError(f"the learning rate must be positive, not {config.learning_rate}", "pass e.g. --learning-rate 1e-3")


def _load(hf_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    return model, tokenizer


def _with_lora(model, config: FinetuneConfig):
    from peft import LoraConfig, get_peft_model

    present = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    targets = [m for m in TARGET_MODULES if m in present]
    if not targets:
        raise EdgequantError("the model has none of the projection layers LoRA adapts here "
                             f"({', '.join(TARGET_MODULES)})", "fine-tune a Llama-style model")
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                      target_modules=targets)
    return get_peft_model(model, lora)


def _batches(examples: list, config: FinetuneConfig):
    """`config.steps` batches, the examples reshuffled (seeded) each pass over them."""
    rng, order = random.Random(config.seed), []
    for _ in range(config.steps):
        batch = []
        while len(batch) < config.batch:
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch.append(examples[order.pop()])
        yield batch


def _tensors(batch: list, pad_id: int):
    import torch

    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, example in enumerate(batch):
        n = len(example.ids)
        ids[row, :n] = torch.tensor(example.ids)
        mask[row, :n] = 1
        labels[row, example.learned_from:n] = ids[row, example.learned_from:n]
    return ids, mask, labels


def _loss(model, batch: list, pad_id: int):
    ids, mask, labels = _tensors(batch, pad_id)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def held_out_loss(model, examples: list, pad_id: int) -> float:
    """Mean loss per learned token over `examples` (one at a time: no padding in the figure)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for example in examples:
            ids, mask, labels = _tensors([example], pad_id)
            learned = int((labels[:, 1:] != -100).sum())  # the model shifts labels by one
            total += model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() * learned
            count += learned
    model.train()
    return total / count
