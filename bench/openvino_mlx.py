"""Benchmark the OpenVINO and MLX backends on the embedded default model; writes
bench/results/openvino_mlx.json.

For each spec, through the one evaluation harness on the same windows: size, perplexity, KLD,
top-1 agreement, decode tok/s and peak RSS (measured in a child process), and decode tok/s relative
to the PyTorch fp32 baseline measured in the same run. gguf:q4_k_m is measured alongside as the
reference of the quality target: the default `openvino:int4` and `mlx:4bit` must each reach a
perplexity increase at most 1.5x q4_k_m's at a size at most 1.2x q4_k_m's.

MLX runs here through mlx[cpu]: its quality figures are real, its speed is not representative of
Apple silicon (each row says so).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
REFERENCE = "gguf:q4_k_m"
DEFAULTS = ("openvino:int4", "mlx:4bit")
SPECS = [
    REFERENCE,
    "openvino:fp16", "openvino:int8", "openvino:int4",
    # the default's settings without calibration data, and every layer at int4 (both data-free: fast)
    "openvino:int4?awq=0&scale_estimation=0", "openvino:int4?ratio=1&awq=0&scale_estimation=0",
    "mlx:8bit", "mlx:6bit", "mlx:4bit",
    "mlx:4bit?grid=mlx",  # mx.quantize's own rounding, the grid the default replaced
    "mlx:4bit?embed_bits=0", "mlx:mixed_3_6", "mlx:3bit", "mlx:2bit",
]
_KEYS = ("perplexity", "ppl_increase_pct", "kld_mean", "kld_p99", "top1_agreement", "decode_tps", "prefill_tps",
         "ttft_ms", "peak_rss_mb")


def measure_spec(spec: str, config, baseline_tps: float) -> dict:
    import edgequant

    artifact = edgequant.convert(None, spec)
    metrics = edgequant.evaluate(artifact.path, config=config)
    details = artifact.manifest["details"]
    row = {"spec": spec, "size_mib": round(artifact.size_bytes / 2**20, 2), **{k: metrics.get(k) for k in _KEYS},
           "decode_speedup_vs_pytorch_fp32": round(metrics["decode_tps"] / baseline_tps, 2) if config.speed else None,
           "convert_s": artifact.manifest["timings"]["total_s"]}
    if spec.startswith("gguf:"):  # llama.cpp artifacts also keep a quantize log; the model file is the size
        row["size_mib"] = round(artifact.model_path.stat().st_size / 2**20, 2)
    if spec.startswith("openvino:"):
        row["inference_precision"] = artifact.spec.options.get("infer", details.get("inference_precision"))
        row["weight_constants"] = details.get("weight_constants")
    if spec.startswith("mlx:"):
        row["speed_representative"] = details.get("speed_representative")
    return row


def quality_target(rows: list[dict]) -> dict:
    by_spec = {r["spec"]: r for r in rows}
    ref = by_spec.get(REFERENCE)
    if ref is None:
        return {}
    result = {"reference": {"spec": REFERENCE, "ppl_increase_pct": ref["ppl_increase_pct"], "size_mib": ref["size_mib"]},
              "limits": {"ppl_increase_pct": round(1.5 * ref["ppl_increase_pct"], 3), "size_mib": round(1.2 * ref["size_mib"], 2)}}
    for spec in DEFAULTS:
        row = by_spec.get(spec)
        if row:
            ppl_ratio = row["ppl_increase_pct"] / ref["ppl_increase_pct"]
            size_ratio = row["size_mib"] / ref["size_mib"]
            result[spec] = {"ppl_increase_pct": row["ppl_increase_pct"], "size_mib": row["size_mib"],
                            "ppl_increase_ratio": round(ppl_ratio, 3), "size_ratio": round(size_ratio, 3),
                            "meets_target": ppl_ratio <= 1.5 and size_ratio <= 1.2}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", default=",".join(SPECS), help="comma-separated specs (default: the full list)")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "openvino_mlx.json")
    args = parser.parse_args()

    import edgequant
    from edgequant.measurement.evaluation import EvalConfig, machine_info

    config = EvalConfig(windows=args.windows, repeats=args.repeats, speed=not args.no_speed)
    baseline = edgequant.evaluate(None, config=config)
    rows = []
    for spec in [s.strip() for s in args.specs.split(";" if ";" in args.specs else ",") if s.strip()]:
        rows.append(measure_spec(spec, config, baseline.get("decode_tps") or 1.0))
        row = rows[-1]
        print(f"{spec:<42} {row['size_mib']:>7.1f} MiB  ppl {row['perplexity']:>8.3f} ({row['ppl_increase_pct']:+.2f}%)  "
              f"kld {row['kld_mean']:.4f}  {row['decode_tps'] or 0:>7.1f} tok/s", flush=True)
    report = {
        "model": baseline["baseline"],
        "machine": machine_info(),
        "baseline": {k: baseline.get(k) for k in ("perplexity", "decode_tps", "prefill_tps", "ttft_ms", "peak_rss_mb", "size_bytes")},
        "eval_settings": baseline["settings"],
        "notes": ["mlx runs through mlx[cpu] here: quality is real, speed is not representative of Apple silicon",
                  "openvino inference_precision 'auto' is the CPU plugin's default on this machine (bf16 where the "
                  "CPU has AVX512-BF16/AMX), which moves quality figures between machines"],
        "quality_target": quality_target(rows),
        "specs": rows,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["quality_target"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
