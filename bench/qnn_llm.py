"""QNN LLM artifacts as a Snapdragon app runs them, measured on the default model in one run.

For `qnn:w4a16`, `qnn:w8a16` and `qnn:w8a8` (prompt + decode graphs with an 8-bit KV cache, the
defaults): size, ppl increase and KLD with 95% intervals, decode tok/s on ONNX Runtime's CPU
execution provider with its range, the HTP simulator's prefill + decode check recorded at
conversion, and the conversion time. In the same run, the references the targets name:
`gguf:q4_k_m` (qnn:w4a16's KLD should be within 1.5x of it), the fixed-window `qnn:w8a16?graphs=fixed`
(decode speed before the KV cache), and `onnx:int8-static` before (`smooth=0`) and after SmoothQuant.

Engine reference: the w8a16 artifact also runs under onnxruntime-genai (its genai_config.json,
the engine's own pipeline API) with the same prompt and token count; our runner's decode speed is
reported as a ratio to it.

    .venv/bin/python bench/qnn_llm.py [--windows 4] [--extra-specs "SPEC;SPEC"] [--only "SPEC;SPEC" --merge]
                                      [--model FOLDER --output JSON]

Writes bench/results/qnn_llm.json (cold: ~6 minutes per qnn conversion on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
QNN = ("qnn:w4a16", "qnn:w8a16", "qnn:w8a8")
REFERENCES = ("gguf:q4_k_m", "qnn:w8a16?graphs=fixed", "onnx:int8-static?smooth=0", "onnx:int8-static")
PROMPT_TOKENS, GEN_TOKENS, REPEATS = 128, 16, 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows of 512 tokens")
    parser.add_argument("--extra-specs", default="", help="semicolon-separated specs measured too (e.g. a mixed-precision w4a16)")
    parser.add_argument("--only", default="", help="semicolon-separated specs to measure instead of the default list")
    parser.add_argument("--merge", action="store_true", help="update those rows of an existing --output (marked remeasured)")
    parser.add_argument("--reuse", action="store_true", help="take evaluations the artifacts' manifests already hold "
                        "for these settings (marked cached) instead of measuring again")
    parser.add_argument("--model", default=None, help="a model folder instead of the default model (e.g. the dithered "
                        "float stand-in bench/dithered_model.py writes)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "qnn_llm.json")
    args = parser.parse_args()

    import edgequant
    from edgequant.atomic import write_text_atomic
    from edgequant.measurement.evaluation import EvalConfig, machine_info
    from edgequant.sources.source import DEFAULT_MODEL_CAVEAT

    config = EvalConfig(ctx=512, windows=args.windows, gen_tokens=GEN_TOKENS, repeats=REPEATS)
    result = {"machine": machine_info(), "model": args.model or "default",
              "caveat": DEFAULT_MODEL_CAVEAT if args.model is None else "see the model folder",
              "eval": {"windows": args.windows, "gen_tokens": GEN_TOKENS, "repeats": REPEATS, "prompt_tokens": PROMPT_TOKENS},
              "load_avg_1_5_15m": {"start": [round(x, 2) for x in os.getloadavg()]}, "results": {}}
    specs = list(filter(None, args.only.split(";"))) or [*QNN, *REFERENCES, *filter(None, args.extra_specs.split(";"))]
    if args.merge:  # keep the earlier run and say which rows came later
        earlier = json.loads(args.output.read_text())
        earlier.setdefault("remeasured", []).append({"specs": specs, "machine": result["machine"],
                                                     "load_avg_1_5_15m_start": result["load_avg_1_5_15m"]["start"]})
        result = earlier
    for spec in specs:
        started = time.perf_counter()
        artifact = edgequant.convert(args.model, spec)
        converted = time.perf_counter() - started
        m = edgequant.evaluate(artifact.path, config=config, reuse=args.reuse)
        details = artifact.manifest["details"]
        row = {"size_mb": round(artifact.size_bytes / 1e6, 1), "ppl_increase_pct": m["ppl_increase_pct"],
               "kld_mean": m["kld_mean"], "top1_agreement": m["top1_agreement"], "ci95": m["ci95"],
               "decode_tps": m["decode_tps"], "decode_tps_range": m["decode_tps_range"], "ttft_ms": m["ttft_ms"],
               "peak_rss_mb": m["peak_rss_mb"], "convert_s": round(converted, 1),
               "conversion_timings": details.get("timings"), "cached_evaluation": bool(m.get("cached"))}
        for key in ("htp_pipeline", "htp", "decode_encodings", "weights", "kv_cache_bits", "smoothquant", "weights_int8"):
            if details.get(key) is not None:
                row[key] = details[key]
        if details.get("activations_16bit") is not None:  # the counts; the manifest has the names
            row["activations_16bit"] = details["activations_16bit"]["count"]
            row["activations_8bit"] = details["activations_16bit"].get("count_8bit")
        if args.merge and spec in result["results"]:  # what the earlier run measured, kept beside the new row
            row["previous"] = {k: result["results"][spec][k] for k in ("ppl_increase_pct", "kld_mean", "ci95", "decode_tps")}
        result["results"][spec] = row
        print(spec, json.dumps({k: row[k] for k in ("size_mb", "ppl_increase_pct", "kld_mean", "decode_tps")}), flush=True)
        if spec == "qnn:w8a16":
            result["engine_reference"] = genai_reference(artifact.path)
    result["targets"] = targets(result["results"])
    (result["remeasured"][-1] if args.merge else result["load_avg_1_5_15m"])["end"] = [round(x, 2) for x in os.getloadavg()]
    write_text_atomic(args.output, json.dumps(result, indent=2))
    return 0


def genai_reference(folder: Path) -> dict:
    """Decode tok/s of the same artifact under onnxruntime-genai (the engine's own pipeline API)
    and under edgequant's runner, back to back with the same loop: a prompt of PROMPT_TOKENS, one
    token to close the prefill, then GEN_TOKENS timed, median of REPEATS."""
    import onnxruntime_genai as og

    from edgequant.measurement.evaldata import default_eval_text
    from edgequant.registry import open_runner
    from edgequant.runner import GenerateParams

    model = og.Model(str(folder))
    prompt = list(og.Tokenizer(model).encode(default_eval_text()[:4000]))[:PROMPT_TOKENS]

    def genai_once() -> float:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=PROMPT_TOKENS + 64 + GEN_TOKENS + 1)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        generator.generate_next_token()
        started = time.perf_counter()
        for _ in range(GEN_TOKENS):
            generator.generate_next_token()
        return GEN_TOKENS / (time.perf_counter() - started)

    def ours_once(runner) -> float:
        tokens = runner.generate(prompt, GenerateParams(max_tokens=GEN_TOKENS + 1, temperature=0.0, stop_at_eos=False))
        next(tokens)
        started = time.perf_counter()
        count = sum(1 for _ in tokens)
        return count / (time.perf_counter() - started)

    with open_runner(folder, n_ctx=1024, need_logits=False) as runner:
        ours = [ours_once(runner) for _ in range(REPEATS)]
    engine = [genai_once() for _ in range(REPEATS)]
    return {"engine": f"onnxruntime-genai {og.__version__} (decoder-pipeline from genai_config.json)",
            "engine_decode_tps": round(statistics.median(engine), 2), "engine_range": [round(min(engine), 2), round(max(engine), 2)],
            "ours_decode_tps": round(statistics.median(ours), 2), "ours_range": [round(min(ours), 2), round(max(ours), 2)],
            "ours_over_engine": round(statistics.median(ours) / statistics.median(engine), 3)}


def targets(rows: dict) -> dict:
    """The issue's targets, with the intervals they were judged on."""
    w4, q4km = rows.get("qnn:w4a16"), rows.get("gguf:q4_k_m")
    w8a8, fixed, kv = rows.get("qnn:w8a8"), rows.get("qnn:w8a16?graphs=fixed"), rows.get("qnn:w8a16")
    out = {}
    if w4 and q4km:
        limit = [round(1.5 * x, 5) for x in q4km["ci95"]["kld_mean"]]
        out["w4a16_kld_within_1.5x_q4_k_m"] = {"w4a16": w4["kld_mean"], "w4a16_ci95": w4["ci95"]["kld_mean"],
                                              "q4_k_m": q4km["kld_mean"], "limit_ci95": limit,
                                              "ratio": round(w4["kld_mean"] / q4km["kld_mean"], 2),
                                              "met": w4["kld_mean"] <= 1.5 * q4km["kld_mean"],
                                              "verdict": _verdict(w4["ci95"]["kld_mean"], limit)}
    if w8a8:
        ci = w8a8["ci95"]["ppl_increase_pct"]
        out["w8a8_ppl_increase_at_most_10pct"] = {"value": w8a8["ppl_increase_pct"], "ci95": ci,
                                                 "met": w8a8["ppl_increase_pct"] <= 10, "verdict": _verdict(ci, [10, 10])}
    if fixed and kv:
        out["kv_decode_over_fixed"] = {"ratio": round(kv["decode_tps"] / fixed["decode_tps"], 2),
                                       "over_0.9_tps_baseline": round(kv["decode_tps"] / 0.9, 1)}
    return out


def _verdict(value_ci: list[float], limit_ci: list[float]) -> str:
    """Whether a figure that should stay at or below a limit does, judged on both intervals."""
    from edgequant.measurement.intervals import compare

    return {"lower": "met: the whole interval lies below the limit's",
            "higher": "not met: the whole interval lies above the limit's",
            "not distinguishable": "not distinguishable: the intervals overlap"}[compare(value_ci, limit_ci)]


if __name__ == "__main__":
    raise SystemExit(main())
