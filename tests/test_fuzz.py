"""Property-based fuzzing (hypothesis) of everything that reads user input before an engine does
(tests/fuzz_targets.py: the spec, gate and recipe parsers and the GGUF, safetensors and
importance-matrix readers). Each input either parses or is refused with our EdgequantError (or, for
the GGUF walk, HeaderProblem); any other exception is a bug the fuzzer reports with the input that
caused it. Bounded: a fixed number of inputs per reader, no deadline, derandomized so CI sees the
same inputs each run. bench/hardening.py runs the same targets with many more inputs.
"""

from __future__ import annotations

import pytest

pytest.importorskip("hypothesis", reason="the dev extra (hypothesis) is not installed")
from hypothesis import HealthCheck, given, settings  # noqa: E402

from fuzz_targets import TARGETS  # noqa: E402

pytestmark = pytest.mark.unit
BOUNDED = settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("target", TARGETS, ids=lambda target: target.name.replace(" ", "-"))
def test_every_input_parses_or_gets_our_error(target):
    def check(value) -> None:  # hypothesis wants None back; the outcome itself does not matter here
        target.outcome(value)

    BOUNDED(given(target.inputs())(check))()
