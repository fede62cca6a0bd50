"""The results store: every evaluation in one SQLite file, appended to and never overwritten.

Two tables of evaluations: `evaluations`, the rows of bench, optimize and recommend runs (`runs`),
and `stored_evaluations`, every evaluation of an artifact by its content and settings, which
`evaluate(reuse=True)` finds again (artifacts are never rewritten after conversion). Each write is
its own transaction in WAL mode, so a killed process leaves the file whole and readers never wait.

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
from edgequant.measurement import metric_table
from edgequant.paths import cache_home
from edgequant.spec import format_and_precision

SCHEMA_VERSION = 2  # 2: the 95% intervals of the quality figures as columns
APP_ID = "edgequant-results"


def metric_columns() -> list[tuple[str, str, int | None]]:
    """(column, metric key, None for the value or 0 / 1 for its interval's low / high end), from
    the metric table: a figure declared there with a column gets one here, in new and old files."""
    found = []
    for m in metric_table.TABLE:
        if m.column:
            found.append((m.column, m.key, None))
        if m.interval_column:
            found += [(f"{m.interval_column}_{end}", m.key, i) for i, end in enumerate(("lo", "hi"))]
    return found


def _schema() -> list[str]:
    return [
        "CREATE TABLE edgequant_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE runs (
            id INTEGER PRIMARY KEY, started TEXT NOT NULL, model TEXT NOT NULL, source_fingerprint TEXT NOT NULL,
            machine TEXT NOT NULL, settings TEXT NOT NULL, tools TEXT NOT NULL)""",
        f"""CREATE TABLE evaluations (
            id INTEGER PRIMARY KEY, run_id INTEGER REFERENCES runs(id), created TEXT NOT NULL,
            model TEXT NOT NULL, source_fingerprint TEXT NOT NULL, spec TEXT NOT NULL, format TEXT NOT NULL,
            precision TEXT NOT NULL, status TEXT NOT NULL, error TEXT, artifact_path TEXT, artifact_fingerprint TEXT,
            {", ".join(f"{c} REAL" for c, _, _ in metric_columns())}, metrics TEXT)""",
        "CREATE INDEX evaluations_by_source ON evaluations (source_fingerprint, spec)",
        *_STORED_EVALUATIONS,
    ]


