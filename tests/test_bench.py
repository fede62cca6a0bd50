"""`bench`, the results database and the reports, on the tiny model with real engines."""

import json
import shutil
import sqlite3
import subprocess
from dataclasses import replace

import pytest

from edgequant.backend import Backend
from edgequant.errors import EdgequantError
from edgequant.measurement.benchmark import BenchConfig, run_bench
from edgequant.measurement.results import ResultsDB
from edgequant.measurement.settings import EvalConfig
from edgequant.registry import register, unregister
from edgequant.reporting.report import pareto_front
from edgequant.spec import Precision

pytest.importorskip("llama_cpp", reason="its extra is not installed")

QUICK = EvalConfig(ctx=64, windows=2, prompt_tokens=16, gen_tokens=8, repeats=1)
# The third parses but fails in llama.cpp: an IQ2 tensor without an importance matrix.
SPECS = ("gguf:q8_0", "gguf:q4_0", "gguf:q4_0?tensor=ffn_up:iq2_xxs")


class _UninstalledBackend(Backend):
    """A backend whose engine is missing, as a user without an extra would see one."""

    name = "uninstalled"
    extra = "uninstalled"
    requires = ("edgequant_no_such_engine",)
    precisions = {"int8": Precision("int8", 8, 8.0, "test only")}


@pytest.fixture(scope="module")
def uninstalled_backend():
    register(_UninstalledBackend)
    yield _UninstalledBackend.name
    unregister(_UninstalledBackend.name)


@pytest.mark.unit
def test_pareto_front_on_hand_made_points():
    points = [(10, 5.0), (20, 1.0), (15, 5.0), (30, 0.5), (25, 2.0), (40, 0.5), (5, 9.0)]
    assert pareto_front(points) == [6, 0, 1, 3]  # (15,5) loses to (10,5); (25,2) to (20,1); (40,.5) to (30,.5)


@pytest.mark.unit
def test_time_left_weighs_the_remaining_specs_by_backend():
    from edgequant.measurement.benchmark import time_left

    weights = [13, 13, 0, 350]  # two GGUF specs done, a skipped one, then QNN
    assert time_left(30.0, 2, weights) == pytest.approx(30.0 * 350 / 26)
    assert time_left(0.0, 0, weights) is None


def test_a_broken_candidate_is_left_off_the_front_and_the_chart(tmp_path):
    from edgequant.measurement.benchmark import BenchResult, BenchRow
    from edgequant.reporting.report import build_report

    def row(spec, mb, increase):
        metrics = {"size_bytes": mb * 1e6, "perplexity": 20 * (1 + increase / 100), "ppl_increase_pct": increase,
                   "kld_mean": 0.1, "kld_p99": 0.2, "top1_agreement": 0.9, "decode_tps": 10.0}
        return BenchRow(spec, "ok", metrics)

    baseline = row("pytorch:fp32", 500, 0.0)
    baseline.baseline = True
    result = BenchResult(1, tmp_path / "db", "m", "f", baseline,
                         [row("gguf:q4_0", 100, 5.0), row("gguf:tq1_0", 80, 9e6), row("gguf:q8_0", 150, 0.5)],
                         {"eval": {"windows": 1, "ctx": 8, "repeats": 1, "prompt_tokens": 4, "gen_tokens": 4, "threads": 0}},
                         {"cpu": "c", "cores": 2, "ram_gb": 1, "os": "o", "python": "3", "load_avg_1m": 0})
    report = build_report(result)
    by_spec = {r["spec"]: r for r in report["rows"]}
    assert not by_spec["gguf:tq1_0"]["usable"] and not by_spec["gguf:tq1_0"]["pareto"]
    assert by_spec["gguf:q4_0"]["pareto"] and by_spec["gguf:q8_0"]["pareto"]  # without the rule tq1_0 would be on it too
    assert any("gguf:tq1_0" in n and "left off" in n for n in report["notes"])


@pytest.fixture(scope="module")
def bench_runs(tiny_model, tmp_path_factory, uninstalled_backend):
    folder = tmp_path_factory.mktemp("bench")
    config = BenchConfig(tiny_model, SPECS + ("uninstalled:int8",), folder / "results.sqlite", folder / "report.html",
                         folder / "report.md", folder / "report.json", eval=QUICK)
    first = run_bench(config)
    second = run_bench(replace(config, resume=True, report_html=None, report_markdown=None, report_json=None))
    return folder, config, first, second


