"""Write README's generated tables, each between its markers: the demo table from a `make demo`
report (out/report.json), and the second model's from bench/results/second_model.json.

    .venv/bin/python scripts/readme_demo_table.py [out/report.json] --commit SHA [--date YYYY-MM-DD]
    .venv/bin/python scripts/readme_demo_table.py --second-model

Each table is what its run measured, labelled with the run's date, machine and settings; do not
edit them by hand.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- demo-table:begin -->", "<!-- demo-table:end -->"
SECOND = REPO / "bench" / "results" / "second_model.json"
SECOND_BEGIN, SECOND_END = "<!-- second-model-table:begin -->", "<!-- second-model-table:end -->"


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
    lines += _rows(report["rows"])
    lines += ["", "\\* not this device's speed (MLX off Apple silicon, QNN on ONNX Runtime's CPU execution provider)."]
    return "\n".join(lines)


def _rows(rows: list[dict], speed: bool = True) -> list[str]:
    """Table rows; without `speed`, the decode column is left empty (figures measured under load)."""
    lines = []
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['spec']} | {row['status']}: {row['error'] or ''} | | | | | |")
            continue
        ci = row.get("ci95") or {}
        if not row.get("usable", True):  # perplexity more than twice the baseline's: no interval worth printing
            lines.append(f"| {row['spec']} | {row['size_mb']:.1f} | unusable: perplexity {row['perplexity']:.3g} | "
                         f"{row['kld_mean']:.2f} | {100 * row['top1_agreement']:.1f}% | | |")
            continue
        decode = f"{row['decode_tps']:.1f}" + ("" if row.get("speed_representative", True) else "*") if speed else "-"
        lines.append(
            f"| {row['spec']} | {row['size_mb']:.1f} | {_interval(row['ppl_increase_pct'], ci.get('ppl_increase_pct'), '+.2f')} "
            f"| {_interval(row['kld_mean'], ci.get('kld_mean'), '.4f')} | {100 * row['top1_agreement']:.1f}% "
            f"| {decode} | {row['peak_rss_mb']:.0f} |")
    return lines


def second_model_table(data: dict) -> str:
    """Gemma-3-270M's bench rows (bench/second_model.py), in the demo table's columns."""
    from edgequant.reporting.report import UNUSABLE_PPL_INCREASE_PCT

    bench, check = data["bench"], data["import_check"]
    rows = [{**row, "size_mb": row["size_bytes"] / 1e6 if row.get("size_bytes") else None,
             "usable": (row.get("ppl_increase_pct") or 0) <= UNUSABLE_PPL_INCREASE_PCT} for row in bench["rows"]]
    runs = sorted({data["measured"], *(run["measured"] for run in bench.get("runs", []))})
    label = (f"{data['model']} (opt-in, `make second-model`), measured {' and '.join(runs)}, {bench['windows']} windows "
             f"of 512 tokens, BOS first (decode speed left out: other jobs were running). The import agrees "
             f"with llama.cpp on the original file: perplexity {check['perplexity_pytorch_import']} against "
             f"{check['perplexity_llama_cpp_original']} ({check['difference_pct']:+.2f}% "
             f"{check['difference_pct_ci95']}) over {check['windows']} windows.")
    lines = [label, "", "| spec | MB | ppl change % [95%] | KLD [95%] | top-1 | decode tok/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|", *_rows(rows, speed=False)]
    return "\n".join(lines)


def _replace_between(begin: str, end: str, text: str) -> None:
    readme = (REPO / "README.md").read_text()
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    if not pattern.search(readme):
        raise SystemExit(f"README.md has no {begin} ... {end} markers")
    (REPO / "README.md").write_text(pattern.sub(lambda _: f"{begin}\n{text}\n{end}", readme))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, nargs="?", default=REPO / "out" / "report.json")
    parser.add_argument("--commit", help="the commit the run measured (the demo table)")
    parser.add_argument("--date", default=datetime.date.today().isoformat())
    parser.add_argument("--second-model", action="store_true", help=f"write the second model's table from {SECOND.name}")
    args = parser.parse_args()
    if args.second_model:
        _replace_between(SECOND_BEGIN, SECOND_END, second_model_table(json.loads(SECOND.read_text())))
        return 0
    if not args.commit:
        parser.error("--commit is required for the demo table")
    report = json.loads(args.report.read_text())
    machine, settings = report["machine"], report["settings"]["eval"]
    label = (f"`make demo`, measured {args.date} at commit {args.commit} from an empty cache: {report['model']}, "
             f"{settings['windows']} windows of {settings['ctx']} tokens, {machine['cores']} cores ({machine['cpu']}), "
             f"load average {machine['load_avg_1m']} at the start, {report['wall_s'] / 60:.1f} minutes in all.")
    _replace_between(BEGIN, END, table(report, label))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
