"""A disk that fills during a conversion: a clear error, exit code 2, nothing partial left.

The test mounts a 1 MiB tmpfs (root only; skipped with the reason elsewhere) and converts the
tiny model into it, which needs several MB.
"""

from __future__ import annotations

import subprocess

import pytest


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or 'mount failed'}): needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


@pytest.mark.parametrize("spec", ["gguf:f32", "gguf:q8_0", "onnx:fp32"])
def test_a_conversion_that_fills_the_disk_fails_cleanly(cli, tiny_model, onnx_tiny, small_disk, spec):
    model = onnx_tiny if spec.startswith("onnx") else tiny_model
    done = cli("convert", str(model), "--to", spec, "-o", str(small_disk / "out"))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "fix:" in done.stderr
    assert "filled up during the conversion" in done.stderr and "build.log" not in done.stderr, done.stderr
    assert list(small_disk.iterdir()) == []  # no artifact, no temporary folder
