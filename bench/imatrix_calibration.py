"""Does the calibration text's domain matter for the importance matrix? On the default model.

Two matrices of 32768 tokens each: the default calibration text (gensim's lee_background.cor,
news prose: what `?imatrix=auto` uses) and a held-out slice of the evaluation corpus (English
Wikipedia prose from character 1,300,000 on; the evaluation windows are its first ~20,000
characters, so the two never overlap; this is llama.cpp's wiki.train / wiki.test practice). For
Q4_K_M, Q3_K_M and Q2_K: KLD without a matrix and with each, on the same 8 evaluation windows,
and the paired ratio KLD(with) / KLD(without) with block-bootstrap intervals (bench/imatrix.py's).

    .venv/bin/python bench/imatrix_calibration.py

Writes bench/results/imatrix_calibration.json (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
HELD_OUT_FROM = 1_300_000  # characters into the evaluation corpus
HELD_OUT_CHARS = 220_000  # ~50,000 tokens: enough for 64 chunks of 512
RECIPES = ("q4_k_m", "q3_k_m", "q2_k")


def main() -> int:
    import edgequant
    from edgequant.atomic import write_text_atomic
    from edgequant.measurement.evaldata import default_eval_text
    from edgequant.measurement.evaluation import EvalConfig, evaluate_with_scores, machine_info
    from edgequant.sources.importance import ImatrixConfig, compute_imatrix
    from edgequant.sources.source import DEFAULT_MODEL_CAVEAT
    from imatrix import paired_ratio

    config = EvalConfig(ctx=512, windows=8, speed=False)
    result = {"machine": machine_info(), "caveat": DEFAULT_MODEL_CAVEAT, "eval": {"windows": 8, "ctx": 512},
              "held_out": {"from_char": HELD_OUT_FROM, "chars": HELD_OUT_CHARS},
              "load_avg_1_5_15m": {"start": [round(x, 2) for x in os.getloadavg()]}, "results": {}}
    with tempfile.TemporaryDirectory(prefix="edgequant-calib-") as scratch:
        calib = Path(scratch) / "enwiki-held-out.txt"
        calib.write_text(default_eval_text()[HELD_OUT_FROM:HELD_OUT_FROM + HELD_OUT_CHARS])
        started = time.perf_counter()
        facts = compute_imatrix(ImatrixConfig(Path(scratch) / "enwiki.gguf", None, calib, 32768))
        result["held_out_imatrix_s"] = round(time.perf_counter() - started, 1)
        result["held_out_imatrix"] = {k: facts[k] for k in ("tensors", "chunks", "chunk_size")}
        for precision in RECIPES:
            plain = evaluate_with_scores(edgequant.convert(None, f"gguf:{precision}").path, config=config)
            rows = {"without": {"kld_mean": plain[0]["kld_mean"], "ci95": plain[0]["ci95"]["kld_mean"]}}
            for name, value in (("default calibration", "auto"), ("held-out enwiki", facts["output"])):
                # a scratch artifact folder: the held-out matrix's path changes every run
                artifact = edgequant.convert(None, f"gguf:{precision}?imatrix={value}", output=Path(scratch) / f"{precision}-{name[:4]}")
                metrics, scores = evaluate_with_scores(artifact.path, config=config)
                rows[name] = {"kld_mean": metrics["kld_mean"], "ci95": metrics["ci95"]["kld_mean"],
                              "ppl_increase_pct": metrics["ppl_increase_pct"], "ratio_to_without": paired_ratio(scores, plain[1])}
            result["results"][precision] = rows
            print(precision, json.dumps({k: v.get("ratio_to_without", {}).get("ratio") for k, v in rows.items()}), flush=True)
    result["load_avg_1_5_15m"]["end"] = [round(x, 2) for x in os.getloadavg()]
    write_text_atomic(HERE / "results" / "imatrix_calibration.json", json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
