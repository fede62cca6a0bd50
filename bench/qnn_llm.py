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

    .venv/bin/python bench/qnn_llm.py [--windows 4] [--extra-specs "SPEC;SPEC"]

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
    parser.add_argument("--output", type=Path, default=HERE / "results" / "qnn_llm.json")
    args = parser.parse_args()

    import edgequant
    from edgequant.atomic import write_text_atomic
    from edgequant.evaluation import EvalConfig, machine_info
    from edgequant.source import DEFAULT_MODEL_CAVEAT

    config = EvalConfig(ctx=512, windows=args.windows, gen_tokens=GEN_TOKENS, repeats=REPEATS)
    result = {"machine": machine_info(), "caveat": DEFAULT_MODEL_CAVEAT,
              "eval": {"windows": args.windows, "gen_tokens": GEN_TOKENS, "repeats": REPEATS, "prompt_tokens": PROMPT_TOKENS},
              "load_avg_1_5_15m": {"start": [round(x, 2) for x in os.getloadavg()]}, "results": {}}
    specs = [*QNN, *REFERENCES, *filter(None, args.extra_specs.split(";"))]
    for spec in specs:
        started = time.perf_counter()
        artifact = edgequant.convert(None, spec)
        converted = time.perf_counter() - started
        m = edgequant.evaluate(artifact.path, config=config)
        details = artifact.manifest["details"]
        row = {"size_mb": round(artifact.size_bytes / 1e6, 1), "ppl_increase_pct": m["ppl_increase_pct"],
               "kld_mean": m["kld_mean"], "top1_agreement": m["top1_agreement"], "ci95": m["ci95"],
               "decode_tps": m["decode_tps"], "decode_tps_range": m["decode_tps_range"], "ttft_ms": m["ttft_ms"],
               "peak_rss_mb": m["peak_rss_mb"], "convert_s": round(converted, 1),
               "conversion_timings": details.get("timings")}
        for key in ("htp_pipeline", "htp", "decode_encodings", "weights", "kv_cache_bits", "smoothquant", "activations_16bit"):
            if details.get(key) is not None:
                row[key] = details[key] if key != "activations_16bit" else details[key]["count"]
        result["results"][spec] = row
        print(spec, json.dumps({k: row[k] for k in ("size_mb", "ppl_increase_pct", "kld_mean", "decode_tps")}), flush=True)
        if spec == "qnn:w8a16":
            result["engine_reference"] = genai_reference(artifact.path, row["decode_tps"])
    result["targets"] = targets(result["results"])
    result["load_avg_1_5_15m"]["end"] = [round(x, 2) for x in os.getloadavg()]
    write_text_atomic(args.output, json.dumps(result, indent=2))
    return 0


def genai_reference(folder: Path, ours_tps: float) -> dict:
    """Decode tok/s of the same artifact under onnxruntime-genai, same prompt length and tokens."""
    import onnxruntime_genai as og

    from edgequant.evaldata import default_eval_text

    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    prompt = list(tokenizer.encode(default_eval_text()[:4000]))[:PROMPT_TOKENS]
    rates = []
    for _ in range(REPEATS):
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=PROMPT_TOKENS + 64 + GEN_TOKENS + 1)
        generator = og.Generator(model, params)
        generator.append_tokens(prompt)
        generator.generate_next_token()  # the first token closes the prefill
        started = time.perf_counter()
        for _ in range(GEN_TOKENS):
            generator.generate_next_token()
        rates.append(GEN_TOKENS / (time.perf_counter() - started))
    median = statistics.median(rates)
    return {"engine": f"onnxruntime-genai {og.__version__} (decoder-pipeline from genai_config.json)",
            "decode_tps": round(median, 2), "decode_tps_range": [round(min(rates), 2), round(max(rates), 2)],
            "ours_over_engine": round(ours_tps / median, 3)}


def targets(rows: dict) -> dict:
    """The issue's targets, with the intervals they were judged on."""
    w4, q4km = rows.get("qnn:w4a16"), rows.get("gguf:q4_k_m")
    w8a8, fixed, kv = rows.get("qnn:w8a8"), rows.get("qnn:w8a16?graphs=fixed"), rows.get("qnn:w8a16")
    out = {}
    if w4 and q4km:
        out["w4a16_kld_within_1.5x_q4_k_m"] = {"w4a16": w4["kld_mean"], "q4_k_m": q4km["kld_mean"],
                                              "ratio": round(w4["kld_mean"] / q4km["kld_mean"], 2),
                                              "met": w4["kld_mean"] <= 1.5 * q4km["kld_mean"]}
    if w8a8:
        out["w8a8_ppl_increase_at_most_10pct"] = {"value": w8a8["ppl_increase_pct"], "ci95": w8a8["ci95"]["ppl_increase_pct"],
                                                 "met": w8a8["ppl_increase_pct"] <= 10}
    if fixed and kv:
        out["kv_decode_over_fixed"] = {"ratio": round(kv["decode_tps"] / fixed["decode_tps"], 2),
                                       "over_0.9_tps_baseline": round(kv["decode_tps"] / 0.9, 1)}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
