"""Tiny random models of the common decoder architectures, built from a config in a second.

Each keeps what makes its family convert differently: Qwen2's attention biases, Qwen3's q/k norms,
Phi-3's fused qkv and gate_up projections and its special tokens after the sentencepiece pieces,
Gemma's scaled embeddings, norm weights stored as w - 1, tied output layer and soft-capping,
Gemma-3's alternating sliding-window layers, Mistral's sliding window. Sliding windows are set
shorter than the windows the matrix scores (64 tokens), so an engine that ignores them is caught.
All share the tiny sentencepiece tokenizer and a width that keeps the MLP unlike the vocabulary
(the ONNX builder mistakes such a projection for the LM head).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

COMMON = dict(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6)
SLIDING = 32
# Phi-3's own tokens, after the sentencepiece pieces as in microsoft/Phi-3-mini-4k-instruct (ids 32000-32010 of
# an embedding padded to 32064). llama.cpp needs <|endoftext|>: it looks it up by name in every GGUF whose name
# says Phi-3 (llama-vocab.cpp, "phi-3"/"phi3" token attributes) and fails to load one without it.
PHI3_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
               "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]

# name -> (transformers config class, model class, settings over COMMON)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"tie_word_embeddings": False}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False, "use_sliding_window": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"tie_word_embeddings": True, "head_dim": 64}),
    # original_max_position_embeddings = max_position_embeddings: the short-context Phi-3 (no LongRoPE);
    # the vocabulary holds PHI3_TOKENS after the 512 pieces, padded to 576 (<|endoftext|> = 512 ends and pads)
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"tie_word_embeddings": False, "vocab_size": 576, "eos_token_id": 512,
                                                "pad_token_id": 512, "original_max_position_embeddings": 1024}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"head_dim": 64, "query_pre_attn_scalar": 64, "sliding_window": SLIDING,
                                                      "layer_types": ["sliding_attention", "full_attention"]}),
    # Gemma-3's real layer pattern (five sliding layers, then a global one): llama.cpp and the ORT
    # builder take it as fixed, so a 2-layer pattern would be a model they cannot represent.
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"head_dim": 64, "query_pre_attn_scalar": 64,
                                                          "sliding_window": SLIDING, "num_hidden_layers": 6,
                                                          "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"tie_word_embeddings": False, "sliding_window": SLIDING}),
}


def build(name: str, tokenizer_dir: Path, out: Path, seed: int = 0) -> Path:
    """The tiny `name` model with the tokenizer files of `tokenizer_dir`, saved in `out`."""
    import torch
    import transformers

    config_class, model_class, settings = ARCHITECTURES[name]
    config = getattr(transformers, config_class)(**{**COMMON, **settings})
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # larger weights than the default init, so the logits are not flat
        for key, param in model.named_parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.08)
            elif "norm" in key:  # norms off 1 too, so a missed "+1" (Gemma) or a dropped q/k norm shows
                param.normal_(0.0, 0.3).add_(0.0 if name.startswith("gemma") else 1.0)
    model.save_pretrained(out, safe_serialization=True)
    if name.startswith("gemma"):
        _gemma_tokenizer(tokenizer_dir, out)
    elif name == "phi3":
        _phi3_tokenizer(tokenizer_dir, out)
    else:
        for item in tokenizer_dir.iterdir():
            if item.name.startswith(("tokenizer", "special_tokens")):
                shutil.copyfile(item, out / item.name)
    if name == "gemma3":  # mlx-lm reads the layer pattern from this key (real Gemma-3 configs carry it)
        config_path = out / "config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "sliding_window_pattern": 6}, indent=2))
    return out


def _gemma_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    """The tiny sentencepiece model without the dummy prefix space, as Gemma's tokenizer is (and
    as llama.cpp's converter writes every Gemma GGUF)."""
    from sentencepiece import sentencepiece_model_pb2
    from transformers import GemmaTokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tokenizer_dir / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    vocab = out / "tokenizer.model"
    vocab.write_bytes(proto.SerializeToString())
    GemmaTokenizer(vocab_file=str(vocab), bos_token="<s>", eos_token="</s>", pad_token="<unk>",
                   add_bos_token=False).save_pretrained(out)


def _phi3_tokenizer(tokenizer_dir: Path, out: Path) -> None:
    """The tiny sentencepiece model with Phi-3's special tokens added after its pieces, as Phi-3's
    tokenizer is (<|endoftext|> is its end and padding token; the chat tokens strip the space after)."""
    from transformers import AddedToken, LlamaTokenizer

    tokenizer = LlamaTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.add_tokens([AddedToken(token, rstrip=token != "<|endoftext|>", lstrip=False, normalized=False, special=True)
                          for token in PHI3_TOKENS], special_tokens=True)
    tokenizer.eos_token = tokenizer.pad_token = "<|endoftext|>"
    assert tokenizer.convert_tokens_to_ids(PHI3_TOKENS) == list(range(512, 512 + len(PHI3_TOKENS)))
    tokenizer.save_pretrained(out)
