"""Peak memory of one artifact per format on the embedded default model: edgequant's speed probe
against a minimal script that uses only the engine's own API on the same artifact, generating the
same number of tokens from the same prompt ids, in the same run. Writes bench/results/memory.json.

Each minimal script runs in a fresh interpreter and reports its own peak RSS (VmHWM), as the
probe does; the ratio edgequant / engine is the overhead edgequant adds (target: at most 1.15x).
The MLX reference is what an mlx-lm app runs (`mlx_lm.load`), which itself imports transformers.

Each side runs --repeats times, interleaved (and alternating which goes first) so that drift in the
machine's state hits both. Every figure is the median with its [min, max]; the ratio is the ratio
of medians, and its range the min/max of the per-repeat paired ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPECS = ("gguf:q4_k_m", "onnx:int4", "openvino:int4", "mlx:4bit", "qnn:w8a16")
TARGET_RATIO = 1.15

_PEAK = textwrap.dedent("""
    def peak_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
""")

# Per format: the engine's own way to load the artifact and generate GEN tokens greedily from PROMPT.
ENGINE_SCRIPTS = {
    "gguf": """
        import llama_cpp
        llm = llama_cpp.Llama(model_path=FOLDER + "/model.gguf", n_ctx=512, n_threads=THREADS, flash_attn=True, verbose=False)
        for count, token in enumerate(llm.generate(PROMPT, temp=0.0), start=1):
            if count >= GEN:
                break
    """,
    "onnx": """
        import onnxruntime_genai as og
        model = og.Model(FOLDER)
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(PROMPT) + GEN)
        generator = og.Generator(model, params)
        generator.append_tokens(PROMPT)
        for _ in range(GEN):
            generator.generate_next_token()
    """,
    "openvino": """
        import numpy as np, openvino as ov, openvino_genai as genai
        pipe = genai.LLMPipeline(FOLDER, "CPU", INFERENCE_NUM_THREADS=THREADS)
        config = genai.GenerationConfig()
        config.max_new_tokens, config.ignore_eos = GEN, True
        ids = np.asarray([PROMPT], dtype=np.int64)
        pipe.generate(genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids))), config)
    """,
    "mlx": """
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.generate import generate_step
        model, _ = load(FOLDER)
        for (token, _), _ in zip(generate_step(mx.array(PROMPT), model), range(GEN)):
            pass
    """,
    "qnn": """
        import numpy as np, onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = THREADS
        session = ort.InferenceSession(FOLDER + "/model.onnx", options, providers=["CPUExecutionProvider"])
        seq = session.get_inputs()[0].shape[1]
        ids = list(PROMPT)
        for _ in range(GEN):
            window = np.zeros((1, seq), np.int64)
            window[0, :len(ids)] = ids
            ids.append(int(session.run(["logits"], {"input_ids": window})[0][0, len(ids) - 1].argmax()))
    """,
}


def engine_peak(fmt: str, folder: Path, prompt: list[int], gen: int, threads: int) -> dict:
    code = (f"FOLDER, PROMPT, GEN, THREADS = {str(folder)!r}, {prompt!r}, {gen}, {threads}\n" + _PEAK
            + textwrap.dedent(ENGINE_SCRIPTS[fmt]) + "\nprint(peak_mb())\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-400:]}
    return {"peak_rss_mb": round(float(done.stdout.strip().splitlines()[-1]), 1)}


def _spread(name: str, values: list[float]) -> dict:
    """The median under the old key (readers of single-run results keep working), and [min, max]."""
    return {name: round(statistics.median(values), 2), f"{name}_range": [round(min(values), 2), round(max(values), 2)]}


def measure(spec: str, prompt_text: str, gen: int, threads: int, repeats: int) -> dict:
    import edgequant
    from edgequant.measurement.speed_probe import SpeedRequest, run_in_child
    from edgequant.registry import open_runner

    artifact = edgequant.convert(None, spec)
    with open_runner(artifact.path, n_ctx=512, need_logits=False, threads=threads) as runner:
        prompt = runner.tokenize(prompt_text)[:64]
    ours, engine = [], []
    sides = [(ours, lambda: run_in_child(SpeedRequest(str(artifact.path), [prompt, prompt], gen, 1, threads, 512))),
             (engine, lambda: engine_peak(artifact.spec.format, artifact.path, prompt, gen, threads))]
    for i in range(repeats):
        # Alternate which side goes first, so neither always finds the page cache the other left.
        for runs, run_once in (sides if i % 2 == 0 else sides[::-1]):
            runs.append(run_once())
    ours_mb = [o["peak_rss_mb"] for o in ours]
    row = {"spec": spec, **_spread("edgequant_peak_rss_mb", ours_mb),
           **_spread("edgequant_interpreter_rss_mb", [o["interpreter_rss_mb"] for o in ours]),
           **_spread("edgequant_model_rss_mb", [o["model_rss_mb"] for o in ours]),
           "probe_imported": sorted({m for o in ours for m in o["probe_imported"]}),
           "edgequant_peak_rss_mb_runs": ours_mb}
    errors = [e["error"] for e in engine if "error" in e]
    if errors:
        row["engine_only"] = {"error": errors[0]}
        return row
    engine_mb = [e["peak_rss_mb"] for e in engine]
    row["engine_only"] = {**_spread("peak_rss_mb", engine_mb), "peak_rss_mb_runs": engine_mb}
    # Paired by repeat: the two runs of a pair ran back to back, so share the machine's state.
    paired = [a / b for a, b in zip(ours_mb, engine_mb)]
    row["ratio"] = round(statistics.median(ours_mb) / statistics.median(engine_mb), 3)
    row["ratio_range"] = [round(min(paired), 3), round(max(paired), 3)]
    row["within_target"] = row["ratio"] <= TARGET_RATIO
    row["within_target_every_repeat"] = row["ratio_range"][1] <= TARGET_RATIO
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--gen", type=int, default=32, help="tokens generated by both sides")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, interleaved")
    parser.add_argument("--output", type=Path, default=HERE / "results" / "memory.json")
    args = parser.parse_args()

    from edgequant.atomic import write_text_atomic
    from edgequant.measurement.evaldata import default_eval_text
    from edgequant.measurement.evaluation import machine_info

    prompt_text = default_eval_text()[:2000]
    rows = []
    for spec in args.specs.split(","):
        print(f"measuring {spec}", file=sys.stderr, flush=True)
        rows.append(measure(spec, prompt_text, args.gen, args.threads, args.repeats))
    notes = ("Each figure is the median of `repeats` runs, with [min, max] in its *_range; edgequant and "
             "engine-only runs are interleaved, alternating which goes first. `ratio` is the ratio of the "
             "medians; `ratio_range` is the min/max of the per-repeat paired ratios (each pair ran back to "
             "back). `within_target` judges the median ratio, `within_target_every_repeat` the highest.")
    result = {"machine": machine_info(), "generated_tokens": args.gen, "repeats": args.repeats,
              "target_ratio": TARGET_RATIO, "notes": notes, "rows": rows}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.output, json.dumps(result, indent=2))
    print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
