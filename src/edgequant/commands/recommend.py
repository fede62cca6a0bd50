"""`edgequant recommend`: a format and precision for a target and constraints, and why."""

from __future__ import annotations

import json
from pathlib import Path

from edgequant.commands import common
from edgequant.errors import EdgequantError


def add(sub) -> None:
    p = sub.add_parser("recommend", help="a format and precision for a target device and constraints, and why")
    common.add_model_argument(p)
    p.add_argument("--target", metavar="PROFILE", help="hardware profile (default: the one closest to this machine; "
                                                       "`edgequant hardware --profiles` lists them)")
    p.add_argument("--max-memory", metavar="SIZE", help="peak memory bound, e.g. 1GB or 400MB")
    p.add_argument("--max-size", metavar="SIZE", help="artifact size bound, e.g. 150MB")
    p.add_argument("--min-speedup", type=float, metavar="X", help="decode speed-up over the fp32 baseline (measured)")
    p.add_argument("--max-kld", type=float, help="mean KLD bound (its whole 95%% interval must pass)")
    p.add_argument("--max-ppl-increase", metavar="PCT", help="perplexity increase bound in percent, e.g. 5%%")
    p.add_argument("--gate", action="append", default=[], metavar="EXPR",
                   help="any other bound, as optimize takes it, e.g. cosine>=0.99 for a sentence encoder; repeat it")
    p.add_argument("--measured", action="store_true", help="measure the installed candidates the database lacks first")
    p.add_argument("--db", type=Path, help="results database (default: the cache's)")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(run=run)


def run(args) -> int:
    from edgequant.decisions.recommend import RecommendConfig, recommend
    from edgequant.reporting.report_text import format_recommendation

    ppl = args.max_ppl_increase.rstrip("%") if args.max_ppl_increase else None
    try:
        ppl = float(ppl) if ppl is not None else None
    except ValueError:
        raise EdgequantError(f"--max-ppl-increase {args.max_ppl_increase!r} is not a percentage", "write e.g. 5%") from None
    config = RecommendConfig(common.model_path(args), args.target, args.max_memory, args.max_size,
                             args.min_speedup, args.max_kld, ppl, args.measured, args.db, tuple(args.gate))
    result = recommend(config)
    print(json.dumps(result, indent=2) if args.json else format_recommendation(result))
    return 0 if result["recommendation"] else 1
