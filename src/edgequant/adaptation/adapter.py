"""A LoRA adapter in PEFT's format: read, checked against a base model, fingerprinted.

A PEFT LoRA folder holds `adapter_config.json` and `adapter_model.safetensors`. For every adapted
Linear layer `<module>` the file has `base_model.model.<module>.lora_A.weight` (rank x in) and
`...lora_B.weight` (out x rank); the layer then computes `W x + scale * B A x` with
scale = lora_alpha / r (lora_alpha / sqrt(r) with rsLoRA; `alpha_pattern` and `rank_pattern`
override both per module). That is all edgequant needs to merge an adapter or hand it to a
runtime, so adapters using anything more (DoRA, extra trained modules, new token rows) are
refused with the reason rather than half-applied.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from edgequant.errors import EdgequantError
from edgequant.fingerprint import files_sha256
from edgequant.sources.safetensors_info import TensorInfo, read_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
_PAIR = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")  # PEFT may name the adapter: lora_A.default.weight
_UNSUPPORTED = {"use_dora": "DoRA", "modules_to_save": "fully trained extra modules",
                "trainable_token_indices": "trained token rows", "layer_replication": "layer replication"}


@dataclass(frozen=True)
class LoraPair:
    module: str  # the adapted Linear's name in the base model, e.g. model.layers.0.self_attn.q_proj
    a: str  # tensor names in the adapter file
    b: str
    rank: int
    in_features: int
    out_features: int
    scale: float


@dataclass(frozen=True)
class Adapter:
    path: Path
    config: dict
    fingerprint: str

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def pairs(self) -> list[LoraPair]:
        return _pairs(self.path / WEIGHTS_FILE, self.config)

    @property
    def rank(self) -> int:
        return int(self.config.get("r", 8))

    def to_json(self) -> dict:
        return {"path": str(self.path), "fingerprint": self.fingerprint, "rank": self.rank,
                "lora_alpha": self.config.get("lora_alpha"), "target_modules": sorted({p.module.rsplit(".", 1)[-1] for p in self.pairs}),
                "modules": len(self.pairs)}

    def check_base(self, tensors: list[TensorInfo], model_name: str) -> None:
        """Refuse an adapter whose layers the base does not have in the shapes it was trained on."""
        shapes = {t.name: t.shape for t in tensors}
        fix = ("pass the model the adapter was trained on (its adapter_config.json names it: "
               f"{self.config.get('base_model_name_or_path') or 'not recorded'})")
        for pair in self.pairs:
            weight = shapes.get(f"{pair.module}.weight")
            if weight is None:
                raise EdgequantError(f"adapter {self.name} adapts {pair.module}, which {model_name} does not have: "
                                     "it was trained for a different base model", fix)
            if tuple(weight) != (pair.out_features, pair.in_features):
                raise EdgequantError(f"adapter {self.name} expects {pair.module} of shape {pair.out_features} x "
                                     f"{pair.in_features}; {model_name} has {' x '.join(map(str, weight))}: it was "
                                     "trained for a different base model", fix)


def load_adapter(path: str | Path) -> Adapter:
    """Read and check a PEFT LoRA folder (an mlx-lm adapter folder is named as such and refused)."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise EdgequantError(f"no adapter folder at {path}", "pass the folder `edgequant finetune` or PEFT's save_pretrained wrote")
    config_path, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if (path / "adapters.safetensors").is_file() and not weights.is_file():
        raise EdgequantError(f"{path} is an mlx-lm adapter; edgequant reads adapters in PEFT's format",
                             "convert it with `edgequant finetune --engine mlx` output, or save it with PEFT")
    if not config_path.is_file() or not weights.is_file():
        missing = CONFIG_FILE if not config_path.is_file() else WEIGHTS_FILE
        raise EdgequantError(f"{path} is not a PEFT LoRA adapter: {missing} is missing",
                             "pass the folder PEFT's save_pretrained (or `edgequant finetune`) wrote")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise EdgequantError(f"{config_path} is not valid JSON ({type(exc).__name__})", "re-save the adapter with PEFT") from None
    _check_config(config, path)
    adapter = Adapter(path, config, files_sha256([config_path, weights]))
    if not adapter.pairs:
        raise EdgequantError(f"{weights} holds no lora_A / lora_B weights", "re-save the adapter with PEFT")
    return adapter


def _check_config(config: dict, path: Path) -> None:
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise EdgequantError(f"{path} is a PEFT {kind} adapter; edgequant takes LoRA adapters", "train a LoRA adapter")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise EdgequantError(f"adapter {path.name} uses {what} ({key}), which edgequant does not apply",
                                 "train a plain LoRA adapter (no DoRA, no modules_to_save, no trained token rows)")


def _pairs(weights: Path, config: dict) -> list[LoraPair]:
    found: dict[str, dict[str, TensorInfo]] = {}
    for tensor in read_header(weights):
        match = _PAIR.match(tensor.name)
        if match is None:
            raise EdgequantError(f"{weights} holds {tensor.name}, which is not a LoRA A or B matrix",
                                 "edgequant applies LoRA matrices only: train a plain LoRA adapter")
        found.setdefault(match["module"], {})[match["which"]] = tensor
    pairs = []
    for name, parts in sorted(found.items()):
        if set(parts) != {"A", "B"} or len(parts["A"].shape) != 2 or len(parts["B"].shape) != 2:
            raise EdgequantError(f"{weights}: {name} lacks a 2-D lora_A or lora_B", "re-save the adapter with PEFT")
        a, b = parts["A"], parts["B"]
        if a.shape[0] != b.shape[1]:
            raise EdgequantError(f"{weights}: {name}'s lora_A has rank {a.shape[0]}, its lora_B {b.shape[1]}",
                                 "re-save the adapter with PEFT")
        module = name.removeprefix(PREFIX)
        pairs.append(LoraPair(module, a.name, b.name, a.shape[0], a.shape[1], b.shape[0], scale_of(config, module, a.shape[0])))
    return pairs


def scale_of(config: dict, module: str, rank: int) -> float:
    """The factor on B A for `module`: lora_alpha / r, or / sqrt(r) with rsLoRA, per-module patterns first."""
    alpha = _by_pattern(config.get("alpha_pattern") or {}, module, config.get("lora_alpha", 8))
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _by_pattern(patterns: dict, module: str, default):
    """PEFT's per-module override: the pattern that matches the module name's end."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?{pattern}$", module):
            return value
    return default
