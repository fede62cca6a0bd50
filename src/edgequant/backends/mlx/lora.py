"""`?lora=separate` for MLX: the base model's artifact plus the LoRA adapter in mlx-lm's own format,
applied when the runner loads the model.

The artifact holds `adapters/adapters.safetensors` and `adapters/adapter_config.json` as mlx-lm's
trainer writes them, so `mlx_lm.tuner.utils.load_adapters` (and `mlx_lm.generate --adapter-path`)
read them. From PEFT's format: PEFT's `lora_A` (rank x in) becomes `lora_a` = A^T (in x rank), its
`lora_B` (out x rank) becomes `lora_b` = B^T (rank x out), names lose PEFT's `base_model.model.`
prefix and are the MLX model's module paths, and `scale` is the absolute factor on the update
(lora_alpha / r, or / sqrt(r) with rsLoRA). mlx-lm's config holds one rank and one scale, so a
module with its own alpha (PEFT's alpha_pattern) has its factor folded into its `lora_b`, and a
module of a lower rank (rank_pattern) is padded with zero rows and columns: both exact.

The runner does not import mlx_lm (which imports torch, see engine.py), so it applies the adapter
with `LoraLinear` below: y = base(x) + scale * (x @ lora_a) @ lora_b around each adapted linear
layer, quantized or not, which is what mlx-lm's own LoRA layer computes. A runner over a base that
several artifacts share wraps every layer any of their adapters adapts and switches the active
adapter between requests. Only projections inside
the transformer blocks are taken: the runner scores the output layer block by block, which an
adapted output layer would bypass.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Callable

from edgequant.adaptation.merge import MERGED_FIX, outside_blocks
from edgequant.errors import EdgequantError

FOLDER = "adapters"
WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"


def write_adapter(adapter, model, out_dir: Path) -> dict:
    """Write `adapter` (PEFT) for `model` (the base artifact's MLX model) in mlx-lm's format under
    `out_dir`; returns the manifest's record of it."""
    import mlx.core as mx

    from edgequant.adaptation.adapter import WEIGHTS_FILE, scale_of

    modules, blocks = dict(model.named_modules()), _block_paths(model)
    peft = mx.load(str(adapter.path / WEIGHTS_FILE))
    scale = scale_of(adapter.config, "", adapter.rank)  # the adapter's own lora_alpha / r; patterns folded in below
    rank = max(pair.rank for pair in adapter.pairs)
    weights, keys = {}, set()
    for pair in adapter.pairs:
        keys.add(_key_in_block(pair.module, blocks, adapter.name))
        _check_layer(modules.get(pair.module), pair, adapter.name)
        lora_a = peft[pair.a].astype(mx.float32).T
        lora_b = peft[pair.b].astype(mx.float32).T * (pair.scale / scale)
        weights[f"{pair.module}.lora_a"] = _pad(lora_a, 1, rank)
        weights[f"{pair.module}.lora_b"] = _pad(lora_b, 0, rank)
    folder = out_dir / FOLDER
    folder.mkdir()
    mx.save_safetensors(str(folder / WEIGHTS), weights, metadata={"format": "mlx"})
    config = {"fine_tune_type": "lora", "num_layers": len(model.layers),
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": sorted(keys)},
              "peft_adapter": adapter.to_json()}
    (folder / CONFIG).write_text(json.dumps(config, indent=2))
    return {"file": f"{FOLDER}/{WEIGHTS}", "format": "mlx-lm", "scale": scale, "fingerprint": adapter.fingerprint,
            "rank": rank}


def _block_paths(model) -> list[str]:
    """The module paths of the model's transformer blocks (mlx-lm's `model.layers`)."""
    ids = {id(block) for block in model.layers}
    return [path for path, module in model.named_modules() if id(module) in ids]


def _key_in_block(module: str, blocks: list[str], name: str) -> str:
    """`module`'s path inside its transformer block (mlx-lm's `keys` are those)."""
    for block in blocks:
        if module.startswith(block + "."):
            return module.removeprefix(block + ".")
    raise outside_blocks(name, module, "MLX")


def _check_layer(layer, pair, name: str) -> None:
    import mlx.nn as nn

    if not isinstance(layer, (nn.Linear, nn.QuantizedLinear)):
        what = "no such layer" if layer is None else f"a {type(layer).__name__}, not a linear layer"
        raise EdgequantError(f"adapter {name} adapts {pair.module}, and mlx-lm's model of this base has {what}", MERGED_FIX)
    out_features, packed = layer.weight.shape
    in_features = packed * 32 // layer.bits if isinstance(layer, nn.QuantizedLinear) else packed
    if (out_features, in_features) != (pair.out_features, pair.in_features):
        raise EdgequantError(f"adapter {name} expects {pair.module} of {pair.out_features} x {pair.in_features}; mlx-lm's "
                             f"model has {out_features} x {in_features}", MERGED_FIX)


def _pad(array, axis: int, rank: int):
    """`array` with zeros appended along its rank axis up to `rank` (a lower-rank module): exact."""
    import mlx.core as mx

    missing = rank - array.shape[axis]
    if not missing:
        return array
    widths = [(0, 0), (0, 0)]
    widths[axis] = (0, missing)
    return mx.pad(array, widths)


def apply_adapters(model, files: dict[str | None, Path | None]) -> Callable[[str | None], None]:
    """Wrap each linear layer of `model` that any of `files` (mlx-lm's adapters.safetensors, its
    adapter_config.json beside it; None: the base alone) adapts, and make the adapter of key None
    active. Returns the function that makes another key's adapter the active one: a runner over a
    base several artifacts share switches between requests (never within a forward pass)."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    adapters = {key: _read_adapter(file) for key, file in files.items() if file is not None}
    modules = dict(model.named_modules())
    paths = sorted({name.rsplit(".", 1)[0] for _, weights in adapters.values() for name in weights})
    for file, (_, weights) in zip([f for f in files.values() if f is not None], adapters.values()):
        for path in paths:
            if path not in modules or (f"{path}.lora_a" in weights) != (f"{path}.lora_b" in weights):
                raise EdgequantError(f"{file} adapts {path}, which the model has not (or lacks lora_a / lora_b)",
                                     "convert the artifact again")
    layers = {path: lora_linear_class()(modules[path]) for path in paths}
    model.update_modules(tree_unflatten(list(layers.items())))

    def activate(key: str | None) -> None:
        scale, weights = adapters.get(key, (0.0, {}))
        for path, layer in layers.items():
            layer.set_update(weights.get(f"{path}.lora_a"), weights.get(f"{path}.lora_b"), scale)

    activate(None)
    mx.eval(model.parameters(), [w for _, weights in adapters.values() for w in weights.values()])
    return activate


def _read_adapter(weights_file: Path) -> tuple[float, dict]:
    """An mlx-lm adapter's scale and its lora_a / lora_b arrays by parameter name."""
    import mlx.core as mx

    scale = float(json.loads((weights_file.parent / CONFIG).read_text())["lora_parameters"]["scale"])
    return scale, mx.load(str(weights_file))


@lru_cache(maxsize=1)
def lora_linear_class():
    """`LoraLinear` (made at first use: mlx is imported only where a model is loaded)."""
    import mlx.nn as nn

    class LoraLinear(nn.Module):
        """A linear layer (float or quantized) plus the active adapter's low-rank update, if any;
        parameter names as mlx-lm's LoRA layer has them (`linear`, `lora_a`, `lora_b`)."""

        def __init__(self, linear):
            super().__init__()
            self.linear, self.scale = linear, 0.0

        def set_update(self, lora_a, lora_b, scale: float) -> None:
            """The update this layer adds from now on; none when `lora_a` is None."""
            self.scale = scale if lora_a is not None else 0.0
            self.lora_a, self.lora_b = (lora_a, lora_b) if lora_a is not None else (None, None)

        def __call__(self, x):
            if self.lora_a is None:
                return self.linear(x)
            update = (x @ self.lora_a) @ self.lora_b  # in the adapter's float32
            return self.linear(x) + (self.scale * update).astype(x.dtype)

    return LoraLinear
