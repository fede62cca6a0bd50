"""Do the headlines survive off the default model's Q4_1 grid? Each one measured on the default
model and on its float stand-in (bench/dithered_model.py) in the same run.

The default model's weights were dequantized from Q4_1 (4-bit min/max blocks of 32), so a
quantizer that can land on that grid (q4_1, q5_1, min/max groups of 32) looks nearly lossless
and a search free to pick one wins for that reason. The stand-in adds back a uniform rounding
residual, which puts the weights on no grid. For each model, on the same evaluation windows:

- imatrix: KLD(gguf:T?imatrix=auto) / KLD(gguf:T) for T in Q4_K_M, Q3_K_M, Q2_K;
- auto: KLD(gguf:auto?size=B) / KLD(gguf:T?imatrix=auto), B the recipe file's bytes, with the
  tensor types the search chose;
- defaults: KLD(edgequant's default) / KLD(the engine's own) for onnx:int4 (HQQ vs the builder's
  RTN) and mlx:4bit (min/max grid vs mx.quantize's).

Every ratio has paired block-bootstrap intervals (bench/imatrix.py's): below 1 beyond the
interval means the first spec is better, and "not distinguishable" where the interval holds 1.

    .venv/bin/python bench/float_standin.py [--windows 4] [--only gguf,onnx,mlx]

Writes bench/results/float_standin.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RECIPES = ("q4_k_m", "q3_k_m", "q2_k")
DEFAULTS = {"onnx": ("onnx:int4", "onnx:int4?algo=rtn"), "mlx": ("mlx:4bit", "mlx:4bit?grid=mlx")}
STANDIN_NAME = "smollm2-135m-dithered-seed0"


def standin_model() -> Path:
    """The stand-in folder in the models cache, built once by bench/dithered_model.py."""
    from edgequant.paths import cache_dir

    folder = cache_dir("models") / STANDIN_NAME
    if not (folder / "dithered.json").is_file():
        subprocess.run([sys.executable, str(HERE / "dithered_model.py"), str(folder), "--seed", "0"], check=True)
    return folder


class ModelRun:
    """Converts and scores specs of one model, each spec scored once however many comparisons use it."""

    def __init__(self, model: Path | None, config):
        self.model, self.config, self.scores, self.rows = model, config, {}, {}

    def score(self, spec: str, force: bool = False):
        if spec not in self.scores:
            import edgequant
            from edgequant.measurement.evaluation import evaluate_with_scores
            from imatrix import summary

            artifact = edgequant.convert(self.model, spec, force=force)
            print(f"{self.model or 'default model'}: {spec}: evaluate ...", flush=True)
            metrics, self.scores[spec] = evaluate_with_scores(artifact.path, config=self.config)
            if artifact.spec.format == "gguf":  # with the tensor types the file holds
                self.rows[spec] = {"spec": str(artifact.spec), **summary(metrics, artifact)}
            else:
                keep = ("perplexity", "baseline_perplexity", "ppl_increase_pct", "kld_mean", "kld_p99", "top1_agreement",
                        "tokens_scored", "ci95")
                self.rows[spec] = {"spec": str(artifact.spec), **{k: metrics[k] for k in keep},
                                   "size_bytes": artifact.size_bytes}
        return self.scores[spec]

    def compare(self, first: str, second: str) -> dict:
        from imatrix import paired_ratio

        ratio = paired_ratio(self.score(first), self.score(second))
        low, high = ratio["ci95_block_bootstrap"]
        ratio["verdict"] = (f"{first} lower beyond the interval" if high < 1 else
                            f"{first} higher beyond the interval" if low > 1 else "not distinguishable")
        return {"first": first, "second": second, "kld_ratio_first_over_second": ratio}


def gguf_comparisons(run: ModelRun) -> dict:
    import edgequant

    found = {}
    for recipe in RECIPES:
        with_matrix = f"gguf:{recipe}?imatrix=auto"
        budget = edgequant.convert(run.model, with_matrix).manifest["model_bytes"]
        auto = f"gguf:auto?size={budget}"
        found[f"imatrix/{recipe}"] = run.compare(with_matrix, f"gguf:{recipe}")
        found[f"auto/{recipe}"] = {**run.compare(auto, with_matrix), "budget_bytes": budget}
    return found


def default_comparisons(run: ModelRun, formats: list[str]) -> dict:
    return {f"default/{fmt}": run.compare(*DEFAULTS[fmt]) for fmt in formats if fmt in DEFAULTS}


def headline_table(models: dict) -> list[dict]:
    """One line per comparison: the ratio and verdict on each model side by side."""
    names = list(models)
    lines = []
    for key in models[names[0]]["comparisons"]:
        line = {"comparison": key}
        for name in names:
            ratio = models[name]["comparisons"][key]["kld_ratio_first_over_second"]
            line[name] = {"ratio": ratio["ratio"], "ci95": ratio["ci95_block_bootstrap"], "verdict": ratio["verdict"]}
        lines.append(line)
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=4, help="evaluation windows of 512 tokens")
    parser.add_argument("--only", default="gguf,onnx,mlx", help="comparisons to run: gguf, onnx, mlx")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "float_standin.json")
    args = parser.parse_args()
    only = args.only.split(",")

    import edgequant
    from edgequant.atomic import write_text_atomic
    from edgequant.measurement.evaluation import EvalConfig, machine_info

    started = time.perf_counter()
    config = EvalConfig(ctx=512, windows=args.windows, speed=False)
    result: dict = {"measured": datetime.date.today().isoformat(), "edgequant": edgequant.__version__,
                    "machine": machine_info(), "evaluation": {"ctx": 512, "windows": args.windows},
                    "load_avg_1_5_15m": {"start": [round(x, 2) for x in os.getloadavg()]}, "models": {}}
    for name, model in (("default", None), ("float_standin", standin_model())):
        run = ModelRun(model, config)
        comparisons = gguf_comparisons(run) if "gguf" in only else {}
        comparisons.update(default_comparisons(run, only))
        result["models"][name] = {"model": str(model or edgequant.load_source(None).path), "comparisons": comparisons,
                                  "rows": run.rows}
        print(json.dumps({k: v["kld_ratio_first_over_second"]["verdict"] for k, v in comparisons.items()}, indent=1),
              flush=True)
        write_text_atomic(args.output, json.dumps({**result, "partial": True}, indent=2) + "\n")  # a later crash keeps it
    result["headlines"] = headline_table(result["models"])
    result["load_avg_1_5_15m"]["end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["notes"] = [
        "float_standin: the default model with each Q4_1 block's rounding residual added back (uniform, seed 0): "
        "weights on no grid, with the statistics a float original would have. Its baseline is its own PyTorch model.",
        "A ratio below 1 means the first spec's KLD to its own baseline is lower; the interval is a paired block "
        "bootstrap over the same tokens (blocks of 32, 2000 resamples).",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output, json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["headlines"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
