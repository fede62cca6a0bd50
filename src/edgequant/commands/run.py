"""`edgequant run`: run a recipe (YAML)."""

from __future__ import annotations

import json
from pathlib import Path


def add(sub) -> None:
    p = sub.add_parser("run", help="run a recipe (YAML): source, target, specs or search, eval settings, gates, output")
    p.add_argument("recipe", type=Path, help="recipe file; `edgequant optimize --save-recipe FILE` writes one")
    p.add_argument("--dry-run", action="store_true", help="check the recipe and print the plan and its estimated time")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(run=run)


def run(args) -> int:
    from edgequant.decisions.optimize import optimize, plan
    from edgequant.decisions.recipe import load_recipe, optimize_config
    from edgequant.reporting.report_text import format_optimize, format_plan

    config = optimize_config(load_recipe(args.recipe))
    if args.dry_run:
        found = plan(config)
        print(json.dumps(found, indent=2) if args.json else format_plan(found))
        return 0
    result = optimize(config)
    print(json.dumps(result, indent=2) if args.json else format_optimize(result))
    return 0 if result["winner"] else 1
