"""What several commands share: the MODEL argument and the evaluation options, whose defaults
come from EvalConfig (stated there once)."""

from __future__ import annotations

from pathlib import Path

from edgequant.measurement.settings import EvalConfig

MODEL_HELP = "Hugging Face folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)"


def add_eval_options(p, defaults: EvalConfig = EvalConfig()) -> None:
    """The evaluation options, at `defaults` (the verb's own: `eval` scores 8 windows, bench and
    optimize 4 per candidate)."""
    p.add_argument("--windows", type=int, default=defaults.windows, help=f"windows scored (default {defaults.windows})")
    p.add_argument("--data", type=Path, help="UTF-8 text to score (default: English Wikipedia prose from gensim)")
    p.add_argument("--ctx", type=int, default=defaults.ctx, help=f"tokens per window (default {defaults.ctx})")
    p.add_argument("--prompt-tokens", type=int, default=defaults.prompt_tokens,
                   help=f"prompt length for the speed test (default {defaults.prompt_tokens})")
    p.add_argument("--gen-tokens", type=int, default=defaults.gen_tokens,
                   help=f"tokens generated per speed run (default {defaults.gen_tokens})")
    p.add_argument("--repeats", type=int, default=defaults.repeats,
                   help=f"timed speed runs; the median is reported (default {defaults.repeats})")
    p.add_argument("--threads", type=int, default=defaults.threads, help="inference threads (default: all cores)")


def eval_config(args, speed: bool = True) -> EvalConfig:
    return EvalConfig(ctx=args.ctx, windows=args.windows, data=args.data, speed=speed, prompt_tokens=args.prompt_tokens,
                      gen_tokens=args.gen_tokens, repeats=args.repeats, threads=args.threads)


def model_path(args) -> Path | None:
    return Path(args.model) if args.model else None
