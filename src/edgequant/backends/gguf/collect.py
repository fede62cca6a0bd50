"""Importance matrices of a source: computed, cached for `imatrix=auto`, and loaded for the quantizer.

The computation runs the source's float model in PyTorch over calibration text, with a hook on
every linear layer summing its squared inputs per column.

Why PyTorch and not llama.cpp's evaluation callback: the float source is the model every artifact
is compared with, its activations are float32 whatever the GGUF's type, and the hooks see the
inputs of each matrix directly, for every architecture transformers runs. llama.cpp would need its
internal tensor struct read through ctypes. The two agree: tests/test_gguf_imatrix.py computes the
same statistics through llama.cpp's callback on the float GGUF and compares them.

Names are mapped to the GGUF's own with gguf-py's tensor name table for the GGUF's architecture,
and each mapped name must be a matrix of the float GGUF with the same input width.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgequant.backends._shared.calibration import calibration_windows
from edgequant.backends._shared.intermediates import cached_intermediate
from edgequant.backends.gguf.imatrix import ImportanceMatrix, read_imatrix, write_imatrix
from edgequant.backends.gguf.tools import float_intermediate
from edgequant.errors import EdgequantError
from edgequant.fingerprint import file_sha256
from edgequant.progress import track

CHUNK = 512  # tokens per evaluated chunk, llama-imatrix's default context
IMATRIX_TOKENS = 32768  # calibration tokens of imatrix=auto: 64 chunks of 512


def collect_imatrix(source, float_gguf: Path, token_ids: list[int], dataset: str, chunk: int = CHUNK) -> ImportanceMatrix:
    """Sums of squared inputs of every weight matrix of `source` over `token_ids`, cut into
    independent chunks of `chunk` tokens (a remainder shorter than a chunk is dropped)."""
    import torch
    from transformers import AutoModelForCausalLM

    n_chunks = len(token_ids) // chunk
    if n_chunks == 0:
        raise EdgequantError(f"{len(token_ids)} calibration tokens are fewer than one chunk of {chunk}",
                             f"give at least {chunk} tokens of calibration text")
    model = AutoModelForCausalLM.from_pretrained(source.hf_dir, dtype=torch.float32).eval()
    names = _gguf_names(model, float_gguf)
    sums = {name: torch.zeros(module.in_features, dtype=torch.float64) for module, name in names.items()}
    rows = dict.fromkeys(names.values(), 0)

    def accumulate(module, inputs, _output):
        x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
        name = names[module]
        sums[name] += (x * x).sum(0)
        rows[name] += x.shape[0]

    # The output layer's input is the decoder's last hidden state: it is summed from there, and the
    # vocabulary-wide matmul itself (a fifth of the work for a small model) is never run.
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    hooks = [module.register_forward_hook(accumulate) for module in names if module is not head]
    try:
        with torch.inference_mode():
            for i in track(range(n_chunks), "collecting the importance matrix", total=n_chunks):
                hidden = decoder(torch.tensor([token_ids[i * chunk:(i + 1) * chunk]]), use_cache=False).last_hidden_state
                if head in names:
                    accumulate(head, (hidden,), None)
    finally:
        for hook in hooks:
            hook.remove()
    return ImportanceMatrix({n: s.float().numpy().reshape(1, -1) for n, s in sums.items()},
                            {n: np.array([r], dtype=np.float32) for n, r in rows.items()},
                            [dataset], n_chunks, chunk)


def _gguf_names(model, float_gguf: Path) -> dict:
    """Each linear module of `model` -> the GGUF name of its weight, for the matrices the float
    GGUF holds (a tied output layer has none of its own and is left out, as in llama.cpp)."""
    import gguf
    import torch

    reader = gguf.GGUFReader(float_gguf)
    arch_name = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}.get(arch_name)
    if arch is None:
        raise EdgequantError(f"gguf-py has no tensor names for the {arch_name!r} architecture",
                             "upgrade the gguf package, or quantize without an importance matrix")
    widths = {t.name: int(t.shape[0]) for t in reader.tensors if len(t.shape) == 2}
    table = gguf.get_tensor_name_map(arch, model.config.num_hidden_layers)
    found = {}
    for hf_name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        base = table.get_name(hf_name)
        name = f"{base}.weight" if base else None
        if name in widths:
            if widths[name] != module.in_features:
                raise EdgequantError(f"{hf_name} takes {module.in_features} inputs but the GGUF's {name} has {widths[name]}",
                                     "report this architecture: its tensors are laid out differently in the GGUF")
            found[module] = name
    if not found:
        raise EdgequantError(f"no weight matrix of the {arch_name} model could be matched to its GGUF tensors",
                             "report this architecture, or quantize without an importance matrix")
    return found


def load_importance(source, value: str) -> tuple[dict | None, dict | None]:
    """The importance weights `imatrix=` names (none, auto, or a file) and what the manifest says of them."""
    if not value:
        return None, None
    path = auto_imatrix(source) if value == "auto" else Path(value).expanduser().resolve()
    matrix = read_imatrix(path)
    return matrix.importance(), {"requested": value, "file": str(path), "sha256": file_sha256(path),
                                 "datasets": matrix.datasets, "chunks": matrix.chunk_count,
                                 "chunk_size": matrix.chunk_size, "tensors": len(matrix.sums)}


def auto_imatrix(source) -> Path:
    """The importance matrix of `source` over the first IMATRIX_TOKENS tokens of the calibration
    text, computed once and cached beside the float intermediates."""
    name = "imatrix.gguf"
    folder = cached_intermediate(
        source, f"imatrix-calibration-{IMATRIX_TOKENS}", name,
        lambda tmp: write_imatrix(compute_imatrix(source, None, "edgequant calibration text", IMATRIX_TOKENS), tmp / name),
        f"computing the importance matrix of {source.name} over {IMATRIX_TOKENS} calibration tokens")
    return folder / name


def compute_imatrix(source, text: str | None, dataset: str, tokens: int):
    """An importance matrix of `source` over the first `tokens` tokens of `text` (None: the
    calibration text, never the evaluation text)."""
    if tokens < CHUNK:
        raise EdgequantError(f"{tokens} calibration tokens are fewer than one chunk of {CHUNK}", f"ask for at least {CHUNK} tokens")
    chunks = tokens // CHUNK
    windows = calibration_windows(source.hf_dir, chunks, CHUNK, text,
                                  fix="give a longer calibration text or fewer tokens (at most {fit} chunks of 512 fit)")
    return collect_imatrix(source, float_intermediate(source), [t for w in windows for t in w], dataset)
