"""Importance matrices: llama.cpp's file layouts, the statistics themselves (PyTorch against
llama.cpp's own evaluation callback), and the GGUF options that use them."""

import ctypes
import json
import struct
import subprocess
import sys

import numpy as np
import pytest

import edgequant
from edgequant.errors import EdgequantError

pytest.importorskip("gguf", reason="its extra is not installed")
pytest.importorskip("llama_cpp", reason="its extra is not installed")
from gguf import GGUFReader, GGUFWriter  # noqa: E402

from edgequant.backends.gguf.imatrix import ImportanceMatrix, read_imatrix, write_imatrix  # noqa: E402


def sample_matrix(seed: int = 0) -> ImportanceMatrix:
    rng = np.random.default_rng(seed)
    return ImportanceMatrix({"blk.0.attn_q.weight": rng.random((1, 64), dtype=np.float32) * 100,
                             "blk.0.ffn_down.weight": rng.random((1, 96), dtype=np.float32) * 100},
                            {"blk.0.attn_q.weight": np.array([1024], np.float32), "blk.0.ffn_down.weight": np.array([0], np.float32)},
                            ["calibration.txt"], 2, 512)


@pytest.mark.unit
def test_write_read_round_trip_is_identical(tmp_path):
    written = sample_matrix()
    write_imatrix(written, tmp_path / "m.gguf")
    read = read_imatrix(tmp_path / "m.gguf")
    assert read.datasets == ["calibration.txt"] and (read.chunk_count, read.chunk_size) == (2, 512)
    for name in written.sums:
        assert np.array_equal(read.sums[name], written.sums[name]) and np.array_equal(read.counts[name], written.counts[name])
    weights = read.importance()
    assert np.allclose(weights["blk.0.attn_q.weight"], written.sums["blk.0.attn_q.weight"][0] / 1024)
    assert np.all(weights["blk.0.ffn_down.weight"] == 1.0)  # no rows seen: every column weighs alike, as in llama.cpp
    assert GGUFReader(tmp_path / "m.gguf").fields["general.type"].contents() == "imatrix"


