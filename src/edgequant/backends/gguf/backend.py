"""GGUF backend: llama.cpp's converter to a float intermediate, then `llama_model_quantize`.

The float GGUF is cached per source and reused by every quantization of that source, as
llama.cpp users do by hand (convert once, quantize many times).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

from edgequant.backend import Backend
from edgequant.backends._shared.sliding_window import window_ignored
from edgequant.backends.gguf.ggml import GGML_TYPES
from edgequant.errors import EdgequantError
from edgequant.sources.tasks import SENTENCE_EMBEDDING
from edgequant.spec import Option, Precision

MODEL_FILE = "model.gguf"


def _p(name: str, bits: int, bpw: float, description: str, ftype: int, fallback: str | None, imatrix: bool = False):
    return name, (Precision(name, bits, bpw, description, needs_imatrix=imatrix), ftype, fallback)


# name -> (precision, llama_ftype, fallback type for rows not divisible by 256: llama.cpp's
# tensor_type_fallback, Q2_K/Q3_K/TQ -> Q4_0, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0, IQ -> IQ4_NL).
# bpw of the K-quant mixes is llama.cpp's published average for a 7B-class model.
_TABLE = dict([
    _p("f32", 32, 32.0, "float32, no quantization", 0, None),
    _p("f16", 16, 16.0, "float16", 1, None),
    _p("bf16", 16, 16.0, "bfloat16", 32, None),
    _p("q8_0", 8, 8.5, "8-bit round-to-nearest, blocks of 32", 7, None),
    _p("q6_k", 6, 6.5625, "6-bit K-quant", 18, "q8_0"),
    _p("q5_k_m", 5, 5.69, "5-bit K-quant mix, attention/ffn_down at 6-bit", 17, "q5_1"),
    _p("q5_k_s", 5, 5.54, "5-bit K-quant", 16, "q5_1"),
    _p("q5_1", 5, 6.0, "5-bit with offset, blocks of 32", 9, None),
    _p("q5_0", 5, 5.5, "5-bit, blocks of 32", 8, None),
    _p("q4_k_m", 4, 4.85, "4-bit K-quant mix, sensitive tensors at 6-bit", 15, "q5_0"),
    _p("q4_k_s", 4, 4.58, "4-bit K-quant", 14, "q5_0"),
    _p("q4_1", 4, 5.0, "4-bit with offset, blocks of 32", 3, None),
    _p("q4_0", 4, 4.5, "4-bit, blocks of 32", 2, None),
    _p("iq4_nl", 4, 4.5, "4-bit non-linear, blocks of 32", 25, None),
    _p("iq4_xs", 4, 4.25, "4-bit non-linear, super-blocks of 256", 30, "iq4_nl"),
    _p("q3_k_l", 3, 4.27, "3-bit K-quant mix, large", 13, "q4_0"),
    _p("q3_k_m", 3, 3.91, "3-bit K-quant mix, medium", 12, "q4_0"),
    _p("q3_k_s", 3, 3.5, "3-bit K-quant", 11, "q4_0"),
    _p("iq3_s", 3, 3.44, "3.4-bit lattice quant", 26, "iq4_nl"),
    _p("iq3_xxs", 3, 3.06, "3-bit lattice quant", 23, "iq4_nl", imatrix=True),
    _p("q2_k", 2, 3.0, "2-bit K-quant mix", 10, "q4_0"),
    _p("iq2_s", 2, 2.5, "2.5-bit lattice quant", 28, "iq4_nl", imatrix=True),
    _p("iq2_xs", 2, 2.31, "2.3-bit lattice quant", 20, "iq4_nl", imatrix=True),
    _p("iq2_xxs", 2, 2.06, "2-bit lattice quant", 19, "iq4_nl", imatrix=True),
    _p("tq2_0", 2, 2.06, "ternary, 2 bits per weight", 37, "q4_0"),
    _p("tq1_0", 1, 1.69, "ternary, 1.69 bits per weight", 36, "q4_0"),
    _p("iq1_m", 1, 1.75, "1.75-bit lattice quant", 31, "iq4_nl", imatrix=True),
    _p("iq1_s", 1, 1.56, "1.56-bit lattice quant", 24, "iq4_nl", imatrix=True),
    # Every tensor's type is chosen per model (see auto.py); Q8_0 is only the file's nominal type.
    _p("auto", 4, 4.5, "per-tensor types for a size budget (?bpw= or ?size=), chosen by measured KLD", 7, None),
])
_K_BLOCK = 256  # row length K-quants, IQ and TQ types need; others fall back per tensor
_FLOAT = ("f32", "f16", "bf16")
_QUANTIZED = tuple(name for name in _TABLE if name not in _FLOAT)
_FIXED = tuple(name for name in _QUANTIZED if name != "auto")  # types llama.cpp's own recipes choose


class GGUFBackend(Backend):
    name = "gguf"
    display_name = "llama.cpp (GGUF)"
    use_case = "CPU and Apple/Android laptops and phones: llama.cpp, Ollama, LM Studio"
    extra = "gguf"
    bench_seconds = 13
    # bench/scale.py, 2026-12-04: gguf:q4_k_m of random-initialised Llamas of 135M-1.17B parameters
    # (bf16), process-tree PSS; 1.22 GB at 1.17B (llama.cpp's converter reads the weights lazily).
    conversion_peak = (0.27, 0.55)
    requires = ("llama_cpp",)
    packages = ("llama-cpp-python",)
    bench_specs = ("gguf:f16", "gguf:q8_0", "gguf:q6_k", "gguf:q4_k_m", "gguf:q3_k_m", "gguf:q2_k", "gguf:tq1_0")
    precisions = {name: entry[0] for name, entry in _TABLE.items()}
    # A BERT-family sentence encoder: llama.cpp's converter and quantizer, run in embedding mode
    # (encoder.py). all-MiniLM-L6-v2, cosine to PyTorch (mean over 250 texts) and size: f16 0.999999
    # 46 MB, q8_0 0.9996 25 MB, q6_k 0.9993 24 MB, q4_k_m 0.991 21 MB (llama.cpp keeps the token
    # embedding, half the model, at q8_0). Left out: bf16 0.99999 (f16's size), q5_k_m 0.994,
    # q4_0 0.966, q2_k 0.952.
    task_precisions = {SENTENCE_EMBEDDING: ("f32", "f16", "q8_0", "q6_k", "q4_k_m")}
    options = {
        "pure": Option("pure", bool, False, "quantize every tensor to the base type, no K-quant mix"),
        "nthread": Option("nthread", int, 0, "quantization threads, 0 = all cores", minimum=0, maximum=256),
        "imatrix": Option("imatrix", str, "", "importance matrix: auto (computed from the calibration text, cached) "
                          "or a .gguf/.dat file", applies_to=_QUANTIZED),
        "embd": Option("embd", str, "", "type of the token embedding", choices=tuple(GGML_TYPES), applies_to=_FIXED),
        "output": Option("output", str, "", "type of the output matrix", choices=tuple(GGML_TYPES), applies_to=_FIXED),
        "tensor": Option("tensor", str, "", "per-tensor types, REGEX:TYPE,... (first match wins), e.g. "
                         "ffn_down:q6_k", applies_to=_FIXED),
        "bpw": Option("bpw", float, 4.5, "size budget of gguf:auto in bits per weight, metadata included",
                      minimum=1.0, maximum=16.0, applies_to=("auto",)),
        "size": Option("size", str, "", "size budget of gguf:auto as a file size, e.g. 120MB or 0.1GiB (MB = 10^6 bytes)",
                       applies_to=("auto",)),
        "lora": Option("lora", str, "merged", "with --adapter: merged into the float weights before converting, or "
                       "separate (the base model converted, the adapter beside it as adapter.gguf, applied by llama.cpp)",
                       choices=("merged", "separate")),
    }

    def check_source(self, source) -> None:
        from edgequant.backends.gguf.tools import check_architecture

        check_architecture(source.architecture)

    def validate(self, spec) -> None:
        opt = self.option_values(spec)
        tensor_overrides(opt.tensor)
        if opt.size:
            from edgequant.decisions.gates import parse_size

            parse_size(opt.size)
            if "bpw" in spec.options:
                raise EdgequantError("gguf:auto takes one budget, ?bpw= or ?size=, not both", "drop one of them")
        if opt.imatrix not in ("", "auto") and not Path(opt.imatrix).expanduser().is_file():
            raise EdgequantError(f"imatrix={opt.imatrix}: no such file",
                                 "give the path of a .gguf/.dat importance matrix, or imatrix=auto")
        if self.precisions[spec.precision].needs_imatrix and not opt.imatrix:
            raise EdgequantError(f"gguf:{spec.precision} needs an importance matrix",
                                 "add ?imatrix=auto (computed from the calibration text) or ?imatrix=FILE")

    def search_specs(self, max_bytes: int | None) -> list[str]:
        return [f"gguf:auto?size={max_bytes / 1e6:.6g}MB"] if max_bytes else ["gguf:auto"]

    def neighbours(self, spec) -> list[str]:
        """A measured mix one budget step smaller and larger; a fixed type with the importance matrix."""
        if spec.precision == "auto":
            opt = self.option_values(spec)
            if opt.size:
                from edgequant.decisions.gates import parse_size

                size = parse_size(opt.size)
                return [str(spec.with_options(size=f"{size * f / 1e6:.6g}MB")) for f in (0.9, 0.95)]
            return [str(spec.with_options(bpw=b)) for b in (opt.bpw - 0.5, opt.bpw + 0.5) if 1.5 <= b <= 8.5]
        if spec.precision in _FIXED and not spec.options.get("imatrix"):
            return [str(spec.with_options(imatrix="auto"))]
        return []

    def input_files(self, spec) -> list[Path]:
        value = spec.options.get("imatrix", "")
        return [Path(value).expanduser().resolve()] if value not in ("", "auto") else []

    def importance_matrix(self, source, out: Path, *, text: str | None, dataset: str, tokens: int) -> dict:
        from edgequant.backends.gguf.collect import compute_imatrix
        from edgequant.backends.gguf.imatrix import write_imatrix

        matrix = compute_imatrix(source, text, dataset, tokens)
        write_imatrix(matrix, out)
        return {"tensors": len(matrix.sums), "chunks": matrix.chunk_count, "chunk_size": matrix.chunk_size}

    def limitations(self, source) -> list[str]:
        if source.config.get("model_type") != "mistral":
            return []
        # Measured on a tiny Mistral with a 32-token window: exact up to 33 tokens, KLD 0.27 at 64.
        return window_ignored(source.config, "llama.cpp runs Mistral with full attention")

    def convert(self, source, spec, out_dir: Path) -> dict[str, Any]:
        if self.option_values(spec).lora == "separate":
            from edgequant.backends.gguf.lora import convert_separate

            return convert_separate(source, spec, out_dir, self._convert_model, "f32" if spec.precision in _FLOAT else "f16")
        return self._convert_model(source, spec, out_dir)

    def _convert_model(self, source, spec, out_dir: Path) -> dict[str, Any]:
        """`source` to `spec`'s precision (every option but `lora`) as model.gguf in `out_dir`."""
        from edgequant.backends.gguf import tools as gguf_tools
        from edgequant.backends.gguf.auto import build_mix
        from edgequant.backends.gguf.collect import load_importance
        from edgequant.backends.gguf.tools import float_intermediate, intermediate_type

        _, ftype, _ = _TABLE[spec.precision]
        opt = self.option_values(spec)
        gguf_tools.llama_cpp_version()  # fail fast, before the long steps, if the engine is missing
        started = time.perf_counter()
        intermediate = float_intermediate(source)
        converted = time.perf_counter()
        target = out_dir / MODEL_FILE
        info: dict[str, Any] = {"model_file": MODEL_FILE,
                                "intermediate": {"path": str(intermediate), "type": intermediate_type(source)}}
        if spec.precision == intermediate_type(source):
            shutil.copyfile(intermediate, target)
            log = "copied the float intermediate as is\n"
        else:
            importance, info["imatrix"] = load_importance(source, opt.imatrix or ("auto" if spec.precision == "auto" else ""))
            if spec.precision == "auto":
                info["auto"] = build_mix(source, intermediate, importance, opt, target)
                log = "per-tensor types chosen by gguf:auto (see the manifest's details.auto)\n"
            else:
                log = _quantize_fixed(intermediate, target, ftype, opt, importance)
            info["tensor_types"] = gguf_tools.tensor_types(target)
        (out_dir / "quantize.log").write_text(log)
        info["timings"] = {"intermediate_s": round(converted - started, 3), "quantize_s": round(time.perf_counter() - converted, 3)}
        return info

    def convert_task(self, source, spec, out_dir: Path) -> dict[str, Any]:
        from edgequant.backends.gguf.encoder import convert_encoder

        opt, ftype = self.option_values(spec), _TABLE[spec.precision][1]
        if opt.lora == "separate":
            raise EdgequantError(f"?lora=separate applies to text-generation models; {source.name} is a {source.task} model",
                                 "drop ?lora=separate: the adapter is then merged into the float weights")
        return convert_encoder(source, spec, out_dir, lambda src, dst: _quantize_fixed(src, dst, ftype, opt, None))

    def open_task(self, artifact, *, threads: int):
        from edgequant.backends.gguf.encoder import LlamaEncoderRunner

        return LlamaEncoderRunner(artifact.path, artifact.manifest["model_file"], name=str(artifact.spec), threads=threads)

    def open(self, artifact, *, n_ctx: int, need_logits: bool, threads: int):
        from edgequant.backends.gguf.lora import adapter_file
        from edgequant.backends.gguf.runner import LlamaRunner

        return LlamaRunner(artifact.model_path, name=str(artifact.spec), n_ctx=n_ctx, logits_all=need_logits, threads=threads,
                           adapter=adapter_file(artifact))

    def adapter_base(self, artifact) -> str | None:
        """The base model file's content: a `?lora=separate` artifact's model.gguf is the plain
        artifact's, byte for byte, so both share one loaded model."""
        from edgequant.fingerprint import file_sha256

        return f"gguf:{file_sha256(artifact.model_path)}"

    def open_shared(self, artifacts, *, n_ctx: int, threads: int):
        from edgequant.backends.gguf.lora import adapter_file
        from edgequant.backends.gguf.runner import LlamaRunner

        first = next(iter(artifacts.values()))
        return LlamaRunner(first.model_path, name="+".join(artifacts), n_ctx=n_ctx, logits_all=False, threads=threads,
                           adapters={name: adapter_file(a) for name, a in artifacts.items()})

    def estimated_bytes(self, precision: str, tensors, tied_embeddings: bool = False) -> int:
        return _estimated_bytes(precision, tensors, tied_embeddings)


