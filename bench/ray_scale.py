"""`bench` serial against `bench --ray local` on this machine, and what a model zoo would cost on a
cluster, planned from what was measured.

    .venv/bin/python bench/ray_scale.py [--specs gguf:q8_0,...] [--windows 4]

Both runs are the CLI a user runs, on the embedded default model with bench's default evaluation
(4 windows of 512 tokens, speed included), each from an empty cache of its own (the GGUF import,
the PyTorch reference and every conversion counted). The specs are the default bench's (14 on
the default model; about 14 minutes serially on 2 idle cores, QNN's one spec 7 of them), or the
subset `--specs` gives.

The capacity plan for a zoo of 20 models x 30 specs on 4 and 16 nodes like this one is arithmetic
on the measured figures, stated as such: each job costs the mean measured per-spec cost (the serial
run's, one job at a time), each model its baseline once, and a node takes as many jobs at once as
its CPUs and memory allow (Ray's requests: 1 CPU, memory from `ray_grid.memory_request`), at the
throughput gain per node that Ray local measured here; with --ray-whole-node a node runs one job at
a time at the serial rate. Models of 135M parameters like the one measured; larger ones cost more
(a 1B model several times per spec: bench/results/scale.json), so the plan also gives the figure
per unit of per-job cost. Writes bench/results/ray_scale.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "ray_scale.json"
EDGEQUANT = Path(sys.executable).parent / "edgequant"
ZOO = {"models": 20, "specs": 30}
NODES = (4, 16)


def run_bench(specs: str, windows: int, ray: bool, folder: Path) -> dict:
    """One `edgequant bench` from an empty cache; its report, wall time and the load around it."""
    home = folder / ("ray" if ray else "serial")
    env = {**os.environ, "EDGEQUANT_HOME": str(home), "EDGEQUANT_QUIET": "0"}
    env.pop("EDGEQUANT_RAY_ADDRESS", None)
    report = folder / f"{home.name}.json"
    command = [str(EDGEQUANT), "bench", "--to", specs, "--windows", str(windows), "--db", str(home / "results.sqlite"),
               "--json", str(report), "--keep-going"] + (["--ray", "local"] if ray else [])
    load = os.getloadavg()
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    data = json.loads(report.read_text())
    rows = [{"spec": r["spec"], "status": r["status"], "seconds": r["seconds"], "decode_tps": r.get("decode_tps"),
             "kld_mean": r.get("kld_mean"), "speed_flagged": r.get("speed_representative") is False and r["spec"] != "pytorch:fp32",
             "error": r.get("error")} for r in data["rows"]]
    found = {"command": " ".join(command[1:]), "wall_s": round(wall, 1), "bench_wall_s": data["wall_s"], "rows": rows,
             "load_avg_1_5_15m": {"before": [round(x, 2) for x in load], "after": [round(x, 2) for x in os.getloadavg()]}}
    if ray:
        found["tasks_span_s"] = _tasks_span(home / "results.sqlite")
    return found


def _tasks_span(db: Path) -> float:
    """Seconds from the first Ray task's start to the last one's end, from the rows' placements."""
    import sqlite3

    with sqlite3.connect(db) as conn:
        placements = [json.loads(m)["ray"] for (m,) in conn.execute("SELECT metrics FROM evaluations WHERE metrics IS NOT NULL")
                      if "ray" in json.loads(m)]
    return round(max(p["ended"] for p in placements) - min(p["started"] for p in placements), 1)


def capacity_plan(serial: dict, on_ray: dict, node_cpus: int, node_memory_gb: float, job_memory_gb: float) -> dict:
    """The zoo's wall time on 4 and 16 nodes like this one, from the measured per-spec costs."""
    specs = [r for r in serial["rows"] if r["spec"] != "pytorch:fp32" and r["status"] == "ok"]
    per_job = sum(r["seconds"] for r in specs) / len(specs)
    baseline = next(r["seconds"] for r in serial["rows"] if r["spec"] == "pytorch:fp32")
    gain = sum(r["seconds"] for r in specs) / on_ray["tasks_span_s"]  # the specs one at a time, against all as tasks
    slots = max(1, min(node_cpus, math.floor(node_memory_gb / job_memory_gb)))
    jobs = ZOO["models"] * ZOO["specs"]
    work = jobs * per_job
    plan = {"zoo": ZOO, "jobs": jobs, "mean_seconds_per_job": round(per_job, 1), "baseline_seconds_per_model": round(baseline, 1),
            "serial_hours_one_node": round((work + ZOO["models"] * baseline) / 3600, 2),
            "jobs_at_once_per_node": slots, "throughput_gain_per_node_measured": round(gain, 2), "nodes": {}}
    for nodes in NODES:
        # baselines run on the driver, one per model, before that model's jobs: they overlap other models' jobs
        shared = work / (nodes * gain) + per_job
        whole = work / nodes + per_job
        plan["nodes"][str(nodes)] = {
            "hours_tasks_share_nodes": round((shared + ZOO["models"] * baseline / nodes) / 3600, 2),
            "hours_whole_node": round((whole + ZOO["models"] * baseline / nodes) / 3600, 2),
            "hours_per_second_of_job_cost": round(jobs / (nodes * gain) / 3600, 4)}
    plan["how"] = ("work = jobs x mean per-spec cost (the serial run's, one job at a time, cold cache); sharing nodes, a "
                   "node does it at the measured Ray-local gain (the serial run's summed spec seconds / the span from the "
                   "first Ray task's start to the last one's end), its jobs at once bounded by CPUs and by node memory / "
                   "the job's Ray memory request; whole-node, at the serial rate; plus one job for the tail and each "
                   "model's baseline spread over the nodes. Arithmetic on the figures, not a run on a cluster.")
    return plan