def test_bench_fills_the_database_and_keeps_going_past_failures(bench_runs):
    folder, _, first, _ = bench_runs
    statuses = {row.spec: row.status for row in first.rows}
    assert statuses == {"gguf:q8_0": "ok", "gguf:q4_0": "ok", "gguf:q4_0?tensor=ffn_up:iq2_xxs": "failed", "uninstalled:int8": "skipped"}
    failed = next(r for r in first.rows if r.status == "failed")
    assert "requires an imatrix" in failed.error and "blk.0.ffn_up.weight" in failed.error
    skipped = next(r for r in first.rows if r.status == "skipped")
    assert "edgequant[uninstalled]" in skipped.error
    db = ResultsDB.open(folder / "results.sqlite", create=False)
    rows = db.query(run_id=first.run_id)
    db.close()
    assert [r["spec"] for r in rows] == ["pytorch:fp32", *SPECS, "uninstalled:int8"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["perplexity"] > 0 and r["decode_tps"] > 0 and r["size_bytes"] > 0 for r in ok)
    assert all(r["artifact_fingerprint"] and len(r["artifact_fingerprint"]) == 64 for r in ok if r["spec"] != "pytorch:fp32")
    assert ok[0]["machine"]["cores"] >= 1 and json.loads(json.dumps(ok[1]["metrics"]))["settings"]["ctx"] == 64


def test_second_run_adds_rows_and_reuses_artifacts(bench_runs):
    folder, _, first, second = bench_runs
    db = ResultsDB.open(folder / "results.sqlite", create=False)
    rows = db.query()
    db.close()
    assert len(rows) == 2 * (len(SPECS) + 2) and second.run_id == first.run_id + 1
    artifact = {r.spec: r.artifact for r in first.rows if r.status == "ok"}
    again = {r.spec: r.artifact for r in second.rows if r.status == "ok"}
    assert artifact == again
    fingerprints = {}
    for r in rows:
        if r["artifact_fingerprint"]:
            fingerprints.setdefault(r["spec"], set()).add(r["artifact_fingerprint"])
    assert all(len(v) == 1 for v in fingerprints.values())  # the same files, not rebuilt


def test_a_resumed_run_reuses_the_stored_evaluations_and_says_so(bench_runs):
    _, _, first, second = bench_runs
    before = {r.spec: r.metrics for r in first.rows if r.status == "ok"}
    resumed = {r.spec: r for r in second.rows if r.status == "ok"}
    assert set(resumed) == set(before) and not any(m.get("cached") for m in before.values())
    for spec, row in resumed.items():
        assert row.metrics["cached"] and row.metrics["perplexity"] == before[spec]["perplexity"]
        assert any("reused (--resume)" in n for n in row.notes)


def test_reports_are_written(bench_runs):
    folder = bench_runs[0]
    data = json.loads((folder / "report.json").read_text())
    assert [r["spec"] for r in data["rows"]][0] == "pytorch:fp32" and any(r["pareto"] for r in data["rows"])
    assert {s["framework"] for s in data["summary"]} == {"PyTorch", "llama.cpp (GGUF)"}
    took = next(n for n in data["notes"] if n.startswith("This run took"))  # measured, not a written claim
    assert data["wall_s"] > 0 and f"{data['wall_s'] / 60:.1f} minutes" in took and "gguf:" in took
    markdown = (folder / "report.md").read_text()
    assert "| gguf:q4_0" in markdown and "Summary by framework" in markdown and "requires an imatrix" in markdown


