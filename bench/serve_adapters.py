"""One base, many adapters: what serving two `gguf:q4_k_m?lora=separate` artifacts of the default
model from one loaded base saves in memory and costs in speed.

- memory: the resident set of one `edgequant serve a=A b=B` (one base, both adapters) against the
  sum of two servers, one per artifact, each after the same warm-up request;
- speed: 4 clients streaming greedy completions (bench/serve.py's load and prompts) to the shared
  server, every request naming adapter a ("one adapter"), or clients alternating a and b ("mixed":
  GGUF decodes both within a step, one `llama_decode` per adapter), and the same load on the plain
  base artifact served alone ("no adapter"). Paired per round, the order rotating by round.

The adapters are random (rank 8 on every projection, seeds 1 and 2): what they cost does not depend
on what they learned.

    .venv/bin/python bench/serve_adapters.py [--rounds 3]   # writes bench/results/serve_adapters.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import serve as bench_serve  # noqa: E402

SPEC, CLIENTS, PER_CLIENT, MAX_TOKENS = "gguf:q4_k_m", 4, 3, 64
MODULES = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
           "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
           "mlp.down_proj": (576, 1536)}  # SmolLM2-135M's projections (out, in), 30 layers


def random_adapter(out: Path, seed: int, rank: int = 8) -> Path:
    """A PEFT LoRA folder with random A and B on every projection of every layer."""
    from safetensors.numpy import save_file

    rng, tensors = np.random.default_rng(seed), {}
    for layer in range(30):
        for module, (rows, cols) in MODULES.items():
            name = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{name}.lora_A.weight"] = rng.normal(0, 0.02, (rank, cols)).astype(np.float32)
            tensors[f"{name}.lora_B.weight"] = rng.normal(0, 0.02, (rows, rank)).astype(np.float32)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "task_type": "CAUSAL_LM",
        "target_modules": sorted({m.rsplit(".", 1)[-1] for m in MODULES})}))
    return out


class Server(bench_serve.HttpSide):
    """`edgequant serve NAME=FOLDER ...`, each served name warmed up."""

    def __init__(self, *models: str):
        port = bench_serve.free_port()
        super().__init__([sys.executable, "-m", "edgequant", "serve", *models, "--port", str(port),
                          "--batch", "4", "--ctx", "2048", "--max-tokens-cap", str(MAX_TOKENS)], port)
        for name in [m.split("=")[0] for m in models]:
            bench_serve.streamed_request(self.base, name, bench_serve.PROMPTS[0], 8)  # warm-up, every adapter

    def rss_mb(self) -> float:
        process = psutil.Process(self.proc.pid)
        return round(sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20, 1)

    def tokens_per_s(self, names: list[str]) -> float:
        """CLIENTS clients, client i naming names[i % len(names)], PER_CLIENT requests each."""
        import time

        def client(i: int) -> int:
            return sum(bench_serve.streamed_request(self.base, names[i % len(names)],
                                                    bench_serve.PROMPTS[(i + j) % len(bench_serve.PROMPTS)], MAX_TOKENS)["tokens"]
                       for j in range(PER_CLIENT))

        started = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            tokens = sum(pool.map(client, range(CLIENTS)))
        return round(tokens / (time.perf_counter() - started), 2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "serve_adapters.json")
    args = parser.parse_args()

    import edgequant
    from edgequant.adaptation.merge import adapted_model
    from edgequant.measurement.evaluation import machine_info

    with tempfile.TemporaryDirectory(prefix="serve-adapters-") as tmp:
        artifacts = {name: edgequant.convert(adapted_model(None, random_adapter(Path(tmp) / name, seed)), f"{SPEC}?lora=separate")
                     for name, seed in (("a", 1), ("b", 2))}
    base = edgequant.convert(None, SPEC)
    shared = Server(*(f"{name}={a.path}" for name, a in artifacts.items()))
    memory = {"one_server_both_adapters_mb": shared.rss_mb()}
    alone = [Server(f"{name}={a.path}") for name, a in artifacts.items()]
    memory["two_servers_one_adapter_each_mb"] = round(sum(s.rss_mb() for s in alone), 1)
    for s in alone:
        s.close()
    plain = Server(f"base={base.path}")
    loads = {"one adapter": (shared, ["a"]), "mixed": (shared, ["a", "b"]), "no adapter": (plain, ["base"])}
    runs: dict[str, list[float]] = {name: [] for name in loads}
    order = list(loads)
    for round_ in range(args.rounds):
        for name in order[round_ % len(order):] + order[:round_ % len(order)]:
            server, names = loads[name]
            runs[name].append(server.tokens_per_s(names))
    shared.close()
    plain.close()
    ratio = lambda top, bottom: [round(a / b, 3) for a, b in zip(runs[top], runs[bottom])]  # noqa: E731
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "edgequant": edgequant.__version__,
        "machine": machine_info(), "spec": f"{SPEC}?lora=separate", "model": "default (SmolLM2-135M-Instruct)",
        "adapters": "two random rank-8 adapters on every projection (seeds 1, 2)",
        "load": {"clients": CLIENTS, "requests_per_client": PER_CLIENT, "max_tokens": MAX_TOKENS, "greedy": True, "stream": True,
                 "server": "edgequant serve --batch 4 --ctx 2048"},
        "memory": memory, "tokens_per_s": runs,
        "ratios": {"mixed_over_one_adapter": ratio("mixed", "one adapter"),
                   "one_adapter_over_no_adapter": ratio("one adapter", "no adapter")},
        "medians": {k: round(statistics.median(v), 2) for k, v in runs.items()},
    }
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("memory", "medians", "ratios")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
