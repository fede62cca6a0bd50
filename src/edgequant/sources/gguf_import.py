"""Import a GGUF file as a Hugging Face folder (weights dequantized, tokenizer rebuilt).

transformers dequantizes the weights and undoes llama.cpp's tensor layout for every architecture
it knows (Gemma's norms stored as w + 1 included). Its GGUF tokenizer import is not trusted: for
BPE vocabularies it loses the pre-tokenizer, the BOS setting and the EOS token, and it turns a
sentencepiece vocabulary (Gemma's) into a Unigram model that splits text into twice as many
pieces. We rebuild the tokenizer from the GGUF metadata ourselves: byte-level BPE for the
pre-tokenizers we know, and for sentencepiece vocabularies the `tokenizer.model` itself (the GGUF
keeps every piece with its score and type), which llama.cpp's converter also needs to turn the
folder back into a GGUF. Before the import is kept, the tokenizer must give llama.cpp's own ids on
the evaluation and calibration texts; an import that cannot is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

from edgequant.atomic import atomic_dir
from edgequant.errors import EdgequantError
from edgequant.paths import cache_dir

# GGUF `tokenizer.ggml.pre` values whose Hugging Face pre-tokenizer we know how to rebuild.
# smollm (and starcoder) split every digit on its own before the GPT-2 byte-level regex.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell"}
_PLAIN_BYTELEVEL_PRE = {"gpt2", "default", "gpt-2"}
_CONTROL_TOKEN = 3
_BYTE_TOKEN = 6
# Architectures whose sentencepiece tokenizer transformers names Gemma's (no dummy prefix, no
# legacy space handling); every other sentencepiece vocabulary is Llama's.
_GEMMA_ARCHES = {"gemma", "gemma2", "gemma3"}
_CHECK_CHARS = 20000  # characters of each text the tokenizer must split as llama.cpp does


def check_gguf(path: Path):
    """Open a GGUF file's metadata and make sure all tensor data is present."""
    from gguf import GGUFReader

    from edgequant.sources.gguf_header import HeaderProblem, check_header

    fix = f"re-create or re-download {path.name}; it is truncated or not a GGUF file"
    try:
        check_header(path)  # counts and lengths bounded by the file before the reader believes them
    except HeaderProblem as problem:
        raise EdgequantError(f"{path} is not a GGUF file, or a corrupt or truncated one: {problem}", fix) from None
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the reader raises many types on corrupt input; its text is not for the user
        raise EdgequantError(f"{path} is a corrupt GGUF file (the gguf reader failed with {type(exc).__name__})", fix) from None
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise EdgequantError(f"{path} is truncated: tensor {tensor.name} runs past the end", fix)
    return reader


