"""The MLX backend: mlx-lm conversion with uniform and mixed bit widths, run through mlx-lm on CPU.

Fast tests use the tiny random Llama; the tests marked slow use the real default model.
"""

import json
import sys

import numpy as np
import pytest

import edgequant
from edgequant.errors import EdgequantError
from edgequant.measurement.settings import EvalConfig

pytest.importorskip("mlx.core", reason="its extra is not installed")
pytest.importorskip("mlx_lm", reason="its extra is not installed")

QUALITY = EvalConfig(ctx=256, windows=2, speed=False)


def quantization(artifact) -> dict:
    return json.loads((artifact.path / "config.json").read_text())["quantization"]


def test_config_records_bits_and_group_size_and_mlx_lm_loads_it(tiny_model):
    from mlx_lm import load

    artifact = edgequant.convert(tiny_model, "mlx:4bit?group=32")
    recorded = quantization(artifact)
    assert recorded["bits"] == 4 and recorded["group_size"] == 32
    assert recorded["model.layers.0.mlp.up_proj"] == {"group_size": 32, "bits": 4}
    assert recorded["lm_head"]["bits"] == 8  # the output layer stays at 8 bit by default
    model, tokenizer = load(str(artifact.path))
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "QuantizedLinear"
    details = artifact.manifest["details"]
    assert details["speed_representative"] is False  # not Apple silicon
    assert details["quantization"]["group_size"] == 32 and "mlx-lm" in artifact.manifest["tools"]


def test_mixed_recipe_puts_sensitive_layers_at_more_bits(tiny_model):
    recorded = quantization(edgequant.convert(tiny_model, "mlx:mixed_3_6"))
    bits = {k: v["bits"] for k, v in recorded.items() if isinstance(v, dict)}
    assert bits["model.layers.0.self_attn.q_proj"] == 3
    assert 6 in bits.values() and 3 in bits.values()


def test_eight_bit_within_one_percent_and_four_bit_worse(tiny_model):
    eight = edgequant.evaluate(edgequant.convert(tiny_model, "mlx:8bit").path, config=QUALITY)
    four = edgequant.evaluate(edgequant.convert(tiny_model, "mlx:4bit").path, config=QUALITY)
    assert abs(eight["ppl_increase_pct"]) < 1.0, eight
    assert four["kld_mean"] > eight["kld_mean"]


def test_runner_generates_deterministically(tiny_model):
    from edgequant.registry import open_runner
    from edgequant.runner import GenerateParams

    artifact = edgequant.convert(tiny_model, "mlx:8bit")
    with open_runner(artifact.path, n_ctx=128, need_logits=False) as runner:
        prompt = runner.tokenize("The history of")
        params = GenerateParams(max_tokens=6, stop_at_eos=False)
        first = list(runner.generate(prompt, params))
        assert len(first) == 6 and first == list(runner.generate(prompt, params))


def test_missing_mlx_names_the_extra(tiny_model, tmp_path, monkeypatch):
    for name in ("mlx", "mlx.core", "mlx_lm"):
        monkeypatch.setitem(sys.modules, name, None)  # makes `import mlx.core` raise ImportError
    out = tmp_path / "out"
    with pytest.raises(EdgequantError, match="engine is not installed") as err:
        edgequant.convert(tiny_model, "mlx:4bit", output=out)
    assert "edgequant[mlx]" in err.value.fix
    assert not out.exists()


@pytest.mark.parametrize("spec", ["mlx:4bit?group=48", "mlx:5bit", "mlx:4bit?embed_bits=5"])
def test_bad_specs_are_refused(tiny_model, tmp_path, spec):
    with pytest.raises(EdgequantError):
        edgequant.convert(tiny_model, spec, output=tmp_path / "out")
    assert not list(tmp_path.iterdir())


def test_inspect_estimates_mlx_sizes(tiny_model):
    estimates = edgequant.inspect_model(tiny_model)["estimated_bytes"]
    assert estimates["mlx:8bit"] > estimates["mlx:6bit"] > estimates["mlx:4bit"] > estimates["mlx:2bit"] > 0


# --- the real default model -------------------------------------------------------------------

REAL = EvalConfig(ctx=512, windows=2, speed=False)  # 2 windows: the gaps asserted are many times the noise
EVERYTHING_4BIT = "mlx:4bit?embed_bits=0"


