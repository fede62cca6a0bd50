"""Many (source, spec) measurements on a Ray cluster: `bench --ray`, `optimize --ray`, `run --ray`.

Each job, one spec of one source converted (cached) and evaluated through `measure`, is one Ray
task asking for CPUs and for the memory it is expected to peak at: the backend's measured
conversion peak (`Backend.conversion_peak`, the estimate `convert` refuses by) or the evaluation's
own need, whichever is larger. Ray places a task only on a node with that much memory unclaimed,
so a node never runs two jobs that would not fit together; a job no node can hold is refused up
front with its estimate. A worker killed mid-task (the OOM killer, a lost node) is retried once;
a job whose worker dies twice comes back as a failed row naming why.

Workers never write the results store. They return the figures; the driver records each
evaluation the moment it arrives (so a restarted driver with `--resume` redoes nothing finished)
and the caller writes the run's rows in the order of the specs, as the serial run does.

Artifacts: a worker that sees the driver's cache (the same machine, or a shared file system;
found by a token file the driver writes there) builds into it under the cache's locks. One that
does not builds into its own cache (`ray-node/` in it) from a copy of the source shipped through
Ray's object store, and ships the artifact folder back; the driver places it in its cache.

Speed: each task records its node, process and start and end. A row whose task overlapped another
on the same node gets `metrics["ray"]["concurrent"]` (those specs) and a note: its speed figures
were measured beside other work. With `whole_node`, every task asks for all the CPUs of the
smallest node, so on equal nodes none overlap.

`local` starts a Ray head on this machine, every socket bound to 127.0.0.1, no dashboard.
"""

from __future__ import annotations

import io
import os
import re
import socket
import tarfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from edgequant.errors import EdgequantError

ENV_ADDRESS = "EDGEQUANT_RAY_ADDRESS"
LOCAL = "local"
INSTALL_HINT = "pip install 'edgequant[ray]' (`make setup` installs it)"
ADDRESS_FIX = ("pass --ray local (a Ray head on this machine), auto (the cluster `ray start` began here), HOST:PORT "
               "(a head's GCS address, port 6379 unless changed) or ray://HOST:PORT (Ray Client, port 10001)")
_ADDRESS = re.compile(r"^(?:auto|(?:ray://)?(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+):\d{1,5})$")
# What an evaluation holds at its peak besides a conversion: the PyTorch reference at fp32 (once
# per source) or a runner and its speed probe. The default model (135M) peaked at 1.0 GB for
# pytorch:fp32 and 1.3 GB for qnn:w8a16's probe: 2 x fp32 bytes + 0.5 GB covers both.
EVAL_PEAK = (2.0, 0.5)  # (multiple of the model's fp32 bytes, fixed GB)
CONNECT_TIMEOUT_S = 5.0
LOCAL_OBJECT_STORE_BYTES = 256 * 2**20  # a local head ships no artifacts; Ray spills to disk past it
_PROBES = "ray"  # the cache folder of the driver's token files


@dataclass(frozen=True)
class RayConfig:
    address: str = LOCAL
    cpus_per_task: float = 1.0
    # Each task asks for every CPU of the smallest node: no speed figure shares its node.
    whole_node: bool = False
    # `local`: CPUs the head offers, so tasks at once (default: this machine's cores).
    local_cpus: int | None = None
    # None: ship artifacts back only from workers that do not see the driver's cache; True: always.
    ship_artifacts: bool | None = None

    def __post_init__(self):
        if self.address != LOCAL and not _ADDRESS.match(self.address):
            raise EdgequantError(f"--ray {self.address!r} is not a Ray address", ADDRESS_FIX)
        if self.cpus_per_task <= 0:
            raise EdgequantError(f"CPUs per Ray task {self.cpus_per_task} must be above 0", "ask for 1 or more")
        if self.local_cpus is not None and self.local_cpus < 1:
            raise EdgequantError(f"a local Ray head with {self.local_cpus} CPUs runs nothing", "give it 1 or more")


def ray_config(address: str | None, **options) -> RayConfig | None:
    """The Ray settings for `--ray ADDRESS`, else $EDGEQUANT_RAY_ADDRESS; None: no Ray."""
    address = (address or os.environ.get(ENV_ADDRESS) or "").strip()
    return RayConfig(address, **options) if address else None


