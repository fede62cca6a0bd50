"""`edgequant serve`: serve artifacts over an OpenAI-compatible REST API."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from edgequant.commands.common import option
from edgequant.errors import EdgequantError
from edgequant.serving.config import ServeConfig


def add(sub) -> None:
    p = sub.add_parser("serve", help="serve artifacts over an OpenAI-compatible REST API")
    p.add_argument("models", nargs="*", metavar="[NAME=]MODEL",
                   help="artifact folders or models, each served as its folder's name or as NAME (default: the embedded "
                        "model, run by PyTorch); ?lora=separate artifacts of one base share it, loaded once")
    option(p, "--host", ServeConfig.host, "address to bind (127.0.0.1: this machine only)")
    option(p, "--port", ServeConfig.port, "port")
    p.add_argument("--api-key", default=os.environ.get("EDGEQUANT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (or set EDGEQUANT_API_KEY)")
    option(p, "--ctx", ServeConfig.n_ctx, "context length per model")
    option(p, "--max-queue", ServeConfig.max_queue, "waiting requests per model before answering 429")
    option(p, "--max-tokens-cap", ServeConfig.max_tokens_cap, "largest max_tokens a request may ask for")
    option(p, "--max-body-bytes", ServeConfig.max_body_bytes, "largest request body")
    option(p, "--request-timeout", ServeConfig.request_timeout_s, "seconds before a request is cancelled")
    p.add_argument("--threads", type=int, default=ServeConfig.threads, help="inference threads (default: all cores)")
    option(p, "--batch", ServeConfig.batch, "requests decoded together where the engine supports it (1: one at a time)")
    p.add_argument("--cache-tokens", type=int, default=ServeConfig.cache_tokens,
                   help="tokens the batched cache holds for all running requests together, the bound on its memory "
                        "(default: batch x ctx); a request waits while the running ones have reserved too much of it")
    p.set_defaults(run=run)


def run(args) -> int:
    from edgequant.serving.app import serve

    named = [_named(m) for m in args.models] or [(None, None)]
    models, names = tuple(path for _, path in named), tuple(name for name, _ in named)
    if args.batch < 1:
        raise EdgequantError(f"--batch {args.batch} must be at least 1", "use --batch 1 to serve one request at a time")
    if args.cache_tokens and args.cache_tokens < args.ctx:
        raise EdgequantError(f"--cache-tokens {args.cache_tokens} is less than one request's context (--ctx {args.ctx})",
                             f"give --cache-tokens {args.ctx} or more, or a smaller --ctx")
    for model in models:
        if model is not None and not model.exists():
            raise EdgequantError(f"no such artifact or model: {model}", "pass folders written by `edgequant convert`")
    config = ServeConfig(models, args.host, args.port, args.api_key, args.ctx, args.max_queue, args.max_tokens_cap,
                         args.max_body_bytes, args.request_timeout, args.threads, args.batch, args.cache_tokens, names)
    served = config.served_names()
    twice = sorted({name for name in served if served.count(name) > 1})
    if twice:
        raise EdgequantError(f"two models would be served as {', '.join(map(repr, twice))}",
                             "name each one: NAME=FOLDER (a request's \"model\" is that name)")
    print(f"edgequant: serving {', '.join(served)} on http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
    serve(config)
    return 0


def _named(argument: str) -> tuple[str | None, Path]:
    """`NAME=PATH` or `PATH` (a path that itself holds "=" and exists is taken whole)."""
    name, sep, path = argument.partition("=")
    if not sep or Path(argument).exists():
        return None, Path(argument)
    if not name or not path:
        raise EdgequantError(f"{argument!r} is not NAME=MODEL", "write e.g. zen=artifacts/gguf-q4_k_m-loraseparate")
    return name, Path(path)
