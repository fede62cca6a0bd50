"""Merge a LoRA adapter into its base model's float weights: a new Hugging Face folder, cached.

`W' = W + scale * B A` for every adapted Linear, computed in float32 and stored in the base's own
dtype, every other file of the base copied as it is. The merged folder is an ordinary source:
every format converts it unchanged, its artifacts are cached under its own fingerprint, and the
evaluation's baseline (the artifact's source) is the adapted float model, so figures say what
conversion and quantization did to the fine-tuned model.

Merging before quantizing is deliberate: mlx-lm's `fuse` on a 4-bit base dequantizes, adds the
update and quantizes again, which rounds the update twice.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from edgequant.adaptation.adapter import CONFIG_FILE, WEIGHTS_FILE, Adapter, load_adapter
from edgequant.atomic import atomic_dir
from edgequant.errors import EdgequantError
from edgequant.locks import build_once
from edgequant.paths import cache_dir
from edgequant.progress import step
from edgequant.sources.source import ADAPTER_RECORD, Source, load_source

ADAPTER_COPY = "edgequant-adapter"  # in a merged folder: the adapter's own files, as merged
MERGED_FIX = "use ?lora=merged (the default), which converts the model with the adapter merged into its float weights"
_IN_BLOCK = re.compile(r"(^|\.)layers\.\d+\.")  # a module inside a transformer block, by its Hugging Face name


def adapted_model(model: str | Path | None, adapter: str | Path) -> Path:
    """The folder of `model` with `adapter` merged (built once, then reused): pass it wherever a MODEL goes."""
    source = load_source(model)
    if source.kind not in ("hf", "gguf"):
        raise EdgequantError(f"{source.name} is an image classifier; LoRA adapters apply to language models and "
                             "encoders from a Hugging Face folder or a GGUF file", "drop --adapter")
    lora = load_adapter(adapter)
    lora.check_base(source.tensors, source.name)
    folder = cache_dir("adapted") / f"{source.fingerprint[:16]}-{lora.fingerprint[:16]}"
    merged = folder / f"{source.name}-with-{lora.name}"  # no "+": transformers warns on names it cannot make a module of
    what = f"merging adapter {lora.name} into {source.name}"

    def merge_in_place() -> None:
        with step(f"{what} (cached)"), atomic_dir(folder, replace=True) as tmp:
            merge_into(source, lora, tmp / merged.name)

    build_once(folder, merged / ADAPTER_RECORD, what, merge_in_place)
    return merged


def merge_into(source: Source, adapter: Adapter, out: Path) -> None:
    """Write `source` with `adapter` merged to the new folder `out`."""
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    lora = load_file(adapter.path / WEIGHTS_FILE)
    pending = {f"{pair.module}.weight": pair for pair in adapter.pairs}
    for item in sorted(source.hf_dir.iterdir()):
        if item.suffix == ".safetensors":
            tensors = load_file(item)
            for name in pending.keys() & tensors.keys():
                pair = pending.pop(name)
                update = lora[pair.b].to(torch.float32) @ lora[pair.a].to(torch.float32)
                tensors[name] = (tensors[name].to(torch.float32) + pair.scale * update).to(tensors[name].dtype)
            save_file(tensors, out / item.name, metadata={"format": "pt"})
        elif item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy2(item, out / item.name)
    if pending:  # check_base saw these names in the headers: a shard changed under us
        raise EdgequantError(f"{source.name} changed while merging: {sorted(pending)[0]} was not found", "run the command again")
    kept = out / ADAPTER_COPY  # the adapter travels with the merge: `?lora=separate` never needs its first path again
    kept.mkdir()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        shutil.copy2(adapter.path / name, kept / name)
    record = {"base": source.to_json(), "adapter": adapter.to_json()}
    (out / ADAPTER_RECORD).write_text(json.dumps(record, indent=2))


def merged_parts(source: Source, blocks_only: str | None = None) -> tuple[Source, Adapter]:
    """The base model and the adapter `adapted_model` merged into `source`, both unchanged since:
    what a format that keeps the adapter beside its base (`?lora=separate`) converts. With
    `blocks_only` (the format's name), an adapter on a layer outside the transformer blocks (the
    LM head, the embedding) is refused: that format applies adapters to the blocks only."""
    record = source.adaptation
    if record is None:
        raise EdgequantError(f"?lora=separate keeps a LoRA adapter beside its base model, and {source.name} has no "
                             "adapter merged into it", "pass the adapter with --adapter FOLDER (MODEL is then its base "
                             "model), or drop ?lora=separate")
    kept = source.path / ADAPTER_COPY  # merges made before the copy was kept name only the first path
    base_path, adapter_path = Path(record["base"]["path"]), kept if kept.is_dir() else Path(record["adapter"]["path"])
    for what, path in (("base model", base_path), ("adapter", adapter_path)):
        if not path.exists():
            raise EdgequantError(f"the {what} {path} that {source.name} was merged from is gone",
                                 "restore it, or run again with --adapter on the model and adapter you have")
    base, adapter = load_source(base_path), load_adapter(adapter_path)
    for what, now, then in (("base model", base, record["base"]), ("adapter", adapter, record["adapter"])):
        if now.fingerprint != then["fingerprint"]:
            raise EdgequantError(f"the {what} {now.path} has changed since {source.name} was merged from it",
                                 "run again with --adapter (the merge is then redone for the files as they are now)")
    outside = [pair.module for pair in adapter.pairs if blocks_only and not _IN_BLOCK.search(pair.module)]
    if outside:
        raise outside_blocks(adapter.name, outside[0], blocks_only)
    return base, adapter


def outside_blocks(adapter_name: str, module: str, fmt: str) -> EdgequantError:
    return EdgequantError(f"adapter {adapter_name} adapts {module}, outside the transformer blocks; ?lora=separate on "
                          f"{fmt} applies adapters to the blocks' projections only", MERGED_FIX)