@dataclass
class Job:
    source: object  # a Source
    spec: object  # a Spec
    max_bytes: int | None = None  # `measure`'s: an artifact bigger than this is not evaluated


@dataclass
class _Pending:
    index: int
    job: Job
    started: float = field(default_factory=time.perf_counter)


def memory_request(source, spec) -> int:
    """Bytes of memory a job asks Ray for: its conversion's expected peak or its evaluation's."""
    from edgequant.registry import get_backend

    parameters = sum(t.numel for t in source.tensors)
    conversion = get_backend(spec.format).conversion_peak_bytes(parameters) or 0
    return max(conversion, int(EVAL_PEAK[0] * 4 * parameters + EVAL_PEAK[1] * 1e9))


def cluster(config: RayConfig | None):
    """The Ray cluster a run measures on, as a context manager yielding its `Grid`; without Ray one
    that yields None, so a verb writes `with cluster(config.ray) as grid:` either way."""
    from contextlib import nullcontext

    return nullcontext() if config is None else Grid(config)


class Grid:
    """A Ray cluster held for one run: `with Grid(config) as grid: grid.measure(jobs, eval_config)`.
    Entering connects (or starts the local head); leaving disconnects (and stops it)."""

    def __init__(self, config: RayConfig):
        self.config = config
        self._probe: Path | None = None
        self._source_refs: dict[str, object] = {}

    def __enter__(self) -> "Grid":
        connect(self.config)
        import ray

        from edgequant.paths import cache_dir

        token = uuid.uuid4().hex
        self._probe = cache_dir(_PROBES) / f"probe-{token}"
        self._probe.write_text(token)
        self._remote = ray.remote(_run_job)
        return self

    def __exit__(self, *exc) -> None:
        import ray

        if self._probe is not None:
            self._probe.unlink(missing_ok=True)
        ray.shutdown()

    def nodes(self) -> list[dict]:
        import ray

        return [n for n in ray.nodes() if n.get("Alive")]

    def measure(self, jobs: list[Job], eval_config, *, force: bool = False, reuse: bool = False, strict: bool = False,
                on_done: Callable[[int, object], None] | None = None) -> list:
        """Every job measured (a `Measured` each, in the order of `jobs`). With `reuse`, a job whose
        artifact and evaluation are stored already is answered here, without a task."""
        import ray

        results: list = [None] * len(jobs)
        pending: dict[object, _Pending] = {}
        for index, job in enumerate(jobs):
            if reuse and not force and _finished(job, eval_config):
                results[index] = _measure_here(job, eval_config)
                _report(on_done, index, results[index])
                continue
            refused, options = self._options(job, force)
            if refused:
                results[index] = _failed(job, refused)
                _report(on_done, index, results[index])
                continue
            ref = self._remote.options(**options).remote(self._payload(job, eval_config, force))
            pending[ref] = _Pending(index, job)
        placements: dict[int, dict] = {}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            item = pending.pop(ready[0])
            found, placement = self._collect(ready[0], item, placements)
            results[item.index] = found
            if placement:
                placements[item.index] = placement
            if strict and found.status == "failed":
                for ref in pending:
                    ray.cancel(ref, force=True)
                raise EdgequantError(f"{found.spec} failed under Ray: {found.error}", "drop --strict to record it and go on")
            _report(on_done, item.index, found)
        _flag_overlaps(results, placements)
        return results

    # -- the driver's side of one task --------------------------------------------------------

    def _options(self, job: Job, force: bool) -> tuple[str | None, dict]:
        """Why no node can take the job (None: one can), and the task's resource requests."""
        nodes = self.nodes()
        memory = memory_request(job.source, job.spec)
        largest = max((n["Resources"].get("memory", 0) for n in nodes), default=0)
        if memory > largest:
            if not force:
                return (f"needs about {memory / 1e9:.1f} GB of memory (its backend's measured conversion peak, or "
                        f"{EVAL_PEAK[0]:g}x the model's fp32 bytes + {EVAL_PEAK[1]:g} GB to evaluate it), and the largest "
                        f"Ray node offers {largest / 1e9:.1f} GB; --force runs it there anyway"), {}
            memory = int(largest)
        cpus = [n["Resources"].get("CPU", 0) for n in nodes] or [1]
        wanted = min(cpus) if self.config.whole_node else min(self.config.cpus_per_task, max(cpus))
        return None, {"num_cpus": wanted, "memory": memory, "max_retries": 1, "retry_exceptions": False,
                      "name": f"edgequant {job.spec}"}

    def _payload(self, job: Job, eval_config, force: bool) -> dict:
        from edgequant.paths import cache_home

        source = job.source
        return {"spec": str(job.spec), "source": None if source.is_default_model else str(source.path),
                "fingerprint": source.fingerprint, "source_name": source.path.name, "source_copy": self._source_copy(source),
                "eval": eval_config, "force": force, "max_bytes": job.max_bytes, "driver_home": str(cache_home()),
                "probe": self._probe.name, "token": self._probe.read_text(), "ship": bool(self.config.ship_artifacts)}

    def _source_copy(self, source) -> object | None:
        """The source's files in Ray's object store (put once per run), for workers that do not
        see them; none for the default model (every node has its package) or a local head."""
        if source.is_default_model or (self.config.address == LOCAL and not self.config.ship_artifacts):
            return None
        if source.fingerprint not in self._source_refs:
            import ray

            self._source_refs[source.fingerprint] = [ray.put(_pack(source.path))]  # in a list: fetched only if needed
        return self._source_refs[source.fingerprint]

    def _collect(self, ref, item: _Pending, placements: dict[int, dict]):
        """The task's result as a `Measured`, its artifact in the driver's cache, its evaluation
        recorded; a task that died twice becomes a failed row."""
        import ray

        try:
            out = ray.get(ref)
        except ray.exceptions.RayError as exc:
            return _failed(item.job, _died(exc), time.perf_counter() - item.started), None
        from edgequant.measurement.measure import Measured

        artifact = Path(out["artifact"]) if out["artifact"] else None
        if out.get("artifact_files") is not None:
            artifact = _place(item.job, out["artifact_files"])
        metrics = out["metrics"]
        placement = {k: out[k] for k in ("spec", "node", "host", "pid", "started", "ended")} | {"shared_cache": out["shared"]}
        if metrics is not None:
            metrics["baseline"] = str(item.job.source.path)  # a worker's copy of the source is the driver's source
            metrics["ray"] = {**placement, "concurrent": _overlapping(placement, placements.values())}
            if artifact is not None:
                from edgequant.measurement.evaluation import record_evaluation

                metrics["evaluation_key"] = record_evaluation(artifact, metrics)
        return Measured(out["spec"], out["status"], metrics, out["error"], artifact, out["seconds"], out["size_bytes"],
                        out["notes"]), placement


