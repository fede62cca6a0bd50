"""The results store: every evaluation in one SQLite file, appended to and never overwritten.

A file is recognised as ours by its `edgequant_meta` table; anything else (another program's
database, a corrupt file, a text file) is refused untouched.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from edgequant.errors import EdgequantError
from edgequant.paths import cache_home

SCHEMA_VERSION = 2  # 2: the 95% intervals of the quality figures as columns
APP_ID = "edgequant-results"
# Metrics kept as columns so they can be queried and sorted without parsing JSON.
METRIC_COLUMNS = ("perplexity", "ppl_increase_pct", "kld_mean", "kld_p99", "top1_agreement", "size_bytes",
                  "load_s", "peak_rss_mb", "ttft_ms", "prefill_tps", "decode_tps")
# (column, figure in metrics["ci95"], 0 for the interval's low end or 1 for its high end)
INTERVAL_COLUMNS = tuple((f"{short}_{end}", figure, i) for figure, short in
                         (("ppl_increase_pct", "ppl_increase"), ("kld_mean", "kld_mean"), ("top1_agreement", "top1"))
                         for i, end in enumerate(("lo", "hi")))
_COLUMNS = METRIC_COLUMNS + tuple(c for c, _, _ in INTERVAL_COLUMNS)

_SCHEMA = f"""
CREATE TABLE edgequant_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY, started TEXT NOT NULL, model TEXT NOT NULL, source_fingerprint TEXT NOT NULL,
    machine TEXT NOT NULL, settings TEXT NOT NULL, tools TEXT NOT NULL
);
CREATE TABLE evaluations (
    id INTEGER PRIMARY KEY, run_id INTEGER REFERENCES runs(id), created TEXT NOT NULL,
    model TEXT NOT NULL, source_fingerprint TEXT NOT NULL, spec TEXT NOT NULL, format TEXT NOT NULL,
    precision TEXT NOT NULL, status TEXT NOT NULL, error TEXT, artifact_path TEXT, artifact_fingerprint TEXT,
    {", ".join(f"{c} REAL" for c in _COLUMNS)}, metrics TEXT
);
CREATE INDEX evaluations_by_source ON evaluations (source_fingerprint, spec);
"""


def default_db_path() -> Path:
    return cache_home() / "results.sqlite"


@dataclass
class ResultsDB:
    path: Path
    conn: sqlite3.Connection

    @classmethod
    def open(cls, path: str | Path | None = None, create: bool = True) -> "ResultsDB":
        path = Path(path or default_db_path()).expanduser()
        existed = path.is_file() and path.stat().st_size > 0
        if not existed and not create:
            raise EdgequantError(f"no results database at {path}", "run `edgequant bench` first, or pass --db PATH")
        if not existed:
            path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(path)
        if existed:
            _check_ours(conn, path)
        else:
            with conn:
                conn.executescript(_SCHEMA)
                conn.executemany("INSERT INTO edgequant_meta VALUES (?, ?)", [("app", APP_ID), ("schema", str(SCHEMA_VERSION))])
        return cls(path, conn)

    def start_run(self, model: str, fingerprint: str, machine: dict, settings: dict, tools: dict) -> int:
        with self.conn:
            cur = self.conn.execute("INSERT INTO runs (started, model, source_fingerprint, machine, settings, tools) VALUES (?,?,?,?,?,?)",
                                    (_now(), model, fingerprint, json.dumps(machine), json.dumps(settings), json.dumps(tools)))
        return cur.lastrowid

    def add(self, run_id: int, model: str, fingerprint: str, spec: str, status: str, metrics: dict | None = None,
            error: str | None = None, artifact_path: str | None = None, artifact_fingerprint: str | None = None) -> None:
        fmt, _, precision = spec.partition(":")
        metrics = metrics or {}
        ci = metrics.get("ci95") or {}
        values = [metrics.get(c) for c in METRIC_COLUMNS]
        values += [ci[figure][end] if figure in ci else None for _, figure, end in INTERVAL_COLUMNS]
        with self.conn:
            self.conn.execute(
                f"INSERT INTO evaluations (run_id, created, model, source_fingerprint, spec, format, precision, status, error,"
                f" artifact_path, artifact_fingerprint, {', '.join(_COLUMNS)}, metrics)"
                f" VALUES ({', '.join('?' * (12 + len(_COLUMNS)))})",
                [run_id, _now(), model, fingerprint, spec, fmt, precision.split("?")[0], status, error, artifact_path,
                 artifact_fingerprint, *values, json.dumps(metrics) if metrics else None])

    def query(self, model: str | None = None, run_id: int | None = None) -> list[dict]:
        sql, args = "SELECT e.*, r.machine AS machine FROM evaluations e JOIN runs r ON r.id = e.run_id WHERE 1=1", []
        if model:
            sql += " AND (e.model LIKE ? OR e.source_fingerprint LIKE ?)"
            args += [f"%{model}%", f"{model}%"]
        if run_id is not None:
            sql += " AND e.run_id = ?"
            args.append(run_id)
        self.conn.row_factory = sqlite3.Row
        rows = [dict(r) for r in self.conn.execute(sql + " ORDER BY e.id", args)]
        for row in rows:
            row["metrics"] = json.loads(row["metrics"]) if row["metrics"] else None
            row["machine"] = json.loads(row["machine"])
        return rows

    def close(self) -> None:
        self.conn.close()


def _connect(path: Path) -> sqlite3.Connection:
    try:
        return sqlite3.connect(path)
    except sqlite3.Error as exc:
        raise EdgequantError(f"cannot open results database {path} ({exc})", "pass --db with a writable path") from None


def _check_ours(conn: sqlite3.Connection, path: Path) -> None:
    fix = "pass --db with a new file name; edgequant never overwrites a file it did not create"
    try:
        meta = dict(conn.execute("SELECT key, value FROM edgequant_meta").fetchall())
    except sqlite3.DatabaseError as exc:  # not SQLite, corrupt, or another program's database
        conn.close()
        raise EdgequantError(f"{path} is not an edgequant results database ({exc})", fix) from None
    if meta.get("app") != APP_ID:
        conn.close()
        raise EdgequantError(f"{path} is not an edgequant results database", fix)
    if meta.get("schema") == "1":
        _migrate_from_1(conn)
    elif meta.get("schema") != str(SCHEMA_VERSION):
        conn.close()
        raise EdgequantError(f"{path} uses results schema {meta.get('schema')}, this edgequant reads {SCHEMA_VERSION}",
                             "use a newer edgequant, or start a new database with --db")


def _migrate_from_1(conn: sqlite3.Connection) -> None:
    """Schema 1 had no interval columns: add them (empty for the rows already there)."""
    with conn:
        for column, _, _ in INTERVAL_COLUMNS:
            conn.execute(f"ALTER TABLE evaluations ADD COLUMN {column} REAL")
        conn.execute("UPDATE edgequant_meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
