"""Hardening figures: commands killed at random moments, and fuzz inputs counted by outcome.

1. Crash safety (tests/crash_points.py): each job (convert with an automatic importance matrix,
   convert to OpenVINO, imatrix, eval, bench, optimize through a recipe) runs once uninterrupted on
   the tiny model, then is started and SIGKILLed at `--kills` seeded random moments of that run's
   duration, in one cache, each run resuming the last; after every kill the invariants are checked
   (whole artifacts, sound results stores, parseable cache files, no child process left running),
   and after a final uninterrupted run: no temporary file anywhere, and the same result as the
   uninterrupted run.
2. Fuzzing (tests/fuzz_targets.py): every reader of user input gets `--fuzz` generated inputs; each
   outcome is counted: parsed, refused with our error, or anything else (a bug, kept with its input).

Writes bench/results/hardening.json. The test suite runs the same harnesses, bounded
(tests/test_crash_safety.py, tests/test_fuzz.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import crash_points  # noqa: E402
from fuzz_targets import TARGETS  # noqa: E402


def crash_section(model: Path, work: Path, kills: int, seed: int, names: list[str] | None) -> dict:
    jobs = [j for j in crash_points.jobs(quick=False) if names is None or j.name in names]
    found = []
    for index, job in enumerate(jobs):
        started = time.monotonic()
        print(f"[crash] {job.name}: {kills} kills", file=sys.stderr, flush=True)
        trial = crash_points.trials(job, model, work / job.name, kills, seed + index)
        trial["wall_s"] = round(time.monotonic() - started, 1)
        found.append(trial)
    all_kills = [k for t in found for k in t["kills"]]
    killed = [k for k in all_kills if k["killed"]]
    return {
        "kills_tried": len(all_kills),
        "killed_mid_run": len(killed),
        "finished_before_the_kill": len(all_kills) - len(killed),
        "invariants_held_after_kill": sum(1 for k in all_kills if not k["violations"] and not k["orphans"]),
        "final_runs_clean": sum(1 for t in found if t["after_final_run"] == {"leftovers": [], "violations": [],
                                                                             "same_result": True}),
        "jobs": found,
    }


def fuzz_section(per_target: int, seed: int) -> dict:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import seed as hypothesis_seed

    found = {}
    for target in TARGETS:
        counts, bugs = Counter(), []
        started = time.monotonic()
        run = settings(max_examples=per_target, deadline=None, database=None,
                       suppress_health_check=list(HealthCheck))(given(target.inputs())(_counter(target, counts, bugs)))
        hypothesis_seed(seed)(run)()
        found[target.name] = {"inputs": sum(counts.values()), "outcomes": dict(counts), "bugs": bugs,
                              "seconds": round(time.monotonic() - started, 1)}
        print(f"[fuzz] {target.name}: {dict(counts)}", file=sys.stderr, flush=True)
    return found


def _counter(target, counts: Counter, bugs: list):
    """The function hypothesis calls with each input: it counts the outcome instead of failing."""
    def count(value) -> None:
        try:
            counts[target.outcome(value)] += 1
        except Exception as exc:  # a bug is what this section looks for: kept with its input
            counts[f"bug: {type(exc).__name__}"] += 1
            if len(bugs) < 5:
                bugs.append({"input": repr(value)[:300], "error": f"{type(exc).__name__}: {exc}"[:300]})

    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=8, help="kills per job (default 8)")
    parser.add_argument("--fuzz", type=int, default=5000, help="generated inputs per reader (default 5000)")
    parser.add_argument("--seed", type=int, default=29)
    parser.add_argument("--jobs", help="comma-separated job names (default: all)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "hardening.json")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="edgequant-hardening-") as scratch:
        work = Path(scratch)
        os.environ["EDGEQUANT_HOME"] = str(work / "model-home")  # the tiny model's tokenizer reads the eval text
        from tiny_model import build_tiny_llama

        model = build_tiny_llama(work)
        started = time.monotonic()
        fuzz = fuzz_section(args.fuzz, args.seed)
        crash = crash_section(model, work, args.kills, args.seed, args.jobs.split(",") if args.jobs else None)
    from edgequant import __version__

    result = {
        "measured": datetime.date.today().isoformat(), "edgequant": __version__,
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                 cwd=HERE).stdout.strip(),
        "machine": {"cores": os.cpu_count(), "load_avg_1m_start": round(load_before, 2),
                    "load_avg_1m_end": round(os.getloadavg()[0], 2)},
        "settings": {"kills_per_job": args.kills, "fuzz_inputs_per_reader": args.fuzz, "seed": args.seed},
        "wall_s": round(time.monotonic() - started, 1),
        "crash": crash,
        "fuzz": fuzz,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: crash[k] for k in crash if k != "jobs"}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
