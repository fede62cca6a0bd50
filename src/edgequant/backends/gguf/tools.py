"""llama.cpp's own tools, driven as they are: the reference converter and `llama_model_quantize`.

The converter is not part of the installed llama-cpp-python package; it ships in that package's
source distribution. We fetch the sdist of the installed version with pip once, unpack only the
model and LoRA converters, their `conversion/` package and their own gguf-py, and run them as
subprocesses.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from edgequant import children
from edgequant.atomic import atomic_dir
from edgequant.errors import EdgequantError
from edgequant.paths import cache_dir

_CONVERTERS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py")
_CONVERTER_MEMBERS = (*_CONVERTERS, "conversion/", "gguf-py/")
INSTALL_FIX = "install the gguf extra: `pip install 'edgequant[gguf]'` (or run `make setup`)"


def llama_cpp_version() -> str:
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise EdgequantError("llama-cpp-python is not installed", INSTALL_FIX) from None


def converter_dir() -> Path:
    """The unpacked reference converters matching the installed llama-cpp-python, fetched once."""
    ver = llama_cpp_version()
    target = cache_dir("tools") / f"llama.cpp-converters-{ver}"  # renamed when _CONVERTER_MEMBERS grows
    if all((target / name).is_file() for name in _CONVERTERS):
        return target
    from edgequant.progress import step

    with step(f"fetching llama.cpp's converter from the llama-cpp-python {ver} sdist (once)"):
        with tempfile.TemporaryDirectory() as download, atomic_dir(target, replace=True) as tmp:
            sdist = _download_sdist(ver, Path(download))
            _unpack_converter(sdist, tmp)
    return target


def _download_sdist(ver: str, into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python",
           "-d", str(into), f"llama-cpp-python=={ver}"]
    result = children.run(cmd, capture_output=True, text=True)
    found = sorted(into.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not found:
        raise EdgequantError(
            f"could not download the llama-cpp-python {ver} source distribution with pip "
            f"(it holds llama.cpp's converter): {result.stderr.strip()[-300:]}",
            "check that pip can reach PyPI, then retry",
        )
    return found[0]


def _unpack_converter(sdist: Path, out: Path) -> None:
    with tarfile.open(sdist) as tar:
        prefix = None
        for member in tar.getmembers():
            marker = "/vendor/llama.cpp/"
            if marker not in member.name:
                continue
            prefix = member.name.split(marker)[0] + marker
            relative = member.name[len(prefix):]
            if relative.startswith(_CONVERTER_MEMBERS) and (member.isfile() or member.isdir()):
                member.name = relative
                tar.extract(member, out, filter="data")
    for name in _CONVERTERS:
        if not (out / name).is_file():
            raise EdgequantError(f"{sdist.name} holds no {name}", "report this llama-cpp-python version as unsupported")


def run_converter(hf_dir: Path, outfile: Path, outtype: str, log_path: Path) -> None:
    """Run convert_hf_to_gguf.py in a subprocess; turn its known failures into clear errors."""
    tool = converter_dir()
    cmd = [sys.executable, str(tool / "convert_hf_to_gguf.py"), str(hf_dir), "--outfile", str(outfile), "--outtype", outtype]
    with log_path.open("w") as log:
        result = children.run(cmd, cwd=tool, stdout=log, stderr=subprocess.STDOUT)
    if result.returncode == 0 and outfile.is_file():
        return
    text = log_path.read_text(errors="replace")
    kept = keep_log(log_path)  # the temp folder holding it is removed with the failed conversion
    unsupported = re.search(r"Architecture '?([\w.]+)'? not supported|Model (\w+) is not supported", text)
    if unsupported:
        arch = unsupported.group(1) or unsupported.group(2)
        raise EdgequantError(
            f"llama.cpp's converter does not support architecture {arch!r}",
            "convert a model of a supported architecture; the list: " + ", ".join(supported_architectures()),
        )
    if "BPE pre-tokenizer was not recognized" in text:
        raise EdgequantError(
            "llama.cpp's converter does not recognize this model's BPE pre-tokenizer (it knows each by the hash "
            "of a test text's ids, and this tokenizer's is not among them)",
            f"if the model came as a GGUF, pass the GGUF itself (its tokenizer is carried over); a Hugging Face folder "
            f"with a sentencepiece tokenizer.model converts without the check. Converter log: {kept}",
        )
    tail = "\n".join(text.strip().splitlines()[-5:])
    raise EdgequantError(f"llama.cpp's converter failed on {hf_dir}:\n{tail}", f"see the full log at {kept}")


def keep_log(log_path: Path) -> Path:
    """A copy of a failed tool's log in the cache's logs folder (its temporary folder goes)."""
    kept = cache_dir("logs") / f"convert-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    shutil.copyfile(log_path, kept)
    return kept


def intermediate_type(source) -> str:
    """Convert without loss: float32 sources to F32, 16-bit ones to their own type."""
    return {"F32": "f32", "BF16": "bf16", "F16": "f16"}.get(source.weight_dtype, "f32")


def float_intermediate(source) -> Path:
    """The source as a float GGUF, converted once per source fingerprint and cached."""
    from edgequant.backends._shared.intermediates import cached_intermediate

    outtype = intermediate_type(source)
    name = f"model-{outtype}.gguf"
    folder = cached_intermediate(source, outtype, name,
                                 lambda tmp: run_converter(source.hf_dir, tmp / name, outtype, tmp / "convert.log"),
                                 f"converting {source.name} to a {outtype.upper()} GGUF with llama.cpp's converter")
    return folder / name


def check_architecture(architecture: str) -> None:
    """Refuse before any work an architecture the bundled converter does not register (an empty
    list means the converter could not be asked: it then decides itself)."""
    supported = supported_architectures()
    if supported and architecture not in supported:
        raise EdgequantError(f"llama.cpp's converter does not support architecture {architecture!r}",
                             "convert a model of a supported architecture; the list: " + ", ".join(supported))


def supported_architectures() -> list[str]:
    """Hugging Face architecture names the bundled converter registers."""
    tool = converter_dir()
    memo = tool / "supported-architectures.txt"
    if not memo.is_file():
        result = children.run([sys.executable, str(tool / "convert_hf_to_gguf.py"), "--print-supported-models"],
                                cwd=tool, capture_output=True, text=True)
        names = sorted(set(re.findall(r"^\s*-\s*(\w+)\s*$", result.stdout + result.stderr, re.M)))
        memo.write_text("\n".join(names))
    return memo.read_text().split()


class QuantizeLog:
    """Collects llama.cpp's log lines while installed, so failures can quote them."""

    def __init__(self):
        import llama_cpp

        self.lines: deque[str] = deque(maxlen=400)
        self._llama_cpp = llama_cpp

        @llama_cpp.llama_log_callback
        def _collect(level, text, user_data):
            self.lines.append(text.decode("utf-8", errors="replace"))

        self._callback = _collect  # keep a reference: C holds only a raw pointer

    def __enter__(self) -> "QuantizeLog":
        self._llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))
        return self

    def __exit__(self, *exc) -> None:
        self._llama_cpp.llama_log_set(_quiet_callback(), ctypes.c_void_p(0))

    def text(self) -> str:
        return "".join(self.lines)