@pytest.mark.unit
def test_reads_a_gguf_imatrix_in_llama_cpp_layout_written_by_gguf_py(tmp_path):
    """Written independently of our writer, the way llama-imatrix lays it out."""
    sums = np.arange(2 * 32, dtype=np.float32).reshape(2, 32)  # two experts of 32 inputs
    writer = GGUFWriter(tmp_path / "theirs.gguf", arch="llama")
    writer.add_type("imatrix")
    writer.add_array("imatrix.datasets", ["wiki.train.raw"])
    writer.add_uint32("imatrix.chunk_count", 10)
    writer.add_uint32("imatrix.chunk_size", 512)
    writer.add_tensor("blk.3.ffn_up_exps.weight.in_sum2", sums)
    writer.add_tensor("blk.3.ffn_up_exps.weight.counts", np.array([[512.0], [0.0]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    read = read_imatrix(tmp_path / "theirs.gguf")
    assert read.datasets == ["wiki.train.raw"] and read.chunk_count == 10
    assert np.array_equal(read.sums["blk.3.ffn_up_exps.weight"], sums)
    weights = read.importance()["blk.3.ffn_up_exps.weight"]
    assert np.allclose(weights[:32], sums[0] / 512) and np.all(weights[32:] == 1.0)


@pytest.mark.unit
def test_reads_the_legacy_dat_layout(tmp_path):
    """llama-imatrix's --output-format dat: per entry the mean times the chunk count (ncall)."""
    mean = np.linspace(0.5, 2.0, 16, dtype=np.float32)
    ncall = 7
    name = b"blk.0.attn_k.weight"
    blob = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", ncall, mean.size)
    blob += (mean * ncall).astype("<f4").tobytes() + struct.pack("<i", ncall) + struct.pack("<i", 8) + b"calib.md"
    (tmp_path / "old.dat").write_bytes(blob)
    read = read_imatrix(tmp_path / "old.dat")
    assert read.datasets == ["calib.md"] and read.chunk_count == ncall
    assert np.allclose(read.importance()["blk.0.attn_k.weight"], mean, rtol=1e-6)


@pytest.mark.unit
def test_a_file_that_is_no_imatrix_is_a_clear_error(tmp_path):
    (tmp_path / "junk.dat").write_bytes(b"\xff" * 64)
    with pytest.raises(EdgequantError, match="not a llama.cpp importance matrix"):
        read_imatrix(tmp_path / "junk.dat")
    with pytest.raises(EdgequantError, match="no importance matrix file"):
        read_imatrix(tmp_path / "missing.gguf")


# --- with the engines -----------------------------------------------------------------------

def llama_cpp_statistics(gguf_path, chunks: list[list[int]]) -> dict[str, tuple[np.ndarray, int]]:
    """Sum of squared inputs of every matrix multiplication with a model weight, read through
    llama.cpp's evaluation callback (the hook llama-imatrix uses), over independent chunks."""
    import llama_cpp

    class Tensor(ctypes.Structure):  # struct ggml_tensor of the vendored ggml (include/ggml.h)
        pass

    Tensor._fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p), ("ne", ctypes.c_int64 * 4),
                       ("nb", ctypes.c_size_t * 4), ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                       ("flags", ctypes.c_int32), ("src", ctypes.POINTER(Tensor) * 10), ("view_src", ctypes.c_void_p),
                       ("view_offs", ctypes.c_size_t), ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                       ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]
    mul_mat = 29  # GGML_OP_MUL_MAT in the vendored ggml's enum ggml_op
    stats: dict[str, tuple[np.ndarray, int]] = {}

    def weight_of(t):
        src = t.src[0]
        return src.contents.name.decode() if t.op == mul_mat and src and src.contents.name.endswith(b".weight") else None

    @llama_cpp.ggml_backend_sched_eval_callback
    def callback(pointer, ask, _user):
        t = ctypes.cast(pointer, ctypes.POINTER(Tensor)).contents
        name = weight_of(t)
        if ask or name is None:
            return name is not None
        x = t.src[1].contents
        assert x.type == 0 and x.nb[1] == 4 * x.ne[0], "expects contiguous float32 activations"
        rows = x.ne[1] * x.ne[2] * x.ne[3]
        values = np.ctypeslib.as_array((ctypes.c_float * (x.ne[0] * rows)).from_address(x.data)).reshape(rows, x.ne[0])
        total, count = stats.get(name, (np.zeros(x.ne[0]), 0))
        stats[name] = (total + (values.astype(np.float64) ** 2).sum(0), count + rows)
        return True

    model = llama_cpp.llama_model_load_from_file(str(gguf_path).encode(), llama_cpp.llama_model_default_params())
    try:
        for ids in chunks:
            params = llama_cpp.llama_context_default_params()
            params.n_ctx = params.n_batch = params.n_ubatch = len(ids)
            params.cb_eval = callback
            # float32 attention: the default float16 KV cache (and flash attention's float16 path) rounds its inputs
            params.type_k = params.type_v = 0
            params.flash_attn_type = 0
            ctx = llama_cpp.llama_init_from_model(model, params)
            batch = llama_cpp.llama_batch_init(len(ids), 0, 1)
            for i, token in enumerate(ids):  # logits at every position: every row goes through every layer
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, i, 1, True
                batch.seq_id[i][0] = 0
            batch.n_tokens = len(ids)
            assert llama_cpp.llama_decode(ctx, batch) == 0
            llama_cpp.llama_batch_free(batch)
            llama_cpp.llama_free(ctx)
    finally:
        llama_cpp.llama_model_free(model)
    return stats


def test_pytorch_statistics_agree_with_llama_cpp_evaluation_callback(tiny_model, tiny_gguf_f32):
    from edgequant.backends._shared.calibration import calibration_windows
    from edgequant.backends.gguf.collect import collect_imatrix

    chunks = calibration_windows(tiny_model, 2, 512)
    ours = collect_imatrix(edgequant.load_source(tiny_model), tiny_gguf_f32.model_path, [t for c in chunks for t in c], "test")
    theirs = llama_cpp_statistics(tiny_gguf_f32.model_path, chunks)
    assert len(ours.sums) == 15 and set(ours.sums) <= set(theirs)  # 2 layers x 7 matrices + the untied output
    for name, sums in ours.sums.items():
        total, rows = theirs[name]
        assert rows == ours.counts[name][0] == 1024, name
        assert np.allclose(sums[0], total, rtol=1e-4, atol=1e-6), f"{name}: max rel diff {np.max(np.abs(sums[0] - total) / total)}"


def test_imatrix_changes_quantized_bytes_and_is_recorded(tiny_model):
    plain = edgequant.convert(tiny_model, "gguf:q3_k_m")
    weighted = edgequant.convert(tiny_model, "gguf:q3_k_m?imatrix=auto")
    name = "blk.0.ffn_down.weight"
    data = [next(np.asarray(t.data).tobytes() for t in GGUFReader(a.model_path).tensors if t.name == name) for a in (plain, weighted)]
    assert data[0] != data[1]
    recorded = weighted.manifest["details"]["imatrix"]
    assert recorded["requested"] == "auto" and recorded["tensors"] == 15 and recorded["chunks"] == 64
    assert recorded["datasets"] == ["edgequant calibration text"]
    assert weighted.manifest["details"]["tensor_types"][name] in ("q3_k", "q4_k", "q5_k")


def test_types_that_need_an_imatrix_work_with_one(tiny_model):
    from edgequant.measurement.settings import EvalConfig

    with pytest.raises(EdgequantError, match="needs an importance matrix") as err:
        edgequant.convert(tiny_model, "gguf:iq2_xs")
    assert "imatrix=auto" in err.value.fix
    artifact = edgequant.convert(tiny_model, "gguf:iq2_xs?imatrix=auto")
    assert artifact.manifest["details"]["tensor_types"]["blk.0.ffn_up.weight"] == "iq2_xs"
    metrics = edgequant.evaluate(artifact.path, config=EvalConfig(ctx=128, windows=1, speed=False))
    assert np.isfinite(metrics["perplexity"])


def test_embedding_output_and_per_tensor_types(tiny_model):
    artifact = edgequant.convert(tiny_model, r"gguf:q4_k_m?embd=q8_0&output=q5_k&tensor=blk\.1\.ffn_.+:q6_k,attn_v:q8_0")
    types = artifact.manifest["details"]["tensor_types"]
    assert types["token_embd.weight"] == "q8_0" and types["output.weight"] == "q5_k"
    assert types["blk.1.ffn_down.weight"] == types["blk.1.ffn_up.weight"] == "q6_k"  # the `+` survived spec parsing
    assert types["blk.0.attn_v.weight"] == types["blk.1.attn_v.weight"] == "q8_0"
    assert types["blk.0.ffn_up.weight"] == "q4_k"
    assert artifact.manifest["spec"]["options"]["tensor"] == r"blk\.1\.ffn_.+:q6_k,attn_v:q8_0"


def test_an_imatrix_file_is_hashed_and_a_changed_file_rebuilds(tiny_model, tmp_path):
    out = tmp_path / "m.gguf"
    facts = edgequant_cli("imatrix", str(tiny_model), "--tokens", "1024", "-o", str(out), "--json")
    assert facts["tensors"] == 15 and facts["chunks"] == 2 and read_imatrix(out).chunk_size == 512
    spec = f"gguf:q4_k_m?imatrix={out}"
    first = edgequant.convert(tiny_model, spec)
    assert edgequant.convert(tiny_model, spec).manifest["created"] == first.manifest["created"]  # a cache hit
    matrix = read_imatrix(out)  # another matrix under the same name
    matrix.sums = {name: sums * np.random.default_rng(1).random(sums.shape, dtype=np.float32) for name, sums in matrix.sums.items()}
    write_imatrix(matrix, out)
    rebuilt = edgequant.convert(tiny_model, spec)
    assert rebuilt.manifest["inputs"] != first.manifest["inputs"] and rebuilt.manifest["details"]["imatrix"]["file"] == str(out)


def test_imatrix_command_refuses_bad_input_and_leaves_nothing(tiny_model, tmp_path):
    for args, message in ((["--tokens", "100"], "fewer than one chunk"), (["--calib", str(tmp_path / "none.txt")], "no such text file")):
        done = subprocess.run([sys.executable, "-m", "edgequant", "imatrix", str(tiny_model), "-o", str(tmp_path / "m.gguf"), *args],
                              capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert not list(tmp_path.iterdir())


def edgequant_cli(*args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "edgequant", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


@pytest.mark.slow
def test_real_model_iq2_xs_with_an_imatrix_loads_and_scores():
    from edgequant.measurement.settings import EvalConfig

    artifact = edgequant.convert(None, "gguf:iq2_xs?imatrix=auto")
    metrics = edgequant.evaluate(artifact.path, config=EvalConfig(ctx=512, windows=1, speed=False))
    assert np.isfinite(metrics["perplexity"]) and metrics["top1_agreement"] > 0.3, metrics


@pytest.mark.unit
def test_type_numbers_are_ggml_s():
    from gguf import GGMLQuantizationType

    from edgequant.backends.gguf.ggml import GGML_TYPES

    assert all(GGMLQuantizationType[name.upper()] == number for name, number in GGML_TYPES.items())


# --- gguf:auto ------------------------------------------------------------------------------

@pytest.mark.unit
def test_allocation_fits_the_budget_and_spends_it_where_it_buys_most():
    from edgequant.backends.gguf.auto import Choice, Table, allocate

    def ladder(scale):
        return [Choice("q2_k", 100, 8.0 * scale), Choice("q4_k", 200, 2.0 * scale), Choice("q8_0", 400, 0.1 * scale)]
    table = Table({"blk.0.attn_v.weight": ladder(10.0), "blk.0.ffn_up.weight": ladder(1.0)}, fixed_bytes=50)
    weights = {"attn_v": 1.0, "ffn_up": 1.0}
    assert allocate(table, weights, 50 + 300) == {"blk.0.attn_v.weight": "q4_k", "blk.0.ffn_up.weight": "q2_k"}
    assert allocate(table, weights, 50 + 600) == {"blk.0.attn_v.weight": "q8_0", "blk.0.ffn_up.weight": "q4_k"}
    assert set(allocate(table, weights, 50 + 800).values()) == {"q8_0"}
    assert allocate(table, {"attn_v": 0.01, "ffn_up": 1.0}, 50 + 300)["blk.0.ffn_up.weight"] == "q4_k"  # measured weights decide


@pytest.mark.unit
def test_sizes_parse_in_decimal_and_binary_units():
    from edgequant.decisions.gates import parse_size

    assert parse_size("120MB") == 120_000_000 and parse_size("0.5GiB") == 2**29 and parse_size("4096") == 4096
    with pytest.raises(EdgequantError, match="not a size"):
        parse_size("lots")


def test_auto_meets_its_budget_and_beats_llama_cpp_recipe_at_that_size(tiny_model):
    from edgequant.measurement.settings import EvalConfig

    recipe = edgequant.convert(tiny_model, "gguf:q4_k_m?imatrix=auto")
    budget = recipe.manifest["model_bytes"]
    auto = edgequant.convert(tiny_model, f"gguf:auto?size={budget}")
    assert 0.99 * budget <= auto.manifest["model_bytes"] <= budget
    details = auto.manifest["details"]
    matrices = [n for n, t in details["tensor_types"].items() if t != "f32"]  # 2 x 7, the output and the embedding
    assert len(matrices) == 16 and details["auto"]["held_out_kld"] > 0 and 3 <= len(details["auto"]["candidates"]) <= 4
    assert details["auto"]["held_out"]["first_token"] >= details["imatrix"]["chunks"] * details["imatrix"]["chunk_size"]
    config = EvalConfig(ctx=512, windows=2, speed=False)
    ours, theirs = (edgequant.evaluate(a.path, config=config) for a in (auto, recipe))
    assert ours["ci95"]["kld_mean"][1] < theirs["ci95"]["kld_mean"][0], (ours, theirs)
    smaller = edgequant.convert(tiny_model, f"gguf:auto?size={budget * 3 // 4}")  # the ladder and role weights are reused
    searched = smaller.manifest["details"]["auto"]
    # only the candidates were measured: the role weights came from the memo (the first search's, or
    # an earlier test's on the same model when the order of tests differs)
    assert searched["measurements"] == len(searched["candidates"])
    assert smaller.manifest["model_bytes"] <= budget * 3 // 4


def test_auto_refuses_a_budget_it_cannot_meet_naming_the_smallest(tiny_model, tmp_path):
    out = tmp_path / "auto"
    with pytest.raises(EdgequantError, match="smallest reachable is [0-9,]+ bytes") as err:
        edgequant.convert(tiny_model, "gguf:auto?size=100KB", output=out)
    assert "size=" in err.value.fix
    assert not out.exists() and not list(tmp_path.iterdir())
