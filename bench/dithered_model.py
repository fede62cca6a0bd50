"""A float stand-in for the default model: its 4-bit grid dithered away.

The default model's linear weights were dequantized from Q4_1 (blocks of 32 input values, each
on 16 levels min + k*d). A quantizer whose grid can reproduce those levels (q4_k_m's asymmetric
blocks of 32) looks nearly lossless on it, one that cannot (the HTP's symmetric blocks) does not,
so comparisons on it favour the first. A float model that rounds to this grid differed from it
by a rounding residual spread over (-d/2, d/2); adding such a residual back, uniformly drawn,
gives weights off every grid with the statistics a float original would have. Quantization
recipes are then compared on it as well (bench/qnn_llm.py --model).

    .venv/bin/python bench/dithered_model.py OUT_DIR [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np

BLOCK, LEVELS = 32, 16  # Q4_1


def on_q4_1_grid(weight: np.ndarray) -> bool:
    """Every block of 32 input values holds at most 16 distinct values (a Q4_1 tensor)."""
    if weight.ndim != 2 or weight.shape[1] % BLOCK:
        return False
    blocks = weight.reshape(-1, BLOCK)[:256]
    return all(len(np.unique(b)) <= LEVELS for b in blocks)


def dither(weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each block's values plus a uniform draw over one rounding step (d = (max - min) / 15)."""
    blocks = weight.astype(np.float32).reshape(-1, BLOCK)
    step = (blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)) / (LEVELS - 1)
    noise = rng.uniform(-0.5, 0.5, blocks.shape).astype(np.float32) * step
    return (blocks + noise).reshape(weight.shape)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from safetensors.numpy import load_file, save_file

    from edgequant.sources.source import load_source

    source = load_source(None)
    rng = np.random.default_rng(args.seed)
    tensors = load_file(str(source.hf_dir / "model.safetensors"))
    dithered = [name for name, w in tensors.items() if on_q4_1_grid(w)]
    for name in dithered:
        tensors[name] = dither(tensors[name], rng).astype(tensors[name].dtype)
    staging = Path(tempfile.mkdtemp(prefix=".dither-", dir=args.out.parent))
    for path in source.hf_dir.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            shutil.copy(path, staging / path.name)
    save_file(tensors, str(staging / "model.safetensors"))
    (staging / "dithered.json").write_text(json.dumps({"from": str(source.hf_dir), "seed": args.seed,
                                                       "tensors": dithered}, indent=1))
    shutil.rmtree(args.out, ignore_errors=True)
    staging.rename(args.out)
    print(f"{args.out}: {len(dithered)} tensors dithered")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
