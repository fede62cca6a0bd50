"""Write README's demo table from a `make demo` report (out/report.json), between its markers.

    .venv/bin/python scripts/readme_demo_table.py [out/report.json] [--commit SHA] [--date YYYY-MM-DD]

The table is what the run measured, labelled with the run's date, commit, machine and duration;
do not edit it by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- demo-table:begin -->", "<!-- demo-table:end -->"


def _interval(value, ci, fmt: str) -> str:
    if value is None:
        return "-"
    low, high = ci if ci else (None, None)
    inner = f" [{format(low, fmt)}, {format(high, fmt)}]" if low is not None else ""
    return format(value, fmt) + inner


def table(report: dict, label: str) -> str:
    lines = [label, "",
             "| spec | MB | ppl change % [95%] | KLD [95%] | top-1 | decode tok/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['spec']} | {row['status']}: {row['error'] or ''} | | | | | |")
            continue
        ci = row.get("ci95") or {}
        if not row.get("usable", True):  # perplexity more than twice the baseline's: no interval worth printing
            lines.append(f"| {row['spec']} | {row['size_mb']:.1f} | unusable: perplexity {row['perplexity']:.3g} | "
                         f"{row['kld_mean']:.2f} | {100 * row['top1_agreement']:.1f}% | | |")
            continue
        speed = f"{row['decode_tps']:.1f}" + ("" if row.get("speed_representative", True) else "*")
        lines.append(
            f"| {row['spec']} | {row['size_mb']:.1f} | {_interval(row['ppl_increase_pct'], ci.get('ppl_increase_pct'), '+.2f')} "
            f"| {_interval(row['kld_mean'], ci.get('kld_mean'), '.4f')} | {100 * row['top1_agreement']:.1f}% "
            f"| {speed} | {row['peak_rss_mb']:.0f} |")
    lines += ["", "\\* not this device's speed (MLX off Apple silicon, QNN on ONNX Runtime's CPU execution provider)."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, nargs="?", default=REPO / "out" / "report.json")
    parser.add_argument("--commit", required=True, help="the commit the run measured")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    args = parser.parse_args()
    report = json.loads(args.report.read_text())
    machine, settings = report["machine"], report["settings"]["eval"]
    label = (f"`make demo`, measured {args.date} at commit {args.commit} from an empty cache: {report['model']}, "
             f"{settings['windows']} windows of {settings['ctx']} tokens, {machine['cores']} cores ({machine['cpu']}), "
             f"load average {machine['load_avg_1m']} at the start, {report['wall_s'] / 60:.1f} minutes in all.")
    readme = (REPO / "README.md").read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no {BEGIN} ... {END} markers")
    (REPO / "README.md").write_text(pattern.sub(lambda _: f"{BEGIN}\n{table(report, label)}\n{END}", readme))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
