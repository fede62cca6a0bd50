"""Serving benchmark for OpenVINO: edgequant's server against GenAI's own pipeline driven directly.

The server (`edgequant serve --batch 8`) decodes concurrent requests together on a
`ContinuousBatchingPipeline`; the reference is the same pipeline, built with the same scheduler
settings and threads in this process, given the same prompts through `generate`, `clients` at a
time. Both run on the tiny test Llama and on the default model (SmolLM2-135M) at openvino:int8.
Each round runs every level on both sides back to back, `--repeats` rounds; ratios are medians of
ratios within a round, so load from other jobs that comes and goes falls on both sides alike.

Writes bench/results/serve_openvino.json: total generated tokens/s per level for both, the
load average around each, and the ratios the issue asks for (server 4 clients over 1 client;
server over the pipeline at 1 client).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from serve import PROMPTS, one_request, run_level, start  # noqa: E402
from serve_helpers import free_port  # noqa: E402

LEVELS = {1: 6, 4: 3, 8: 2}  # concurrent clients -> requests per client
BATCH, CTX = 8, 2048


def direct_level(pipeline, prompt_ids: list[list[int]], clients: int, per_client: int, max_tokens: int) -> dict:
    """`per_client` rounds of `clients` prompts in one `generate` call: client c's i-th request gets
    the prompt the server benchmark gives it (`run_level`), with the server's generation settings."""
    import numpy as np
    import openvino as ov

    from edgequant.backends.openvino.runner import generation_config
    from edgequant.runner import GenerateParams

    config = generation_config(GenerateParams(max_tokens=max_tokens), max_tokens)
    tokens, started = 0, time.perf_counter()
    for i in range(per_client):
        batch = [ov.Tensor(np.asarray([prompt_ids[(c + i) % len(prompt_ids)]], dtype=np.int64)) for c in range(clients)]
        tokens += sum(len(r.m_generation_ids[0]) for r in pipeline.generate(batch, [config] * clients))
    wall = time.perf_counter() - started
    return {"clients": clients, "requests": clients * per_client, "generated_tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2)}


def bench_artifact(label: str, artifact, threads: int, max_tokens: int, repeats: int) -> dict:
    import openvino_genai as genai

    from edgequant.backends.openvino.batch import scheduler_config
    from edgequant.registry import open_runner

    assert not artifact.spec.options, "the direct pipeline sets threads only: bench a spec with no runtime options"
    with open_runner(artifact.path, n_ctx=CTX, need_logits=False) as runner:
        prompt_ids = [runner.prompt_ids(p) for p in PROMPTS]  # as the server tokenizes a completion prompt
    pipeline = genai.ContinuousBatchingPipeline(str(artifact.path), scheduler_config(BATCH, BATCH * CTX), "CPU",
                                                {"INFERENCE_NUM_THREADS": threads})
    port = free_port()
    proc = start([sys.executable, "-m", "edgequant", "serve", str(artifact.path), "--port", str(port), "--ctx", str(CTX),
                  "--threads", str(threads), "--batch", str(BATCH)], port)
    base = f"http://127.0.0.1:{port}"
    try:
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        one_request(base, model, PROMPTS[0], 8)  # warm-up, both sides
        direct_level(pipeline, prompt_ids, 1, 1, 8)
        runs = {(clients, side): [] for clients in LEVELS for side in ("direct", "server")}
        for _ in range(repeats):  # each round runs every level on both sides back to back
            for clients, per_client in LEVELS.items():
                runs[clients, "direct"].append(_loaded(lambda: direct_level(pipeline, prompt_ids, clients, per_client, max_tokens)))
                runs[clients, "server"].append(_loaded(lambda: run_level(base, model, clients, per_client, max_tokens)))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    tps = {key: [r["tokens_per_s"] for r in rs] for key, rs in runs.items()}
    return {
        "model": label, "artifact": str(artifact.path),
        "levels": [{"clients": clients, "requests_per_client": per_client,
                    **{side: max(runs[clients, side], key=lambda r: r["tokens_per_s"]) for side in ("direct", "server")},
                    "tokens_per_s_by_round": {side: tps[clients, side] for side in ("direct", "server")}}
                   for clients, per_client in LEVELS.items()],
        # Medians of ratios taken within one round (runs a few seconds apart), so a load that comes
        # and goes between rounds moves both sides of a ratio alike.
        "ratios": {
            "server_4_clients_over_1_client": _paired(tps[4, "server"], tps[1, "server"]),
            "server_8_clients_over_1_client": _paired(tps[8, "server"], tps[1, "server"]),
            "server_over_direct_at_1_client": _paired(tps[1, "server"], tps[1, "direct"]),
            "server_over_direct_at_4_clients": _paired(tps[4, "server"], tps[4, "direct"]),
            "server_over_direct_at_8_clients": _paired(tps[8, "server"], tps[8, "direct"]),
            "direct_4_over_1": _paired(tps[4, "direct"], tps[1, "direct"]),
        },
        "failed_requests": sum(r["failed"] for (_, side), rs in runs.items() if side == "server" for r in rs),
    }


def _paired(top: list[float], bottom: list[float]) -> float:
    return round(statistics.median(a / b for a, b in zip(top, bottom)), 3)


def _loaded(run) -> dict:
    """A run with the 1-minute load average before and after it (2 cores: above 2, others share them)."""
    before = os.getloadavg()[0]
    result = run()
    return {**result, "load_avg_1m_before": round(before, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2)}


def tiny_artifact():
    """The tests' tiny random Llama at openvino:int8, built and converted in a scratch cache."""
    import edgequant
    from tiny_model import build_tiny_llama

    scratch = Path(tempfile.mkdtemp(prefix="edgequant-bench-"))
    previous = os.environ.get("EDGEQUANT_HOME")
    os.environ["EDGEQUANT_HOME"] = str(scratch / "home")  # keeps the throwaway model out of the user's cache
    try:
        return edgequant.convert(build_tiny_llama(scratch), "openvino:int8")
    finally:
        if previous is None:
            del os.environ["EDGEQUANT_HOME"]
        else:
            os.environ["EDGEQUANT_HOME"] = previous


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="rounds")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "serve_openvino.json")
    args = parser.parse_args()

    import edgequant
    from edgequant.measurement.evaluation import machine_info
    from edgequant.runner import default_threads

    os.environ.setdefault("EDGEQUANT_QUIET", "1")
    threads = default_threads()
    targets = [("tiny-llama", tiny_artifact()), ("default (SmolLM2-135M)", edgequant.convert(None, "openvino:int8"))]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results = [bench_artifact(label, artifact, threads, args.max_tokens, args.repeats) for label, artifact in targets]
    report = {
        "date": started, "machine": machine_info(), "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        "settings": {"max_tokens": args.max_tokens, "greedy": True, "levels": LEVELS, "rounds": args.repeats,
                     "server": f"edgequant serve --batch {BATCH} --ctx {CTX} --threads {threads}",
                     "direct": "ContinuousBatchingPipeline.generate, same scheduler config and threads, clients prompts per call"},
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps({r["model"]: r["ratios"] for r in results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
