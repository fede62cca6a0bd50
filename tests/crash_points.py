"""Kill edgequant at seeded random moments and check what it leaves: the harness that
tests/test_crash_safety.py runs a few times and bench/hardening.py many times.

A job is a command line on the tiny model. It first runs once uninterrupted, in a cache of its own,
to learn how long it takes and what it produces. Then, in a second cache, it is started and killed
with SIGKILL at a random moment of that duration, again and again (each run resumes what the last
one finished), and after every kill the invariants are checked:
  - every artifact folder is whole (manifest, model file, the size the manifest records);
  - every results store passes SQLite's integrity check and is in WAL mode;
  - every cached JSON file parses and every cached .npy loads;
  - the job's own output is absent or complete.
A run that finishes before its kill starts the next from an empty cache, so kills keep meeting real
work instead of a cache that already holds everything. Finally one uninterrupted run must succeed,
leave no temporary file or folder anywhere in the cache or the output folder, and produce what the
uninterrupted first run produced.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgequant.atomic import LEFTOVER

EDGEQUANT = [sys.executable, "-m", "edgequant"]


@dataclass(frozen=True)
class Job:
    name: str
    args: tuple[str, ...]  # with {model} and {out} (a folder the job writes into) to fill in
    result: Callable[[Path], object]  # what a finished run produced, from its output folder


def _artifact_model_sha(folder: Path) -> str:
    from edgequant.artifact import open_artifact
    from edgequant.fingerprint import fresh_sha256

    return fresh_sha256(open_artifact(folder).model_path)


def _imatrix_sums(path: Path) -> dict:
    from edgequant.backends.gguf.imatrix import read_imatrix

    matrix = read_imatrix(path)
    return {name: round(float(values.sum()), 3) for name, values in sorted(matrix.sums.items())}


def _bench_quality(path: Path) -> dict:
    report = json.loads(path.read_text())
    return {row["spec"]: row["metrics"]["ppl"] for row in report["rows"] if row.get("metrics")}


def jobs(quick: bool) -> list[Job]:
    """The commands the issue names: convert, imatrix, eval, bench and optimize (through a recipe)."""
    small_eval = ("--windows", "2", "--ctx", "128", "--prompt-tokens", "16", "--gen-tokens", "8", "--repeats", "1")
    found = [
        Job("convert", ("convert", "{model}", "--to", "gguf:q4_k_m?imatrix=auto", "-o", "{out}/artifact"),
            lambda out: _artifact_model_sha(out / "artifact")),
        Job("imatrix", ("imatrix", "{model}", "--tokens", "4096", "-o", "{out}/imatrix.gguf"),
            lambda out: _imatrix_sums(out / "imatrix.gguf")),
        Job("bench", ("bench", "{model}", "--to", "gguf:q8_0,gguf:q4_0", "--db", "{out}/results.sqlite",
                      "--json", "{out}/report.json", *small_eval),
            lambda out: _bench_quality(out / "report.json")),
    ]
    if not quick:
        found += [
            Job("convert-openvino", ("convert", "{model}", "--to", "openvino:int8", "-o", "{out}/artifact"),
                lambda out: sorted(p.name for p in (out / "artifact").iterdir())),
            Job("eval", ("eval", "{model}", "--json", *small_eval), lambda out: None),
            Job("optimize", ("run", "{out}/recipe.yaml"), lambda out: json.loads(
                (out / "optimized" / "certificate.json").read_text())["spec"]),
        ]
    return found


def write_recipe(out: Path, model: Path) -> None:
    """The recipe the optimize job runs (an optimize run written down, so it can be started again)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(
        f"source: {model}\ntarget: arm-cpu\nspecs: [gguf:q8_0, gguf:q4_0]\nsearch: {{neighbours: false}}\n"
        'gates: ["kld<=1"]\n'  # the tiny random model meets no speed or memory gate
        "eval: {windows: 2, ctx: 128, prompt_tokens: 16, gen_tokens: 8, repeats: 1}\n"
        "output: optimized\ndb: results.sqlite\n")


