"""What converting and evaluating costs as models grow: random-initialised models built from a
config (no download; their quality figures mean nothing, their cost does), each format's default
spec, wall time and peak RSS of the whole process tree next to the model's bytes.

    .venv/bin/python bench/scale.py [--models llama-135m,llama-0.5b,llama-1b,qwen2-150k] [--specs ...]

Every job runs as the CLI a user runs, in a fresh cache (so a spec's own intermediates count), and
its process tree is sampled every 0.2 s: the peak is the largest sum over the tree of each process's
proportional set size (PSS: a page shared by n processes counts 1/n in each), not the largest
single process (ru_maxrss of the children would miss a parent and child holding copies at once).
The sum of plain RSS is kept beside it: it counts a page twice when a process forks (between fork
and exec a child shows all of its parent's pages, and an export that runs a helper command looked
up to 1 GB larger than it was). Beside edgequant's GGUF conversion, llama.cpp's own converter alone converts the same
folder (the engine's minimal script). Writes bench/results/scale.json with each row's peak as a
multiple of the source's bf16 bytes and, per spec, the growth per billion parameters (least squares
over the sizes measured). Models are built in bf16 with the default model's tokenizer; vocabularies
larger than it keep ids the tokenizer never produces, which changes nothing that costs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "scale.json"
VENV_BIN = Path(sys.executable).parent
# name -> (transformers config class, settings). Llama shapes of SmolLM2-135M, a 0.5B and a 1.07B
# (the one issue #24's figures came from); Qwen2.5-0.5B's shape for a 152k vocabulary.
MODELS = {
    # SmolLM2-135M's shape with a third of its layers: a second size for formats too costly to
    # measure past 135M here (qnn), so their growth is measured, not assumed.
    "llama-45m": ("LlamaConfig", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=10, num_attention_heads=9,
                                       num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)),
    "llama-135m": ("LlamaConfig", dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                                        num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)),
    "llama-0.5b": ("LlamaConfig", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=28, num_attention_heads=16,
                                        num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=False)),
    "llama-1b": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                                      num_key_value_heads=8, vocab_size=49152, tie_word_embeddings=False)),
    "qwen2-150k": ("Qwen2Config", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                        num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)),
}
SETTINGS = {"eval": "2 windows of 512, no speed; eval_with_reference is the first, which computes the reference",
            "memory": "peak of the summed PSS of the process tree (peak_rss_sum_gb: of the summed RSS)"}
SPECS = ("gguf:q4_k_m", "onnx:int4", "openvino:int4", "mlx:4bit", "qnn:w8a16")

_BUILD = """
import json, sys, torch, transformers
from pathlib import Path
from edgequant.sources.source import load_source
config_class, settings, out = sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3])
config = getattr(transformers, config_class)(max_position_embeddings=4096, bos_token_id=0, eos_token_id=0, **settings)
torch.manual_seed(0)
with torch.device("meta"):  # no float32 initialisation of weights drawn again below
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
model = model.to_empty(device="cpu")
model.tie_weights()  # to_empty gives the tied output layer its own storage again
with torch.no_grad():
    for p in model.parameters():
        p.normal_(0.0, 0.02) if p.dim() == 2 else p.fill_(1.0)
model.save_pretrained(out, safe_serialization=True)
tokenizer = transformers.AutoTokenizer.from_pretrained(load_source(None).hf_dir)
tokenizer.save_pretrained(out)
print(sum(p.numel() for p in model.parameters()))
"""


def measure(command: list[str], env: dict, timeout: float) -> dict:
    """Wall time and the peak of the summed RSS of the command's process tree."""
    import psutil

    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    root, peak_rss, peak_pss = psutil.Process(process.pid), 0, 0
    while process.poll() is None:
        try:
            tree = [root, *root.children(recursive=True)]
            rss, pss = (sum(column) for column in zip(*(_memory(p) for p in tree)))
            peak_rss, peak_pss = max(peak_rss, rss), max(peak_pss, pss)
        except psutil.NoSuchProcess:
            pass
        if time.perf_counter() - started > timeout:
            process.kill()
            break
        time.sleep(0.2)
    stderr = process.communicate()[1] or ""
    return {"returncode": process.returncode, "wall_s": round(time.perf_counter() - started, 1),
            "peak_gb": round(peak_pss / 1e9, 3), "peak_rss_sum_gb": round(peak_rss / 1e9, 3),
            "error": stderr.strip().splitlines()[-2:] if process.returncode else None}


def _memory(process) -> tuple[int, int]:
    """A process's RSS and PSS in bytes, from one read of /proc/PID/smaps_rollup (0 once it has gone)."""
    import psutil

    try:
        info = process.memory_full_info()
        return info.rss, info.pss
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 0, 0


