"""The results store's schema: intervals stored as columns, and a schema-1 database migrated in place."""

import sqlite3

import pytest

from edgequant.measurement.results import ResultsDB, metric_columns

pytestmark = pytest.mark.unit

METRICS = {"perplexity": 20.0, "ppl_increase_pct": 2.5, "kld_mean": 0.01, "top1_agreement": 0.95,
           "ci95": {"ppl_increase_pct": [1.9, 3.1], "kld_mean": [0.009, 0.011], "top1_agreement": [0.94, 0.96]}}


def test_intervals_are_stored_as_columns(tmp_path):
    db = ResultsDB.open(tmp_path / "r.sqlite")
    run = db.start_run("m", "f" * 64, {}, {}, {})
    db.add(run, "m", "f" * 64, "gguf:q4_0", "ok", METRICS)
    row = db.query()[0]
    db.close()
    assert (row["ppl_increase_lo"], row["ppl_increase_hi"]) == (1.9, 3.1)
    assert (row["kld_mean_lo"], row["top1_hi"]) == (0.009, 0.96)


SCHEMA_1_COLUMNS = ("perplexity", "ppl_increase_pct", "kld_mean", "kld_p99", "top1_agreement", "size_bytes",
                    "load_s", "peak_rss_mb", "ttft_ms", "prefill_tps", "decode_tps")


def test_a_schema_1_database_gains_the_interval_columns_and_keeps_its_rows(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.executescript(f"""
CREATE TABLE edgequant_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO edgequant_meta VALUES ('app', 'edgequant-results'), ('schema', '1');
CREATE TABLE runs (id INTEGER PRIMARY KEY, started TEXT NOT NULL, model TEXT NOT NULL, source_fingerprint TEXT NOT NULL,
    machine TEXT NOT NULL, settings TEXT NOT NULL, tools TEXT NOT NULL);
INSERT INTO runs VALUES (1, 'then', 'm', 'f', '{{}}', '{{}}', '{{}}');
CREATE TABLE evaluations (id INTEGER PRIMARY KEY, run_id INTEGER REFERENCES runs(id), created TEXT NOT NULL,
    model TEXT NOT NULL, source_fingerprint TEXT NOT NULL, spec TEXT NOT NULL, format TEXT NOT NULL,
    precision TEXT NOT NULL, status TEXT NOT NULL, error TEXT, artifact_path TEXT, artifact_fingerprint TEXT,
    {", ".join(f"{c} REAL" for c in SCHEMA_1_COLUMNS)}, metrics TEXT);
INSERT INTO evaluations (run_id, created, model, source_fingerprint, spec, format, precision, status, kld_mean)
    VALUES (1, 'then', 'm', 'f', 'gguf:q8_0', 'gguf', 'q8_0', 'ok', 0.002);
""")
    db = ResultsDB.open(path)
    run = db.start_run("m", "f", {}, {}, {})
    db.add(run, "m", "f", "gguf:q4_0", "ok", METRICS)
    old, new = db.query()
    db.close()
    assert old["kld_mean"] == 0.002 and all(old[c] is None for c, _, end in metric_columns() if end is not None)
    assert new["kld_mean_hi"] == 0.011
