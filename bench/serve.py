"""Serving benchmark: edgequant's server against llama.cpp's own (`python -m llama_cpp.server`).

Both serve the same GGUF file (the default model at q4_k_m) on 127.0.0.1 in turn, and the same
bounded load is sent to each: 1, 4 and 16 concurrent clients, each sending a fixed number of
greedy completion requests. Writes bench/results/serve.json: generated tokens/s and p50/p95/p99
request latency per level, failures, and the ratios the issue asks for.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from serve_helpers import free_port  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper who",
    "Explain to a child how rain forms in the clouds and",
    "The history of the printing press began when",
    "List the reasons why people enjoy walking in forests, because",
]
LEVELS = {1: 8, 4: 4, 16: 2}  # concurrent clients -> requests per client


def start(command: list[str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "EDGEQUANT_QUIET": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{command[:4]} did not start")


def one_request(base: str, model: str, prompt: str, max_tokens: int) -> dict:
    started = time.perf_counter()
    try:
        response = httpx.post(f"{base}/v1/completions", timeout=300,
                              json={"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
    except httpx.HTTPError as exc:
        return {"ok": False, "error": type(exc).__name__, "latency_s": time.perf_counter() - started}
    latency = time.perf_counter() - started
    if response.status_code != 200:
        return {"ok": False, "error": str(response.status_code), "latency_s": latency}
    return {"ok": True, "tokens": response.json()["usage"]["completion_tokens"], "latency_s": latency}


def run_level(base: str, model: str, clients: int, per_client: int, max_tokens: int) -> dict:
    def client(index: int) -> list[dict]:
        return [one_request(base, model, PROMPTS[(index + i) % len(PROMPTS)], max_tokens) for i in range(per_client)]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for batch in pool.map(client, range(clients)) for r in batch]
    wall = time.perf_counter() - started
    latencies = sorted(r["latency_s"] for r in results if r["ok"])
    tokens = sum(r.get("tokens", 0) for r in results)

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 3) if latencies else None

    return {"clients": clients, "requests": len(results), "failed": sum(not r["ok"] for r in results),
            "errors": sorted({r["error"] for r in results if not r["ok"]}), "generated_tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "latency_p50_s": pct(0.5), "latency_p95_s": pct(0.95), "latency_p99_s": pct(0.99),
            "latency_mean_s": round(statistics.mean(latencies), 3) if latencies else None}


def bench_server(name: str, command: list[str], port: int, max_tokens: int) -> dict:
    proc = start(command, port)
    base = f"http://127.0.0.1:{port}"
    try:
        model = httpx.get(f"{base}/v1/models").json()["data"][0]["id"]
        one_request(base, model, PROMPTS[0], 8)  # warm-up
        return {"server": name, "levels": [run_level(base, model, c, n, max_tokens) for c, n in LEVELS.items()]}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "serve.json")
    args = parser.parse_args()

    import edgequant
    from edgequant.measurement.evaluation import machine_info
    from edgequant.runner import default_threads

    artifact = edgequant.convert(None, "gguf:q4_k_m")
    threads = str(default_threads())
    port = free_port()
    ours = bench_server("edgequant", [sys.executable, "-m", "edgequant", "serve", str(artifact.path), "--port", str(port),
                                      "--ctx", "2048", "--threads", threads], port, args.max_tokens)
    port = free_port()
    theirs = bench_server("llama_cpp.server", [sys.executable, "-m", "llama_cpp.server", "--model", str(artifact.model_path),
                                               "--port", str(port), "--host", "127.0.0.1", "--n_ctx", "2048",
                                               "--n_threads", threads], port, args.max_tokens)
    tps = {s["server"]: {lvl["clients"]: lvl["tokens_per_s"] for lvl in s["levels"]} for s in (ours, theirs)}
    report = {
        "artifact": str(artifact.path), "machine": machine_info(), "max_tokens": args.max_tokens,
        "results": [ours, theirs],
        "ratios": {
            "ours_over_llama_cpp_server_at_1_client": round(tps["edgequant"][1] / tps["llama_cpp.server"][1], 3),
            "ours_4_clients_over_ours_1_client": round(tps["edgequant"][4] / tps["edgequant"][1], 3),
            "ours_16_clients_over_ours_1_client": round(tps["edgequant"][16] / tps["edgequant"][1], 3),
            "llama_cpp_server_4_over_1": round(tps["llama_cpp.server"][4] / tps["llama_cpp.server"][1], 3),
        },
        "failed_requests": {s["server"]: sum(lvl["failed"] for lvl in s["levels"]) for s in (ours, theirs)},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps({"tokens_per_s": tps, "ratios": report["ratios"], "failed": report["failed_requests"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
