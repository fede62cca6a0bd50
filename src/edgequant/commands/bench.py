"""`edgequant bench`: convert and evaluate a model at many specs; store results; write a report."""

from __future__ import annotations

import sys
from pathlib import Path

from edgequant.commands import common
from edgequant.measurement.settings import DEFAULT_EVAL


def add(sub) -> None:
    p = sub.add_parser("bench", help="convert and evaluate a model at many specs; store results; write a report")
    common.add_model_argument(p)
    p.add_argument("--to", metavar="SPEC[,SPEC...]", help="specs to compare (default: a representative set over every installed backend)")
    p.add_argument("--db", type=Path, help="results database (default: results.sqlite in the edgequant cache)")
    p.add_argument("--report", type=Path, help="write a self-contained HTML report here")
    p.add_argument("--markdown", type=Path, help="write a Markdown report here")
    p.add_argument("--json", type=Path, help="write the report data as JSON here")
    p.add_argument("--strict", action="store_true", help="stop at the first failing or unavailable spec")
    p.add_argument("--keep-going", action="store_true", help="exit 0 even when some specs failed (default: exit 1)")
    p.add_argument("--force", action="store_true", help="rebuild artifacts even when cached, and convert past the memory estimate")
    p.add_argument("--resume", action="store_true", help="reuse evaluations stored earlier of the same artifacts and settings "
                   "(a killed run goes on where it stopped; reused speed figures are from then)")
    common.add_eval_options(p, DEFAULT_EVAL)
    common.add_ray_options(p)
    p.set_defaults(run=run)


def run(args) -> int:
    from edgequant.measurement.benchmark import BenchConfig, run_bench
    from edgequant.reporting.report import build_report, render_markdown

    config = BenchConfig(common.model_path(args), args.to, args.db, args.report, args.markdown, args.json,
                         args.strict, args.force, common.eval_config(args), args.resume, common.ray_config(args))
    result = run_bench(config)
    print(render_markdown(build_report(result)))
    failed = [row.spec for row in result.rows if row.status == "failed"]
    if failed and not args.keep_going:
        print(f"edgequant: {len(failed)} of {len(result.rows)} specs failed ({', '.join(failed)}); the report says why "
              "(--keep-going exits 0 anyway)", file=sys.stderr)
        return 1
    return 0
