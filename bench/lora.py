"""What conversion and quantization do to a fine-tune, on the default model.

1. `edgequant finetune` trains a LoRA adapter on the built-in Zen of Python set (PEFT on PyTorch),
   recording its time and tokens/s; mlx-lm's own trainer runs the same examples, rank, scale,
   batch and steps on `mlx[cpu]` for the engine comparison (`--no-mlx` skips it).
2. The adapter is merged into the float source (`--adapter`), and the merged model is converted
   to each spec.
3. Every model scores the fine-tune's held-out examples (never trained on) through its runner, as
   `eval` does (`adaptation.scoring.finetune_figures`): the base model, the adapted float model
   (PyTorch), and each artifact, merged or with the adapter kept separate (`?lora=separate`). The
   share of the fine-tune's loss reduction an artifact keeps is (base - artifact) / (base - adapted
   float).

Writes bench/results/lora.json: the training record of both engines, the held-out loss per
model, the share kept, sizes, date, load and settings. Target: every 8-bit artifact keeps at least
90% of the loss reduction; the 4-bit ones are reported as they are.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPECS = ["gguf:q8_0", "onnx:int8", "openvino:int8", "mlx:8bit", "gguf:q4_k_m", "onnx:int4", "openvino:int4", "mlx:4bit"]
EIGHT_BIT = {"gguf:q8_0", "onnx:int8", "openvino:int8", "mlx:8bit"}


def mlx_training(hf_dir: Path, config, scratch: Path) -> dict:
    """mlx-lm's trainer on the same examples and LoRA settings: time and tokens/s (float32 weights:
    float16 matmuls are far slower on mlx[cpu])."""
    import mlx.optimizers as optim
    from mlx_lm import convert, load
    from mlx_lm.tuner.datasets import CacheDataset
    from mlx_lm.tuner.trainer import TrainingArgs, train
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from transformers import AutoTokenizer

    from edgequant.adaptation import data as datasets
    from edgequant.adaptation.finetune import TARGET_MODULES

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    train_records, _ = datasets.split(datasets.read_records(config.data))
    examples = datasets.tokenize(train_records, tokenizer, config.max_tokens)
    mlx_dir = scratch / "mlx-f32"
    convert(str(hf_dir), str(mlx_dir), dtype="float32")
    model, _ = load(str(mlx_dir))
    model.freeze()
    layers = json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"]
    keys = [f"self_attn.{m}" for m in TARGET_MODULES[:4]] + [f"mlp.{m}" for m in TARGET_MODULES[4:]]
    linear_to_lora_layers(model, layers, {"rank": config.rank, "scale": config.alpha / config.rank, "dropout": 0.0, "keys": keys})

    class Examples(list):
        def process(self, item):
            return item

    dataset = CacheDataset(Examples([(e.ids, e.learned_from) for e in examples]))
    probe = CacheDataset(Examples([(e.ids, e.learned_from) for e in examples[:config.batch]]))  # its validation: one batch
    started = time.perf_counter()
    train(model=model, optimizer=optim.AdamW(learning_rate=config.learning_rate), train_dataset=dataset, val_dataset=probe,
          args=TrainingArgs(batch_size=config.batch, iters=config.steps, val_batches=1, steps_per_eval=10 ** 6,
                            steps_per_report=10 ** 6, adapter_file=str(scratch / "mlx-adapters.safetensors"),
                            max_seq_length=config.max_tokens))
    seconds = time.perf_counter() - started
    tokens = config.steps * config.batch * sum(len(e.ids) for e in examples) / len(examples)  # the mean example length
    return {"engine": "mlx-lm (mlx[cpu])", "steps": config.steps, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1), "note": "includes mx.compile warm-up and two validation passes of one batch"}


def _eight_bit(spec: str) -> bool:
    return spec.partition("?")[0] in EIGHT_BIT


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="base model (default: the embedded default model); e.g. the float "
                        "stand-in bench/dithered_model.py writes")
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--no-mlx", action="store_true", help="skip the mlx-lm training comparison")
    parser.add_argument("--mlx-steps", type=int, default=8, help="mlx-lm training steps (its speed only: it is slow here)")
    parser.add_argument("--threads", type=int, help="PyTorch training threads (default: all cores)")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "lora.json")
    args = parser.parse_args()

    import edgequant
    from edgequant.adaptation.scoring import finetune_figures
    from edgequant.measurement.evaluation import machine_info
    from edgequant.runner import default_threads

    os.environ.setdefault("EDGEQUANT_QUIET", "1")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load_before = [round(x, 2) for x in os.getloadavg()]
    scratch = Path(tempfile.mkdtemp(prefix="edgequant-lora-"))
    config = edgequant.FinetuneConfig(scratch / "zen-lora", args.model, steps=args.steps, threads=args.threads)
    training = {"torch": edgequant.finetune(config)}
    if not args.no_mlx:
        training["mlx"] = mlx_training(edgequant.load_source(args.model).hf_dir, replace(config, steps=args.mlx_steps), scratch)
    merged = edgequant.load_source(edgequant.adapted_model(args.model, config.output))
    rows, reference = [], None
    for spec in [s.strip() for s in args.specs.split(",") if s.strip()]:
        artifact = edgequant.convert(merged.path, spec)
        figures = finetune_figures(merged, artifact.path, default_threads())  # the runner of the artifact, as eval scores it
        reference = figures["finetune_reference"]
        rows.append({"spec": spec, "adapter": "separate" if "lora=separate" in spec else "merged",
                     "size_mb": round(artifact.size_bytes / 1e6, 1), "held_out_loss": figures["finetune_loss"],
                     "kept_share": figures["finetune_kept"], "target": ">= 0.90" if _eight_bit(spec) else "reported"})
        print(json.dumps(rows[-1]), flush=True)
    report = {
        "date": started, "edgequant": edgequant.__version__, "machine": machine_info(),
        "load_avg_before": load_before, "load_avg_after": [round(x, 2) for x in os.getloadavg()],
        "model": str(edgequant.load_source(args.model).path),
        "settings": {"training_threads": args.threads or "all cores", "data": config.data, "steps": config.steps,
                     "rank": config.rank, "alpha": config.alpha, "learning_rate": config.learning_rate, "batch": config.batch},
        "training": training,
        "held_out_loss": {"base": reference["base"], "adapted_float": reference["adapted"], "examples": reference["examples"]},
        "artifacts": rows,
        "eight_bit_all_keep_90pct": all(r["kept_share"] is not None and r["kept_share"] >= 0.9 for r in rows if _eight_bit(r["spec"])),
        "four_bit_below_90pct": [r["spec"] for r in rows if not _eight_bit(r["spec"]) and (r["kept_share"] or 0) < 0.9],
    }
    if "mlx" in training:
        report["torch_over_mlx_tokens_per_s"] = round(training["torch"]["tokens_per_s"] / training["mlx"]["tokens_per_s"], 2)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("held_out_loss", "eight_bit_all_keep_90pct", "four_bit_below_90pct")}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
