"""Do edgequant's per-format defaults hold on weights that sit on no quantization grid?

The default model's weights were dequantized from a Q4_1 GGUF, so a 4-bit min/max grid over
blocks of 32 reproduces them exactly and any default tuned on it looks better than it is. This
script checks each default chosen there against the engine's own default on float weights:

1. weight reconstruction error (relative RMS) of MLX's min/max grid (edgequant's default) and of
   mx.quantize's own rounding, on random-normal and heavy-tailed (Student-t, 3 degrees of freedom)
   matrices, plus the default model's real weights for contrast;
2. KLD to the PyTorch baseline on tiny random Llama and Qwen2 models (float weights, no grid) for
   MLX 4-bit (grid=minmax vs grid=mlx), ONNX int4 (HQQ vs the builder's rtn and k_quant) and
   OpenVINO int4 (edgequant's AWQ + ratio 0.4 + group 32 vs NNCF's data-free group-128 all-int4).

Writes bench/results/float_defaults.json. Every figure of a table comes from the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tiny model builders the tests use

PAIRS = {  # format -> (edgequant's default, the engine's own default)
    "mlx": ("mlx:4bit", "mlx:4bit?grid=mlx"),
    "onnx": ("onnx:int4", "onnx:int4?algo=rtn"),
    "onnx_kquant": ("onnx:int4", "onnx:int4?algo=k_quant"),
    "openvino": ("openvino:int4", "openvino:int4?group=128&ratio=1&awq=0"),
}


def reconstruction_errors(seed: int = 0) -> dict:
    import mlx.core as mx

    from edgequant.backends.mlx.grid import minmax_quantize

    rng = np.random.default_rng(seed)
    matrices = {"normal": rng.standard_normal((512, 1024)), "student_t3": rng.standard_t(3, (512, 1024))}
    out = {}
    for name, weight in matrices.items():
        weight = (weight * 0.02).astype(np.float32)
        packed, scales, biases = minmax_quantize(weight, 4, 32)
        ours = np.array(mx.dequantize(mx.array(packed), mx.array(scales).astype(mx.float32),
                                      mx.array(biases).astype(mx.float32), group_size=32, bits=4))
        theirs = np.array(mx.dequantize(*mx.quantize(mx.array(weight), group_size=32, bits=4), group_size=32, bits=4))
        norm = np.sqrt((weight ** 2).mean())
        out[name] = {"minmax_rel_rms": float(np.sqrt(((ours - weight) ** 2).mean()) / norm),
                     "mx_quantize_rel_rms": float(np.sqrt(((theirs - weight) ** 2).mean()) / norm)}
    return out


def kld_pairs(models: dict[str, Path], config) -> dict:
    import edgequant

    out = {}
    for model_name, path in models.items():
        for label, specs in PAIRS.items():
            row = {}
            for role, spec in zip(("edgequant_default", "engine_default"), specs):
                try:
                    metrics = edgequant.evaluate(edgequant.convert(path, spec).path, config=config)
                    row[role] = {"spec": spec, "kld_mean": metrics["kld_mean"], "kld_ci95": metrics["ci95"]["kld_mean"],
                                 "ppl_increase_pct": metrics["ppl_increase_pct"]}
                except Exception as exc:  # one engine's failure must not hide the other rows
                    row[role] = {"spec": spec, "error": f"{type(exc).__name__}: {exc}"[:300]}
            if all("kld_ci95" in row.get(r, {}) for r in ("edgequant_default", "engine_default")):
                from edgequant.measurement.intervals import compare

                verdict = compare(row["edgequant_default"]["kld_ci95"], row["engine_default"]["kld_ci95"])
                row["edgequant_default_kld_is"] = verdict  # lower is better
            out[f"{model_name}/{label}"] = row
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=HERE / "results" / "float_defaults.json")
    args = parser.parse_args()

    from edgequant.atomic import write_text_atomic
    from edgequant.measurement.evaluation import EvalConfig, machine_info
    from tiny_archs import build
    from tiny_model import build_tiny_llama

    config = EvalConfig(ctx=128, windows=8, speed=False)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tok").mkdir()
        tokenizer_dir = build_tiny_llama(Path(tmp) / "tok")
        models = {name: build(name, tokenizer_dir, Path(tmp) / name) for name in ("llama", "qwen2")}
        result = {"machine": machine_info(), "eval": {"ctx": config.ctx, "windows": config.windows},
                  "reconstruction_4bit_group32": reconstruction_errors(), "kld_on_tiny_float_models": kld_pairs(models, config)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output, json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