def _report(on_done, index: int, found) -> None:
    if on_done is not None:
        on_done(index, found)


def _failed(job: Job, error: str, seconds: float = 0.0):
    from edgequant.measurement.measure import Measured

    return Measured(str(job.spec), "failed", error=error, seconds=seconds)


def _died(exc: Exception) -> str:
    """What a failed task's exception says, in one line for the results store."""
    import ray

    died = tuple(getattr(ray.exceptions, name) for name in ("WorkerCrashedError", "NodeDiedError", "OutOfMemoryError")
                 if hasattr(ray.exceptions, name))
    if isinstance(exc, died):
        words = f"the Ray worker running it died twice (tried again once): {type(exc).__name__}"
    else:
        words = f"the Ray task failed: {type(exc).__name__}"
    detail = str(exc).strip().splitlines()
    return f"{words}: {detail[-1]}"[:500] if detail else words


def _finished(job: Job, eval_config) -> bool:
    """Whether the driver's cache holds the job's artifact and the results store its evaluation."""
    from edgequant.artifact import is_artifact
    from edgequant.conversion import default_artifact_dir
    from edgequant.measurement.evaluation import stored_evaluation
    from edgequant.measurement.measure import eval_config_for

    folder = default_artifact_dir(job.source.fingerprint, job.spec)
    try:
        return is_artifact(folder) and stored_evaluation(folder, eval_config_for(eval_config, job.spec)) is not None
    except EdgequantError:
        return False