def build(name: str, out: Path) -> int:
    config_class, settings = MODELS[name]
    done = subprocess.run([sys.executable, "-c", _BUILD, config_class, json.dumps(settings), str(out)],
                          capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def run_model(name: str, specs: list[str], scratch: Path, timeout: float, record) -> None:
    """Measure every spec on model `name`, handing each row to `record` as soon as it is measured."""
    model = scratch / name
    parameters = build(name, model)
    source_bytes = sum(f.stat().st_size for f in model.glob("*.safetensors"))
    for spec in specs:
        home = scratch / f"home-{name}-{spec.replace(':', '-')}"
        env = {**os.environ, "EDGEQUANT_HOME": str(home), "EDGEQUANT_QUIET": "1", "EDGEQUANT_MEMORY_LIMIT": "1000GB"}
        artifact = scratch / f"out-{name}-{spec.replace(':', '-')}"
        convert = measure([str(VENV_BIN / "edgequant"), "convert", str(model), "--to", spec, "-o", str(artifact)], env, timeout)
        row = {"model": name, "parameters": parameters, "source_bytes": source_bytes, "spec": spec, "convert": convert,
               "convert_peak_over_source": round(convert["peak_gb"] * 1e9 / source_bytes, 2)}
        if convert["returncode"] == 0:
            row["artifact_bytes"] = sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file())
            evaluate = [str(VENV_BIN / "edgequant"), "eval", str(artifact), "--windows", "2", "--no-speed"]
            # The first evaluation also scores the float source once (the reference log-probs, then
            # cached); the second is what evaluating an artifact costs from then on.
            row["eval_with_reference"] = measure(evaluate, env, timeout)
            row["eval"] = measure(evaluate, env, timeout)
            row["eval_peak_over_artifact"] = round(row["eval"]["peak_gb"] * 1e9 / row["artifact_bytes"], 2)
        shutil.rmtree(artifact, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)
        record(row)
    if "gguf:q4_k_m" in specs:
        record(_llama_cpp_converter_alone(name, model, parameters, source_bytes, scratch, timeout))
    shutil.rmtree(model)


def _llama_cpp_converter_alone(name: str, model: Path, parameters: int, source_bytes: int, scratch: Path, timeout: float) -> dict:
    from edgequant.backends.gguf.tools import converter_dir

    tool = converter_dir()
    run = measure([sys.executable, str(tool / "convert_hf_to_gguf.py"), str(model), "--outtype", "bf16",
                   "--outfile", str(scratch / f"{name}-bf16.gguf")], {**os.environ}, timeout)
    return {"model": name, "parameters": parameters, "source_bytes": source_bytes, "spec": "llama.cpp converter alone (bf16)",
            "convert": run, "convert_peak_over_source": round(run["peak_gb"] * 1e9 / source_bytes, 2)}


def growth(rows: list[dict]) -> dict:
    """Per spec, from the Llama sizes measured (least squares): GB of peak memory and seconds of
    wall time per billion parameters, and the peak as `factor` x the source's 16-bit bytes + a
    fixed part, the form Backend.conversion_peak takes."""
    import numpy as np

    found = {}
    for spec in sorted({r["spec"] for r in rows}):
        ok = [r for r in rows if r["spec"] == spec and r["convert"]["returncode"] == 0 and r["model"].startswith("llama")]
        if len(ok) < 2:
            continue
        billions = np.array([r["parameters"] / 1e9 for r in ok])
        peaks, walls = [r["convert"]["peak_gb"] for r in ok], [r["convert"]["wall_s"] for r in ok]
        factor, fixed = np.polyfit(2 * billions, peaks, 1)
        found[spec] = {"peak_gb_per_billion": round(float(np.polyfit(billions, peaks, 1)[0]), 2),
                       "wall_s_per_billion": round(float(np.polyfit(billions, walls, 1)[0]), 2),
                       "peak_factor": round(float(factor), 2), "peak_fixed_gb": round(float(fixed), 2),
                       "sizes": sorted(r["model"] for r in ok)}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--specs", default=",".join(SPECS))
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per job before it is killed")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    from edgequant import __version__
    from edgequant.measurement.evaluation import machine_info

    found = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}

    def record(row: dict) -> None:
        """Replace the row of the same model and spec, keep the others, write at once (a run of
        every model and spec takes hours here, so it is done in parts)."""
        row = {**row, "measured": datetime.date.today().isoformat(), "edgequant": __version__,
               "load_avg_1m": round(os.getloadavg()[0], 2)}
        found["rows"] = [r for r in found["rows"] if (r["model"], r["spec"]) != (row["model"], row["spec"])] + [row]
        found.update(machine=machine_info(), settings=SETTINGS | {"timeout_s": args.timeout}, growth=growth(found["rows"]))
        args.out.write_text(json.dumps(found, indent=2) + "\n")
        print(json.dumps(row), flush=True)

    with tempfile.TemporaryDirectory(prefix="edgequant-scale-") as scratch:
        for name in args.models.split(","):
            run_model(name, args.specs.split(","), Path(scratch), args.timeout, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
