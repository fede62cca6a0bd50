"""One metric table: a figure declared there (and nowhere else) gates, is stored, ranks and prints."""

from __future__ import annotations

import pytest

from edgequant.measurement import metric_table
from edgequant.measurement.metric_table import QUALITY, Metric

pytestmark = pytest.mark.unit

# A figure the table does not have: retrieval recall, as a task metric would be added.
RECALL = Metric("recall_at_10", "recall@10", QUALITY, "higher", "{:.4f}", gate="recall", interval=True,
                column="recall_at_10", interval_column="recall", what="retrieval recall@10 against fp32's neighbours")


@pytest.fixture
def with_recall(monkeypatch):
    monkeypatch.setattr(metric_table, "TABLE", (*metric_table.TABLE, RECALL))


def figures(recall: float, low: float, high: float, size: int = 100) -> dict:
    return {"recall_at_10": recall, "size_bytes": size, "kld_mean": 0.01, "ci95": {"recall_at_10": [low, high]}}


def test_a_new_figure_gates_with_its_interval(with_recall):
    from edgequant.decisions.gates import check, parse_gate

    gate = parse_gate("recall>=0.99")
    assert check(gate, figures(0.995, 0.992, 0.997))["verdict"] == "pass"
    assert check(gate, figures(0.995, 0.985, 0.997))["verdict"] == "uncertain"  # the interval crosses the bound
    assert check(gate, figures(0.95, 0.94, 0.96))["verdict"] == "fail"


def test_a_new_figure_is_a_column_of_new_and_existing_results_stores(tmp_path, monkeypatch):
    from edgequant.measurement.results import ResultsDB

    path = tmp_path / "results.sqlite"
    ResultsDB.open(path).close()  # written before the figure existed
    monkeypatch.setattr(metric_table, "TABLE", (*metric_table.TABLE, RECALL))
    db = ResultsDB.open(path)
    run = db.start_run("m", "f", {}, {}, {})
    db.add(run, "m", "f", "onnx:int8", "ok", figures(0.998, 0.997, 0.999))
    row = db.query()[0]
    db.close()
    assert (row["recall_at_10"], row["recall_lo"], row["recall_hi"]) == (0.998, 0.997, 0.999)


def test_a_new_figure_ranks_optimize_candidates_the_way_it_says_is_better(with_recall):
    from edgequant.decisions.optimize import Candidate, ranked

    def candidate(spec, recall, size):
        return Candidate(spec, "test", "measured", metrics=figures(recall, recall, recall, size),
                         verdicts=[{"gate": "g", "verdict": "pass"}])

    pool = [candidate("small", 0.95, 50), candidate("faithful", 0.999, 200), candidate("middle", 0.99, 100)]
    assert [c.spec for c in ranked("recall", pool)] == ["faithful", "middle", "small"]  # higher is better
    assert [c.spec for c in ranked("size", pool)] == ["small", "middle", "faithful"]


def test_a_new_figure_prints_in_the_bench_report_and_the_eval_output(with_recall, tmp_path):
    from edgequant.measurement.benchmark import BenchResult, BenchRow
    from edgequant.reporting.report import build_report, render_markdown
    from edgequant.reporting.report_text import format_metrics

    settings = {"windows": 1, "ctx": 8, "repeats": 1, "prompt_tokens": 4, "gen_tokens": 4, "threads": 0, "data": "text"}

    def row(spec, recall):
        return BenchRow(spec, "ok", {"size_bytes": 1e8, "perplexity": 20.0, "ppl_increase_pct": 1.0, "kld_mean": 0.01,
                                     "top1_agreement": 0.9, "recall_at_10": recall, "ci95": {"recall_at_10": [recall - 0.001, recall]}})

    baseline = row("pytorch:fp32", 1.0)
    baseline.baseline = True
    result = BenchResult(1, tmp_path / "db", "m", "f", baseline, [row("onnx:int8", 0.9876)], {"eval": settings},
                         {"cpu": "c", "cores": 2, "ram_gb": 1, "os": "o", "python": "3", "load_avg_1m": 0})
    table = render_markdown(build_report(result))
    assert "recall@10 [95%]" in table and "0.9876 [0.9866, 0.9876]" in table
    printed = format_metrics({"target": "onnx:int8", "baseline": "fp32", "settings": settings, **row("x", 0.9876).metrics})
    assert "recall@10" in printed and "0.9876   95% interval [0.9866, 0.9876]" in printed


def test_every_gate_name_and_column_is_declared_once():
    from edgequant.measurement.results import metric_columns

    gates = [m.gate for m in metric_table.TABLE if m.gate]
    columns = [column for column, _, _ in metric_columns()]
    assert len(gates) == len(set(gates)) and len(columns) == len(set(columns))
    assert all(m.better in ("lower", "higher") and m.kind in (metric_table.QUALITY, metric_table.SIZE, metric_table.SPEED,
                                                               metric_table.MEMORY) for m in metric_table.TABLE)