def gguf_metadata(reader) -> dict:
    """Scalar and string metadata of a GGUF file (the long token arrays are left out)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith(("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # unusual field types are not needed for import
            continue
    return meta


def _import_dir(fingerprint: str) -> Path:
    return cache_dir("sources") / fingerprint[:16]


def is_imported(fingerprint: str) -> bool:
    return (_import_dir(fingerprint) / "edgequant-import.json").is_file()


def import_gguf(path: Path, fingerprint: str) -> Path:
    """Return the cached Hugging Face folder for a GGUF file, importing it on first use."""
    target = _import_dir(fingerprint)
    if is_imported(fingerprint):
        return target
    from edgequant.progress import step

    with step(f"importing {path.name} to a Hugging Face folder (once; cached by sha256)"):
        with atomic_dir(target, replace=True) as tmp:
            _import_into(path, tmp)
    return target


def _import_into(path: Path, out: Path) -> None:
    reader = check_gguf(path)
    meta = gguf_metadata(reader)
    arch = meta.get("general.architecture", "?")
    _import_weights(path, arch, meta, out)
    _import_tokenizer(path, reader, meta, out)
    quant_types = sorted({t.tensor_type.name for t in reader.tensors})
    provenance = {
        "imported_from": str(path),
        "architecture": arch,
        "gguf_tensor_types": quant_types,
        "note": f"weights dequantized from GGUF ({', '.join(quant_types)}) to float32",
    }
    (out / "edgequant-import.json").write_text(json.dumps(provenance, indent=2))


def _import_weights(path: Path, arch: str, meta: dict, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own step message already says what is happening

    if arch not in GGUF_CONFIG_MAPPING:
        raise EdgequantError(
            f"cannot import GGUF architecture {arch!r}",
            "supported GGUF architectures: " + ", ".join(sorted(GGUF_CONFIG_MAPPING))
            + "; or pass the model as a Hugging Face folder",
        )
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    _restore_head_dim(config, meta.get(f"{arch}.attention.key_length"))
    _restore_attention_scale(config)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config, dtype=torch.float32)
    model.save_pretrained(out, safe_serialization=True)


def _restore_head_dim(config, key_length: int | None) -> None:
    """transformers' GGUF mapping drops `attention.key_length`; a config class whose default head
    size is not hidden / heads (Qwen3's is 128) then builds layers of the wrong shape."""
    if key_length is not None and hasattr(config, "head_dim"):
        config.head_dim = int(key_length)


# Gemma-2/3 models with these layer counts (the 27B ones) scale queries by 1/sqrt(hidden / heads);
# every other size by 1/sqrt(head_dim), which is what llama.cpp assumes (the GGUF does not store it).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def _restore_attention_scale(config) -> None:
    """A GGUF does not carry Gemma's `query_pre_attn_scalar`; transformers then takes its default
    (256), right for Gemma-3-270M by chance and wrong for any other head size. Restore llama.cpp's."""
    layers = _GEMMA_27B_LAYERS.get(config.model_type)
    if layers is None:
        return
    if config.num_hidden_layers == layers:
        config.query_pre_attn_scalar = config.hidden_size // config.num_attention_heads
    else:
        config.query_pre_attn_scalar = config.head_dim


def _import_tokenizer(path: Path, reader, meta: dict, out: Path) -> None:
    model_kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if model_kind == "gpt2" and (pre in _DIGIT_SPLIT_PRE or pre in _PLAIN_BYTELEVEL_PRE):
        tokenizer = _bpe_tokenizer(reader, meta, split_digits=pre in _DIGIT_SPLIT_PRE)
    elif model_kind == "llama":
        tokenizer = _sentencepiece_tokenizer(reader, meta, out)
    else:
        tokenizer = _transformers_tokenizer(path, meta)
    tokenizer.save_pretrained(out)
    junk = out / "tokenizer.model"  # transformers writes the GGUF itself here for some vocabularies
    if junk.is_file() and junk.read_bytes()[:4] == b"GGUF":
        junk.unlink()
    check_tokenizer_against_llama_cpp(path, out, f"{model_kind}/{pre}")


def _array_field(reader, key: str) -> list:
    field = reader.fields[key]
    return [field.contents(i) for i in range(len(field.data))]


# The special tokens both vocabularies name: the Hugging Face name without "_token" is
# sentencepiece's (bos, eos, unk, pad); GGUF keeps each id as tokenizer.ggml.<name>_token_id.
_SPECIAL_TOKENS = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}


def _special_tokens(meta: dict, tokens: list[str]) -> dict:
    found = {}
    for hf_name, gguf_name in _SPECIAL_TOKENS.items():
        token_id = meta.get(f"tokenizer.ggml.{gguf_name}_token_id")
        if token_id is not None and 0 <= token_id < len(tokens):
            found[hf_name] = tokens[token_id]
    return found


def _bpe_tokenizer(reader, meta: dict, split_digits: bool):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = _array_field(reader, "tokenizer.ggml.tokens")
    types = _array_field(reader, "tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in _array_field(reader, "tokenizer.ggml.merges")]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    core = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits else byte_level
    )
    core.decoder = decoders.ByteLevel()
    core.post_processor = processors.ByteLevel(trim_offsets=False)
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL_TOKEN])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        chat_template=meta.get("tokenizer.chat_template"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        clean_up_tokenization_spaces=False,
        **_special_tokens(meta, tokens),
    )