@pytest.fixture(scope="module")
def real_results():
    results = {}
    for spec in ("mlx:8bit", "mlx:4bit", EVERYTHING_4BIT):
        artifact = edgequant.convert(None, spec)
        results[spec] = (artifact, edgequant.evaluate(artifact.path, config=REAL))
    return results


@pytest.mark.slow
def test_real_model_eight_bit_within_one_percent_four_bit_worse(real_results):
    """The default model's linear layers come from Q4_1, so on min/max grids the default 4-bit
    (embedding at 8 bit) and 8-bit both reproduce them and tie within noise. Only the Q8_0 embedding
    holds more than 4 bits of information: with it at 4 bit too, 4-bit must lose more than 8-bit."""
    eight, four = real_results["mlx:8bit"][1], real_results[EVERYTHING_4BIT][1]
    assert abs(eight["ppl_increase_pct"]) < 1.0, eight
    assert four["kld_mean"] > 2 * eight["kld_mean"], (four, eight)
    assert four["ppl_increase_pct"] > eight["ppl_increase_pct"]


@pytest.mark.slow
def test_real_model_default_four_bit_meets_the_quality_target(real_results):
    """At most 1.5x gguf:q4_k_m's perplexity increase (+6.11%) at most 1.2x its size (100.6 MiB)."""
    artifact, metrics = real_results["mlx:4bit"]
    assert quantization(artifact)["bits"] == 4
    assert artifact.manifest["details"]["grid_layers"]["mlx"] == 0  # every layer on the min/max grid
    assert metrics["ppl_increase_pct"] <= 1.5 * 6.11, metrics
    assert artifact.size_bytes <= 1.2 * 100.6 * 2**20


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_minmax_grid_is_read_back_by_mlx_exactly(bits):
    """Weights on a min/max grid (as a Q4_1 GGUF's are) come back unchanged through our packing and
    mx.dequantize; mx.quantize's own rounding moves them off it (why the default is grid=minmax)."""
    import mlx.core as mx
    import numpy as np

    from edgequant.backends.mlx.grid import minmax_quantize

    rng = np.random.default_rng(bits)
    q = rng.integers(0, 2**bits, (16, 4, 32))
    q[..., 0], q[..., 1] = 0, 2**bits - 1  # every group spans the whole grid
    step = rng.uniform(0.01, 0.03, (16, 4, 1)).astype(np.float16).astype(np.float32)
    low = -rng.uniform(0.05, 0.3, (16, 4, 1)).astype(np.float16).astype(np.float32)
    weight = (low + step * q).reshape(16, 128).astype(np.float32)
    packed, scales, biases = minmax_quantize(weight, bits, 32)
    def as32(a):
        return mx.array(a).astype(mx.float32)  # float16 output would round the values themselves
    back = np.array(mx.dequantize(mx.array(packed), as32(scales), as32(biases), group_size=32, bits=bits))
    assert np.abs(back - weight).max() < 0.02 * step.min()
    if bits == 4:
        theirs = mx.dequantize(*mx.quantize(mx.array(weight), group_size=32, bits=4), group_size=32, bits=4)
        assert np.abs(np.array(theirs) - weight).max() > 0.3 * step.min()


def test_mlx_rounding_stays_available(tiny_model):
    artifact = edgequant.convert(tiny_model, "mlx:4bit?grid=mlx")
    assert "grid_layers" not in artifact.manifest["details"]
    assert artifact.manifest["details"]["quantization"]["grid"] == "mlx"


SCORE_WITHOUT_TORCH = """
import sys, json
sys.modules["torch"] = sys.modules["transformers"] = None  # any import of them raises ImportError
import numpy as np
import mlx.core as mx
from edgequant.registry import open_runner
with open_runner(sys.argv[1], n_ctx=128, need_logits=True) as runner:
    ids = runner.tokenize("The history of the city of London is long")
    ours = runner.logits(ids)
    direct = np.array(runner._model(mx.array([ids]))[0])  # the mlx-lm model called by hand
    label = runner.arithmetic()
print(json.dumps({"shape": list(ours.shape), "max_diff": float(np.abs(ours - direct).max()),
                  "finite": bool(np.isfinite(ours).all()), "arithmetic": label}))
"""


