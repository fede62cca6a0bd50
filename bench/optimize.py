"""`edgequant optimize` on the embedded default model for target x86-cpu.

Run 1, the default gates (gates.DEFAULT_GATES; results/optimize.json was measured under the earlier
one-sided ppl_increase<=5%, speedup>=2, memory_reduction>=50%), objective size:
the winner, its figures, every candidate tried, and the wall time (target: under 15 minutes on
2 cores). Runs 2-4, one size gate each (90, 105, 120 MB), objective quality: the winner and, for
each budget, every built-in fixed spec of the target's formats that fits it. Target: the winner's
KLD at or below each of theirs. Built-in specs of formats the target does not run (MLX, QNN) are
listed from the same run's cached evaluations for reference, not as competitors.

Evaluations cached in artifacts' manifests (same settings, text and baseline) are reused, as
optimize does; the JSON says which were, and the 1/5/15-minute load average at start and end.

    .venv/bin/python bench/optimize.py [--budgets 90,105,120] [--only-default]
    .venv/bin/python bench/optimize.py --cold

`--cold` runs the default-gate search alone in an empty cache (a temporary EDGEQUANT_HOME): the
import of the GGUF source, the baseline's reference, the importance matrix and every conversion
are part of its wall time. Its entry is added to the file beside the others.

Writes bench/results/optimize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
COLD = "default gates, cold cache"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="90,105,120", help="size budgets in MB, comma-separated")
    parser.add_argument("--only-default", action="store_true", help="run the default-gate search only")
    parser.add_argument("--cold", action="store_true", help="the default-gate search alone, from an empty cache")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "optimize.json")
    args = parser.parse_args()
    if args.cold:
        os.environ["EDGEQUANT_HOME"] = tempfile.mkdtemp(prefix="edgequant-cold-home-")

    from edgequant.atomic import write_text_atomic
    from edgequant.decisions.optimize import OptimizeConfig, optimize
    from edgequant.measurement.evaluation import machine_info
    from edgequant.sources.source import DEFAULT_MODEL_CAVEAT

    result: dict = {"machine": machine_info(), "caveat": DEFAULT_MODEL_CAVEAT,
                    "load_avg_1_5_15m": {"start": [round(x, 2) for x in os.getloadavg()]}, "runs": []}
    if args.cold and args.output.is_file():  # the cold run joins the warm ones
        result = {**json.loads(args.output.read_text()), "cold_load_avg_1_5_15m": result["load_avg_1_5_15m"]}
        result["runs"] = [r for r in result["runs"] if r["run"] != COLD]
    with tempfile.TemporaryDirectory(prefix="edgequant-bench-optimize-") as scratch:
        runs = [(COLD if args.cold else "default gates", OptimizeConfig(target="x86-cpu", output=Path(scratch) / "default"))]
        if not args.only_default and not args.cold:
            runs += [(f"size<={mb}MB", OptimizeConfig(target="x86-cpu", gates=(f"size<={mb}MB",), objective="quality",
                                                      output=Path(scratch) / f"size{mb}"))
                     for mb in (int(x) for x in args.budgets.split(","))]
        for name, config in runs:
            started = time.perf_counter()
            found = optimize(config)
            wall = time.perf_counter() - started
            result["runs"].append(_summary(name, config, found, wall))
            write_text_atomic(args.output, json.dumps(result, indent=2))  # what is done survives a later failure
    result["cold_load_avg_1_5_15m" if args.cold else "load_avg_1_5_15m"]["end"] = [round(x, 2) for x in os.getloadavg()]
    if args.cold:
        shutil.rmtree(os.environ["EDGEQUANT_HOME"], ignore_errors=True)
    write_text_atomic(args.output, json.dumps(result, indent=2))
    print(json.dumps([{k: r[k] for k in ("run", "winner", "wall_s", "target_met")} for r in result["runs"]], indent=2))
    return 0


def _summary(name: str, config, found: dict, wall: float) -> dict:
    candidates = found["candidates"]
    winner = next((c for c in candidates if c["spec"] == found["winner"]), None)
    out = {"run": name, "gates": found["gates"], "objective": found["objective"], "winner": found["winner"],
           "winner_figures": winner and winner["figures"], "winner_derived": winner and winner.get("derived"),
           "closest": found["closest"], "why": found["why"], "pareto_front": found["pareto_front"],
           "evaluations": found["evaluations"], "budget": found["budget"],
           "cached_evaluations": sum(c["cached"] for c in candidates), "wall_s": round(wall, 1),
           "candidates": [_brief(c) for c in candidates], "baseline": found["baseline"]}
    if name in ("default gates", COLD):
        out["target"] = "finishes in under 15 minutes on 2 cores"
        out["target_met"] = wall < 15 * 60 and found["winner"] is not None
        return out
    bound = next(int(g.split("<=")[1].removesuffix("MB")) for g in found["gates"] if g.startswith("size<="))
    fixed = [c for c in candidates if c["origin"] in ("the profile's", "built-in") and c["status"] == "measured"
             and c["figures"]["size_bytes"] <= bound * 1e6]
    kld = winner["figures"]["kld_mean"] if winner else None
    out["fixed_specs_that_fit"] = [{"spec": c["spec"], "size_mb": round(c["figures"]["size_bytes"] / 1e6, 2),
                                    "kld_mean": c["figures"]["kld_mean"], "kld_ci95": c["figures"]["ci95"]["kld_mean"],
                                    "winner_at_or_below": kld is not None and kld <= c["figures"]["kld_mean"]}
                                   for c in fixed]
    out["other_formats_that_fit"] = _other_formats(found, bound)
    out["target"] = "winner KLD <= every built-in fixed spec of the target's formats that fits the budget"
    out["target_met"] = kld is not None and all(f["winner_at_or_below"] for f in out["fixed_specs_that_fit"])
    return out


def _brief(c: dict) -> dict:
    f = c.get("figures") or {}
    return {"spec": c["spec"], "origin": c["origin"], "status": c["status"], "reason": c["reason"], "passes": c["passes"],
            "pareto": c["pareto"], "cached": c["cached"], "better_than_parent": c["better_than_parent"],
            "size_mb": round(f["size_bytes"] / 1e6, 2) if f.get("size_bytes") else None, "kld_mean": f.get("kld_mean"),
            "kld_ci95": (f.get("ci95") or {}).get("kld_mean"), "ppl_increase_pct": f.get("ppl_increase_pct"),
            "decode_tps": f.get("decode_tps"), "peak_rss_mb": f.get("peak_rss_mb"), "derived": c.get("derived")}


def _other_formats(found: dict, bound: int) -> list[dict]:
    """Built-in specs of formats x86-cpu does not list, from their cached evaluations (same settings)."""
    from edgequant.conversion import default_artifact_dir
    from edgequant.decisions.hardware import get_profile
    from edgequant.measurement.evaluation import stored_evaluation
    from edgequant.measurement.measure import eval_config_for
    from edgequant.measurement.settings import DEFAULT_EVAL
    from edgequant.registry import backends, parse_spec

    listed = set(get_profile("x86-cpu").formats)
    rows = []
    for backend in backends().values():
        if backend.name in listed:
            continue
        for text in backend.bench_specs:
            spec = parse_spec(text)
            folder = default_artifact_dir(found["source_fingerprint"], spec)
            metrics = stored_evaluation(folder, eval_config_for(DEFAULT_EVAL, spec)) if folder.is_dir() else None
            if metrics and metrics["size_bytes"] <= bound * 1e6:
                rows.append({"spec": text, "size_mb": round(metrics["size_bytes"] / 1e6, 2), "kld_mean": metrics["kld_mean"],
                             "note": "not an x86-cpu format; listed for reference"})
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