_QUIET = None


def _quiet_callback():
    """A callback that drops every llama.cpp log line (kept alive for the process)."""
    global _QUIET
    if _QUIET is None:
        import llama_cpp

        _QUIET = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    return _QUIET


def silence_llama_logs() -> None:
    import llama_cpp

    llama_cpp.llama_log_set(_quiet_callback(), ctypes.c_void_p(0))


@dataclass(frozen=True)
class QuantizeRequest:
    """What `llama_model_quantize` is asked for: the file type (llama.cpp's per-tensor mix for it),
    and optionally an importance matrix (tensor name -> per-column weights), (regex, ggml type)
    overrides tried in order, and fixed types for the token embedding and the output matrix."""

    ftype: int
    threads: int
    pure: bool = False
    importance: dict | None = None
    overrides: tuple[tuple[str, int], ...] = ()
    embedding_type: int | None = None
    output_type: int | None = None


def quantize(src: Path, dst: Path, request: QuantizeRequest) -> str:
    """Quantize with the C API; returns llama.cpp's log. Raises with that log on failure."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = request.ftype
    params.nthread = request.threads
    params.pure = request.pure
    if request.embedding_type is not None:
        params.token_embedding_type = request.embedding_type
    if request.output_type is not None:
        params.output_tensor_type = request.output_type
    keep = []  # the C arrays must outlive the call
    if request.importance:
        params.imatrix = keep_alive(keep, _imatrix_array(request.importance, keep))
    if request.overrides:
        entries = [llama_cpp.llama_model_tensor_override(p.encode(), t) for p, t in request.overrides]
        params.tt_overrides = keep_alive(keep, (llama_cpp.llama_model_tensor_override * (len(entries) + 1))(*entries))
    with QuantizeLog() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        raise _quantize_error(rc, log.text())
    return log.text()


def _quantize_error(rc: int, log: str) -> EdgequantError:
    """llama.cpp's reason for a failed quantization, on one line, with the tensor it names."""
    reason = re.findall(r"failed to quantize: (.+)", log)
    tensor = re.findall(r"offending tensor: (\S+)", log)
    text = reason[-1].strip() if reason else " ".join(log.strip().splitlines()[-2:]) or f"code {rc}"
    where = f" (tensor {tensor[-1]})" if tensor else ""
    fix = ("give it one: ?imatrix=auto or ?imatrix=FILE" if "imatrix" in text else "check the model and the spec")
    return EdgequantError(f"llama.cpp failed to quantize: {text}{where}", fix)


def keep_alive(keep: list, array):
    keep.append(array)
    return array


def _imatrix_array(importance: dict, keep: list):
    """A NULL-terminated C array of llama_model_imatrix_data over float32 buffers held in `keep`."""
    import llama_cpp
    import numpy as np

    entries = []
    for name, values in importance.items():
        values = keep_alive(keep, np.ascontiguousarray(values, dtype=np.float32))
        entries.append(llama_cpp.llama_model_imatrix_data(name.encode(), values.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                                          values.size))
    return (llama_cpp.llama_model_imatrix_data * (len(entries) + 1))(*entries)


def tensor_types(path: Path) -> dict[str, str]:
    """Every tensor of a GGUF file and its type name, as stored."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name.lower() for t in GGUFReader(path).tensors}