def _measure_here(job: Job, eval_config):
    """A finished job answered from the caches, on the driver."""
    from edgequant.measurement.measure import measure

    return measure(job.source, job.spec, eval_config, reuse=True, max_bytes=job.max_bytes)


def _overlapping(placement: dict, others) -> list[str]:
    """The specs of other tasks that ran on the same node at the same time as `placement`'s."""
    return [o["spec"] for o in others if o is not placement and o["node"] == placement["node"]
            and o["started"] < placement["ended"] and o["ended"] > placement["started"]]


def _flag_overlaps(results: list, placements: dict[int, dict]) -> None:
    """Every row whose task shared its node with another is flagged, its evaluation recorded
    again with the flag where it was recorded before a later task's overlap was known."""
    for index, placement in placements.items():
        found = results[index]
        if found.metrics is None:
            continue
        concurrent = _overlapping(placement, placements.values())
        if concurrent != found.metrics["ray"]["concurrent"]:
            found.metrics["ray"]["concurrent"] = concurrent
            if found.artifact is not None:
                from edgequant.measurement.evaluation import record_evaluation

                record_evaluation(found.artifact, found.metrics)
        if concurrent:
            found.notes.append(f"{found.spec}: measured under Ray while node {placement['host']} also ran "
                               f"{', '.join(concurrent)}: its speed figures are not comparable with a serial run's "
                               "(--ray-whole-node keeps them apart)")


# -- connecting -------------------------------------------------------------------------------

def require_ray() -> None:
    """Refuse, naming the extra, where Ray is not installed (without importing it)."""
    from importlib.util import find_spec

    if find_spec("ray") is None:
        raise EdgequantError("--ray needs Ray, which is not installed here", INSTALL_HINT)


def connect(config: RayConfig) -> None:
    """Start the local head, or connect to the cluster at the address; a clear error if neither works."""
    require_ray()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report leaves this machine
    if config.address == LOCAL:
        # Read when ray is imported: Ray then takes 127.0.0.1 as this node's address and binds every
        # server to it (by default it binds all interfaces, whatever _node_ip_address says).
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token written to ~/.ray
        import ray

        _start_local(ray, config)
        return
    import ray

    if config.address != "auto":
        _check_reachable(config.address)
    try:
        ray.init(address=config.address, log_to_driver=False, logging_level="ERROR")
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError or its own types here
        raise EdgequantError(f"cannot connect to a Ray cluster at {config.address}: {type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400],
                             "start one (`ray start --head` on the head node), check the address, or " + ADDRESS_FIX[5:]) from None


def _start_local(ray, config: RayConfig) -> None:
    """A Ray head on this machine: every service on 127.0.0.1, no dashboard, a small object store,
    its session files under /tmp (a socket path must stay short)."""
    try:
        ray.init(address=LOCAL, num_cpus=config.local_cpus or os.cpu_count(), include_dashboard=False,
                 _node_ip_address="127.0.0.1", object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 _temp_dir=os.environ.get("RAY_TMPDIR") or f"/tmp/edgequant-ray-{os.getuid()}",
                 log_to_driver=False, logging_level="ERROR")
    except Exception as exc:
        raise EdgequantError(f"could not start a local Ray head: {type(exc).__name__}: {exc}"[:400],
                             "see the Ray logs under /tmp/edgequant-ray-*/session_latest/logs, or run without --ray") from None
    addresses = {n["NodeManagerAddress"] for n in ray.nodes()}
    if addresses != {"127.0.0.1"}:
        ray.shutdown()
        raise EdgequantError(f"the local Ray head took {', '.join(sorted(addresses))} as its address, not 127.0.0.1 "
                             "(ray was imported before edgequant could set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)",
                             "set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the environment, or use --ray local from the command line")


