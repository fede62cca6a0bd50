"""Build a tiny random Llama with a sentencepiece tokenizer, entirely offline."""

from __future__ import annotations

from pathlib import Path

VOCAB = 512
HIDDEN = 256  # a multiple of 256: K-quants apply to every matrix, no per-tensor fallback


def build_tiny_llama(out: Path, seed: int = 0) -> Path:
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    from edgequant.measurement.evaldata import default_eval_text

    corpus = out / "corpus.txt"
    corpus.write_text(default_eval_text()[:300_000])
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / "sp"), vocab_size=VOCAB, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2, num_threads=2,
    )
    model_dir = out / "model"
    tokenizer = LlamaTokenizer(vocab_file=str(out / "sp.model"), legacy=False, add_bos_token=False)
    tokenizer.save_pretrained(model_dir)
    write_random_llama(model_dir, seed)
    return model_dir


def write_random_llama(model_dir: Path, seed: int, intermediate_size: int = 512) -> None:
    """The tiny Llama's config and random weights, larger than the default init so the logits are
    not flat, into `model_dir` (beside a tokenizer of VOCAB ids)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=intermediate_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
    model.save_pretrained(model_dir, safe_serialization=True)


def copy_that_never_ends(model_dir: Path, out: Path) -> Path:
    """A copy of the tiny Llama at `model_dir` whose greedy answers never end at EOS.

    EOS's row of the LM head is zeroed, so its logit is always 0 beside VOCAB - 1 random ones:
    greedy decoding would pick it only if every other logit were negative. Tests that must cut a request
    off while it runs use this, since where the random model's answers end varies with the CPU's
    kernels."""
    import json
    import shutil

    from safetensors.numpy import load_file, save_file

    shutil.copytree(model_dir, out)
    eos = json.loads((out / "config.json").read_text())["eos_token_id"]
    weights_file = out / "model.safetensors"
    weights = load_file(weights_file)
    weights["lm_head.weight"][eos] = 0
    save_file(weights, weights_file, metadata={"format": "pt"})
    return out