def test_logits_come_from_mlx_with_torch_unimportable(tiny_model):
    """The quality figures are MLX's own arithmetic: scoring works in a process where torch and
    transformers cannot be imported, and equals the mlx-lm model's forward pass."""
    import subprocess

    artifact = edgequant.convert(tiny_model, "mlx:4bit?group=32")
    done = subprocess.run([sys.executable, "-c", SCORE_WITHOUT_TORCH, str(artifact.path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["finite"] and result["shape"][0] > 5
    assert result["max_diff"] == 0.0
    assert "MLX" in result["arithmetic"] and "float32" in result["arithmetic"]


def test_windows_scored_on_parallel_streams_equal_each_window_alone(tiny_model):
    """Scoring windows two at a time (one MLX CPU stream, one thread, each) gives every window
    the logits of its own pass, in order."""
    from edgequant.registry import open_runner

    artifact = edgequant.convert(tiny_model, "mlx:4bit?group=32")
    with open_runner(artifact.path, n_ctx=128, need_logits=True, threads=2) as runner:
        windows = [runner.tokenize(text) for text in ("The history of the city", "A river runs through it and on",
                                                      "Numbers: one two three four five")]
        together = [np.concatenate(list(blocks)) for blocks in runner.logits_of_windows(windows)]
        alone = [runner.logits(ids) for ids in windows]
    assert [a.shape for a in together] == [a.shape for a in alone] == [(len(ids), a.shape[1]) for ids, a in zip(windows, alone)]
    assert all(np.array_equal(a, b) for a, b in zip(together, alone))


DEQUANTIZED_AGAINST_KERNEL = """
import json, sys
import numpy as np
import edgequant
import edgequant.backends._shared.slices as slices
import edgequant.backends.mlx.runner as mlx_runner
from edgequant.registry import open_runner
artifact = edgequant.convert(sys.argv[1], "mlx:4bit?group=32", output=sys.argv[2])  # mlx-lm loads mlx first
slices.SLICE_BYTES, mlx_runner.OUTPUT_BLOCK_BYTES = 1, 4096  # small slices and vocabulary blocks, as a 262k vocabulary gets
with open_runner(artifact.path, n_ctx=128, need_logits=True) as runner:
    ids = runner.tokenize("The history of the city of London is long, and its river has carried ships, "
                          "goods and people to and from the sea for two thousand years.")
    blocks = list(next(runner.logits_of_windows([ids])))
    swapped = [m for _, m in runner._model.named_modules() if type(m).__name__.startswith("Dequantizing")]
    for module in swapped:
        module.__class__ = type(module).__mro__[1]  # mlx's own quantized layer again
    import mlx.core as mx
    kernel = np.array(runner._model(mx.array([ids]))[0].astype(mx.float32))  # the whole model on its kernels
    scored = np.concatenate(blocks)
    print(json.dumps({"tokens": len(ids), "blocks": len(blocks), "swapped": len(swapped), "blas": runner._blas,
                      "shape_equal": scored.shape == kernel.shape,
                      "max_diff": float(np.abs(scored - kernel).max()), "scale": float(np.abs(kernel).max()),
                      "arithmetic": runner.arithmetic()}))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the OpenBLAS route is for mlx's Linux wheels")
def test_long_passes_through_openblas_equal_mlx_quantized_kernel(tiny_model, tmp_path):
    """In a process that converts and then scores (mlx-lm loads mlx during the conversion), mlx's
    float products go to numpy's OpenBLAS, and scoring (the model up to its output layer, then the
    output layer a slice of rows and a block of vocabulary at a time, on weights dequantized by
    MLX) gives the whole model's logits on its quantized kernels within float32 rounding."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", DEQUANTIZED_AGAINST_KERNEL, str(tiny_model), str(tmp_path / "mlx")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["blas"] and "openblas" in result["blas"]
    assert result["tokens"] >= 16 and result["swapped"] > 0 and result["shape_equal"]
    assert result["blocks"] == -(-result["tokens"] // 32)  # handed over 32 rows at a time
    assert result["max_diff"] <= 1e-4 * max(result["scale"], 1.0)
    assert "OpenBLAS" in result["arithmetic"]
