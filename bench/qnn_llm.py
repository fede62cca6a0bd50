"""QNN as an LLM app runs it: the fixed-window graph against prompt + decode graphs with a KV cache.

On the default model, for each precision given: `qnn:P` (one 512-token graph, every generated
token re-runs the window) and `qnn:P?graphs=kv` (a 64-token prompt graph and a one-token decode
graph at context 1024), evaluated in the same run on the same windows and with the same speed
probe (a 128-token prompt, 16 generated tokens, median of 3 runs, on ONNX Runtime's CPU
execution provider): size, ppl increase and KLD with 95% intervals, decode tok/s with its range,
and the kv/fixed decode ratio. The HTP simulator's agreement recorded at conversion is copied in.

    .venv/bin/python bench/qnn_llm.py [--precisions w8a16] [--windows 2]

Writes bench/results/qnn_llm.json (a cold conversion takes ~6 minutes per graph pair on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", default="w8a16", help="comma-separated: w8a16, w4a16, w8a8")
    parser.add_argument("--windows", type=int, default=2, help="evaluation windows of 512 tokens")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "qnn_llm.json")
    args = parser.parse_args()

    import edgequant
    from edgequant.atomic import write_text_atomic
    from edgequant.evaluation import EvalConfig, machine_info
    from edgequant.source import DEFAULT_MODEL_CAVEAT

    config = EvalConfig(ctx=512, windows=args.windows, gen_tokens=16, repeats=3)
    result = {"machine": machine_info(), "caveat": DEFAULT_MODEL_CAVEAT, "eval": {"windows": args.windows, "gen_tokens": 16,
              "repeats": 3, "prompt_tokens": 128}, "load_avg_1_5_15m": {"start": [round(x, 2) for x in os.getloadavg()]},
              "results": {}}
    for precision in args.precisions.split(","):
        rows = {}
        for label, spec in (("fixed", f"qnn:{precision}"), ("kv", f"qnn:{precision}?graphs=kv")):
            artifact = edgequant.convert(None, spec)
            m = edgequant.evaluate(artifact.path, config=config)
            details = artifact.manifest["details"]
            rows[label] = {"spec": spec, "size_mb": round(artifact.size_bytes / 1e6, 1), "ppl_increase_pct": m["ppl_increase_pct"],
                           "kld_mean": m["kld_mean"], "top1_agreement": m["top1_agreement"], "ci95": m["ci95"],
                           "decode_tps": m["decode_tps"], "decode_tps_range": m["decode_tps_range"], "ttft_ms": m["ttft_ms"],
                           "peak_rss_mb": m["peak_rss_mb"], "htp": details.get("htp_graphs") or details.get("htp"),
                           "decode_encodings": details.get("decode_encodings")}
        rows["kv_over_fixed_decode"] = round(rows["kv"]["decode_tps"] / rows["fixed"]["decode_tps"], 2)
        result["results"][precision] = rows
        print(precision, json.dumps({k: rows[k]["decode_tps"] for k in ("fixed", "kv")}), rows["kv_over_fixed_decode"], flush=True)
    result["load_avg_1_5_15m"]["end"] = [round(x, 2) for x in os.getloadavg()]
    write_text_atomic(args.output, json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