def start(job: Job, model: Path, home: Path, out: Path) -> subprocess.Popen:
    if job.name == "optimize":
        write_recipe(out, model)
    argv = [a.format(model=model, out=out) for a in job.args]
    env = {**os.environ, "EDGEQUANT_HOME": str(home), "EDGEQUANT_QUIET": "1"}
    return subprocess.Popen([*EDGEQUANT, *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)


def run_whole(job: Job, model: Path, home: Path, out: Path, timeout: float = 900) -> float:
    """Run the job to its end; returns its wall time. A failure is an error of the harness's caller."""
    started = time.monotonic()
    process = start(job, model, home, out)
    _, err = process.communicate(timeout=timeout)
    if process.returncode != 0:
        raise AssertionError(f"{job.name} failed (exit {process.returncode}):\n{err[-2000:]}")
    return time.monotonic() - started


def kill_at(job: Job, model: Path, home: Path, out: Path, delay: float) -> dict:
    """Start the job, SIGKILL its main process `delay` seconds in (only that process, as the OOM
    killer would), and report what it left."""
    process = start(job, model, home, out)
    try:
        process.wait(timeout=delay)
        killed = False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
        killed = True
    orphans = _wait_for_children(process.pid)
    return {"job": job.name, "delay_s": round(delay, 2), "killed": killed, "returncode": process.returncode,
            "orphans": orphans, "violations": violations(home, out)}


def _wait_for_children(session: int, timeout: float = 10) -> int:
    """How many processes of the killed run's session were still alive `timeout` s later (children
    that outlived their parent); they are killed then, so one trial never disturbs the next."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = _session_members(session)
        if not alive:
            return 0
        time.sleep(0.1)
    alive = _session_members(session)
    for pid in alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(alive)


def _session_members(session: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == session:
                    found.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
    return found


def violations(home: Path, out: Path) -> list[str]:
    """Every broken invariant in the cache `home` and the output folder `out`."""
    found = []
    for root in (home, out):
        for manifest in root.rglob("edgequant.json"):
            if not _hidden(manifest, root):
                found += _artifact_problems(manifest.parent)
        for db in root.rglob("*.sqlite"):
            found += _store_problems(db)
        for path in root.rglob("*.json"):
            if not _hidden(path, root) and path.parent.name != "locks":
                try:
                    json.loads(path.read_text())
                except ValueError:
                    found.append(f"{path}: not valid JSON")
        for path in root.rglob("*.npy"):
            if not _hidden(path, root):
                found += _npy_problems(path)
    return found


def leftovers(*roots: Path) -> list[str]:
    """Temporary files and folders anywhere under `roots` (what a run should never leave)."""
    found = [str(p) for root in roots for p in root.rglob("*") if LEFTOVER.match(p.name)]
    scratch = [home / "tmp" for home in roots if (home / "tmp").is_dir()]
    return found + [str(p) for folder in scratch for p in folder.iterdir()]


def _hidden(path: Path, root: Path) -> bool:
    """Inside a temporary folder: work in progress, not a result."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _artifact_problems(folder: Path) -> list[str]:
    from edgequant.artifact import MANIFEST, folder_size, open_artifact
    from edgequant.errors import EdgequantError

    try:
        artifact = open_artifact(folder)
    except EdgequantError as exc:
        return [f"{folder}: {exc.problem}"]
    found = folder_size(folder) - (folder / MANIFEST).stat().st_size  # the manifest counts the files beside it
    if found != artifact.size_bytes:
        return [f"{folder}: {found} bytes, its manifest says {artifact.size_bytes}"]
    return []


def _store_problems(path: Path) -> list[str]:
    try:
        with sqlite3.connect(path) as conn:
            verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
            mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    except sqlite3.Error as exc:
        return [f"{path}: {exc}"]
    problems = [] if verdict == "ok" else [f"{path}: integrity check says {verdict}"]
    return problems + ([] if mode == "wal" else [f"{path}: journal mode {mode}, not wal"])


def _npy_problems(path: Path) -> list[str]:
    import numpy as np

    try:
        np.load(path, mmap_mode="r")
    except (ValueError, OSError) as exc:
        return [f"{path}: {exc}"]
    return []


def trials(job: Job, model: Path, work: Path, kills: int, seed: int) -> dict:
    """The whole experiment for one job: the uninterrupted run, `kills` killed runs, the final run."""
    rng = random.Random(seed)
    clean_home, clean_out = work / "clean-home", work / "clean-out"
    duration = run_whole(job, model, clean_home, clean_out)
    expected = job.result(clean_out)
    home, out = work / "home", work / "out"
    runs = []
    for _ in range(kills):
        runs.append(kill_at(job, model, home, out, rng.uniform(0.05, 1.0) * duration))
        if not runs[-1]["killed"]:  # it finished: start again from nothing, so the next kill meets real work
            shutil.rmtree(home, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    run_whole(job, model, home, out)
    return {"job": job.name, "uninterrupted_s": round(duration, 1), "kills": runs,
            "after_final_run": {"leftovers": leftovers(home, out), "violations": violations(home, out),
                                "same_result": job.result(out) == expected}}
