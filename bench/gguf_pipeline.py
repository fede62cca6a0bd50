"""Benchmark the GGUF pipeline on the embedded default model; writes bench/results/gguf_pipeline.json.

Two parts, measured in the same run:
1. Cost of edgequant's convert + quantize against the raw engines doing the same work (llama.cpp's
   converter script, then `llama_model_quantize` for each type in one process): wall time and
   peak RSS, each pipeline started from a small launcher (bench/_measure.py), alternated, best of
   `--rounds`.
2. For each precision: size, bits per weight, perplexity, KLD, top-1 agreement and decode tok/s
   through the evaluation harness, plus the PyTorch fp32 baseline's speed for ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPECS = ["f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "iq4_xs", "q3_k_m", "q2_k", "tq1_0"]
FTYPES = {"f16": 1, "q8_0": 7, "q6_k": 18, "q5_k_m": 17, "q4_k_m": 15, "q4_0": 2, "iq4_xs": 30, "q3_k_m": 12, "q2_k": 10, "tq1_0": 36}

RAW_QUANTIZE = """
import ctypes, sys, llama_cpp
src, out_dir, *pairs = sys.argv[1:]
for pair in pairs:
    name, ftype = pair.split("=")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = int(ftype), 2
    assert llama_cpp.llama_model_quantize(src.encode(), f"{out_dir}/{name}.gguf".encode(), ctypes.byref(params)) == 0
"""


def measure(command: list[str], env: dict) -> dict:
    out = subprocess.run([sys.executable, str(HERE / "_measure.py"), *command], capture_output=True, text=True, env=env, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["returncode"] != 0:
        raise RuntimeError(f"{command[:3]} failed: {result['stderr_tail']}")
    return result


def raw_pipeline(source_dir: Path, converter: Path, work: Path, env: dict) -> dict:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    f32 = work / "model-f32.gguf"
    convert = measure([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(source_dir),
                       "--outfile", str(f32), "--outtype", "f32"], env)
    script = work / "quantize.py"
    script.write_text(RAW_QUANTIZE)
    quantize = measure([sys.executable, str(script), str(f32), str(work), *[f"{s}={FTYPES[s]}" for s in SPECS]], env)
    return {"wall_s": round(convert["wall_s"] + quantize["wall_s"], 3), "peak_rss_mb": max(convert["peak_rss_mb"], quantize["peak_rss_mb"]),
            "convert": convert, "quantize": quantize}


def edgequant_pipeline(home: Path, out: Path, env: dict) -> dict:
    for stale in (home / "intermediates", out):
        shutil.rmtree(stale, ignore_errors=True)
    specs = ",".join(f"gguf:{s}" for s in SPECS)
    return measure([sys.executable, "-m", "edgequant", "convert", "--to", specs, "-o", str(out)], env)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "gguf_pipeline.json")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="eq-bench-"))
    env = {**os.environ, "EDGEQUANT_HOME": str(home), "EDGEQUANT_QUIET": "1", "TRANSFORMERS_VERBOSITY": "error"}
    os.environ.update(env)
    import edgequant
    from edgequant.backends.gguf.tools import converter_dir
    from edgequant.measurement.evaluation import EvalConfig, machine_info

    source = edgequant.load_source()
    source_dir, converter = source.hf_dir, converter_dir()  # import and tool fetch are not timed
    rounds = {"raw": [], "edgequant": []}
    for _ in range(args.rounds):
        rounds["raw"].append(raw_pipeline(source_dir, converter, home / "raw", env))
        rounds["edgequant"].append(edgequant_pipeline(home, home / "eq", env))
    best = {k: {"wall_s": min(r["wall_s"] for r in v), "peak_rss_mb": min(r["peak_rss_mb"] for r in v)} for k, v in rounds.items()}
    f16_mb = (home / "eq" / "gguf-f16" / "model.gguf").stat().st_size / 2**20

    config = EvalConfig(windows=args.windows)
    baseline = edgequant.evaluate(None, config=config)
    params = edgequant.inspect_model()["parameters"]
    rows = []
    for spec in SPECS:
        artifact = edgequant.open_artifact(home / "eq" / f"gguf-{spec}")
        m = edgequant.evaluate(artifact.path, config=config)
        rows.append({"spec": f"gguf:{spec}", "size_mb": round(artifact.model_path.stat().st_size / 2**20, 2),
                     "bits_per_weight": round(artifact.model_path.stat().st_size * 8 / params, 3),
                     **{k: m[k] for k in ("perplexity", "ppl_increase_pct", "kld_mean", "kld_p99", "top1_agreement",
                                          "decode_tps", "prefill_tps", "ttft_ms", "peak_rss_mb")},
                     "decode_speedup_vs_pytorch_fp32": round(m["decode_tps"] / baseline["decode_tps"], 2)})
    report = {
        "model": str(source.path),
        "machine": machine_info(),
        "pipeline": {
            "specs": SPECS, "rounds": rounds, "best": best,
            "wall_ratio_edgequant_over_raw": round(best["edgequant"]["wall_s"] / best["raw"]["wall_s"], 3),
            "peak_rss_ratio_edgequant_over_raw": round(best["edgequant"]["peak_rss_mb"] / best["raw"]["peak_rss_mb"], 3),
            "f16_size_mb": round(f16_mb, 1),
            "peak_rss_over_f16_size": {k: round(v["peak_rss_mb"] / f16_mb, 3) for k, v in best.items()},
        },
        "baseline": {k: baseline[k] for k in ("perplexity", "decode_tps", "prefill_tps", "ttft_ms", "peak_rss_mb", "size_bytes")},
        "eval_settings": baseline["settings"],
        "precisions": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(report["pipeline"]["best"]), report["pipeline"]["wall_ratio_edgequant_over_raw"])
    for row in rows:
        print(f"{row['spec']:<12} {row['size_mb']:>7.1f} MB {row['bits_per_weight']:>6.2f} bpw  ppl {row['perplexity']:>8.3f} "
              f"({row['ppl_increase_pct']:+.2f}%)  kld {row['kld_mean']:.4f}  {row['decode_tps']:>7.1f} tok/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
