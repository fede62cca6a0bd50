"""`edgequant inspect`: describe a model and estimate its size at every precision."""

from __future__ import annotations

import json

from edgequant.commands import common


def add(sub) -> None:
    p = sub.add_parser("inspect", help="describe a model and estimate its size at every precision")
    common.add_model_argument(p)
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(run=run)


def run(args) -> int:
    from edgequant.reporting.report_text import format_inspect
    from edgequant.sources.inspection import inspect_model

    info = inspect_model(common.model_path(args))
    print(json.dumps(info, indent=2) if args.json else format_inspect(info))
    return 0
