"""`bench --ray` on a real local Ray (a head and 2 worker processes on 127.0.0.1) with the tiny
model: the same rows as the serial run, a worker killed mid-task retried, the head on loopback
only, a restarted driver resuming from the store, artifacts shipped back from a worker that does
not see the cache, `run --ray`; and no ray import without --ray."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from importlib.util import find_spec

import psutil
import pytest

from edgequant.measurement.benchmark import BenchConfig, run_bench
from edgequant.measurement.ray_grid import RayConfig
from edgequant.measurement.results import ResultsDB
from edgequant.measurement.settings import EvalConfig

pytestmark = pytest.mark.skipif(find_spec("ray") is None or find_spec("llama_cpp") is None,
                                reason="the ray and gguf extras are not installed")

QUICK = EvalConfig(ctx=64, windows=2, prompt_tokens=16, gen_tokens=8, repeats=1)
SPECS = ("gguf:q8_0", "gguf:q6_k", "gguf:q4_k_m", "gguf:q4_0")
SHIPPED = "gguf:q5_0"
LOCAL = RayConfig("local", local_cpus=2)  # the head, and 2 worker processes running tasks at once
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
TASKS = ("ray::edgequant ", "ray::_run_job")  # the titles Ray gives a worker process while it runs a job


class _Saboteur(threading.Thread):
    """Watches this process's children while the Ray bench runs: notes every listening socket of
    the Ray processes, then SIGKILLs the first worker seen running a job, half a second in."""

    def __init__(self):
        super().__init__(daemon=True)
        self.listening: dict[str, set] = {}
        self.killed: int | None = None
        self.killed_job = ""  # the worker's title then: the job's name
        self.killed_at = 0.0
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set():
            for proc in psutil.Process().children(recursive=True):
                self._note_sockets(proc)
                if self.killed is None and _title(proc).startswith(TASKS):
                    time.sleep(0.5)  # inside the job (the title is set as it starts), whichever job it is by then
                    title = _title(proc)
                    if proc.is_running() and title.startswith(TASKS):
                        self.killed, self.killed_job, self.killed_at = proc.pid, title, time.time()
                        proc.send_signal(signal.SIGKILL)
            time.sleep(0.2)

    def _note_sockets(self, proc):
        try:
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    self.listening.setdefault(_title(proc), set()).add(conn.laddr.ip)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


def _title(proc) -> str:
    try:
        return " ".join(proc.cmdline()).strip() or proc.name()  # Ray pads the title it writes with spaces
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """The serial bench, the Ray bench (rebuilding every artifact, a worker killed mid-run), and a
    resumed Ray bench with one spec more, whose worker is told it does not see the driver's cache,
    each into its own results store."""
    folder = tmp_path_factory.mktemp("ray")
    serial = run_bench(BenchConfig(tiny_model, SPECS, folder / "serial.sqlite", eval=QUICK))
    saboteur = _Saboteur()
    saboteur.start()
    try:
        on_ray = run_bench(BenchConfig(tiny_model, SPECS, folder / "ray.sqlite", eval=QUICK, force=True, ray=LOCAL))
    finally:
        saboteur.stop.set()
        saboteur.join()
    resumed = run_bench(BenchConfig(tiny_model, SPECS + (SHIPPED,), folder / "resumed.sqlite", eval=QUICK, resume=True,
                                    ray=replace(LOCAL, ship_artifacts=True)))
    return folder, serial, on_ray, resumed, saboteur


def _rows(path, run_id):
    db = ResultsDB.open(path, create=False)
    try:
        return db.query(run_id=run_id)
    finally:
        db.close()


def test_ray_gives_the_serial_runs_rows(runs):
    folder, serial, on_ray, _, _ = runs
    before, after = _rows(folder / "serial.sqlite", serial.run_id), _rows(folder / "ray.sqlite", on_ray.run_id)
    assert [r["spec"] for r in after] == [r["spec"] for r in before] == ["pytorch:fp32", *SPECS]
    assert [r["status"] for r in after] == ["ok"] * 5
    for a, b in zip(before[1:], after[1:]):
        assert set(k for k, v in a.items() if v is not None) == set(k for k, v in b.items() if v is not None)  # same shape
        assert a["artifact_fingerprint"] == b["artifact_fingerprint"]  # the same bytes, rebuilt on a worker
        for key in ("perplexity", "kld_mean", "top1_agreement"):  # deterministic: same artifact, windows and threads
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (a["spec"], key)
        low, high = a["metrics"]["ci95"]["kld_mean"]
        assert low <= b["kld_mean"] <= high
        assert b["decode_tps"] > 0 and b["peak_rss_mb"] > 0


def test_a_worker_killed_mid_task_is_retried_and_every_spec_completes(runs):
    _, _, on_ray, _, saboteur = runs
    assert saboteur.killed is not None, "no worker was seen running a job"
    assert [r.status for r in on_ray.rows] == ["ok"] * len(SPECS)
    killed = [r for r in on_ray.rows if saboteur.killed_job.endswith(f" {r.spec}")]  # the job it was running
    assert len(killed) == 1, saboteur.killed_job
    row = killed[0]
    assert row.metrics["ray"]["pid"] != saboteur.killed and row.metrics["ray"]["started"] >= saboteur.killed_at - 1


def test_the_local_head_listens_on_loopback_only(runs):
    listening = runs[4].listening
    assert any("gcs_server" in name for name in listening) and any("raylet" in name for name in listening)
    assert all(ips <= LOOPBACK for ips in listening.values()), listening


def test_rows_whose_task_shared_the_node_are_flagged(runs):
    on_ray = runs[2]
    flagged = [r for r in on_ray.rows if r.metrics["ray"]["concurrent"]]
    assert flagged, "2 workers on one node ran no two jobs at once"
    for row in flagged:
        assert any("not comparable with a serial run's" in n for n in row.notes)
    from edgequant.reporting.report import build_report

    report = {r["spec"]: r for r in build_report(on_ray)["rows"]}
    assert all(report[r.spec]["speed_representative"] is False for r in flagged)


def test_a_restarted_driver_resumes_from_the_store_without_redoing_work(runs):
    _, _, on_ray, resumed, _ = runs
    assert all(r.status == "ok" and r.metrics["cached"] for r in resumed.rows[:len(SPECS)])
    for a, b in zip(on_ray.rows, resumed.rows):
        assert b.metrics["perplexity"] == a.metrics["perplexity"] and b.metrics["ray"]["pid"] == a.metrics["ray"]["pid"]


def test_a_worker_that_does_not_see_the_cache_ships_the_artifact_back(runs, tiny_model):
    from edgequant.artifact import open_artifact
    from edgequant.measurement.evaluation import stored_evaluation

    row = runs[3].rows[-1]
    assert row.spec == SHIPPED and row.status == "ok" and not row.metrics.get("cached")
    assert row.metrics["ray"]["shared_cache"] is False and row.metrics["baseline"] == str(tiny_model)
    artifact = open_artifact(row.artifact)  # built in the worker's own cache, placed in the driver's
    assert "ray-node" not in str(artifact.path) and artifact.manifest["source"]["path"] == str(tiny_model)
    assert stored_evaluation(artifact.path, QUICK)["kld_mean"] == row.metrics["kld_mean"]  # recorded by the driver


def test_run_takes_ray_and_measures_the_recipes_candidates(tiny_model, tmp_path, cli):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"source: {tiny_model}\ntarget: x86-cpu\nspecs: [gguf:q8_0, gguf:q4_0]\ngates: ['kld<=0.5']\n"
                      "eval: {ctx: 64, windows: 3, prompt_tokens: 16, gen_tokens: 8, repeats: 1}\n")  # nothing stored yet
    done = cli("run", str(recipe), "--json", env={"EDGEQUANT_RAY_ADDRESS": "local"})
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert {c["spec"]: c["status"] for c in result["candidates"]} == {"gguf:q8_0": "measured", "gguf:q4_0": "measured"}
    rows = _rows(result["db"], result["run_id"])
    assert all(r["metrics"]["ray"]["node"] for r in rows if r["spec"] != "pytorch:fp32")  # measured by Ray tasks


@pytest.mark.parametrize("address, words", [
    ("not an address", "is not a Ray address"),
    ("127.0.0.1:1", "no Ray head answers at 127.0.0.1:1"),
])
def test_a_bad_address_is_refused_with_the_problem_and_the_fix(cli, tiny_model, tmp_path, address, words):
    done = cli("bench", str(tiny_model), "--to", "gguf:q8_0", "--db", str(tmp_path / "r.sqlite"), "--ray", address)
    assert done.returncode == 2 and words in done.stderr and "fix:" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r.sqlite").exists()  # refused before any work


def test_ray_not_installed_names_the_extra(tiny_model, tmp_path):
    code = ("import sys; sys.modules['ray'] = None\nfrom edgequant.cli import main\n"
            f"sys.exit(main(['bench', {str(tiny_model)!r}, '--to', 'gguf:q8_0', '--ray', 'local']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "needs Ray" in done.stderr and "edgequant[ray]" in done.stderr


@pytest.mark.unit
def test_without_ray_nothing_imports_ray():
    code = ("import sys\nfrom edgequant.cli import build_parser\n"
            "import edgequant.measurement.benchmark, edgequant.decisions.optimize, edgequant.commands.run\n"
            "for verb in ('bench', 'optimize'):\n"
            "    args = build_parser().parse_args([verb])\n"
            "    from edgequant.commands import common\n"
            "    assert common.ray_config(args) is None\n"
            "print('ray' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "EDGEQUANT_RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.strip() == "False"