def test_html_report_renders_in_headless_chromium(bench_runs, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("Debian chromium is not installed (make setup installs it when run as root)")
    page = (bench_runs[0] / "report.html").resolve()
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    assert "<script>" not in page.read_text()  # the charts are static SVG: nothing to run
    assert dom.count('class="point') == 3  # baseline + two quantized candidates
    assert 'class="pareto-front"' in dom and dom.count('class="bar') >= 6
    assert dom.count("<tr") >= 1 + 5 + 1  # header, five rows, summary header
    shot = tmp_path / "report.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000


def test_stand_in_formats_get_a_short_speed_probe_and_their_htp_check_is_reported(tiny_model, tmp_path):
    from edgequant.backends.qnn.tools import htp_available

    config = BenchConfig(tiny_model, ("qnn:w8a16?graphs=fixed&seq=64&samples=2",), tmp_path / "r.sqlite", report_json=tmp_path / "r.json",
                         eval=EvalConfig(ctx=64, windows=2, prompt_tokens=16, gen_tokens=24, repeats=2))
    result = run_bench(config)
    assert result.baseline.metrics["generated_tokens"] == 24 and result.baseline.metrics["repeats"] == 2
    assert result.rows[0].metrics["generated_tokens"] == 16 and result.rows[0].metrics["repeats"] == 1
    notes = " ".join(json.loads((tmp_path / "r.json").read_text())["notes"])
    assert "short speed probe" in notes
    assert ("HTP simulator" in notes) == htp_available()


def test_unknown_spec_fails_before_any_work(tiny_model, tmp_path):
    with pytest.raises(EdgequantError, match="unknown precision"):
        run_bench(BenchConfig(tiny_model, ("gguf:q8_0", "gguf:bogus"), tmp_path / "db.sqlite", eval=QUICK))
    assert not (tmp_path / "db.sqlite").exists()


def test_strict_refuses_a_missing_engine(tiny_model, tmp_path, uninstalled_backend):
    with pytest.raises(EdgequantError, match="edgequant_no_such_engine"):
        run_bench(BenchConfig(tiny_model, ("uninstalled:int8",), tmp_path / "db.sqlite", strict=True, eval=QUICK))


def test_unwritable_report_path_fails_before_the_run(tiny_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(EdgequantError, match="cannot"):
        run_bench(BenchConfig(tiny_model, ("gguf:q8_0",), tmp_path / "db.sqlite", report_html=blocker / "r.html", eval=QUICK))
    assert not (tmp_path / "db.sqlite").exists()


def test_bench_reads_the_spec_list_convert_reads(cli, tiny_model, tmp_path):
    """An option value with commas (README's per-tensor example) is one spec on `bench --to` too:
    the run gets past parsing to the (deliberately unwritable) report path."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    done = cli("bench", str(tiny_model), "--to", "gguf:q4_k_m?tensor=ffn_down:q6_k,attn_v:q8_0,gguf:q8_0",
               "--db", str(tmp_path / "db.sqlite"), "--report", str(blocker / "r.html"))
    assert done.returncode == 2 and "cannot" in done.stderr and "unknown" not in done.stderr, done.stderr
    from edgequant.measurement.benchmark import _plan
    from edgequant.sources.source import load_source

    planned = _plan(BenchConfig(tiny_model, "gguf:q4_k_m?tensor=ffn_down:q6_k,attn_v:q8_0,gguf:q8_0"), load_source(tiny_model))
    assert [str(spec) for spec, _ in planned] == ["gguf:q4_k_m?tensor=ffn_down:q6_k,attn_v:q8_0", "gguf:q8_0"]


def test_a_run_with_a_failed_spec_exits_non_zero_unless_asked_to_keep_going(cli, tiny_model, tmp_path):
    args = ["bench", str(tiny_model), "--to", "gguf:q8_0,gguf:q4_0?tensor=ffn_up:iq2_xxs", "--db", str(tmp_path / "db.sqlite"),
            "--ctx", "64", "--windows", "1", "--prompt-tokens", "16", "--gen-tokens", "8", "--repeats", "1"]
    failed = cli(*args)
    assert failed.returncode == 1 and "1 of 2 specs failed" in failed.stderr and "| gguf:q8_0" in failed.stdout
    assert cli(*args, "--keep-going").returncode == 0


def test_a_file_that_is_not_our_database_is_refused_untouched(tiny_model, tmp_path):
    text = tmp_path / "notes.sqlite"
    text.write_text("not a database at all")
    with pytest.raises(EdgequantError, match="not an edgequant results database"):
        ResultsDB.open(text)
    assert text.read_text() == "not a database at all"
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE people (name TEXT)")
    before = other.read_bytes()
    with pytest.raises(EdgequantError, match="not an edgequant results database"):
        run_bench(BenchConfig(tiny_model, ("gguf:q8_0",), other, eval=QUICK))
    assert other.read_bytes() == before


def test_results_command_prints_json_and_csv(cli, bench_runs):
    db = str(bench_runs[0] / "results.sqlite")
    as_json = cli("results", "--db", db, "--json")
    assert as_json.returncode == 0 and len(json.loads(as_json.stdout)) == 2 * (len(SPECS) + 2)
    as_csv = cli("results", "--db", db, "--csv", "--model", bench_runs[2].model)  # the folder holding `model/`
    assert as_csv.stdout.splitlines()[0].startswith("id,run_id") and len(as_csv.stdout.splitlines()) == 1 + 2 * (len(SPECS) + 2)
    table = cli("results", "--db", db)
    assert "gguf:q4_0" in table.stdout
    missing = cli("results", "--db", str(bench_runs[0] / "none.sqlite"))
    assert missing.returncode == 2 and "no results database" in missing.stderr
