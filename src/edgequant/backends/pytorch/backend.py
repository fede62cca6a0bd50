"""The PyTorch backend: the baseline (the source run by transformers in float32) and `pytorch:*`
artifacts, which are the source saved at another float dtype with its tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgequant.backend import Backend
from edgequant.spec import Precision

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class PyTorchBackend(Backend):
    name = "pytorch"
    display_name = "PyTorch"
    use_case = "the reference: training, research, servers"
    extra = "torch"
    requires = ("torch", "transformers")
    packages = ("torch", "transformers")
    precisions = {
        "fp32": Precision("fp32", 32, 32.0, "float32 safetensors, run by transformers (the baseline)"),
        "fp16": Precision("fp16", 16, 16.0, "float16 safetensors, run by transformers"),
        "bf16": Precision("bf16", 16, 16.0, "bfloat16 safetensors, run by transformers"),
    }

    def convert(self, source, spec, out_dir: Path) -> dict[str, Any]:
        import torch
        from transformers import AutoModelForCausalLM

        from edgequant.backends._shared.side_files import copy_tokenizer

        model = AutoModelForCausalLM.from_pretrained(source.hf_dir, dtype=getattr(torch, _DTYPES[spec.precision]))
        model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="100GB")
        copy_tokenizer(out_dir, source.hf_dir)
        return {"model_file": "model.safetensors", "dtype": _DTYPES[spec.precision]}

    def open(self, artifact, *, n_ctx: int, need_logits: bool, threads: int):
        from edgequant.backends.pytorch.runner import TorchRunner

        return TorchRunner(artifact.path, name=str(artifact.spec), n_ctx=n_ctx, threads=threads,
                           dtype=_DTYPES[artifact.spec.precision])

    def open_source(self, source, *, n_ctx: int, threads: int):
        """The baseline: the source model itself in float32."""
        from edgequant.backends.pytorch.runner import TorchRunner

        stored = {"BF16": "bfloat16", "F16": "float16"}.get(source.weight_dtype)
        return TorchRunner(source.hf_dir, name=f"pytorch:fp32 ({source.name})", n_ctx=n_ctx, threads=threads,
                           stored_dtype=stored)

    def open_task_source(self, source, *, threads: int):
        """The baseline of a model of another task (a sentence encoder, an image classifier), in float32."""
        from edgequant.sources.tasks import IMAGE_CLASSIFICATION

        if source.task == IMAGE_CLASSIFICATION:
            from edgequant.backends.pytorch.vision import open_vision_source

            return open_vision_source(source, threads=threads)
        from edgequant.backends.pytorch.encoder import TorchEncoderRunner

        return TorchEncoderRunner(source, threads=threads)
