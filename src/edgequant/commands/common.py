"""What several commands share: the MODEL argument and the evaluation options, whose defaults
come from EvalConfig (stated there once)."""

from __future__ import annotations

from pathlib import Path

from edgequant.measurement.settings import EvalConfig

MODEL_HELP = ("Hugging Face folder, .gguf file, image classifier (.json description, .onnx, or efficientnet-lite0) "
              "(default: the embedded SmolLM2-135M-Instruct)")


def option(p, flag: str, default, words: str, kind: type | None = None) -> None:
    """An option whose default comes from a config (given here, never typed twice) and is named
    at the end of its help."""
    kind = kind or type(default)
    p.add_argument(flag, type=kind, default=default, help=f"{words} (default {default})")


def add_eval_options(p, defaults: EvalConfig = EvalConfig()) -> None:
    """The evaluation options, at `defaults` (the verb's own: `eval` scores 8 windows, bench and
    optimize 4 per candidate)."""
    option(p, "--windows", defaults.windows, "windows scored")
    p.add_argument("--data", type=Path, help="UTF-8 text to score (default: English Wikipedia prose from gensim)")
    option(p, "--ctx", defaults.ctx, "tokens per window")
    option(p, "--prompt-tokens", defaults.prompt_tokens, "prompt length for the speed test")
    option(p, "--gen-tokens", defaults.gen_tokens, "tokens generated per speed run")
    option(p, "--repeats", defaults.repeats, "timed speed runs; the median is reported")
    p.add_argument("--threads", type=int, default=defaults.threads, help="inference threads (default: all cores)")


def eval_config(args, speed: bool = True) -> EvalConfig:
    return EvalConfig(ctx=args.ctx, windows=args.windows, data=args.data, speed=speed, prompt_tokens=args.prompt_tokens,
                      gen_tokens=args.gen_tokens, repeats=args.repeats, threads=args.threads)


def add_model_argument(p) -> None:
    """MODEL, the LoRA adapter merged into it, and whether its pickle weights may be read (every
    command that takes a MODEL takes both)."""
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--adapter", type=Path, metavar="FOLDER",
                   help="a LoRA adapter in PEFT's format (e.g. from `edgequant finetune`), merged into MODEL first")
    p.add_argument("--trust-pickle", action="store_true",
                   help="read a Hugging Face folder's pickle weights (pytorch_model.bin) with torch's weights_only=True "
                        "loader, converting them once to safetensors in the cache (default: refuse pickles)")


def model_path(args) -> Path | None:
    """MODEL's path; with --trust-pickle, a pickle folder's cached safetensors copy; with --adapter,
    the cached folder of that model with the adapter merged."""
    model = Path(args.model) if args.model else None
    if model is not None and getattr(args, "trust_pickle", False):
        from edgequant.sources.pickled import safetensors_copy

        model = safetensors_copy(model)
    if getattr(args, "adapter", None) is not None:
        from edgequant.adaptation.merge import adapted_model

        return adapted_model(model, args.adapter)
    return model


def add_ray_options(p) -> None:
    """`--ray ADDRESS` (bench, optimize, run): each (source, spec) measurement as a Ray task."""
    p.add_argument("--ray", metavar="ADDRESS",
                   help="measure each spec as a task on a Ray cluster: `local` (a Ray head on this machine, bound to "
                        "127.0.0.1), `auto`, HOST:PORT or ray://HOST:PORT (default: $EDGEQUANT_RAY_ADDRESS, else no Ray; "
                        "needs pip install 'edgequant[ray]')")
    p.add_argument("--ray-whole-node", action="store_true",
                   help="under --ray, each task asks for every CPU of a node, so no speed figure is measured beside another "
                        "task (default: tasks share nodes, and rows whose task overlapped another are flagged)")


def ray_config(args):
    """The Ray settings the options (or $EDGEQUANT_RAY_ADDRESS) ask for; None: no Ray."""
    from edgequant.measurement.ray_grid import ray_config as config

    return config(args.ray, whole_node=args.ray_whole_node)