def _check_reachable(address: str) -> None:
    """A TCP connection to the head's port, so a wrong address fails in seconds, not after Ray's retries."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S):
            return
    except OSError as exc:
        raise EdgequantError(f"no Ray head answers at {address} ({exc.strerror or exc})",
                             "check the address: `ray status` on the head prints it; " + ADDRESS_FIX) from None


# -- the worker's side ------------------------------------------------------------------------

def _run_job(payload: dict) -> dict:
    """One job on a Ray worker: measure it without touching the results store, and say where and
    when it ran. The artifact is built in the driver's cache when this worker sees it, else in the
    worker's own and shipped back as files."""
    import ray

    started = time.time()
    shared = not payload["ship"] and _sees_driver_cache(payload)
    before = os.environ.get("EDGEQUANT_HOME")
    from edgequant.paths import cache_home

    os.environ["EDGEQUANT_HOME"] = payload["driver_home"] if shared else str(cache_home() / "ray-node")
    try:
        out = _measure_on_worker(payload, shared)
    finally:
        if before is None:
            os.environ.pop("EDGEQUANT_HOME", None)
        else:
            os.environ["EDGEQUANT_HOME"] = before
    return {**out, "shared": shared, "node": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "pid": os.getpid(), "started": started, "ended": time.time()}


def _measure_on_worker(payload: dict, shared: bool) -> dict:
    from edgequant.measurement.measure import measure
    from edgequant.registry import parse_spec

    source = _worker_source(payload, shared)
    found = measure(source, parse_spec(payload["spec"]), payload["eval"], force=payload["force"],
                    max_bytes=payload["max_bytes"], record=False)
    artifact = None if found.artifact is None else Path(found.artifact)
    return {"spec": found.spec, "status": found.status, "metrics": found.metrics, "error": found.error,
            "artifact": str(artifact) if artifact and shared else None, "seconds": found.seconds,
            "size_bytes": found.size_bytes, "notes": found.notes,
            "artifact_files": _pack(artifact) if artifact is not None and not shared else None}


def _sees_driver_cache(payload: dict) -> bool:
    probe = Path(payload["driver_home"]) / _PROBES / payload["probe"]
    try:
        return probe.read_text() == payload["token"]
    except OSError:
        return False


def _worker_source(payload: dict, shared: bool):
    """The job's source on this worker: the driver's path where it is seen, else the copy shipped
    with the job, unpacked once into this node's cache; either way the same fingerprint."""
    from edgequant.sources.source import load_source

    if payload["source"] is None:
        return load_source(None)
    path = Path(payload["source"])
    if not (shared and path.exists()):
        if not payload["source_copy"]:
            raise EdgequantError(f"this Ray node does not see the source {path}", "pass --ray with a cluster whose nodes "
                                 "share the driver's files, or let edgequant ship it (a remote address)")
        path = _unpacked_source(payload)
    source = load_source(path)
    if source.fingerprint != payload["fingerprint"]:
        raise EdgequantError(f"the source at {path} on this Ray node differs from the driver's",
                             "give every node the same model files, or a path only the driver has (it is shipped)")
    return source


def _unpacked_source(payload: dict) -> Path:
    import ray

    from edgequant.locks import build_once
    from edgequant.paths import cache_dir

    folder = cache_dir("ray-sources") / payload["fingerprint"][:16]
    done = folder / ".complete"

    def unpack() -> None:
        _unpack(ray.get(payload["source_copy"][0]), folder)
        done.write_text("ok")

    build_once(folder, done, f"unpacking the source {payload['source_name']}", unpack)
    return folder / payload["source_name"]


# -- files through the object store -----------------------------------------------------------

def _pack(path: Path) -> bytes:
    """A file or folder as an uncompressed tar (artifacts are compressed weights already)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        tar.add(path, arcname=path.name)
    return buffer.getvalue()


def _unpack(data: bytes, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(folder, filter="data")  # no absolute paths, links out or devices


def _place(job: Job, data: bytes) -> Path:
    """A shipped artifact into the driver's cache, atomically, its manifest naming the driver's source."""
    import json
    import shutil

    from edgequant.artifact import MANIFEST
    from edgequant.atomic import atomic_dir
    from edgequant.conversion import default_artifact_dir
    from edgequant.locks import building

    out = default_artifact_dir(job.source.fingerprint, job.spec)
    with building(out, f"placing {job.spec} shipped from a Ray node in {out}"), atomic_dir(out, replace=True) as tmp:
        _unpack(data, tmp / ".shipped")
        (inner,) = list((tmp / ".shipped").iterdir())
        for item in inner.iterdir():
            item.rename(tmp / item.name)
        shutil.rmtree(tmp / ".shipped")
        manifest = json.loads((tmp / MANIFEST).read_text())
        manifest["source"]["path"] = str(job.source.path)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out
