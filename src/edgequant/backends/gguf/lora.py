"""`gguf:PREC?lora=separate`: the base model converted as usual, the LoRA adapter beside it.

The artifact holds the base model quantized exactly as `gguf:PREC` of the base would be (from the
same cached float intermediate) and `adapter.gguf`, the adapter as llama.cpp's own
`convert_lora_to_gguf.py` writes it. llama.cpp applies it to every context edgequant creates (the
generator's, the scorer's, the server's batch decoder's), so the artifact computes
`W x + (alpha / r) B A x` with W quantized and the adapter in float. The artifact's source stays
the merged float folder, so evaluation compares base + adapter against the adapted float model.

llama.cpp reads `adapter.lora.alpha` from the file and multiplies each B A by alpha / r, r taken
from the tensor's shape; the scale given at run time multiplies that, so it is 1.0. Adapters
whose factor is not one alpha / r for every module (rsLoRA, per-module alpha or rank patterns) or
whose tensors carry an adapter name are handed to the converter as a copy with the names
llama.cpp expects and each B scaled so that alpha / r gives PEFT's factor.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgequant import children
from edgequant.errors import EdgequantError

ADAPTER_FILE = "adapter.gguf"
RUNTIME_SCALE = 1.0  # llama.cpp applies the file's alpha / r itself
_REFUSED = "failed to apply lora adapter:"  # llama.cpp's log line when an adapter does not fit the model


def convert_separate(source, spec, out_dir: Path, convert_base: Callable, adapter_type: str) -> dict[str, Any]:
    """Write the adapter of the merged folder `source` (first: it takes seconds, and may be refused),
    then convert its base model with `convert_base`."""
    from edgequant.adaptation.merge import merged_parts

    base, adapter = merged_parts(source)
    started = time.perf_counter()
    lora = write_adapter(base, adapter, out_dir / ADAPTER_FILE, adapter_type)
    seconds = round(time.perf_counter() - started, 3)
    info = convert_base(base, spec, out_dir)
    info["adapter"], info["timings"]["adapter_s"] = lora, seconds
    return info


def write_adapter(base, adapter, outfile: Path, outtype: str) -> dict[str, Any]:
    """`adapter` as a GGUF LoRA file for `base` (llama.cpp's converter, offline); facts for the manifest."""
    with tempfile.TemporaryDirectory(prefix="lora-gguf-") as tmp:
        folder, alpha = _for_llama_cpp(adapter, Path(tmp))
        _run_lora_converter(folder, base.hf_dir, outfile, outtype, Path(tmp) / "convert-lora.log")
    return {"mode": "separate", "file": outfile.name, "type": outtype, "scale": RUNTIME_SCALE,
            # llama.cpp's factor on B A: alpha / r (r: each module's rank), times the scale; per-module
            # factors that differ from it (rsLoRA, PEFT's patterns) are folded into B ("rescaled")
            "lora_alpha": alpha, "rank": adapter.rank, "factor": alpha / adapter.rank, "rescaled": folder != adapter.path,
            "adapter": adapter.to_json(),
            "base": {"path": str(base.path), "fingerprint": base.fingerprint, "name": base.name}}


def _for_llama_cpp(adapter, tmp: Path) -> tuple[Path, float]:
    """The adapter folder llama.cpp's converter reads right, and the alpha it will write: the
    adapter itself when every module's factor is alpha / r and its tensors have PEFT's plain
    names, else a copy with plain names and each B scaled by PEFT's factor / (alpha / r)."""
    from edgequant.adaptation.adapter import CONFIG_FILE, PREFIX, WEIGHTS_FILE

    alpha = float(adapter.config.get("lora_alpha", 8)) or 1.0  # PEFT's default; llama.cpp reads 0 as "no alpha"
    plain = [(f"{PREFIX}{p.module}.lora_A.weight", f"{PREFIX}{p.module}.lora_B.weight") for p in adapter.pairs]
    as_is = "lora_alpha" in adapter.config and all(
        (p.a, p.b) == names and math.isclose(p.scale, alpha / p.rank, rel_tol=1e-6) for p, names in zip(adapter.pairs, plain))
    if as_is:
        return adapter.path, alpha
    from safetensors.torch import load_file, save_file

    weights = load_file(adapter.path / WEIGHTS_FILE)
    tensors = {}
    for pair, (a, b) in zip(adapter.pairs, plain):
        tensors[a] = weights[pair.a].contiguous()
        tensors[b] = (weights[pair.b].float() * (pair.scale * pair.rank / alpha)).to(weights[pair.b].dtype).contiguous()
    folder = tmp / adapter.path.name
    folder.mkdir()
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "pt"})
    config = {**adapter.config, "lora_alpha": alpha, "use_rslora": False, "alpha_pattern": {}, "rank_pattern": {}}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return folder, alpha


