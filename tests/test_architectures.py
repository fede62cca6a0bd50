"""The architecture matrix: a tiny random model of each common decoder family through every format.

For each (architecture, format): the float artifact's logits must match the PyTorch baseline on
the same windows (KLD and top-1 agreement), and a quantized artifact must load, score and
generate; or the format must refuse the architecture up front, naming it. A conversion that
runs but computes something else (a RoPE variant, Gemma's +1 norms, a sliding window ignored)
fails here, naming the architecture and the format.

Bounds: a float32 artifact differs from PyTorch only by the order of float32 sums (logits agree
to ~1e-6 relative, KLD ~1e-9); float16 weights (MLX fp16) round each weight by up to 2^-11
relative, which moves these tiny models' KLD to ~1e-5. The bounds sit an order of magnitude
above what was measured and orders below what a wrong conversion gave (KLD 3e-3 to 0.3 in the
cases found). Top-1 agreement must be at least 95%: on 126 scored tokens of a random model one
near-tie flipped by float rounding costs 0.8%. Results are written to $EDGEQUANT_MATRIX_OUT when set (scripts/architecture_matrix.py
renders docs/models.md's table from them).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import edgequant
from edgequant.errors import EdgequantError
from edgequant.measurement.settings import EvalConfig
from edgequant.registry import get_backend
from edgequant.runner import GenerateParams
from tiny_archs import ARCHITECTURES, SLIDING, build

pytest.importorskip("torch", reason="its extra is not installed")

# format -> (float spec, KLD bound for it, quantized spec)
FORMATS = {
    "gguf": ("gguf:f32", 1e-4, "gguf:q4_0"),
    "onnx": ("onnx:fp32", 1e-4, "onnx:int4"),
    # the CPU plugin's defaults (bf16 inference on this CPU, u8 KV cache) are a runtime choice, not the conversion
    "openvino": ("openvino:fp32?infer=f32&kv_cache=f32&dyn_quant=0", 1e-4, "openvino:int8"),
    "mlx": ("mlx:fp16", 1e-3, "mlx:4bit"),
    "qnn": (None, None, "qnn:w8a16?graphs=fixed&seq=64&samples=2"),  # fixed: every architecture (kv: Llama-style)
}
QUICK = EvalConfig(ctx=64, windows=2, speed=False)
RESULTS: dict[str, dict[str, dict]] = {}
# Found by this matrix and not fixed yet; strict, so a fix (or an engine upgrade) shows up as a failure.
KNOWN_WRONG: dict[tuple[str, str], str] = {}
KNOWN_UNLOADABLE: dict[tuple[str, str], str] = {}


def cases(formats, known: dict) -> list:
    return [pytest.param(arch, fmt, marks=[pytest.mark.xfail(reason=known[arch, fmt], strict=True)] if (arch, fmt) in known else [])
            for arch in ARCHITECTURES for fmt in formats]


@pytest.fixture(scope="module")
def models(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("archs")
    return {name: build(name, tiny_model, folder / name) for name in ARCHITECTURES}


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    out = os.environ.get("EDGEQUANT_MATRIX_OUT")
    if out:
        with open(out, "w") as fh:
            json.dump(RESULTS, fh, indent=2, sort_keys=True)


def _record(arch: str, fmt: str, **facts) -> None:
    RESULTS.setdefault(arch, {}).setdefault(fmt, {}).update(facts)


def _convert_or_refusal(model, spec: str, arch: str, fmt: str):
    """The artifact, or None when the format refused the architecture up front (with its name)."""
    backend = get_backend(fmt)
    if backend.missing_engine():
        pytest.skip(backend.missing_engine())
    try:
        backend.check_source(edgequant.load_source(model))
    except EdgequantError as exc:
        _record(arch, fmt, status="refused", reason=exc.problem)
        assert arch in exc.problem.lower() or ARCHITECTURES[arch][1] in exc.problem, exc.problem
        return None
    return edgequant.convert(model, spec)


def _evaluate(artifact, arch: str, fmt: str, config: EvalConfig = QUICK) -> dict:
    try:
        return edgequant.evaluate(artifact.path, config=config)
    except EdgequantError as exc:
        _record(arch, fmt, status="fails", reason=exc.problem.splitlines()[0])
        raise


@pytest.mark.parametrize("arch, fmt", cases([f for f, (spec, _, _) in FORMATS.items() if spec], KNOWN_WRONG))
def test_float_artifact_matches_pytorch(models, arch, fmt):
    spec, bound, _ = FORMATS[fmt]
    artifact = _convert_or_refusal(models[arch], spec, arch, fmt)
    if artifact is None:
        return
    config = QUICK
    if artifact.manifest["limitations"]:  # e.g. a sliding window the engine ignores: exact only within it
        config = EvalConfig(ctx=SLIDING, windows=4, speed=False)
        _record(arch, fmt, limitations=artifact.manifest["limitations"])
        assert all(str(SLIDING) in text for text in artifact.manifest["limitations"])
    metrics = _evaluate(artifact, arch, fmt, config)
    ok = metrics["kld_mean"] < bound and metrics["top1_agreement"] >= 0.95
    _record(arch, fmt, status=("limited" if config is not QUICK else "ok") if ok else "wrong", float_spec=spec,
            float_kld=metrics["kld_mean"], float_top1=metrics["top1_agreement"], float_ctx=config.ctx)
    assert ok, f"{spec} of the tiny {arch} does not compute what PyTorch does: {metrics['kld_mean']=}, {metrics['top1_agreement']=}"


@pytest.mark.parametrize("arch, fmt", cases(list(FORMATS), KNOWN_UNLOADABLE))
def test_quantized_artifact_loads_scores_and_generates(models, arch, fmt):
    from edgequant.registry import open_runner

    spec = FORMATS[fmt][2]
    artifact = _convert_or_refusal(models[arch], spec, arch, fmt)
    if artifact is None:
        return
    metrics = _evaluate(artifact, arch, fmt)
    with open_runner(artifact.path, n_ctx=64, need_logits=False, threads=2) as runner:
        tokens = list(runner.generate(runner.tokenize("The history of the city"), GenerateParams(max_tokens=4, stop_at_eos=False)))
    _record(arch, fmt, quant_spec=spec, quant_kld=metrics["kld_mean"])
    if artifact.manifest["limitations"]:
        _record(arch, fmt, limitations=artifact.manifest["limitations"])
        RESULTS[arch][fmt].setdefault("status", "limited")
    assert np.isfinite(metrics["perplexity"]) and len(tokens) == 4
    # 4-bit grids lose much on random weights, but a broken graph loses everything: top-1 stays far
    # above chance (1/512 here), the KLD far below that of a uniform guess (about 4 nats here).
    assert metrics["top1_agreement"] > 0.1 and metrics["kld_mean"] < 1.0, \
        f"{spec} of the tiny {arch}: {metrics['top1_agreement']=}, {metrics['kld_mean']=}"


def test_inspect_names_each_architecture(models):
    for arch, path in models.items():
        assert edgequant.inspect_model(path)["architecture"] == ARCHITECTURES[arch][1]


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_the_float32_baseline_of_a_16_bit_model_keeps_its_matrices_16_bit_with_float32_logits(models, arch, tmp_path):
    """The baseline of a bf16 checkpoint computes in float32 over its bf16 matrices: the same
    logits as the model loaded in float32, bit for bit, at half the memory for its weights."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from edgequant.backends.pytorch.runner import TorchRunner

    folder = tmp_path / arch
    AutoModelForCausalLM.from_pretrained(models[arch], dtype=torch.bfloat16).save_pretrained(folder)
    for item in models[arch].iterdir():
        if not (folder / item.name).exists():
            shutil.copyfile(item, folder / item.name)
    ids = list(range(3, 67))
    loaded_in_float32 = TorchRunner(folder, name="float32", n_ctx=128, threads=1)
    over_bf16 = TorchRunner(folder, name="over bf16", n_ctx=128, threads=1, stored_dtype="bfloat16")
    matrices = [m.weight for m in over_bf16.model.modules() if isinstance(m, torch.nn.Linear)]
    embeddings = {id(m.weight) for m in over_bf16.model.modules() if isinstance(m, torch.nn.Embedding)}
    assert any(w.dtype == torch.bfloat16 for w in matrices)
    assert all(w.dtype == torch.float32 for w in over_bf16.model.parameters() if id(w) in embeddings or w.dim() < 2)
    assert np.array_equal(loaded_in_float32.logits(ids), over_bf16.logits(ids))