# Every evaluation of an artifact, keyed by the artifact's content and the evaluation's settings:
# what `evaluate(reuse=True)` finds again. Rows are only added, so two processes evaluating one
# artifact at once both keep their result; the newest is the one reused.
_STORED_EVALUATIONS = [
    """CREATE TABLE IF NOT EXISTS stored_evaluations (
        id INTEGER PRIMARY KEY, created TEXT NOT NULL, artifact_sha256 TEXT NOT NULL, settings_key TEXT NOT NULL,
        spec TEXT NOT NULL, artifact_path TEXT NOT NULL, metrics TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS stored_by_artifact ON stored_evaluations (artifact_sha256, settings_key)",
]


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
        try:
            _create_or_check(conn, path)
        except BaseException:
            conn.close()
            raise
        conn.execute("PRAGMA journal_mode=WAL")  # readers never wait for a writer; only once the file is known ours
        return cls(path, conn)

    def start_run(self, model: str, fingerprint: str, machine: dict, settings: dict, tools: dict) -> int:
        cur = self.conn.execute("INSERT INTO runs (started, model, source_fingerprint, machine, settings, tools) VALUES (?,?,?,?,?,?)",
                                (_now(), model, fingerprint, json.dumps(machine), json.dumps(settings), json.dumps(tools)))
        return cur.lastrowid

    def add(self, run_id: int, model: str, fingerprint: str, spec: str, status: str, metrics: dict | None = None,
            error: str | None = None, artifact_path: str | None = None, artifact_fingerprint: str | None = None) -> None:
        fmt, precision = format_and_precision(spec)
        metrics = metrics or {}
        ci = metrics.get("ci95") or {}
        columns = metric_columns()
        values = [metrics.get(key) if end is None else ci[key][end] if key in ci else None for _, key, end in columns]
        self.conn.execute(
            f"INSERT INTO evaluations (run_id, created, model, source_fingerprint, spec, format, precision, status, error,"
            f" artifact_path, artifact_fingerprint, {', '.join(c for c, _, _ in columns)}, metrics)"
            f" VALUES ({', '.join('?' * (12 + len(columns)))})",
            [run_id, _now(), model, fingerprint, spec, fmt, precision, status, error, artifact_path,
             artifact_fingerprint, *values, json.dumps(metrics) if metrics else None])

    def save_evaluation(self, artifact_sha256: str, settings_key: str, spec: str, artifact_path: str, metrics: dict) -> None:
        self.conn.execute("INSERT INTO stored_evaluations (created, artifact_sha256, settings_key, spec, artifact_path, metrics)"
                          " VALUES (?, ?, ?, ?, ?, ?)", (_now(), artifact_sha256, settings_key, spec, artifact_path,
                                                         json.dumps(metrics, default=str)))

    def find_evaluation(self, artifact_sha256: str, settings_key: str) -> dict | None:
        """The newest evaluation of these bytes with these settings, if any."""
        row = self.conn.execute("SELECT metrics FROM stored_evaluations WHERE artifact_sha256 = ? AND settings_key = ?"
                                " ORDER BY id DESC LIMIT 1", (artifact_sha256, settings_key)).fetchone()
        return json.loads(row[0]) if row else None

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
    """Autocommit, so each write is its own transaction and a killed process leaves the file whole;
    waits up to a minute for another process's write instead of failing."""
    try:
        return sqlite3.connect(path, timeout=60, isolation_level=None)
    except sqlite3.Error as exc:
        raise EdgequantError(f"cannot open results database {path} ({exc})", "pass --db with a writable path") from None


def _create_or_check(conn: sqlite3.Connection, path: Path) -> None:
    """A file with no tables gets the schema; any other must be ours, and gains what is new since
    it was written. One write transaction, so two processes opening a new file create it once."""
    fix = "pass --db with a new file name; edgequant never overwrites a file it did not create"
    try:
        conn.execute("BEGIN IMMEDIATE")
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    except sqlite3.DatabaseError as exc:  # not SQLite, or corrupt
        raise EdgequantError(f"{path} is not an edgequant results database ({exc})", fix) from None
    try:
        if not tables:
            for statement in _schema():
                conn.execute(statement)
            conn.executemany("INSERT INTO edgequant_meta VALUES (?, ?)", [("app", APP_ID), ("schema", str(SCHEMA_VERSION))])
        else:
            meta = dict(conn.execute("SELECT key, value FROM edgequant_meta").fetchall()) if "edgequant_meta" in tables else {}
            if meta.get("app") != APP_ID:
                raise EdgequantError(f"{path} is not an edgequant results database", fix)
            if meta.get("schema") not in ("1", str(SCHEMA_VERSION)):
                raise EdgequantError(f"{path} uses results schema {meta.get('schema')}, this edgequant reads {SCHEMA_VERSION}",
                                     "use a newer edgequant, or start a new database with --db")
            _add_missing_columns(conn)
            if meta["schema"] != str(SCHEMA_VERSION):
                conn.execute("UPDATE edgequant_meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _add_missing_columns(conn: sqlite3.Connection) -> None:
    """A file written before a figure had a column (schema 1 had no interval columns) gets the
    column, empty for the rows already there."""
    present = {row[1] for row in conn.execute("PRAGMA table_info(evaluations)")}
    for column, _, _ in metric_columns():
        if column not in present:
            conn.execute(f"ALTER TABLE evaluations ADD COLUMN {column} REAL")
    for statement in _STORED_EVALUATIONS:
        conn.execute(statement)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
