"""`edgequant serve`: serve artifacts over an OpenAI-compatible REST API."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from edgequant.errors import EdgequantError
from edgequant.serving.config import ServeConfig


def add(sub) -> None:
    p = sub.add_parser("serve", help="serve artifacts over an OpenAI-compatible REST API")
    p.add_argument("models", nargs="*", help="artifact folders or models (default: the embedded model, run by PyTorch)")
    p.add_argument("--host", default=ServeConfig.host, help=f"address to bind (default {ServeConfig.host}: this machine only)")
    p.add_argument("--port", type=int, default=ServeConfig.port, help=f"(default {ServeConfig.port})")
    p.add_argument("--api-key", default=os.environ.get("EDGEQUANT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (or set EDGEQUANT_API_KEY)")
    p.add_argument("--ctx", type=int, default=ServeConfig.n_ctx, help=f"context length per model (default {ServeConfig.n_ctx})")
    p.add_argument("--max-queue", type=int, default=ServeConfig.max_queue,
                   help=f"waiting requests per model before answering 429 (default {ServeConfig.max_queue})")
    p.add_argument("--max-tokens-cap", type=int, default=ServeConfig.max_tokens_cap,
                   help=f"largest max_tokens a request may ask for (default {ServeConfig.max_tokens_cap})")
    p.add_argument("--max-body-bytes", type=int, default=ServeConfig.max_body_bytes,
                   help=f"(default {ServeConfig.max_body_bytes:,})")
    p.add_argument("--request-timeout", type=float, default=ServeConfig.request_timeout_s,
                   help=f"seconds before a request is cancelled (default {ServeConfig.request_timeout_s:g})")
    p.add_argument("--threads", type=int, default=ServeConfig.threads, help="inference threads (default: all cores)")
    p.add_argument("--batch", type=int, default=ServeConfig.batch,
                   help=f"requests decoded together where the engine supports it (1: one at a time; default {ServeConfig.batch})")
    p.set_defaults(run=run)


def run(args) -> int:
    from edgequant.serving.app import serve

    models = tuple(Path(m) for m in args.models) or (None,)
    if args.batch < 1:
        raise EdgequantError(f"--batch {args.batch} must be at least 1", "use --batch 1 to serve one request at a time")
    for model in models:
        if model is not None and not model.exists():
            raise EdgequantError(f"no such artifact or model: {model}", "pass folders written by `edgequant convert`")
    config = ServeConfig(models, args.host, args.port, args.api_key, args.ctx, args.max_queue, args.max_tokens_cap,
                         args.max_body_bytes, args.request_timeout, args.threads, args.batch)
    print(f"edgequant: serving {', '.join(m.name if m else 'default' for m in models)} on http://{args.host}:{args.port}/v1",
          file=sys.stderr, flush=True)
    serve(config)
    return 0
