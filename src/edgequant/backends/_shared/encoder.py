"""Sentence encoders: one tokenizer for every runner, the pooled PyTorch module (the baseline),
and the float32 ONNX graph the ONNX, OpenVINO and QNN formats start from (each quantizes it its
own way), made once per source.

Every runner but llama.cpp's tokenizes with `EncoderTokenizer` (the `tokenizers` library on the
source's tokenizer.json, no transformers), so all see the same ids. The graph takes `input_ids`,
`attention_mask` and `token_type_ids` (int64, batch x tokens) and returns `sentence_embedding`
(batch x dim), the vector sentence-transformers would give, so no runner needs torch to pool.
The encoder is traced with eager attention, the plainest graph for every runtime to read; the
tests check the fp32 export against PyTorch (1st-percentile cosine above 0.99999).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from edgequant.errors import EdgequantError
from edgequant.progress import engine_warnings_hidden

INPUTS = ("input_ids", "attention_mask", "token_type_ids")
OUTPUT = "sentence_embedding"
MODEL_FILE = "model.onnx"
SETTINGS_FILE = "encoder.json"  # pooling, normalisation and length limit, for the runners
_SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json")
_OPSET = 17
CALIBRATION_BATCH = 16  # sentences per calibration batch


def float_encoder_onnx(source) -> Path:
    """The cached folder holding the float32 graph, the tokenizer and `encoder.json`."""
    from edgequant.backends._shared.intermediates import cached_intermediate

    return cached_intermediate(source, "encoder-onnx", MODEL_FILE, lambda tmp: _export(source, tmp),
                               f"exporting {source.name} to a float32 ONNX graph with its pooling")


def copy_runtime_files(folder: Path, out_dir: Path) -> None:
    """The tokenizer files and `encoder.json` an encoder artifact carries to run on its own."""
    for name in (*_SIDE_FILES, SETTINGS_FILE):
        if (folder / name).is_file():
            shutil.copyfile(folder / name, out_dir / name)


class EncoderTokenizer:
    """Texts -> the graph's int64 inputs: truncated at the encoder's limit, padded to the longest."""

    def __init__(self, tokenizer_json: Path, max_tokens: int):
        from tokenizers import Tokenizer

        self.max_tokens = max_tokens
        self._tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self._tokenizer.enable_truncation(max_tokens)
        self._tokenizer.no_padding()

    @classmethod
    def of_artifact(cls, folder: Path) -> "EncoderTokenizer":
        """The tokenizer an exported encoder carries, with the limit its `encoder.json` states."""
        return cls(folder / "tokenizer.json", int(json.loads((folder / SETTINGS_FILE).read_text())["max_tokens"]))

    def count(self, texts) -> int:
        """Tokens of the texts as the encoder sees them (truncated, with its special tokens)."""
        return sum(len(e.ids) for e in self._tokenizer.encode_batch(list(texts)))

    def __call__(self, texts) -> dict:
        import numpy as np

        encoded = self._tokenizer.encode_batch(list(texts))
        width = max(len(e.ids) for e in encoded)
        feeds = {name: np.zeros((len(encoded), width), dtype=np.int64) for name in INPUTS}
        for row, e in enumerate(encoded):
            feeds["input_ids"][row, :len(e.ids)] = e.ids
            feeds["attention_mask"][row, :len(e.ids)] = 1
            feeds["token_type_ids"][row, :len(e.ids)] = e.type_ids
        return feeds


def pooled_encoder(hf_dir: Path, settings):
    """The source's encoder with its pooling and normalisation, float32, eager attention, eval mode."""
    import torch
    from transformers import AutoModel

    model = AutoModel.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return _pooled_module()(model, settings.pooling, settings.normalize).eval()


def write_settings(settings, out: Path) -> None:
    (out / SETTINGS_FILE).write_text(json.dumps({"max_tokens": settings.max_tokens, "pooling": settings.pooling,
                                                 "normalize": settings.normalize}, indent=2))


def refuse_options(spec, allowed: tuple[str, ...], source) -> None:
    """A spec option the encoder path does not read is refused, never silently ignored."""
    given = sorted(set(spec.options) - set(allowed))
    if given:
        raise EdgequantError(f"option {given[0]} of {spec} applies to causal LMs, not to the sentence encoder {source.name}",
                             f"drop {given[0]}=" + (f" (an encoder takes {', '.join(allowed)})" if allowed else ""))


def calibration_feeds(exported: Path, batches: int) -> list[dict]:
    """`batches` batches of calibration sentences, tokenized as the runners will."""
    from edgequant.measurement.taskdata import calibration_sentences

    sentences = calibration_sentences(batches * CALIBRATION_BATCH)
    if len(sentences) < batches * CALIBRATION_BATCH:
        raise EdgequantError(f"the calibration text has {len(sentences)} sentences; {batches} batches of "
                             f"{CALIBRATION_BATCH} need {batches * CALIBRATION_BATCH}",
                             f"ask for samples<={len(sentences) // CALIBRATION_BATCH}")
    tokenizer = EncoderTokenizer.of_artifact(exported)
    return [tokenizer(sentences[i:i + CALIBRATION_BATCH]) for i in range(0, len(sentences), CALIBRATION_BATCH)]


def _export(source, out: Path) -> None:
    import torch

    pooled = pooled_encoder(source.hf_dir, source.encoder)
    example = _example_inputs(torch, pooled.encoder.config.vocab_size)
    dynamic = {name: {0: "batch", 1: "tokens"} for name in INPUTS} | {OUTPUT: {0: "batch"}}
    # The TorchScript exporter (dynamo=False) needs no onnxscript; torch 2.13 warns it will go.
    with torch.no_grad(), engine_warnings_hidden():
        torch.onnx.export(pooled, example, str(out / MODEL_FILE), dynamo=False, input_names=list(INPUTS),
                          output_names=[OUTPUT], dynamic_axes=dynamic, opset_version=_OPSET)
    for name in _SIDE_FILES:
        if (source.hf_dir / name).is_file():
            shutil.copyfile(source.hf_dir / name, out / name)
    write_settings(source.encoder, out)


def _example_inputs(torch, vocab_size: int):
    """Two rows of different lengths (the shorter padded), so tracing sees a real mask."""
    ids = torch.randint(1000 % vocab_size, vocab_size, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    return ids, mask, torch.zeros_like(ids)


def _pooled_module():
    import torch

    class Pooled(torch.nn.Module):
        """The encoder, then its pooling over the attention mask, then unit length."""

        def __init__(self, encoder, pooling: str, normalize: bool):
            super().__init__()
            self.encoder, self.pooling, self.normalize = encoder, pooling, normalize

        def forward(self, input_ids, attention_mask, token_type_ids):
            states = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=token_type_ids).last_hidden_state
            if self.pooling == "cls":
                pooled = states[:, 0]
            else:
                weights = attention_mask.unsqueeze(-1).to(states.dtype)
                pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    return Pooled
