"""Min/max affine grids for MLX's quantized layers, written in MLX's own storage layout.

`mx.quantize` snaps each group's grid so that one edge value divides evenly by the scale (it keeps
zero close to a grid point). On weights that already sit on a min/max grid (any model shipped as
Q4_1/Q4_K, or trained with a min/max quantizer) that shifts every grid point off the source's, and
4-bit loses several times more than it needs to: on the default model (a Q4_1 GGUF) uniform 4-bit
went from +24% perplexity with mlx's rounding to well under 1% with the plain min/max grid, the
classic asymmetric round-to-nearest (scale = (max - min) / (2^bits - 1), bias = min).

The layout is what `mx.dequantize` reads: per row, the quantized values as one little-endian bit
stream packed into uint32 words, and one float16 scale and bias per group. `regrid` rewrites the
layers mlx-lm quantized, from the source's float weights, and checks the result against
`mx.dequantize` so a layout change in mlx fails loudly instead of silently corrupting weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# Rows of a weight quantized at once: 64 MiB of float32 (a 262k x 2048 output layer would be 2 GiB).
CHUNK_BYTES = 64 << 20


def minmax_quantize(weight: np.ndarray, bits: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(packed uint32, scales, biases) of a 2-D float weight, groups along the last axis."""
    rows = weight.shape[0]
    groups = weight.astype(np.float32).reshape(rows, -1, group)
    low, high = groups.min(-1, keepdims=True), groups.max(-1, keepdims=True)
    top = 2**bits - 1
    # Scales and biases are stored in float16, so round with the stored values, not the exact ones.
    scales = ((high - low) / top).astype(np.float16)
    scales[scales == 0] = 1  # a constant group (or one below float16's range): any scale, q = 0
    biases = low.astype(np.float16)
    q = np.rint((groups - biases.astype(np.float32)) / scales.astype(np.float32))
    q = np.clip(q, 0, top).astype(np.uint32).reshape(rows, -1)
    return pack(q, bits), scales[..., 0], biases[..., 0]


def minmax_quantize_checked(weight, bits: int, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`minmax_quantize` of an mx.array weight a block of rows at a time, each block checked against
    mx.dequantize: a float32 copy and its temporaries of a whole 262k-row output layer are gigabytes."""
    import mlx.core as mx

    rows = max(1, CHUNK_BYTES // (4 * weight.shape[-1]))
    parts = []
    for start in range(0, weight.shape[0], rows):
        block = np.array(weight[start:start + rows].astype(mx.float32))
        packed, scales, biases = minmax_quantize(block, bits, group)
        _check_roundtrip(packed, scales, biases, bits, group, block)
        parts.append((packed, scales, biases))
    return tuple(np.concatenate(column) for column in zip(*parts))


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Quantized values as MLX stores them: each row one little-endian bit stream of uint32 words.
    Rows go in chunks so the one-byte-per-bit expansion of a large embedding stays small."""
    shifts = np.arange(bits, dtype=np.uint32)
    chunks = []
    for start in range(0, q.shape[0], 2048):
        rows = q[start:start + 2048]
        stream = ((rows[..., None] >> shifts) & 1).astype(np.uint8).reshape(rows.shape[0], -1)
        chunks.append(np.packbits(stream, axis=-1, bitorder="little").view(np.uint32))
    return np.concatenate(chunks)


def layer_settings(config: dict, name: str) -> tuple[int, int] | None:
    """(bits, group size) mlx-lm recorded for a layer, or None when it is not quantized."""
    quant = config.get("quantization") or {}
    own = quant.get(name)
    if own is False:
        return None
    if isinstance(own, dict):
        return own["bits"], own["group_size"]
    return quant.get("bits"), quant.get("group_size")


def source_weights(hf_dir: Path) -> dict:
    """The source's float weights by name, as mx.load gives them: lazy, each read when used."""
    import mlx.core as mx

    weights = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        weights.update(mx.load(str(file)))
    return weights


def regrid(out_dir: Path, hf_dir: Path, model_file: str) -> dict[str, int]:
    """Re-quantize every layer mlx-lm quantized onto the min/max grid of the source's weights.
    Layers whose source weight cannot be matched by name and shape keep mlx's rounding.
    Returns how many layers took each path (recorded in the manifest)."""
    import mlx.core as mx

    mx.clear_cache()  # buffers mlx-lm's conversion freed stay in mlx's cache until told
    config = json.loads((out_dir / "config.json").read_text())
    stored = dict(mx.load(str(out_dir / model_file)).items())
    source = source_weights(hf_dir)
    counts = {"minmax": 0, "mlx": 0}
    for key in [k for k in stored if k.endswith(".scales")]:
        name = key[: -len(".scales")]
        settings = layer_settings(config, name)
        weight = source.pop(f"{name}.weight", None)  # popped: an evaluated lazy array keeps its data
        if settings is None or weight is None or weight.ndim != 2 or weight.shape[-1] % settings[1]:
            counts["mlx"] += 1
            continue
        bits, group = settings
        if _packed_shape(weight.shape, bits) != tuple(stored[f"{name}.weight"].shape):
            counts["mlx"] += 1  # a layout this code does not know: keep what mlx wrote
            continue
        packed, scales, biases = minmax_quantize_checked(weight, bits, group)
        stored[f"{name}.weight"], stored[key] = mx.array(packed), mx.array(scales)
        stored[f"{name}.biases"] = mx.array(biases)
        counts["minmax"] += 1
    # The stored arrays are read lazily from model_file: write beside it, then replace it.
    written = out_dir / f"{model_file}.regrid.safetensors"
    mx.save_safetensors(str(written), stored, metadata={"format": "mlx"})
    written.replace(out_dir / model_file)
    return counts


def _packed_shape(shape: tuple[int, ...], bits: int) -> tuple[int, int]:
    """The uint32 words `pack` gives a weight of this shape."""
    return shape[0], shape[1] * bits // 32


def _check_roundtrip(packed, scales, biases, bits: int, group: int, weight: np.ndarray) -> None:
    """mlx must read back the grid we meant: each value within half a step of the source (plus
    the float16 rounding of scale and bias); a wrong layout is off by many steps."""
    import mlx.core as mx

    from edgequant.errors import EdgequantError

    def as32(a):
        return mx.array(a).astype(mx.float32)  # a float16 result would add its own rounding
    back = mx.dequantize(mx.array(packed), as32(scales), as32(biases), group_size=group, bits=bits)
    back = np.array(back.astype(mx.float32))
    step = np.repeat(scales.astype(np.float32), group, axis=-1)
    # float16 scales carry 11 significant bits: the top of the grid may move by 2^bits / 2^11 steps.
    slack = 0.5 + 2.0**bits / 2048
    if not np.all(np.abs(back - weight) <= slack * step + 1e-3 * np.abs(weight) + 1e-6):
        raise EdgequantError("mlx reads our packed weights differently than they were written",
                             "use mlx's own rounding with grid=mlx, and report the mlx version")
