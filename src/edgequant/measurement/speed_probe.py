"""Speed and memory of one runner, measured in a fresh child process.

Peak RSS only means something for a process that loaded nothing else, so the evaluation harness
runs this module as `python -m edgequant.measurement.speed_probe` with a JSON request on stdin and reads one
JSON line back. The timed path is the runner's `generate`, the same one the server uses.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SpeedRequest:
    target: str | None  # artifact folder or source model (None: default model)
    # One prompt for the warm-up, then one per timed run, all different: engines that keep the
    # last prompt's KV cache and reuse a matching prefix (OpenVINO GenAI's prefix caching,
    # llama-cpp-python) would otherwise skip the prefill and report a time to first token of ms.
    prompts: list[list[int]]
    gen_tokens: int = 64
    repeats: int = 3
    threads: int = 0
    n_ctx: int = 512


def measure(request: SpeedRequest) -> dict:
    from edgequant.registry import open_runner
    from edgequant.runner import GenerateParams

    rss_before = _peak_rss_mb()
    started = time.perf_counter()
    runner = open_runner(request.target, n_ctx=request.n_ctx, need_logits=False, threads=request.threads)
    load_s = time.perf_counter() - started
    params = GenerateParams(max_tokens=request.gen_tokens, stop_at_eos=False)
    _timed_generate(runner, request.prompts[0], GenerateParams(max_tokens=4, stop_at_eos=False))  # warm-up
    runs = [_timed_generate(runner, request.prompts[1 + i % (len(request.prompts) - 1)], params)
            for i in range(request.repeats)]
    runner.close()
    peak = _peak_rss_mb()
    return {
        "load_s": round(load_s, 3),
        **_spread("ttft_ms", [r["ttft_s"] * 1000 for r in runs]),
        **_spread("prefill_tps", [r["prefill_tps"] for r in runs]),
        **_spread("decode_tps", [r["decode_tps"] for r in runs]),
        "peak_rss_mb": round(peak, 1),
        # The interpreter with edgequant's light modules, before the engine loads: peak minus it is
        # what the model and its engine cost.
        "interpreter_rss_mb": round(rss_before, 1),
        "model_rss_mb": round(peak - rss_before, 1),
        "prompt_tokens": len(request.prompts[-1]),
        "generated_tokens": request.gen_tokens,
        "repeats": request.repeats,
        # Should stay empty for every format but the PyTorch baseline: their memory is not the model's.
        "probe_imported": [m for m in ("torch", "transformers") if m in sys.modules],
    }


@dataclass(frozen=True)
class TaskSpeedRequest:
    """Speed of a model of another task: latency per input at batch 1, throughput at batch 1 and 8."""

    target: str | None
    inputs_file: str  # what `measurement.taskdata.load_inputs` reads: texts (.json) or images (.npy)
    repeats: int = 3
    threads: int = 0
    single: int = 32  # inputs timed one at a time
    batched: int = 64  # inputs timed in batches of BATCH


BATCH = 8


def measure_task(request: TaskSpeedRequest) -> dict:
    from edgequant.measurement.taskdata import load_inputs
    from edgequant.registry import open_task_runner

    inputs = load_inputs(request.inputs_file)
    rss_before = _peak_rss_mb()
    started = time.perf_counter()
    runner = open_task_runner(request.target, threads=request.threads)
    load_s = time.perf_counter() - started
    runner.run(inputs[:BATCH])  # warm-up: first-call allocations and kernel choices
    latencies, single_rates, batch_rates = [], [], []
    for _ in range(request.repeats):
        times = [_timed(runner.run, inputs[i % len(inputs):i % len(inputs) + 1]) for i in range(request.single)]
        latencies += times
        single_rates.append(len(times) / sum(times))
        batches = [inputs[(i * BATCH) % len(inputs):][:BATCH] for i in range(request.batched // BATCH)]
        batch_rates.append(sum(len(b) for b in batches) / sum(_timed(runner.run, b) for b in batches))
    runner.close()
    peak = _peak_rss_mb()
    return {
        "load_s": round(load_s, 3),
        "latency_p50_ms": round(1000 * statistics.median(latencies), 3),
        "latency_p95_ms": round(1000 * _percentile(latencies, 95), 3),
        **_spread("inputs_per_s_b1", single_rates),
        **_spread("inputs_per_s_b8", batch_rates),
        "peak_rss_mb": round(peak, 1),
        "interpreter_rss_mb": round(rss_before, 1),
        "model_rss_mb": round(peak - rss_before, 1),
        "repeats": request.repeats,
        "probe_imported": [m for m in ("torch", "transformers") if m in sys.modules],
    }


def _timed(call, batch) -> float:
    start = time.perf_counter()
    call(batch)
    return time.perf_counter() - start


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _spread(name: str, values: list[float]) -> dict:
    """The median of the repeats, and their [min, max]."""
    return {name: round(statistics.median(values), 2), f"{name}_range": [round(min(values), 2), round(max(values), 2)]}


def _timed_generate(runner, prompt_ids, params) -> dict:
    start = time.perf_counter()
    stamps = [time.perf_counter() for _ in runner.generate(prompt_ids, params)]
    first = stamps[0] - start
    decode_s = stamps[-1] - stamps[0]
    return {
        "ttft_s": first,
        "prefill_tps": len(prompt_ids) / first,
        "decode_tps": (len(stamps) - 1) / decode_s if decode_s > 0 else 0.0,
    }


def _peak_rss_mb() -> float:
    """Peak RSS of this process image. getrusage's ru_maxrss would be wrong here: Linux carries
    the parent's peak across fork and exec, while /proc's VmHWM starts afresh at exec."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_in_child(request: SpeedRequest | TaskSpeedRequest) -> dict:
    import os

    from edgequant import children
    from edgequant.errors import EdgequantError

    env = {**os.environ, "EDGEQUANT_QUIET": "1"}
    payload = {"kind": type(request).__name__, **asdict(request)}
    result = children.run([sys.executable, "-m", "edgequant.measurement.speed_probe"], input=json.dumps(payload),
                          capture_output=True, text=True, env=env)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise EdgequantError(f"the speed probe failed:\n{result.stderr.strip()[-800:]}", "see the error above")
    return json.loads(lines[-1])


def main() -> int:
    from edgequant.errors import EdgequantError

    payload = json.loads(sys.stdin.read())
    kind = payload.pop("kind")
    try:
        found = measure_task(TaskSpeedRequest(**payload)) if kind == "TaskSpeedRequest" else measure(SpeedRequest(**payload))
        print(json.dumps(found), flush=True)
    except EdgequantError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
