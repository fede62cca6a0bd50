"""Two edgequant processes on one cache: the second waits for the first's lock on the same
artifact, says for whom, and reuses the result instead of building it again; a lock whose holder
was killed does not block anyone (locks.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

EDGEQUANT = [sys.executable, "-m", "edgequant"]


def _start(*args: str, home) -> subprocess.Popen:
    env = {**os.environ, "EDGEQUANT_HOME": str(home), "EDGEQUANT_QUIET": "0"}
    return subprocess.Popen([*EDGEQUANT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def test_the_second_of_two_conversions_waits_and_reuses_the_first(tiny_model, tmp_path):
    home = tmp_path / "home"
    first = _start("convert", str(tiny_model), "--to", "gguf:q8_0", home=home)
    lock_files = lambda: list(home.glob("locks/*.lock"))  # noqa: E731
    deadline = time.monotonic() + 120
    while not lock_files() and time.monotonic() < deadline:  # the first holds its lock
        time.sleep(0.05)
    second = _start("convert", str(tiny_model), "--to", "gguf:q8_0", home=home)
    out1, err1 = first.communicate(timeout=600)
    out2, err2 = second.communicate(timeout=600)
    assert first.returncode == 0 and second.returncode == 0, (err1, err2)
    assert out1.split("\t")[-1] == out2.split("\t")[-1]  # the same artifact
    assert f"waiting: process {first.pid}" in err2, err2
    assert "cache hit" in err2 and "F32 GGUF with llama.cpp's converter" not in err2  # nothing built twice
    assert len(list((home / "intermediates").iterdir())) == 1  # one float GGUF


def test_a_killed_holder_leaves_no_lock_behind(tiny_model, tmp_path):
    home = tmp_path / "home"
    victim = _start("convert", str(tiny_model), "--to", "gguf:q4_0", home=home)
    deadline = time.monotonic() + 120
    while not list(home.glob("locks/*.lock")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    after = _start("convert", str(tiny_model), "--to", "gguf:q4_0", home=home)
    _, err = after.communicate(timeout=600)
    assert after.returncode == 0, err
    assert "waiting:" not in err  # the kernel released the dead process's lock
