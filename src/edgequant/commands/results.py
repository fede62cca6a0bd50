"""`edgequant results`: query the results database."""

from __future__ import annotations

from pathlib import Path


def add(sub) -> None:
    p = sub.add_parser("results", help="query the results database")
    p.add_argument("--model", help="filter by model name or source fingerprint prefix")
    p.add_argument("--db", type=Path, help="results database (default: results.sqlite in the edgequant cache)")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("--csv", action="store_true", help="print CSV")
    p.set_defaults(run=run)


def run(args) -> int:
    from edgequant.measurement.results import ResultsDB
    from edgequant.reporting.report_text import format_results

    db = ResultsDB.open(args.db, create=False)
    rows = db.query(args.model)
    db.close()
    print(format_results(rows, "json" if args.json else "csv" if args.csv else "table"))
    return 0
