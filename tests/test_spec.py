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


def test_a_value_is_dropped_only_when_the_precision_would_use_it():
    qnn = get_backend("qnn")
    # w4a16 builds blocks of 32 and w8a8 per output channel unless told otherwise: an explicit 64 is
    # the user's choice, not "the default", and must reach the backend.
    for text, block in (("qnn:w4a16?block=64", 64), ("qnn:w8a8?block=64", 64), ("qnn:w4a16", 32), ("qnn:w8a8", 0),
                        ("qnn:w8a16", 64)):
        assert qnn.option_values(parse_spec(text)).block == block, text
    assert str(parse_spec("qnn:w4a16?block=64")) == "qnn:w4a16?block=64"
    assert parse_spec("qnn:w4a16?block=32") == parse_spec("qnn:w4a16")  # the precision's own default: one artifact
    assert parse_spec("qnn:w8a8?block=0") == parse_spec("qnn:w8a8")


def test_every_value_a_user_gives_is_the_value_the_backend_reads():
    """For every format, precision and option, each allowed value (and the declared default) given
    explicitly is what `option_values` hands the backend, and giving the precision's default
    builds the same spec as giving nothing."""
    checked = 0
    for fmt in format_names():
        backend = get_backend(fmt)
        for precision in backend.precisions:
            for option in backend.options.values():
                if not option.applies(precision):
                    continue
                for value in {option.default, option.default_for(precision), *option.choices}:
                    text = f"{fmt}:{precision}?{option.name}={_typed(value)}"
                    try:
                        spec = parse_spec(text)
                    except EdgequantError:  # a rule between options (e.g. needs a data-aware mode)
                        continue
                    assert getattr(backend.option_values(spec), option.name) == value, text
                    if value == option.default_for(precision):
                        assert spec == parse_spec(f"{fmt}:{precision}"), text
                    checked += 1
    assert checked > 100


def _typed(value) -> str:
    return ("1" if value else "0") if isinstance(value, bool) else str(value)


def test_an_option_given_twice_is_refused():
    with pytest.raises(EdgequantError, match="given twice"):
        parse_spec("qnn:w4a16?block=64&block=32")


def test_cross_option_rules_see_what_the_user_wrote():
    # kv=8 is graphs=kv's default; written beside graphs=fixed it is still an option that does not apply
    with pytest.raises(EdgequantError, match="graphs=kv only"):
        parse_spec("qnn:w8a16?graphs=fixed&kv=8")


def test_one_reader_for_every_spec_list():
    readme = "gguf:q4_k_m?tensor=ffn_down:q6_k,attn_v:q8_0"
    assert [str(s) for s in parse_specs(readme)] == [readme]
    assert [str(s) for s in parse_specs([readme, "onnx:int4,gguf:q8_0"])] == [readme, "onnx:int4", "gguf:q8_0"]
    assert parse_specs(parse_spec("gguf:q8_0")) == [parse_spec("gguf:q8_0")]
