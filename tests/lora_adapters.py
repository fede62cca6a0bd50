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


def assert_served_with_their_adapters(tasks: dict, prompts: list[str], batches=(1, 4)) -> None:
    """`tasks` (served name -> artifact) share one base (`registry.serving_groups` puts them in one
    group), and a worker over that one loaded base answers requests naming each, queued in
    alternation, with the text each artifact gives served by itself: one request at a time and with
    `batches` requests decoded together."""
    import asyncio

    from edgequant.registry import open_runner, open_shared_runner, serving_groups
    from edgequant.runner import GenerateParams
    from edgequant.serving.metrics import Metrics
    from edgequant.serving.scheduling import ModelWorker
    from serve_helpers import submit_all

    assert serving_groups([a.path for a in tasks.values()]) == [list(range(len(tasks)))]

    def answers(worker, requests) -> list[str]:
        try:
            return [c.text for c in asyncio.run(submit_all(worker, [p for _, p in requests],
                                                           [GenerateParams(max_tokens=10, adapter=n) for n, _ in requests]))]
        finally:
            worker.stop()

    want = {name: answers(ModelWorker(name, open_runner(a.path, n_ctx=128, need_logits=False), 16, Metrics()),
                          [(None, p) for p in prompts]) for name, a in tasks.items()}
    assert len({tuple(texts) for texts in want.values()}) == len(tasks)  # each adapter changes the answers
    requests = [(name, prompt) for prompt in prompts for name in tasks]  # alternating adapters in the queue
    for batch in batches:
        runner = open_shared_runner({name: a.path for name, a in tasks.items()}, n_ctx=128)
        got = answers(ModelWorker("shared", runner, 16, Metrics(), batch=batch, adapters=tuple(tasks)), requests)
        assert got == [want[name][prompts.index(prompt)] for name, prompt in requests], batch
