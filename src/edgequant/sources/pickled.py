"""`--trust-pickle`: a Hugging Face folder whose weights are pickle files (`pytorch_model.bin`, or
shards listed in `pytorch_model.bin.index.json`) converted once to a safetensors folder in the cache.

The pickles are read with `torch.load(weights_only=True)`, whose unpickler builds only tensors and
plain containers and refuses any other object, so a checkpoint that carries code fails to load
instead of running it. Everything after this step reads the safetensors copy, as for any folder.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

from edgequant.atomic import atomic_dir
from edgequant.errors import EdgequantError
from edgequant.fingerprint import files_sha256
from edgequant.locks import build_once
from edgequant.paths import cache_dir
from edgequant.progress import note
from edgequant.sources.source import PICKLE_SUFFIXES, Source

WEIGHTS_NAME = "pytorch_model.bin"  # transformers' names for pickle weights
INDEX_NAME = "pytorch_model.bin.index.json"


def safetensors_copy(path: Path) -> Path:
    """The cached safetensors copy of a folder whose weights are only pickles (built once, then
    reused); any other path unchanged, for `load_source` to check as usual."""
    folder = Path(path).expanduser()
    if not _has_only_pickle_weights(folder):
        return path
    folder = folder.resolve()
    weights = _pickle_weights(folder)
    kept = _kept_files(folder)
    # keyed by every file the copy is made of: an edited config.json or tokenizer makes a new copy
    sha = files_sha256(weights + [f for item in kept for f in (_files(item) if item.is_dir() else [item])])
    target = cache_dir("sources") / f"{sha[:16]}-safetensors"
    copy = target / Source(folder, "hf", "").name  # keeps the source's name in artifacts and reports
    what = weights[0].name if len(weights) == 1 else f"{len(weights)} pickle shards"

    def build() -> None:
        note(f"converting {what} to safetensors with torch's weights_only loader (once; cached in {target})")
        with atomic_dir(target, replace=True) as tmp:
            _write_copy(weights, kept, tmp / copy.name)

    build_once(target, copy / "model.safetensors", "converting the pickle checkpoint to safetensors", build)
    return copy


def _has_only_pickle_weights(folder: Path) -> bool:
    return (folder.is_dir() and (folder / "config.json").is_file() and not any(folder.glob("*.safetensors"))
            and any(p.suffix in PICKLE_SUFFIXES for p in folder.iterdir()))


def _pickle_weights(folder: Path) -> list[Path]:
    """The weight files transformers would load: the shards its index names, else pytorch_model.bin.
    Other pickles (training_args.bin, optimizer.pt) are a trainer's state, not the model."""
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError, TypeError):
            shards = None
        # a shard is a file beside the index: a path elsewhere (../../) is not read
        if not shards or any(not isinstance(s, str) or Path(s).name != s for s in shards):
            raise EdgequantError(f"{index} is not a valid shard index (a weight_map of file names beside it)",
                                 "repair or re-download it from the model's repository")
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise EdgequantError(f"{folder} lacks the shard {missing[0]} that {INDEX_NAME} names",
                                 "download every shard of the checkpoint")
        return [folder / s for s in shards]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    found = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    raise EdgequantError(f"--trust-pickle reads the weights of a Hugging Face folder ({WEIGHTS_NAME} or shards "
                         f"listed in {INDEX_NAME}); {folder} holds {', '.join(found)}",
                         "convert it yourself with transformers' from_pretrained and "
                         "save_pretrained(..., safe_serialization=True), then pass the new folder")


def _kept_files(folder: Path) -> list[Path]:
    """Everything beside the weights that the copy keeps (config, tokenizer, generation settings):
    no pickle, no .bin index, nothing hidden (a clone's .git holds every revision)."""
    return sorted(p for p in folder.iterdir()
                  if p.suffix not in PICKLE_SUFFIXES and p.name != INDEX_NAME and not p.name.startswith("."))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _write_copy(weights: list[Path], kept: list[Path], out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    for item in kept:
        if item.is_dir():
            shutil.copytree(item, out / item.name)
        else:
            shutil.copy2(item, out / item.name)
    tensors = {}
    for weight_file in weights:
        tensors.update(_load_state_dict(weight_file))
    save_file(_unshared(tensors), out / "model.safetensors", metadata={"format": "pt"})


def _load_state_dict(path: Path) -> dict:
    import warnings

    import torch

    try:
        with warnings.catch_warnings():  # its advice on pickle protocols is for torch's developers
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise EdgequantError(f"torch.load(weights_only=True) refused {path} ({_reason(exc)}): it holds something other "
                             "than tensors, such as code that unpickling would run (none of it was run), or it is corrupt",
                             "get the model's safetensors weights from a source you trust, or download the file again") from None
    if not isinstance(state, dict) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise EdgequantError(f"{path} is not a state dict (a mapping of names to tensors)",
                             "save the model with save_pretrained(..., safe_serialization=True) and pass that folder")
    return state


def _reason(exc: Exception) -> str:
    """torch's own reason, without its advice to load again with weights_only=False: the last line
    of its message says what it met (an unsupported global, an opcode), the others are boilerplate."""
    lines = [line for line in str(exc).splitlines() if line.strip() and not line.startswith("Check the documentation")]
    return lines[-1].strip().rstrip(".") if lines else type(exc).__name__


def _unshared(tensors: dict) -> dict:
    """The tensors as save_file takes them: a pickle keeps tied weights (lm_head and the embedding)
    as one storage, which save_file refuses, so a tensor whose storage another already uses, or one
    not contiguous, gets its own contiguous copy (same dtype, same values)."""
    import torch

    seen, out = set(), {}
    for name, tensor in tensors.items():
        storage = tensor.untyped_storage().data_ptr()
        copy = storage in seen or not tensor.is_contiguous()
        out[name] = tensor.clone(memory_format=torch.contiguous_format) if copy else tensor
        seen.add(storage)
    return out
