"""Random PEFT LoRA adapters for the tiny models, written from tensors (no training): the
`?lora=separate` tests check arithmetic, so any non-zero A and B will do."""

from __future__ import annotations

import json

import numpy as np


def projections(mlp: int) -> dict[str, tuple[int, int]]:
    """A tiny Llama's decoder-layer projections and their (out, in) shapes: hidden 256, 4 heads of 64
    with 2 KV heads, MLP `mlp` wide (512 for tests/tiny_model.py's, 768 for the ONNX tiny model)."""
    return {"self_attn.q_proj": (256, 256), "self_attn.k_proj": (128, 256), "self_attn.v_proj": (128, 256),
            "self_attn.o_proj": (256, 256), "mlp.gate_proj": (mlp, 256), "mlp.up_proj": (mlp, 256),
            "mlp.down_proj": (256, mlp)}


def write_random_adapter(out, base, modules: dict[str, tuple[int, int]], *, rank: int = 4, alpha: float = 8, seed: int = 0,
                         rank_pattern: dict[str, int] | None = None, **config):
    """A PEFT LoRA folder adapting `modules` ({"self_attn.q_proj": (out, in), ...}, or "lm_head") of
    both layers of `base`: A and B drawn from N(0, 0.05), each module at its `rank_pattern` rank or
    `rank`; `config` adds adapter_config.json keys (alpha_pattern, use_rslora, ...)."""
    from safetensors.numpy import save_file

    rng, ranks = np.random.default_rng(seed), rank_pattern or {}
    tensors = {}
    for layer in range(2):
        for module, (rows, cols) in modules.items():
            name = f"base_model.model.{module}" if module == "lm_head" else f"base_model.model.model.layers.{layer}.{module}"
            module_rank = ranks.get(module.rsplit(".", 1)[-1], rank)
            tensors[f"{name}.lora_A.weight"] = rng.normal(0, 0.05, (module_rank, cols)).astype(np.float32)
            tensors[f"{name}.lora_B.weight"] = rng.normal(0, 0.05, (rows, module_rank)).astype(np.float32)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    settings = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "base_model_name_or_path": str(base),
                "target_modules": sorted({m.rsplit(".", 1)[-1] for m in modules}), "task_type": "CAUSAL_LM",
                **({"rank_pattern": ranks} if ranks else {}), **config}
    (out / "adapter_config.json").write_text(json.dumps(settings))
    return out


def decode_together(runner, prompts: list[list[int]], params) -> list[list[int]]:
    """Greedy tokens of the runner's batch decoder (the server's) for `prompts` decoded at once,
    `params.max_tokens` steps each."""
    decoder = runner.batch_decoder(len(prompts), 128)
    try:
        for seq_id, prompt in enumerate(prompts):
            decoder.start(seq_id, prompt, params)
        steps = [decoder.step() for _ in range(params.max_tokens)]
    finally:
        decoder.close()
    return [[step[seq_id] for step in steps] for seq_id in range(len(prompts))]
