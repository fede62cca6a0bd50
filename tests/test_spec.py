import pytest

from edgequant.errors import EdgequantError
from edgequant.registry import format_names, get_backend, parse_spec, parse_specs
from edgequant.spec import PrecisionClass

pytestmark = pytest.mark.unit


def test_parses_format_precision_and_options():
    spec = parse_spec(" GGUF:Q4_K_M?pure=1&nthread=2 ")
    assert (spec.format, spec.precision) == ("gguf", "q4_k_m")
    assert spec.options == {"pure": True, "nthread": 2}
    assert str(spec) == "gguf:q4_k_m?nthread=2&pure=1"


def test_default_options_are_dropped_so_equal_specs_compare_equal():
    assert parse_spec("gguf:q8_0?pure=0") == parse_spec("gguf:q8_0")
    assert str(parse_spec("gguf:q8_0?pure=0")) == "gguf:q8_0"


@pytest.mark.parametrize(
    "text, words",
    [
        ("tflite:int8", ["unknown format", "gguf"]),
        ("gguf:q9_9", ["unknown precision", "q4_k_m", "q8_0"]),
        ("gguf:q4_0?block=32", ["unknown option", "pure="]),
        ("gguf:q4_0?pure=maybe", ["out of range", "0|1"]),
        ("gguf:q4_0?nthread=-1", ["out of range"]),
        ("q4_k_m", ["FORMAT:PRECISION"]),
    ],
)
def test_bad_specs_name_the_problem_and_the_valid_choices(text, words):
    with pytest.raises(EdgequantError) as err:
        parse_spec(text)
    message = str(err.value)
    for word in words:
        assert word in message


def test_list_is_validated_entirely_before_use():
    with pytest.raises(EdgequantError):
        parse_specs("gguf:q8_0,gguf:nope")
    assert [str(s) for s in parse_specs("gguf:q8_0,gguf:q4_k_m")] == ["gguf:q8_0", "gguf:q4_k_m"]


def test_precision_table_covers_every_class_with_sane_bits():
    gguf = get_backend("gguf")
    classes = {p.klass for p in gguf.precisions.values()}
    assert classes == set(PrecisionClass)
    assert gguf.precisions["tq1_0"].klass is PrecisionClass.ULTRA_LOW
    assert gguf.precisions["q3_k_m"].klass is PrecisionClass.LOW
    assert gguf.precisions["q6_k"].klass is PrecisionClass.MEDIUM
    assert gguf.precisions["bf16"].klass is PrecisionClass.FLOAT
    needed = {"f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q5_k_s", "q5_1", "q5_0", "q4_k_m", "q4_k_s", "q4_1",
              "q4_0", "q3_k_l", "q3_k_m", "q3_k_s", "q2_k", "iq4_nl", "iq4_xs", "iq3_s", "tq2_0", "tq1_0"}
    assert needed <= set(gguf.precisions)


def test_every_registered_backend_imports_and_declares_precisions():
    for name in format_names():
        backend = get_backend(name)
        assert backend.name == name and backend.precisions