def _run_lora_converter(adapter_dir: Path, base_dir: Path, outfile: Path, outtype: str, log_path: Path) -> None:
    """convert_lora_to_gguf.py, offline: `--base` gives it the base model's config."""
    from edgequant.backends.gguf.tools import converter_dir, keep_log

    tool = converter_dir()
    cmd = [sys.executable, str(tool / "convert_lora_to_gguf.py"), str(adapter_dir), "--base", str(base_dir),
           "--outfile", str(outfile), "--outtype", outtype]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with log_path.open("w") as log:
        result = children.run(cmd, cwd=tool, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode == 0 and outfile.is_file():
        return
    tail = "\n".join(log_path.read_text(errors="replace").strip().splitlines()[-5:])
    raise EdgequantError(f"llama.cpp's LoRA converter failed on adapter {adapter_dir.name}:\n{tail}",
                         f"see the full log at {keep_log(log_path)}; ?lora=merged (the default) merges the adapter instead")


# -- run time --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AdapterFile:
    """An artifact's adapter: the GGUF LoRA file and the scale llama.cpp is given for it."""

    path: Path
    scale: float = RUNTIME_SCALE


def adapter_file(artifact) -> AdapterFile | None:
    """The adapter a `?lora=separate` artifact applies at run time, or None."""
    lora = artifact.manifest.get("details", {}).get("adapter")
    return AdapterFile(artifact.adapter_path, float(lora["scale"])) if lora else None


class LoadedAdapter:
    """A GGUF LoRA adapter loaded for one llama.cpp model, applied to each of its contexts.

    It lives as long as the model: free it after the contexts that use it and before the model."""

    def __init__(self, model, file: AdapterFile):
        import llama_cpp

        from edgequant.backends.gguf.tools import QuantizeLog

        self._ll = llama_cpp
        with QuantizeLog() as log:
            pointer = llama_cpp.llama_adapter_lora_init(model, str(file.path).encode())
        if not pointer:  # llama.cpp says why in its log: a tensor the model lacks, or of another shape
            reasons = [line.partition(_REFUSED)[2].strip() for line in log.text().splitlines() if _REFUSED in line]
            raise EdgequantError(f"llama.cpp refused the LoRA adapter {file.path}: "
                                 f"{reasons[-1] if reasons else 'it could not be loaded'}",
                                 "use the adapter converted with this artifact's base model: re-create the artifact "
                                 "with --force")
        self._pointer = pointer
        self._adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(pointer)
        self._scales = (ctypes.c_float * 1)(file.scale)

    def apply(self, ctx) -> None:
        """Make `ctx` compute with the adapter (contexts hold their own adapter set)."""
        set_adapter(ctx, self)

    def free(self) -> None:
        if self._pointer:
            self._ll.llama_adapter_lora_free(self._pointer)
            self._pointer = None


def set_adapter(ctx, adapter: LoadedAdapter | None) -> None:
    """Make `ctx` compute with `adapter`, or with the base alone. llama.cpp ignores a set equal to
    the context's current one; a different one costs a re-plan of its graph, not its KV cache."""
    import llama_cpp

    given = (adapter._adapters, 1, adapter._scales) if adapter is not None else (None, 0, None)
    rc = llama_cpp.llama_set_adapters_lora(ctx, *given)
    if rc != 0:
        raise RuntimeError(f"llama_set_adapters_lora failed with code {rc}")
