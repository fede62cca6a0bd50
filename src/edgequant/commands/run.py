"""`edgequant run`: run a recipe (YAML)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from edgequant.commands import common


def add(sub) -> None:
    p = sub.add_parser("run", help="run a recipe (YAML): source, target, specs or search, eval settings, gates, output")
    p.add_argument("recipe", type=Path, help="recipe file; `edgequant optimize --save-recipe FILE` writes one")
    p.add_argument("-o", "--output", type=Path, help="folder for the winner and its certificate, instead of the "
                   "recipe's (which must lie inside the recipe's folder; this may be anywhere)")
    p.add_argument("--db", type=Path, help="results database, instead of the recipe's (anywhere, as -o)")
    p.add_argument("--dry-run", action="store_true", help="check the recipe and print the plan and its estimated time")
    common.add_ray_options(p)
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(run=run)


def run(args) -> int:
    from edgequant.decisions.optimize import optimize, plan
    from edgequant.decisions.recipe import load_recipe, optimize_config
    from edgequant.reporting.report_text import format_optimize, format_plan

    config = optimize_config(load_recipe(args.recipe), output=args.output, db=args.db)
    config = dataclasses.replace(config, ray=common.ray_config(args))  # where it runs is not the recipe's to say
    if args.dry_run:
        # the plan also says where the run would write, so a shared recipe can be checked first
        found = {**plan(config), "output": str(config.output), "db": str(config.db) if config.db else None}
        print(json.dumps(found, indent=2) if args.json else
              f"{format_plan(found)}\nwrites: {found['output']}; results to {found['db'] or 'the cache database'}")
        return 0
    result = optimize(config)
    print(json.dumps(result, indent=2) if args.json else format_optimize(result))
    return 0 if result["winner"] else 1