def tensor_overrides(text: str) -> list[tuple[str, str]]:
    """`REGEX:TYPE,REGEX:TYPE` as (regex, type) pairs, each regex checked and each type known."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        pattern, sep, name = item.rpartition(":")
        if not sep or not pattern or name.lower() not in GGML_TYPES:
            raise EdgequantError(f"tensor override {item!r} is not REGEX:TYPE with a known type",
                                 f"write e.g. tensor=ffn_down:q6_k; types: {', '.join(GGML_TYPES)}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise EdgequantError(f"tensor override {item!r}: {pattern!r} is not a valid regex ({exc})",
                                 "fix the pattern (it is matched against GGUF names such as blk.0.ffn_down.weight)") from None
        pairs.append((pattern, name.lower()))
    return pairs


def _quantize_fixed(intermediate: Path, target: Path, ftype: int, opt, importance) -> str:
    """llama.cpp's own recipe for `ftype`, with the spec's importance matrix and overrides."""
    from edgequant.backends.gguf import tools as gguf_tools
    from edgequant.runner import default_threads

    request = gguf_tools.QuantizeRequest(
        ftype, threads=opt.nthread or default_threads(), pure=opt.pure, importance=importance,
        overrides=tuple((pattern, GGML_TYPES[name]) for pattern, name in tensor_overrides(opt.tensor)),
        embedding_type=GGML_TYPES.get(opt.embd), output_type=GGML_TYPES.get(opt.output))
    return gguf_tools.quantize(intermediate, target, request)




def _estimated_bytes(precision_name: str, tensors, tied_embeddings: bool) -> int:
    """Estimated GGUF size, following llama.cpp's per-tensor rules: 1-D tensors stay F32; the
    output matrix (the embedding when tied) is kept at Q6_K, or Q8_0 when its rows are not a
    multiple of 256; other rows K-quants cannot take use the fallback type."""
    precision, _, fallback = _TABLE[precision_name]
    total_bits = 0.0
    for tensor in tensors:
        bpw = precision.bpw
        is_output = "lm_head" in tensor.name or (tied_embeddings and "embed_tokens" in tensor.name)
        if len(tensor.shape) < 2:
            bpw = 32.0
        elif is_output and precision.bits < 8:
            bpw = _TABLE["q8_0" if tensor.shape[-1] % _K_BLOCK else "q6_k"][0].bpw
        elif fallback and tensor.shape[-1] % _K_BLOCK:
            bpw = _TABLE[fallback][0].bpw
        total_bits += tensor.numel * bpw
    return int(total_bits / 8)
