"""`edgequant finetune`: train a LoRA adapter on a small data set (PEFT on PyTorch, CPU)."""

from __future__ import annotations

import json
from pathlib import Path

from edgequant.adaptation.finetune import FinetuneConfig
from edgequant.commands import common


def add(sub) -> None:
    p = sub.add_parser("finetune", help="train a LoRA adapter (PEFT format) on a small data set")
    p.add_argument("model", nargs="?", help=common.MODEL_HELP)
    p.add_argument("--data", default=FinetuneConfig.data, metavar="FILE.jsonl",
                   help='examples, one JSON object per line: {"text"}, {"prompt", "completion"} or {"messages"}; '
                        f"`{FinetuneConfig.data}` is the built-in set (default {FinetuneConfig.data})")
    p.add_argument("-o", "--output", type=Path, required=True, help="adapter folder to write")
    common.option(p, "--steps", FinetuneConfig.steps, "optimizer steps")
    common.option(p, "--rank", FinetuneConfig.rank, "LoRA rank")
    common.option(p, "--alpha", FinetuneConfig.alpha, "LoRA alpha (the update is scaled by alpha / rank)")
    common.option(p, "--learning-rate", FinetuneConfig.learning_rate, "AdamW learning rate")
    common.option(p, "--batch", FinetuneConfig.batch, "examples per step")
    common.option(p, "--max-tokens", FinetuneConfig.max_tokens, "tokens kept per example")
    common.option(p, "--seed", FinetuneConfig.seed, "shuffling and initialisation seed")
    p.add_argument("--engine", choices=("torch",), default="torch",
                   help="training engine: PEFT on PyTorch (mlx-lm trained about 15x slower on this CPU; see docs/lora.md)")
    p.add_argument("--threads", type=int, help="PyTorch threads (default: all cores)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--json", action="store_true", help="print the training record as JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from edgequant.adaptation.finetune import finetune

    record = finetune(FinetuneConfig(args.output, common.model_path(args), args.data, args.steps, args.rank, args.alpha,
                                     args.learning_rate, args.batch, args.max_tokens, args.seed, args.threads, args.force))
    if args.json:
        print(json.dumps(record, indent=2))
    else:
        loss = record["held_out_loss"]
        print(f"{args.output}\theld-out loss {loss['before']:.4f} -> {loss['after']:.4f}\t{record['steps']} steps"
              f"\t{record['seconds']} s\t{record['tokens_per_s']} tokens/s")
    return 0