def _sentencepiece_tokenizer(reader, meta: dict, out: Path):
    """Write the sentencepiece model the GGUF was made from and load it as a fast tokenizer.
    llama.cpp's token types are sentencepiece's piece types (normal, unknown, control,
    user-defined, unused, byte), so every piece goes back with its score and type."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    tokens = _array_field(reader, "tokenizer.ggml.tokens")
    scores = _array_field(reader, "tokenizer.ggml.scores")
    types = _array_field(reader, "tokenizer.ggml.token_type")
    proto = sp.ModelProto()
    proto.trainer_spec.model_type = sp.TrainerSpec.BPE  # llama.cpp's SPM tokenizer merges by score, as BPE models do
    proto.trainer_spec.vocab_size = len(tokens)
    proto.trainer_spec.byte_fallback = _BYTE_TOKEN in types
    for hf_name, gguf_name in _SPECIAL_TOKENS.items():
        setattr(proto.trainer_spec, hf_name.replace("_token", "_id"), int(meta.get(f"tokenizer.ggml.{gguf_name}_token_id", -1)))
    add_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = add_prefix
    proto.normalizer_spec.remove_extra_whitespaces = False
    proto.normalizer_spec.escape_whitespaces = True
    for token, score, kind in zip(tokens, scores, types):
        proto.pieces.add(piece=token, score=score, type=kind)
    model_file = out / "tokenizer.model"
    model_file.write_bytes(proto.SerializeToString())
    common = dict(vocab_file=str(model_file), chat_template=meta.get("tokenizer.chat_template"),
                  add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", True)),
                  add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)), **_special_tokens(meta, tokens))
    if meta.get("general.architecture") in _GEMMA_ARCHES:
        from transformers import GemmaTokenizerFast

        return GemmaTokenizerFast(**common)
    from transformers import LlamaTokenizerFast

    return LlamaTokenizerFast(**common, legacy=False, add_prefix_space=add_prefix, from_slow=True)


def check_tokenizer_against_llama_cpp(path: Path, folder: Path, kind: str) -> None:
    """Refuse an import whose tokenizer does not give llama.cpp's ids for the same GGUF on the
    evaluation and calibration texts (skipped, with a note, without llama.cpp installed)."""
    from edgequant.progress import note

    try:
        import llama_cpp
    except ImportError:
        note("llama-cpp-python is not installed: the imported tokenizer was not checked against llama.cpp's")
        return
    from edgequant.measurement.evaldata import default_calibration_text, default_eval_text
    from edgequant.sources.auto_tokenizer import auto_tokenizer

    vocab = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    ours = auto_tokenizer(folder)
    for name, text in (("evaluation", default_eval_text()), ("calibration", default_calibration_text())):
        sample = text[:_CHECK_CHARS]
        want = vocab.tokenize(sample.encode(), add_bos=False, special=False)
        got = ours(sample, add_special_tokens=False, verbose=False).input_ids
        if got != want:
            from edgequant.measurement.logprobs import first_difference

            at = first_difference(got, want)
            raise EdgequantError(
                f"cannot import {path.name} faithfully: its rebuilt tokenizer splits the {name} text differently from "
                f"llama.cpp at token {at} (ours {ours.convert_ids_to_tokens(got[at:at + 4])}, llama.cpp's "
                f"{[vocab.detokenize([t]).decode(errors='replace') for t in want[at:at + 4]]}; GGUF tokenizer {kind})",
                "pass the model as a Hugging Face folder with its own tokenizer files, or report this model")
    note(f"imported tokenizer gives llama.cpp's ids on {_CHECK_CHARS} characters of the evaluation and calibration texts")


def _transformers_tokenizer(path: Path, meta: dict):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    for name, value in _special_tokens(meta, tokens).items():
        setattr(tokenizer, name, value)
    return tokenizer
