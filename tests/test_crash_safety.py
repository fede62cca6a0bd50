"""Crash safety: SIGKILL at seeded random moments of real commands leaves whole artifacts, a sound
results store and no child process; the next run sweeps what the killed one left, reuses what it
finished and ends as an uninterrupted run does (tests/crash_points.py). bench/hardening.py runs the
same harness with many more kills and every command the issue names."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import crash_points
from edgequant.atomic import sweep_leftovers


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_what_dead_processes_left_is_swept(tmp_path):
    dead = _dead_pid()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        names = {f".q8_0.tmp-{dead}-ab12": "dir", f".ref.npy.tmp-{dead}-cd34": "file", f".q4_0.old-{dead}": "dir",
                 f".mlx.so.tmp-{dead}-ef56.c": "file",  # gone
                 f".q8_0.tmp-{sleeper.pid}-ab12": "dir", f".run.tmp-{os.getpid()}-x": "dir",  # alive: theirs
                 "q8_0.tmp-1-ab": "dir", ".hidden": "file", f"notes.tmp-{dead}": "file"}  # not ours to judge
        for name, kind in names.items():
            (tmp_path / name).mkdir() if kind == "dir" else (tmp_path / name).write_text("x")
        removed = sweep_leftovers(tmp_path)
        assert sorted(p.name for p in removed) == sorted(list(names)[:4])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(list(names)[4:])
    finally:
        sleeper.kill()


def test_a_command_keeps_its_temporary_files_in_the_cache_and_removes_them(cli, tiny_model, tmp_path):
    home = tmp_path / "home"
    dead = _dead_pid()
    (home / "artifacts" / "f" / f".q8_0.tmp-{dead}-zz").mkdir(parents=True)  # as a killed convert leaves it
    (home / "tmp" / f".run.tmp-{dead}-zz").mkdir(parents=True)
    done = cli("convert", str(tiny_model), "--to", "gguf:q8_0", "-o", str(tmp_path / "out"),
               env={"EDGEQUANT_HOME": str(home)})
    assert done.returncode == 0, done.stderr
    assert crash_points.leftovers(home, tmp_path) == []  # swept, and this run's own scratch folder removed


@pytest.mark.parametrize("job", crash_points.jobs(quick=True)[::2], ids=lambda job: job.name)  # convert, bench
def test_killed_at_random_moments_then_run_again(job, tiny_model, tmp_path):
    found = crash_points.trials(job, tiny_model, tmp_path, kills=2, seed=29)
    for trial in found["kills"]:
        assert trial["violations"] == [], trial
        assert trial["orphans"] == 0, trial  # the converter and the speed probe die with their parent
    final = found["after_final_run"]
    assert final == {"leftovers": [], "violations": [], "same_result": True}, final