def reading(result: dict) -> list[str]:
    """What the figures can and cannot say, from the figures themselves."""
    serial, on_ray = result["serial"], result["ray_local"]
    tasks, cores = result["settings"]["ray"]["local_cpus"], result["machine"]["cores"]
    ran = (f"Ray local ran the bench {result['speedup']}x as fast as the serial run ({on_ray['wall_s']} s against "
           f"{serial['wall_s']} s in all; its tasks spanned {on_ray['tasks_span_s']} s) with {tasks} tasks at once on {cores} cores: ")
    if result["speedup"] > 1:
        ran += ("a task's single-threaded stretches (loading, Python conversion steps, writing files) leave a core that "
                "the other task uses, but each task's heavy parts already use every core, so the gain is small; Ray's "
                "gain is nodes, and every row shared its node, so its speed figures are flagged.")
    else:
        ran += ("each task already uses every core for its conversion and scoring, so on one small node Ray adds parallel "
                "cold starts and contention, not throughput; its gain is nodes, and --ray-whole-node keeps one task per node.")
    words = [ran]
    before = [run["load_avg_1_5_15m"]["before"][0] for run in (serial, on_ray)]
    if before[0] > 1.0:  # the second run starts at the first one's own load
        words.append(f"Other work ran on this machine before the runs (1-minute load average {before[0]} at the first one's "
                     f"start, on {cores} cores): the two runs are not a like-for-like comparison, and every seconds figure "
                     "here is an upper bound.")
    differs = result["kld_differs"]
    same = "Every spec's KLD is identical" if not differs else f"Every spec's KLD but {', '.join(differs)}'s is identical"
    words.append(f"{same} in both runs: the same artifacts, scored on the same windows."
                 + (" A differing one was converted afresh in each run, the Ray one inside a 1-CPU task (where Ray sets "
                    "OMP_NUM_THREADS=1); a calibrated conversion whose float sums depend on the thread count would differ "
                    "so, but that cause is not verified." if differs else ""))
    return words


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--specs", default="", help="comma-separated specs (default: the default bench's)")
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import psutil

    from edgequant import __version__
    from edgequant.measurement.evaluation import machine_info
    from edgequant.measurement.ray_grid import memory_request
    from edgequant.registry import bench_specs, parse_spec
    from edgequant.sources.source import load_source

    args.specs = args.specs or ",".join(bench_specs())
    source = load_source(None)
    job_memory = max(memory_request(source, parse_spec(s)) for s in args.specs.split(","))
    result = {"measured": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "what": "edgequant bench serial vs --ray local on the default model (SmolLM2-135M-Instruct.Q4_1), each from "
                      "an empty cache; then a capacity plan for a model zoo from the measured costs",
              "specs": {"specs": args.specs.split(","), "whole_default_bench": args.specs.split(",") == bench_specs()},
              "settings": {"windows": args.windows, "ctx": 512, "speed": True, "ray": {"address": "local", "cpus_per_task": 1,
                           "local_cpus": os.cpu_count(), "whole_node": False}},
              "versions": {"edgequant": __version__, "python": sys.version.split()[0], **_versions()},
              "commit": _commit(), "machine": machine_info()}
    with tempfile.TemporaryDirectory(prefix="ray-scale-") as folder:
        result["serial"] = run_bench(args.specs, args.windows, False, Path(folder))
        result["ray_local"] = run_bench(args.specs, args.windows, True, Path(folder))
    serial, on_ray = result["serial"], result["ray_local"]
    result["speedup"] = round(serial["wall_s"] / on_ray["wall_s"], 2)
    result["per_spec_seconds"] = {r["spec"]: {"serial": r["seconds"], "ray": s["seconds"]}
                                  for r, s in zip(serial["rows"], on_ray["rows"])}
    result["kld_differs"] = [a["spec"] for a, b in zip(serial["rows"], on_ray["rows"]) if a["kld_mean"] != b["kld_mean"]]
    result["rows_speed_flagged_under_ray"] = [r["spec"] for r in on_ray["rows"] if r["speed_flagged"]]
    result["reading"] = reading(result)
    memory_gb = psutil.virtual_memory().total / 1e9
    result["capacity_plan"] = capacity_plan(serial, on_ray, os.cpu_count(), memory_gb, job_memory / 1e9)
    result["capacity_plan"]["job_memory_request_gb"] = round(job_memory / 1e9, 2)
    result["capacity_plan"]["node"] = {"cpus": os.cpu_count(), "memory_gb": round(memory_gb, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("speedup", "per_spec_seconds", "capacity_plan")}, indent=2))


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("ray", "llama_cpp_python", "onnxruntime", "onnxruntime-genai", "openvino", "nncf", "mlx", "torch"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            continue
    return found


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, cwd=HERE)
    return done.stdout.strip() + (" with uncommitted changes" if dirty.stdout.strip() else "") if done.returncode == 0 else "unknown"


if __name__ == "__main__":
    main()
