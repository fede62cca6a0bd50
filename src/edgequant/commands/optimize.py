"""`edgequant optimize`: measure candidates for a target, pick the best passing every gate, certify it."""

from __future__ import annotations

import json
from pathlib import Path

from edgequant.commands import common
from edgequant.decisions.gates import DEFAULT_GATES
from edgequant.decisions.optimize import OptimizeConfig
from edgequant.measurement.settings import DEFAULT_EVAL


def add(sub) -> None:
    p = sub.add_parser("optimize", help="measure candidates for a target, pick the best passing every gate, certify it")
    common.add_model_argument(p)
    p.add_argument("--target", metavar="PROFILE", help="hardware profile (default: the one closest to this machine)")
    p.add_argument("--gate", action="append", default=[], metavar="EXPR",
                   help="e.g. kld<=0.05, ppl_increase<=5%%, ppl_change<=5%%, top1>=0.9, size<=120MB, peak_rss<=400MB, "
                        "speedup>=2, ttft<=300ms; repeat it (default: " + " ".join(DEFAULT_GATES).replace("%", "%%") + ")")
    p.add_argument("--objective", default=OptimizeConfig.objective, metavar="FIGURE",
                   help="what the winner is best at among those that pass: size, speed, quality (KLD) or a gate's "
                        f"figure such as top1 or ttft (default: {OptimizeConfig.objective})")
    p.add_argument("--budget", type=int, default=OptimizeConfig.budget,
                   help=f"evaluations at most, neighbours included (default {OptimizeConfig.budget})")
    p.add_argument("--no-search", action="store_true", help="measure the candidates only, not their neighbours")
    p.add_argument("-o", "--output", type=Path, default=Path("edgequant-optimized"),
                   help="folder for the winner, certificate.json and certificate.html (default ./edgequant-optimized)")
    p.add_argument("--save-recipe", type=Path, metavar="FILE", help="also write a recipe (YAML) that reproduces this run")
    p.add_argument("--db", type=Path, help="results database (default: the cache's)")
    common.add_eval_options(p, DEFAULT_EVAL)
    common.add_ray_options(p)
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(run=run)


def run(args) -> int:
    from edgequant.decisions.optimize import optimize
    from edgequant.reporting.report_text import format_optimize

    config = OptimizeConfig(common.model_path(args), args.target, tuple(args.gate), args.objective,
                            args.budget, search=not args.no_search, eval=common.eval_config(args),
                            output=args.output, db=args.db, ray=common.ray_config(args))
    if args.save_recipe:
        from edgequant.decisions.recipe import check_recipe_path

        check_recipe_path(args.save_recipe)
    result = optimize(config)
    if args.save_recipe:
        from edgequant.decisions.recipe import save_recipe

        save_recipe(config, args.save_recipe, result["profile"]["name"])
    print(json.dumps(result, indent=2) if args.json else format_optimize(result))
    return 0 if result["winner"] else 1
